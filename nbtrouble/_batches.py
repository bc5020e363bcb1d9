"""The batch ``overfit_batch`` trains on, the loss it minimizes, and their validation.

A batch is ``(inputs, targets)`` or a dict of keyword inputs (Hugging Face style); the loss is
the user's, the model's own ``output.loss`` for a dict batch, or one inferred from the output
and the targets. Every mistake here is the user's input: it raises a clear ``ValueError`` /
``TypeError`` before anything trains.

Examples
--------
>>> batch = Batch.of((x, y))
>>> loss = check_loss(loss_value(batch, batch.forward(model), nn.CrossEntropyLoss()))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nbtrouble.findings import NbTroubleError


class OverfitUsageError(NbTroubleError, ValueError):
    """An argument of ``overfit_batch`` that cannot be used (the magic shows it as a UsageError)."""


class OverfitTypeError(NbTroubleError, TypeError):
    """An argument of ``overfit_batch`` of the wrong kind."""


@dataclass
class Batch:
    """A batch split into what goes into the model and what goes into the loss."""

    is_dict: bool
    inputs: Any
    targets: Any
    raw: Any

    @classmethod
    def of(cls, batch: Any) -> Batch:
        """Split ``batch``; raise ``OverfitTypeError`` for anything but a pair or a dict."""
        if isinstance(batch, Mapping):
            return cls(True, batch, None, batch)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return cls(False, batch[0], batch[1], batch)
        raise OverfitTypeError(
            "batch must be (inputs, targets) or a dict of model inputs (Hugging Face style), "
            f"not {describe(batch)}; group several inputs as ((x1, x2), targets)"
        )

    def forward(self, model: nn.Module) -> Any:
        """``model(**inputs)``, ``model(*inputs)`` or ``model(inputs)``, as the inputs are packed."""
        if self.is_dict or isinstance(self.inputs, Mapping):
            return model(**self.inputs)
        if isinstance(self.inputs, (tuple, list)):
            return model(*self.inputs)
        return model(self.inputs)


class InferredLoss:
    """The loss chosen from the output and targets when the user gives none."""

    def __init__(self, kind: str, reason: str, pick: Pick) -> None:
        self.kind = kind
        self.reason = reason
        self.pick = pick

    def __call__(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        output, target = self.operands(output, target)
        if self.kind == "mse":
            return F.mse_loss(output, target)
        return F.cross_entropy(output, target)

    def operands(self, output: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction and target as the loss compares them."""
        output = self.pick(output)
        if self.kind == "mse":
            return output, target
        if output.ndim > 2 and output.shape[:-1] == target.shape:  # (N, T, C) sequence logits
            return output.flatten(0, -2), target.flatten()
        return output, target


@dataclass(frozen=True)
class Pick:
    """Where the prediction sits in a model's output: the output itself, a key or a position."""

    key: str | int | None = None
    label: str = "output"

    @classmethod
    def of(cls, output: Any) -> Pick:
        """The ``logits`` entry if there is one, else the first tensor (HF and RNN conventions)."""
        if isinstance(output, Mapping):
            entries = [(k, k, f"output[{k!r}]") for k in output]
        elif isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
            entries = [(i, k, f"output.{k}") for i, k in enumerate(output._fields)]
        elif isinstance(output, (tuple, list)):
            entries = [(i, i, f"output[{i}]") for i in range(len(output))]
        else:
            return cls()
        tensors = [e for e in entries if isinstance(output[e[0]], torch.Tensor)]
        if not tensors:
            return cls()
        key, _, label = next((e for e in tensors if e[1] == "logits"), tensors[0])
        return cls(key, label)

    def __call__(self, output: Any) -> Any:
        return output if self.key is None else output[self.key]


def describe(value: Any) -> str:
    """A value's kind and size for a message: ``a float32 tensor of shape (8, 3)``."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"a {dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list, Mapping)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def infer_loss(output: Any, target: Any) -> InferredLoss:
    """Cross-entropy for class indices, MSE for one float target per output; else an error."""
    pick = Pick.of(output)
    prediction = pick(output)
    if isinstance(prediction, torch.Tensor) and isinstance(target, torch.Tensor):
        if not target.is_floating_point() and prediction.ndim >= 2:
            if prediction.shape[:1] + prediction.shape[2:] == target.shape:
                return InferredLoss("cross_entropy", "integer targets are class indices", pick)
            if prediction.shape[:-1] == target.shape:
                return InferredLoss("cross_entropy", "integer targets index the last dim", pick)
        if target.is_floating_point() and target.numel() == prediction.numel():
            return InferredLoss("mse", "float targets with one value per output", pick)
    raise OverfitUsageError(
        f"cannot infer a loss for {pick.label} ({describe(prediction)}) and target "
        f"{describe(target)}: pass loss_fn"
    )


def loss_value(batch: Batch, output: Any, loss_fn: Callable[..., Any] | None) -> Any:
    """The loss of one forward pass: ``loss_fn``'s, or the model's own ``output.loss``."""
    if not batch.is_dict:
        return loss_fn(output, batch.targets)  # type: ignore[misc]
    if loss_fn is not None:
        return loss_fn(output, batch.raw)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise OverfitUsageError(
            "the model's output has no .loss: put the labels in the batch (e.g. 'labels') "
            "or pass loss_fn(output, batch)"
        )
    return loss


def check_loss(loss: Any) -> torch.Tensor:
    """``loss`` if it is a scalar tensor that can be minimized, else a clear error."""
    if not isinstance(loss, torch.Tensor):
        raise OverfitTypeError(f"the loss must be a tensor, but loss_fn returned {describe(loss)}")
    if loss.numel() != 1:
        raise OverfitUsageError(
            f"the loss must be a scalar, but loss_fn returned {describe(loss)}: reduce it "
            "(e.g. .mean()) or use reduction='mean'"
        )
    if not loss.requires_grad:
        raise OverfitUsageError(
            "the loss does not depend on any trainable parameter (it has no grad_fn): "
            "check for torch.no_grad(), .detach() or requires_grad=False"
        )
    return loss

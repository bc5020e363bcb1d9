"""Checks that run before the first training step of ``overfit_batch``.

Each check looks at the batch, the model or the first forward / backward pass and returns
``Finding`` objects whose messages carry the numbers that were seen. None of them changes
the model. The hooks that watch the first pass live in ``_watches``, the probes of the loss
itself (its floor, its sign, its spread) in ``_loss_checks``.

Examples
--------
>>> check_inputs(torch.full((8, 3), 200.0), torch.zeros(8))[0].kind
'unnormalized_input'
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nbtrouble._loss_checks import ELEMENTWISE_LOSSES, LOGIT_LOSSES
from nbtrouble.findings import Finding

# Thresholds, chosen so that inputs standardized by any usual recipe never trip them.
_LARGE_SCALE = 10.0  # |mean| or std of an input tensor
_FEATURE_SCALE_RATIO = 1e3  # largest / smallest per-feature std
# Modules whose behaviour differs between train and eval mode.
_TRAIN_SENSITIVE = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _float_tensors(value: Any) -> list[tuple[str, torch.Tensor]]:
    """Named float tensors inside an input: a tensor, a tuple / list of them or a dict."""
    if isinstance(value, torch.Tensor):
        return [("input", value)] if value.is_floating_point() else []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [(f"input[{i}]", v) for i, v in enumerate(value)]
    else:
        return []
    return [(str(k), v) for k, v in items if isinstance(v, torch.Tensor) and v.is_floating_point()]


def check_inputs(inputs: Any, targets: Any) -> list[Finding]:
    """Non-finite values and scales far from normalized, before anything runs."""
    findings = []
    tensors = _float_tensors(inputs)
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        tensors.append(("target", targets))
    for name, tensor in tensors:
        finding = _nonfinite_values(name, tensor)
        if finding is not None:
            findings.append(finding)
        elif name != "target":
            findings.extend(_scale_findings(name, tensor.detach()))
    return findings


def _nonfinite_values(name: str, tensor: torch.Tensor) -> Finding | None:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    if not nan and not inf:
        return None
    return Finding(
        "nonfinite",
        "error",
        f"the batch's {name} {_shape(tensor)} holds {nan} NaN and {inf} Inf values "
        f"(of {tensor.numel()})",
        "Fix the data pipeline (missing values, division by zero, log of 0) before training.",
    )


def _scale_findings(name: str, x: torch.Tensor) -> list[Finding]:
    x = x.float()
    lo, hi = float(x.min()), float(x.max())
    mean, std = float(x.mean()), float(x.std()) if x.numel() > 1 else 0.0
    if lo >= 0 and 20 < hi <= 255 and bool(torch.all(x == x.round())):
        return [
            Finding(
                "unnormalized_input",
                "warning",
                f"{name} {_shape(x)} looks like raw 0..255 pixels: min {lo:.4g}, max {hi:.4g}, "
                f"mean {mean:.4g}",
                "Scale to [0, 1] (divide by 255) and normalize per channel to zero mean, unit "
                "variance.",
            )
        ]
    if abs(mean) > _LARGE_SCALE or std > _LARGE_SCALE:
        return [
            Finding(
                "unnormalized_input",
                "warning",
                f"{name} {_shape(x)} is far from normalized: mean {mean:.4g}, std {std:.4g}, "
                f"range {lo:.4g}..{hi:.4g}",
                "Subtract the mean and divide by the standard deviation (per feature or channel).",
            )
        ]
    return _feature_scales(name, x)


def _feature_scales(name: str, x: torch.Tensor) -> list[Finding]:
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        return []
    stds = x.std(dim=0)
    varying = torch.nonzero(stds > 0).flatten()
    if len(varying) < 2:
        return []
    big = int(varying[torch.argmax(stds[varying])])
    small = int(varying[torch.argmin(stds[varying])])
    ratio = float(stds[big] / stds[small])
    if ratio < _FEATURE_SCALE_RATIO:
        return []
    return [
        Finding(
            "unnormalized_input",
            "warning",
            f"{name} {_shape(x)} has features on wildly different scales: feature {big} has "
            f"std {float(stds[big]):.3g}, feature {small} has std {float(stds[small]):.3g} "
            f"({ratio:.3g}x)",
            "Standardize each feature (zero mean, unit variance) so that no feature dominates.",
        )
    ]


def check_modes(model: nn.Module) -> list[Finding]:
    """The model, or a dropout / batch-norm submodule, left in eval mode."""
    if not model.training:
        sensitive = [
            f"{type(m).__name__} '{path}'"
            for path, m in model.named_modules()
            if isinstance(m, _TRAIN_SENSITIVE)
        ]
        affected = (
            f"{len(sensitive)} dropout / batch-norm module(s) behave as at test time: "
            + ", ".join(sensitive[:6])
            if sensitive
            else "no dropout or batch norm inside, but its own code may test self.training"
        )
        return [
            Finding(
                "eval_mode",
                "warning",
                f"the model ({type(model).__name__}) is in eval mode (model.training is False) "
                f"while it trains: {affected}",
                "Call model.train() before training and model.eval() only to evaluate.",
            )
        ]
    stuck = [
        f"{path} ({type(m).__name__})"
        for path, m in model.named_modules()
        if not m.training and isinstance(m, _TRAIN_SENSITIVE)
    ]
    if not stuck:
        return []
    return [
        Finding(
            "eval_mode",
            "warning",
            f"{len(stuck)} submodule(s) stay in eval mode while the model trains: "
            + ", ".join(stuck[:6]),
            "Call model.train() on the whole model, unless freezing them was intended.",
            where=stuck[0].split(" ")[0],
        )
    ]


def check_labels(inputs: Any, targets: Any) -> list[Finding]:
    """Identical inputs with different targets: a batch no model can fit."""
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        return []
    n = inputs.shape[0] if inputs.ndim else 0
    if n < 2 or targets.shape[:1] != (n,) or inputs.numel() > 50_000_000:
        return []
    rows = inputs.detach().reshape(n, -1)
    _, group = torch.unique(rows, dim=0, return_inverse=True)
    labels = targets.detach().reshape(n, -1)
    for g in torch.unique(group):
        members = torch.nonzero(group == g).flatten()
        if len(members) > 1 and not bool(torch.all(labels[members] == labels[members[0]])):
            a = int(members[0])
            b = next(int(m) for m in members if not torch.equal(labels[m], labels[a]))
            return [
                Finding(
                    "label_noise",
                    "warning",
                    f"samples {a} and {b} have identical inputs but different targets "
                    f"({_short(targets[a])} vs {_short(targets[b])}): no model can fit both",
                    "Check that inputs and labels stay aligned through shuffling and joins.",
                )
            ]
    return []


def _short(t: torch.Tensor) -> str:
    return f"{t.item():.4g}" if t.numel() == 1 else f"tensor of shape {_shape(t)}"


def check_output(kind: str | None, output: Any, target: Any) -> list[Finding]:
    """Probabilities into a logit loss, and targets the loss would broadcast or misread."""
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
        return []
    return _probabilities(kind, output) + _targets(kind, output, target)


def _probabilities(kind: str | None, output: torch.Tensor) -> list[Finding]:
    made_by = output.grad_fn.name() if output.grad_fn is not None else ""
    out = output.detach()
    rows_sum_to_one = (
        out.ndim >= 2
        and bool(torch.all((out >= 0) & (out <= 1)))
        and bool(torch.allclose(out.sum(dim=1), torch.ones(()), atol=1e-4))
    )
    if kind in LOGIT_LOSSES and ("Softmax" in made_by or "Sigmoid" in made_by or rows_sum_to_one):
        what = "sigmoid" if "Sigmoid" in made_by else "softmax"
        return [
            Finding(
                "probabilities_to_logit_loss",
                "error",
                f"the model's output {_shape(out)} comes out of a {what} (values "
                f"{float(out.min()):.3g}..{float(out.max()):.3g}) and goes into {kind}, which "
                f"applies its own {'log-softmax' if kind == 'cross_entropy' else 'sigmoid'}",
                f"Return raw logits from the model (drop the final {what}); apply it only "
                "when predicting.",
            )
        ]
    if kind == "nll" and (rows_sum_to_one or float(out.max()) > 1e-6):
        seen = (
            "probabilities" if rows_sum_to_one else f"raw scores (max {float(out.max()):.3g} > 0)"
        )
        return [
            Finding(
                "probabilities_to_logit_loss",
                "error",
                f"nll_loss receives {seen}, but it expects log-probabilities (all <= 0)",
                "Apply log_softmax before nll_loss, or use cross_entropy on raw logits.",
            )
        ]
    if kind == "bce" and "Log" in made_by:
        return [
            Finding(
                "probabilities_to_logit_loss",
                "error",
                f"binary_cross_entropy receives log-probabilities ({made_by}), but it expects "
                "probabilities",
                "Use binary_cross_entropy_with_logits on raw logits instead.",
            )
        ]
    return []


def _targets(kind: str | None, output: torch.Tensor, target: torch.Tensor) -> list[Finding]:
    if kind == "cross_entropy":
        return _class_targets(output, target)
    if target.shape != output.shape:
        try:
            joint = torch.broadcast_shapes(output.shape, target.shape)
        except RuntimeError:
            joint = None
        grows = joint is not None and joint.numel() > max(output.numel(), target.numel())
        if kind in ELEMENTWISE_LOSSES or (grows and target.is_floating_point()):
            tail = (
                f" broadcast to {tuple(joint)}: every output is compared with every target"
                if grows
                else " do not match"
            )
            return [
                Finding(
                    "target_mismatch",
                    "error" if kind in ELEMENTWISE_LOSSES else "warning",
                    f"output {_shape(output)} and target {_shape(target)} of {kind or 'the loss'}"
                    + tail,
                    "Make them the same shape: target.view_as(output) or output.squeeze(-1).",
                )
            ]
    if kind in ELEMENTWISE_LOSSES and not target.is_floating_point():
        return [
            Finding(
                "target_mismatch",
                "error",
                f"{kind} gets {str(target.dtype).removeprefix('torch.')} targets: it needs "
                f"float targets like the output ({str(output.dtype).removeprefix('torch.')})",
                "Convert the targets with target.float().",
            )
        ]
    return []


def _class_targets(output: torch.Tensor, target: torch.Tensor) -> list[Finding]:
    if target.is_floating_point():
        if target.shape == output.shape:
            return []  # class probabilities: a legitimate target
        return [
            Finding(
                "target_mismatch",
                "error",
                f"cross_entropy gets float targets {_shape(target)} for output {_shape(output)}: "
                "float targets are read as class probabilities of the output's shape",
                "Pass class indices as a long tensor (target.long()).",
            )
        ]
    classes = output.shape[1] if output.ndim >= 2 else output.shape[0]
    valid = target[target != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= classes):
        return [
            Finding(
                "target_mismatch",
                "error",
                f"class indices range {int(valid.min())}..{int(valid.max())} but the output "
                f"{_shape(output)} has {classes} classes",
                "Map labels to 0..C-1 and make the last layer output one logit per class.",
            )
        ]
    return []


def check_gradients(model: nn.Module, called: set[str] | None = None) -> list[Finding]:
    """Trainable parameters whose ``.grad`` is still ``None`` after one backward pass.

    ``called`` names the modules the forward pass ran (see ``CallWatch``): a parameter of a
    module that never ran is a layer kept for another use (a head used only at inference), worth
    knowing; one of a module that ran was cut off from the loss, most likely a bug.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if not names:
        return []
    total = sum(1 for p in model.parameters() if p.requires_grad)
    unused = [n for n in names if called is not None and n.rpartition(".")[0] not in called]
    cut_off = [n for n in names if n not in unused]
    found = []
    if cut_off:
        found.append(
            _no_gradient(
                cut_off,
                total,
                "warning" if len(names) < total else "error",
                "get no gradient after one backward pass although their modules ran",
                "They are cut off from the loss: a .detach() / .data / .item(), or a "
                "torch.no_grad() block in forward.",
            )
        )
    if unused:
        found.append(
            _no_gradient(
                unused,
                total,
                "info",
                "belong to modules the forward pass never called",
                "Fine for a layer used only at inference or by another task; otherwise call it "
                "in forward (or drop it, so the optimizer does not carry it).",
            )
        )
    return found


def _no_gradient(names: list[str], total: int, severity: str, what: str, hint: str) -> Finding:
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return Finding(
        "no_gradient",
        severity,
        f"{len(names)} of {total} trainable parameter tensors {what}: {shown}",
        hint,
        where=names[0].rpartition(".")[0] or None,
    )

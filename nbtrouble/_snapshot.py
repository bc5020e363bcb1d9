"""Save and restore everything a training run on the user's model could change.

``overfit_batch`` trains the user's own model in place (so that the run sees exactly the
modules, hooks and devices the user has) and puts everything back afterwards: the same
parameter and buffer objects with the same values, their ``.grad``, every ``training`` flag,
the optimizer's state and the global random number generators. The saved values live on the
CPU, so a model on a GPU does not need twice its memory there; the cost is one host copy of
the parameters, buffers and optimizer state (``Snapshot.nbytes``).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


def _to_cpu(value: Any) -> Any:
    """A CPU copy of every tensor inside ``value`` (dicts, lists, tuples), other objects deep-copied."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


def _tensor_nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_nbytes(v) for v in value)
    return 0


@dataclass
class _SlotState:
    """One entry of a module's ``_parameters`` or ``_buffers``: the object and its values."""

    owner: nn.Module
    slots: str  # "_parameters" or "_buffers"
    name: str
    obj: torch.Tensor | None
    data: torch.Tensor | None
    grad: torch.Tensor | None
    requires_grad: bool


@dataclass
class _RngState:
    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> _RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@dataclass
class Snapshot:
    """Everything of the user's that a training run may change, kept on the CPU.

    Examples
    --------
    >>> snap = Snapshot.take(model, optimizer)
    >>> try:
    ...     train(model)
    ... finally:
    ...     snap.restore()
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    slots: list[_SlotState] = field(default_factory=list)
    training: list[tuple[nn.Module, bool]] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None
    optimizer_flags: dict[str, Any] = field(default_factory=dict)
    rng: _RngState | None = None
    grad_enabled: bool = True

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Snapshot:
        snap = cls(model, optimizer, grad_enabled=torch.is_grad_enabled())
        for module in model.modules():
            snap.training.append((module, module.training))
            for slots in ("_parameters", "_buffers"):
                for name, obj in getattr(module, slots).items():
                    snap.slots.append(_slot_state(module, slots, name, obj))
        if optimizer is not None:
            snap.optimizer_state = _to_cpu(optimizer.state_dict())
            snap.optimizer_flags = _plain_attributes(optimizer)
        snap.rng = _RngState.capture()
        return snap

    @property
    def nbytes(self) -> int:
        """Host memory the saved copies take, in bytes."""
        saved = [(s.data, s.grad) for s in self.slots]
        return _tensor_nbytes(saved) + _tensor_nbytes(self.optimizer_state)

    def restore(self, keep_values: bool = False) -> None:
        """Put every saved object and value back in place.

        With ``keep_values`` the trained parameter and buffer values stay (the user asked to
        keep the weights); everything else is restored.
        """
        with torch.no_grad():
            for slot in self.slots:
                _restore_slot(slot, keep_values)
        for module, flag in self.training:
            module.training = flag
        if self.optimizer is not None and self.optimizer_state is not None:
            _restore_optimizer(self.optimizer, self.optimizer_state, self.optimizer_flags)
        if self.rng is not None:
            self.rng.restore()
        torch.set_grad_enabled(self.grad_enabled)


def _slot_state(module: nn.Module, slots: str, name: str, obj: torch.Tensor | None) -> _SlotState:
    if obj is None:
        return _SlotState(module, slots, name, None, None, None, False)
    grad = obj.grad if isinstance(obj, nn.Parameter) else None
    return _SlotState(
        owner=module,
        slots=slots,
        name=name,
        obj=obj,
        data=_to_cpu(obj),
        grad=None if grad is None else _to_cpu(grad),
        requires_grad=obj.requires_grad,
    )


def _restore_slot(slot: _SlotState, keep_values: bool) -> None:
    getattr(slot.owner, slot.slots)[slot.name] = slot.obj
    tensor = slot.obj
    if tensor is None or slot.data is None:
        return
    if not keep_values:
        _restore_values(tensor, slot.data)
    if tensor.is_leaf:
        tensor.requires_grad_(slot.requires_grad)
    if isinstance(tensor, nn.Parameter):
        tensor.grad = None if slot.grad is None else slot.grad.to(tensor.device)


def _restore_values(tensor: torch.Tensor, saved: torch.Tensor) -> None:
    if tensor.shape != saved.shape or tensor.dtype != saved.dtype:
        tensor.data = saved.to(tensor.device)
    else:
        tensor.data.copy_(saved)


def _plain_attributes(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's flags and counters (e.g. the one an LR scheduler sets on each step)."""
    plain = (bool, int, float, str, type(None))
    return {k: v for k, v in vars(optimizer).items() if isinstance(v, plain)}


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any], flags: dict[str, Any]
) -> None:
    """Load the saved state back, keeping each state tensor on its parameter's device."""
    optimizer.state.clear()
    optimizer.load_state_dict(_to_cpu(saved))
    plain = _plain_attributes(optimizer)
    for name in plain.keys() - flags.keys():  # flags the run added
        delattr(optimizer, name)
    for name, value in flags.items():
        setattr(optimizer, name, value)

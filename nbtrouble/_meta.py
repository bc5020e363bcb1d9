"""``shapecheck(meta=True)``: run a block on shape-only tensors.

Two things make a block shape-only:

- factory calls (a model built in the block, ``torch.randn``...) land on the meta device, so
  weights are never allocated (``torch.device("meta")`` as a context);
- a real tensor that reaches an op (an existing model's parameters, the user's batch) is
  replaced, for that op only, by a meta tensor of the same shape, dtype and strides. The real
  tensor is never written: an in-place op (a batch norm's running statistics) updates the
  meta stand-in instead.
"""

from __future__ import annotations

import weakref
from types import TracebackType
from typing import Any

import torch

_META = torch.device("meta")


class MetaConverter:
    """Replaces real tensors by meta stand-ins; one stand-in per real tensor while active."""

    def __init__(self) -> None:
        self._device_context: Any = None
        # id(real) -> (weak reference to real, meta stand-in). The weak reference tells a live
        # entry from one whose id was reused; no real tensor is kept alive.
        self._stand_ins: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}

    def __enter__(self) -> MetaConverter:  # noqa: PYI034 - never subclassed
        self._device_context = torch.device("meta")
        self._device_context.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        context, self._device_context = self._device_context, None
        self._stand_ins.clear()
        if context is not None:
            context.__exit__(exc_type, exc, tb)

    def convert(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``args`` and ``kwargs`` with every real tensor (also inside lists) on meta."""
        if not any(self._needs(a) for a in args) and not any(
            self._needs(v) for v in kwargs.values()
        ):
            return args, kwargs
        new_args = tuple(self._value(a) for a in args)
        new_kwargs = {k: self._value(v) for k, v in kwargs.items()}
        return new_args, new_kwargs

    def _needs(self, value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            return _convertible(value)
        if isinstance(value, (list, tuple)):
            return any(isinstance(v, torch.Tensor) and _convertible(v) for v in value)
        return False

    def _value(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.stand_in(value)
        if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
            converted = [self.stand_in(v) if isinstance(v, torch.Tensor) else v for v in value]
            return type(value)(converted) if isinstance(value, tuple) else converted
        return value

    def stand_in(self, real: torch.Tensor) -> torch.Tensor:
        """The meta tensor standing in for ``real`` (itself when on meta or nested)."""
        if not _convertible(real):
            return real
        key = id(real)
        entry = self._stand_ins.get(key)
        if entry is not None and entry[0]() is real:
            return entry[1]
        meta = _meta_like(real)
        self._stand_ins[key] = (weakref.ref(real, self._forget(key)), meta)
        return meta

    def _forget(self, key: int) -> Any:
        stand_ins = self._stand_ins

        def forget(ref: weakref.ref[torch.Tensor]) -> None:
            entry = stand_ins.get(key)
            if entry is not None and entry[0] is ref:
                del stand_ins[key]

        return forget


def _convertible(tensor: torch.Tensor) -> bool:
    """A real tensor with one shape: a nested tensor has no meta form and stays as it is."""
    return tensor.device.type != "meta" and not tensor.is_nested


def _meta_like(real: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        meta = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=_META)
    if real.requires_grad:
        meta.requires_grad_(True)
    return meta

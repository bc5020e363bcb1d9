"""What every failure rule reads: the failing op, its named operands, the running layer.

Rules live in ``_failure_layers`` (layers and their functional ops), ``_failure_losses``
(losses and ``backward``) and ``_failure_tensor_ops`` (matmul, cat, view, indexing, ...);
``_failures`` runs them in order.
"""

from __future__ import annotations

from typing import Any

import torch

from nbtrouble._tensor_info import tensor_shape
from nbtrouble.findings import Finding

# Operator methods whose aten op has another name.
_DUNDER_OPS = {
    "truediv": "div",
    "floordiv": "floor_divide",
    "mod": "remainder",
    "and": "bitwise_and",
    "or": "bitwise_or",
    "xor": "bitwise_xor",
    "lshift": "bitwise_left_shift",
    "rshift": "bitwise_right_shift",
}


def shape_text(t: torch.Tensor) -> str:
    """``(32, 64)``: a tensor's shape as a plain tuple (``-1``: a nested tensor's ragged axis)."""
    if t.is_nested:
        return str(tensor_shape(t))
    return str(tuple(t.shape))


def dtype_text(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def first_line(exc: BaseException) -> str:
    text = _message(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def error_text(exc: BaseException) -> str:
    """``ValueError: unknown mode 'test'``: the error's type and first line."""
    text = _message(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a user's exception class with a broken __str__
        return ""


def broadcastable(*shapes: tuple[int, ...]) -> bool:
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError:
        return False
    return True


def is_torch_layer(module: torch.nn.Module | None) -> bool:
    return module is not None and type(module).__module__.startswith("torch.nn")


def layer_name(module: torch.nn.Module | None, path: str | None) -> str:
    """``Linear 'fc2'``, or just ``Linear`` for a model called on its own."""
    if module is None:
        return ""
    name = type(module).__name__
    return f"{name} '{path}'" if path else name


def operands_text(operands: dict[str, Any]) -> str:
    """``input (4, 8) float32, hx (1, 4, 20) float32``: the tensors with their names."""
    return ", ".join(
        f"{name} {shape_text(t)} {dtype_text(t)}"
        for name, t in operands.items()
        if isinstance(t, torch.Tensor)
    )


def canonical_op(op: str) -> str:
    """``__radd__`` -> ``add``, ``__iand__`` -> ``bitwise_and``, ``add_`` -> ``add``."""
    if not (op.startswith("__") and op.endswith("__")):
        return op.removesuffix("_")
    name = op[2:-2]
    if name[:1] in ("r", "i") and _aten_op(name) is None:
        rest = name[1:]
        if rest in _DUNDER_OPS or _aten_op(rest) is not None:
            name = rest
    return _DUNDER_OPS.get(name, name)


_aten_ops: dict[str, Any] = {}


def _aten_op(name: str) -> Any:
    if name not in _aten_ops:
        _aten_ops[name] = getattr(torch.ops.aten, name, None) if name.isidentifier() else None
    return _aten_ops[name]


_pointwise: dict[str, bool] = {}


def is_pointwise(op: str) -> bool:
    """Whether torch tags the op as element-wise, i.e. its operands broadcast together."""
    known = _pointwise.get(op)
    if known is None:
        packet = _aten_op(op)
        known = False
        if packet is not None:
            known = any(
                torch.Tag.pointwise in getattr(packet, name).tags for name in packet.overloads()
            )
        _pointwise[op] = known
    return known


class Context:
    """What every rule needs about one failure."""

    def __init__(
        self,
        op: str,
        operands: dict[str, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        module: torch.nn.Module | None,
        path: str | None,
        location: str | None,
        exc: BaseException,
        meta: bool,
        module_inputs: dict[str, Any] | None = None,
        library_line: str | None = None,
    ) -> None:
        self.raw_op = op
        self.op = canonical_op(op)
        self.operands = operands
        self.tensors = [v for v in operands.values() if isinstance(v, torch.Tensor)]
        self.args = args
        self.kwargs = kwargs
        self.module = module
        self.path = path
        self.location = location
        self.exc = exc
        self.meta = meta
        self.module_inputs = module_inputs or {}
        self.library_line = library_line
        self.layer = layer_name(module, path) if is_torch_layer(module) else ""

    def finding(self, kind: str, message: str, hint: str) -> Finding:
        if any(_is_vmapped(t) for t in self.tensors):
            message += " (inside vmap: shapes are per sample, without the mapped dim)"
        if self.library_line:
            message += f" (in {self.library_line})"
        if self.location:
            message += f" at {self.location}"
        return Finding(kind, "error", message, hint, where_text(self.location, self.path))

    def operand(self, *names: str) -> torch.Tensor | None:
        for name in names:
            value = self.operands.get(name)
            if isinstance(value, torch.Tensor):
                return value
        return None

    def argument(self, index: int, name: str, default: Any = None) -> Any:
        """A non-tensor argument by keyword or position."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[index] if len(self.args) > index else default

    def subject(self) -> str:
        """How to name what failed: the layer, else the op."""
        return self.layer or self.op


def _is_vmapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is one sample of a ``torch.func.vmap`` batch."""
    functorch = getattr(torch._C, "_functorch", None)
    check = getattr(functorch, "is_batchedtensor", None)
    return bool(check(t)) if check is not None else False


def where_text(location: str | None, path: str | None) -> str | None:
    parts = [p for p in (location, path) if p]
    return " ".join(parts) if parts else None

"""Shapes, dtypes and devices of an op's tensors, read cheaply: the tracer asks for every op.

Names of dtypes and devices are cached, since ``str(dtype)`` and reading ``t.device`` cost
more than the rest of recording an op.

Examples
--------
>>> import torch
>>> x = torch.zeros(2, 3)
>>> shapes_of(tensor_operands((x, [x, 1.0]), {"out": None}))
((2, 3), (2, 3))
>>> dtype_names_of([x]), device_names_of([x])
(('float32',), ('cpu',))
"""

from __future__ import annotations

from typing import Any

import torch

Shape = tuple[int, ...]


def tensor_operands(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> list[torch.Tensor]:
    """Tensor operands in argument order; a list or tuple of tensors is flattened."""
    found = []
    for value in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def output_tensors(result: Any, args: tuple[Any, ...]) -> list[torch.Tensor]:
    """Tensors an op produced; an in-place op returning ``None`` produced its first argument."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (list, tuple)):
        return [v for v in result if isinstance(v, torch.Tensor)]
    if result is None and args and isinstance(args[0], torch.Tensor):
        return [args[0]]
    return []


def shapes_of(tensors: list[torch.Tensor]) -> tuple[Shape, ...]:
    """Plain-tuple shapes of ``tensors``, as a record keeps them."""
    return tuple([tensor_shape(t) if t.is_nested else tuple(t.shape) for t in tensors])


def sizes_of(tensors: list[torch.Tensor]) -> tuple[Any, ...]:
    """Hashable shapes of ``tensors`` for a record's key (``torch.Size`` hashes like a tuple)."""
    return tuple([tensor_shape(t) if t.is_nested else t.shape for t in tensors])


def tensor_shape(t: torch.Tensor) -> Shape:
    """A tensor's shape; ``-1`` for an axis without one size (the ragged axis of a nested tensor)."""
    if not t.is_nested:
        return tuple(t.shape)
    sizes = []
    for axis in range(t.dim()):
        try:
            sizes.append(int(t.size(axis)))
        except (RuntimeError, AttributeError, TypeError):  # "dimension is irregular"
            sizes.append(-1)
    return tuple(sizes)


_dtype_names: dict[torch.dtype, str] = {}


def dtype_names_of(tensors: list[torch.Tensor]) -> tuple[str, ...]:
    """``("float32", ...)``: the dtypes of ``tensors`` without the ``torch.`` prefix."""
    names = _dtype_names
    return tuple([names.get(t.dtype) or _dtype_name(t.dtype) for t in tensors])


def _dtype_name(dtype: torch.dtype) -> str:
    name = _dtype_names.get(dtype)
    if name is None:
        name = str(dtype).removeprefix("torch.")
        _dtype_names[dtype] = name
    return name


_device_names: dict[torch.device, str] = {}


def device_names_of(tensors: list[torch.Tensor]) -> tuple[str, ...]:
    """``("cpu", "cuda:0", ...)``: the devices of ``tensors``."""
    # `is_cpu` first: reading `t.device` builds a new device object.
    return tuple(["cpu" if t.is_cpu else _device_name(t.device) for t in tensors])


def _device_name(device: torch.device) -> str:
    name = _device_names.get(device)
    if name is None:
        name = _device_names[device] = str(device)
    return name

"""What the tracer calls a torch function, and whether it is an op a user thinks of.

Worked out once per function and cached: the tracer asks for every op it sees.

Examples
--------
>>> import torch
>>> info = func_info(torch.nn.functional.linear)
>>> info.name, info.short, info.is_op
('torch.nn.functional.linear', 'linear', True)
>>> func_info(torch.Tensor.size).is_op
False
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Calls that read a tensor's metadata or convert it to Python: not ops a user thinks of.
_NON_OPS = frozenset(
    [
        "dim",
        "ndimension",
        "size",
        "numel",
        "nelement",
        "is_contiguous",
        "stride",
        "storage_offset",
        "element_size",
        "is_floating_point",
        "is_complex",
        "is_signed",
        "is_inference",
        "data_ptr",
        "item",
        "tolist",
        "numpy",
        "__len__",
        "__repr__",
        "__str__",
        "__format__",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "__hash__",
        "__iter__",
        "__reduce_ex__",
        "__deepcopy__",
        "__setstate__",
        "__getstate__",
        "__array__",
        "__dir__",
        "__contains__",
        "get_device",
        "has_names",
        "_is_view",
        "register_hook",
        "retain_grad",
        "requires_grad_",
        "_set_grad_enabled",
        "set_grad_enabled",
        "is_grad_enabled",
        "_has_compatible_shallow_copy_type",
        "is_nonzero",
        "untyped_storage",
        "storage",
        "_typed_storage",
        "is_pinned",
        "is_shared",
        "share_memory_",
        "__get__",
        "__set__",
        "__delete__",
        "_make_subclass",
        "_is_any_true",
        "_is_all_true",
    ]
)
# Properties that change a shape, so reading them is an op.
_SHAPE_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


class FuncInfo:
    """What the tracer needs to know about a torch function, worked out once per function."""

    __slots__ = ("is_op", "name", "short", "wanted_by")

    def __init__(self, name: str, short: str, is_op: bool) -> None:
        self.name = name  # "torch.nn.functional.linear"
        self.short = short  # "linear"
        self.is_op = is_op
        # Analyzer class -> whether it looks at this op even when it follows no value.
        self.wanted_by: dict[type, bool] = {}


_func_info_cache: dict[Any, FuncInfo] = {}


def func_info(func: Callable[..., Any]) -> FuncInfo:
    """The cached ``FuncInfo`` of ``func``."""
    try:
        info = _func_info_cache.get(func)
    except TypeError:  # an unhashable callable: describe it every time
        return _describe(func)
    if info is None:
        info = _describe(func)
        _func_info_cache[func] = info
    return info


def _describe(func: Callable[..., Any]) -> FuncInfo:
    short = getattr(func, "__name__", None) or type(func).__name__
    if short in ("__get__", "__set__", "__delete__"):
        attr = getattr(getattr(func, "__self__", None), "__name__", "?")
        is_op = short == "__get__" and attr in _SHAPE_PROPERTIES
        return FuncInfo(f"torch.Tensor.{attr}.{short}", attr, is_op)
    qualname = getattr(func, "__qualname__", short)
    if qualname.split(".", 1)[0] in ("TensorBase", "Tensor"):
        name = "torch.Tensor." + qualname.split(".", 1)[1]
    elif getattr(torch.nn.functional, short, None) is func:
        name = "torch.nn.functional." + short
    elif getattr(torch, short, None) is func:
        name = "torch." + short
    elif getattr(torch.Tensor, short, None) is func:
        name = "torch.Tensor." + short
    else:
        name = f"{getattr(func, '__module__', None) or 'torch'}.{qualname}"
    return FuncInfo(name, short, short not in _NON_OPS)

"""Turn a failed op (or a module's own input check) into a Finding in the user's terms.

The finding is worked out from the operands' shapes, dtypes and devices and from the layer that
ran the op (its ``in_features``, ``in_channels``, ...), not from the error's wording: on the meta
device torch's messages say little (``a and b must have same reduction dim``), and a message is
the same for many causes. When no rule explains the failure from the operands, the finding is
of kind ``op_error``: it quotes the error and lists the operands, and claims no cause.

The rules live by op family in ``_failure_layers``, ``_failure_losses`` and
``_failure_tensor_ops``; this module names the operands, finds the user's line and runs them.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, NamedTuple

import torch

from nbtrouble import _failure_layers as layers
from nbtrouble import _failure_losses as losses
from nbtrouble import _failure_tensor_ops as tensor_ops
from nbtrouble import _location
from nbtrouble._failure_context import (
    Context,
    dtype_text,
    error_text,
    first_line,
    is_torch_layer,
    layer_name,
    operands_text,
    shape_text,
)
from nbtrouble.findings import Finding

__all__ = [
    "Site",
    "classify_module",
    "classify_op",
    "failure_site",
    "module_failure_site",
    "module_operands",
    "named_operands",
    "shape_text",
    "unexplained",
]

# Operand names of a few ops whose torch signature is not introspectable.
_OPERAND_NAMES = {
    "linear": ("input", "weight", "bias"),
    "bilinear": ("input1", "input2", "weight", "bias"),
    "embedding": ("input", "weight"),
    "mm": ("input", "mat2"),
    "bmm": ("input", "mat2"),
    "matmul": ("input", "other"),
    "__matmul__": ("input", "other"),
    "__rmatmul__": ("input", "other"),
}
_WEIGHTED = layers.CONV_OPS | layers.RNN_OPS | tensor_ops.MATMUL_OPS | {"linear", "bilinear"}
_SITE_MARKERS = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


# --- naming the operands --------------------------------------------------------------------

_signatures: dict[Any, inspect.Signature | None] = {}
_testing_overrides: dict[Any, Callable[..., Any]] | None = None


def _signature(func: Callable[..., Any]) -> inspect.Signature | None:
    """The parameters of ``func``; torch's stand-in when its own are ``*args, **kwargs``."""
    global _testing_overrides
    if func in _signatures:
        return _signatures[func]
    try:
        signature: inspect.Signature | None = inspect.signature(func)
    except (TypeError, ValueError):
        signature = None
    if signature is None or _is_opaque(signature):
        if _testing_overrides is None:
            # Lambdas with the parameter names of every overridable torch function.
            _testing_overrides = torch.overrides.get_testing_overrides()
        stand_in = _testing_overrides.get(func)
        signature = inspect.signature(stand_in) if stand_in is not None else signature
    _signatures[func] = signature
    return signature


def _is_opaque(signature: inspect.Signature) -> bool:
    kinds = [p.kind for p in signature.parameters.values()]
    return bool(kinds) and kinds[0] == inspect.Parameter.VAR_POSITIONAL


def named_operands(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The tensor operands of a call by parameter name (``input``, ``weight``, ``other``...).

    A tensor method's ``self`` is called ``input``; a list of tensors gives ``tensors[0]``, ...;
    a name that cannot be known is ``arg0``, ``arg1``, ...
    """
    return _tensors_by_name(_bind(func, args, kwargs))


def _tensors_by_name(named: list[tuple[str, Any]]) -> dict[str, Any]:
    operands: dict[str, Any] = {}
    for name, value in named:
        name = "input" if name == "self" else name
        if isinstance(value, torch.Tensor):
            operands[name] = value
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    operands[f"{name}[{i}]"] = item
    return operands


def _bind(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[str, Any]]:
    short = getattr(func, "__name__", "")
    fixed = _OPERAND_NAMES.get(short)
    if fixed is not None and len(args) <= len(fixed):
        return [*zip(fixed, args), *kwargs.items()]
    signature = _signature(func)
    if signature is not None and not _is_opaque(signature):
        try:
            bound = signature.bind_partial(*args, **kwargs)
        except TypeError:
            pass
        else:
            return list(bound.arguments.items())
    names = [f"arg{i}" for i in range(len(args))]
    if names and _is_tensor_method(func):
        names[0] = "input"
    return [*zip(names, args), *kwargs.items()]


def _is_tensor_method(func: Callable[..., Any]) -> bool:
    owner = getattr(func, "__qualname__", "").split(".", 1)[0]
    return owner in ("TensorBase", "Tensor")


def module_operands(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    exc: BaseException | None = None,
    meta: bool = False,
) -> dict[str, Any]:
    """A module's tensor inputs named as its ``forward`` names them (``input``, ``hx[0]``...).

    Positional inputs come from the call; keyword inputs, which module hooks do not see, are
    read from the ``forward`` frame in the traceback of ``exc`` when there is one. With
    ``meta``, the inputs are kept as shape-only tensors. Never raises: the user's error is
    what must reach the user.
    """
    try:
        named = _module_operands(module, args, exc)
    except Exception:  # noqa: BLE001 - an odd forward signature must not hide the user's error
        named = {f"arg{i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    if meta:
        named = {n: t if t.device.type == "meta" else t.to("meta") for n, t in named.items()}
    return named


def _module_operands(
    module: torch.nn.Module, args: tuple[Any, ...], exc: BaseException | None
) -> dict[str, Any]:
    try:
        signature = inspect.signature(module.forward)
        bound = list(signature.bind_partial(*args).arguments.items())
    except (TypeError, ValueError):
        bound = [("input" if i == 0 else f"arg{i}", a) for i, a in enumerate(args)]
    named = _tensors_by_name(bound)
    frame = _forward_frame(module, exc.__traceback__ if exc is not None else None)
    if frame is not None:
        given = {name for name, _ in bound}
        code = frame.f_code
        params = code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount]
        extra = [(n, frame.f_locals.get(n)) for n in params if n not in given]
        named.update(_tensors_by_name(extra))
    return named


def _forward_frame(module: torch.nn.Module, tb: TracebackType | None) -> FrameType | None:
    """The frame of ``module.forward`` in a traceback: its locals hold the keyword inputs."""
    found = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "forward" and frame.f_locals.get("self") is module:
            found = frame
        tb = tb.tb_next
    return found


# --- where it failed ------------------------------------------------------------------------


class Site(NamedTuple):
    """Where a failure shows up in the user's code."""

    location: str | None  # "file:line" in the user's own code
    line: str  # that line's source text
    library: str | None = None  # "pkg/mod.py:12": an installed library's line that made the call
    nested: bool = False  # the error was raised by the user's code that the op itself ran


def failure_site(frame: FrameType | None, exc: BaseException) -> Site:
    """The user's line for an op that raised ``exc`` when called from ``frame``.

    An op can run the user's code (a custom ``autograd.Function``'s ``backward`` during
    ``loss.backward()``): an error raised there is located there. An op called from an
    installed library (a Hugging Face model's ``forward``) is located at the user's line that
    called the library, and the library's line is kept alongside.
    """
    raised = _innermost_user_file_frame(exc.__traceback__)
    if raised is not None:
        return Site(*raised, nested=True)
    user = frame
    while user is not None and not _location.is_user_code(user.f_code):
        user = user.f_back
    if frame is None or user is None or user is frame:
        code, lineno = (frame.f_code, frame.f_lineno) if frame is not None else (None, 0)
        return Site(*_text(code, lineno))
    return Site(
        *_text(user.f_code, user.f_lineno), library=_library_text(frame.f_code, frame.f_lineno)
    )


def module_failure_site(exc: BaseException) -> Site:
    """The user's line for an error a module's own code raised (its traceback is complete)."""
    try:
        return _module_failure_site(exc)
    except Exception:  # noqa: BLE001 - the user's own error must propagate as it was
        return Site(None, "")


def _module_failure_site(exc: BaseException) -> Site:
    user = library = None
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if _location.code_kind(code) == _location.USER:
            if _location.is_user_code(code):
                user, library = (code, tb.tb_lineno), None
            else:
                library = (code, tb.tb_lineno)
        tb = tb.tb_next
    if user is None:
        return Site(None, "")
    return Site(*_text(*user), library=_library_text(*library) if library else None)


def _innermost_user_file_frame(tb: TracebackType | None) -> tuple[str, str] | None:
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if _location.code_kind(code) == _location.USER and _location.is_user_code(code):
            found = _text(code, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _text(code: Any, lineno: int) -> tuple[str | None, str]:
    if code is None:
        return None, ""
    return _location.location_text(code, lineno), _location.code_line(code, lineno)


def _library_text(code: Any, lineno: int) -> str:
    """``transformers/models/bert/modeling_bert.py:100``: a library line, from its package."""
    path = code.co_filename
    for marker in _SITE_MARKERS:
        path = path.split(marker, 1)[-1]
    return f"{path}:{lineno}"


# --- classifying ----------------------------------------------------------------------------


def classify_op(
    op: str,
    operands: dict[str, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    module: torch.nn.Module | None,
    path: str | None,
    location: str | None,
    exc: BaseException,
    meta: bool = False,
    module_args: tuple[Any, ...] = (),
    site: Site | None = None,
) -> Finding:
    """A ``Finding`` for an op that raised ``exc``, from its operands and the running layer.

    ``module_args`` are the running layer's positional inputs: an op a torch layer runs on
    its own behalf (the LSTM reading its state) fails because of what the layer was given.
    """
    inputs = module_operands(module, module_args) if module is not None and module_args else {}
    library = site.library if site is not None else None
    ctx = Context(op, operands, args, kwargs, module, path, location, exc, meta, inputs, library)
    if site is not None and site.nested:
        return _nested_error(ctx)
    rules = (_device_rule, *(_LAYER_INPUT_RULES if ctx.layer else ()), *_OP_RULES)
    return _first_finding(ctx, rules) or _fallback(ctx)


def classify_module(
    module: torch.nn.Module,
    path: str,
    operands: dict[str, Any],
    location: str | None,
    exc: BaseException,
    meta: bool = False,
    site: Site | None = None,
) -> Finding:
    """A ``Finding`` for an error raised by a module's own Python code (e.g. the LSTM's check).

    Only torch's layers are explained from their sizes; any other module's error is the
    module author's own check (the user's ``assert``, a library's ``ValueError``), quoted as
    it is, with the inputs the module got.
    """
    try:
        return _classify_module(module, path, operands, location, exc, meta, site)
    except Exception:  # noqa: BLE001 - the user's own error must propagate as it was
        return unexplained(type(module).__name__, list(operands.values()), location, exc)


def _classify_module(
    module: torch.nn.Module,
    path: str,
    operands: dict[str, Any],
    location: str | None,
    exc: BaseException,
    meta: bool,
    site: Site | None,
) -> Finding:
    library = site.library if site is not None else None
    ctx = Context(
        type(module).__name__,
        operands,
        (),
        {},
        module,
        path,
        location,
        exc,
        meta,
        operands,
        library,
    )
    ctx.layer = layer_name(module, path)
    if is_torch_layer(module):
        rules = (_not_a_tensor_rule, _device_rule, *_LAYER_INPUT_RULES, layers.module_dtype_rule)
        finding = _first_finding(ctx, rules)
        if finding is not None:
            return finding
    # No library frame below the user's line: the module's own code is the user's.
    own = location is not None and library is None
    return ctx.finding(
        "op_error",
        f"{ctx.layer} raised {error_text(exc)}; its inputs: {operands_text(operands) or 'none'}",
        _module_error_hint(module, own),
    )


def _module_error_hint(module: torch.nn.Module, own: bool) -> str:
    if is_torch_layer(module):
        return (
            f"Compare the inputs with what {type(module).__name__} was built for "
            f"({_describe_module(module)})."
        )
    if own:
        return (
            "This is your own code's error (a check or raise in the module), not a failed "
            "tensor op: see the line above and the inputs it got."
        )
    return (
        f"{type(module).__name__}'s own code rejected its inputs: compare them with what its "
        "documentation expects (shapes, dtypes, which arguments are required)."
    )


def _first_finding(
    ctx: Context, rules: tuple[Callable[[Context], Finding | None], ...]
) -> Finding | None:
    for rule in rules:
        try:
            finding = rule(ctx)
        except Exception:  # noqa: BLE001 - a rule that cannot read odd operands is skipped
            finding = None
        if finding is not None:
            return finding
    return None


def unexplained(
    name: str, tensors: list[torch.Tensor], location: str | None, exc: BaseException
) -> Finding:
    """The plainest finding: the op, its operands' shapes and the error's first line."""
    shapes = ", ".join(shape_text(t) for t in tensors) or "no tensors"
    return Finding(
        "op_error",
        "error",
        f"{name} failed on {shapes}: {first_line(exc)}" + (f" at {location}" if location else ""),
        "Compare the operands' shapes and dtypes with what the op expects.",
        location,
    )


def _describe_module(module: torch.nn.Module) -> str:
    attrs = (
        "in_features",
        "out_features",
        "in_channels",
        "out_channels",
        "input_size",
        "hidden_size",
        "num_layers",
        "num_embeddings",
        "embedding_dim",
        "num_features",
        "num_groups",
        "num_channels",
        "normalized_shape",
        "kernel_size",
        "stride",
        "embed_dim",
        "num_heads",
        "batch_first",
        "bidirectional",
    )
    found = [f"{a}={getattr(module, a)}" for a in attrs if hasattr(module, a)]
    return ", ".join(found) or type(module).__name__


# --- rules that apply to any op ---------------------------------------------------------------


def _device_rule(ctx: Context) -> Finding | None:
    # A 0-d CPU tensor mixes with any device (it acts as a number), so it does not count.
    placed = [(n, t) for n, t in ctx.operands.items() if isinstance(t, torch.Tensor)]
    placed = [(n, t) for n, t in placed if not (t.dim() == 0 and t.device.type == "cpu")]
    devices = {str(t.device) for _, t in placed}
    if len(devices) < 2:
        return None
    listing = ", ".join(f"{n} on {t.device}" for n, t in placed)
    weight = next((p for p in ctx.module.parameters()), None) if ctx.layer else None
    if weight is not None:
        hint = (
            f"{ctx.layer}'s weights are on {weight.device}: move the input there "
            f"(x.to({str(weight.device)!r})), or find the .to()/.cuda() in your code that "
            "moved it, and put the model and all inputs on one device."
        )
    else:
        first = str(placed[0][1].device)
        hint = (
            f"Put every operand on one device, e.g. t.to({first!r}); tensors created in "
            "forward need device=x.device."
        )
    return ctx.finding(
        "device_mismatch", f"{ctx.subject()} got operands on different devices: {listing}", hint
    )


def _not_a_tensor_rule(ctx: Context) -> Finding | None:
    """A torch layer called on a numpy array or a list instead of a tensor."""
    frame = _forward_frame(ctx.module, ctx.exc.__traceback__)
    code = frame.f_code if frame is not None else None
    if code is None or code.co_argcount < 2:
        return None
    name = code.co_varnames[1]
    value = frame.f_locals.get(name)
    kind = type(value)
    # torch's own containers (a PackedSequence for an LSTM) are valid inputs.
    if value is None or kind.__module__.startswith("torch"):
        return None
    shape = getattr(value, "shape", None)
    what = f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")
    detail = f" {tuple(shape)} {getattr(value, 'dtype', '')}".rstrip() if shape is not None else ""
    if shape is not None:
        convert = "torch.from_numpy(x).float() (numpy floats are float64, the model float32)"
    else:
        convert = "torch.tensor(x, dtype=torch.float32)"
    return ctx.finding(
        "bad_input",
        f"{ctx.layer} got a {what}{detail} as {name}, not a tensor",
        f"Convert it first: {convert}; a DataLoader's default collate does this for batches.",
    )


def _weighted_dtype_rule(ctx: Context) -> Finding | None:
    if ctx.op not in _WEIGHTED:
        return None
    x = ctx.operand("input")
    w = ctx.operand("weight", "mat2", "other", "vec", "arg1")
    if x is None:
        return None
    who = ctx.layer or ctx.op
    if not (x.is_floating_point() or x.is_complex()) and (w is None or w.is_floating_point()):
        return ctx.finding(
            "dtype_mismatch",
            f"{who} needs floating-point input but got {dtype_text(x)} input {shape_text(x)}",
            "Convert the input with x.float(); if these are token ids or class indices, "
            "feed them to an nn.Embedding first.",
        )
    if w is not None and w.dtype != x.dtype:
        owner = f"{who}'s weight" if ctx.layer else f"the other operand {shape_text(w)}"
        numpy = "; numpy arrays arrive as float64" if x.dtype == torch.float64 else ""
        return ctx.finding(
            "dtype_mismatch",
            f"input is {dtype_text(x)} but {owner} is {dtype_text(w)}",
            f"Convert the input to the model's dtype (x.to({w.dtype})), or the model to the "
            f"input's (model.to({x.dtype})){numpy}.",
        )
    return None


def _mixed_dtype_rule(ctx: Context) -> Finding | None:
    """An op that failed with floating operands of different dtypes (and nothing else found)."""
    floating = [(n, t) for n, t in ctx.operands.items() if t.is_floating_point() and t.dim() > 0]
    if len({t.dtype for _, t in floating}) < 2:
        return None
    listing = ", ".join(f"{n} {dtype_text(t)}" for n, t in floating)
    return ctx.finding(
        "dtype_mismatch",
        f"{ctx.subject()} got operands of different dtypes: {listing}",
        "Convert them to one dtype (usually the model's, float32) before this op.",
    )


def _nested_error(ctx: Context) -> Finding:
    """The op ran the user's code (a custom backward, a hook) and that code raised."""
    return ctx.finding(
        "op_error",
        f"{error_text(ctx.exc)}: raised in your code that {ctx.op} ran (e.g. a custom "
        "autograd.Function's backward or a hook)",
        "The line shown is where it was raised: check the shapes of the tensors there "
        "(a backward must return one gradient per input, each of that input's shape).",
    )


def _fallback(ctx: Context) -> Finding:
    shapes = operands_text(ctx.operands)
    detail = first_line(ctx.exc)
    if ctx.meta and "meta" in detail.lower():
        return ctx.finding(
            "op_error",
            f"{ctx.subject()} needs tensor values, which meta=True does not compute "
            f"(operands: {shapes or 'none'}): {detail}",
            "Run this block without meta=True, or keep value-dependent code (.item(), if on a "
            "tensor) outside the block.",
        )
    hint = "Compare the operands' shapes and dtypes with what the op expects."
    if ctx.layer:
        built = _describe_module(ctx.module)
        hint = f"Compare them with what {type(ctx.module).__name__} was built for ({built})."
    return ctx.finding(
        "op_error",
        f"{ctx.subject()} failed on {shapes or 'its operands'}: {type(ctx.exc).__name__}: {detail}",
        hint,
    )


# Rules about what a torch layer was given, tried before the op's own rules: an op the layer
# runs on its own behalf fails because of the layer's inputs.
_LAYER_INPUT_RULES: tuple[Callable[[Context], Finding | None], ...] = (
    layers.recurrent_state_rule,
    layers.recurrent_input_rule,
)

_OP_RULES: tuple[Callable[[Context], Finding | None], ...] = (
    layers.embedding_rule,
    losses.class_loss_rule,
    _weighted_dtype_rule,
    losses.same_shape_loss_rule,
    losses.backward_rule,
    layers.linear_rule,
    layers.conv_rule,
    layers.pool_rule,
    layers.interpolate_rule,
    tensor_ops.matmul_rule,
    tensor_ops.einsum_rule,
    tensor_ops.cat_rule,
    tensor_ops.view_rule,
    tensor_ops.expand_rule,
    tensor_ops.permute_rule,
    layers.attention_rule,
    layers.sdpa_rule,
    tensor_ops.item_rule,
    layers.norm_rule,
    tensor_ops.one_hot_rule,
    tensor_ops.gather_rule,
    tensor_ops.getitem_rule,
    tensor_ops.dim_rule,
    tensor_ops.broadcast_rule,
    tensor_ops.inplace_dtype_rule,
    layers.module_dtype_rule,
    _mixed_dtype_rule,
)

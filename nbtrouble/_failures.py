"""Turn a failed op (or a module's own input check) into a Finding in the user's terms.

The finding is worked out from the operands' shapes, dtypes and devices and from the layer that
ran the op (its ``in_features``, ``in_channels``, ...), not from the error's wording: on the meta
device torch's messages say little (``a and b must have same reduction dim``), and a message is
the same for many causes. The error's first line is quoted only when nothing better is known.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from nbtrouble.findings import Finding

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
_CONV = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_MATMUL = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "mv", "dot", "addmm", "baddbmm"}
_CAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"}
_VIEW = {"view", "reshape", "unflatten", "view_as", "reshape_as", "expand"}
_CLASS_LOSSES = {"cross_entropy", "nll_loss"}
_SAME_SHAPE_LOSSES = {
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "kl_div",
}
_WEIGHTED = _CONV | {"linear", "bilinear", "lstm", "gru", "rnn_tanh", "rnn_relu"} | _MATMUL


def shape_text(t: torch.Tensor) -> str:
    """``(32, 64)``: a tensor's shape as a plain tuple."""
    return str(tuple(t.shape))


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- naming the operands --------------------------------------------------------------------

_signatures: dict[Any, inspect.Signature | None] = {}
_testing_overrides: dict[Any, Callable[..., Any]] | None = None


def _signature(func: Callable[..., Any]) -> inspect.Signature | None:
    global _testing_overrides
    if func in _signatures:
        return _signatures[func]
    try:
        signature: inspect.Signature | None = inspect.signature(func)
    except (TypeError, ValueError):
        if _testing_overrides is None:
            # Lambdas with the parameter names of every overridable torch function.
            _testing_overrides = torch.overrides.get_testing_overrides()
        stand_in = _testing_overrides.get(func)
        signature = inspect.signature(stand_in) if stand_in is not None else None
    _signatures[func] = signature
    return signature


def named_operands(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The tensor operands of a call by parameter name (``input``, ``weight``, ``other``...).

    A tensor method's ``self`` is called ``input``; a list of tensors gives ``tensors[0]``, ...;
    a name that cannot be known is ``arg0``, ``arg1``, ...
    """
    named = _bind(func, args, kwargs)
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
    if signature is not None:
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


# --- the finding ----------------------------------------------------------------------------


def _where(location: str | None, path: str | None) -> str | None:
    parts = [p for p in (location, path) if p]
    return " ".join(parts) if parts else None


def _layer(module: torch.nn.Module | None, path: str | None) -> str:
    """``Linear 'fc2'``, or just ``Linear`` for a model called on its own."""
    if module is None:
        return ""
    name = type(module).__name__
    return f"{name} '{path}'" if path else name


def _at(location: str | None) -> str:
    return f" at {location}" if location else ""


class _Context:
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
    ) -> None:
        self.op = op.strip("_").removeprefix("r") if op.startswith("__r") else op.strip("_")
        self.operands = operands
        self.tensors = [v for v in operands.values() if isinstance(v, torch.Tensor)]
        self.args = args
        self.kwargs = kwargs
        self.module = module
        self.path = path
        self.location = location
        self.exc = exc
        self.meta = meta
        self.layer = _layer(module, path) if _is_torch_layer(module) else ""

    def finding(self, kind: str, message: str, hint: str) -> Finding:
        return Finding(
            kind, "error", message + _at(self.location), hint, _where(self.location, self.path)
        )

    def operand(self, *names: str) -> torch.Tensor | None:
        for name in names:
            value = self.operands.get(name)
            if isinstance(value, torch.Tensor):
                return value
        return None

    def subject(self) -> str:
        """How to name what failed: the layer, else the op."""
        return self.layer or self.op


def _is_torch_layer(module: torch.nn.Module | None) -> bool:
    return module is not None and type(module).__module__.startswith("torch.nn")


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
) -> Finding:
    """A ``Finding`` for an op that raised ``exc``, from its operands and the running layer."""
    ctx = _Context(op, operands, args, kwargs, module, path, location, exc, meta)
    for rule in _RULES:
        try:
            finding = rule(ctx)
        except Exception:  # noqa: BLE001 - a rule that cannot read odd operands is skipped
            finding = None
        if finding is not None:
            return finding
    return _fallback(ctx)


def unexplained(
    name: str, tensors: list[torch.Tensor], location: str | None, exc: BaseException
) -> Finding:
    """The plainest finding: the op, its operands' shapes and the error's first line."""
    shapes = ", ".join(shape_text(t) for t in tensors) or "no tensors"
    kind = "dtype_mismatch" if _mentions_dtype(exc) else "shape_mismatch"
    return Finding(
        kind,
        "error",
        f"{name} failed on {shapes}: {_first_line(exc)}{_at(location)}",
        "Compare the operands' shapes and dtypes with what the op expects.",
        location,
    )


def classify_module(
    module: torch.nn.Module,
    path: str,
    operands: dict[str, Any],
    location: str | None,
    exc: BaseException,
    meta: bool = False,
) -> Finding:
    """A ``Finding`` for an error raised by a module's own Python code (e.g. the LSTM's check)."""
    ctx = _Context(type(module).__name__, operands, (), {}, module, path, location, exc, meta)
    ctx.layer = _layer(module, path)
    for rule in (_device_rule, _module_dtype_rule, _recurrent_rule):
        finding = rule(ctx)
        if finding is not None:
            return finding
    shapes = ", ".join(shape_text(t) for t in ctx.tensors) or "no tensors"
    kind = "dtype_mismatch" if _mentions_dtype(exc) else "shape_mismatch"
    return ctx.finding(
        kind,
        f"{ctx.layer} rejected its input {shapes}: {_first_line(exc)}",
        f"Compare the input's shape with what {type(module).__name__} was built for "
        f"({_describe_module(module)}).",
    )


def _describe_module(module: torch.nn.Module) -> str:
    attrs = (
        "in_features",
        "out_features",
        "in_channels",
        "out_channels",
        "input_size",
        "hidden_size",
        "num_embeddings",
        "embedding_dim",
        "num_features",
        "normalized_shape",
        "embed_dim",
        "batch_first",
    )
    found = [f"{a}={getattr(module, a)}" for a in attrs if hasattr(module, a)]
    return ", ".join(found) or repr(module).splitlines()[0]


def _mentions_dtype(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "dtype" in text or "scalar type" in text


# --- rules: each returns a Finding or None ---------------------------------------------------


def _device_rule(ctx: _Context) -> Finding | None:
    # A 0-d CPU tensor mixes with any device (it acts as a number), so it does not count.
    placed = [(n, t) for n, t in ctx.operands.items() if isinstance(t, torch.Tensor)]
    placed = [(n, t) for n, t in placed if not (t.dim() == 0 and t.device.type == "cpu")]
    devices = {str(t.device) for _, t in placed}
    if len(devices) < 2:
        return None
    listing = ", ".join(f"{n} on {t.device}" for n, t in placed)
    first = str(placed[0][1].device)
    return ctx.finding(
        "device_mismatch",
        f"{ctx.subject()} got operands on different devices: {listing}",
        f"Move the model and every input to one device, e.g. model.to({first!r}) and "
        f"x.to({first!r}).",
    )


def _weighted_dtype_rule(ctx: _Context) -> Finding | None:
    if ctx.op not in _WEIGHTED:
        return None
    x = ctx.operand("input")
    w = ctx.operand("weight", "mat2", "other", "arg1")
    if x is None:
        return None
    who = ctx.layer or ctx.op
    if not (x.is_floating_point() or x.is_complex()):
        return ctx.finding(
            "dtype_mismatch",
            f"{who} needs floating-point input but got {_dtype(x)} input {shape_text(x)}",
            "Convert the input with x.float(); if these are token ids or class indices, "
            "feed them to an nn.Embedding first.",
        )
    if w is not None and w.dtype != x.dtype:
        owner = f"{who}'s weight" if ctx.layer else f"the other operand {shape_text(w)}"
        return ctx.finding(
            "dtype_mismatch",
            f"input is {_dtype(x)} but {owner} is {_dtype(w)}",
            f"Convert the input to the model's dtype (x.to({_torch_dtype(w)})), or the "
            f"model to the input's (model.to({_torch_dtype(x)})); numpy arrays arrive "
            "as float64.",
        )
    return None


def _torch_dtype(t: torch.Tensor) -> str:
    return str(t.dtype)


def _embedding_rule(ctx: _Context) -> Finding | None:
    if ctx.op != "embedding":
        return None
    indices, table = ctx.operand("input"), ctx.operand("weight")
    if indices is None or table is None:
        return None
    who = ctx.layer or "embedding"
    if indices.is_floating_point() or indices.dtype == torch.bool:
        return ctx.finding(
            "dtype_mismatch",
            f"{who} needs integer indices (int64) but got {_dtype(indices)} input "
            f"{shape_text(indices)}",
            "Pass token ids as integers (x.long()); float features go to nn.Linear, "
            "not nn.Embedding.",
        )
    num = table.shape[0]
    if indices.device.type == "meta" or indices.numel() == 0:
        return None
    low, high = int(indices.min()), int(indices.max())
    if high < num and low >= 0:
        return None
    bad = high if high >= num else low
    return ctx.finding(
        "shape_mismatch",
        f"{who} has num_embeddings={num} (valid indices 0..{num - 1}) but input "
        f"{shape_text(indices)} contains index {bad}",
        f"Build the embedding with num_embeddings at least {max(high + 1, num)} (the vocabulary "
        "size, max index + 1), or fix the ids/vocabulary that produced the index.",
    )


def _class_loss_rule(ctx: _Context) -> Finding | None:
    if ctx.op not in _CLASS_LOSSES:
        return None
    logits, target = ctx.operand("input"), ctx.operand("target")
    if logits is None or target is None:
        return None
    classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    if target.is_floating_point() and target.shape != logits.shape:
        return ctx.finding(
            "dtype_mismatch",
            f"{ctx.op} got {_dtype(target)} target {shape_text(target)} for input "
            f"{shape_text(logits)}: class-index targets must be int64 (float targets must "
            "be class probabilities of the input's shape)",
            "Pass class indices as target.long(); for regression use mse_loss.",
        )
    if (
        not target.is_floating_point()
        and target.dtype != torch.long
        and target.shape != logits.shape
    ):
        return ctx.finding(
            "dtype_mismatch",
            f"{ctx.op} got {_dtype(target)} target {shape_text(target)}: class indices must be int64",
            "Convert the target with target.long().",
        )
    if logits.dim() > 1 and target.dim() > 0 and target.shape[0] != logits.shape[0]:
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.op} got input {shape_text(logits)} and target {shape_text(target)}: batch "
            f"sizes {logits.shape[0]} and {target.shape[0]} differ",
            "Input and target must hold the same samples: check the batching of the "
            "targets and any reshape of the model output.",
        )
    if (
        target.dim() == logits.dim()
        and target.shape != logits.shape
        and not target.is_floating_point()
    ):
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.op} got class-index target {shape_text(target)} for input "
            f"{shape_text(logits)}: class indices need one dim less than the input",
            "Drop the extra dim of the target, e.g. target.squeeze(1).",
        )
    if target.device.type != "meta" and not target.is_floating_point() and target.numel():
        high = int(target.max())
        if high >= classes:
            return ctx.finding(
                "shape_mismatch",
                f"{ctx.op} got target class {high} but input {shape_text(logits)} has "
                f"{classes} classes (valid 0..{classes - 1})",
                f"Make the last layer output as many classes as there are labels "
                f"(at least {high + 1}), or fix the labels.",
            )
    return None


def _same_shape_loss_rule(ctx: _Context) -> Finding | None:
    if ctx.op not in _SAME_SHAPE_LOSSES:
        return None
    x, target = ctx.operand("input"), ctx.operand("target")
    if x is None or target is None or x.shape == target.shape:
        return None
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.op} needs input and target of the same shape but got input {shape_text(x)} "
        f"and target {shape_text(target)}",
        "Reshape the target to the output's shape (target.view_as(output)); "
        "a (N, 1) output against an (N,) target is the usual cause.",
    )


def _linear_rule(ctx: _Context) -> Finding | None:
    if ctx.op != "linear":
        return None
    x, w = ctx.operand("input"), ctx.operand("weight")
    if x is None or w is None or x.dim() == 0:
        return None
    got, expected = x.shape[-1], w.shape[-1]
    if got == expected:
        return None
    out = w.shape[0] if w.dim() == 2 else 1
    who = (
        f"{ctx.layer} expects in_features={expected}"
        if ctx.layer
        else (f"linear with weight {shape_text(w)} expects {expected} input features")
    )
    return ctx.finding(
        "shape_mismatch",
        f"{who} but got input {shape_text(x)} with {got} features in its last dim "
        f"(input {shape_text(x)} x weight {shape_text(w)}^T)",
        f"Build the layer as nn.Linear({got}, {out}), or fix the layer before it so that it "
        f"outputs {expected} features (after a flatten, in_features is the product of all "
        "dims but the batch dim).",
    )


def _conv_rule(ctx: _Context) -> Finding | None:
    if ctx.op not in _CONV:
        return None
    x, w = ctx.operand("input"), ctx.operand("weight")
    if x is None or w is None:
        return None
    spatial = w.dim() - 2
    who = ctx.layer or ctx.op
    if x.dim() not in (spatial + 1, spatial + 2):
        return ctx.finding(
            "shape_mismatch",
            f"{who} expects a {spatial + 2}D input (N, C, {_spatial_names(spatial)}) but got "
            f"{shape_text(x)} ({x.dim()}D)",
            "Give the batch the layout (batch, channels, ...spatial): add a channel dim with "
            "x.unsqueeze(1), or undo a flatten before this layer.",
        )
    transposed = ctx.op.startswith("conv_transpose")
    groups = _groups(ctx)
    expected = w.shape[0] if transposed else w.shape[1] * groups
    channels = x.shape[-spatial - 1]
    if channels != expected:
        hint = f"Build the layer with in_channels={channels}, or fix the layer before it."
        if x.dim() == spatial + 1 and expected == 1:
            hint = (
                f"{shape_text(x)} looks like a batch without its channel dim (read as "
                f"{channels} channels): add it with x.unsqueeze(1)."
            )
        elif x.shape[-1] == expected:
            hint = (
                f"The input looks channels-last {shape_text(x)}: convolutions take "
                f"(N, C, {_spatial_names(spatial)}); permute it, e.g. x.permute(0, 3, 1, 2)."
            )
        return ctx.finding(
            "shape_mismatch",
            f"{who} expects in_channels={expected} but got input {shape_text(x)} with "
            f"{channels} channels (dim {x.dim() - spatial - 1}); weight is {shape_text(w)}",
            hint,
        )
    kernel = tuple(w.shape[2:])
    size = tuple(x.shape[-spatial:])
    if not transposed and any(s < k for s, k in zip(size, kernel)):
        return ctx.finding(
            "shape_mismatch",
            f"{who} has kernel {kernel} but its input {shape_text(x)} is only {size} in space "
            "(before padding)",
            "The input shrank too much before this layer: use fewer poolings/strides, padding, "
            "or a bigger input.",
        )
    return None


def _spatial_names(spatial: int) -> str:
    return {1: "L", 2: "H, W", 3: "D, H, W"}.get(spatial, "...")


def _groups(ctx: _Context) -> int:
    groups = ctx.kwargs.get("groups")
    if groups is None and len(ctx.args) >= 7 and isinstance(ctx.args[6], int):
        groups = ctx.args[6]
    return groups if isinstance(groups, int) and groups > 0 else 1


def _matmul_rule(ctx: _Context) -> Finding | None:
    if ctx.op not in _MATMUL:
        return None
    tensors = [t for n, t in ctx.operands.items() if n != "bias"]
    if ctx.op in ("addmm", "baddbmm"):
        tensors = tensors[1:]
    if len(tensors) < 2:
        return None
    a, b = tensors[0], tensors[1]
    if a.dim() == 0 or b.dim() == 0:
        return None
    k_a = a.shape[-1]
    k_b = b.shape[-2] if b.dim() >= 2 else b.shape[0]
    if k_a != k_b:
        which = "second-to-last" if b.dim() >= 2 else "only"
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.op} cannot multiply {shape_text(a)} by {shape_text(b)}: the last dim of the "
            f"first ({k_a}) must equal the {which} dim of the second ({k_b})",
            "Transpose one operand (b.transpose(-2, -1)) or fix the op that produced it; "
            "check which dim holds the features.",
        )
    if ctx.op in ("bmm", "baddbmm") and a.dim() == 3 and b.dim() == 3 and a.shape[0] != b.shape[0]:
        return ctx.finding(
            "shape_mismatch",
            f"bmm needs the same batch size but got {shape_text(a)} and {shape_text(b)} "
            f"({a.shape[0]} vs {b.shape[0]})",
            "Both operands must hold the same number of matrices in dim 0.",
        )
    batch_a, batch_b = tuple(a.shape[:-2]), tuple(b.shape[:-2])
    if batch_a and batch_b and not _broadcastable(batch_a, batch_b):
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.op} cannot broadcast the batch dims of {shape_text(a)} and {shape_text(b)} "
            f"({batch_a} vs {batch_b})",
            "Make the leading (batch) dims equal or 1.",
        )
    return None


def _broadcastable(*shapes: tuple[int, ...]) -> bool:
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError:
        return False
    return True


def _cat_rule(ctx: _Context) -> Finding | None:
    if ctx.op not in _CAT:
        return None
    tensors = ctx.tensors
    if len(tensors) < 2:
        return None
    dim = ctx.kwargs.get("dim", ctx.args[1] if len(ctx.args) > 1 else 0)
    if not isinstance(dim, int):
        return None
    first = tensors[0]
    for i, t in enumerate(tensors[1:], start=1):
        if ctx.op == "stack" or ctx.op == "cat" and t.dim() != first.dim():
            if t.shape != first.shape:
                return _cat_finding(ctx, first, t, i, "all dims", dim)
            continue
        if t.dim() != first.dim() and t.numel() != 0:
            return _cat_finding(ctx, first, t, i, "the same number of dims", dim)
        axis = dim % first.dim() if first.dim() else 0
        for d in range(min(first.dim(), t.dim())):
            if d != axis and first.shape[d] != t.shape[d]:
                return _cat_finding(ctx, first, t, i, f"every dim but dim {axis}", dim, d)
    return None


def _cat_finding(
    ctx: _Context,
    first: torch.Tensor,
    other: torch.Tensor,
    index: int,
    rule: str,
    dim: int,
    differ: int | None = None,
) -> Finding:
    where = ""
    if differ is not None:
        where = f", they differ in dim {differ} ({first.shape[differ]} vs {other.shape[differ]})"
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.op} along dim {dim} needs {rule} to match, but tensors[0] is "
        f"{shape_text(first)} and tensors[{index}] is {shape_text(other)}{where}",
        "Check the dim you concatenate along and the shapes of the pieces (e.g. the batch "
        "or sequence length of each).",
    )


def _view_rule(ctx: _Context) -> Finding | None:
    if ctx.op not in _VIEW - {"expand"}:
        return None
    x = ctx.operand("input")
    if x is None:
        return None
    target = _target_shape(ctx)
    if target is None:
        return None
    known = math.prod(s for s in target if s != -1)
    numel = x.numel()
    fits = numel % known == 0 if -1 in target and known else numel == known
    if fits and ctx.op == "view":
        return ctx.finding(
            "shape_mismatch",
            f"cannot view a tensor of shape {shape_text(x)} as {target}: its memory is not "
            "contiguous (after a transpose/permute)",
            "Use .reshape(...) or .contiguous().view(...).",
        )
    if fits:
        return None
    wanted = f"{known} elements" if -1 not in target else f"a multiple of {known} elements"
    return ctx.finding(
        "shape_mismatch",
        f"cannot {ctx.op} a tensor of shape {shape_text(x)} ({numel} elements) as {target} "
        f"({wanted})",
        "Keep the batch dim and let torch infer the rest: x.view(x.size(0), -1); then make "
        "the next layer's size match the flattened features.",
    )


def _target_shape(ctx: _Context) -> tuple[int, ...] | None:
    if ctx.op in ("view_as", "reshape_as"):
        other = ctx.operand("other", "arg1")
        return tuple(other.shape) if other is not None else None
    rest = ctx.args[1:] or tuple(ctx.kwargs.get("shape", ctx.kwargs.get("size", ())) or ())
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        rest = tuple(rest[0])
    if not rest or not all(isinstance(s, int) for s in rest):
        return None
    if ctx.op == "unflatten":
        return None
    return tuple(rest)


def _expand_rule(ctx: _Context) -> Finding | None:
    if ctx.op not in ("expand", "expand_as", "broadcast_to"):
        return None
    x = ctx.operand("input")
    target = _target_shape(ctx) if ctx.op != "expand_as" else None
    if ctx.op == "expand_as":
        other = ctx.operand("other", "arg1")
        target = tuple(other.shape) if other is not None else None
    if x is None or target is None:
        return None
    shape = tuple(x.shape)
    offset = len(target) - len(shape)
    for d, size in enumerate(shape):
        wanted = target[d + offset] if d + offset >= 0 else None
        if wanted not in (None, -1, size) and size != 1:
            return ctx.finding(
                "shape_mismatch",
                f"cannot {ctx.op} {shape_text(x)} to {target}: dim {d} has size {size}, and only "
                "size-1 dims can be expanded",
                "Expand only dims of size 1 (add one with unsqueeze), or use repeat.",
            )
    return None


def _attention_rule(ctx: _Context) -> Finding | None:
    if ctx.op != "multi_head_attention_forward":
        return None
    query = ctx.operand("query")
    expected = ctx.args[3] if len(ctx.args) > 3 else ctx.kwargs.get("embed_dim_to_check")
    if query is None or not isinstance(expected, int) or query.shape[-1] == expected:
        return None
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.subject()} expects embed_dim={expected} but got query {shape_text(query)} with "
        f"{query.shape[-1]} features in its last dim",
        f"Build the attention with embed_dim={query.shape[-1]}, or project the inputs to "
        f"{expected} features first.",
    )


def _norm_rule(ctx: _Context) -> Finding | None:
    x = ctx.operand("input")
    if x is None:
        return None
    if ctx.op == "layer_norm":
        shape = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("normalized_shape")
        shape = tuple(shape) if shape is not None else ()
        if shape and tuple(x.shape[-len(shape) :]) != shape:
            return ctx.finding(
                "shape_mismatch",
                f"{ctx.subject()} normalizes the last dims {shape} but got input {shape_text(x)}",
                f"Build the norm with normalized_shape={tuple(x.shape[-len(shape) :])} or fix "
                "the layer before it.",
            )
    if ctx.op in ("batch_norm", "instance_norm", "group_norm") and x.dim() >= 2:
        w = ctx.operand("weight", "running_mean")
        if w is not None and ctx.op != "group_norm" and w.shape[0] != x.shape[1]:
            return ctx.finding(
                "shape_mismatch",
                f"{ctx.subject()} has num_features={w.shape[0]} but got input {shape_text(x)} "
                f"with {x.shape[1]} channels in dim 1",
                f"Build the norm with num_features={x.shape[1]} (the channels of the layer "
                "before it).",
            )
    return None


def _broadcast_rule(ctx: _Context) -> Finding | None:
    tensors = ctx.tensors
    if len(tensors) < 2:
        return None
    shapes = [tuple(t.shape) for t in tensors]
    if _broadcastable(*shapes):
        return None
    a, b = _first_clash(shapes)
    dim = _clash_dim(a, b)
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.op} cannot broadcast {a} with {b}: sizes {a[dim]} and {b[dim]} differ in dim "
        f"{dim - len(a)} (counting from the right) and neither is 1",
        "Align the operands: sizes must be equal or 1 from the right; add a dim with "
        "unsqueeze or fix the shape that is off.",
    )


def _first_clash(shapes: list[tuple[int, ...]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    for i, a in enumerate(shapes):
        for b in shapes[i + 1 :]:
            if not _broadcastable(a, b):
                return a, b
    return shapes[0], shapes[1]


def _clash_dim(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Index into ``a`` of the first dim, from the right, that cannot broadcast with ``b``."""
    for back in range(1, min(len(a), len(b)) + 1):
        x, y = a[-back], b[-back]
        if x != y and x != 1 and y != 1:
            return len(a) - back
    return len(a) - 1


def _module_dtype_rule(ctx: _Context) -> Finding | None:
    x = ctx.operand("input")
    module = ctx.module
    if x is None or module is None:
        return None
    weight = next((p for p in module.parameters(recurse=False) if p.is_floating_point()), None)
    if weight is None or not x.is_floating_point() or x.dtype == weight.dtype:
        return None
    return ctx.finding(
        "dtype_mismatch",
        f"input is {_dtype(x)} but {ctx.layer}'s weights are {_dtype(weight)}",
        f"Convert the input with x.to({weight.dtype}) (numpy arrays arrive as float64).",
    )


def _recurrent_rule(ctx: _Context) -> Finding | None:
    module, x = ctx.module, ctx.operand("input")
    size = getattr(module, "input_size", None)
    if x is None or not isinstance(size, int):
        return None
    who = ctx.layer
    if x.dim() not in (2, 3):
        return ctx.finding(
            "shape_mismatch",
            f"{who} expects a 2D or 3D input (seq, batch, features) but got {shape_text(x)}",
            "Shape the input as (seq_len, batch, input_size), or (batch, seq_len, "
            "input_size) with batch_first=True.",
        )
    if x.shape[-1] == size:
        return None
    hint = f"Build the layer with input_size={x.shape[-1]}, or fix the features fed to it."
    if size in tuple(x.shape[:-1]):
        hint = (
            f"The features ({size}) sit in another dim of {shape_text(x)}: the input must be "
            "(seq_len, batch, input_size), or (batch, seq_len, input_size) with "
            "batch_first=True; permute it."
        )
    return ctx.finding(
        "shape_mismatch",
        f"{who} expects input_size={size} but got input {shape_text(x)} with {x.shape[-1]} "
        "features in its last dim",
        hint,
    )


def _fallback(ctx: _Context) -> Finding:
    shapes = ", ".join(
        f"{n} {shape_text(t)} {_dtype(t)}"
        for n, t in ctx.operands.items()
        if isinstance(t, torch.Tensor)
    )
    kind = "dtype_mismatch" if _mentions_dtype(ctx.exc) else "shape_mismatch"
    detail = _first_line(ctx.exc)
    if ctx.meta and "meta" in detail.lower():
        return ctx.finding(
            kind,
            f"{ctx.subject()} needs tensor values, which meta=True does not compute "
            f"(operands: {shapes or 'none'}): {detail}",
            "Run this block without meta=True, or keep value-dependent code (.item(), if on a "
            "tensor) outside the block.",
        )
    return ctx.finding(
        kind,
        f"{ctx.subject()} failed on {shapes or 'its operands'}: {detail}",
        "Compare the operands' shapes and dtypes with what the op expects.",
    )


_RULES: tuple[Callable[[_Context], Finding | None], ...] = (
    _device_rule,
    _embedding_rule,
    _class_loss_rule,
    _weighted_dtype_rule,
    _same_shape_loss_rule,
    _linear_rule,
    _conv_rule,
    _matmul_rule,
    _cat_rule,
    _view_rule,
    _expand_rule,
    _attention_rule,
    _norm_rule,
    _recurrent_rule,
    _broadcast_rule,
)

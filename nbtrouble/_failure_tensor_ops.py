"""Failure rules for tensor ops: matmul, einsum, cat/stack, view/reshape, expand, dims,
indexing and element-wise broadcasting."""

from __future__ import annotations

import math
from typing import Any

import torch

from nbtrouble._failure_context import Context, broadcastable, dtype_text, is_pointwise, shape_text
from nbtrouble.findings import Finding

MATMUL_OPS = {"matmul", "mm", "bmm", "mv", "dot", "addmm", "baddbmm", "addbmm", "addmv"}
_MATRIX_RANK = {"mm": (2, 2), "bmm": (3, 3), "mv": (2, 1), "dot": (1, 1), "addmm": (2, 2),
                "baddbmm": (3, 3), "addbmm": (3, 3), "addmv": (2, 1)}  # fmt: skip
_CAT_OPS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"}
_VIEW_OPS = {"view", "reshape", "view_as", "reshape_as"}
_GATHER_OPS = {"gather", "take_along_dim", "scatter", "scatter_add", "scatter_reduce"}
_DIM_NAMES = ("dim", "dim0", "dim1")


def matmul_rule(ctx: Context) -> Finding | None:
    if ctx.op not in MATMUL_OPS:
        return None
    tensors = [t for n, t in ctx.operands.items() if n not in ("bias",)]
    if ctx.op.startswith("add") or ctx.op == "baddbmm":
        tensors = tensors[1:]  # the added term comes first
    if len(tensors) < 2:
        return None
    a, b = tensors[0], tensors[1]
    rank = _MATRIX_RANK.get(ctx.op)
    if rank is not None and (a.dim(), b.dim()) != rank:
        return _rank_finding(ctx, a, b, rank)
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
            _inner_dim_hint(a, b),
        )
    batch_a, batch_b = tuple(a.shape[:-2]), tuple(b.shape[:-2])
    if batch_a and batch_b and not broadcastable(batch_a, batch_b):
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.op} needs matching batch dims but got {shape_text(a)} and {shape_text(b)} "
            f"({batch_a} vs {batch_b})",
            "Make the leading (batch) dims equal or 1.",
        )
    return None


def _inner_dim_hint(a: torch.Tensor, b: torch.Tensor) -> str:
    if b.dim() >= 2 and b.shape[-1] == a.shape[-1]:
        return (
            f"The second operand {shape_text(b)} looks transposed (a weight stored as "
            "(out, in), as nn.Linear keeps it): multiply by b.T (b.transpose(-2, -1)), or use "
            "F.linear(a, b)."
        )
    return (
        "Transpose one operand (b.transpose(-2, -1)) or fix the op that produced it; "
        "check which dim holds the features."
    )


def _rank_finding(ctx: Context, a: torch.Tensor, b: torch.Tensor, rank: tuple[int, int]) -> Finding:
    names = {1: "vector", 2: "matrix", 3: "batch of matrices (3D)"}
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.op} takes a {names[rank[0]]} and a {names[rank[1]]} but got {shape_text(a)} "
        f"({a.dim()}D) and {shape_text(b)} ({b.dim()}D)",
        "Use torch.matmul (or @), which handles any number of batch dims, or reshape the "
        "operands to the ranks this op takes.",
    )


# --- einsum ----------------------------------------------------------------------------------


def einsum_rule(ctx: Context) -> Finding | None:
    if ctx.op != "einsum" or not ctx.args or not isinstance(ctx.args[0], str):
        return None
    equation = ctx.args[0].replace(" ", "")
    terms = equation.split("->")[0].split(",")
    tensors = ctx.tensors
    if len(terms) != len(tensors):
        return ctx.finding(
            "shape_mismatch",
            f"einsum '{equation}' names {len(terms)} operands but got {len(tensors)}",
            "Give one comma-separated subscript term per operand.",
        )
    sizes: dict[str, tuple[int, int]] = {}
    for index, (term, t) in enumerate(zip(terms, tensors)):
        letters = _letter_dims(term, t.dim())
        if letters is None:
            return ctx.finding(
                "shape_mismatch",
                f"einsum '{equation}': operand {index} {shape_text(t)} has {t.dim()} dims but "
                f"its subscripts '{term}' name {len(term.replace('...', ''))}",
                "Write one letter per dim of each operand (or '...' for the leading ones).",
            )
        for letter, dim in letters:
            size = t.shape[dim]
            seen = sizes.setdefault(letter, (size, index))
            if seen[0] != size and 1 not in (seen[0], size):
                first = tensors[seen[1]]
                return ctx.finding(
                    "shape_mismatch",
                    f"einsum '{equation}': subscript {letter} is {seen[0]} in operand {seen[1]} "
                    f"{shape_text(first)} but {size} in operand {index} {shape_text(t)}",
                    "A letter must name dims of the same size in every operand: check the "
                    "letters of the equation, or the operand that has the wrong size there.",
                )
    return None


def _letter_dims(term: str, ndim: int) -> list[tuple[str, int]] | None:
    """(letter, dim) for each subscript of ``term``; None when their count cannot fit."""
    if "..." in term:
        head, tail = term.split("...", 1)
        if len(head) + len(tail) > ndim:
            return None
        return [(c, i) for i, c in enumerate(head)] + [
            (c, ndim - len(tail) + i) for i, c in enumerate(tail)
        ]
    if len(term) != ndim:
        return None
    return list(zip(term, range(ndim)))


# --- cat / stack -----------------------------------------------------------------------------


def cat_rule(ctx: Context) -> Finding | None:
    if ctx.op not in _CAT_OPS:
        return None
    tensors = ctx.tensors
    if len(tensors) < 2:
        return None
    dim = ctx.argument(1, "dim", 0)
    if not isinstance(dim, int):
        return None
    first = tensors[0]
    for i, t in enumerate(tensors[1:], start=1):
        if ctx.op == "stack":
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
    ctx: Context,
    first: torch.Tensor,
    other: torch.Tensor,
    index: int,
    rule: str,
    dim: int,
    differ: int | None = None,
) -> Finding:
    where = ""
    hint = (
        "Check the dim you concatenate along and the shapes of the pieces (e.g. the batch "
        "or sequence length of each)."
    )
    if differ is not None:
        where = f", they differ in dim {differ} ({first.shape[differ]} vs {other.shape[differ]})"
        hint = _cat_hint(first, other, dim, differ)
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.op} along dim {dim} needs {rule} to match, but tensors[0] is "
        f"{shape_text(first)} and tensors[{index}] is {shape_text(other)}{where}",
        hint,
    )


def _cat_hint(first: torch.Tensor, other: torch.Tensor, dim: int, differ: int) -> str:
    spatial = first.dim() >= 3 and differ >= 2
    if spatial and abs(first.shape[differ] - other.shape[differ]) <= 2:
        return (
            "The pieces differ by a pixel or two in space, as after pooling an odd size and "
            "upsampling it back (a U-Net skip): pad or crop one to the other's size "
            "(F.pad / F.interpolate(size=...)), or use input sizes divisible by 2**depth."
        )
    if all(s == o for d, (s, o) in enumerate(zip(first.shape, other.shape)) if d != differ):
        return (
            f"They differ only in dim {differ}: to join them along it, concatenate with "
            f"dim={differ}; otherwise fix the size of the piece that is off."
        )
    return (
        "Check the dim you concatenate along and the shapes of the pieces (e.g. the batch "
        "or sequence length of each)."
    )


# --- view / reshape / expand / permute -------------------------------------------------------


def view_rule(ctx: Context) -> Finding | None:
    if ctx.op not in _VIEW_OPS:
        return None
    x = ctx.operand("input")
    target = _target_shape(ctx)
    if x is None or target is None:
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


def _target_shape(ctx: Context) -> tuple[int, ...] | None:
    if ctx.op in ("view_as", "reshape_as", "expand_as"):
        other = ctx.operand("other", "arg1")
        return tuple(other.shape) if other is not None else None
    rest = ctx.args[1:] or tuple(ctx.kwargs.get("shape", ctx.kwargs.get("size", ())) or ())
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        rest = tuple(rest[0])
    if not rest or not all(isinstance(s, int) for s in rest):
        return None
    return tuple(rest)


def expand_rule(ctx: Context) -> Finding | None:
    if ctx.op not in ("expand", "expand_as", "broadcast_to"):
        return None
    x = ctx.operand("input")
    target = _target_shape(ctx)
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
                "Expand only dims of size 1 (add one with unsqueeze), or use repeat; if the "
                "tensor is a fixed-size table (e.g. position ids), the input is longer than it.",
            )
    return None


def permute_rule(ctx: Context) -> Finding | None:
    if ctx.op != "permute":
        return None
    x = ctx.operand("input")
    order = ctx.args[1:] or tuple(ctx.kwargs.get("dims", ()) or ())
    if len(order) == 1 and isinstance(order[0], (tuple, list)):
        order = tuple(order[0])
    if x is None or not order or len(order) == x.dim():
        return None
    return ctx.finding(
        "shape_mismatch",
        f"permute got {len(order)} dims {tuple(order)} for input {shape_text(x)} with "
        f"{x.dim()} dims",
        "Name every dim of the tensor exactly once in permute.",
    )


# --- dims and indexing -----------------------------------------------------------------------


def dim_rule(ctx: Context) -> Finding | None:
    """A ``dim`` argument outside the input's dims (``x.sum(dim=2)`` on a 2-D tensor)."""
    x = ctx.operand("input")
    if x is None or ctx.op in _CAT_OPS:
        return None
    ndim = max(x.dim(), 1) + (1 if ctx.op == "unsqueeze" else 0)
    for name, value in _dim_arguments(ctx):
        bad = [d for d in value if not -ndim <= d < ndim]
        if bad:
            return ctx.finding(
                "shape_mismatch",
                f"{ctx.op} got {name}={bad[0]} but input {shape_text(x)} has {x.dim()} dims "
                f"(valid {name}: {-ndim}..{ndim - 1})",
                "Count the dims of the tensor at this line (print x.shape): an earlier "
                "squeeze, flatten or missing batch dim often removes one.",
            )
    return None


def _dim_arguments(ctx: Context) -> list[tuple[str, tuple[int, ...]]]:
    found = []
    if ctx.op in ("transpose", "swapaxes", "swapdims") and len(ctx.args) > 2:
        return [(f"dim{i}", (d,)) for i, d in enumerate(ctx.args[1:3]) if isinstance(d, int)]
    for name in _DIM_NAMES:
        value = ctx.kwargs.get(name)
        if value is None and name == "dim" and len(ctx.args) > 1 and _is_dim_op(ctx):
            value = ctx.args[1]
        if isinstance(value, int) and not isinstance(value, bool):
            found.append((name, (value,)))
        elif isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
            found.append((name, tuple(value)))
    return [(n, v) for n, v in found if all(isinstance(d, int) for d in v)]


_DIM_OPS = frozenset(
    [
        "sum",
        "mean",
        "max",
        "min",
        "argmax",
        "argmin",
        "softmax",
        "log_softmax",
        "squeeze",
        "unsqueeze",
        "std",
        "var",
        "prod",
        "cumsum",
        "select",
        "narrow",
        "unbind",
        "flip",
        "all",
        "any",
        "logsumexp",
        "amax",
        "amin",
        "median",
        "sort",
        "argsort",
        "gather",
        "index_select",
    ]
)


def _is_dim_op(ctx: Context) -> bool:
    """Ops whose second positional argument is a dim."""
    return ctx.op in _DIM_OPS


def item_rule(ctx: Context) -> Finding | None:
    """``.item()`` (or ``float(t)``) on a tensor of more than one element."""
    x = ctx.operand("input")
    if ctx.op not in ("item", "float", "int", "bool") or x is None or x.numel() == 1:
        return None
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.op}() needs a one-element tensor but got {shape_text(x)} ({x.numel()} elements)",
        "Reduce it first (loss.mean(), x.sum()), or take one element (x[0]); .tolist() gives "
        "all values.",
    )


def one_hot_rule(ctx: Context) -> Finding | None:
    """``F.one_hot(labels, num_classes)`` with a label outside 0..num_classes-1."""
    if ctx.op != "one_hot":
        return None
    labels, classes = ctx.operand("input", "tensor"), ctx.argument(1, "num_classes", -1)
    if (
        labels is None
        or not isinstance(classes, int)
        or classes < 0
        or labels.device.type == "meta"
    ):
        return None
    bad = _out_of_range(labels, classes) if labels.numel() else None
    if bad is None and labels.numel() and int(labels.min()) < 0:
        bad = int(labels.min())
    if bad is None:
        return None
    return ctx.finding(
        "shape_mismatch",
        f"one_hot got label {bad} but num_classes={classes} (valid 0..{classes - 1}) for labels "
        f"{shape_text(labels)}",
        f"Use num_classes at least {int(labels.max()) + 1} (the number of classes), or fix the "
        "labels (class ids start at 0).",
    )


def gather_rule(ctx: Context) -> Finding | None:
    if ctx.op not in _GATHER_OPS:
        return None
    x, index = ctx.operand("input"), ctx.operand("index", "indices")
    if x is None or index is None or index.dim() == x.dim():
        return None
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.op} needs an index with as many dims as the input ({x.dim()}) but got index "
        f"{shape_text(index)} for input {shape_text(x)}",
        f"Add the missing dim to the index, e.g. index.unsqueeze({index.dim()}) (and squeeze "
        "the result after).",
    )


def getitem_rule(ctx: Context) -> Finding | None:
    """``x[i]``: an integer index or index tensor beyond the size of its dim."""
    if ctx.op not in ("getitem", "setitem", "index_select"):
        return None
    x = ctx.operand("input")
    if x is None or len(ctx.args) < 2:
        return None
    if ctx.op == "index_select":
        dim, index = ctx.argument(1, "dim"), ctx.operand("index")
        keys = [(dim, index)] if isinstance(dim, int) else []
    else:
        keys = _dims_of_key(ctx.args[1])
    for dim, key in keys:
        if dim >= x.dim() or dim < -x.dim():
            return _index_finding(ctx, x, f"indexes dim {dim}", dim=None)
        size = x.shape[dim]
        bad = _out_of_range(key, size)
        if bad is not None:
            return _index_finding(ctx, x, f"uses index {bad} in dim {dim}", dim=dim)
    return None


def _dims_of_key(key: Any) -> list[tuple[int, Any]]:
    """(dim, integer key) pairs of an indexing key, up to the first Ellipsis or bool mask."""
    parts = key if isinstance(key, tuple) else (key,)
    found, dim = [], 0
    for part in parts:
        if part is Ellipsis or isinstance(part, torch.Tensor) and part.dtype == torch.bool:
            break
        if part is None:
            continue
        if isinstance(part, (int, torch.Tensor)) and not isinstance(part, bool):
            found.append((dim, part))
        dim += 1
    return found


def _out_of_range(key: Any, size: int) -> int | None:
    if isinstance(key, int):
        return key if not -size <= key < size else None
    if not isinstance(key, torch.Tensor) or key.is_floating_point() or key.device.type == "meta":
        return None
    if key.numel() == 0:
        return None
    high, low = int(key.max()), int(key.min())
    if high >= size:
        return high
    return low if low < -size else None


def _index_finding(ctx: Context, x: torch.Tensor, what: str, dim: int | None) -> Finding:
    valid = (
        f" (size {x.shape[dim]}: valid {-x.shape[dim]}..{x.shape[dim] - 1})"
        if dim is not None
        else ""
    )
    return ctx.finding(
        "shape_mismatch",
        f"indexing a tensor of shape {shape_text(x)} {what}{valid}",
        "Check the index against the size of that dim: an off-by-one, ids counted from 1, "
        "or an index meant for another dim.",
    )


# --- element-wise ops ------------------------------------------------------------------------


def broadcast_rule(ctx: Context) -> Finding | None:
    """Element-wise ops only: their operands must broadcast together."""
    tensors = ctx.tensors
    if len(tensors) < 2 or not is_pointwise(ctx.op):
        return None
    shapes = [tuple(t.shape) for t in tensors]
    if broadcastable(*shapes):
        return None
    a, b = _first_clash(shapes)
    back = _clash_from_right(a, b)
    place = f"dim {len(a) - back}" if len(a) == len(b) else f"dim {-back} (counting from the right)"
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.op} cannot broadcast {a} with {b}: sizes {a[-back]} and {b[-back]} differ in "
        f"{place} and neither is 1",
        "Align the operands: sizes must be equal or 1 from the right; add a dim with "
        "unsqueeze, project one side (e.g. a 1x1 conv or a Linear on a skip connection), or "
        "fix the shape that is off.",
    )


def _first_clash(shapes: list[tuple[int, ...]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    for i, a in enumerate(shapes):
        for b in shapes[i + 1 :]:
            if not broadcastable(a, b):
                return a, b
    return shapes[0], shapes[1]


def _clash_from_right(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How far from the right (1 = last dim) the first dims that cannot broadcast are."""
    for back in range(1, min(len(a), len(b)) + 1):
        x, y = a[-back], b[-back]
        if x != y and x != 1 and y != 1:
            return back
    return 1


def inplace_dtype_rule(ctx: Context) -> Finding | None:
    """An in-place op whose result dtype cannot be stored in its integer (or bool) input."""
    inplace = ctx.raw_op.endswith("_") and not ctx.raw_op.endswith("__")
    inplace = inplace or ctx.raw_op.startswith("__i")
    x = ctx.operand("input")
    if not inplace or x is None or len(ctx.tensors) < 2:
        return None
    result = torch.result_type(*ctx.tensors[:2])
    if torch.can_cast(result, x.dtype):
        return None
    return ctx.finding(
        "dtype_mismatch",
        f"in-place {ctx.op} would store a {str(result).removeprefix('torch.')} result in "
        f"{dtype_text(x)} input {shape_text(x)}",
        f"Convert the input first (x = x.to({result})), or use the out-of-place form "
        f"(x = x.{ctx.op}(...)).",
    )

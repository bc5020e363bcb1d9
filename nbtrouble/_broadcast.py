"""Silent-broadcast detection: ops that stretched both operands into a bigger shape than meant.

The classic bug is ``(N, 1) - (N,)``: broadcasting pairs every element with every other one and
returns ``(N, N)`` without a word. Comparing an op's output size with its operands' cannot tell
this from deliberate broadcasting (pairwise distances, causal masks, relative positions), so the
analyzer weighs what the trace knows about each candidate:

- only *mutual* broadcasts are candidates: each operand is stretched along an axis the other
  one is not (a bias add or ``x - x.mean(0)`` stretches one side only);
- two stretched axes of different lengths (pairs between sets of different sizes) are deliberate;
- a size-1 axis made on purpose (``x[:, None]``, ``unsqueeze``, ``view(-1, 1)``) on both sides,
  or a tensor paired with a view of itself, is deliberate;
- where the result flows decides the rest: reduced to a scalar or fed to a loss is the classic
  bug; fed to a softmax, a mask, an index or combined with a full-size matrix is deliberate;
- library code is trusted unless the evidence is at its strongest; loss functions whose input
  and target shapes differ are always reported.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch.utils.weak import WeakIdKeyDictionary

from nbtrouble._events import OpEvent
from nbtrouble.findings import Finding

# Ops that broadcast their tensor operands against each other, element by element.
_ELEMENTWISE = frozenset(
    """add sub subtract rsub mul multiply div divide true_divide rdiv rtruediv floor_divide
    rfloordiv remainder fmod pow rpow float_power atan2 arctan2 hypot maximum minimum fmax fmin
    eq ne lt le gt ge greater greater_equal less less_equal not_equal logical_and logical_or
    logical_xor bitwise_and bitwise_or bitwise_xor and or xor rand ror rxor where copysign xlogy
    lerp addcmul addcdiv isclose""".split()
)
_SYMBOLS = {
    "add": "+", "sub": "-", "subtract": "-", "mul": "*", "multiply": "*", "div": "/",
    "divide": "/", "true_divide": "/", "floor_divide": "//", "remainder": "%", "pow": "**",
    "eq": "==", "ne": "!=", "not_equal": "!=", "lt": "<", "less": "<", "le": "<=",
    "less_equal": "<=", "gt": ">", "greater": ">", "ge": ">=", "greater_equal": ">=",
    "and": "&", "bitwise_and": "&", "logical_and": "&", "or": "|", "bitwise_or": "|",
    "logical_or": "|", "xor": "^", "bitwise_xor": "^", "logical_xor": "^",
}  # fmt: skip
_AST_OPS = {
    "-": (ast.Sub,), "+": (ast.Add,), "*": (ast.Mult,), "/": (ast.Div,), "//": (ast.FloorDiv,),
    "%": (ast.Mod,), "**": (ast.Pow,), "&": (ast.BitAnd,), "|": (ast.BitOr,), "^": (ast.BitXor,),
    "==": (ast.Eq,), "!=": (ast.NotEq,), "<": (ast.Lt,), "<=": (ast.LtE,), ">": (ast.Gt,),
    ">=": (ast.GtE,),
}  # fmt: skip
# Reflected dunders (``__rsub__``) receive their operands swapped.
_REFLECTED = {"rsub": "sub", "rdiv": "div", "rtruediv": "div", "rfloordiv": "floor_divide",
              "rpow": "pow", "rand": "and", "ror": "or", "rxor": "xor"}  # fmt: skip

# Element-by-element ops of one tensor: the values stay where they were, so a candidate's
# result flows on through them unchanged.
_UNARY = frozenset(
    """abs absolute neg negative square sqrt rsqrt exp exp2 expm1 log log1p log2 log10 sigmoid
    tanh relu relu6 leaky_relu gelu silu elu softplus clamp clamp_min clamp_max clip float
    double half bfloat16 int long short bool to type type_as detach clone contiguous cpu cuda
    logical_not bitwise_not invert sign sgn reciprocal erf nan_to_num sin cos floor ceil round
    trunc""".split()
)
# Reductions: collapsing a broadcast axis (or everything) is where the classic bug hides.
_REDUCTIONS = frozenset(
    "sum mean nansum nanmean prod std var norm vector_norm all any count_nonzero amax amin".split()
)
# max/min/median pick one element; along an axis they are a nearest-neighbour search.
_SELECTIONS = frozenset("max min median nanmedian".split())
_BINARY_SELECTIONS = {"max": "maximum", "min": "minimum"}
_LOSS_NAMES = frozenset(
    "cross_entropy nll_loss binary_cross_entropy binary_cross_entropy_with_logits kl_div".split()
)
# Element-wise losses of (input, target): torch broadcasts them when their shapes differ.
_PAIR_LOSSES = frozenset(
    """mse_loss l1_loss smooth_l1_loss huber_loss binary_cross_entropy
    binary_cross_entropy_with_logits soft_margin_loss poisson_nll_loss kl_div""".split()
)
# Looking at a tensor without using its values.
_NEUTRAL = frozenset(
    """size dim ndim ndimension numel shape dtype device is_contiguous is_floating_point
    is_complex len repr format str element_size stride storage_offset data_ptr requires_grad
    requires_grad_ retain_grad register_hook backward grad grad_fn is_leaf numpy tolist item
    array reduce_ex deepcopy hash untyped_storage""".split()
)
# Ops that add a size-1 axis on purpose.
_UNSQUEEZES = frozenset("unsqueeze atleast_2d atleast_3d".split())
_RESHAPES = frozenset("view reshape view_as reshape_as unflatten".split())
_TRANSPOSES = frozenset("T mT t transpose permute movedim moveaxis swapaxes swapdims".split())

_KNOWN = _ELEMENTWISE | _UNARY | _REDUCTIONS | _UNSQUEEZES | _RESHAPES | _TRANSPOSES
# Ops that can start something to follow: a candidate, a loss mismatch or a size-1 axis made on
# purpose. Any other op matters only while a candidate's result or such an axis is alive.
_STARTERS = (
    _ELEMENTWISE
    | _PAIR_LOSSES
    | _UNSQUEEZES
    | _RESHAPES
    | _TRANSPOSES
    | frozenset(_BINARY_SELECTIONS)
    | {"getitem"}
)

_MAX_PER_LOCATION = 8  # a loop runs the same line many times: a few instances decide it
_MAX_NAME_CHARS = 30


@dataclass
class _Candidate:
    """One mutual broadcast whose verdict waits for where its result flows."""

    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    result_shape: tuple[int, ...]
    symbol: str
    names: tuple[str, str] | None
    where: str | None
    both_implicit: bool
    user_code: bool
    reduced_by: str | None = None
    deliberate: bool = False

    def is_bug(self) -> bool:
        if self.deliberate:
            return False
        # Never consumed inside the trace: only the bare (N, 1) vs (N,) of the user's own line,
        # with no size-1 axis made on purpose, is reported.
        return self.reduced_by is not None or (self.user_code and self.both_implicit)


@dataclass
class _Flow:
    """A tensor that carries a candidate's result, and which of its axes the broadcast made."""

    candidate: _Candidate
    cross_axes: frozenset[int]
    summary: bool = False  # the grid reduced as a whole, e.g. its sum


@dataclass
class _LossMismatch:
    loss: str
    input_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    names: tuple[str, str] | None
    where: str | None
    # The grid of an earlier broadcast that reached this loss: reported there when it is a bug.
    caused_by: _Candidate | None = None


class BroadcastAnalyzer:
    """Reports ops whose operands broadcast against each other by mistake.

    Examples
    --------
    ``nbt.shapecheck`` runs one over every op of its block:

    >>> model, x, y = torch.nn.Linear(4, 1), torch.randn(64, 4), torch.randn(64)
    >>> with nbt.shapecheck() as trace:  # doctest: +SKIP
    ...     loss = ((model(x) - y) ** 2).mean()
    >>> trace.findings[0].message  # doctest: +SKIP
    '`model(x)` (64, 1) - `y` (64,) broadcast to (64, 64), 4096 values where 64 were meant, ...'
    """

    def __init__(self) -> None:
        # Keyed by line: one finding per line, however often a loop or a reused helper runs it.
        self._candidates: dict[str | None, list[_Candidate]] = {}
        self._losses: dict[str | None, _LossMismatch] = {}
        # Keyed by tensor identity (a tensor's `==` is element-wise) and weakly, so that no
        # tensor is kept alive: tensor -> _Flow, and tensor -> True for size-1 axes made on purpose.
        self._flows = WeakIdKeyDictionary()
        self._explicit = WeakIdKeyDictionary()
        # How each mutual broadcast was judged when it ran, for measuring the check itself.
        self.judged: Counter[str] = Counter()

    @classmethod
    def wants(cls, name: str) -> bool:
        """Whether an op called ``name`` matters even while nothing is being followed."""
        return _base_name(name) in _STARTERS

    @property
    def following(self) -> bool:
        """True while a candidate's result or a size-1 axis made on purpose is alive."""
        return bool(self._flows.data) or bool(self._explicit.data)

    def on_op(self, event: OpEvent) -> None:
        """Look at one recorded op: follow earlier candidates, then judge this one."""
        base = _base_name(event.name)
        if base in _NEUTRAL:
            return
        if base in _BINARY_SELECTIONS and len(event.args) > 1 and _is_tensor(event.args[1]):
            base = _BINARY_SELECTIONS[base]  # torch.max(a, b) is torch.maximum(a, b)
        if len(self._flows):
            self._follow(event, base)
        if base in _PAIR_LOSSES:
            self._check_loss(event, base)
        elif base in _ELEMENTWISE:
            self._check_elementwise(event, base)
        self._mark_explicit(event, base)

    def findings(self) -> list[Finding]:
        """The silent broadcasts seen so far, one per location."""
        found: dict[str | None, Finding] = {}
        for line, candidates in self._candidates.items():
            bugs = [c for c in candidates if c.is_bug()]
            if bugs:
                found[line] = _broadcast_finding(bugs[0])
        for line, mismatch in self._losses.items():
            cause = mismatch.caused_by
            if line not in found and not (cause is not None and cause.is_bug()):
                found[line] = _loss_finding(mismatch)
        return list(found.values())

    # -- following a candidate's result ---------------------------------------------------

    def _follow(self, event: OpEvent, base: str) -> None:
        operands = _tensor_operands(event)
        carried = [(t, f) for t in operands if (f := self._flows.get(t)) is not None]
        if not carried:
            return
        result = event.result
        summarized = {id(f.candidate) for _, f in carried if f.summary}
        for tensor, flow in carried:
            if flow.summary:
                continue
            candidate = flow.candidate
            if id(candidate) in summarized and base in _ELEMENTWISE:
                candidate.deliberate = True  # `g / g.sum()`: normalizing the grid as a grid
                continue
            verdict = _consumer_verdict(event, base, tensor, flow, operands, self._flows)
            if isinstance(verdict, frozenset):  # the grid flows on, along these axes
                if _is_tensor(result):
                    self._flows[result] = _Flow(candidate, verdict)
            elif verdict == "deliberate":
                candidate.deliberate = True
            else:
                candidate.reduced_by = candidate.reduced_by or _display_name(event.name)
                if _is_tensor(result):
                    self._flows[result] = _Flow(candidate, frozenset(), summary=True)

    # -- judging an element-wise op ---------------------------------------------------------

    def _check_elementwise(self, event: OpEvent, base: str) -> None:
        result = event.result
        if not _is_tensor(result):
            return
        operands = [t for t in _tensor_operands(event) if t.numel() > 1]
        pair = _mutual_pair(operands, tuple(result.shape))
        if pair is None:
            return
        a, b, cross, same_length = pair
        explicit_a, explicit_b = a in self._explicit, b in self._explicit
        both_implicit = not (explicit_a or explicit_b)
        reason = _deliberate_reason(
            explicit_a and explicit_b, same_length, _same_data(a, b), event.user_code, both_implicit
        )
        self.judged[reason or "waits for its result's use"] += 1
        if reason is not None:
            if explicit_a and explicit_b:
                self._explicit[result] = True  # the user shaped this grid on purpose
            return
        where = _where(event)
        instances = self._candidates.setdefault(event.location or where, [])
        if len(instances) >= _MAX_PER_LOCATION:
            return
        reflected = base in _REFLECTED
        symbol = _SYMBOLS.get(_REFLECTED.get(base, base), "")
        first, second = (b, a) if reflected else (a, b)
        # Names from the source line only when it shows exactly these two operands.
        two_operands = len(_tensor_operands(event)) == 2
        candidate = _Candidate(
            shapes=(tuple(first.shape), tuple(second.shape)),
            result_shape=tuple(result.shape),
            symbol=symbol or f"torch.{base}",
            names=(
                _binary_names(event.source_line, symbol, _REFLECTED.get(base, base))
                if two_operands
                else None
            ),
            where=where,
            both_implicit=both_implicit,
            user_code=event.user_code,
        )
        instances.append(candidate)
        self._flows[result] = _Flow(candidate, cross)

    # -- losses -----------------------------------------------------------------------------

    def _check_loss(self, event: OpEvent, base: str) -> None:
        given, target = _loss_operands(event)
        if given is None or target is None or given.shape == target.shape:
            return
        where = _where(event)
        key = event.location or where
        if key in self._losses:
            return
        flows = [self._flows.get(t) for t in (given, target)] if len(self._flows) else []
        self._losses[key] = _LossMismatch(
            loss=base,
            input_shape=tuple(given.shape),
            target_shape=tuple(target.shape),
            names=_call_names(event.source_line),
            where=where,
            caused_by=next((f.candidate for f in flows if f is not None and not f.summary), None),
        )

    # -- provenance: size-1 axes made on purpose ------------------------------------------

    def _mark_explicit(self, event: OpEvent, base: str) -> None:
        result = event.result
        if not _is_tensor(result) or not event.args:
            return
        source = event.args[0]
        if not _is_tensor(source):
            return
        if _adds_unit_axis(event, base, source, result):
            self._explicit[result] = True
        elif (base in _UNARY or base in _ELEMENTWISE) and len(self._explicit):
            # `x[:, None].float()` or `x[:, None] * 2` keeps the intent of its operand.
            shape = result.shape
            if any(t.shape == shape and t in self._explicit for t in _tensor_operands(event)):
                self._explicit[result] = True


def _deliberate_reason(
    both_explicit: bool, same_length: bool, same_data: bool, user_code: bool, both_implicit: bool
) -> str | None:
    """Why a mutual broadcast is deliberate from the op alone, or None when its use decides."""
    if both_explicit:
        return "size-1 axes made on purpose on both sides"
    if not same_length:
        return "stretched axes of different lengths"
    if same_data:
        return "a tensor paired with itself"
    if not user_code and not both_implicit:
        return "library code with a size-1 axis made on purpose"
    return None


def _adds_unit_axis(event: OpEvent, base: str, source: torch.Tensor, result: torch.Tensor) -> bool:
    """Whether this op is the user writing a size-1 axis on purpose."""
    if base in _UNSQUEEZES:
        return True
    if base == "getitem":
        index = event.args[1] if len(event.args) > 1 else None
        parts = index if isinstance(index, tuple) else (index,)
        return any(p is None for p in parts)
    if base in _RESHAPES:
        return result.shape.count(1) > source.shape.count(1)
    if base in _TRANSPOSES:
        return 1 in result.shape and result.shape != source.shape
    return False


def _consumer_verdict(
    event: OpEvent,
    base: str,
    tensor: torch.Tensor,
    flow: _Flow,
    operands: list[torch.Tensor],
    flows: WeakIdKeyDictionary,
) -> str | frozenset[int]:
    """What an op does with a candidate's result: its new cross axes, "reduced" or "deliberate"."""
    result = event.result
    if base in _LOSS_NAMES or base.endswith("_loss"):
        return _loss_verdict(base, tensor, flow, operands, flows)
    if base in _REDUCTIONS:
        return _reduction_verdict(event, base, tensor, flow.cross_axes)
    if base in _SELECTIONS:
        return "reduced" if _reduced_dims(event, base, tensor.dim()) is None else "deliberate"
    if not _is_tensor(result) or result.shape != tensor.shape:
        return "deliberate"  # reshaped, indexed, multiplied as a matrix, broadcast further
    if base in _UNARY:
        return flow.cross_axes
    if base in _ELEMENTWISE:
        if any(_is_full_partner(o, result.shape, flow, flows) for o in operands if o is not tensor):
            return "deliberate"  # combined with a full-size matrix: used as one
        return flow.cross_axes
    return "deliberate"  # softmax, masked_fill, topk, matmul, indexing, ...


def _loss_verdict(
    base: str,
    tensor: torch.Tensor,
    flow: _Flow,
    operands: list[torch.Tensor],
    flows: WeakIdKeyDictionary,
) -> str:
    """A grid fed to a loss: the classic bug, unless the loss treats it as a grid."""
    if base in ("cross_entropy", "nll_loss") and operands and operands[0] is tensor:
        return "deliberate"  # scores of every row against every class: a matrix on purpose
    if base in _PAIR_LOSSES:
        partners = [o for o in operands[:2] if o is not tensor]
        if partners and all(_is_full_partner(o, tensor.shape, flow, flows) for o in partners):
            return "deliberate"  # compared with a tensor of the grid's own shape: a target map
    return "reduced"


def _is_full_partner(
    other: torch.Tensor, shape: torch.Size, flow: _Flow, flows: WeakIdKeyDictionary
) -> bool:
    """Whether ``other`` already has the grid's full shape without carrying the same grid."""
    if other.shape != shape or other.numel() <= 1:
        return False
    other_flow = flows.get(other)
    return other_flow is None or other_flow.candidate is not flow.candidate


def _reduction_verdict(
    event: OpEvent, base: str, tensor: torch.Tensor, cross_axes: frozenset[int]
) -> str | frozenset[int]:
    """A grid reduced: "reduced" once no broadcast axis is left, else the axes that remain.

    Reducing one of the two axes (a density over a grid, a count per row) leaves a result that
    still carries the pairing; only collapsing the whole grid is the classic bug's mean.
    """
    dims = _reduced_dims(event, base, tensor.dim())
    if dims is None or cross_axes <= dims:
        return "reduced"
    remaining = cross_axes - dims
    if _keepdim(event, base):
        return remaining
    return frozenset(axis - sum(d < axis for d in dims) for axis in remaining)


def _reduced_dims(event: OpEvent, base: str, ndim: int) -> frozenset[int] | None:
    """The axes a reduction collapses, or None when it collapses them all."""
    dim = event.kwargs.get("dim", event.kwargs.get("axis"))
    position = 2 if base in ("norm", "vector_norm") else 1  # norm(input, p, dim)
    if dim is None and len(event.args) > position:
        dim = event.args[position]
    if isinstance(dim, bool) or not isinstance(dim, (int, tuple, list)):
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not dims or ndim == 0:
        return None
    return frozenset(d % ndim for d in dims if isinstance(d, int))


def _keepdim(event: OpEvent, base: str) -> bool:
    if "keepdim" in event.kwargs:
        return bool(event.kwargs["keepdim"])
    # sum(input, dim, keepdim), but std(input, dim, unbiased, keepdim) and norm(input, p, dim, keepdim)
    position = 3 if base in ("std", "var", "norm", "vector_norm") else 2
    return len(event.args) > position and event.args[position] is True


def _mutual_pair(
    operands: list[torch.Tensor], result_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, frozenset[int], bool] | None:
    """Two operands each stretched along an axis the other is not, their axes, equal lengths."""
    expanded = [_expanded_axes(tuple(t.shape), result_shape) for t in operands]
    for i in range(len(operands)):
        for j in range(i + 1, len(operands)):
            only_i, only_j = expanded[i] - expanded[j], expanded[j] - expanded[i]
            if only_i and only_j:
                lengths_i = {result_shape[k] for k in only_i}
                lengths_j = {result_shape[k] for k in only_j}
                same_length = bool(lengths_i & lengths_j)
                return operands[i], operands[j], only_i | only_j, same_length
    return None


def _expanded_axes(shape: tuple[int, ...], out: tuple[int, ...]) -> frozenset[int]:
    """Axes of ``out`` along which an operand of ``shape`` was stretched by broadcasting."""
    offset = len(out) - len(shape)
    return frozenset(
        i for i, n in enumerate(out) if n > 1 and (i < offset or shape[i - offset] == 1)
    )


def _same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two operands are views of one tensor: pairing a tensor with itself is deliberate."""
    return (a if a._base is None else a._base) is (b if b._base is None else b._base)


def _is_tensor(value: Any) -> TypeGuard[torch.Tensor]:
    """A tensor with one shape: nested tensors have none and are left alone."""
    return isinstance(value, torch.Tensor) and not value.is_nested


def _tensor_operands(event: OpEvent) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    for value in (*event.args, *event.kwargs.values()):
        if _is_tensor(value):
            tensors.append(value)
        elif isinstance(value, (list, tuple)):
            tensors.extend(v for v in value if _is_tensor(v))
    return tensors


def _loss_operands(event: OpEvent) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    args = list(event.args[:2])
    given = args[0] if args else event.kwargs.get("input")
    target = args[1] if len(args) > 1 else event.kwargs.get("target")
    if not _is_tensor(given) or not _is_tensor(target):
        return None, None
    return given, target


_BASE_NAMES: dict[str, str] = {}


def _base_name(name: str) -> str:
    """``torch.Tensor.__rsub__`` -> ``rsub``; ``torch.Tensor.T.__get__`` -> ``T``."""
    base = _BASE_NAMES.get(name)
    if base is None:
        parts = name.split(".")
        last = parts[-2] if parts[-1] == "__get__" and len(parts) > 1 else parts[-1]
        if last.startswith("__") and last.endswith("__"):
            last = last[2:-2]
            # `a -= b` is `__isub__`: the same op, in place.
            if last.startswith("i") and last[1:] in _ELEMENTWISE:
                last = last[1:]
        elif last.endswith("_") and not last.startswith("_") and last[:-1] in _KNOWN:
            last = last[:-1]  # `clamp_`, `sub_`: in place, the same values
        base = _BASE_NAMES[name] = last
    return base


def _display_name(name: str) -> str:
    return f"{_base_name(name)}()"


def _where(event: OpEvent) -> str | None:
    """``"file:line module.path"``, or whichever of the two is known."""
    parts = [part for part in (event.location, event.module) if part]
    return " ".join(parts) or None


# -- naming the operands from the source line ----------------------------------------------


def _parse_line(source_line: str) -> ast.AST | None:
    text = source_line.strip()
    if not text:
        return None
    for candidate in (text, f"{text}\n    pass", text.removeprefix("return ")):
        try:
            return ast.parse(candidate)
        except (SyntaxError, ValueError):  # a line that is not a statement, or has a NUL
            continue
    return None


def _short(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= _MAX_NAME_CHARS else text[: _MAX_NAME_CHARS - 3] + "..."


def _binary_names(source_line: str, symbol: str, base: str) -> tuple[str, str] | None:
    """The two operand expressions of the one ``a - b`` (or ``torch.sub(a, b)``) on the line."""
    tree = _parse_line(source_line)
    if tree is None:
        return None
    op_types = _AST_OPS.get(symbol, ())
    found: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, op_types):
            found.append((_short(node.left), _short(node.right)))
        elif (
            isinstance(node, ast.Compare)
            and len(node.ops) == 1
            and isinstance(node.ops[0], op_types)
        ):
            found.append((_short(node.left), _short(node.comparators[0])))
        elif isinstance(node, ast.Call) and _called_name(node) == base:
            args = node.args
            if isinstance(node.func, ast.Attribute) and len(args) == 1:
                found.append((_short(node.func.value), _short(args[0])))
            elif len(args) >= 2:
                found.append((_short(args[0]), _short(args[1])))
    return found[0] if len(found) == 1 else None


def _call_names(source_line: str) -> tuple[str, str] | None:
    """The first two arguments of the one call on the line that takes two or more."""
    tree = _parse_line(source_line)
    if tree is None:
        return None
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and len(n.args) >= 2]
    if len(calls) != 1:
        return None
    return _short(calls[0].args[0]), _short(calls[0].args[1])


def _called_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    if isinstance(node.func, ast.Name):
        return node.func.id
    return None


# -- the findings ---------------------------------------------------------------------------


def _shape_text(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def _labelled(name: str | None, shape: tuple[int, ...]) -> str:
    return f"`{name}` {_shape_text(shape)}" if name else _shape_text(shape)


def _suggestion(
    shape_a: tuple[int, ...], shape_b: tuple[int, ...], names: tuple[str, str] | None
) -> str:
    """What the user most likely meant: both operands with one shape."""
    name_a, name_b = names if names else (None, None)
    if [d for d in shape_a if d != 1] != [d for d in shape_b if d != 1]:
        return "did you mean the two operands to have the same shape?"
    # The operand with the extra size-1 axes is the column; the other one is the row.
    if shape_a.count(1) >= shape_b.count(1):
        col, col_name, row, row_name = shape_a, name_a, shape_b, name_b
    else:
        col, col_name, row, row_name = shape_b, name_b, shape_a, name_a
    squeeze, reshape = _squeeze_call(col, row), _view_call(col)
    if not (row_name and col_name):
        return (
            f"did you mean to reshape the {_shape_text(row)} operand with `{reshape}` "
            f"or to squeeze the {_shape_text(col)} one with `{squeeze}`?"
        )
    col_fix = _without_unit_axis(col_name) or f"{col_name}{squeeze}"
    return (
        f"did you mean `{row_name}{reshape}` (both {_shape_text(col)}) "
        f"or `{col_fix}` (both {_shape_text(row)})?"
    )


_UNIT_AXIS_SUFFIX = re.compile(
    r"(\.unsqueeze\((dim=)?-?\d+\)|\[(:, |\.\.\., )None\]|\.(view|reshape)\(-1, 1\))$"
)


def _without_unit_axis(expression: str) -> str | None:
    """``y.unsqueeze(1)`` -> ``y``: the fix of an axis added by hand is to not add it."""
    stripped = _UNIT_AXIS_SUFFIX.sub("", expression)
    return stripped if stripped != expression else None


def _squeeze_call(col: tuple[int, ...], row: tuple[int, ...]) -> str:
    if 1 in row:
        return f".view{_shape_text(row)}"
    unit = [i for i, d in enumerate(col) if d == 1]
    return f".squeeze({unit[0]})" if len(unit) == 1 else f".squeeze({tuple(unit)})"


def _view_call(col: tuple[int, ...]) -> str:
    sizes = [str(d) for d in col]
    non_unit = [i for i, d in enumerate(col) if d != 1]
    if len(non_unit) == 1:
        sizes[non_unit[0]] = "-1"
    return f".view({', '.join(sizes)})"


def _broadcast_finding(candidate: _Candidate) -> Finding:
    shape_a, shape_b = candidate.shapes
    name_a, name_b = candidate.names if candidate.names else (None, None)
    result = _shape_text(candidate.result_shape)
    meant = max(_numel(shape_a), _numel(shape_b))
    operand_a, operand_b = _labelled(name_a, shape_a), _labelled(name_b, shape_b)
    if candidate.symbol.startswith("torch."):
        op_text = f"{candidate.symbol}({operand_a}, {operand_b})"
    else:
        op_text = f"{operand_a} {candidate.symbol} {operand_b}"
    head = (
        f"{op_text} broadcast to {result}, "
        f"{_numel(candidate.result_shape)} values where {meant} were meant"
    )
    flow = f", before {candidate.reduced_by} reduced them" if candidate.reduced_by else ""
    message = (
        f"{head}{flow}: each element was paired with every element of the other operand, not "
        f"only its own; {_suggestion(shape_a, shape_b, candidate.names)}"
    )
    hint = (
        "Broadcasting lines shapes up from the right, so a column and a row of the same length "
        f"make a {result} grid instead of matching one to one; a loss or an accuracy computed "
        "over that grid still runs and looks plausible. Give both operands the same shape "
        "before the op, and assert the shapes where they meet."
    )
    return Finding("silent_broadcast", "warning", message, hint, candidate.where)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _loss_finding(mismatch: _LossMismatch) -> Finding:
    name_in, name_target = mismatch.names if mismatch.names else (None, None)
    shape_in, shape_target = mismatch.input_shape, mismatch.target_shape
    try:
        joint = tuple(torch.broadcast_shapes(shape_in, shape_target))
    except RuntimeError:
        joint = None
    head = (
        f"{mismatch.loss} got input {_labelled(name_in, shape_in)} and target "
        f"{_labelled(name_target, shape_target)}"
    )
    if joint is None:
        what = "shapes that differ"
    elif joint != shape_in:
        what = f"they broadcast to {_shape_text(joint)}, so every prediction is compared with every target"
    else:
        what = "the target is stretched to the input's shape, so each target value is reused"
    message = f"{head}: {what}; {_suggestion(shape_in, shape_target, mismatch.names)}"
    hint = (
        "A loss compares input and target element by element after broadcasting them; with "
        "different shapes it averages over the wrong pairs and training drifts towards the mean "
        "target. Give the target exactly the output's shape."
    )
    return Finding("silent_broadcast", "warning", message, hint, mismatch.where)

"""Non-finite values: the first op that produced a NaN, and an Inf reaching a loss or activation.

Cost: one reduction per floating-point output (its sum, which is NaN when the tensor holds a
NaN and infinite when it holds an Inf of one sign). On the CPU the sum is read at once; on an
accelerator the sums are gathered and read in batches, so the trace never waits for the device
after every op.

An ``-inf`` put into an attention or padding mask on purpose (``masked_fill(mask, -inf)``,
``torch.full(..., -inf)``, then added to the scores) is no finding: values are followed from
the op that made them, an Inf made from an explicit infinite argument counts as a mask, and a
softmax over it gives finite probabilities. Such a mask reaching a loss, or a fully masked row
giving NaN, is still reported.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from nbtrouble._events import OpEvent
from nbtrouble.findings import Finding

_BATCH = 64  # sums gathered before one read on an accelerator
_ACTIVATIONS = frozenset(
    [
        "relu",
        "relu_",
        "relu6",
        "gelu",
        "silu",
        "mish",
        "sigmoid",
        "tanh",
        "elu",
        "selu",
        "celu",
        "leaky_relu",
        "softplus",
        "softsign",
        "hardtanh",
        "hardswish",
        "hardsigmoid",
        "prelu",
        "glu",
        "logsigmoid",
        "softmax",
        "log_softmax",
    ]
)
# Ops whose output is finite whenever their inputs are (selection, layout, bounded maps,
# normalisation with an epsilon). Arithmetic that can overflow, divide or take logs is absent.
_CANNOT_MAKE_NONFINITE = frozenset(
    [
        "relu",
        "relu_",
        "relu6",
        "hardtanh",
        "hardtanh_",
        "sigmoid",
        "tanh",
        "leaky_relu",
        "leaky_relu_",
        "gelu",
        "silu",
        "mish",
        "hardswish",
        "hardsigmoid",
        "elu",
        "selu",
        "celu",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "max_pool1d_with_indices",
        "max_pool2d_with_indices",
        "dropout",
        "dropout_",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
        "flatten",
        "unflatten",
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "permute",
        "transpose",
        "t",
        "T",
        "contiguous",
        "squeeze",
        "unsqueeze",
        "expand",
        "expand_as",
        "__getitem__",
        "chunk",
        "split",
        "unbind",
        "narrow",
        "select",
        "clone",
        "detach",
        "clamp",
        "clamp_",
        "clip",
        "abs",
        "neg",
        "__neg__",
        "sign",
        "maximum",
        "minimum",
        "max",
        "min",
        "amax",
        "amin",
        "argmax",
        "argmin",
        "sort",
        "topk",
        "gather",
        "index_select",
        "flip",
        "roll",
        "repeat",
        "tile",
        "cat",
        "concat",
        "concatenate",
        "stack",
        "hstack",
        "vstack",
        "batch_norm",
        "layer_norm",
        "group_norm",
        "instance_norm",
        "rms_norm",
        "embedding",
        "one_hot",
        "zeros_like",
        "ones_like",
        "empty_like",
        "randn_like",
        "rand_like",
    ]
)
_LOSS_NAMES = frozenset(
    [
        "cross_entropy",
        "nll_loss",
        "binary_cross_entropy",
        "binary_cross_entropy_with_logits",
        "kl_div",
        "poisson_nll_loss",
        "gaussian_nll_loss",
        "ctc_loss",
    ]
)


@dataclass
class _Origin:
    """The op that first made a non-finite value and what it made."""

    what: str  # "NaN", "Inf" or "mask" (an explicit infinity: deliberate)
    name: str
    location: str | None
    module: str | None
    source_line: str

    @property
    def where(self) -> str | None:
        parts = [p for p in (self.location, self.module) if p]
        return " ".join(parts) if parts else None


@dataclass
class _Pending:
    sums: list[torch.Tensor]
    outputs: list[weakref.ref[torch.Tensor]]
    input_ids: list[int]
    event_name: str
    short: str
    location: str | None
    module: str | None
    source_line: str
    explicit_infinity: bool


class NonfiniteAnalyzer:
    """Names the first op/module that produced a NaN, and an Inf that reached a loss."""

    def __init__(self) -> None:
        self._findings: list[Finding] = []
        self._nan_reported = False
        self._inf_reported = False
        # id(tensor) -> (weak reference, where its non-finite values came from)
        self._tainted: dict[int, tuple[weakref.ref[torch.Tensor], _Origin]] = {}
        self._pending: list[_Pending] = []

    @classmethod
    def wants(cls, name: str) -> bool:
        """Whether an op called ``name`` can turn finite inputs into a NaN or an Inf."""
        return name.rsplit(".", 1)[-1] not in _CANNOT_MAKE_NONFINITE

    @property
    def following(self) -> bool:
        """True while a non-finite value is alive (or unread): every op may carry it on."""
        return bool(self._tainted) or bool(self._pending)

    def on_op(self, event: OpEvent) -> None:
        """Look at one recorded op: sum its floating-point outputs, lazily on accelerators."""
        if self._nan_reported and self._inf_reported:
            return
        short = event.name.rsplit(".", 1)[-1]
        if short in _CANNOT_MAKE_NONFINITE:
            # Finite inputs give finite outputs here: skip the sum (it would cost as much as
            # the op), only carry a known non-finite input's origin along.
            if self._tainted:
                self._carry(event)
            return
        outputs = [t for t in _outputs(event) if _checkable(t)]
        if not outputs:
            return
        sums = [_sum(t) for t in outputs]
        if outputs[0].is_cpu:
            # Reading a CPU sum costs no device sync: judge now, and describe the op only
            # when something is wrong.
            if self._pending:
                self._resolve()
            values = [s.item() for s in sums]
            if not all(map(math.isfinite, values)):
                self._judge_values(self._pending_from(event, short, outputs, []), values)
            return
        self._pending.append(self._pending_from(event, short, outputs, sums))
        if len(self._pending) >= _BATCH:
            self._resolve()

    def _pending_from(
        self, event: OpEvent, short: str, outputs: list[torch.Tensor], sums: list[torch.Tensor]
    ) -> _Pending:
        return _Pending(
            sums=sums,
            outputs=[weakref.ref(t) for t in outputs],
            input_ids=_input_ids(event),
            event_name=event.name,
            short=short,
            location=event.location,
            module=event.module,
            source_line=event.source_line,
            explicit_infinity=_has_explicit_infinity(event),
        )

    def _carry(self, event: OpEvent) -> None:
        self._resolve()
        origins = self._input_origins(_input_ids(event))
        if not origins:
            return
        for tensor in _outputs(event):
            self._taint(weakref.ref(tensor), origins[0])
        short = event.name.rsplit(".", 1)[-1]
        overflowed = [o for o in origins if o.what == "Inf"]
        if overflowed and short in _ACTIVATIONS:
            # An activation saturated (or passed on) an Inf that no mask explains.
            self._report_inf(_pending_for(event, short), overflowed[0])

    def findings(self) -> list[Finding]:
        """The non-finite findings so far (at most one NaN and one Inf)."""
        self._resolve()
        return list(self._findings)

    # --- following values ---------------------------------------------------------------

    def _input_origins(self, input_ids: list[int]) -> list[_Origin]:
        # A tainted entry lives exactly as long as its tensor, so an id found here is that
        # tensor's (read at once on the CPU; on an accelerator a batch later, close enough).
        tainted = self._tainted
        return [tainted[i][1] for i in input_ids if i in tainted]

    def _taint(self, ref: weakref.ref[torch.Tensor], origin: _Origin) -> None:
        tensor = ref()
        if tensor is None:
            return
        key = id(tensor)
        tainted = self._tainted

        def forget(dead: weakref.ref[torch.Tensor]) -> None:
            entry = tainted.get(key)
            if entry is not None and entry[0] is dead:
                del tainted[key]

        tainted[key] = (weakref.ref(tensor, forget), origin)

    def _resolve(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        flat = [s for p in pending for s in p.sums]
        values = (
            torch.stack([s.to(flat[0].device) for s in flat]).tolist()
            if len(flat) > 1
            else [flat[0].item()]
        )
        at = 0
        for p in pending:
            self._judge_values(p, values[at : at + len(p.sums)])
            at += len(p.sums)

    def _judge_values(self, p: _Pending, values: list[float]) -> None:
        for ref, value in zip(p.outputs, values):
            if not math.isfinite(value):
                what = _nonfinite_kind(ref(), value)
                if what is not None:
                    self._judge(p, ref, what)

    def _judge(self, p: _Pending, ref: weakref.ref[torch.Tensor], what: str) -> None:
        input_origins = self._input_origins(p.input_ids)
        nan_inputs = [o for o in input_origins if o.what == "NaN"]
        real_inf = [o for o in input_origins if o.what == "Inf"]
        masks = [o for o in input_origins if o.what == "mask"]
        here = _Origin(what, p.event_name, p.location, p.module, p.source_line)
        if nan_inputs:
            self._taint(ref, nan_inputs[0])
            return
        if what == "NaN":
            origin = real_inf[0] if real_inf else here
            self._taint(
                ref, _Origin("NaN", origin.name, origin.location, origin.module, origin.source_line)
            )
            self._report_nan(p, origin, masks)
            return
        if real_inf:
            origin = real_inf[0]
        elif masks:
            origin = masks[0]
        else:
            origin = _Origin("mask" if p.explicit_infinity else "Inf", *_fields(here))
        self._taint(ref, origin)
        if _is_loss(p) or (_is_activation(p) and origin.what == "Inf"):
            self._report_inf(p, origin)

    def _report_nan(self, p: _Pending, origin: _Origin, masks: list[_Origin]) -> None:
        if self._nan_reported:
            return
        self._nan_reported = True
        if origin.what == "Inf":
            message = (
                f"NaN produced by {_short(p.event_name)} at {_place(p)} from an Inf that "
                f"{_short(origin.name)} made at {origin.where}: {origin.source_line!r}"
            )
            hint = _inf_hint(origin)
        elif masks:
            message = (
                f"NaN first produced by {_short(p.event_name)} at {_place(p)} from the -inf "
                f"mask made at {masks[0].where}: a row masked out entirely"
            )
            hint = "Leave at least one position unmasked per row (e.g. never mask the first token)."
        else:
            message = (
                f"NaN first produced by {_short(p.event_name)} at {_place(p)}: {p.source_line!r}"
            )
            hint = _nan_hint(p.short)
        self._findings.append(Finding("nonfinite", "error", message, hint, origin.where))

    def _report_inf(self, p: _Pending, origin: _Origin) -> None:
        if self._inf_reported:
            return
        self._inf_reported = True
        kind = "loss" if _is_loss(p) else "activation"
        made = "the -inf mask made by" if origin.what == "mask" else "an Inf made by"
        message = (
            f"Inf reached the {kind} {_short(p.event_name)} at {_place(p)} from {made} "
            f"{_short(origin.name)} at {origin.where}: {origin.source_line!r}"
        )
        self._findings.append(
            Finding("nonfinite", "error", message, _inf_hint(origin), origin.where)
        )


def _pending_for(event: OpEvent, short: str) -> _Pending:
    """An op's description without sums, for a finding about it."""
    return _Pending(
        [], [], [], event.name, short, event.location, event.module, event.source_line, False
    )


def _fields(origin: _Origin) -> tuple[str, str | None, str | None, str]:
    return origin.name, origin.location, origin.module, origin.source_line


def _place(p: _Pending) -> str:
    parts = [x for x in (p.location, p.module) if x]
    return " ".join(parts) if parts else "an unknown line"


def _short(name: str) -> str:
    return name.removeprefix("torch.nn.functional.").removeprefix("torch.")


def _is_loss(p: _Pending) -> bool:
    return p.short in _LOSS_NAMES or p.short.endswith("_loss")


def _is_activation(p: _Pending) -> bool:
    return p.short in _ACTIVATIONS


def _nan_hint(short: str) -> str:
    if short in ("log", "log2", "log10", "sqrt", "pow", "__pow__"):
        return f"{short} of a negative number is NaN: clamp its input (x.clamp_min(1e-8)) or fix the sign."
    if short in ("div", "__truediv__", "__rtruediv__", "true_divide"):
        return "0/0 is NaN: add a small epsilon to the denominator."
    return "Check this op's inputs; a lower learning rate or gradient clipping helps when values blow up."


def _inf_hint(origin: _Origin) -> str:
    if origin.what == "mask":
        return "Keep -inf masks away from the loss: mask before a softmax only."
    short = origin.name.rsplit(".", 1)[-1]
    if short in ("exp", "exp_", "pow", "__pow__"):
        return f"{short} overflowed: use a log-space formulation (log_softmax, logsumexp) or clamp its input."
    if short in ("log", "log_", "log2", "log10"):
        return "log(0) is -inf: clamp the input (x.clamp_min(1e-8)) or use log_softmax / BCEWithLogitsLoss."
    return "Division by zero or an overflow made an Inf: add an epsilon or rescale the values."


def _outputs(event: OpEvent) -> list[torch.Tensor]:
    result = event.result
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (list, tuple)):
        return [t for t in result if isinstance(t, torch.Tensor)]
    if result is None and event.args and isinstance(event.args[0], torch.Tensor):
        return [event.args[0]]  # an in-place op such as __setitem__
    return []


def _input_ids(event: OpEvent) -> list[int]:
    ids = []
    for value in (*event.args, *event.kwargs.values()):
        if isinstance(value, torch.Tensor):
            ids.append(id(value))
        elif isinstance(value, (list, tuple)):
            ids.extend(id(v) for v in value if isinstance(v, torch.Tensor))
    return ids


def _checkable(t: torch.Tensor) -> bool:
    return (
        t.is_floating_point()
        and not t.is_meta
        and not t.is_nested
        and t.layout == torch.strided
        and t.numel() > 0
    )


def _sum(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:
        t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.sum(dtype=torch.float32)
    return t.sum()


def _nonfinite_kind(tensor: torch.Tensor | None, total: float) -> str | None:
    """What a tensor whose sum was ``total`` holds: ``"NaN"``, ``"Inf"``, or None (all finite).

    A non-finite sum is only a hint: finite values near the float range's ends (masks made with
    ``torch.finfo(dtype).min``) overflow when added up, and ``inf - inf`` sums to NaN. The
    tensor itself decides; when it is gone already (read late on an accelerator), the sum does.
    """
    if tensor is None:
        return "NaN" if math.isnan(total) else "Inf"
    values = tensor.detach()
    if values.isnan().any():
        return "NaN"
    if values.isinf().any():
        return "Inf"
    return None


def _has_explicit_infinity(event: OpEvent) -> bool:
    """An infinite number passed to the op: a mask made on purpose."""
    for value in (*event.args, *event.kwargs.values()):
        if isinstance(value, float) and math.isinf(value):
            return True
        if _is_infinite_scalar(value):
            return True
    return False


def _is_infinite_scalar(value: object) -> bool:
    """A 0-d CPU float tensor holding an infinity (reading it costs no device sync)."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and value.is_floating_point()
        and value.device.type == "cpu"
        and math.isinf(value.item())
    )

"""Root causes after an ``overfit_batch`` run: why the loss would not go to zero on one batch.

The training loop records the losses and gradient norms; these functions read them together
with the curve's verdict (``_verdict``) and, where the numbers alone cannot tell, probe the
model again: the failing step replayed under ``shapecheck`` for a NaN, the loss at fixed
weights for an oscillation, the ReLUs after training for a plateau. Each cause defers to the
findings made before it, so that a cause the pre-flight checks already named is not guessed
at again.

Examples
--------
>>> new = diagnose(record, read_curve(record.losses), optimizer, known=preflight_findings)
>>> [f.kind for f in new]
['learning_rate']
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nbtrouble._loss_checks import LossSpread, loss_spread
from nbtrouble._verdict import ADVICE, CurveReading, jumped_early, spiked_early, swing_of
from nbtrouble._watches import DeadUnitWatch, hooked
from nbtrouble.findings import Finding, alarms

# Gradient norms that grow by this factor over the run have exploded.
_GRADIENT_GROWTH = 100.0
# A still-falling loss that would converge within this many times the steps run is slow, not stuck.
_PATIENCE = 10
# Swings the loss shows at fixed weights, as a share of its swings during the run, that explain
# the oscillation without the learning rate.
_EXPLAINED_SWING = 0.5


@dataclass
class RunRecord:
    """What a finished run leaves for its diagnosis.

    Attributes
    ----------
    forward, replay
        The batch through the model, and the batch's loss, at the model's current weights.
    loss_kind
        ``"cross_entropy"``, ``"mse"``, ... or ``None`` for a loss torch does not ship.
    blowup
        The first module that blew its input up in the first pass (see ``CallWatch``).
    """

    model: nn.Module
    forward: Callable[[], Any]
    replay: Callable[[], Any]
    loss_kind: str | None
    losses: list[float]
    grad_norms: list[float]
    blowup: tuple[str, str, float, float] | None


def diagnose(
    run: RunRecord,
    reading: CurveReading,
    optimizer: torch.optim.Optimizer,
    known: list[Finding],
) -> list[Finding]:
    """The findings the curve calls for, beyond ``known`` (pre-flight and the loop's own)."""
    seen = list(known)
    # In this order: each cause defers to the ones found before it.
    seen += _gradient_growth(run.grad_norms, reading)
    seen += _forward_blowup(run.blowup, reading, seen)
    seen += _root_cause(run, reading, optimizer, seen)
    return seen[len(known) :]


def weight_decay(optimizer: torch.optim.Optimizer) -> float:
    """The largest weight decay of the optimizer's parameter groups."""
    return max(float(g.get("weight_decay", 0.0) or 0.0) for g in optimizer.param_groups)


# -- a NaN or Inf during the run ---------------------------------------------------------


def nonfinite_cause(
    model: nn.Module, replay: Callable[[], Any], step: int, loss: float, known: list[Finding]
) -> list[Finding]:
    """Name the first op / module that made a NaN or Inf, replaying this step's forward."""
    bad_params = [n for n, p in model.named_parameters() if not bool(p.isfinite().all())]
    if bad_params:
        return [
            Finding(
                "nonfinite",
                "error",
                f"parameters became non-finite before step {step}: {', '.join(bad_params[:4])}",
                ADVICE["explodes"],
                where=bad_params[0].rpartition(".")[0] or None,
            )
        ]
    if math.isfinite(loss):
        return [_nonfinite_gradient(model, step, loss)]
    if any(f.kind == "nonfinite" for f in known):
        return []  # the batch itself holds the NaN / Inf: that finding is the cause
    traced = [f for f in _traced(replay).findings if f.kind == "nonfinite"]
    if traced:
        first = traced[0]
        hint = first.hint or ADVICE["explodes"]
        return [
            Finding("nonfinite", "error", f"at step {step}: {first.message}", hint, first.where)
        ]
    module = _first_nonfinite_module(model, replay)
    produced = f", first produced by module '{module}'" if module else ""
    return [
        Finding(
            "nonfinite",
            "error",
            f"the loss became {loss} at step {step}{produced}",
            ADVICE["explodes"],
            where=module,
        )
    ]


def _nonfinite_gradient(model: nn.Module, step: int, loss: float) -> Finding:
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not bool(p.grad.isfinite().all())
    ]
    return Finding(
        "nonfinite",
        "error",
        f"at step {step} the loss was finite ({loss:.4g}) but the gradient of "
        f"{', '.join(bad[:4]) or 'some parameters'} was NaN / Inf",
        "Look for an op with an unbounded derivative at these values (sqrt or log at 0, "
        "division by a small number) or lower the learning rate.",
        where=(bad[0].rpartition(".")[0] or None) if bad else None,
    )


def trace_failure(replay: Callable[[], Any]) -> Finding | None:
    """The tracer's explanation of why ``replay`` fails: the op, its operands, the line."""
    failure = _traced(replay).failure
    return failure.finding if failure is not None else None


def _traced(replay: Callable[[], Any]) -> Any:
    """The ``shapecheck`` trace of one replay, without gradients.

    The replay repeats a failure or a NaN on purpose, for the trace to explain it: an error
    it raises again tells nothing new, so it ends the replay and the trace keeps what it saw.
    """
    from nbtrouble.shapes import shapecheck

    checker = shapecheck()
    with contextlib.suppress(Exception), torch.no_grad(), checker:
        replay()
    return checker.trace


def _first_nonfinite_module(model: nn.Module, replay: Callable[[], Any]) -> str | None:
    """The first module (in the order modules finish) whose output holds a NaN / Inf."""
    found: list[str] = []

    def watch(path: str) -> Callable[..., None]:
        def check(module: nn.Module, args: Any, output: Any) -> None:
            is_float = isinstance(output, torch.Tensor) and output.is_floating_point()
            if not found and is_float and not bool(output.isfinite().all()):
                found.append(path or type(model).__name__)

        return check

    hooks = (m.register_forward_hook(watch(p)) for p, m in model.named_modules())
    # The replay only serves the diagnosis; an error in it changes nothing found so far.
    with hooked(hooks), contextlib.suppress(Exception), torch.no_grad():
        replay()
    return found[0] if found else None


# -- growth: gradients and activations -----------------------------------------------------


def _gradient_growth(grad_norms: list[float], reading: CurveReading) -> list[Finding]:
    norms = [n for n in grad_norms if math.isfinite(n)]
    if len(norms) < 2 or norms[0] <= 0:
        return []
    peak = max(range(len(norms)), key=norms.__getitem__)
    growth = norms[peak] / norms[0]
    if growth < _GRADIENT_GROWTH:
        return []
    # Growth that did not stop the loss converging (a likelihood sharpening its variance),
    # or that follows from maximizing the loss, is a symptom, not the cause.
    harmless = reading.verdict == "converged"
    symptom = harmless or reading.negative_unbounded or reading.sign_flipped
    note = "; the loss converged all the same" if harmless else ""
    return [
        Finding(
            "exploding_gradient",
            "info" if symptom else "warning",
            f"the gradient norm grew from {norms[0]:.3g} at step 0 to {norms[peak]:.3g} at "
            f"step {peak} ({growth:.3g}x){note}",
            "Lower the learning rate, clip gradients (torch.nn.utils.clip_grad_norm_), and "
            "check normalization and initialization.",
        )
    ]


def _forward_blowup(
    blowup: tuple[str, str, float, float] | None, reading: CurveReading, seen: list[Finding]
) -> list[Finding]:
    """When the run blew up: a module that already blew its input up before any step."""
    growth = [f for f in seen if f.kind == "exploding_gradient" and f.is_alarm]
    if blowup is None or (reading.verdict != "explodes" and not growth):
        return []
    path, module, size_in, size_out = blowup
    return [
        Finding(
            "exploding_gradient",
            "warning",
            f"the forward pass blows up before any training: {module} '{path}' turns inputs "
            f"of RMS {size_in:.3g} into outputs of RMS {size_out:.3g}",
            "Check that layer's initialization (a recurrent weight with spectral radius above "
            "1, a wrong init scale), add normalization, or use gated units (LSTM / GRU).",
            where=path or None,
        )
    ]


# -- the root cause, by verdict --------------------------------------------------------------


def _root_cause(
    run: RunRecord, reading: CurveReading, optimizer: torch.optim.Optimizer, seen: list[Finding]
) -> list[Finding]:
    if reading.verdict == "converged":
        return []
    lr_text = _lr_text(optimizer)
    if reading.verdict == "goes_up":
        return _rise_cause(run, reading, lr_text, seen)
    if reading.verdict == "explodes":
        if any(f.kind in ("nonfinite", "exploding_gradient") for f in seen):
            return []
        return [
            Finding(
                "learning_rate",
                "error",
                f"the loss {reading.summary}: {lr_text} is too high for this model",
                ADVICE["explodes"],
            )
        ]
    if reading.verdict == "oscillates":
        return _oscillation_cause(run, reading, lr_text)
    return _plateau_cause(run, reading, optimizer, lr_text, seen)


def _rise_cause(
    run: RunRecord, reading: CurveReading, lr_text: str, seen: list[Finding]
) -> list[Finding]:
    """A flipped sign, and a learning rate too high when the loss jumped up at once."""
    # The pre-flight sign check already says why, with its numbers.
    sign_known = any(f.kind == "loss_increases" for f in seen)
    found = [] if sign_known else [_loss_increases(reading, run.loss_kind)]
    steady = not (reading.negative_unbounded or reading.sign_flipped)
    if steady and jumped_early(run.losses):
        found.append(
            Finding(
                "learning_rate",
                "warning",
                f"the loss jumped up within the first steps and stayed there: "
                f"{lr_text} may be too high",
                "Lower the learning rate by 10x and run again.",
            )
        )
    return found


def _oscillation_cause(run: RunRecord, reading: CurveReading, lr_text: str) -> list[Finding]:
    """The learning rate, unless the loss swings as much at fixed weights (then the data)."""
    too_high = Finding(
        "learning_rate",
        "warning",
        f"the loss {reading.summary}: {lr_text} is likely too high",
        ADVICE["oscillates"],
    )
    spread = _spread_at_fixed_weights(run)
    if spread is None or swing_of(spread.train) < _EXPLAINED_SWING * reading.swing:
        return [too_high]
    return [
        _changing_batch(spread),
        Finding(
            "learning_rate",
            "info",
            f"the loss {reading.summary}: lowering {lr_text} will not remove swings the "
            "loss shows at fixed weights",
            "Fix the batch first, then judge the learning rate.",
        ),
    ]


def _spread_at_fixed_weights(run: RunRecord) -> LossSpread | None:
    try:
        return loss_spread(run.model, run.replay)
    except (RuntimeError, ValueError, TypeError, IndexError):  # the probe tells nothing then
        return None


def _plateau_cause(
    run: RunRecord,
    reading: CurveReading,
    optimizer: torch.optim.Optimizer,
    lr_text: str,
    seen: list[Finding],
) -> list[Finding]:
    if alarms([f for f in seen if f.kind != "exploding_gradient"]):
        return []  # a pre-flight alarm already names the likely cause
    found = _spike_cause(run.losses, lr_text) + _dead_after_training(run)
    if found:
        return found
    ran = len(run.losses)
    more = reading.steps_to_converge
    if reading.still_falling and more is not None and ran + more <= _PATIENCE * ran:
        return [_not_yet(reading, ran, more, lr_text)]
    decay = weight_decay(optimizer)
    extra = f"; weight decay {decay:g} pulls the weights back" if decay else ""
    return [
        Finding(
            "learning_rate",
            "warning",
            f"the loss {reading.summary}: {lr_text} is likely too low{extra}",
            ADVICE["plateaus"],
        )
    ]


def _spike_cause(losses: list[float], lr_text: str) -> list[Finding]:
    """A jump early on, then no progress: a first step too large wrecked the weights."""
    spike = spiked_early(losses)
    if spike is None:
        return []
    step, peak = spike
    return [
        Finding(
            "learning_rate",
            "warning",
            f"the loss jumped from {losses[0]:.4g} to {peak:.4g} at step {step}, then "
            f"stalled at {losses[-1]:.4g}: {lr_text} is likely too high",
            "Lower the learning rate by 10x and run again.",
        )
    ]


def _dead_after_training(run: RunRecord) -> list[Finding]:
    watch = DeadUnitWatch(run.model)
    with torch.no_grad(), watch.watching():
        run.forward()
    return [
        Finding(f.kind, f.severity, f"after training: {f.message}", f.hint, f.where)
        for f in watch.findings()
    ]


def _lr_text(optimizer: torch.optim.Optimizer) -> str:
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    return "the learning rate " + ", ".join(f"{x:g}" for x in lrs)


def _changing_batch(spread: LossSpread) -> Finding:
    """The batch's loss varies without any update: the data changes between steps."""
    low, high = min(spread.train), max(spread.train)
    if not spread.eval:
        in_eval = ""
    elif max(spread.eval) > min(spread.eval):
        in_eval = (
            f"; in eval mode too ({min(spread.eval):.4g} to {max(spread.eval):.4g}): the "
            "randomness does not depend on model.training (the loss, or the data it is given)"
        )
    else:
        in_eval = (
            f"; in eval mode it is {spread.eval[0]:.4g} every time: the randomness runs only "
            "in training mode (an augmentation inside forward)"
        )
    ops = f"; random ops in the forward pass and loss: {', '.join(spread.random_ops)}"
    return Finding(
        "label_noise",
        "warning",
        f"at fixed weights, with dropout off, the loss of this same batch varied from {low:.4g} "
        f"to {high:.4g} over {len(spread.train)} evaluations{in_eval}"
        f"{ops if spread.random_ops else ''}. The inputs or targets change between steps "
        "(augmentation, mixup, noise) without the labels following: the swings come from the "
        "data, not the learning rate",
        "Overfit the batch with augmentation off. If mixup or a similar augmentation stays, mix "
        "the labels with the same weights as the inputs (lam * loss(y_a) + (1 - lam) * "
        "loss(y_b)).",
    )


def _not_yet(reading: CurveReading, ran: int, more: int, lr_text: str) -> Finding:
    """A loss still falling steadily: slow, not broken."""
    return Finding(
        "learning_rate",
        "info",
        f"the loss {reading.summary}: at the pace of its last {ran // 4} steps ({lr_text}) it "
        f"would converge in about {more} more steps",
        f"Nothing points to a bug yet: run again with steps={_round_up(ran + more)}, or raise "
        "the learning rate (3x) to get there sooner.",
    )


def _round_up(steps: int) -> int:
    """A step count people would type: 2 significant digits, rounded up."""
    scale = 10 ** max(0, len(str(steps)) - 2)
    return -(-steps // scale) * scale


def _loss_increases(reading: CurveReading, kind: str | None) -> Finding:
    if reading.negative_unbounded:
        message = (
            f"the loss {reading.summary}: a {kind or 'loss'} that keeps falling below zero "
            "without bound is being maximized, not minimized"
        )
    else:
        message = f"the loss {reading.summary} while overfitting one batch"
    return Finding(
        "loss_increases",
        "error",
        message,
        "Look for a flipped sign: minimizing -loss, a reward used as a loss, gradient ascent "
        "(maximize=True), or a sign error in a hand-written loss.",
    )

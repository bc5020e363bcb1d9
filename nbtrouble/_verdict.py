"""Read a loss curve from overfitting one batch: converged, goes up, explodes, oscillates, plateaus.

The classifier compares robust levels (medians over windows) rather than single steps, and
measures oscillation on the curve minus its running median, so that the wiggles dropout or
a noisy loss adds are not mistaken for an unstable learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

VERDICTS = ("converged", "goes_up", "explodes", "oscillates", "plateaus")

# "Arbitrarily close to zero": the loss fell to this fraction of its first value.
CONVERGED_FRACTION = 0.05
# A loss that ends this many times above where it started went up for real, not by noise.
GOES_UP_FACTOR = 1.2
# Growth by orders of magnitude is an explosion rather than a steady climb.
EXPLODES_FACTOR = 100.0
# Swings around the running median by this factor (p90 / p10), with frequent reversals.
OSCILLATION_FACTOR = 2.0
OSCILLATION_REVERSALS = 0.25

ADVICE = {
    "converged": "The model can memorise this batch: train on the full data set next.",
    "goes_up": "Look for a flipped sign in the loss function or the gradient.",
    "explodes": "Check numerical issues (log of 0, division, exp overflow) or lower the "
    "learning rate.",
    "oscillates": "Lower the learning rate; check for shuffled labels or data augmentation "
    "that changes the batch between steps.",
    "plateaus": "Raise the learning rate, remove regularization (weight decay, dropout), and "
    "inspect the loss function and the data pipeline.",
}


@dataclass(frozen=True)
class CurveReading:
    """What the curve says, with the numbers that led there."""

    verdict: str
    summary: str  # one sentence with the numbers, e.g. "fell from 2.31 to 0.004 (0.2%)"
    negative_unbounded: bool = False  # a non-negative loss falling below zero
    still_falling: bool = False  # settled? no: still going down at the end


def read_curve(
    losses: list[float], *, nonnegative: bool | None = None, nonfinite_at: int | None = None
) -> CurveReading:
    """Classify a loss curve.

    Parameters
    ----------
    losses
        The loss at every step that ran.
    nonnegative
        ``True`` for losses that cannot be negative when correct (cross-entropy, MSE, ...),
        ``None`` when unknown.
    nonfinite_at
        The step at which a NaN / Inf appeared (in the loss or the gradients), if any.

    Examples
    --------
    >>> read_curve([2.3, 1.0, 0.3, 0.05, 0.01]).verdict
    'converged'
    """
    if not losses:
        raise ValueError("read_curve needs at least one loss value")
    values = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size or nonfinite_at is not None:
        step = int(bad[0]) if bad.size else int(nonfinite_at)  # type: ignore[arg-type]
        return CurveReading("explodes", f"became non-finite at step {step}")
    window = max(1, min(len(values) // 10, 50))
    first = float(values[0])
    head = float(np.median(values[:window]))
    tail = float(np.median(values[-window:]))
    summary = f"went from {first:.4g} to {tail:.4g} in {len(values)} steps"
    return (
        _negative_unbounded(values, first, tail, nonnegative, summary)
        or _explodes(values, head, summary)
        or _converged(first, tail, summary)
        or _goes_up(first, head, tail, summary)
        or _oscillates(values, summary)
        or CurveReading("plateaus", summary, still_falling=_still_falling(values, window))
    )


def _negative_unbounded(
    values: np.ndarray, first: float, tail: float, nonnegative: bool | None, summary: str
) -> CurveReading | None:
    scale = abs(first) or 1.0
    if nonnegative and tail < -CONVERGED_FRACTION * scale:
        return CurveReading("goes_up", f"{summary}: below zero", negative_unbounded=True)
    # A loss of unknown kind: only a fall to many times its starting size, still going
    # at the end, counts (a likelihood may legitimately go somewhat negative).
    bound = -10 * scale if first > 0 else -100 * scale
    window = max(2, len(values) // 10)
    still_going = float(np.median(values[-window:])) < float(
        np.median(values[-2 * window : -window])
    )
    if nonnegative is None and tail < bound and still_going:
        return CurveReading("goes_up", f"{summary}: below zero", negative_unbounded=True)
    return None


def _explodes(values: np.ndarray, head: float, summary: str) -> CurveReading | None:
    scale = abs(head) or 1.0
    if float(np.max(values)) > EXPLODES_FACTOR * scale and head > 0 and not _climbs(values):
        peak = int(np.argmax(values))
        return CurveReading("explodes", f"{summary}, peaking at {values[peak]:.4g} (step {peak})")
    return None


def _climbs(values: np.ndarray) -> bool:
    """A steady climb (most steps go up), as when minimizing the negative of a loss."""
    steps = np.diff(values)
    moving = steps[steps != 0]
    return len(moving) >= 3 and float(np.mean(moving > 0)) >= 0.8


def jumped_early(values: list[float]) -> bool:
    """Most of the rise happened in the first tenth of the run (a too-high lr, not a sign)."""
    curve = np.asarray(values, dtype=np.float64)
    early = curve[: max(2, len(curve) // 10)]
    rise = curve[-1] - curve[0]
    return rise > 0 and float(np.max(early)) - curve[0] >= 0.8 * rise


def _converged(first: float, tail: float, summary: str) -> CurveReading | None:
    if first <= 0:
        return CurveReading("converged", summary) if abs(tail) <= 1e-7 else None
    if tail <= CONVERGED_FRACTION * first:
        return CurveReading("converged", f"{summary} ({100 * tail / first:.2g}% of the start)")
    return None


def _goes_up(first: float, head: float, tail: float, summary: str) -> CurveReading | None:
    start = min(first, head)
    if start > 0 and tail > GOES_UP_FACTOR * start:
        return CurveReading("goes_up", f"{summary}: up {tail / start:.3g}x")
    return None


def _oscillates(values: np.ndarray, summary: str) -> CurveReading | None:
    half = values[len(values) // 2 :]
    if len(half) < 8:
        return None
    if np.all(half > 0):
        curve = np.log(half)
        floor = math.log(OSCILLATION_FACTOR)
    else:  # a loss that may be negative: swings relative to its own size
        curve = half / (np.max(np.abs(half)) or 1.0)
        floor = 1 - 1 / OSCILLATION_FACTOR
    trend = _running_median(curve, max(5, len(curve) // 8))
    resid = curve - trend
    spread = float(np.percentile(resid, 90) - np.percentile(resid, 10))
    steps = np.sign(np.diff(curve))
    reversals = float(np.mean(steps[1:] * steps[:-1] < 0)) if len(steps) > 1 else 0.0
    if spread >= floor and reversals >= OSCILLATION_REVERSALS:
        lo, hi = np.percentile(half, [10, 90])
        return CurveReading("oscillates", f"{summary}, swinging between {lo:.4g} and {hi:.4g}")
    return None


def _still_falling(values: np.ndarray, window: int) -> bool:
    """Fell by more than a tenth over the last quarter of the run."""
    quarter = len(values) // 4
    if quarter < window or quarter < 2:
        return False
    last = float(np.median(values[-window:]))
    before = float(np.median(values[-quarter - window : -quarter]))
    return last < 0.9 * before


def _running_median(curve: np.ndarray, width: int) -> np.ndarray:
    pad = width // 2
    padded = np.pad(curve, pad, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * pad + 1)
    return np.median(windows, axis=-1)

"""Read a loss curve from overfitting one batch: converged, goes up, explodes, oscillates, plateaus.

The classifier compares robust levels (medians over windows) rather than single steps, and
measures oscillation on the curve minus its running median, so that the wiggles dropout or
a noisy loss adds are not mistaken for an unstable learning rate.
"""

from __future__ import annotations

import itertools
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
# A steady rise, however small: the loss's rank correlation with the step is at least this,
# every quarter of the run sits higher than the one before, and the rise stands this many
# standard errors above the step-to-step noise.
RISE_CORRELATION = 0.6
RISE_STANDARD_ERRORS = 4.0
# Rises smaller than this share of the loss are rounding, not a trend.
RISE_RESOLUTION = 1e-4

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
    # While still falling: about how many more steps, at the last quarter's pace, until converged.
    steps_to_converge: int | None = None
    sign_flipped: bool = False  # the loss is lower for worse predictions, and it fell
    # How far the loss swings around its running median (p90 - p10 of the log residuals).
    swing: float = 0.0


def read_curve(
    losses: list[float],
    *,
    nonnegative: bool | None = None,
    nonfinite_at: int | None = None,
    floor: float = 0.0,
    floor_why: str = "",
    sign_flipped: bool = False,
    pulled_back: bool = False,
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
    floor
        The lowest value the loss can take on this batch (above zero with label smoothing or
        soft targets): "close to zero" is then judged on the distance to the floor.
    floor_why
        What sets the floor (e.g. ``"label smoothing 0.1"``), for the summary.
    sign_flipped
        ``True`` when the loss was shown to be lower for worse predictions: every fall of such
        a loss is a rise of the error.
    pulled_back
        ``True`` when weight decay pulls the weights towards zero, which by itself makes the
        loss rise slowly: only a rise by ``GOES_UP_FACTOR`` then counts as going up.

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
    # The level reached is a median (one lucky step is no convergence); say so, since the
    # progress bar beside the verdict shows the last step's loss.
    level = f" (median of the last {window} steps)" if window > 1 else ""
    summary = f"went from {first:.4g} to {tail:.4g}{level} in {len(values)} steps"
    floored = _with_floor(summary, floor, floor_why)
    return (
        (_error_rises(head, tail, summary) if sign_flipped else None)
        or _negative_unbounded(values, first, tail, nonnegative, summary)
        or _explodes(values, head, summary)
        or _converged(first - floor, tail - floor, floored, floor > 0)
        or _goes_up(first, head, tail, summary)
        or (None if pulled_back else _rises_steadily(values, summary))
        or _oscillates(values, summary)
        or _plateaus(values - floor, window, floored)
    )


def _error_rises(head: float, tail: float, summary: str) -> CurveReading | None:
    """A loss that is lower for worse predictions and fell: the error went up."""
    if tail < head - RISE_RESOLUTION * max(abs(head), 1e-12):
        return CurveReading(
            "goes_up",
            f"{summary}: it fell, and this loss falls as predictions get worse",
            sign_flipped=True,
        )
    return None


def _with_floor(summary: str, floor: float, why: str) -> str:
    if floor <= 0:
        return summary
    return f"{summary} (with {why or 'these targets'} it cannot go below {floor:.4g})"


def _negative_unbounded(
    values: np.ndarray, first: float, tail: float, nonnegative: bool | None, summary: str
) -> CurveReading | None:
    scale = abs(first) or 1.0
    if nonnegative and tail < -CONVERGED_FRACTION * scale:
        return CurveReading("goes_up", f"{summary}: below zero", negative_unbounded=True)
    # A loss of unknown kind: only a fall to many times its starting size (and at least 10),
    # still going at the end, counts: a likelihood with a learned variance legitimately
    # settles a few units below zero, however small it started.
    bound = -10 * max(scale, 1.0) if first > 0 else -100 * scale
    window = max(2, len(values) // 10)
    if nonnegative is not None or tail >= bound or len(values) < 2 * window:
        return None
    recent = float(np.median(values[-window:]))
    earlier = float(np.median(values[-2 * window : -window]))
    # A likelihood that settles below zero is fine; a maximized loss keeps falling.
    if recent < earlier - 0.05 * abs(earlier):
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


def spiked_early(values: list[float]) -> tuple[int, float] | None:
    """The step and value of a jump to over twice the first loss early in the run, if any."""
    curve = np.asarray(values, dtype=np.float64)
    early = curve[: max(3, len(curve) // 10)]
    peak = int(np.argmax(early))
    if curve[0] > 0 and early[peak] > 2 * curve[0]:
        return peak, float(early[peak])
    return None


def _converged(
    first: float, tail: float, summary: str, floored: bool = False
) -> CurveReading | None:
    """``first`` and ``tail`` are measured from the loss's floor (``floored``: one above zero)."""
    if first <= 0:
        return CurveReading("converged", summary) if abs(tail) <= 1e-7 else None
    if tail <= CONVERGED_FRACTION * first:
        of = "of the way down to it left" if floored else "of the start"
        return CurveReading("converged", f"{summary}, {100 * max(tail, 0) / first:.2g}% {of}")
    return None


def _goes_up(first: float, head: float, tail: float, summary: str) -> CurveReading | None:
    start = min(first, head)
    if start > 0 and tail > GOES_UP_FACTOR * start:
        return CurveReading("goes_up", f"{summary}: up {tail / start:.3g}x")
    return None


def _rises_steadily(values: np.ndarray, summary: str) -> CurveReading | None:
    """A consistent rise over the whole run, however small, that noise does not explain.

    Three tests must agree: the rank correlation of the loss with the step (a trend over the
    whole curve, not a few points), quarter medians that each sit above the one before (the
    rise lasts the whole run), and a rise well above the standard error of those medians
    given the step-to-step noise (wiggles from dropout or a noisy loss are not a trend).
    """
    quarter = len(values) // 4
    if quarter < 5:
        return None
    medians = [float(np.median(values[i * quarter : (i + 1) * quarter])) for i in range(4)]
    rise = medians[-1] - medians[0]
    if any(b <= a for a, b in itertools.pairwise(medians)):
        return None
    if rise <= RISE_RESOLUTION * max(abs(medians[0]), 1e-12):
        return None
    # Noise: the spread of the curve around its running median, as a standard deviation.
    resid = values - _running_median(values, max(5, min(quarter // 4, 50)))
    noise = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    # The median of n noisy points has a standard error of about 1.25 sigma / sqrt(n).
    standard_error = 1.25 * noise * math.sqrt(2 / quarter)
    correlation = _rank_correlation(values)
    if correlation < RISE_CORRELATION or rise < RISE_STANDARD_ERRORS * standard_error:
        return None
    return CurveReading(
        "goes_up",
        f"{summary}: rising steadily, every quarter of the run higher than the one before "
        f"({' < '.join(f'{m:.4g}' for m in medians)}; rank correlation with the step "
        f"{correlation:.2f})",
    )


def _rank_correlation(values: np.ndarray) -> float:
    """Spearman's correlation of the values with their step (tied values share their rank)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values))
    _, tie, count = np.unique(values, return_inverse=True, return_counts=True)
    ranks = (np.bincount(tie, weights=ranks) / count)[tie]
    if float(np.std(ranks)) == 0:
        return 0.0
    return float(np.corrcoef(ranks, np.arange(len(values)))[0, 1])


def _oscillates(values: np.ndarray, summary: str) -> CurveReading | None:
    half = values[len(values) // 2 :]
    if len(half) < 8:
        return None
    curve, floor = _swing_scale(half)
    trend = _running_median(curve, max(5, len(curve) // 8))
    resid = curve - trend
    spread = float(np.percentile(resid, 90) - np.percentile(resid, 10))
    steps = np.sign(np.diff(curve))
    reversals = float(np.mean(steps[1:] * steps[:-1] < 0)) if len(steps) > 1 else 0.0
    if spread >= floor and reversals >= OSCILLATION_REVERSALS:
        lo, hi = np.percentile(half, [10, 90])
        return CurveReading(
            "oscillates", f"{summary}, swinging between {lo:.4g} and {hi:.4g}", swing=spread
        )
    return None


def _swing_scale(values: np.ndarray) -> tuple[np.ndarray, float]:
    """The values on the scale swings are measured on, and the swing that counts as oscillation."""
    if np.all(values > 0):
        return np.log(values), math.log(OSCILLATION_FACTOR)
    # A loss that may be negative: swings relative to its own size.
    return values / (np.max(np.abs(values)) or 1.0), 1 - 1 / OSCILLATION_FACTOR


def swing_of(samples: list[float]) -> float:
    """How far repeated loss values spread (p90 - p10), on the scale of ``CurveReading.swing``."""
    values = np.asarray(samples, dtype=np.float64)
    if len(values) < 2 or not np.all(np.isfinite(values)):
        return 0.0
    scaled, _ = _swing_scale(values)
    return float(np.percentile(scaled, 90) - np.percentile(scaled, 10))


def _plateaus(excess: np.ndarray, window: int, summary: str) -> CurveReading:
    """``excess``: the loss above its floor. Still falling? Then when would it converge?"""
    quarter = len(excess) // 4
    if quarter < window or quarter < 2:
        return CurveReading("plateaus", summary)
    last = float(np.median(excess[-window:]))
    before = float(np.median(excess[-quarter - window : -quarter]))
    if not 0 < last < 0.9 * before:
        return CurveReading("plateaus", summary)
    # The last quarter's pace on a log scale, extended until the excess is a few percent of the start.
    pace = (math.log(last) - math.log(before)) / quarter
    goal = CONVERGED_FRACTION * float(excess[0])
    more = math.ceil((math.log(goal) - math.log(last)) / pace) if 0 < goal < last else 0
    return CurveReading(
        "plateaus",
        f"{summary}, still falling at the end",
        still_falling=True,
        steps_to_converge=more,
    )


def _running_median(curve: np.ndarray, width: int) -> np.ndarray:
    pad = width // 2
    padded = np.pad(curve, pad, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * pad + 1)
    return np.median(windows, axis=-1)

"""Learning curves: train and validation error against the training-set size.

The verdict follows the lecture's reading of the curves: more data helps while the
validation error is still falling at the largest size and the gap to the train error is
the larger part of the reducible error; when the curves have flattened close together,
the model underfits and more data will not help.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nbtrouble._error_analysis import BadInput, BadInputType, as_error, is_number

# Validation error counts as still falling when one doubling of the data lowers it by more
# than this fraction of its value (read from a line through the last three sizes).
FALLING_PER_DOUBLING = 0.01


@dataclass(frozen=True)
class LearningCurve:
    """Errors at several training-set sizes and what they say about more data.

    Attributes
    ----------
    sizes, train, val
        Training-set sizes, ascending, and the errors measured at each.
    irreducible
        The error floor drawn as a line (0 when not given).
    more_data_helps
        Whether more data of the same kind looks likely to help.
    verdict
        One or two sentences that say why.
    val_drop_per_doubling
        How much the validation error fell per doubling of the data at the largest sizes.
    """

    sizes: list[float]
    train: list[float]
    val: list[float]
    irreducible: float
    more_data_helps: bool
    verdict: str
    val_drop_per_doubling: float
    metric: str = "error"

    def plot(self, ax: Any = None) -> Any:
        """Draw the curves on ``ax`` (a new ``Figure`` when ``None``); returns the figure."""
        from nbtrouble._biasvar_view import plot_learning_curve

        return plot_learning_curve(self, ax)

    def __repr__(self) -> str:
        from nbtrouble._biasvar_view import learning_curve_text

        return learning_curve_text(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def _repr_html_(self) -> str:
        from nbtrouble._biasvar_view import learning_curve_html

        return learning_curve_html(self)


def learning_curve(
    sizes: Sequence[float],
    train: Sequence[Any] | None = None,
    val: Sequence[Any] | None = None,
    *,
    fit: Callable[[int], tuple[float, float]] | None = None,
    irreducible: Any = None,
    metric: str = "error",
) -> LearningCurve:
    """Train and validation error against training-set size, with a verdict on more data.

    Parameters
    ----------
    sizes
        Training-set sizes (at least two).
    train, val
        The errors measured at each size, or ``None`` when ``fit`` measures them.
    fit
        ``fit(size) -> (train_error, val_error)``: trains a fresh model on ``size`` examples
        and returns its errors; called once per size, smallest first.
    irreducible
        Human-level or best known error, drawn as a line.
    metric
        The name of the metric, for the axis label.

    Examples
    --------
    >>> lc = learning_curve([1000, 2000, 4000], train=[0.01, 0.02, 0.03], val=[0.30, 0.22, 0.16])
    >>> lc.more_data_helps
    True
    """
    sizes_checked = _sizes(sizes)
    if fit is not None:
        if train is not None or val is not None:
            raise BadInput("fit", "give either fit or the measured train and val errors, not both")
        if not callable(fit):
            raise BadInputType(
                "fit",
                "expected a function fit(size) -> (train_error, val_error), "
                f"got {type(fit).__name__}",
            )
        train, val = _run(fit, sizes_checked)
    train_checked = _errors(train, "train", len(sizes_checked))
    val_checked = _errors(val, "val", len(sizes_checked))
    floor = 0.0 if irreducible is None else as_error(irreducible, "irreducible")
    order = np.argsort(sizes_checked, kind="stable")
    return _judge(
        [sizes_checked[i] for i in order],
        [train_checked[i] for i in order],
        [val_checked[i] for i in order],
        floor,
        metric,
    )


def _sizes(sizes: Any) -> list[float]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence | np.ndarray):
        raise BadInputType(
            "sizes", f"expected a sequence of training-set sizes, got {type(sizes).__name__}"
        )
    checked = [as_error(s, "sizes") for s in sizes]
    if len(checked) < 2:
        raise BadInput(
            "sizes", f"a learning curve needs at least two training-set sizes, got {len(checked)}"
        )
    if any(s <= 0 for s in checked):
        raise BadInput("sizes", "training-set sizes must be positive")
    if len(set(checked)) != len(checked):
        raise BadInput("sizes", "training-set sizes must differ from each other")
    return checked


def _errors(values: Any, name: str, count: int) -> list[float]:
    if values is None:
        raise BadInput(name, f"missing: pass the {name} error at each size, or fit=")
    if (
        is_number(values)
        or isinstance(values, (str, bytes))
        or not isinstance(values, Sequence | np.ndarray)
    ):
        raise BadInputType(name, f"expected one error per size, got {type(values).__name__}")
    checked = [as_error(v, name) for v in values]
    if len(checked) != count:
        raise BadInput(name, f"{len(checked)} errors for {count} sizes")
    return checked


def _run(
    fit: Callable[[int], tuple[float, float]], sizes: list[float]
) -> tuple[list[Any], list[Any]]:
    train, val = [], []
    for size in sorted(sizes):
        result = fit(int(size))
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise BadInputType(
                "fit", f"fit({int(size)}) must return (train_error, val_error), got {result!r:.60}"
            )
        train.append(result[0])
        val.append(result[1])
    # Put the errors back in the caller's order of sizes; sorted again by the caller.
    position = {size: i for i, size in enumerate(sorted(sizes))}
    return [train[position[s]] for s in sizes], [val[position[s]] for s in sizes]


def _judge(
    sizes: list[float], train: list[float], val: list[float], floor: float, metric: str
) -> LearningCurve:
    drop = _drop_per_doubling(sizes, val)
    falling = drop > FALLING_PER_DOUBLING * val[-1]
    gap = val[-1] - train[-1]
    bias = max(train[-1] - floor, 0.0)
    gap_large = gap > 0 and gap >= bias
    helps = falling and gap_large
    verdict = _verdict(falling, gap_large, drop, gap, bias, sizes[-1], metric)
    if metric == "error" and max(*train, *val, floor) > 1:
        verdict += (
            " Note: errors above 1 cannot be error rates: divide percentages by 100, or pass "
            "metric='mse' (or the metric's name) for another metric."
        )
    return LearningCurve(sizes, train, val, floor, helps, verdict, drop, metric)


def _drop_per_doubling(sizes: list[float], val: list[float]) -> float:
    """Fall of the validation error per doubling of the data, fitted to the last three sizes."""
    x = np.log2(np.asarray(sizes[-3:]))
    y = np.asarray(val[-3:])
    slope = np.polyfit(x, y, 1)[0]
    return float(-slope)


def _verdict(
    falling: bool,
    gap_large: bool,
    drop: float,
    gap: float,
    bias: float,
    largest: float,
    metric: str,
) -> str:
    from nbtrouble._biasvar_view import format_error

    size = f"{largest:,.0f}"
    change = (
        f"falls by {format_error(drop, metric)} per doubling" if drop > 0 else "no longer falls"
    )
    gap_text = f"the gap to train error is {format_error(gap, metric)}"
    bias_text = f"the avoidable bias {format_error(bias, metric)}"
    if falling and gap_large:
        return (
            f"More data is likely to help: at {size} examples validation error still {change}, "
            f"and {gap_text}, more than {bias_text}."
        )
    if falling:
        return (
            f"More data helps little: validation error still {change} at {size} examples, but "
            f"{gap_text}, less than {bias_text}: the model underfits; a bigger model comes first."
        )
    if gap_large:
        return (
            f"More of the same data is unlikely to help much: validation error {change} at {size} "
            f"examples though {gap_text}. Regularize, or use error analysis to collect the data "
            "the model gets wrong."
        )
    if math.isclose(gap, 0.0, abs_tol=1e-12) and bias == 0.0:
        return (
            f"The curves have met at the irreducible error at {size} examples: "
            "nothing left for more data to fix."
        )
    return (
        f"More data is unlikely to help: validation error {change} at {size} examples "
        f"and {gap_text}, less than {bias_text}: the model underfits; make it bigger."
    )

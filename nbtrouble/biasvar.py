"""Bias-variance decomposition of the test error, and what to fix first.

The lecture's formula: test error = irreducible error + avoidable bias + variance +
distribution shift + validation overfitting, where

- irreducible error: the human-level (or Bayes) error, the floor;
- avoidable bias = train error - irreducible error (underfitting);
- variance = validation error - train error (overfitting);
- distribution shift = test-validation error - validation error, where the test-validation
  set is a validation set drawn from the test distribution;
- validation overfitting = test error - test-validation error (test - validation error
  when there is no test-validation set).

Examples
--------
>>> import nbtrouble as nbt
>>> bv = nbt.biasvar(train=0.20, val=0.27, test=0.28, irreducible=0.01)
>>> bv.priority
'avoidable_bias'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from nbtrouble._error_analysis import (
    BadInput,
    BadInputType,
    ErrorAnalysis,
    SliceRow,
    as_error,
    check_loader,
    check_metric,
    check_model,
    error_analysis,
    is_number,
    measure,
)
from nbtrouble._learning_curve import LearningCurve, learning_curve

__all__ = [
    "COMPONENTS",
    "NEXT_STEPS",
    "REDUCIBLE",
    "BadInput",
    "BadInputType",
    "BiasVariance",
    "ErrorAnalysis",
    "LearningCurve",
    "SliceRow",
    "biasvar",
    "error_analysis",
    "learning_curve",
]

# The lecture's order, which is also the order of the fixes on a tie.
COMPONENTS = ("irreducible", "avoidable_bias", "variance", "distribution_shift", "val_overfitting")
REDUCIBLE = COMPONENTS[1:]

LABELS = {
    "irreducible": "irreducible error",
    "avoidable_bias": "avoidable bias (underfitting)",
    "variance": "variance (overfitting)",
    "distribution_shift": "distribution shift",
    "val_overfitting": "validation overfitting",
}

# The lecture's prioritized fixes for each component, in its order.
NEXT_STEPS = {
    "avoidable_bias": [
        "Make the model bigger: more layers, or more units per layer.",
        "Reduce regularization: lower dropout, weight decay or L2.",
        "Do error analysis on the training set: which examples does the model get wrong?",
        "Choose a different architecture, closer to the state of the art (e.g. LeNet -> ResNet).",
        "Tune hyperparameters, the learning rate first.",
        "Add features the model lacks.",
    ],
    "variance": [
        "Add more training data, if at all possible.",
        "Add normalization: batch norm or layer norm.",
        "Add data augmentation.",
        "Increase regularization: dropout, L2, weight decay.",
        "Do error analysis on the validation set: which slices does the model get wrong?",
        "Choose a different architecture, closer to the state of the art for the task.",
        "Tune hyperparameters.",
        "Early stopping (not recommended: it trades fitting for generalizing).",
        "Remove features (not recommended).",
        "Reduce the model size (not recommended: a bigger, regularized model usually does better).",
    ],
    "distribution_shift": [
        "Do error analysis on the test-validation set: which slices fail (nbt.error_analysis)?",
        "Collect more training data like those slices, so the training data covers them.",
        "Synthesize training data like those slices (simulation, augmentation toward them).",
        "Apply domain adaptation between the training and the test distribution.",
    ],
    "val_overfitting": [
        "Re-sample the validation set: collect new validation data, or a larger set, and re-check.",
        "Tune fewer hyperparameters against one validation set; keep a final check set untouched.",
    ],
}

NEGATIVE_NOTES = {
    "avoidable_bias": (
        "Train error is below the irreducible-error estimate: the human-level estimate is too "
        "pessimistic (the best achievable error is lower), or the model memorizes the training "
        "set. Use a better estimate of the irreducible error."
    ),
    "variance": (
        "Validation error is below train error: the train error was measured with regularization "
        "on (dropout, augmentation) or as a running average while the model still improved, or "
        "the validation set is easier or too small, or it overlaps the training set (leakage)."
    ),
    "distribution_shift": (
        "The test-distribution validation set is easier than the training-distribution one: no "
        "sign of distribution shift hurting, or a test-validation set too small to tell."
    ),
    "val_overfitting": (
        "Test error is below the validation error: no sign of overfitting the validation set; "
        "the difference is within the noise of small sets, or the test set is easier."
    ),
}

# Components within this (relative) distance of the largest count as tied with it.
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class BiasVariance:
    """The decomposition of the test error and what to fix first.

    Attributes
    ----------
    errors
        What was measured or given: ``irreducible``, ``train``, ``val``, and ``test_val`` and
        ``test`` when known.
    components
        Ordered ``irreducible``, ``avoidable_bias``, ``variance``, ``distribution_shift`` (only
        with a test-validation error), ``val_overfitting`` (only with a test error); the values
        add up to ``total``.
    priority
        The component to address first (see :func:`biasvar`).
    next_steps
        The lecture's fixes for ``priority``, in its order.
    notes
        Explanations: negative components, a missing test-validation set or irreducible error.
    metric
        The name of the metric the errors are measured in.
    """

    errors: dict[str, float]
    components: dict[str, float]
    priority: str
    next_steps: list[str]
    notes: list[str] = field(default_factory=list)
    metric: str = "error"

    @property
    def total(self) -> float:
        """The error the components add up to: the test error when given."""
        return next(self.errors[k] for k in ("test", "test_val", "val") if k in self.errors)

    def panel(self) -> Any:
        """The ipywidgets panel: chart, table and next steps."""
        from nbtrouble._biasvar_view import panel

        return panel(self)

    def figure(self) -> Any:
        """The waterfall chart as a matplotlib ``Figure``."""
        from nbtrouble._biasvar_view import waterfall

        return waterfall(self)

    def __repr__(self) -> str:
        from nbtrouble._biasvar_view import text

        return text(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def _repr_html_(self) -> str:
        from nbtrouble._biasvar_view import html

        return html(self)


def biasvar(
    model: Callable[..., Any] | None = None,
    *,
    train: Any = None,
    val: Any = None,
    test: Any = None,
    irreducible: Any = None,
    test_val: Any = None,
    metric: str | Callable[..., Any] = "error",
    progress: bool = True,
) -> BiasVariance:
    """Decompose the test error into the lecture's components and rank the fixes.

    Parameters
    ----------
    model
        ``None`` when the errors are numbers already; else the model (a ``torch.nn.Module``
        or any callable) that the splits given as data loaders are evaluated with, in eval
        mode under ``torch.no_grad()``. Every module's ``training`` flag and the random
        number generators are restored afterwards.
    train, val
        Errors on the training set and on the validation set drawn from the training
        distribution: non-negative numbers, or (with a model) data loaders. Required.
    test
        Error on the test set; optional. Without it, the components add up to the last
        error given (test-validation, else validation) and there is no ``val_overfitting``.
    irreducible
        Human-level or best known error; 0 when not given (then avoidable bias is the whole
        train error, and a note says so).
    test_val
        Error on a validation set drawn from the test distribution; only with it is
        ``distribution_shift`` separated from ``val_overfitting``.
    metric
        With a model: ``"error"`` (classification error: the argmax over the class
        scores, at dim 1 as torch's losses expect or last as Hugging Face's token
        classifiers give them, with targets of -100 ignored; one-hot or soft targets
        by their argmax; one output per example, or same-shaped multi-label targets,
        by a threshold: 0.5 when the first batch's outputs lie in [0, 1], else 0 for
        logits), ``"mse"``, ``"mae"``, or
        ``metric(outputs, targets)`` returning a tensor of one error per example or the
        batch's mean. Every mean is over all samples, so batches count by their size.
        Loaders yield ``(inputs, targets)`` or dicts with a ``"labels"`` / ``"label"`` key.
    progress
        Show a progress bar over each loader.

    Returns
    -------
    BiasVariance
        ``priority`` is the largest reducible component (``avoidable_bias``, ``variance``,
        ``distribution_shift``, ``val_overfitting``); on a tie (within a relative 1e-9),
        the earliest in that order.

    Raises
    ------
    ValueError, TypeError
        For missing, negative, NaN or non-numeric errors, and loaders that yield nothing.

    Examples
    --------
    >>> bv = biasvar(train=0.03, val=0.08, test=0.085, irreducible=0.01)
    >>> bv.priority, round(bv.components["variance"], 3)
    ('variance', 0.05)
    """
    _check_metric_name(metric)
    errors = _errors(model, train, val, test, irreducible, test_val, metric, progress)
    return decompose(
        errors, metric_name=_metric_name(metric), irreducible_given=irreducible is not None
    )


def decompose(
    errors: dict[str, float], *, metric_name: str = "error", irreducible_given: bool = True
) -> BiasVariance:
    """The report for checked errors: ``irreducible``, ``train``, ``val``, ``test_val``, ``test``.

    ``test_val`` and ``test`` may be missing.
    """
    components = {
        "irreducible": errors["irreducible"],
        "avoidable_bias": errors["train"] - errors["irreducible"],
        "variance": errors["val"] - errors["train"],
    }
    reached = errors["val"]
    if "test_val" in errors:
        components["distribution_shift"] = errors["test_val"] - reached
        reached = errors["test_val"]
    if "test" in errors:
        components["val_overfitting"] = errors["test"] - reached
    priority = rank(components)
    notes = _notes(errors, components, priority, irreducible_given, metric_name)
    return BiasVariance(
        dict(errors), components, priority, list(NEXT_STEPS[priority]), notes, metric_name
    )


def rank(components: dict[str, float]) -> str:
    """The reducible component to fix first: the largest; on a tie, the lecture's earlier one."""
    present = [k for k in REDUCIBLE if k in components]
    largest = max(components[k] for k in present)
    scale = max(1.0, *(abs(v) for v in components.values()))
    return next(k for k in present if components[k] >= largest - TIE_TOLERANCE * scale)


def _notes(
    errors: dict[str, float],
    components: dict[str, float],
    priority: str,
    irreducible_given: bool,
    metric: str,
) -> list[str]:
    from nbtrouble._biasvar_view import format_error

    notes = _scale_notes(errors) if metric == "error" else []
    if not irreducible_given:
        notes.append(
            "No irreducible error given, so it is taken as 0 and avoidable bias is the whole train "
            "error. Pass the human-level (or best known) error: irreducible= / --human."
        )
    if "test_val" not in errors:
        notes.append(
            "No test-distribution validation set, so distribution shift is not separated from "
            "validation overfitting. Hold out part of the test distribution (data like what the "
            "model will be used on) as a test-validation set and pass its error: "
            "test_val= / --test-val."
        )
    if "test" not in errors:
        notes.append("No test error given: the components add up to the last error given.")
    for name, value in components.items():
        if name in NEGATIVE_NOTES and value < 0:
            shown = format_error(value, metric)
            notes.append(
                f"{LABELS[name].capitalize()} is negative ({shown}). {NEGATIVE_NOTES[name]}"
            )
    if components[priority] <= 0:
        notes.append(
            "No reducible component is above zero: the errors sit at the irreducible-error "
            "estimate. Check that estimate, or collect a harder test set."
        )
    return notes


# ---------------------------------------------------------------------------------------
# Checking and measuring the errors
# ---------------------------------------------------------------------------------------


def _errors(
    model: Any,
    train: Any,
    val: Any,
    test: Any,
    irreducible: Any,
    test_val: Any,
    metric: Any,
    progress: bool,
) -> dict[str, float]:
    given = {"train": train, "val": val, "test_val": test_val, "test": test}
    for name in ("train", "val"):
        if given[name] is None:
            what = "a number" if model is None else "a number or a data loader"
            raise BadInput(name, f"missing: pass the {name} error as {what}")
    if model is not None:
        check_model(model)
        check_metric(metric)
    # Every number and loader is checked before the first (possibly long) evaluation.
    errors = {"irreducible": 0.0 if irreducible is None else as_error(irreducible, "irreducible")}
    for name, value in given.items():
        if value is None:
            continue
        if is_number(value):
            errors[name] = as_error(value, name)
        else:
            _check_measurable(model, value, name)
    _check_reused_iterators(given)
    for name, value in given.items():
        if value is not None and name not in errors:
            errors[name] = measure(model, value, metric, argument=name, progress=progress).mean
    return {
        k: errors[k] for k in ("irreducible", "train", "val", "test_val", "test") if k in errors
    }


def _check_measurable(model: Any, value: Any, name: str) -> None:
    """Raise unless a split that is not a number can be measured."""
    if model is not None:
        check_loader(value, name)
        return
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        raise BadInputType(
            name,
            f"got a {type(value).__name__}, not a number; to measure the error on data, "
            "pass the model first: biasvar(model, train=loader, val=loader, ...)",
        )
    raise BadInputType(name, f"expected a number, got {type(value).__name__} {value!r:.40}")


def _metric_name(metric: Any) -> str:
    if isinstance(metric, str):
        return metric
    return getattr(metric, "__name__", type(metric).__name__)


# ---------------------------------------------------------------------------------------
# Numbers that are not error rates
# ---------------------------------------------------------------------------------------

# Metric names of scores where higher is better: the decomposition needs errors.
SCORE_WORDS = frozenset(
    {"accuracy", "acc", "f1", "precision", "recall", "auc", "roc", "r2", "iou", "dice", "bleu"}
)


def _check_metric_name(metric: Any) -> None:
    """Raise for a metric named after a score (accuracy, F1): the components need errors."""
    if not isinstance(metric, str):
        return
    words = set(re.split(r"[^a-z0-9]+", metric.lower()))
    if words & SCORE_WORDS and not words & {"error", "err", "loss"}:
        raise BadInput(
            "metric",
            f"unknown metric {metric!r}: it sounds like a score where higher is better, and "
            "the decomposition needs errors: pass 1 - score (e.g. 1 - accuracy) as the errors "
            "with metric='error', or a callable that returns the error",
        )


def _scale_notes(errors: dict[str, float]) -> list[str]:
    """Warnings for error rates that look like percentages or like accuracies."""
    above = {k: v for k, v in errors.items() if v > 1}
    fractions = {k: v for k, v in errors.items() if 0 < v < 1}
    if above and fractions:
        name, value = max(above.items(), key=lambda item: item[1])
        other, small = next(iter(fractions.items()))
        note = (
            f"Mixed scales: {name} is {value:g}, above 1, while {other} is {small:g}; an error "
            "rate lies between 0 and 1, so the components below mix scales and mean nothing. "
            f"Give every error as a fraction ({value / 100:g} for {value:g}%), or, for another "
            "metric (MSE in raw units, a loss), pass its name: metric='mse' / --metric mse."
        )
        return [note]
    if above:
        note = (
            "Errors above 1 cannot be error rates: if they are percentages, divide them by "
            "100; if they are another metric (MSE, a loss), pass its name (metric='mse' / "
            "--metric mse) so that they are not shown as percentages."
        )
        return [note]
    return _accuracy_notes(errors)


def _accuracy_notes(errors: dict[str, float]) -> list[str]:
    ordered = [errors[k] for k in ("train", "val", "test_val", "test") if k in errors]
    falling = all(a >= b for a, b in pairwise(ordered))
    if not (ordered[0] >= 0.5 and falling and ordered[0] > ordered[-1]):
        return []
    shown = ", ".join(f"{k} {errors[k]:g}" for k in ("train", "val", "test") if k in errors)
    note = (
        f"These look like accuracies, not errors ({shown}: high, and lower on held-out data "
        "than on the training set). If so, pass 1 - accuracy for each; the decomposition "
        "below reads them as errors."
    )
    return [note]


def _check_reused_iterators(given: dict[str, Any]) -> None:
    """Raise when one one-shot iterator (a generator) is passed for two splits."""
    seen: dict[int, str] = {}
    for name, value in given.items():
        # An Iterator (a generator) is used up by one pass; calling iter() on a loader to
        # find out would draw from the random number generators of a shuffling DataLoader.
        if not isinstance(value, Iterator):
            continue
        if id(value) in seen:
            raise BadInput(
                name,
                f"the same {type(value).__name__} is passed as {seen[id(value)]} and as {name}; "
                "an iterator can be read only once: pass a list of batches or a DataLoader",
            )
        seen[id(value)] = name

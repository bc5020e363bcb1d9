"""The lecture's decision tree as a session: where the user is, each check's outcome, what next.

``troubleshoot(model, batch, ...)`` returns a ``Session`` that walks the steps of
"Troubleshooting Deep Neural Networks": start simple, get the model to run, overfit a single
batch, compare to a known result, evaluate with the bias-variance decomposition, improve, tune.
``Session.check()`` runs the current step's check on the user's own objects (``shapecheck``,
``overfit_batch``, baselines, ``biasvar``, a coarse-to-fine learning-rate search), records the
outcome and suggests the next step; ``Session.to_markdown()`` is the log for a lab report.
Every check leaves the user's model exactly as it was (parameters, buffers, ``training``
flags, random number generators).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nbtrouble.findings import Finding, alarms


@dataclass(frozen=True)
class Step:
    """One node of the lecture's decision tree."""

    key: str
    title: str
    part: str  # the lecture's section: "Start simple", "Implement & debug", ...
    advice: str
    check: str  # what ``Session.check()`` does at this step


STEPS: tuple[Step, ...] = (
    Step(
        "start_simple",
        "Start simple",
        "Start simple",
        "Choose a simple architecture (LeNet for images, an LSTM for sequences, a fully-connected "
        "net for tabular data), sensible defaults (Adam at lr 3e-4, ReLU or tanh, no "
        "regularization), normalize the inputs, and simplify the problem (a small training set, "
        "fixed sizes).",
        "input statistics and regularization layers",
    ),
    Step(
        "run",
        "Get the model to run",
        "Implement & debug",
        "Shape mismatches, casting issues and running out of memory: step through the forward "
        "pass and watch every tensor's shape and dtype.",
        "one forward pass and the loss under shapecheck",
    ),
    Step(
        "overfit",
        "Overfit a single batch",
        "Implement & debug",
        "Drive the training error on one batch arbitrarily close to zero. Error goes up: a flipped "
        "sign in the loss or gradient. Explodes: a numerical issue or a learning rate too high. "
        "Oscillates: lower the learning rate, inspect the data for shuffled labels or wrong "
        "augmentation. Plateaus: raise the learning rate, remove regularization, inspect the loss "
        "function and the data pipeline.",
        "overfit_batch on the batch",
    ),
    Step(
        "compare",
        "Compare to a known result",
        "Implement & debug",
        "Compare to an official implementation, a paper's result, or at least simple baselines "
        "(linear regression, the average of the outputs, the most frequent class).",
        "validation error against the trivial baseline and the known results given",
    ),
    Step(
        "evaluate",
        "Bias-variance decomposition",
        "Evaluate",
        "Test error = irreducible error + bias + variance + distribution shift + validation "
        "overfitting. Work on the largest reducible component.",
        "biasvar on the train, validation and test data",
    ),
    Step(
        "improve",
        "Improve model and data",
        "Improve",
        "Address underfitting first (bigger model, less regularization, longer training), then "
        "overfitting (more data, regularization, augmentation), then distribution shift, then "
        "re-balance the datasets.",
        "re-evaluate and compare with the last decomposition",
    ),
    Step(
        "tune",
        "Tune hyperparameters",
        "Tune",
        "Coarse-to-fine random search, the learning rate first; then evaluate again until the "
        "model meets the requirements.",
        "coarse-to-fine random search over the learning rate",
    ),
)

STEP_KEYS = tuple(step.key for step in STEPS)
_BY_KEY = {step.key: step for step in STEPS}

# Where the tree goes after each step: (on success, on failure). The lecture loops back to
# debugging when a known result is missed, and back to evaluation after tuning.
_NEXT = {
    "start_simple": ("run", "start_simple"),
    "run": ("overfit", "run"),
    "overfit": ("compare", "overfit"),
    "compare": ("evaluate", "overfit"),
    "evaluate": ("improve", "improve"),
    "improve": ("tune", "improve"),
    "tune": ("evaluate", "tune"),
}

_OVERFIT_ADVICE = {
    "converged": "The model can memorize one batch: compare it to a known result next.",
    "goes_up": "The error goes up: look for a flipped sign in the loss or the gradient.",
    "explodes": "The loss explodes: a numerical issue (exp, log, division) or a learning rate "
    "too high.",
    "oscillates": "The loss oscillates: lower the learning rate; inspect the data for shuffled "
    "labels or incorrect augmentation.",
    "plateaus": "The loss plateaus: raise the learning rate, remove regularization, inspect the "
    "loss function and the data pipeline.",
}


def step_info(key: str) -> Step:
    """The ``Step`` named ``key``; ``ValueError`` for an unknown one."""
    if key not in _BY_KEY:
        raise ValueError(f"unknown step {key!r}; the steps are {', '.join(STEP_KEYS)}")
    return _BY_KEY[key]


@dataclass(repr=False)
class Outcome:
    """What one check found, and where the tree goes from there."""

    step: str
    passed: bool
    summary: str
    next_step: str
    advice: str
    findings: list[Finding] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        mark = "passed" if self.passed else "needs work"
        lines = [f"{step_info(self.step).title}: {mark}: {self.summary}"]
        lines += [f"  [{f.severity}] {f.kind}: {f.message}" for f in self.findings]
        lines.append(f"  next: {step_info(self.next_step).title}. {self.advice}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def to_markdown(self, number: int) -> str:
        mark = "passed" if self.passed else "needs work"
        lines = [f"### {number}. {step_info(self.step).title}: {mark}", "", self.summary, ""]
        lines += [f"- **{f.severity}** `{f.kind}`: {f.message}" for f in self.findings]
        if self.findings:
            lines.append("")
        lines.append(f"Next: **{step_info(self.next_step).title}**. {self.advice}")
        return "\n".join(lines)


class Session:
    """A walk through the lecture's decision tree for one model.

    Build it with ``troubleshoot(...)``. ``check()`` runs the current step's check and records
    its ``Outcome``; ``advance()`` moves to the suggested step (or any step by name);
    ``record()`` logs an outcome the user established by hand; ``to_markdown()`` exports the log.

    Examples
    --------
    >>> session = troubleshoot(model, (x, y), loss_fn=nn.CrossEntropyLoss(), val=val_loader)
    >>> session.goto("overfit")
    >>> session.check().summary
    'verdict: converged (loss 2.31 -> 0.012 in 200 steps)'
    """

    def __init__(self, model: nn.Module | None, batch: Any, **options: Any) -> None:
        self.model = model
        self.batch = batch
        self.options = options
        self.current = "start_simple"
        self.log: list[Outcome] = []
        self._listeners: list[Callable[[Session], None]] = []

    @property
    def step(self) -> Step:
        """The step the user is at."""
        return step_info(self.current)

    @property
    def suggestion(self) -> str:
        """The step the last outcome points to (the current step before any check)."""
        return self.log[-1].next_step if self.log else self.current

    def check(self) -> Outcome:
        """Run the current step's check on the session's objects and record the outcome.

        The model (parameters, buffers, ``training`` flags) and the random number generators
        are as before afterwards: iterating a data loader alone draws from the global RNG.
        """
        from nbtrouble._snapshot import Snapshot, _RngState

        snapshot = Snapshot.take(self.model) if self.model is not None else None
        rng = _RngState.capture()
        try:
            outcome = _CHECKS[self.current](self)
        finally:
            if snapshot is not None:
                snapshot.restore()
            rng.restore()
        self.log.append(outcome)
        self._changed()
        return outcome

    def advance(self, step: str | None = None) -> Step:
        """Move to ``step``, or to the step the last outcome suggests."""
        self.current = step_info(step or self.suggestion).key
        self._changed()
        return self.step

    goto = advance

    def use(self, **objects: Any) -> None:
        """Swap in new objects for the next checks, e.g. ``use(train=bigger_loader)``.

        The improve step changes the model or the data; the log keeps what earlier checks saw.
        """
        unknown = set(objects) - {"model", "batch", *self.options}
        if unknown:
            raise ValueError(
                f"unknown objects {sorted(unknown)}; known: model, batch, {', '.join(self.options)}"
            )
        if "model" in objects and not isinstance(objects["model"], nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, not {type(objects['model']).__name__}"
            )
        _check_settings(objects)
        _check_loaders(
            {k: v for k, v in objects.items() if k in ("train", "val", "test", "test_val")}
        )
        self.model = objects.pop("model", self.model)
        self.batch = objects.pop("batch", self.batch)
        self.options.update(objects)
        self._changed()

    def record(self, passed: bool, summary: str, step: str | None = None) -> Outcome:
        """Log an outcome found by hand (e.g. after fixing a bug) at ``step`` or the current one."""
        key = step_info(step or self.current).key
        next_step = _NEXT[key][0 if passed else 1]
        outcome = Outcome(key, bool(passed), summary, next_step, "Recorded by hand.")
        self.log.append(outcome)
        self._changed()
        return outcome

    def on_change(self, callback: Callable[[Session], None]) -> None:
        """Call ``callback(session)`` after every check, record or move (panels use this)."""
        self._listeners.append(callback)

    def to_markdown(self) -> str:
        """The session's log as Markdown, for a lab report."""
        lines = ["# Troubleshooting log", "", _describe(self.model, self.batch), ""]
        lines += ["| # | step | outcome | summary |", "| --- | --- | --- | --- |"]
        for number, outcome in enumerate(self.log, 1):
            mark = "passed" if outcome.passed else "needs work"
            summary = outcome.summary.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {number} | {step_info(outcome.step).title} | {mark} | {summary} |")
        lines.append("")
        for number, outcome in enumerate(self.log, 1):
            lines += [outcome.to_markdown(number), ""]
        lines.append(f"Current step: **{self.step.title}** ({self.step.part}).")
        return "\n".join(lines) + "\n"

    def export(self, path: str | Path) -> Path:
        """Write ``to_markdown()`` to ``path`` and return it."""
        path = Path(path)
        try:
            path.write_text(self.to_markdown(), encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot write the log to {str(path)!r}: {e.strerror}") from None
        return path

    def _changed(self) -> None:
        for callback in self._listeners:
            callback(self)

    def __repr__(self) -> str:
        done = ", ".join(
            f"{step_info(o.step).title}: {'passed' if o.passed else 'needs work'}" for o in self.log
        )
        return (
            f"<troubleshoot session at {self.step.title!r} ({self.step.part}); "
            f"{len(self.log)} check(s){': ' + done if done else ''}>"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def _ipython_display_(self) -> None:
        from nbtrouble._display import show
        from nbtrouble._troubleshoot_view import session_panel

        show(self, session_panel)


def troubleshoot(
    model: nn.Module | None = None,
    batch: Any = None,
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    train: Iterable[Any] | None = None,
    val: Iterable[Any] | None = None,
    test: Iterable[Any] | None = None,
    test_val: Iterable[Any] | None = None,
    irreducible: float | None = None,
    known: dict[str, float] | None = None,
    tune: Callable[[float], float] | None = None,
    steps: int = 200,
    lr: float = 3e-4,
) -> Session:
    """Start a walk through the lecture's decision tree for ``model``.

    Parameters
    ----------
    model
        The ``nn.Module`` under study.
    batch
        One batch: ``(inputs, targets)`` or a dict for ``model(**batch)``.
    loss_fn
        ``loss_fn(model(inputs), targets)``; ``None`` lets ``overfit_batch`` infer it.
    train, val, test, test_val
        Data loaders (iterables of batches) for the evaluation steps; ``test_val`` is a
        validation set drawn from the test distribution (for distribution shift).
    irreducible
        The irreducible (e.g. human-level) error, for the bias-variance decomposition;
        ``None`` counts it as 0.
    known
        Known results to compare with: ``{"logistic regression": 0.03}`` (validation error).
    tune
        ``tune(lr) -> validation error``: trains a fresh model at ``lr`` (for the tuning step).
    steps, lr
        Steps and learning rate of the single-batch overfitting run.

    Returns
    -------
    Session
        Displays as the decision-tree panel in a notebook.

    Examples
    --------
    >>> session = troubleshoot(model, (x, y), loss_fn=nn.CrossEntropyLoss())
    >>> session.check().passed
    True
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if model is not None and batch is None:
        raise ValueError("give a batch to check the model on: (inputs, targets) or a dict")
    _check_settings({"irreducible": irreducible, "lr": lr, "steps": steps})
    _check_loaders({"train": train, "val": val, "test": test, "test_val": test_val})
    for name, value in (known or {}).items():
        _check_number(f"known[{name!r}]", value, low=0.0)
    if tune is not None and not callable(tune):
        raise TypeError("tune must be a callable: tune(lr) -> validation error")
    options = {
        "loss_fn": loss_fn,
        "train": train,
        "val": val,
        "test": test,
        "test_val": test_val,
        "irreducible": irreducible,
        "known": dict(known or {}),
        "tune": tune,
        "steps": steps,
        "lr": float(lr),
    }
    return Session(model, batch, **options)


def _check_loaders(loaders: dict[str, Any]) -> None:
    """Raise for one-shot iterators: the checks read each loader more than once."""
    for name, loader in loaders.items():
        if isinstance(loader, Iterator):
            raise TypeError(
                f"{name} is a {type(loader).__name__}, which can be read only once, but the "
                "checks read it several times: pass a list of batches or a DataLoader"
            )


def _check_settings(settings: dict[str, Any]) -> None:
    """Check the numbers among ``settings``: ``irreducible``, ``lr`` and ``steps``."""
    if settings.get("irreducible") is not None:
        _check_number("irreducible", settings["irreducible"], low=0.0)
    if "lr" in settings:
        _check_number("lr", settings["lr"], low=0.0, strict=True)
    steps = settings.get("steps", 2)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"steps must be an integer of at least 2, not {steps!r}")


def _check_number(
    name: str, value: Any, low: float, high: float = math.inf, strict: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    too_low = value <= low if strict else value < low
    if math.isnan(value) or too_low or value > high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value}")


# --- the checks, one per step -------------------------------------------------------------


def _need(session: Session, *names: str) -> None:
    missing = [n for n in names if (session.model if n == "model" else session.options[n]) is None]
    if missing:
        raise ValueError(
            f"the {session.step.title!r} check needs {', '.join(missing)}: pass "
            f"{' and '.join(f'{m}=...' for m in missing)} to troubleshoot()"
        )


def _outcome(step: str, passed: bool, summary: str, advice: str, **extra: Any) -> Outcome:
    return Outcome(step, passed, summary, _NEXT[step][0 if passed else 1], advice, **extra)


def _check_start_simple(session: Session) -> Outcome:
    _need(session, "model")
    inputs = _inputs(session.batch)
    findings = [*_input_findings(inputs), *_regularization_findings(session.model)]
    size = sum(p.numel() for p in session.model.parameters())
    summary = f"{type(session.model).__name__} with {size:,} parameters; " + _input_summary(inputs)
    passed = not alarms(findings)
    advice = (
        "Defaults look simple: get the model to run."
        if passed
        else "Normalize the inputs first (subtract the mean, divide by the standard deviation)."
    )
    return _outcome("start_simple", passed, summary, advice, findings=findings)


def _check_run(session: Session) -> Outcome:
    from nbtrouble.shapes import shapecheck

    _need(session, "model")
    error: BaseException | None = None
    trace = None
    try:
        with torch.no_grad(), shapecheck() as trace:
            _loss(session.model, session.batch, session.options["loss_fn"])
    except Exception as e:  # noqa: BLE001 - the user's model failed: that is this check's finding
        error = e
    findings = list(trace.findings) if trace is not None else []
    failure = trace.failure if trace is not None else None
    if failure is not None and failure.finding not in findings:
        findings.insert(0, failure.finding)
    if error is not None:
        summary = f"the forward pass failed: {type(error).__name__}: {str(error).splitlines()[0]}"
        advice = "Fix the failing op (see the finding), then run the check again."
    elif alarms(findings):
        summary = f"the forward pass ran ({len(trace.ops)} ops) but raised alarms"
        advice = "Look at the alarms: a silent broadcast or a wrong loss input runs without error."
    else:
        summary = f"the forward pass and the loss ran cleanly ({len(trace.ops)} ops traced)"
        advice = "The model runs: try to overfit a single batch."
    passed = error is None and not alarms(findings)
    return _outcome("run", passed, summary, advice, findings=findings)


def _check_overfit(session: Session) -> Outcome:
    from nbtrouble.overfit import overfit_batch

    _need(session, "model")
    options = session.options
    report = overfit_batch(
        session.model,
        session.batch,
        loss_fn=options["loss_fn"],
        steps=options["steps"],
        lr=options["lr"],
    )
    losses = list(report.losses)
    curve = f" (loss {losses[0]:.3g} -> {losses[-1]:.3g} in {len(losses)} steps)" if losses else ""
    passed = report.verdict == "converged"
    return _outcome(
        "overfit",
        passed,
        f"verdict: {report.verdict}{curve}",
        _OVERFIT_ADVICE.get(report.verdict, ""),
        findings=list(report.findings),
        details={"verdict": report.verdict, "losses": losses},
    )


def _check_compare(session: Session, tolerance: float = 0.02) -> Outcome:
    """Passes when the model beats the trivial baseline and is within ``tolerance`` (absolute)
    or twice the error of the best known result: bugs show as errors many times the known
    result, while smaller gaps are the improve step's work."""
    _need(session, "model", "val")
    options = session.options
    error, kind = model_error(session.model, options["val"])
    targets = _all_targets(options["train"] if options["train"] is not None else options["val"])
    results = {
        _trivial_name(kind): _trivial_error(targets, options["val"], kind),
        **options["known"],
    }
    best_name = min(results, key=results.__getitem__)
    beats_trivial = error < results[_trivial_name(kind)]
    near_best = error <= results[best_name] + max(tolerance, results[best_name])
    passed = beats_trivial and near_best
    table = ", ".join(f"{name} {value:.3g}" for name, value in results.items())
    summary = f"model {kind} {error:.3g} on validation; {table}"
    if passed:
        advice = "The model matches the known results: evaluate it."
    elif not beats_trivial:
        advice = "The model does no better than a trivial baseline: go back to debugging."
    else:
        advice = f"The model's error is over twice that of {best_name}: keep debugging."
    details = {"model": error, "metric": kind, "results": results}
    return _outcome("compare", passed, summary, advice, details=details)


def _check_evaluate(session: Session) -> Outcome:
    bv = _decompose(session)
    components = ", ".join(f"{name} {value:.3g}" for name, value in bv.components.items())
    advice = f"Address {_words(bv.priority)} first. " + " ".join(bv.next_steps[:2])
    details = {
        "components": dict(bv.components),
        "priority": bv.priority,
        "next_steps": list(bv.next_steps),
    }
    return _outcome(
        "evaluate", True, f"{components}; first: {bv.priority}", advice, details=details
    )


def _check_improve(session: Session) -> Outcome:
    previous = [o for o in session.log if "components" in o.details]
    bv = _decompose(session)
    now = sum(bv.components.values())
    details = {"components": dict(bv.components), "priority": bv.priority, "test_error": now}
    if not previous:
        summary = f"test error {now:.3g}; no earlier decomposition to compare with"
        return _outcome("improve", True, summary, "Evaluate before improving.", details=details)
    before = sum(previous[-1].details["components"].values())
    passed = now < before
    summary = f"test error {before:.3g} -> {now:.3g}; largest now: {bv.priority}"
    advice = (
        "The change helped: tune the hyperparameters."
        if passed
        else f"No improvement yet: keep addressing {_words(previous[-1].details['priority'])}."
    )
    return _outcome("improve", passed, summary, advice, details=details)


def _check_tune(session: Session) -> Outcome:
    _need(session, "tune")
    trials = coarse_to_fine_lr(session.options["tune"])
    best_lr, best_error = min(trials, key=lambda t: t[1])
    summary = (
        f"best lr {best_lr:.2g} (validation error {best_error:.3g}) after {len(trials)} trials"
    )
    advice = "Retrain at the best learning rate, then evaluate again."
    details = {"trials": trials, "best_lr": best_lr, "best_error": best_error}
    return _outcome("tune", True, summary, advice, details=details)


_CHECKS: dict[str, Callable[[Session], Outcome]] = {
    "start_simple": _check_start_simple,
    "run": _check_run,
    "overfit": _check_overfit,
    "compare": _check_compare,
    "evaluate": _check_evaluate,
    "improve": _check_improve,
    "tune": _check_tune,
}


def _decompose(session: Session) -> Any:
    from nbtrouble.biasvar import biasvar

    _need(session, "model", "train", "val", "test")
    options = session.options
    return biasvar(
        session.model,
        train=options["train"],
        val=options["val"],
        test=options["test"],
        test_val=options["test_val"],
        irreducible=options["irreducible"],
        metric="error",
        progress=False,
    )


# --- helpers the checks share -------------------------------------------------------------


def coarse_to_fine_lr(
    objective: Callable[[float], float],
    low: float = 1e-5,
    high: float = 1e-1,
    trials: int = 4,
    rounds: int = 2,
    seed: int = 0,
) -> list[tuple[float, float]]:
    """Coarse-to-fine random search of the learning rate on a log scale.

    Each round samples ``trials`` learning rates log-uniformly, then narrows the range to a
    factor of ``(high / low) ** 0.25`` around the best one so far.

    Returns
    -------
    list of (lr, validation error)
        Every trial, in the order run.

    Examples
    --------
    >>> coarse_to_fine_lr(lambda lr: abs(math.log10(lr) + 3), trials=3)[:1]
    [(0.0021..., 0.32...)]
    """
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}")
    rng = random.Random(seed)
    results: list[tuple[float, float]] = []
    for _ in range(rounds):
        for _ in range(trials):
            lr = 10 ** rng.uniform(math.log10(low), math.log10(high))
            results.append((lr, float(objective(lr))))
        best = min(results, key=lambda t: t[1])[0]
        span = (high / low) ** 0.25
        low, high = max(best / span, low), min(best * span, high)
    return results


def model_error(model: nn.Module, loader: Iterable[Any]) -> tuple[float, str]:
    """The model's error on ``loader``: classification error rate, or MSE for float targets.

    Batches are read as ``nbt.biasvar`` reads them (``(inputs, targets)``, dicts with
    ``labels``, numpy arrays); the model is run in eval mode without gradients and its
    ``training`` flags are restored.
    """
    from nbtrouble._error_analysis import measure

    kind = "mse" if _all_targets(loader).is_floating_point() else "error"
    return measure(model, loader, kind, argument="val", progress=False).mean, kind


def _words(key: str) -> str:
    return key.replace("_", " ")


def _trivial_name(kind: str) -> str:
    return "most frequent class" if kind == "error" else "average of the outputs"


def _trivial_error(train_targets: torch.Tensor, val: Iterable[Any], kind: str) -> float:
    val_targets = _all_targets(val)
    if kind == "error":
        most_frequent = torch.mode(train_targets.flatten()).values
        return float((val_targets != most_frequent).float().mean())
    return float(((val_targets - train_targets.float().mean()) ** 2).mean())


def _all_targets(loader: Iterable[Any]) -> torch.Tensor:
    from nbtrouble._error_analysis import _split_batch

    targets = [torch.as_tensor(_split_batch(b, "val", None)[2]).flatten() for b in loader]
    if not targets:
        raise ValueError("the loader yielded no batches (is the dataset empty?)")
    return torch.cat(targets)


def _inputs(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, dict):
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return [batch[0]]
    raise TypeError(
        f"batch must be (inputs, targets) or a dict of tensors, not {type(batch).__name__}"
    )


def _loss(model: nn.Module, batch: Any, loss_fn: Callable[..., Any] | None) -> Any:
    if isinstance(batch, dict):
        output = model(**batch)
        return output.loss if loss_fn is None else loss_fn(output, batch)
    inputs, targets = batch[0], batch[1]
    output = model(inputs)
    return output if loss_fn is None else loss_fn(output, targets)


def _input_findings(inputs: list[torch.Tensor]) -> list[Finding]:
    findings = []
    for x in inputs:
        if not x.dtype.is_floating_point or x.numel() < 2:
            continue  # token ids and masks are not normalized
        mean, std = float(x.mean()), float(x.std())
        spread = _feature_spread(x)
        if abs(mean) > 3 or std > 10 or spread > 100:
            findings.append(
                Finding(
                    "unnormalized_input",
                    "warning",
                    f"inputs {tuple(x.shape)} have mean {mean:.3g}, std {std:.3g}"
                    + (f", feature scales {spread:.0f}x apart" if spread > 100 else ""),
                    "normalize: subtract the training mean and divide by the training std",
                )
            )
    return findings


def _feature_spread(x: torch.Tensor) -> float:
    """Ratio of the largest to the smallest per-feature std, for (N, features) inputs."""
    if x.dim() != 2 or x.shape[0] < 2:
        return 1.0
    stds = x.std(dim=0)
    stds = stds[stds > 0]
    return float(stds.max() / stds.min()) if stds.numel() > 1 else 1.0


def _input_summary(inputs: list[torch.Tensor]) -> str:
    floats = [x for x in inputs if x.dtype.is_floating_point]
    if not floats:
        return f"inputs {', '.join(str(tuple(x.shape)) for x in inputs)}"
    x = floats[0]
    return f"inputs {tuple(x.shape)} mean {float(x.mean()):.3g} std {float(x.std()):.3g}"


def _regularization_findings(model: nn.Module) -> list[Finding]:
    regularizers = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm))
        }
    )
    if not regularizers:
        return []
    return [
        Finding(
            "eval_mode",
            "info",
            f"the model has {', '.join(regularizers)}",
            "the lecture starts without regularization; mind train()/eval() with these layers",
        )
    ]


def _describe(model: nn.Module | None, batch: Any) -> str:
    if model is None:
        return "No model given."
    size = sum(p.numel() for p in model.parameters())
    shapes = ", ".join(str(tuple(x.shape)) for x in _inputs(batch)) if batch is not None else "none"
    return f"Model: `{type(model).__name__}` ({size:,} parameters); batch inputs: {shapes}."

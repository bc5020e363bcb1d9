"""``overfit_batch``: drive the loss on one batch towards zero and say what went wrong if it won't.

The lecture's first check before training for real, as its recipe runs: validate the
arguments (``_batches``), snapshot the model (``_snapshot``), run the pre-flight checks
(``_preflight``, ``_watches``, ``_loss_checks``), train, read the loss curve (``_verdict``),
diagnose the root cause (``_diagnosis``) and restore the model.

Examples
--------
>>> report = nbt.overfit_batch(model, (x, y), steps=300)
>>> report.verdict
'converged'
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from nbtrouble import _preflight
from nbtrouble._batches import (
    Batch,
    InferredLoss,
    OverfitTypeError,
    OverfitUsageError,
    check_loss,
    describe,
    infer_loss,
    loss_value,
)
from nbtrouble._diagnosis import RunRecord, diagnose, nonfinite_cause, trace_failure, weight_decay
from nbtrouble._loss_checks import NONNEGATIVE_LOSSES, check_loss_sign, loss_floor, loss_kind
from nbtrouble._snapshot import Snapshot
from nbtrouble._verdict import ADVICE, CurveReading, read_curve
from nbtrouble._watches import CallWatch, DeadUnitWatch
from nbtrouble.findings import Finding, alarms

__all__ = ["Observer", "OverfitReport", "OverfitTypeError", "OverfitUsageError", "overfit_batch"]


@dataclass
class OverfitReport:
    """What happened when overfitting one batch, and why.

    Attributes
    ----------
    verdict
        ``"converged"``, ``"goes_up"``, ``"explodes"``, ``"oscillates"`` or ``"plateaus"``.
    losses
        The loss at every step that ran.
    findings
        Pre-flight and run findings; for every verdict but ``converged``, its root cause.
    """

    verdict: str
    losses: list[float]
    findings: list[Finding]
    grad_norms: list[float] = field(default_factory=list)
    steps: int = 0
    summary: str = ""
    loss_name: str = ""
    optimizer_name: str = ""
    seconds: float = 0.0
    stopped: bool = False
    kept: bool = False
    snapshot_bytes: int = 0

    @property
    def advice(self) -> str:
        """The lecture's advice for this verdict."""
        return ADVICE[self.verdict]

    @property
    def alarms(self) -> list[Finding]:
        """The error and warning findings."""
        return alarms(self.findings)

    def __repr__(self) -> str:
        from nbtrouble._overfit_view import report_text

        return report_text(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text("OverfitReport(...)" if cycle else repr(self))


class Observer(Protocol):
    """Follows a run live (a panel or a progress bar); must be cheap per step."""

    def start(self, steps: int, description: str) -> None: ...

    def update(self, step: int, loss: float) -> bool:
        """Record one step; return ``True`` to stop the run."""
        ...

    def finish(self, report: OverfitReport | None, error: BaseException | None) -> None: ...


def overfit_batch(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[..., Any] | None = None,
    steps: int = 200,
    lr: float = 3e-4,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    keep: bool = False,
    observer: Observer | None = None,
) -> OverfitReport:
    """Train ``model`` on one batch for ``steps`` steps and read the loss curve.

    Parameters
    ----------
    model
        The user's model; trained in place and restored afterwards unless ``keep``.
    batch
        ``(inputs, targets)`` (``inputs`` a tensor, a tuple of positional inputs or a dict of
        keyword inputs), or a dict passed as ``model(**batch)``.
    loss_fn
        ``loss_fn(output, targets)``, or ``loss_fn(output, batch)`` for a dict batch. ``None``
        infers it (class indices: cross-entropy; same-sized floats: MSE; dict: ``output.loss``).
    steps, lr, optimizer
        Adam at ``lr`` (the lecture's default) unless the user passes an optimizer.
    keep
        Keep the trained weights (and buffers) instead of restoring them.
    observer
        Shown the run live (a panel or a progress bar).

    Returns
    -------
    OverfitReport
        ``verdict``, ``losses`` and ``findings``.

    Examples
    --------
    >>> report = overfit_batch(model, (x, y), steps=300)
    >>> report.verdict, report.losses[-1]
    ('converged', 0.0021)
    """
    _validate(model, steps, lr)
    run = _Run(model, Batch.of(batch), loss_fn, steps, lr, optimizer)
    snapshot = Snapshot.take(model, optimizer)
    report = None
    try:
        report = run.execute(observer)  # pre-flight, train, read the curve, diagnose
        report.snapshot_bytes = snapshot.nbytes
        report.kept = keep
    except BaseException as error:
        if observer is not None:
            observer.finish(None, error)
        raise
    finally:
        snapshot.restore(keep_values=keep and report is not None)
    if observer is not None:
        observer.finish(report, None)
    return report


def _validate(model: Any, steps: int, lr: float) -> None:
    """Raise for a model, step count or learning rate that ``overfit_batch`` cannot use."""
    if not isinstance(model, nn.Module):
        raise OverfitTypeError(f"model must be a torch.nn.Module, not {describe(model)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise OverfitUsageError(f"steps must be a positive integer, not {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise OverfitUsageError(f"lr must be a positive number, not {lr!r}")
    lazy = [name for name, p in model.named_parameters() if is_lazy(p)]
    if lazy:
        raise OverfitUsageError(
            f"the model has lazy parameters whose shapes are not known yet ({', '.join(lazy[:4])}): "
            "run one forward pass first (model(inputs)) to create them"
        )


def _make_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, lr: float
) -> tuple[torch.optim.Optimizer, str]:
    """The user's optimizer after checking it holds the model's parameters, or Adam at ``lr``."""
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise OverfitUsageError("the model has no trainable parameters (requires_grad=True)")
        return torch.optim.Adam(params, lr=lr), f"Adam(lr={lr:g})"
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OverfitTypeError(
            f"optimizer must be a torch.optim.Optimizer, not {describe(optimizer)}"
        )
    own = {id(p) for p in model.parameters()}
    if not any(id(p) in own for g in optimizer.param_groups for p in g["params"]):
        raise OverfitUsageError("the optimizer holds none of the model's parameters")
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    return optimizer, f"{type(optimizer).__name__}(lr={', '.join(f'{x:g}' for x in lrs)})"


@contextlib.contextmanager
def _without_target_size_warning() -> Iterator[None]:
    """Silence the MSE family's target-shape warning: a pre-flight finding reports it instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a target size", category=UserWarning)
        yield


class _Run:
    """One overfitting run: pre-flight, the training loop, the curve and its diagnosis."""

    def __init__(
        self,
        model: nn.Module,
        batch: Batch,
        loss_fn: Callable[..., Any] | None,
        steps: int,
        lr: float,
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        self.model = model
        self.batch = batch
        self.loss_fn = loss_fn
        self.steps = steps
        self.lr = lr
        self.user_optimizer = optimizer
        self.findings: list[Finding] = []
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        # The lowest loss reachable on this batch, and what sets it (see _loss_checks.loss_floor).
        self.floor, self.floor_why = 0.0, ""
        self.blowup: tuple[str, str, float, float] | None = None  # see _watches.CallWatch
        self.sign_flipped = False  # the loss was shown to reward wrong predictions

    def execute(self, observer: Observer | None) -> OverfitReport:
        """Pre-flight, train, read the curve, diagnose: the report of the whole run."""
        with _without_target_size_warning():
            optimizer, optimizer_name = _make_optimizer(self.model, self.user_optimizer, self.lr)
            self.findings += self._preflight()
            if observer is not None:
                observer.start(self.steps, f"{self.loss_name}, {optimizer_name}")
            started = time.perf_counter()
            stopped, nonfinite_at = self._train(optimizer, observer)
            seconds = time.perf_counter() - started
            reading = self._read_curve(nonfinite_at, optimizer)
            self.findings += diagnose(self._record(), reading, optimizer, self.findings)
        return OverfitReport(
            verdict=reading.verdict,
            losses=self.losses,
            findings=self.findings,
            grad_norms=self.grad_norms,
            steps=self.steps,
            summary=reading.summary,
            loss_name=self.loss_name,
            optimizer_name=optimizer_name,
            seconds=seconds,
            stopped=stopped,
        )

    @property
    def loss_name(self) -> str:
        if isinstance(self.loss_fn, InferredLoss):
            return f"{self.loss_fn.kind} (inferred)"
        if self.loss_fn is None:
            return "output.loss"
        return getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)

    def _loss_kind(self) -> str | None:
        if isinstance(self.loss_fn, InferredLoss):
            return self.loss_fn.kind
        return loss_kind(self.loss_fn)

    def _forward(self) -> Any:
        return self.batch.forward(self.model)

    def _replay(self) -> Any:
        """The batch's loss at the current weights, for the probes (the loop inlines it)."""
        return loss_value(self.batch, self.batch.forward(self.model), self.loss_fn)

    # -- pre-flight ------------------------------------------------------------------------

    def _preflight(self) -> list[Finding]:
        """The batch and the model as given, then one forward / backward pass."""
        inputs, targets = self.batch.inputs, self.batch.targets
        return (
            _preflight.check_inputs(inputs, targets)
            + _preflight.check_modes(self.model)
            + _preflight.check_labels(inputs, targets)
            + self._first_pass()
        )

    def _first_pass(self) -> list[Finding]:
        """One forward / backward without a step: output, target and gradient checks."""
        found: list[Finding] = []
        watch = DeadUnitWatch(self.model)
        calls = CallWatch(self.model)
        self.model.zero_grad(set_to_none=True)
        with watch.watching(), calls.watching():
            output = self._forward_or_explain()
        if self.loss_fn is None and not self.batch.is_dict:
            self.loss_fn = infer_loss(output, self.batch.targets)
            found.append(self._loss_choice(self.loss_fn, output))
        if not self.batch.is_dict:
            found += self._output_checks(output)
        try:
            loss = check_loss(loss_value(self.batch, output, self.loss_fn))
            loss.backward()
        except Exception as error:
            for finding in alarms(found):
                error.add_note(f"overfit_batch pre-flight: {finding}")
            raise
        found += self._loss_sign(output, float(loss.detach()))
        found += _preflight.check_gradients(self.model, calls.called)
        found += watch.findings()
        self.blowup = calls.blowup
        self.model.zero_grad(set_to_none=True)
        return found

    def _loss_choice(self, inferred: InferredLoss, output: Any) -> Finding:
        prediction = inferred.pick(output)
        return Finding(
            "loss_choice",
            "info",
            f"no loss_fn given: using {inferred.kind} ({inferred.reason}; {inferred.pick.label} "
            f"{tuple(prediction.shape)}, target {tuple(self.batch.targets.shape)})",
            "Pass loss_fn to choose another loss.",
        )

    def _output_checks(self, output: Any) -> list[Finding]:
        """Output against targets, and the loss's floor when the targets keep it above zero."""
        targets = self.batch.targets
        if isinstance(self.loss_fn, InferredLoss):
            output, targets = self.loss_fn.operands(output, targets)
        kind = self._loss_kind()
        self.floor, self.floor_why = loss_floor(kind, self.loss_fn, output, targets)
        return _preflight.check_output(kind, output, targets)

    def _loss_sign(self, output: Any, current: float) -> list[Finding]:
        """The user's own loss on a perfect prediction, against the model's output."""
        if self.batch.is_dict or isinstance(self.loss_fn, InferredLoss):
            return []  # the model's own loss, or one chosen here: right by construction
        found = check_loss_sign(self.loss_fn, output, self.batch.targets, current)
        self.sign_flipped = bool(found)
        return found

    def _forward_or_explain(self) -> Any:
        try:
            return self._forward()
        except Exception as error:
            failure = trace_failure(self._forward)
            inputs = describe(self.batch.inputs)
            error.add_note(f"overfit_batch: the model cannot take the batch's inputs ({inputs})")
            if failure is not None:
                error.add_note(str(failure))
            raise

    # -- the loop --------------------------------------------------------------------------

    def _train(
        self, optimizer: torch.optim.Optimizer, observer: Observer | None
    ) -> tuple[bool, int | None]:
        """The hot path: no tracing, one host sync per step for the loss and gradient norm."""
        model, batch, loss_fn = self.model, self.batch, self.loss_fn
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with torch.enable_grad():
            for step in range(self.steps):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_value(batch, batch.forward(model), loss_fn)
                loss.backward()
                grads = [p.grad for p in params if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
                # One host sync per step for both numbers.
                pair = torch.stack(
                    [loss.detach().reshape(()).float(), norm.float().to(loss.device)]
                )
                value, norm_value = pair.tolist()
                self.losses.append(value)
                self.grad_norms.append(norm_value)
                if not (math.isfinite(value) and math.isfinite(norm_value)):
                    self.findings += nonfinite_cause(
                        self.model, self._replay, step, value, self.findings
                    )
                    return False, step
                optimizer.step()
                if observer is not None and observer.update(step, value):
                    return True, None
        return False, None

    # -- after the run ---------------------------------------------------------------------

    def _read_curve(
        self, nonfinite_at: int | None, optimizer: torch.optim.Optimizer
    ) -> CurveReading:
        return read_curve(
            self.losses,
            nonnegative=True if self._loss_kind() in NONNEGATIVE_LOSSES else None,
            nonfinite_at=nonfinite_at,
            floor=self.floor,
            floor_why=self.floor_why,
            sign_flipped=self.sign_flipped,
            pulled_back=weight_decay(optimizer) > 0,
        )

    def _record(self) -> RunRecord:
        return RunRecord(
            model=self.model,
            forward=self._forward,
            replay=self._replay,
            loss_kind=self._loss_kind(),
            losses=self.losses,
            grad_norms=self.grad_norms,
            blowup=self.blowup,
        )

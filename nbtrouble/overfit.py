"""``overfit_batch``: drive the loss on one batch towards zero and say what went wrong if it won't.

The lecture's first check before training for real. The run trains the user's own model in
place and restores it afterwards (see ``_snapshot``); pre-flight checks (``_preflight``) look
at the batch and the first forward / backward pass, and ``_verdict`` reads the loss curve.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nbtrouble import _preflight
from nbtrouble._snapshot import Snapshot
from nbtrouble._verdict import ADVICE, CurveReading, jumped_early, read_curve
from nbtrouble.findings import Finding, NbTroubleError, alarms

# Gradient norms that grow by this factor over the run have exploded.
_GRADIENT_GROWTH = 100.0


class OverfitUsageError(NbTroubleError, ValueError):
    """An argument of ``overfit_batch`` that cannot be used (the magic shows it as a UsageError)."""


class OverfitTypeError(NbTroubleError, TypeError):
    """An argument of ``overfit_batch`` of the wrong kind."""


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


@dataclass
class _Batch:
    """A batch split into what goes into the model and what goes into the loss."""

    is_dict: bool
    inputs: Any
    targets: Any
    raw: Any

    @classmethod
    def of(cls, batch: Any) -> _Batch:
        if isinstance(batch, Mapping):
            return cls(True, batch, None, batch)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return cls(False, batch[0], batch[1], batch)
        raise OverfitTypeError(
            "batch must be (inputs, targets) or a dict of model inputs (Hugging Face style), "
            f"not {_describe(batch)}"
        )

    def forward(self, model: nn.Module) -> Any:
        if self.is_dict or isinstance(self.inputs, Mapping):
            return model(**self.inputs)
        if isinstance(self.inputs, (tuple, list)):
            return model(*self.inputs)
        return model(self.inputs)


class _InferredLoss:
    """The loss chosen from the output and targets when the user gives none."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "mse":
            return F.mse_loss(output, target)
        if output.ndim > 2 and output.shape[:-1] == target.shape:  # (N, T, C) sequence logits
            return F.cross_entropy(output.flatten(0, -2), target.flatten())
        return F.cross_entropy(output, target)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"a {dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _infer_loss(output: Any, target: Any) -> _InferredLoss:
    if isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor):
        if not target.is_floating_point() and output.ndim >= 2:
            if output.shape[:1] + output.shape[2:] == target.shape:
                return _InferredLoss("cross_entropy", "integer targets are class indices")
            if output.shape[:-1] == target.shape:
                return _InferredLoss("cross_entropy", "integer targets index the last dim")
        if target.is_floating_point() and target.numel() == output.numel():
            return _InferredLoss("mse", "float targets with one value per output")
    raise OverfitUsageError(
        f"cannot infer a loss for output {_describe(output)} and target {_describe(target)}: "
        "pass loss_fn"
    )


def _loss_value(batch: _Batch, output: Any, loss_fn: Callable[..., Any] | None) -> Any:
    if not batch.is_dict:
        return loss_fn(output, batch.targets)  # type: ignore[misc]
    if loss_fn is not None:
        return loss_fn(output, batch.raw)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise OverfitUsageError(
            "the model's output has no .loss: put the labels in the batch (e.g. 'labels') "
            "or pass loss_fn(output, batch)"
        )
    return loss


def _check_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise OverfitTypeError(f"the loss must be a tensor, but loss_fn returned {_describe(loss)}")
    if loss.numel() != 1:
        raise OverfitUsageError(
            f"the loss must be a scalar, but loss_fn returned {_describe(loss)}: reduce it "
            "(e.g. .mean()) or use reduction='mean'"
        )
    if not loss.requires_grad:
        raise OverfitUsageError(
            "the loss does not depend on any trainable parameter (it has no grad_fn): "
            "check for torch.no_grad(), .detach() or requires_grad=False"
        )
    return loss


def _make_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, lr: float
) -> tuple[torch.optim.Optimizer, str]:
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise OverfitUsageError("the model has no trainable parameters (requires_grad=True)")
        return torch.optim.Adam(params, lr=lr), f"Adam(lr={lr:g})"
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OverfitTypeError(
            f"optimizer must be a torch.optim.Optimizer, not {_describe(optimizer)}"
        )
    own = {id(p) for p in model.parameters()}
    if not any(id(p) in own for g in optimizer.param_groups for p in g["params"]):
        raise OverfitUsageError("the optimizer holds none of the model's parameters")
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    return optimizer, f"{type(optimizer).__name__}(lr={', '.join(f'{x:g}' for x in lrs)})"


def _validate(model: Any, steps: int, lr: float) -> None:
    if not isinstance(model, nn.Module):
        raise OverfitTypeError(f"model must be a torch.nn.Module, not {_describe(model)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise OverfitUsageError(f"steps must be a positive integer, not {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise OverfitUsageError(f"lr must be a positive number, not {lr!r}")


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
    data = _Batch.of(batch)
    run = _Run(model, data, loss_fn, steps, lr, optimizer)
    snapshot = Snapshot.take(model, optimizer)
    report = None
    try:
        with warnings.catch_warnings():
            # The target-shape warning of the MSE family is reported as a finding instead.
            warnings.filterwarnings("ignore", message="Using a target size", category=UserWarning)
            report = run.execute(observer)
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


class _Run:
    """One overfitting run: pre-flight, the training loop, the diagnosis."""

    def __init__(
        self,
        model: nn.Module,
        batch: _Batch,
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

    def execute(self, observer: Observer | None) -> OverfitReport:
        optimizer, optimizer_name = _make_optimizer(self.model, self.user_optimizer, self.lr)
        self.findings += _preflight.check_inputs(self.batch.inputs, self.batch.targets)
        self.findings += _preflight.check_modes(self.model)
        self.findings += _preflight.check_labels(self.batch.inputs, self.batch.targets)
        self.findings += self._first_pass()
        if observer is not None:
            observer.start(self.steps, f"{self.loss_name}, {optimizer_name}")
        started = time.perf_counter()
        stopped, nonfinite_at = self._train(optimizer, observer)
        seconds = time.perf_counter() - started
        reading = read_curve(
            self.losses, nonnegative=self._nonnegative(), nonfinite_at=nonfinite_at
        )
        self.findings += self._gradient_growth()
        self.findings += self._root_cause(reading, optimizer)
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

    # -- pre-flight ------------------------------------------------------------------------

    @property
    def loss_name(self) -> str:
        if isinstance(self.loss_fn, _InferredLoss):
            return f"{self.loss_fn.kind} (inferred)"
        if self.loss_fn is None:
            return "output.loss"
        return getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)

    def _nonnegative(self) -> bool | None:
        kind = self._loss_kind()
        return True if kind in _preflight.NONNEGATIVE_LOSSES else None

    def _loss_kind(self) -> str | None:
        if isinstance(self.loss_fn, _InferredLoss):
            return self.loss_fn.kind
        return _preflight.loss_kind(self.loss_fn)

    def _first_pass(self) -> list[Finding]:
        """One forward / backward without a step: output, target and gradient checks."""
        found: list[Finding] = []
        watch = _preflight.DeadUnitWatch(self.model)
        self.model.zero_grad(set_to_none=True)
        with watch.watching():
            output = self._forward_or_explain()
        if self.loss_fn is None and not self.batch.is_dict:
            self.loss_fn = _infer_loss(output, self.batch.targets)
            found.append(
                Finding(
                    "loss_choice",
                    "info",
                    f"no loss_fn given: using {self.loss_fn.kind} ({self.loss_fn.reason}; output "
                    f"{tuple(output.shape)}, target {tuple(self.batch.targets.shape)})",
                    "Pass loss_fn to choose another loss.",
                )
            )
        if not self.batch.is_dict:
            found += _preflight.check_output(self._loss_kind(), output, self.batch.targets)
        try:
            loss = _check_loss(_loss_value(self.batch, output, self.loss_fn))
            loss.backward()
        except Exception as error:
            for finding in alarms(found):
                error.add_note(f"overfit_batch pre-flight: {finding}")
            raise
        found += _preflight.check_gradients(self.model)
        found += watch.findings()
        self.model.zero_grad(set_to_none=True)
        return found

    def _forward_or_explain(self) -> Any:
        try:
            return self.batch.forward(self.model)
        except Exception as error:
            failure = _trace_failure(lambda: self.batch.forward(self.model))
            inputs = _describe(self.batch.inputs)
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
                loss = _loss_value(batch, batch.forward(model), loss_fn)
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
                    self.findings += self._diagnose_nonfinite(step, value)
                    return False, step
                optimizer.step()
                if observer is not None and observer.update(step, value):
                    return True, None
        return False, None

    # -- diagnosis -------------------------------------------------------------------------

    def _diagnose_nonfinite(self, step: int, loss: float) -> list[Finding]:
        """Name the first op / module that made a NaN or Inf, replaying this step's forward."""
        bad_params = [n for n, p in self.model.named_parameters() if not bool(p.isfinite().all())]
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
            return [self._nonfinite_gradient(step, loss)]
        if any(f.kind == "nonfinite" for f in self.findings):
            return []  # the batch itself holds the NaN / Inf: that finding is the cause

        def replay() -> Any:
            return _loss_value(self.batch, self.batch.forward(self.model), self.loss_fn)

        traced = _trace_nonfinite(replay)
        if traced:
            first = traced[0]
            hint = first.hint or ADVICE["explodes"]
            return [
                Finding("nonfinite", "error", f"at step {step}: {first.message}", hint, first.where)
            ]
        module = _first_nonfinite_module(self.model, replay)
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

    def _nonfinite_gradient(self, step: int, loss: float) -> Finding:
        bad = [
            n
            for n, p in self.model.named_parameters()
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

    def _gradient_growth(self) -> list[Finding]:
        norms = [n for n in self.grad_norms if math.isfinite(n)]
        if len(norms) < 2 or norms[0] <= 0:
            return []
        peak = max(range(len(norms)), key=norms.__getitem__)
        growth = norms[peak] / norms[0]
        if growth < _GRADIENT_GROWTH:
            return []
        return [
            Finding(
                "exploding_gradient",
                "warning",
                f"the gradient norm grew from {norms[0]:.3g} at step 0 to {norms[peak]:.3g} at "
                f"step {peak} ({growth:.3g}x)",
                "Lower the learning rate, clip gradients (torch.nn.utils.clip_grad_norm_), and "
                "check normalization and initialization.",
            )
        ]

    def _root_cause(self, reading: CurveReading, optimizer: torch.optim.Optimizer) -> list[Finding]:
        if reading.verdict == "converged":
            return []
        lr_text = self._lr_text(optimizer)
        if reading.verdict == "goes_up":
            found = [_loss_increases(reading, self._loss_kind())]
            if not reading.negative_unbounded and jumped_early(self.losses):
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
        if reading.verdict == "explodes":
            if any(f.kind in ("nonfinite", "exploding_gradient") for f in self.findings):
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
            return [
                Finding(
                    "learning_rate",
                    "warning",
                    f"the loss {reading.summary}: {lr_text} is likely too high",
                    ADVICE["oscillates"],
                )
            ]
        return self._plateau_cause(reading, optimizer, lr_text)

    def _plateau_cause(
        self, reading: CurveReading, optimizer: torch.optim.Optimizer, lr_text: str
    ) -> list[Finding]:
        if alarms(self.findings):
            return []  # a pre-flight alarm already names the likely cause
        watch = _preflight.DeadUnitWatch(self.model)
        with torch.no_grad(), watch.watching():
            self.batch.forward(self.model)
        if watch.findings():
            return [
                Finding(f.kind, f.severity, f"after training: {f.message}", f.hint, f.where)
                for f in watch.findings()
            ]
        decay = max(g.get("weight_decay", 0.0) for g in optimizer.param_groups)
        extra = f"; weight decay {decay:g} pulls the weights back" if decay else ""
        falling = "still falling at the end: " if reading.still_falling else ""
        return [
            Finding(
                "learning_rate",
                "warning",
                f"the loss {reading.summary}, {falling}{lr_text} is likely too low{extra}",
                ADVICE["plateaus"],
            )
        ]

    def _lr_text(self, optimizer: torch.optim.Optimizer) -> str:
        lrs = sorted({g["lr"] for g in optimizer.param_groups})
        return "the learning rate " + ", ".join(f"{x:g}" for x in lrs)


def _loss_increases(reading: CurveReading, kind: str | None) -> Finding:
    if reading.negative_unbounded:
        message = (
            f"the loss {reading.summary}: a {kind or 'loss that starts positive'} that falls "
            "below zero without bound is being maximized, not minimized"
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


def _trace_failure(replay: Callable[[], Any]) -> Finding | None:
    """The tracer's explanation of why ``replay`` fails: the op, its operands, the line."""
    from nbtrouble.shapes import shapecheck

    checker = shapecheck()
    # The same failure again, on purpose: the trace now explains it.
    with contextlib.suppress(Exception), torch.no_grad(), checker:
        replay()
    failure = checker.trace.failure
    return failure.finding if failure is not None else None


def _trace_nonfinite(replay: Callable[[], Any]) -> list[Finding]:
    """The tracer's ``nonfinite`` findings for one replayed forward and loss."""
    from nbtrouble.shapes import shapecheck

    checker = shapecheck()
    # A replay that now fails tells nothing more about the NaN: keep what was found.
    with contextlib.suppress(Exception), torch.no_grad(), checker:
        replay()
    return [f for f in checker.trace.findings if f.kind == "nonfinite"]


def _first_nonfinite_module(model: nn.Module, replay: Callable[[], Any]) -> str | None:
    """The first module (in the order modules finish) whose output holds a NaN / Inf."""
    found: list[str] = []

    def watch(path: str) -> Callable[..., None]:
        def check(module: nn.Module, args: Any, output: Any) -> None:
            is_float = isinstance(output, torch.Tensor) and output.is_floating_point()
            if not found and is_float and not bool(output.isfinite().all()):
                found.append(path or type(model).__name__)

        return check

    handles = [m.register_forward_hook(watch(p)) for p, m in model.named_modules()]
    try:
        # The replay only serves the diagnosis; an error in it changes nothing found so far.
        with contextlib.suppress(Exception), torch.no_grad():
            replay()
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None

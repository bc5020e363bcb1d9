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
from torch.nn.parameter import is_lazy

from nbtrouble import _preflight
from nbtrouble._snapshot import Snapshot
from nbtrouble._verdict import (
    ADVICE,
    CurveReading,
    jumped_early,
    read_curve,
    spiked_early,
    swing_of,
)
from nbtrouble.findings import Finding, NbTroubleError, alarms

# Gradient norms that grow by this factor over the run have exploded.
_GRADIENT_GROWTH = 100.0
# A still-falling loss that would converge within this many times the steps run is slow, not stuck.
_PATIENCE = 10
# Swings the loss shows at fixed weights, as a share of its swings during the run, that explain
# the oscillation without the learning rate.
_EXPLAINED_SWING = 0.5


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
            f"not {_describe(batch)}; group several inputs as ((x1, x2), targets)"
        )

    def forward(self, model: nn.Module) -> Any:
        if self.is_dict or isinstance(self.inputs, Mapping):
            return model(**self.inputs)
        if isinstance(self.inputs, (tuple, list)):
            return model(*self.inputs)
        return model(self.inputs)


class _InferredLoss:
    """The loss chosen from the output and targets when the user gives none."""

    def __init__(self, kind: str, reason: str, pick: _Pick) -> None:
        self.kind = kind
        self.reason = reason
        self.pick = pick

    def __call__(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        output, target = self.operands(output, target)
        if self.kind == "mse":
            return F.mse_loss(output, target)
        return F.cross_entropy(output, target)

    def operands(self, output: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction and target as the loss compares them."""
        output = self.pick(output)
        if self.kind == "mse":
            return output, target
        if output.ndim > 2 and output.shape[:-1] == target.shape:  # (N, T, C) sequence logits
            return output.flatten(0, -2), target.flatten()
        return output, target


@dataclass(frozen=True)
class _Pick:
    """Where the prediction sits in a model's output: the output itself, a key or a position."""

    key: str | int | None = None
    label: str = "output"

    @classmethod
    def of(cls, output: Any) -> _Pick:
        """The ``logits`` entry if there is one, else the first tensor (HF and RNN conventions)."""
        if isinstance(output, Mapping):
            entries = [(k, k, f"output[{k!r}]") for k in output]
        elif isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
            entries = [(i, k, f"output.{k}") for i, k in enumerate(output._fields)]
        elif isinstance(output, (tuple, list)):
            entries = [(i, i, f"output[{i}]") for i in range(len(output))]
        else:
            return cls()
        tensors = [e for e in entries if isinstance(output[e[0]], torch.Tensor)]
        if not tensors:
            return cls()
        key, _, label = next((e for e in tensors if e[1] == "logits"), tensors[0])
        return cls(key, label)

    def __call__(self, output: Any) -> Any:
        return output if self.key is None else output[self.key]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"a {dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list, Mapping)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _infer_loss(output: Any, target: Any) -> _InferredLoss:
    pick = _Pick.of(output)
    prediction = pick(output)
    if isinstance(prediction, torch.Tensor) and isinstance(target, torch.Tensor):
        if not target.is_floating_point() and prediction.ndim >= 2:
            if prediction.shape[:1] + prediction.shape[2:] == target.shape:
                return _InferredLoss("cross_entropy", "integer targets are class indices", pick)
            if prediction.shape[:-1] == target.shape:
                return _InferredLoss("cross_entropy", "integer targets index the last dim", pick)
        if target.is_floating_point() and target.numel() == prediction.numel():
            return _InferredLoss("mse", "float targets with one value per output", pick)
    raise OverfitUsageError(
        f"cannot infer a loss for {pick.label} ({_describe(prediction)}) and target "
        f"{_describe(target)}: pass loss_fn"
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
    lazy = [name for name, p in model.named_parameters() if is_lazy(p)]
    if lazy:
        raise OverfitUsageError(
            f"the model has lazy parameters whose shapes are not known yet ({', '.join(lazy[:4])}): "
            "run one forward pass first (model(inputs)) to create them"
        )


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
        # The lowest loss reachable on this batch, and what sets it (see _preflight.loss_floor).
        self.floor, self.floor_why = 0.0, ""
        self.blowup: tuple[str, str, float, float] | None = None  # see _preflight.CallWatch
        self.sign_flipped = False  # the loss was shown to reward wrong predictions

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
            self.losses,
            nonnegative=self._nonnegative(),
            nonfinite_at=nonfinite_at,
            floor=self.floor,
            floor_why=self.floor_why,
            sign_flipped=self.sign_flipped,
            pulled_back=_weight_decay(optimizer) > 0,
        )
        self.findings += self._gradient_growth(reading)
        self.findings += self._forward_blowup(reading)
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
        calls = _preflight.CallWatch(self.model)
        self.model.zero_grad(set_to_none=True)
        with watch.watching(), calls.watching():
            output = self._forward_or_explain()
        if self.loss_fn is None and not self.batch.is_dict:
            self.loss_fn = _infer_loss(output, self.batch.targets)
            found.append(self._loss_choice(self.loss_fn, output))
        if not self.batch.is_dict:
            found += self._output_checks(output)
        try:
            loss = _check_loss(_loss_value(self.batch, output, self.loss_fn))
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

    def _loss_choice(self, inferred: _InferredLoss, output: Any) -> Finding:
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
        if isinstance(self.loss_fn, _InferredLoss):
            output, targets = self.loss_fn.operands(output, targets)
        kind = self._loss_kind()
        self.floor, self.floor_why = _preflight.loss_floor(kind, self.loss_fn, output, targets)
        return _preflight.check_output(kind, output, targets)

    def _loss_sign(self, output: Any, current: float) -> list[Finding]:
        """The user's own loss on a perfect prediction, against the model's output."""
        if self.batch.is_dict or isinstance(self.loss_fn, _InferredLoss):
            return []  # the model's own loss, or one chosen here: right by construction
        found = _preflight.check_loss_sign(self.loss_fn, output, self.batch.targets, current)
        self.sign_flipped = bool(found)
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

    def _gradient_growth(self, reading: CurveReading) -> list[Finding]:
        norms = [n for n in self.grad_norms if math.isfinite(n)]
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

    def _forward_blowup(self, reading: CurveReading) -> list[Finding]:
        """When the run blew up: a module that already blew its input up before any step."""
        growth = [f for f in self.findings if f.kind == "exploding_gradient" and f.is_alarm]
        if self.blowup is None or (reading.verdict != "explodes" and not growth):
            return []
        path, module, size_in, size_out = self.blowup
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

    def _root_cause(self, reading: CurveReading, optimizer: torch.optim.Optimizer) -> list[Finding]:
        if reading.verdict == "converged":
            return []
        lr_text = self._lr_text(optimizer)
        if reading.verdict == "goes_up":
            # The pre-flight sign check already says why, with its numbers.
            sign_known = any(f.kind == "loss_increases" for f in self.findings)
            found = [] if sign_known else [_loss_increases(reading, self._loss_kind())]
            steady = not (reading.negative_unbounded or reading.sign_flipped)
            if steady and jumped_early(self.losses):
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
            return self._oscillation_cause(reading, lr_text)
        return self._plateau_cause(reading, optimizer, lr_text)

    def _oscillation_cause(self, reading: CurveReading, lr_text: str) -> list[Finding]:
        """The learning rate, unless the loss swings as much at fixed weights (then the data)."""
        too_high = Finding(
            "learning_rate",
            "warning",
            f"the loss {reading.summary}: {lr_text} is likely too high",
            ADVICE["oscillates"],
        )
        spread = self._spread_at_fixed_weights()
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

    def _spread_at_fixed_weights(self) -> _preflight.LossSpread | None:
        def loss_now() -> Any:
            return _loss_value(self.batch, self.batch.forward(self.model), self.loss_fn)

        try:
            return _preflight.loss_spread(self.model, loss_now)
        except (RuntimeError, ValueError, TypeError, IndexError):  # the probe tells nothing then
            return None

    def _plateau_cause(
        self, reading: CurveReading, optimizer: torch.optim.Optimizer, lr_text: str
    ) -> list[Finding]:
        if alarms([f for f in self.findings if f.kind != "exploding_gradient"]):
            return []  # a pre-flight alarm already names the likely cause
        found = self._spike_cause(lr_text) + self._dead_after_training()
        if found:
            return found
        ran = len(self.losses)
        more = reading.steps_to_converge
        if reading.still_falling and more is not None and ran + more <= _PATIENCE * ran:
            return [_not_yet(reading, ran, more, lr_text)]
        decay = _weight_decay(optimizer)
        extra = f"; weight decay {decay:g} pulls the weights back" if decay else ""
        return [
            Finding(
                "learning_rate",
                "warning",
                f"the loss {reading.summary}: {lr_text} is likely too low{extra}",
                ADVICE["plateaus"],
            )
        ]

    def _spike_cause(self, lr_text: str) -> list[Finding]:
        """A jump early on, then no progress: a first step too large wrecked the weights."""
        spike = spiked_early(self.losses)
        if spike is None:
            return []
        step, peak = spike
        return [
            Finding(
                "learning_rate",
                "warning",
                f"the loss jumped from {self.losses[0]:.4g} to {peak:.4g} at step {step}, then "
                f"stalled at {self.losses[-1]:.4g}: {lr_text} is likely too high",
                "Lower the learning rate by 10x and run again.",
            )
        ]

    def _dead_after_training(self) -> list[Finding]:
        watch = _preflight.DeadUnitWatch(self.model)
        with torch.no_grad(), watch.watching():
            self.batch.forward(self.model)
        return [
            Finding(f.kind, f.severity, f"after training: {f.message}", f.hint, f.where)
            for f in watch.findings()
        ]

    def _lr_text(self, optimizer: torch.optim.Optimizer) -> str:
        lrs = sorted({g["lr"] for g in optimizer.param_groups})
        return "the learning rate " + ", ".join(f"{x:g}" for x in lrs)


def _weight_decay(optimizer: torch.optim.Optimizer) -> float:
    return max(float(g.get("weight_decay", 0.0) or 0.0) for g in optimizer.param_groups)


def _changing_batch(spread: _preflight.LossSpread) -> Finding:
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

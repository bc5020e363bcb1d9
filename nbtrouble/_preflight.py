"""Checks that run before the first training step of ``overfit_batch``, and probes of the model.

Each check looks at the batch, the model or the first forward / backward pass and returns
``Finding`` objects whose messages carry the numbers that were seen. None of them changes
the model: the dead-unit hooks are removed in a ``finally``. ``loss_spread`` measures the loss
repeatedly at fixed weights (for the diagnosis after the run) and puts back the random
generators, ``training`` flags and buffers it touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from nbtrouble._snapshot import _RngState
from nbtrouble.findings import Finding

# Loss kinds overfit_batch can reason about, by module class and by function.
_LOSS_MODULES = {
    nn.CrossEntropyLoss: "cross_entropy",
    nn.BCEWithLogitsLoss: "bce_with_logits",
    nn.BCELoss: "bce",
    nn.NLLLoss: "nll",
    nn.MSELoss: "mse",
    nn.L1Loss: "l1",
    nn.SmoothL1Loss: "smooth_l1",
    nn.HuberLoss: "huber",
}
_LOSS_FUNCTIONS = {
    F.cross_entropy: "cross_entropy",
    F.binary_cross_entropy_with_logits: "bce_with_logits",
    F.binary_cross_entropy: "bce",
    F.nll_loss: "nll",
    F.mse_loss: "mse",
    F.l1_loss: "l1",
    F.smooth_l1_loss: "smooth_l1",
    F.huber_loss: "huber",
}
NONNEGATIVE_LOSSES = frozenset(_LOSS_MODULES.values())
_ELEMENTWISE_LOSSES = frozenset({"mse", "l1", "smooth_l1", "huber", "bce", "bce_with_logits"})
_LOGIT_LOSSES = frozenset({"cross_entropy", "bce_with_logits"})

# Thresholds, chosen so that inputs standardized by any usual recipe never trip them.
_LARGE_SCALE = 10.0  # |mean| or std of an input tensor
_FEATURE_SCALE_RATIO = 1e3  # largest / smallest per-feature std
_DEAD_FRACTION = 0.5  # share of a layer's units that never fire on the batch
_MIN_SAMPLES_FOR_DEAD = 4  # with fewer samples a unit is silent by chance too often
# A module whose output RMS exceeds this, and this many times its input's, blows activations up.
_BLOWUP_RMS = 1e3
_BLOWUP_GAIN = 100.0
# Margins (in logits) on the target class of the perfect predictions a loss is tried on: a loss
# with label smoothing is lowest at a moderate margin, so several are tried.
_PERFECT_MARGINS = (32.0, 16.0, 8.0, 4.0, 2.0, 1.0)
# A perfect prediction must score above the current output by this share to be an error.
_SIGN_TOLERANCE = 1e-3
# Logits leaning this far towards the target class must lower any sane classification loss.
_LEAN = 0.1
# Modules whose behaviour differs between train and eval mode.
_TRAIN_SENSITIVE = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def loss_kind(loss_fn: Any) -> str | None:
    """``"cross_entropy"``, ``"mse"``, ... for the losses torch ships, else ``None``."""
    for cls, kind in _LOSS_MODULES.items():
        if isinstance(loss_fn, cls):
            return kind
    try:
        return _LOSS_FUNCTIONS.get(loss_fn)
    except TypeError:  # unhashable callable
        return None


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _float_tensors(value: Any) -> list[tuple[str, torch.Tensor]]:
    """Named float tensors inside an input: a tensor, a tuple / list of them or a dict."""
    if isinstance(value, torch.Tensor):
        return [("input", value)] if value.is_floating_point() else []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [(f"input[{i}]", v) for i, v in enumerate(value)]
    else:
        return []
    return [(str(k), v) for k, v in items if isinstance(v, torch.Tensor) and v.is_floating_point()]


def check_inputs(inputs: Any, targets: Any) -> list[Finding]:
    """Non-finite values and scales far from normalized, before anything runs."""
    findings = []
    tensors = _float_tensors(inputs)
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        tensors.append(("target", targets))
    for name, tensor in tensors:
        finding = _nonfinite_values(name, tensor)
        if finding is not None:
            findings.append(finding)
        elif name != "target":
            findings.extend(_scale_findings(name, tensor.detach()))
    return findings


def _nonfinite_values(name: str, tensor: torch.Tensor) -> Finding | None:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    if not nan and not inf:
        return None
    return Finding(
        "nonfinite",
        "error",
        f"the batch's {name} {_shape(tensor)} holds {nan} NaN and {inf} Inf values "
        f"(of {tensor.numel()})",
        "Fix the data pipeline (missing values, division by zero, log of 0) before training.",
    )


def _scale_findings(name: str, x: torch.Tensor) -> list[Finding]:
    x = x.float()
    lo, hi = float(x.min()), float(x.max())
    mean, std = float(x.mean()), float(x.std()) if x.numel() > 1 else 0.0
    if lo >= 0 and 20 < hi <= 255 and bool(torch.all(x == x.round())):
        return [
            Finding(
                "unnormalized_input",
                "warning",
                f"{name} {_shape(x)} looks like raw 0..255 pixels: min {lo:.4g}, max {hi:.4g}, "
                f"mean {mean:.4g}",
                "Scale to [0, 1] (divide by 255) and normalize per channel to zero mean, unit "
                "variance.",
            )
        ]
    if abs(mean) > _LARGE_SCALE or std > _LARGE_SCALE:
        return [
            Finding(
                "unnormalized_input",
                "warning",
                f"{name} {_shape(x)} is far from normalized: mean {mean:.4g}, std {std:.4g}, "
                f"range {lo:.4g}..{hi:.4g}",
                "Subtract the mean and divide by the standard deviation (per feature or channel).",
            )
        ]
    return _feature_scales(name, x)


def _feature_scales(name: str, x: torch.Tensor) -> list[Finding]:
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        return []
    stds = x.std(dim=0)
    varying = torch.nonzero(stds > 0).flatten()
    if len(varying) < 2:
        return []
    big = int(varying[torch.argmax(stds[varying])])
    small = int(varying[torch.argmin(stds[varying])])
    ratio = float(stds[big] / stds[small])
    if ratio < _FEATURE_SCALE_RATIO:
        return []
    return [
        Finding(
            "unnormalized_input",
            "warning",
            f"{name} {_shape(x)} has features on wildly different scales: feature {big} has "
            f"std {float(stds[big]):.3g}, feature {small} has std {float(stds[small]):.3g} "
            f"({ratio:.3g}x)",
            "Standardize each feature (zero mean, unit variance) so that no feature dominates.",
        )
    ]


def check_modes(model: nn.Module) -> list[Finding]:
    """The model, or a dropout / batch-norm submodule, left in eval mode."""
    if not model.training:
        sensitive = [
            f"{type(m).__name__} '{path}'"
            for path, m in model.named_modules()
            if isinstance(m, _TRAIN_SENSITIVE)
        ]
        affected = (
            f"{len(sensitive)} dropout / batch-norm module(s) behave as at test time: "
            + ", ".join(sensitive[:6])
            if sensitive
            else "no dropout or batch norm inside, but its own code may test self.training"
        )
        return [
            Finding(
                "eval_mode",
                "warning",
                f"the model ({type(model).__name__}) is in eval mode (model.training is False) "
                f"while it trains: {affected}",
                "Call model.train() before training and model.eval() only to evaluate.",
            )
        ]
    stuck = [
        f"{path} ({type(m).__name__})"
        for path, m in model.named_modules()
        if not m.training and isinstance(m, _TRAIN_SENSITIVE)
    ]
    if not stuck:
        return []
    return [
        Finding(
            "eval_mode",
            "warning",
            f"{len(stuck)} submodule(s) stay in eval mode while the model trains: "
            + ", ".join(stuck[:6]),
            "Call model.train() on the whole model, unless freezing them was intended.",
            where=stuck[0].split(" ")[0],
        )
    ]


def check_labels(inputs: Any, targets: Any) -> list[Finding]:
    """Identical inputs with different targets: a batch no model can fit."""
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        return []
    n = inputs.shape[0] if inputs.ndim else 0
    if n < 2 or targets.shape[:1] != (n,) or inputs.numel() > 50_000_000:
        return []
    rows = inputs.detach().reshape(n, -1)
    _, group = torch.unique(rows, dim=0, return_inverse=True)
    labels = targets.detach().reshape(n, -1)
    for g in torch.unique(group):
        members = torch.nonzero(group == g).flatten()
        if len(members) > 1 and not bool(torch.all(labels[members] == labels[members[0]])):
            a = int(members[0])
            b = next(int(m) for m in members if not torch.equal(labels[m], labels[a]))
            return [
                Finding(
                    "label_noise",
                    "warning",
                    f"samples {a} and {b} have identical inputs but different targets "
                    f"({_short(targets[a])} vs {_short(targets[b])}): no model can fit both",
                    "Check that inputs and labels stay aligned through shuffling and joins.",
                )
            ]
    return []


def _short(t: torch.Tensor) -> str:
    return f"{t.item():.4g}" if t.numel() == 1 else f"tensor of shape {_shape(t)}"


def check_output(kind: str | None, output: Any, target: Any) -> list[Finding]:
    """Probabilities into a logit loss, and targets the loss would broadcast or misread."""
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
        return []
    return _probabilities(kind, output) + _targets(kind, output, target)


def _probabilities(kind: str | None, output: torch.Tensor) -> list[Finding]:
    made_by = output.grad_fn.name() if output.grad_fn is not None else ""
    out = output.detach()
    rows_sum_to_one = (
        out.ndim >= 2
        and bool(torch.all((out >= 0) & (out <= 1)))
        and bool(torch.allclose(out.sum(dim=1), torch.ones(()), atol=1e-4))
    )
    if kind in _LOGIT_LOSSES and ("Softmax" in made_by or "Sigmoid" in made_by or rows_sum_to_one):
        what = "sigmoid" if "Sigmoid" in made_by else "softmax"
        return [
            Finding(
                "probabilities_to_logit_loss",
                "error",
                f"the model's output {_shape(out)} comes out of a {what} (values "
                f"{float(out.min()):.3g}..{float(out.max()):.3g}) and goes into {kind}, which "
                f"applies its own {'log-softmax' if kind == 'cross_entropy' else 'sigmoid'}",
                f"Return raw logits from the model (drop the final {what}); apply it only "
                "when predicting.",
            )
        ]
    if kind == "nll" and (rows_sum_to_one or float(out.max()) > 1e-6):
        seen = (
            "probabilities" if rows_sum_to_one else f"raw scores (max {float(out.max()):.3g} > 0)"
        )
        return [
            Finding(
                "probabilities_to_logit_loss",
                "error",
                f"nll_loss receives {seen}, but it expects log-probabilities (all <= 0)",
                "Apply log_softmax before nll_loss, or use cross_entropy on raw logits.",
            )
        ]
    if kind == "bce" and "Log" in made_by:
        return [
            Finding(
                "probabilities_to_logit_loss",
                "error",
                f"binary_cross_entropy receives log-probabilities ({made_by}), but it expects "
                "probabilities",
                "Use binary_cross_entropy_with_logits on raw logits instead.",
            )
        ]
    return []


def _targets(kind: str | None, output: torch.Tensor, target: torch.Tensor) -> list[Finding]:
    if kind == "cross_entropy":
        return _class_targets(output, target)
    if target.shape != output.shape:
        try:
            joint = torch.broadcast_shapes(output.shape, target.shape)
        except RuntimeError:
            joint = None
        grows = joint is not None and joint.numel() > max(output.numel(), target.numel())
        if kind in _ELEMENTWISE_LOSSES or (grows and target.is_floating_point()):
            tail = (
                f" broadcast to {tuple(joint)}: every output is compared with every target"
                if grows
                else " do not match"
            )
            return [
                Finding(
                    "target_mismatch",
                    "error" if kind in _ELEMENTWISE_LOSSES else "warning",
                    f"output {_shape(output)} and target {_shape(target)} of {kind or 'the loss'}"
                    + tail,
                    "Make them the same shape: target.view_as(output) or output.squeeze(-1).",
                )
            ]
    if kind in _ELEMENTWISE_LOSSES and not target.is_floating_point():
        return [
            Finding(
                "target_mismatch",
                "error",
                f"{kind} gets {str(target.dtype).removeprefix('torch.')} targets: it needs "
                f"float targets like the output ({str(output.dtype).removeprefix('torch.')})",
                "Convert the targets with target.float().",
            )
        ]
    return []


def _class_targets(output: torch.Tensor, target: torch.Tensor) -> list[Finding]:
    if target.is_floating_point():
        if target.shape == output.shape:
            return []  # class probabilities: a legitimate target
        return [
            Finding(
                "target_mismatch",
                "error",
                f"cross_entropy gets float targets {_shape(target)} for output {_shape(output)}: "
                "float targets are read as class probabilities of the output's shape",
                "Pass class indices as a long tensor (target.long()).",
            )
        ]
    classes = output.shape[1] if output.ndim >= 2 else output.shape[0]
    valid = target[target != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= classes):
        return [
            Finding(
                "target_mismatch",
                "error",
                f"class indices range {int(valid.min())}..{int(valid.max())} but the output "
                f"{_shape(output)} has {classes} classes",
                "Map labels to 0..C-1 and make the last layer output one logit per class.",
            )
        ]
    return []


def check_gradients(model: nn.Module, called: set[str] | None = None) -> list[Finding]:
    """Trainable parameters whose ``.grad`` is still ``None`` after one backward pass.

    ``called`` names the modules the forward pass ran (see ``CallWatch``): a parameter of a
    module that never ran is a layer kept for another use (a head used only at inference), worth
    knowing; one of a module that ran was cut off from the loss, most likely a bug.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if not names:
        return []
    total = sum(1 for p in model.parameters() if p.requires_grad)
    unused = [n for n in names if called is not None and n.rpartition(".")[0] not in called]
    cut_off = [n for n in names if n not in unused]
    found = []
    if cut_off:
        found.append(
            _no_gradient(
                cut_off,
                total,
                "warning" if len(names) < total else "error",
                "get no gradient after one backward pass although their modules ran",
                "They are cut off from the loss: a .detach() / .data / .item(), or a "
                "torch.no_grad() block in forward.",
            )
        )
    if unused:
        found.append(
            _no_gradient(
                unused,
                total,
                "info",
                "belong to modules the forward pass never called",
                "Fine for a layer used only at inference or by another task; otherwise call it "
                "in forward (or drop it, so the optimizer does not carry it).",
            )
        )
    return found


def _no_gradient(names: list[str], total: int, severity: str, what: str, hint: str) -> Finding:
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return Finding(
        "no_gradient",
        severity,
        f"{len(names)} of {total} trainable parameter tensors {what}: {shown}",
        hint,
        where=names[0].rpartition(".")[0] or None,
    )


@contextmanager
def _hooked(registrations: Iterable[Any]) -> Iterator[None]:
    """Keep the hooks that ``registrations`` registers for the block, then remove every one."""
    handles: list[Any] = []
    try:
        handles.extend(registrations)  # one by one, so a failing registration leaves none behind
        yield
    finally:
        for handle in handles:
            handle.remove()


class CallWatch:
    """Which modules the forward passes it watches run, and the first that blows its input up.

    ``blowup`` is ``(path, module type, input RMS, output RMS)`` for the first module to finish
    whose output is far larger than its input (a recurrent weight with a spectral radius above
    one, a missing normalization), or ``None``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.called: set[str] = set()
        self.blowup: tuple[str, str, float, float] | None = None

    @contextmanager
    def watching(self) -> Iterator[CallWatch]:
        modules = self.model.named_modules()
        with _hooked((m.register_forward_hook(self._hook(p)) for p, m in modules)):
            yield self

    def _hook(self, path: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            self.called.add(path)
            if self.blowup is None:
                size_in, size_out = _rms(args), _rms(output)
                if size_out > _BLOWUP_RMS and size_out > _BLOWUP_GAIN * max(size_in, 1e-3):
                    self.blowup = (path, type(module).__name__, size_in, size_out)

        return record


def _rms(value: Any) -> float:
    """Root mean square of the first float tensor in ``value`` (1.0 for token ids and the like)."""
    if isinstance(value, (tuple, list)):
        value = next((v for v in value if isinstance(v, torch.Tensor)), None)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or not value.numel():
        return 1.0
    size = float(value.detach().float().pow(2).mean().sqrt())
    return size if math.isfinite(size) else 0.0


def loss_floor(kind: str | None, loss_fn: Any, output: Any, target: Any) -> tuple[float, str]:
    """The lowest value ``loss_fn`` can reach on these targets, and why it is above zero.

    Label smoothing and soft (probability) targets give cross-entropy losses a floor above
    zero: the entropy of the targets. It is measured by feeding the loss the best possible
    output for these targets, so the loss's own options (weights, reduction, smoothing) count.
    """
    if kind not in ("cross_entropy", "bce_with_logits", "bce"):
        return 0.0, ""
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
        return 0.0, ""
    smoothing = float(getattr(loss_fn, "label_smoothing", 0.0))
    soft = target.is_floating_point() and bool(((target > 0) & (target < 1)).any())
    if not smoothing and not soft:
        return 0.0, ""
    try:
        with torch.no_grad():
            best = _best_output(kind, output.detach(), target.detach(), smoothing)
            floor = float(loss_fn(best, target))
    except (RuntimeError, ValueError, IndexError, TypeError):  # a loss that rejects it: no floor
        return 0.0, ""
    why = f"label smoothing {smoothing:g}" if smoothing else "soft targets (not 0 / 1)"
    return (floor, why) if floor > 0 and torch.isfinite(torch.tensor(floor)) else (0.0, "")


def _best_output(kind: str, output: torch.Tensor, target: torch.Tensor, smoothing: float) -> Any:
    """The output that minimizes the loss: the targets themselves, as logits where needed."""
    if kind == "bce":
        return target.to(output.dtype)
    if kind == "bce_with_logits":
        return torch.logit(target.to(output.dtype), eps=1e-6)
    if target.is_floating_point():  # class probabilities
        probabilities = target.to(output.dtype)
    else:
        classes = output.shape[1] if output.ndim >= 2 else output.shape[0]
        hot = F.one_hot(target.clamp(min=0), classes).to(output.dtype)
        hot = hot.movedim(-1, 1) if output.ndim >= 2 else hot
        probabilities = (1 - smoothing) * hot + smoothing / classes
    # log(0) is -inf; a large finite logit gives the same softmax without NaN from 0 * inf.
    return probabilities.log().clamp(min=-1e4)


def check_loss_sign(loss_fn: Any, output: Any, target: Any, current: float) -> list[Finding]:
    """A loss that rewards wrong predictions, whatever its type.

    Predictions are built in the output's shape and dtype. For float targets of the output's
    shape, perfect predictions (the targets themselves, and for targets in [0, 1] their logits
    and logs) against the model's current output: the lowest of them is compared. For class
    indices, logits leaning slightly towards the target class against logits with no
    preference decide: every sane classification loss falls along that direction, label
    smoothing or not, however trained the model already is (a loss with a floor above zero is
    lowest at a moderate margin, which a few confident predictions could miss); the message
    then quotes confident predictions against the current output when they also score higher.
    Outputs or targets that cannot be built this way are skipped.
    """
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
        return []
    if not output.is_floating_point() or not math.isfinite(current):
        return []
    output, target = output.detach(), target.detach()
    hot = _one_hot_logits(output, target)
    leaning = _leaning_right_costs(loss_fn, hot, target) if hot is not None else None
    if hot is not None and leaning is None:
        return []
    evidence = _perfect_scores_higher(loss_fn, output, target, current) or leaning
    if evidence is None:
        return []
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    return [
        Finding(
            "loss_increases",
            "error",
            f"the loss ({name}) rewards wrong predictions: it gives {evidence}, so minimizing it "
            "makes the predictions worse",
            "Look for a flipped sign: minimizing -loss, a log-likelihood or a reward used as a "
            "loss (negate it), or a sign error in a hand-written loss.",
        )
    ]


def _higher(value: float, than: float) -> bool:
    # Below a thousandth of the loss (or of 1e-3), a difference is rounding.
    return value > than + _SIGN_TOLERANCE * max(abs(value), abs(than), 1e-3)


def _perfect_scores_higher(
    loss_fn: Any, output: torch.Tensor, target: torch.Tensor, current: float
) -> str | None:
    scored = _score_predictions(loss_fn, _perfect_predictions(output, target), target)
    if not scored or not _higher(min(value for value, _ in scored), current):
        return None
    value, described = scored[0]
    return (
        f"{value + 0.0:.4g} for a perfect prediction ({described}) and {current:.4g} for the "
        "model's current output"
    )


def _leaning_right_costs(loss_fn: Any, hot: torch.Tensor, target: torch.Tensor) -> str | None:
    leaning = f"logits {_LEAN:g} higher on the target class than on the others"
    flat = "logits with no preference"
    scored = _score_predictions(loss_fn, [(leaning, _LEAN * hot), (flat, 0 * hot)], target)
    if len(scored) < 2 or not _higher(scored[0][0], scored[1][0]):
        return None
    return f"{scored[0][0]:.4g} for {leaning} and {scored[1][0]:.4g} for {flat}"


def _score_predictions(
    loss_fn: Any, predictions: list[tuple[str, torch.Tensor]], target: torch.Tensor
) -> list[tuple[float, str]]:
    """The loss of each prediction it accepts, leaving the random generators as they were."""
    scored = []
    rng = _RngState.capture()  # a random loss must not change the run that follows
    try:
        with torch.no_grad():
            for described, prediction in predictions:
                try:
                    value = float(loss_fn(prediction, target))
                except (RuntimeError, ValueError, IndexError, TypeError):  # rejects this one
                    continue
                if math.isfinite(value):
                    scored.append((value, described))
    finally:
        rng.restore()
    return scored


def _perfect_predictions(
    output: torch.Tensor, target: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """Outputs no sane loss can score worse than the model's, most confident first."""
    target = target.detach()
    if target.is_floating_point():
        if target.shape != output.shape:
            return []
        found = [("the targets themselves", target.to(output.dtype))]
        if bool(((target >= 0) & (target <= 1)).all()):
            # Probabilities as targets: a loss may read the output as logits or log-probabilities.
            logits = torch.logit(target.double(), eps=1e-12).to(output.dtype)
            found.append(("the targets as logits", logits))
            log_probabilities = target.log().clamp(min=-1e4).to(output.dtype)
            found.append(("the targets as log-probabilities", log_probabilities))
        return found
    hot = _one_hot_logits(output, target)
    if hot is None:
        return []
    return [
        (f"logits {margin:g} higher on the target class than on the others", margin * hot)
        for margin in _PERFECT_MARGINS
    ]


def _one_hot_logits(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """1 on each class-index target's class, 0 elsewhere, in the output's shape; else None."""
    if target.is_floating_point():
        return None
    class_dim = _class_dim(output, target)
    if class_dim is None:
        return None
    classes = output.shape[class_dim]
    labels = target.long().clamp(min=0)  # negative: an ignore_index, any class will do
    if not labels.numel() or int(labels.max()) >= classes:
        return None
    return F.one_hot(labels, classes).movedim(-1, class_dim).to(output.dtype)


def _class_dim(output: torch.Tensor, target: torch.Tensor) -> int | None:
    """The output's class dimension for class-index targets: 1, or the last; None if unclear."""
    if output.ndim < 2:
        return None
    dims = set()
    if output.shape[:1] + output.shape[2:] == target.shape:
        dims.add(1)
    if output.shape[:-1] == target.shape:
        dims.add(output.ndim - 1)
    return dims.pop() if len(dims) == 1 else None


class DeadUnitWatch:
    """Records which units of every ``nn.ReLU`` ever fire during the forward passes it watches."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.alive: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}

    @contextmanager
    def watching(self) -> Iterator[DeadUnitWatch]:
        relus = [
            (p, m) for p, m in self.model.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))
        ]
        with _hooked(m.register_forward_hook(self._hook(p)) for p, m in relus):
            yield self

    def _hook(self, path: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor) or output.ndim < 2:
                return
            fired = _units_fired(output.detach())
            seen = self.alive.get(path)
            if seen is None or seen.shape != fired.shape:
                self.alive[path] = fired
            else:
                self.alive[path] = seen | fired
            self.samples[path] = int(output.shape[0])

        return record

    def findings(self) -> list[Finding]:
        found = []
        for path, alive in self.alive.items():
            dead = int((~alive).sum())
            share = dead / alive.numel()
            if share >= _DEAD_FRACTION and self.samples[path] >= _MIN_SAMPLES_FOR_DEAD:
                found.append(
                    Finding(
                        "dead_units",
                        "warning",
                        f"{dead} of {alive.numel()} units ({share:.0%}) of ReLU '{path}' output "
                        f"zero for all {self.samples[path]} samples of the batch",
                        "Check the inputs' normalization and the layer's initialization (bias "
                        "init, a huge learning rate); try LeakyReLU.",
                        where=path,
                    )
                )
        return found


def _units_fired(output: torch.Tensor) -> torch.Tensor:
    """Per unit (feature or channel), whether it was positive for any sample and position."""
    # (N, F) and (N, C, ...) images keep units in dim 1; sequences (N, T, F) in the last dim.
    feature_dim = 1 if output.ndim in (2, 4, 5) else output.ndim - 1
    per_unit = output.movedim(feature_dim, 0).reshape(output.shape[feature_dim], -1)
    return (per_unit > 0).any(dim=1)


# Functions that only drop units at random, and functions that take a dropout probability
# (its name and position): attention applies dropout inside the call.
_DROPOUT_FUNCTIONS = frozenset(
    {
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.feature_alpha_dropout,
        torch.dropout,
        torch.alpha_dropout,
        torch.feature_dropout,
        torch.feature_alpha_dropout,
    }
)
_DROPOUT_ARGUMENTS = {
    F.scaled_dot_product_attention: ("dropout_p", 4),
    F.multi_head_attention_forward: ("dropout_p", 10),
}


class _WithoutDropout(TorchFunctionMode):
    """Dropout switched off (in dropout layers and in attention); every other op as it was."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _DROPOUT_FUNCTIONS:
            return args[0] if args else kwargs["input"]
        if func in _DROPOUT_ARGUMENTS:
            name, position = _DROPOUT_ARGUMENTS[func]
            if len(args) > position:
                args = (*args[:position], 0.0, *args[position + 1 :])
            else:
                kwargs[name] = 0.0
        return func(*args, **kwargs)


class _RandomOps(TorchDispatchMode):
    """Records the random-number ops (``randperm``, ``bernoulli_``, ...) that run."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if torch.Tag.nondeterministic_seeded in func.tags:
            name = func.overloadpacket.__name__
            if name not in self.seen:
                self.seen.append(name)
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class LossSpread:
    """The loss of one batch measured repeatedly at the same weights.

    Attributes
    ----------
    train
        In training mode with dropout off: what varies here comes from the batch's path
        through the forward pass and the loss (augmentation, mixup, noise), not from dropout.
    eval
        In eval mode (empty when the model cannot run in eval mode).
    random_ops
        The random-number ops that ran in training mode with dropout off.
    """

    train: list[float]
    eval: list[float]
    random_ops: list[str]


def loss_spread(model: nn.Module, compute_loss: Callable[[], Any], repeats: int = 6) -> LossSpread:
    """Measure ``compute_loss()`` ``repeats`` times at the model's current weights.

    Nothing is updated: the random generators, every ``training`` flag and every buffer
    (batch-norm statistics) are put back afterwards, also when the forward pass fails.
    """
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = _RngState.capture()
    try:
        with torch.no_grad():
            recorder = _RandomOps()
            with _WithoutDropout(), recorder:
                train = [_measured(compute_loss)]
            with _WithoutDropout():
                train += [_measured(compute_loss) for _ in range(repeats - 1)]
            model.eval()
            try:
                evaluated = [_measured(compute_loss) for _ in range(2)]
            except (RuntimeError, ValueError, TypeError, IndexError):  # no eval path: skip it
                evaluated = []
    finally:
        rng.restore()
        for module, training in flags:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return LossSpread(train, evaluated, recorder.seen)


def _measured(compute_loss: Callable[[], Any]) -> float:
    loss = compute_loss()
    return float(loss.detach().float()) if isinstance(loss, torch.Tensor) else float(loss)

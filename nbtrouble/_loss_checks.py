"""What a loss can tell before and after training: its kind, its floor, its sign, its spread.

``loss_kind`` names the losses torch ships; ``loss_floor`` is the lowest value a loss can reach
on the batch's targets (above zero with label smoothing or soft targets); ``check_loss_sign``
catches a loss that rewards wrong predictions; ``loss_spread`` measures the loss repeatedly at
fixed weights, for the diagnosis of an oscillating run. None of them changes the model: the
random generators, ``training`` flags and buffers they touch are put back.

Examples
--------
>>> loss_kind(nn.CrossEntropyLoss())
'cross_entropy'
>>> negated = lambda out, y: -F.cross_entropy(out, y)
>>> [f.kind for f in check_loss_sign(negated, logits, labels, current=-2.3)]
['loss_increases']
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
ELEMENTWISE_LOSSES = frozenset({"mse", "l1", "smooth_l1", "huber", "bce", "bce_with_logits"})
LOGIT_LOSSES = frozenset({"cross_entropy", "bce_with_logits"})

# Margins (in logits) on the target class of the perfect predictions a loss is tried on: a loss
# with label smoothing is lowest at a moderate margin, so several are tried.
_PERFECT_MARGINS = (32.0, 16.0, 8.0, 4.0, 2.0, 1.0)
# A perfect prediction must score above the current output by this share to be an error.
_SIGN_TOLERANCE = 1e-3
# Logits leaning this far towards the target class must lower any sane classification loss.
_LEAN = 0.1


def loss_kind(loss_fn: Any) -> str | None:
    """``"cross_entropy"``, ``"mse"``, ... for the losses torch ships, else ``None``."""
    for cls, kind in _LOSS_MODULES.items():
        if isinstance(loss_fn, cls):
            return kind
    try:
        return _LOSS_FUNCTIONS.get(loss_fn)
    except TypeError:  # unhashable callable
        return None


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

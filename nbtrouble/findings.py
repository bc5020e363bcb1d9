"""The one type for everything nbtrouble notices, and its text form."""

from __future__ import annotations

from dataclasses import dataclass

SEVERITIES = ("error", "warning", "info")

# Stable strings: add new kinds, never reuse one for a different meaning.
KINDS = {
    "shape_mismatch": "an op failed because its operands' shapes do not fit",
    "silent_broadcast": "an op broadcast its operands into a bigger shape than meant",
    "dtype_mismatch": "an op failed or silently promoted because of dtypes",
    "device_mismatch": "operands on different devices",
    "nonfinite": "a NaN appeared, or an Inf reached a loss, gradient or activation",
    "unnormalized_input": "model input far from normalized",
    "probabilities_to_logit_loss": "probabilities fed to a loss that expects logits",
    "eval_mode": "training in eval mode, or evaluating in train mode",
    "no_gradient": "trainable parameters that receive no gradient",
    "exploding_gradient": "gradient norms grow by orders of magnitude",
    "dead_units": "most ReLU units in a layer output zero for the whole batch",
    "learning_rate": "the loss curve says the learning rate is far off",
    "loss_increases": "the error goes up while overfitting one batch",
    "label_noise": "labels look shuffled or inconsistent with inputs",
    "loss_choice": "which loss was inferred for the batch (info)",
    "target_mismatch": "targets a loss would broadcast or misread",
    "bad_input": "inputs or targets that cannot be used as they are",
    "op_error": "an op or layer failed for a reason not traced to shapes, dtypes or devices",
}


class NbTroubleError(Exception):
    """Base class for errors of nbtrouble's own making."""


@dataclass(frozen=True)
class Finding:
    """One thing nbtrouble noticed.

    Examples
    --------
    >>> Finding("nonfinite", "error", "NaN after fc1", "lower the lr", "train.py:12 fc1")
    Finding(kind='nonfinite', severity='error', ...)
    """

    kind: str
    severity: str
    message: str
    hint: str = ""
    where: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown Finding kind {self.kind!r}; known: {sorted(KINDS)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, not {self.severity!r}")

    @property
    def is_alarm(self) -> bool:
        """Errors and warnings are alarms; a clean model must produce none."""
        return self.severity in ("error", "warning")

    def __str__(self) -> str:
        head = f"[{self.severity}] {self.kind}: {self.message}"
        if self.where:
            head += f"\n    at {self.where}"
        if self.hint:
            head += f"\n    -> {self.hint}"
        return head


def format_findings(findings: list[Finding]) -> str:
    """Text for a list of findings, errors first, for reprs and terminals."""
    if not findings:
        return "no findings"
    order = {s: i for i, s in enumerate(SEVERITIES)}
    ranked = sorted(findings, key=lambda f: order[f.severity])
    return "\n".join(str(f) for f in ranked)


def alarms(findings: list[Finding]) -> list[Finding]:
    """The findings that count as alarms (errors and warnings)."""
    return [f for f in findings if f.is_alarm]

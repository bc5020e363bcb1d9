"""The probes behind ``overfit_batch``'s diagnosis: the loss sign check and the loss at fixed weights.

The sign check must catch a loss that rewards wrong predictions whatever its type, and stay
silent on every sane loss, those with a floor above zero included. The fixed-weight probe must
tell randomness in the batch's path (mixup) from dropout, and put back everything it touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_overfit import TinyTransformer, fingerprint, sequences
from torch import nn

from nbtrouble._loss_checks import check_loss_sign, loss_spread

torch.set_num_threads(1)

G = torch.Generator().manual_seed(0)
LOGITS = torch.randn(16, 5, generator=G)  # an untrained model's output
CLASSES = torch.randint(0, 5, (16,), generator=G)
VALUES = torch.randn(16, 1, generator=G)
BINARY = (torch.rand(16, 1, generator=G) > 0.5).float()
SOFT = torch.rand(16, 5, generator=G)
SEQUENCE_LOGITS = torch.randn(4, 7, 5, generator=G)  # (N, T, C)
SEQUENCE_CLASSES = torch.randint(0, 5, (4, 7), generator=G)


def _tokens(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o.flatten(0, 1), y.flatten())


# name -> (loss, output, target)
SANE: dict[str, tuple[Callable[..., Any], torch.Tensor, torch.Tensor]] = {
    "cross_entropy": (F.cross_entropy, LOGITS, CLASSES),
    "label_smoothing_lambda": (
        lambda o, y: F.cross_entropy(o, y, label_smoothing=0.3),
        LOGITS,
        CLASSES,
    ),
    "label_smoothing_module": (nn.CrossEntropyLoss(label_smoothing=0.1), LOGITS, CLASSES),
    "nll_on_log_softmax": (lambda o, y: F.nll_loss(o.log_softmax(1), y), LOGITS, CLASSES),
    "focal": (
        lambda o, y: ((1 - torch.exp(-F.cross_entropy(o, y, reduction="none"))) ** 2).mean(),
        LOGITS,
        CLASSES,
    ),
    "tokens_flattened": (_tokens, SEQUENCE_LOGITS, SEQUENCE_CLASSES),
    "mse": (F.mse_loss, VALUES, VALUES + torch.randn(16, 1, generator=G)),
    "l1_sum": (nn.L1Loss(reduction="sum"), VALUES, VALUES * 2),
    # A model that already fits the binary targets better than the 0/1 targets read as logits.
    "bce_logits_lambda_trained": (
        lambda o, y: F.binary_cross_entropy_with_logits(o, y),
        4 * (2 * BINARY - 1),
        BINARY,
    ),
    "bce_on_probabilities": (F.binary_cross_entropy, torch.full((16, 1), 0.5), BINARY),
    "soft_targets_lambda": (lambda o, y: F.cross_entropy(o, y.softmax(1)), LOGITS, SOFT),
    "heavy_smoothing": (nn.CrossEntropyLoss(label_smoothing=0.7), LOGITS, CLASSES),
    "confidence_penalty": (
        lambda o, y: F.cross_entropy(o, y) - 0.5 * torch.special.entr(o.softmax(1)).sum(1).mean(),
        LOGITS,
        CLASSES,
    ),
    "ignore_index": (F.cross_entropy, LOGITS, torch.where(CLASSES == 0, -100, CLASSES)),
    # A model already trained to the floor label smoothing sets: no confident prediction beats it.
    "label_smoothing_at_its_floor": (
        lambda o, y: F.cross_entropy(o, y, label_smoothing=0.1),
        (0.9 * F.one_hot(CLASSES, 5) + 0.02).log(),
        CLASSES,
    ),
    "binary_logits_beyond_any_margin": (
        lambda o, y: F.binary_cross_entropy_with_logits(o, y),
        60 * (2 * BINARY - 1),
        BINARY,
    ),
}


@pytest.mark.parametrize("name", sorted(SANE))
def test_sane_losses_pass_the_sign_check(name: str) -> None:
    loss, output, target = SANE[name]
    assert check_loss_sign(loss, output, target, float(loss(output, target))) == []


FLIPPED: dict[str, tuple[Callable[..., Any], torch.Tensor, torch.Tensor]] = {
    "negative_cross_entropy": (lambda o, y: -F.cross_entropy(o, y), LOGITS, CLASSES),
    "log_likelihood": (lambda o, y: -F.nll_loss(o.log_softmax(1), y), LOGITS, CLASSES),
    "smoothed_and_flipped": (
        lambda o, y: -F.cross_entropy(o, y, label_smoothing=0.1),
        LOGITS,
        CLASSES,
    ),
    "negative_mse": (lambda o, y: -F.mse_loss(o, y), VALUES, VALUES * 3),
    "tokens_flipped": (lambda o, y: -_tokens(o, y), SEQUENCE_LOGITS, SEQUENCE_CLASSES),
}


@pytest.mark.parametrize("name", sorted(FLIPPED))
def test_flipped_losses_fail_the_sign_check_with_the_numbers(name: str) -> None:
    loss, output, target = FLIPPED[name]
    current = float(loss(output, target))
    [finding] = check_loss_sign(loss, output, target, current)
    assert finding.kind == "loss_increases" and finding.severity == "error"
    assert "sign" in finding.hint
    if name == "smoothed_and_flipped":  # a confident prediction is not its best: the slope says
        assert "for logits 0.1 higher on the target class" in finding.message, finding
        assert "for logits with no preference" in finding.message
    else:
        assert f"{current:.4g} for the model's current output" in finding.message
        assert "for a perfect prediction" in finding.message


def test_outputs_the_check_cannot_build_are_skipped() -> None:
    flipped = lambda o, y: -F.binary_cross_entropy_with_logits(o, y.float())
    scores, labels = torch.randn(16), torch.randint(0, 2, (16,))
    assert check_loss_sign(flipped, scores, labels, float(flipped(scores, labels))) == []
    assert check_loss_sign(flipped, (scores,), labels, 0.0) == []  # a tuple output
    assert check_loss_sign(F.cross_entropy, LOGITS, CLASSES + 5, 1.0) == []  # labels out of range


def test_a_random_loss_leaves_the_random_generators_as_they_were() -> None:
    noisy = lambda o, y: F.cross_entropy(o + torch.randn_like(o), y)
    state = torch.get_rng_state()
    check_loss_sign(noisy, LOGITS, CLASSES, 1.0)
    assert torch.equal(torch.get_rng_state(), state)


class MixupWithBatchNorm(nn.Module):
    def __init__(self, mix: bool) -> None:
        super().__init__()
        self.mix = mix
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.mix:
            lam = torch.distributions.Beta(0.4, 0.4).sample()
            x = lam * x + (1 - lam) * x[torch.randperm(len(x))]
        return self.net(x)


def _spread(model: nn.Module, batch: Any) -> Any:
    before = fingerprint(model)
    x, y = batch
    spread = loss_spread(model, lambda: F.cross_entropy(model(x), y))
    after = fingerprint(model)
    assert all(after[key] == before[key] for key in before), "the probe changed the model"
    return spread


def test_dropout_alone_gives_no_spread_at_fixed_weights() -> None:
    torch.manual_seed(0)
    batch = torch.randn(16, 8), torch.randint(0, 3, (16,))
    spread = _spread(MixupWithBatchNorm(mix=False), batch)
    assert len(set(spread.train)) == 1 and spread.random_ops == []
    torch.manual_seed(0)
    transformer = TinyTransformer()  # dropout in its layers and inside attention
    spread = _spread(transformer, sequences(8))
    assert len(set(spread.train)) == 1 and len(set(spread.eval)) == 1


def test_mixup_spreads_the_loss_at_fixed_weights_in_training_mode_only() -> None:
    torch.manual_seed(0)
    batch = torch.randn(16, 8), torch.randint(0, 3, (16,))
    model = MixupWithBatchNorm(mix=True)
    model.net[1].eval()  # a user's frozen batch norm: the probe must leave it so
    spread = _spread(model, batch)
    assert len(set(spread.train)) == len(spread.train) == 6
    assert len(spread.eval) == 2 and spread.eval[0] == spread.eval[1]
    assert {"randperm", "_sample_dirichlet"} <= set(spread.random_ops)

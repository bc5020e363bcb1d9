"""``nbt.overfit_batch`` on models as people write them: no false alarms, the right root cause.

Each case is what a user would run in a notebook (a ResNet with batch norm, a GRU returning
``(output, hidden)``, a Hugging Face model, label smoothing, a frozen backbone, a user's own
optimizer with a scheduler) and asserts what the user would see, plus the promise that nothing
of theirs is lost.
"""

from __future__ import annotations

import warnings
from collections import namedtuple
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_overfit import assert_restored, classification, fingerprint, mlp, regression
from torch import nn

import nbtrouble as nbt
from nbtrouble.findings import alarms

torch.set_num_threads(1)


def run(model: nn.Module, batch: Any, loss_fn: Any = None, **kwargs: Any) -> nbt.OverfitReport:
    """``overfit_batch`` checked to leave the model and the optimizer exactly as they were."""
    optimizer = kwargs.get("optimizer")
    before = fingerprint(model, optimizer)
    report = nbt.overfit_batch(model, batch, loss_fn, **kwargs)
    assert_restored(before, model, optimizer)
    return report


def kinds(report: nbt.OverfitReport, severity: str | None = None) -> set[str]:
    return {f.kind for f in report.findings if severity in (None, f.severity)}


# -- models --------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.blocks = nn.Sequential(ResidualBlock(16), ResidualBlock(16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


class GRULanguageModel(nn.Module):
    """Returns ``(logits, hidden)`` like ``nn.GRU`` itself."""

    def __init__(self, vocab: int = 30) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.gru = nn.GRU(32, 64, batch_first=True)
        self.out = nn.Linear(64, vocab)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states, hidden = self.gru(self.embed(tokens))
        return self.out(states), hidden


def next_tokens(n: int = 8, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 30, (n, length + 1), generator=torch.Generator().manual_seed(3))
    return tokens[:, :-1], tokens[:, 1:]


Output = namedtuple("Output", "features logits")


class NamedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> Output:
        return Output(x, self.net(x))


class FrozenBackbone(nn.Module):
    """A pretrained backbone frozen on purpose, a trained head, and a head kept for inference."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(10, 64), nn.ReLU())
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(64, 3)
        self.inference_head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class MeanAndVariance(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(inputs=8, outputs=2, hidden=64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return out[:, :1], F.softplus(out[:, 1:]) + 1e-3


# -- clean models: converge, or say "not yet", never an alarm ------------------------------


@pytest.mark.parametrize("n", [8, 2])
def test_resnet_with_batch_norm_converges_and_its_running_stats_are_restored(n: int) -> None:
    torch.manual_seed(0)
    report = run(SmallResNet(), images(n), nn.CrossEntropyLoss(), steps=60, lr=3e-3)
    assert report.verdict == "converged", repr(report)
    assert alarms(report.findings) == [], repr(report)


def test_a_loss_still_falling_at_the_end_is_slow_not_broken() -> None:
    torch.manual_seed(0)
    report = run(SmallResNet(), images(8), nn.CrossEntropyLoss(), steps=40, lr=1e-3)
    assert report.verdict == "plateaus" and alarms(report.findings) == [], repr(report)
    [slow] = [f for f in report.findings if f.kind == "learning_rate"]
    assert slow.severity == "info" and "still falling" in slow.message
    assert "more steps" in slow.message and "run again with steps=" in slow.hint


def test_rnn_returning_output_and_hidden_gets_its_loss_from_the_logits() -> None:
    torch.manual_seed(0)
    report = run(GRULanguageModel(), next_tokens(), steps=150, lr=1e-2)
    assert report.verdict == "converged" and alarms(report.findings) == [], repr(report)
    [choice] = [f for f in report.findings if f.kind == "loss_choice"]
    assert "output[0] (8, 12, 30)" in choice.message and "target (8, 12)" in choice.message


def test_namedtuple_output_uses_its_logits_field() -> None:
    report = run(NamedOutput(), classification(), steps=100, lr=1e-2)
    assert report.verdict == "converged", repr(report)
    assert "output.logits (32, 3)" in str(report.findings)


def test_hugging_face_causal_lm_with_labels_in_a_dict_batch() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(5))
    report = run(model, {"input_ids": ids, "labels": ids}, steps=100, lr=3e-3)
    assert report.verdict == "converged" and alarms(report.findings) == [], repr(report)
    assert report.loss_name == "output.loss"


@pytest.mark.parametrize("case", ["label_smoothing", "soft_labels"])
def test_a_loss_with_a_floor_above_zero_converges_to_its_floor(case: str) -> None:
    x, y = classification(classes=10)
    if case == "label_smoothing":
        model, batch, loss = (
            mlp(outputs=10, hidden=64),
            (x, y),
            nn.CrossEntropyLoss(label_smoothing=0.1),
        )
        why = "label smoothing 0.1"
    else:
        soft = torch.rand(32, 5, generator=torch.Generator().manual_seed(7))
        model, batch, loss = mlp(outputs=5), (x, soft), nn.BCEWithLogitsLoss()
        why = "soft targets"
    report = run(model, batch, loss, steps=200, lr=1e-2)
    assert report.verdict == "converged" and alarms(report.findings) == [], repr(report)
    assert why in report.summary and "cannot go below" in report.summary
    assert report.losses[-1] > 0.1 * report.losses[0]  # the floor is well above zero


def test_frozen_backbone_is_no_alarm_and_an_inference_only_head_is_worth_knowing() -> None:
    torch.manual_seed(0)
    report = run(FrozenBackbone(), classification(), nn.CrossEntropyLoss(), steps=200, lr=3e-2)
    assert report.verdict == "converged" and alarms(report.findings) == [], repr(report)
    [unused] = [f for f in report.findings if f.kind == "no_gradient"]
    assert unused.severity == "info" and "never called" in unused.message
    assert "inference_head.weight" in unused.message and "backbone" not in unused.message


def test_users_sgd_with_momentum_and_a_scheduler_are_left_as_they_were() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    report = run(model, classification(), nn.CrossEntropyLoss(), steps=100, optimizer=optimizer)
    assert report.verdict == "converged", repr(report)
    assert report.optimizer_name == "SGD(lr=0.1)"
    with warnings.catch_warnings():
        # The scheduler must not believe the optimizer already stepped during the run.
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="before `optimizer.step\\(\\)`"):
            scheduler.step()


def test_a_likelihood_that_settles_below_zero_is_not_a_flipped_sign() -> None:
    def gaussian_nll(output: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return F.gaussian_nll_loss(output[0], y, output[1])

    report = run(MeanAndVariance(), regression(), gaussian_nll, steps=300, lr=3e-3)
    assert report.losses[-1] < 0 < report.losses[0]
    assert report.verdict == "converged" and alarms(report.findings) == [], repr(report)


def test_mixed_precision_and_float64_models_converge_cleanly() -> None:
    class Autocast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.net(x)

    x, y = classification()
    for model, batch in [(Autocast(), (x, y)), (mlp().double(), (x.double(), y))]:
        report = run(model, batch, nn.CrossEntropyLoss(), steps=150, lr=1e-2)
        assert report.verdict == "converged" and alarms(report.findings) == [], repr(report)


# -- bugs: the right verdict and root cause ------------------------------------------------


def test_regression_targets_of_shape_n_are_caught_and_n_by_1_is_clean() -> None:
    x, y = regression()
    clean = run(mlp(inputs=8, outputs=1, hidden=64), (x, y), nn.MSELoss(), steps=300, lr=3e-3)
    assert clean.verdict == "converged" and alarms(clean.findings) == [], repr(clean)
    buggy = run(mlp(inputs=8, outputs=1, hidden=64), (x, y.squeeze(1)), nn.MSELoss(), steps=100)
    [mismatch] = [f for f in buggy.findings if f.kind == "target_mismatch"]
    assert mismatch.severity == "error" and "(64, 1)" in mismatch.message
    assert "(64)" in mismatch.message and "broadcast to (64, 64)" in mismatch.message


def test_adam_with_a_huge_learning_rate_is_called_too_high_not_too_low() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )
    report = run(model, classification(), nn.CrossEntropyLoss(), steps=100, lr=1.0)
    assert report.verdict == "plateaus", repr(report)
    [lr] = [f for f in report.findings if f.kind == "learning_rate"]
    assert lr.severity == "warning" and "too high" in lr.message and "jumped" in lr.message
    assert "too low" not in str(report.findings)


def test_batch_mistakes_get_a_clear_message_and_leave_the_model_alone() -> None:
    model = mlp()
    x, y = classification()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :5], y), 16)
    three_tensors = next(iter(loader))
    before = fingerprint(model)
    with pytest.raises(IndexError) as info:
        nbt.overfit_batch(model, (x, y + 1), nn.CrossEntropyLoss())
    assert any("class indices range 1..3" in note for note in info.value.__notes__)
    with pytest.raises(TypeError, match=r"a list of 3 items; group several inputs as \(\(x1, x2\)"):
        nbt.overfit_batch(model, three_tensors)
    assert_restored(before, model)
    lazy = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"lazy parameters .*0\.weight.*run one forward pass"):
        nbt.overfit_batch(lazy, (x, y))


def test_an_rnn_that_blows_up_its_activations_is_named_as_the_cause() -> None:
    class ReluRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(4, 32, batch_first=True, nonlinearity="relu")
            self.out = nn.Linear(32, 1)
            with torch.no_grad():  # a recurrent weight with spectral radius 1.3
                self.rnn.weight_hh_l0.copy_(1.3 * torch.eye(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    batch = torch.randn(16, 40, 4, generator=g), torch.randn(16, 1, generator=g)
    report = run(ReluRNN(), batch, nn.MSELoss(), steps=60, lr=1e-2)
    assert report.verdict == "explodes", repr(report)
    [cause] = [f for f in report.findings if "before any training" in f.message]
    assert cause.kind == "exploding_gradient" and cause.where == "rnn"
    assert "RNN 'rnn'" in cause.message and "spectral radius" in cause.hint

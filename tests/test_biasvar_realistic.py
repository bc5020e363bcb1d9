"""What users see when they hand ``biasvar``, ``error_analysis``, ``learning_curve`` and
``%troubleshoot`` the objects and numbers of real projects, mistakes included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from IPython.core.error import UsageError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nbtrouble as nbt

torch.set_num_threads(1)


def _blobs(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return x, (x[:, 0] > 0).long()


def _batches(x: torch.Tensor, *columns: torch.Tensor, size: int = 16) -> list[tuple]:
    return [(x[i : i + size], *(c[i : i + size] for c in columns)) for i in range(0, len(x), size)]


@pytest.fixture
def shell():
    from IPython.testing.globalipapp import get_ipython

    ip = get_ipython()
    ip.run_line_magic("load_ext", "nbtrouble")
    return ip


def _perfect_classifier() -> nn.Module:
    """Class 1 exactly when the first feature is positive."""
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[1, 0] = 10.0
        model.bias.zero_()
    return model


# --- the model form: what loaders yield --------------------------------------------------


def test_a_loader_with_sample_weights_reads_the_second_element_as_the_target() -> None:
    x, y = _blobs()
    weighted = _batches(x, y, torch.rand(len(y)))  # (x, y, sample_weight), forward(x)
    bv = nbt.biasvar(_perfect_classifier(), train=weighted, val=weighted, progress=False)
    assert bv.errors["train"] == 0.0 and bv.errors["val"] == 0.0


def test_numpy_float64_batches_run_through_a_float32_model() -> None:
    x, y = _blobs()
    batches = [(a.double().numpy(), b.numpy()) for a, b in _batches(x, y)]
    bv = nbt.biasvar(_perfect_classifier(), train=batches, val=batches, progress=False)
    assert bv.errors["val"] == 0.0


def test_a_model_in_float64_takes_float32_batches() -> None:
    x, y = _blobs()
    bv = nbt.biasvar(
        _perfect_classifier().double(), train=_batches(x, y), val=_batches(x, y), progress=False
    )
    assert bv.errors["train"] == 0.0


def test_the_same_generator_for_two_splits_is_refused_before_any_evaluation() -> None:
    x, y = _blobs()
    batches = (b for b in _batches(x, y))
    with pytest.raises(ValueError, match="same generator is passed as train and as val"):
        nbt.biasvar(_perfect_classifier(), train=batches, val=batches, progress=False)


def test_a_used_up_generator_is_named_as_such() -> None:
    x, y = _blobs()
    used = (b for b in _batches(x, y))
    list(used)
    with pytest.raises(ValueError, match="can be read only once"):
        nbt.biasvar(_perfect_classifier(), train=used, val=_batches(x, y), progress=False)


def test_a_model_that_fails_says_where_and_keeps_its_modes() -> None:
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    x, y = _blobs()
    with pytest.raises(RuntimeError, match="cannot be multiplied") as raised:
        nbt.biasvar(model, train=_batches(x, y), val=_batches(x, y), progress=False)
    assert "batch 0 of train" in " ".join(raised.value.__notes__)
    assert all(m.training for m in model.modules())


# --- numbers that are not error rates ----------------------------------------------------


def test_accuracies_given_as_errors_are_called_out_first() -> None:
    bv = nbt.biasvar(train=0.95, val=0.90, test=0.89, irreducible=0.02)
    assert bv.notes[0].startswith("These look like accuracies")
    assert "1 - accuracy" in repr(bv)


def test_a_percentage_among_fractions_is_called_out() -> None:
    bv = nbt.biasvar(train=20, val=0.27, test=0.28, irreducible=0.01)
    assert bv.notes[0].startswith("Mixed scales: train is 20")
    assert "0.2 for 20%" in bv.notes[0]


def test_mse_in_raw_units_with_a_small_human_error_is_shown_as_numbers() -> None:
    bv = nbt.biasvar(train=250.0, val=400.0, test=410.0, irreducible=0.01, metric="mse")
    assert bv.priority == "avoidable_bias"
    assert "249.99" in repr(bv) and "%" not in repr(bv).splitlines()[2]
    assert not any("scale" in note or "accuracies" in note for note in bv.notes)


def test_a_score_as_the_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="pass 1 - score"):
        nbt.biasvar(train=0.95, val=0.90, metric="accuracy")


# --- error analysis and learning curves --------------------------------------------------


def test_error_analysis_with_uneven_slices_and_an_empty_one() -> None:
    ea = nbt.error_analysis(
        train_val=([0, 1, 0, 0, 1, 1, 0], ["day", "night", "day", "day", "rain", "night", "day"]),
        test_val=([1, 1, 0], ["night", "night", "day"]),
    )
    assert ea.rows[0].slice == "night"
    rain = next(r for r in ea.rows if r.slice == "rain")
    assert rain.n_test_val == 0 and rain.gain == 0.0
    assert "rain" in repr(ea)


def test_learning_curve_in_percent_says_they_are_not_error_rates() -> None:
    lc = nbt.learning_curve([100, 200, 400], train=[10, 12, 15], val=[40, 30, 25])
    assert "errors above 1 cannot be error rates" in lc.verdict


# --- %troubleshoot -------------------------------------------------------------------------


def test_troubleshoot_magic_changes_lr_in_place_and_reports_bad_export_paths(
    shell, tmp_path: Path
) -> None:
    x, y = _blobs(16)
    shell.user_ns.update(model=nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)))
    shell.user_ns.update(batch=(x, y), loss=nn.CrossEntropyLoss())
    shell.run_line_magic("troubleshoot", "model batch --loss loss --steps 100")
    shell.run_line_magic("troubleshoot", "--next overfit")
    outcome = shell.run_line_magic("troubleshoot", "--lr 0.03 --check")
    assert outcome.passed and outcome.next_step == "compare"
    with pytest.raises(UsageError, match="cannot write the log to .*No such file"):
        shell.run_line_magic("troubleshoot", f"--export {tmp_path / 'missing' / 'log.md'}")
    with pytest.raises(UsageError, match="lr must be"):
        shell.run_line_magic("troubleshoot", "--lr -1")


def test_troubleshoot_refuses_a_generator_and_compares_on_dict_batches() -> None:
    x, y = _blobs()
    with pytest.raises(TypeError, match="val is a generator"):
        nbt.troubleshoot(_perfect_classifier(), (x, y), val=(b for b in _batches(x, y)))

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _perfect_classifier()

        def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.inner(features)}

    val = DataLoader(TensorDataset(x, y), batch_size=16)
    dicts = [{"features": a, "labels": b} for a, b in val]
    session = nbt.troubleshoot(Keyword(), dicts[0], val=dicts)
    session.advance("compare")
    outcome = session.check()
    assert outcome.passed and outcome.details["model"] == 0.0
    minority = min(float(y.float().mean()), 1 - float(y.float().mean()))
    assert np.isclose(outcome.details["results"]["most frequent class"], minority)

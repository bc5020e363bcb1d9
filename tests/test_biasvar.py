"""``nbt.biasvar``: the arithmetic, the ranking, the model form, bad input and the panel."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import nbtrouble as nbt
from nbtrouble.biasvar import LABELS, NEXT_STEPS, REDUCIBLE

torch.set_num_threads(1)


def test_the_issue_example_decomposes_and_puts_underfitting_first() -> None:
    bv = nbt.biasvar(train=0.20, val=0.27, test=0.28, irreducible=0.01)

    assert list(bv.components) == ["irreducible", "avoidable_bias", "variance", "val_overfitting"]
    assert bv.components["avoidable_bias"] == pytest.approx(0.19)
    assert bv.components["variance"] == pytest.approx(0.07)
    assert bv.components["val_overfitting"] == pytest.approx(0.01)
    assert sum(bv.components.values()) == pytest.approx(0.28)
    assert bv.priority == "avoidable_bias"
    assert bv.next_steps[0].startswith("Make the model bigger")


def test_lecture_example_bias_two_points_variance_five_points_fixes_overfitting_first() -> None:
    bv = nbt.biasvar(train=0.03, val=0.08, test=0.085, irreducible=0.01)

    assert bv.components["avoidable_bias"] == pytest.approx(0.02)
    assert bv.components["variance"] == pytest.approx(0.05)
    assert bv.priority == "variance"
    assert bv.next_steps[0].startswith("Add more training data")
    # The lecture lists early stopping and smaller models last among the overfitting fixes.
    assert "Early stopping" in bv.next_steps[-3] and "Reduce the model size" in bv.next_steps[-1]


@pytest.mark.parametrize(
    ("errors", "priority", "first_step"),
    [
        (
            {"train": 0.30, "val": 0.32, "test_val": 0.33, "test": 0.34},
            "avoidable_bias",
            "Make the model bigger",
        ),
        (
            {"train": 0.05, "val": 0.20, "test_val": 0.22, "test": 0.23},
            "variance",
            "Add more training data",
        ),
        (
            {"train": 0.05, "val": 0.07, "test_val": 0.20, "test": 0.21},
            "distribution_shift",
            "Do error analysis on the test-validation",
        ),
        (
            {"train": 0.05, "val": 0.07, "test_val": 0.08, "test": 0.20},
            "val_overfitting",
            "Re-sample the validation set",
        ),
    ],
)
def test_each_component_can_come_first(
    errors: dict[str, float], priority: str, first_step: str
) -> None:
    bv = nbt.biasvar(irreducible=0.02, **errors)

    assert list(bv.components) == ["irreducible", *REDUCIBLE]
    assert bv.priority == priority
    assert bv.next_steps == NEXT_STEPS[priority]
    assert bv.next_steps[0].startswith(first_step)
    assert sum(bv.components.values()) == pytest.approx(errors["test"])


def test_a_tie_goes_to_the_earlier_fix_in_the_lecture_order() -> None:
    # 0.06 - 0.01 and 0.11 - 0.06 differ in the last bit of a float; they are a tie.
    assert nbt.biasvar(train=0.06, val=0.11, irreducible=0.01).priority == "avoidable_bias"
    assert (
        nbt.biasvar(train=0.1, val=0.2, test_val=0.3, test=0.4, irreducible=0.05).priority
        == "variance"
    )


def test_without_test_val_there_is_no_distribution_shift_and_the_notes_say_how_to_get_one() -> None:
    bv = nbt.biasvar(train=0.1, val=0.15, test=0.2, irreducible=0.05)

    assert "distribution_shift" not in bv.components
    assert bv.components["val_overfitting"] == pytest.approx(0.05)
    assert any("Hold out part of the test distribution" in note for note in bv.notes)
    assert "Hold out part of the test distribution" in repr(bv)


def test_without_test_error_the_components_add_up_to_the_last_error_given() -> None:
    bv = nbt.biasvar(train=0.1, val=0.15, test_val=0.25)

    assert list(bv.components) == [
        "irreducible",
        "avoidable_bias",
        "variance",
        "distribution_shift",
    ]
    assert bv.total == 0.25 and sum(bv.components.values()) == pytest.approx(0.25)
    assert any("No irreducible error given" in note for note in bv.notes)


def test_negative_components_are_kept_and_explained() -> None:
    bv = nbt.biasvar(train=0.10, val=0.08, test_val=0.07, test=0.06, irreducible=0.12)

    assert bv.components["avoidable_bias"] == pytest.approx(-0.02)
    assert bv.components["variance"] == pytest.approx(-0.02)
    assert sum(bv.components.values()) == pytest.approx(0.06)
    text = repr(bv)
    assert "Variance (overfitting) is negative (-2.0%)" in text
    assert "Validation error is below train error" in text
    assert "Train error is below the irreducible-error estimate" in text
    assert "No reducible component is above zero" in text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"val": 0.2}, ValueError, "train: missing"),
        ({"train": 0.2}, ValueError, "val: missing"),
        ({"train": -0.1, "val": 0.2}, ValueError, "train: an error cannot be negative"),
        ({"train": 0.1, "val": float("nan")}, ValueError, "val: must be a finite error, got nan"),
        (
            {"train": 0.1, "val": 0.2, "test": float("inf")},
            ValueError,
            "test: must be a finite error",
        ),
        ({"train": "0.1", "val": 0.2}, TypeError, "train: expected a number, got str"),
        (
            {"train": 0.1, "val": 0.2, "irreducible": [0.01]},
            TypeError,
            "irreducible: expected a number, got list",
        ),
        (
            {"train": 0.1, "val": 0.2, "test_val": True},
            TypeError,
            "test_val: expected a number, got bool",
        ),
        ({"train": 0.1, "val": object()}, TypeError, "val: expected a number, got object"),
    ],
)
def test_bad_numbers_raise_errors_that_name_the_argument(
    kwargs: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        nbt.biasvar(**kwargs)


def test_a_loader_without_a_model_says_to_pass_the_model() -> None:
    loader = DataLoader(TensorDataset(torch.zeros(4, 2), torch.zeros(4)), batch_size=2)
    with pytest.raises(TypeError, match="pass the model first"):
        nbt.biasvar(train=loader, val=0.2)


def test_numpy_and_tensor_scalars_are_numbers() -> None:
    bv = nbt.biasvar(train=np.float32(0.25), val=torch.tensor(0.5))
    assert bv.errors == {"irreducible": 0.0, "train": 0.25, "val": 0.5}


# ---------------------------------------------------------------------------------------
# The rule, for any errors
# ---------------------------------------------------------------------------------------

error = st.floats(min_value=0.0, max_value=1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(
    train=error,
    val=error,
    irreducible=st.one_of(st.none(), error),
    test_val=st.one_of(st.none(), error),
    test=st.one_of(st.none(), error),
)
def test_components_add_up_and_priority_follows_the_rule(
    train, val, irreducible, test_val, test
) -> None:
    bv = nbt.biasvar(train=train, val=val, test=test, irreducible=irreducible, test_val=test_val)

    last = next(e for e in (test, test_val, val) if e is not None)
    assert math.isclose(sum(bv.components.values()), last, rel_tol=1e-9, abs_tol=1e-9)
    assert ("distribution_shift" in bv.components) == (test_val is not None)
    assert ("val_overfitting" in bv.components) == (test is not None)
    reducible = [k for k in REDUCIBLE if k in bv.components]
    largest = max(bv.components[k] for k in reducible)
    scale = max(
        1.0, *(abs(v) for v in bv.components.values())
    )  # ties are judged relative to the errors
    tied = [
        k
        for k in reducible
        if math.isclose(bv.components[k], largest, rel_tol=0, abs_tol=1e-9 * scale)
    ]
    assert bv.priority == tied[0]
    assert bv.next_steps == NEXT_STEPS[bv.priority]
    negative = [k for k in reducible if bv.components[k] < 0]
    for name in negative:
        assert any(note.startswith(f"{LABELS[name].capitalize()} is negative") for note in bv.notes)


# ---------------------------------------------------------------------------------------
# The model form
# ---------------------------------------------------------------------------------------


class FixedClassifier(torch.nn.Module):
    """Predicts class 1 for a positive first feature; has dropout and batch norm to switch."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(2)
        self.drop = torch.nn.Dropout(0.9)
        self.calls_in_training = 0
        self.grad_enabled: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls_in_training += int(self.training)
        self.grad_enabled.append(torch.is_grad_enabled())
        first = x[:, :1]
        return torch.cat([-first, first], dim=1)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def labelled(n_wrong: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples on which FixedClassifier makes exactly ``n_wrong`` mistakes."""
    x = torch.ones(n, 2)
    y = torch.ones(n, dtype=torch.long)
    y[:n_wrong] = 0
    return x, y


def test_model_form_measures_each_split_over_all_samples_and_restores_every_mode() -> None:
    model = FixedClassifier()
    model.train()
    model.drop.eval()  # a mixed state must come back exactly
    # Batches of 4 over 10 examples: the mean over batches (0.5 + 0 + 0) / 3 would be wrong.
    train = loader(*labelled(2, 10), batch_size=4, shuffle=True)
    val = loader(*labelled(3, 10), batch_size=3)
    test = loader(*labelled(4, 10), batch_size=10)
    rng_before = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    bv = nbt.biasvar(
        model, train=train, val=val, test=test, test_val=val, irreducible=0.05, progress=False
    )

    assert bv.errors == pytest.approx(
        {"irreducible": 0.05, "train": 0.2, "val": 0.3, "test_val": 0.3, "test": 0.4}
    )
    assert bv.priority == "avoidable_bias"
    assert model.calls_in_training == 0 and not any(model.grad_enabled)
    assert model.training and model.norm.training and not model.drop.training
    assert torch.is_grad_enabled()
    assert torch.equal(rng_before[0], torch.random.get_rng_state())
    assert rng_before[1] == random.getstate()
    assert np.array_equal(rng_before[2], np.random.get_state()[1])


def test_model_form_accepts_numbers_for_some_splits_and_dict_batches() -> None:
    class DictModel(torch.nn.Module):
        def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": torch.cat([-pixels[:, :1], pixels[:, :1]], dim=1)}

    x, y = labelled(1, 4)
    batches = [{"pixels": x[:2], "labels": y[:2]}, {"pixels": x[2:], "label": y[2:]}]

    bv = nbt.biasvar(DictModel(), train=batches, val=0.5, progress=False)

    assert bv.errors["train"] == pytest.approx(0.25)
    assert bv.errors["val"] == 0.5


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("mse", (1.0 + 4.0 + 0.0 + 1.0) / 4),
        ("mae", (1.0 + 2.0 + 0.0 + 1.0) / 4),
    ],
)
def test_regression_metrics_do_not_broadcast_n_by_1_against_n(metric: str, expected: float) -> None:
    model = torch.nn.Identity()
    outputs = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    targets = torch.tensor([0.0, 0.0, 3.0, 5.0])  # (N,) against the model's (N, 1)
    data = loader(outputs, targets, batch_size=3)

    bv = nbt.biasvar(model, train=data, val=data, metric=metric, progress=False)

    assert bv.errors["train"] == pytest.approx(expected)
    assert bv.metric == metric


def test_a_callable_metric_averages_over_samples_given_per_example_errors_or_batch_means() -> None:
    x, y = labelled(3, 7)
    data = loader(x, y, batch_size=4)  # batches of 4 and 3

    def per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(1) != targets).float()

    def batch_mean(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return float((outputs.argmax(1) != targets).float().mean())

    for metric in (per_example, batch_mean):
        bv = nbt.biasvar(FixedClassifier(), train=data, val=data, metric=metric, progress=False)
        assert bv.errors["train"] == pytest.approx(3 / 7)
    assert bv.metric == "batch_mean"


@pytest.mark.parametrize("head", [torch.nn.Identity(), torch.nn.Sigmoid()])
def test_one_output_per_example_is_read_as_logits_or_probabilities(head: torch.nn.Module) -> None:
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0], [3.0]])
    y = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])  # float 0/1 labels, as for BCEWithLogitsLoss

    bv = nbt.biasvar(head, train=loader(x, y, batch_size=2), val=0.0, progress=False)

    assert bv.errors["train"] == pytest.approx(2 / 5)


def test_model_form_bad_input() -> None:
    x, y = labelled(1, 4)
    empty = loader(x[:0], y[:0], batch_size=2)
    good = loader(x, y, batch_size=2)
    model = FixedClassifier()
    with pytest.raises(ValueError, match="val: the loader yielded no batches"):
        nbt.biasvar(model, train=good, val=empty, progress=False)
    with pytest.raises(TypeError, match="train: expected a data loader"):
        nbt.biasvar(model, train="train.csv", val=good, progress=False)
    with pytest.raises(ValueError, match="metric: unknown metric 'accuracy'"):
        nbt.biasvar(model, train=good, val=good, metric="accuracy")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module or a callable"):
        nbt.biasvar(0.2, train=0.3, val=0.4)
    with pytest.raises(ValueError, match="metric 'error' needs class labels"):
        nbt.biasvar(model, train=loader(x, torch.rand(4), batch_size=2), val=good, progress=False)
    with pytest.raises(TypeError, match="a dict with a 'labels' key, got Tensor"):
        nbt.biasvar(model, train=[x], val=good, progress=False)
    assert model.training


@pytest.mark.parametrize("raised", [RuntimeError("boom in forward"), KeyboardInterrupt()])
def test_the_users_own_exception_propagates_unchanged_and_the_mode_is_restored(
    raised: BaseException,
) -> None:
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise raised

    model = Broken()
    data = loader(*labelled(0, 2), batch_size=2, shuffle=True)
    rng_before = torch.random.get_rng_state()
    with pytest.raises(type(raised)) as caught:
        nbt.biasvar(model, train=data, val=0.1, progress=False)
    assert caught.value is raised
    assert model.training and torch.is_grad_enabled()
    assert torch.equal(rng_before, torch.random.get_rng_state())


# ---------------------------------------------------------------------------------------
# What the user sees
# ---------------------------------------------------------------------------------------


def test_the_waterfall_chart_adds_up_to_the_test_error_and_highlights_the_priority() -> None:
    from matplotlib.colors import to_hex

    from nbtrouble._biasvar_view import COLORS

    bv = nbt.biasvar(train=0.03, val=0.02, test_val=0.06, test=0.09, irreducible=0.01)
    bars = bv.figure().axes[0].patches

    assert len(bars) == len(bv.components) + 1  # one bar per component and the total
    tops = [bar.get_y() + bar.get_height() for bar in bars]
    assert tops[-1] == pytest.approx(0.09)
    assert max(tops[:-1]) == pytest.approx(0.09)
    variance = bars[2]  # negative: drawn downwards from the running total
    assert variance.get_y() == pytest.approx(0.02) and variance.get_height() == pytest.approx(0.01)
    colors = [to_hex(bar.get_facecolor()) for bar in bars]
    assert colors[list(bv.components).index("distribution_shift")] == COLORS["priority"]
    assert colors.count(COLORS["priority"]) == 1


def test_panel_holds_chart_table_next_steps_and_notes() -> None:
    import ipywidgets as widgets

    bv = nbt.biasvar(train=0.20, val=0.27, test=0.28, irreducible=0.01)
    box = bv.panel()

    title, row, steps, notes = box.children
    chart, table = row.children
    assert isinstance(chart, widgets.Image) and chart.format == "png"
    assert bytes(chart.value).startswith(b"\x89PNG")
    assert "19.0%" in table.value and "fix first" in table.value
    assert steps.value.count("<li>") == len(NEXT_STEPS["avoidable_bias"])
    assert "Make the model bigger" in steps.value
    assert "Hold out part of the test distribution" in notes.value
    assert "28.0%" in title.value


def test_text_and_html_forms() -> None:
    bv = nbt.biasvar(train=0.20, val=0.27, test=0.28, irreducible=0.01)

    text = repr(bv)
    assert "avoidable bias (underfitting)     19.0%  <- fix first" in text
    assert "  1. Make the model bigger" in text
    page = bv._repr_html_()
    assert page.count("data:image/png;base64,") == 1 and "<ol class='nbtrouble-next-steps'>" in page


def test_classification_error_reads_token_logits_ignored_positions_one_hot_and_multi_label() -> (
    None
):
    identity = torch.nn.Identity()
    # Token classification, Hugging Face layout (N, T, C); -100 marks padding.
    logits = torch.tensor(
        [[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]], [[0.0, 2.0], [0.0, 2.0], [2.0, 0.0]]]
    )
    tokens = torch.tensor([[0, 0, -100], [1, 1, 1]])  # one mistake of 2 labelled; 1 of 3
    one_hot = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # scores (2, 0) then (0, 2): both wrong
    multi_label = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # logits (2, 0), (0, 2): 1 of 4 wrong
    scores = torch.tensor([[2.0, -1.0], [-1.0, 2.0]])

    def error_on(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        data = loader(outputs, targets, batch_size=2)
        return nbt.biasvar(identity, train=data, val=0.0, progress=False).errors["train"]

    assert error_on(logits, tokens) == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert error_on(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), one_hot) == pytest.approx(1.0)
    assert error_on(scores, multi_label) == pytest.approx((1 / 2 + 0) / 2)


def test_every_number_is_checked_before_any_loader_is_evaluated() -> None:
    model = FixedClassifier()
    with pytest.raises(ValueError, match="test: an error cannot be negative"):
        nbt.biasvar(model, train=loader(*labelled(1, 4), batch_size=2), val=0.1, test=-1.0)
    assert model.grad_enabled == []  # never called

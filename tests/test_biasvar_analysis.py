"""``nbt.error_analysis`` and ``nbt.learning_curve``: the lecture's tables and curves."""

from __future__ import annotations

import math

import pytest
import torch

import nbtrouble as nbt

torch.set_num_threads(1)


def test_error_analysis_from_known_errors_sorts_slices_by_what_fixing_them_gains() -> None:
    # Test-validation: 10 examples; "night" holds 4 with 3 mistakes, "reflection" 2 with 1,
    # the other 4 ("day") 0 mistakes: total error 4 / 10.
    test_val_errors = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    test_val_slices = ["night"] * 4 + ["reflection"] * 2 + ["day"] * 4
    train_val_errors = [0, 1, 0, 0, 0, 0]
    train_val_slices = ["night", "night", "reflection", "reflection", "day", "day"]

    ea = nbt.error_analysis(
        train_val=(train_val_errors, train_val_slices), test_val=(test_val_errors, test_val_slices)
    )

    assert [row.slice for row in ea.rows] == ["night", "reflection", "day"]
    night, reflection, day = ea.rows
    assert (night.n_train_val, night.n_test_val) == (2, 4)
    assert night.error_train_val == pytest.approx(0.5)
    assert night.error_test_val == pytest.approx(0.75)
    assert night.share == pytest.approx(3 / 4)
    # Brought to the error of the rest (1 / 6), night would lose 3 - 4/6 mistakes of 10 examples.
    assert night.gain == pytest.approx((3 - 4 / 6) / 10)
    assert reflection.share == pytest.approx(1 / 4)
    assert reflection.gain == pytest.approx((1 - 2 * 3 / 8) / 10)
    assert day.gain == 0.0 and day.share == 0.0
    assert ea.error_test_val == pytest.approx(0.4) and ea.reference == "test_val"
    text = repr(ea)
    assert text.splitlines()[2].split()[:1] == ["night"]
    assert "75.0%" in text and "<td>night</td>" in ea._repr_html_()


def test_error_analysis_with_a_model_a_slicing_function_and_a_column_key() -> None:
    class Threshold(torch.nn.Module):
        def forward(self, brightness: torch.Tensor) -> torch.Tensor:
            return torch.stack([brightness - 0.5, 0.5 - brightness], dim=1)  # class 1 when dark

    brightness = torch.tensor([0.9, 0.8, 0.2, 0.1, 0.3, 0.7])
    labels = torch.tensor([0, 0, 0, 1, 0, 1])  # wrong on examples 2, 4, 5
    names = ["day", "day", "night", "night", "night", "day"]
    batches = [
        {"brightness": brightness[i : i + 3], "labels": labels[i : i + 3], "when": names[i : i + 3]}
        for i in (0, 3)
    ]

    by_key = nbt.error_analysis(Threshold(), train_val=batches, slices="when", progress=False)

    def by_brightness(batch: dict) -> list[str]:
        return ["night" if b < 0.5 else "day" for b in batch["brightness"].tolist()]

    plain = [{k: v for k, v in batch.items() if k != "when"} for batch in batches]
    by_function = nbt.error_analysis(
        Threshold(), train_val=plain, test_val=plain, slices=by_brightness, progress=False
    )

    for ea in (by_key, by_function):
        rows = {row.slice: row for row in ea.rows}
        assert rows["night"].error_train_val == pytest.approx(2 / 3)
        assert rows["day"].error_train_val == pytest.approx(1 / 3)
        assert ea.rows[0].slice == "night"
    assert by_key.reference == "train_val" and "No test-distribution validation set" in repr(by_key)
    assert by_function.rows[0].n_test_val == 3


def test_error_analysis_bad_input() -> None:
    with pytest.raises(ValueError, match="train_val: 3 errors but 2 slice labels"):
        nbt.error_analysis(train_val=([0, 1, 0], ["a", "b"]))
    with pytest.raises(
        TypeError, match="train_val: without a model, pass an \\(errors, labels\\) pair"
    ):
        nbt.error_analysis(train_val=[0, 1, 0])
    with pytest.raises(ValueError, match="train_val: errors must be finite and non-negative"):
        nbt.error_analysis(train_val=([0, math.nan], ["a", "b"]))
    with pytest.raises(ValueError, match="slices: missing"):
        nbt.error_analysis(torch.nn.Identity(), train_val=[(torch.zeros(2, 2), torch.zeros(2))])


def test_learning_curve_says_more_data_helps_while_validation_falls_and_the_gap_is_large() -> None:
    lc = nbt.learning_curve(
        [4000, 1000, 2000], train=[0.03, 0.01, 0.02], val=[0.16, 0.30, 0.22], irreducible=0.01
    )

    assert lc.sizes == [1000, 2000, 4000] and lc.val == [0.30, 0.22, 0.16]
    assert lc.more_data_helps
    assert lc.verdict.startswith("More data is likely to help")
    axes = lc.plot().axes[0]
    assert [line.get_label() for line in axes.get_lines()] == [
        "train error",
        "validation error",
        "irreducible error",
    ]
    assert list(axes.get_lines()[2].get_ydata()) == [0.01, 0.01]
    assert "data:image/png;base64," in lc._repr_html_()


@pytest.mark.parametrize(
    ("train", "val", "starts"),
    [
        (
            [0.02, 0.03, 0.03],
            [0.20, 0.199, 0.199],
            "More of the same data is unlikely to help much",
        ),
        ([0.20, 0.22, 0.24], [0.30, 0.28, 0.26], "More data helps little"),
        ([0.25, 0.25, 0.25], [0.27, 0.27, 0.27], "More data is unlikely to help"),
    ],
)
def test_learning_curve_says_when_more_data_will_not_help(
    train: list, val: list, starts: str
) -> None:
    lc = nbt.learning_curve([100, 200, 400], train=train, val=val, irreducible=0.01)

    assert not lc.more_data_helps
    assert lc.verdict.startswith(starts)


def test_learning_curve_from_a_function_that_trains_on_a_subset() -> None:
    calls = []

    def fit(size: int) -> tuple[float, float]:
        calls.append(size)
        return 0.0, 1.0 / math.sqrt(size)

    lc = nbt.learning_curve([400, 100, 1600], fit=fit)

    assert calls == [100, 400, 1600]
    assert lc.val == pytest.approx([0.1, 0.05, 0.025])
    assert lc.more_data_helps


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"sizes": [100], "train": [0.1], "val": [0.2]},
            ValueError,
            "sizes: a learning curve needs at least two",
        ),
        (
            {"sizes": [100, 200], "train": [0.1], "val": [0.2, 0.3]},
            ValueError,
            "train: 1 errors for 2 sizes",
        ),
        (
            {"sizes": [100, 200], "train": [0.1, -0.1], "val": [0.2, 0.3]},
            ValueError,
            "train: an error cannot be negative",
        ),
        (
            {"sizes": [100, 200], "train": [0.1, 0.1], "val": ["a", 0.3]},
            TypeError,
            "val: expected a number, got str",
        ),
        ({"sizes": [100, 200], "train": [0.1, 0.1]}, ValueError, "val: missing"),
        (
            {"sizes": [100, 100], "train": [0.1, 0.1], "val": [0.2, 0.3]},
            ValueError,
            "sizes: training-set sizes must differ",
        ),
        ({"sizes": [100, 200], "fit": lambda n: 0.1}, TypeError, "fit: fit\\(100\\) must return"),
    ],
)
def test_learning_curve_bad_input(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        nbt.learning_curve(**kwargs)

"""``%biasvar``: through an IPython shell, and in a real kernel with the panel."""

from __future__ import annotations

import base64

import pytest
import torch
from IPython.core.error import UsageError
from kernel_utils import SETUP_CELL, cell_text, outputs_with, run_notebook
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ip(ipython_shell):
    shell = ipython_shell
    return shell


@pytest.fixture
def live_objects(ip):
    x = torch.ones(10, 2)
    y = torch.ones(10, dtype=torch.long)
    y[:3] = 0  # the model below gets 3 of 10 wrong
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        model.bias.zero_()
    model.train()
    ip.user_ns.update(
        model=model,
        train_loader=DataLoader(TensorDataset(x, y), batch_size=4),
        val_loader=DataLoader(TensorDataset(x, y), batch_size=3),
        empty_loader=DataLoader(TensorDataset(x[:0], y[:0]), batch_size=3),
        train_err=0.2,
    )
    return model


def test_numbers_form_prints_the_report_and_stores_it(ip, capsys) -> None:
    ip.user_ns["train_err"] = 0.2
    ip.run_line_magic("biasvar", "--train train_err --val 0.27 --test 0.28 --human 0.01 --name bv")

    out = capsys.readouterr().out
    assert "avoidable bias (underfitting)     19.0%  <- fix first" in out
    assert ip.user_ns["bv"] is ip.user_ns["_biasvar"]
    assert ip.user_ns["bv"].priority == "avoidable_bias"


def test_model_form_evaluates_the_loaders(ip, live_objects, capsys) -> None:
    ip.run_line_magic(
        "biasvar",
        "model train_loader val_loader val_loader --test-val val_loader --human 0.1 --no-progress",
    )

    report = ip.user_ns["_biasvar"]
    assert report.errors == pytest.approx(
        {"irreducible": 0.1, "train": 0.3, "val": 0.3, "test_val": 0.3, "test": 0.3}
    )
    assert "distribution_shift" in report.components
    assert live_objects.training
    assert "Bias-variance decomposition" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--train -0.1 --val 0.2", "%biasvar --train: an error cannot be negative"),
        ("--train nan --val 0.2", "%biasvar --train: must be a finite error, got nan"),
        ("--train 0.1 --val 0.2 --human -1", "%biasvar --human: an error cannot be negative"),
        (
            "--train 0.1 --val 0.2 --test-val '\"x\"'",
            "%biasvar --test-val: expected a number, got str",
        ),
        ("--train 0.1", "%biasvar --val: missing"),
        ("--train abc --val 0.2", "%biasvar --train: name 'abc' is not defined"),
        ("--train 0.1 --val train_loader", "%biasvar --val: got a DataLoader, not a number"),
        ("model train_loader", "give the model, the train loader and the val loader"),
        ("model train_loader empty_loader", "%biasvar --val: the loader yielded no batches"),
        (
            "model train_loader val_loader --metric accuracy",
            "%biasvar --metric: name 'accuracy' is not defined",
        ),
        (
            "model train_loader val_loader --metric train_err",
            "neither error, mse, mae nor a callable",
        ),
        ("model train_loader val_loader --train 0.1", "train given twice"),
        ("--train 0.1 --val 0.2 --bogus", "unrecognized arguments: --bogus"),
        ("--train '0.1 --val 0.2", "No closing quotation"),
        ("--train 0.1 --val 0.2 --name 1x", "'1x' is not a valid variable name"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_option(
    ip, live_objects, line: str, message: str
) -> None:
    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("biasvar", line)
    assert type(raised.value) is UsageError
    assert message in str(raised.value)
    assert live_objects.training


def test_help_is_the_docstring(ip) -> None:
    doc = ip.find_line_magic("biasvar").__doc__
    assert "%biasvar --train 0.20 --val 0.27 --test 0.28 --human 0.01" in doc
    assert "--test-val" in doc


@pytest.mark.kernel
def test_both_forms_in_a_real_kernel_show_the_panel_with_its_chart() -> None:
    nb = run_notebook(
        [
            SETUP_CELL,
            "%biasvar --train 0.20 --val 0.27 --test 0.28 --human 0.01",
            (
                "from torch import nn\nfrom torch.utils.data import DataLoader, TensorDataset\n"
                "x = torch.randn(64, 4); y = (x[:, 0] > 0).long()\n"
                "model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))\n"
                "loader = DataLoader(TensorDataset(x, y), batch_size=16)"
            ),
            "%biasvar model loader loader loader --test-val loader --metric error --name r",
            "print(sorted(r.components), model.training, model[1].training)",
            "%biasvar --train -1 --val 0.2",
        ],
        timeout=60,
    )
    numbers, live = nb.cells[1], nb.cells[3]
    for cell in (numbers, live):
        assert not [o for o in cell.outputs if o.output_type == "error"], cell_text(cell)
        assert outputs_with(cell, "application/vnd.jupyter.widget-view+json")
    components = (
        "['avoidable_bias', 'distribution_shift', 'irreducible', 'val_overfitting', 'variance']"
    )
    assert f"{components} True True" in cell_text(nb.cells[4])
    # IPython shows a UsageError in its short form, one line on stderr.
    assert "UsageError: %biasvar --train: an error cannot be negative, got -1.0" in cell_text(
        nb.cells[5]
    )

    state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    images = [w for w in state.values() if w["model_name"] == "ImageModel"]
    assert len(images) == 2
    for image in images:
        png = image["state"].get("value") or next(b["data"] for b in image.get("buffers", []))
        assert base64.b64decode(png).startswith(b"\x89PNG")
    tables = [w["state"]["value"] for w in state.values() if w["model_name"] == "HTMLModel"]
    assert any("19.0%" in t and "fix first" in t for t in tables)

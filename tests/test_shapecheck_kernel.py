"""``%%shapecheck`` in a real Jupyter kernel: the panel's outputs, an HTML export, ipdb over stdin."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from kernel_utils import (
    SETUP_CELL,
    SHAPE_BUG_MODELS,
    cell_text,
    execute_with_input,
    outputs_with,
    run_notebook,
    running_kernel,
)

pytestmark = pytest.mark.kernel

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def notebook():
    return run_notebook(
        [
            SETUP_CELL,
            SHAPE_BUG_MODELS,
            "%%shapecheck\ny = mlp(x)",
            "%%shapecheck --meta\nlogits = cnn(images)",
            "print(type(_shapecheck.failure.error).__name__, _shapecheck.failure.module)",
        ]
    )


def test_notebook_shows_users_error_then_panel(notebook):
    cell = notebook.cells[2]
    kinds = [o.output_type for o in cell.outputs]
    assert kinds == ["error", "display_data"]  # IPython's traceback as usual, then the panel
    assert cell.outputs[0].ename == "RuntimeError"
    (panel,) = outputs_with(cell, WIDGET_VIEW)
    text = panel.data["text/plain"]
    assert text.startswith("shapecheck FAILED")
    assert "FAILED shape_mismatch in fc1 (Linear)" in text
    assert "input    (3, 7) float32 cpu" in text and "weight   (5, 10) float32 cpu" in text
    assert "x = self.fc1(x)" in text
    assert cell_text(notebook.cells[4]) == "RuntimeError fc1\n"


def test_panel_widgets_hold_failure_first_and_modules_collapsed(notebook):
    state = notebook.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    (panel,) = outputs_with(notebook.cells[3], WIDGET_VIEW)
    root = state[panel.data[WIDGET_VIEW]["model_id"]]["state"]
    children = [state[ref.removeprefix("IPY_MODEL_")] for ref in root["children"]]
    names = [child["model_name"] for child in children]
    assert names == ["HTMLModel", "HTMLModel", "AccordionModel"]
    failure = children[1]["state"]["value"]
    assert "FAILED shape_mismatch in fc1 (Linear)" in failure
    assert "(2, 2704) float32 meta" in failure and "(10, 400) float32 meta" in failure
    accordion = children[2]["state"]
    assert accordion["titles"][accordion["selected_index"]].startswith("✗ fc1 · Linear")
    assert any(title.startswith("features.3 · Conv2d") for title in accordion["titles"])


def test_walkthrough_html_shows_the_report_offline(notebook, tmp_path):
    """The README's main job writes HTML that shows the panel without the widgets' JavaScript."""
    spec = importlib.util.spec_from_file_location(
        "run_walkthrough", Path(__file__).parents[1] / "scripts" / "run_walkthrough.py"
    )
    run_walkthrough = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_walkthrough)

    body = run_walkthrough.write_html(notebook, tmp_path / "nb.html").read_text()
    assert "FAILED shape_mismatch in fc1 (Linear)" in body
    assert re.search(
        r"<details open(=\"\")?><summary>✗ fc1 · Linear", body
    )  # opened on the failure
    assert "(2, 2704) float32 meta" in body
    assert "widgets" in notebook.metadata  # the executed notebook itself keeps its widget state


def test_debugger_over_stdin_opens_at_forward_and_goes_up_to_cell():
    with running_kernel() as kc:
        setup = execute_with_input(kc, SETUP_CELL + "\n" + SHAPE_BUG_MODELS, [])
        assert setup.status == "ok", setup.transcript
        commands = [
            "p nbt_operands['input'].shape",
            "p nbt_operands['weight'].shape",
            "up",
            "p marker",
        ]
        run = execute_with_input(kc, "%%shapecheck --debug\nmarker = 42\ny = mlp(x)", commands)

        assert run.prompts == ["ipdb> "] * 5
        transcript = run.transcript
        opening = transcript[transcript.index("nbtrouble: ") : transcript.index("ipdb> ")]
        assert re.search(r"-+> \d+\s+x = self\.fc1\(x\)", opening)
        assert "ipdb> p nbt_operands['input'].shape\ntorch.Size([3, 7])" in transcript
        assert "ipdb> p nbt_operands['weight'].shape\ntorch.Size([5, 10])" in transcript
        after_up = transcript[transcript.index("ipdb> up\n") :]
        assert re.search(r"-+> 2 y = mlp\(x\)", after_up)
        assert "ipdb> p marker\n42" in transcript

        later = execute_with_input(
            kc,
            "%%shapecheck --quiet\nlogits = cnn(images)",
            [],
        )
        assert "FAILED shape_mismatch in fc1" in later.transcript
        run = execute_with_input(kc, "%shapecheck_debug", ["p nbt_operands['input'].shape", "up"])
        assert re.search(r"-+> \d+\s+return self\.fc1\(x\)", run.transcript)
        assert "torch.Size([2, 2704])" in run.transcript
        assert "logits = cnn(images)" in run.transcript[run.transcript.index("ipdb> up\n") :]

        check = execute_with_input(kc, "print('nbt_operands' in globals())", [])
        assert check.transcript == "False\n"

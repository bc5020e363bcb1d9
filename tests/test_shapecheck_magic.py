"""``%%shapecheck`` and ``%shapecheck_debug`` through a real IPython ``InteractiveShell``."""

from __future__ import annotations

import io
import re

import ipywidgets as widgets
import pytest
import torch
from IPython.core.error import UsageError

from kernel_utils import SHAPE_BUG_MODELS

from nbtrouble._shapes_view import PANEL_MODULES, trace_panel, trace_text

torch.set_num_threads(1)

MODELS = "import torch\n" + SHAPE_BUG_MODELS


@pytest.fixture(scope="module")
def ip(ipython_shell):
    shell = ipython_shell
    assert shell.run_cell(MODELS).success
    return shell


def run(ip, cell, capsys):
    """Run ``cell``, return the outer result, everything printed, and the stored trace."""
    capsys.readouterr()
    ip.user_ns.pop("_shapecheck", None)
    result = ip.run_cell(cell)
    return result, capsys.readouterr().out, ip.user_ns.get("_shapecheck")


def test_mlp_failure_names_layer_shapes_and_user_line(ip, capsys):
    result, out, trace = run(ip, "%%shapecheck\ny = mlp(x)", capsys)

    assert result.error_in_exec is None  # the magic itself did not fail
    assert "RuntimeError" in out and "mat1 and mat2 shapes cannot be multiplied" in out
    assert isinstance(trace.failure.error, RuntimeError)  # the user's error, type unchanged
    assert trace.failure.module == "fc1"
    report = out[out.index("shapecheck FAILED") :]
    failure_block = report.split("\n\n")[1]
    assert failure_block.startswith("FAILED shape_mismatch in fc1 (Linear)")
    assert "(3, 7)" in failure_block and "(5, 10)" in failure_block
    assert "x = self.fc1(x)" in failure_block  # the user's line, not one inside torch
    assert "what to do" in failure_block
    assert repr(trace) == trace_text(trace)


def test_cnn_flatten_failure_groups_ops_by_module(ip, capsys):
    _, out, trace = run(ip, "%%shapecheck\nlogits = cnn(images)", capsys)

    text = out[out.index("shapecheck FAILED") :]
    assert "FAILED shape_mismatch in fc1 (Linear)" in text
    assert "(2, 2704)" in text and "(10, 400)" in text
    assert "return self.fc1(x)" in text
    groups = text[text.index("ops by module:") :]
    assert re.search(r"features\.0 · Conv2d .*\n.*conv2d  \(2, 3, 32, 32\) float32", groups)
    assert "features.3 · Conv2d" in groups
    assert groups.index("features.0") < groups.index("features.3") < groups.index("fc1 · Linear")
    assert "(2, 16, 13, 13)" in groups  # the output shape of features.3
    assert trace.failure.location and "fc1" in trace.failure.finding.where


def test_meta_runs_on_shapes_only(ip, capsys):
    weight_before = ip.user_ns["mlp"].fc1.weight.detach().clone()
    _, out, trace = run(ip, "%%shapecheck --meta\ny = mlp(x)", capsys)

    assert trace.meta and "meta tensors (shapes only)" in out
    assert trace.failure.module == "fc1"
    assert {t.device.type for t in trace.failure.operands.values()} == {"meta"}
    assert "(3, 7) float32 meta" in out
    assert torch.equal(ip.user_ns["mlp"].fc1.weight, weight_before)


def test_clean_cell_shows_ops_and_quiet_shows_nothing(ip, capsys):
    ip.run_cell("good = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())")
    _, out, trace = run(ip, "%%shapecheck\ny = good(x)", capsys)
    assert trace.failure is None
    assert out.startswith("shapecheck ok:")
    assert "0 · Linear" in out and "(3, 4) float32, (3, 4) float32, (3,) float32 -> (3, 3)" in out

    _, out, trace = run(ip, "%%shapecheck --quiet\ny = good(x)", capsys)
    assert trace is not None and out == ""


def test_trace_stored_under_given_name(ip, capsys):
    run(ip, "%%shapecheck --quiet mine\ny = mlp(x)", capsys)
    assert ip.user_ns["mine"] is ip.user_ns["_shapecheck"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--bogus", "unrecognized arguments: --bogus"),
        ("--meta extra words", "unrecognized arguments: words"),
        ("'unbalanced", "No closing quotation"),
        ("1bad", "not a valid variable name"),
    ],
)
def test_bad_options_raise_usage_error_with_usage_line(ip, line, message):
    with pytest.raises(UsageError, match=re.escape(message)) as caught:
        ip.run_cell_magic("shapecheck", line, "y = mlp(x)")
    assert type(caught.value) is UsageError  # IPython prints the short form only for this class
    assert "usage: %%shapecheck [--meta] [--debug] [--quiet] [name]" in str(caught.value)
    assert type(ip.run_cell(f"%%shapecheck {line}\ny = mlp(x)").error_in_exec) is UsageError


def test_shapecheck_debug_usage_errors(ip):
    ip.user_ns.pop("_shapecheck", None)
    with pytest.raises(UsageError, match="run a cell with %%shapecheck first"):
        ip.run_line_magic("shapecheck_debug", "")
    ip.run_cell("%%shapecheck --quiet\ny = mlp(x)")
    ip.run_cell("%%shapecheck --quiet clean\nz = torch.ones(2) + 1")
    with pytest.raises(UsageError, match="nothing failed in clean"):
        ip.run_line_magic("shapecheck_debug", "clean")
    with pytest.raises(UsageError, match="x is not a shape trace"):
        ip.run_line_magic("shapecheck_debug", "x")
    with pytest.raises(UsageError, match="name 'no_such_trace' is not defined"):
        ip.run_line_magic("shapecheck_debug", "no_such_trace")


def test_help_shows_usage_options_and_debugger_names(ip, capsys):
    capsys.readouterr()
    ip.run_cell("%%shapecheck?")
    out = capsys.readouterr().out
    assert "%%shapecheck [--meta] [--debug] [--quiet] [name]" in out
    for text in ("--meta", "--debug", "--quiet", "nbt_operands", "nbt_failure", "_shapecheck"):
        assert text in out


def test_users_own_exception_keeps_its_type(ip, capsys):
    cell = "%%shapecheck\nitems = {}\nitems['missing']"
    result, out, trace = run(ip, cell, capsys)
    assert result.error_in_exec is None
    assert "KeyError" in out and "'missing'" in out
    assert trace is not None
    assert trace.failure is None or isinstance(trace.failure.error, KeyError)


def drive_debugger(ip, capsys, monkeypatch, cell, commands):
    """Run ``cell`` answering the debugger's prompts with ``commands``; return what it printed."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(c + "\n" for c in commands)))
    capsys.readouterr()
    ip.run_cell(cell)
    return capsys.readouterr().out


def test_debug_opens_on_forward_line_with_operands(ip, capsys, monkeypatch):
    ip.user_ns["nbt_failure"] = "the user's own value"
    commands = [
        "p nbt_operands['input'].shape",
        "p nbt_operands['weight'].shape",
        "p x.shape",  # the forward's local x, as the failing layer got it
        "up",
        "p marker",
        "q",
    ]
    out = drive_debugger(
        ip, capsys, monkeypatch, "%%shapecheck --debug\nmarker = 42\ny = mlp(x)", commands
    )

    debugger = out[out.index("nbtrouble: torch.nn.functional.linear failed in module fc1") :]
    stop = debugger[: debugger.index("ipdb>")]
    assert re.search(r"-+> \d+\s+x = self\.fc1\(x\)", stop)  # the forward's line, not torch's
    assert "nbt_operands['input'] (3, 7) float32 cpu" in debugger
    answers = debugger.split("ipdb> ")[1:]
    assert answers[0].startswith("torch.Size([3, 7])")
    assert answers[1].startswith("torch.Size([5, 10])")
    assert answers[2].startswith("torch.Size([3, 7])")
    assert re.search(r"-+> 2 y = mlp\(x\)", answers[3])  # `up` reaches the cell
    assert answers[4].startswith("42")
    assert "nbt_operands" not in ip.user_ns  # the session's names are gone
    assert ip.user_ns["nbt_failure"] == "the user's own value"


def test_shapecheck_debug_after_the_fact(ip, capsys, monkeypatch):
    ip.run_cell("%%shapecheck --quiet\nlogits = cnn(images)")
    commands = ["p nbt_operands['input'].shape", "p nbt_failure.module", "up", "q"]
    out = drive_debugger(ip, capsys, monkeypatch, "%shapecheck_debug", commands)

    answers = out.split("ipdb> ")
    assert re.search(r"-+> \d+\s+return self\.fc1\(x\)", answers[0])
    assert answers[1].startswith("torch.Size([2, 2704])")
    assert answers[2].startswith("'fc1'")
    assert "logits = cnn(images)" in answers[3]


def test_panel_puts_failure_first_and_opens_failing_module(ip, capsys):
    _, _, trace = run(ip, "%%shapecheck --quiet\nlogits = cnn(images)", capsys)
    panel = trace_panel(trace)

    summary, failure, *_ = panel.children
    assert "shapecheck FAILED" in summary.value
    assert "FAILED shape_mismatch in fc1 (Linear)" in failure.value
    assert "(2, 2704)" in failure.value and "return self.fc1(x)" in failure.value
    assert "nbtrouble-failure" in failure._dom_classes
    accordion = accordion_of(panel)
    titles = accordion.titles
    assert any(t.startswith("features.0 · Conv2d") for t in titles)
    assert titles[accordion.selected_index].startswith("✗ fc1 · Linear")
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"] == trace_text(trace)
    assert "<details open><summary>✗ fc1 · Linear" in bundle["text/html"]


def accordion_of(panel):
    (accordion,) = [child for child in panel.children if isinstance(child, widgets.Accordion)]
    return accordion


def test_large_trace_stays_readable(ip, capsys):
    ip.run_cell(
        "deep = nn.Sequential(*[nn.Linear(8, 8) for _ in range(60)], nn.Linear(9, 2))\n"
        "h = torch.randn(4, 8)"
    )
    cell = "%%shapecheck\nfor _ in range(5):\n    deep[:60](h)\ndeep(h)"
    _, out, trace = run(ip, cell, capsys)

    lines = out[out.index("shapecheck FAILED") :].splitlines()
    assert lines[2].startswith("FAILED shape_mismatch in 60 (Linear)")
    assert len(lines) < 200
    assert any(re.match(r"\s+\.\.\. \d+ more modules", line) for line in lines)
    accordion = accordion_of(trace_panel(trace))
    assert len(accordion.children) <= PANEL_MODULES
    assert accordion.titles[0].startswith("0 · Linear")
    assert accordion.titles[accordion.selected_index].startswith("✗ 60 · Linear")


def test_findings_show_with_hint_even_when_quiet(ip, capsys):
    ip.run_cell("pred, target = torch.randn(8, 1), torch.randn(8)")
    _, out, trace = run(ip, "%%shapecheck --quiet\nloss = ((pred - target) ** 2).mean()", capsys)

    assert trace.failure is None
    assert out.startswith("shapecheck found 1 problem: 3 ops in 0 modules")
    assert re.search(
        r"\[warning\] silent_broadcast: .*\(8, 1\) - .*\(8,\) broadcast to \(8, 8\)", out
    )
    assert re.search(r"\n      at <ipython-input-[\w-]+>:1\n", out)  # the user's line
    findings = trace_panel(trace).children[1].value
    assert "silent_broadcast" in findings and "&rarr;" in findings  # the hint, what to do next

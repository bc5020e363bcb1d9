"""``%%shapecheck`` in terminal IPython, driven with pexpect: the text report and ipdb."""

from __future__ import annotations

import re

import pexpect
import pytest
from kernel_utils import IN_PROMPT, IPDB_PROMPT, terminal_ipython

MODEL_FILE = """\
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(4, 7)
        self.fc1 = nn.Linear(10, 5)  # wrong: fc0 gives 7 features

    def forward(self, x):
        x = torch.relu(self.fc0(x))
        x = self.fc1(x)
        return x
"""


@pytest.fixture
def ipython(tmp_path):
    (tmp_path / "mlp_model.py").write_text(MODEL_FILE)
    child = terminal_ipython(tmp_path)
    for line in [
        "import torch",
        "torch.set_num_threads(1)",
        "%load_ext nbtrouble",
        "from mlp_model import MLP",
        "mlp, x = MLP(), torch.randn(3, 4)",
    ]:
        child.sendline(line)
        child.expect(IN_PROMPT)
    yield child
    child.close(force=True)


def answer(child, command):
    """Send a debugger command; return what it printed up to the next prompt."""
    child.sendline(command)
    child.expect(IPDB_PROMPT)
    return child.before


def test_terminal_report_and_debugger(ipython):
    child = ipython
    child.sendline("%%shapecheck --debug")
    child.sendline("marker = 42")
    child.sendline("y = mlp(x)")
    child.sendline("")  # the plain prompt ends a cell magic at its second blank line
    child.sendline("")
    child.expect(IPDB_PROMPT)
    shown = child.before

    assert "RuntimeError" in shown and "mat1 and mat2 shapes cannot be multiplied" in shown
    report = shown[shown.index("shapecheck FAILED") :]
    assert "FAILED shape_mismatch in fc1 (Linear)" in report
    assert "input    (3, 7) float32 cpu" in report and "weight   (5, 10) float32 cpu" in report
    assert re.search(r"your line: .*mlp_model\.py:13\s+x = self\.fc1\(x\)", report)
    opening = report[report.index("nbtrouble: ") :]
    assert re.search(r"mlp_model\.py\(13\)forward\(\)", opening)
    assert re.search(r"-+> 13\s+x = self\.fc1\(x\)", opening)

    assert "torch.Size([3, 7])" in answer(child, "p nbt_operands['input'].shape")
    assert "torch.Size([5, 10])" in answer(child, "p nbt_operands['weight'].shape")
    assert "'fc1'" in answer(child, "p nbt_failure.module")
    assert re.search(r"-+> 2 y = mlp\(x\)", answer(child, "up"))
    assert "42" in answer(child, "p marker")
    child.sendline("q")
    child.expect(IN_PROMPT)
    child.sendline("'nbt_operands' in globals(), type(_shapecheck.failure.error).__name__")
    child.expect(IN_PROMPT)
    assert "(False, 'RuntimeError')" in child.before


def test_prompt_toolkit_terminal_uses_terminal_pdb_after_the_fact(tmp_path):
    (tmp_path / "mlp_model.py").write_text(MODEL_FILE)
    child = terminal_ipython(tmp_path, simple_prompt=False)
    try:
        for line in [
            "import torch",
            "torch.set_num_threads(1)",
            "%load_ext nbtrouble",
            "from mlp_model import MLP",
            "mlp, x = MLP(), torch.randn(3, 4)",
        ]:
            child.send(line + "\r")
            child.expect(r"In \[")
        child.send("get_ipython().debugger_cls.__name__\r")
        child.expect("'TerminalPdb'")
        child.send("%%shapecheck --quiet\r")
        child.send("y = mlp(x)\r\r\r")
        child.expect(r"FAILED shape_mismatch in fc1 \(Linear\)")
        child.send("%shapecheck_debug\r")
        child.expect(r"mlp_model\.py\(13\)forward\(\)")
        child.expect(r"-+> 13\s+x = self\.fc1\(x\)")
        child.send("p nbt_operands['input'].shape\r")
        child.expect(r"torch\.Size\(\[3, 7\]\)")
        child.send("up\r")
        child.expect(r"-+> 1 y = mlp\(x\)")
        child.send("q\r")
        child.expect(r"In \[")
        child.send("exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)

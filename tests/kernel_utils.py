"""Real kernels and terminals for tests: run a notebook, drive a debugger, read what a user sees.

- ``run_notebook(cells)``: execute cells in a fresh kernel with nbclient, outputs kept.
- ``cell_text(cell)``: everything a cell showed, as plain text (ANSI colours removed).
- ``running_kernel()`` + ``execute_with_input(kc, code, answers)``: run code that asks for
  input (``input()``, ipdb's ``ipdb>`` prompt) and answer each request in turn.
- ``kernel_env()``: one torch thread in the kernels started inside the block.
- ``terminal_ipython(cwd)``: terminal IPython under pexpect, prompts ``In [n]:`` / ``ipdb>``.

Examples
--------
>>> nb = run_notebook(["print(1 + 1)"])
>>> cell_text(nb.cells[0])
'2\\n'
>>> with running_kernel() as kc:
...     run = execute_with_input(kc, "name = input('who? ')", ["ada"])
>>> run.prompts
['who? ']
"""

from __future__ import annotations

import os
import queue
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KERNEL_NAME = "python3"
SETUP_CELL = "import torch\ntorch.set_num_threads(1)\n%load_ext nbtrouble"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
# Torch spins up one thread per core by default; the test machines share two.
_KERNEL_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
}


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour and cursor escape codes."""
    return _ANSI.sub("", text)


def run_notebook(
    cells: Sequence[str],
    timeout: int = 120,
    *,
    kernel_name: str = KERNEL_NAME,
    allow_errors: bool = True,
    store_widget_state: bool = True,
    cwd: str | Path | None = None,
) -> Any:
    """Execute ``cells`` as a notebook in a fresh kernel and return it with its outputs.

    Parameters
    ----------
    cells
        Source of each code cell, in order.
    timeout
        Seconds each cell may run.
    allow_errors
        Keep going after a cell raises (its ``error`` output is kept); ``False`` raises
        nbclient's ``CellExecutionError`` instead.
    store_widget_state
        Save the widget state in ``nb.metadata.widgets``, as JupyterLab's "save widget
        state" does.
    cwd
        The kernel's working directory (default: the current one).
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=timeout,
        allow_errors=allow_errors,
        store_widget_state=store_widget_state,
        resources={"metadata": {"path": str(cwd or os.getcwd())}},
    )
    with kernel_env():
        client.execute()
    return nb


def cell_text(cell: Any) -> str:
    """All a cell showed, as text: streams, ``text/plain`` of results and displays, tracebacks."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type == "error":
            parts.append("\n".join(output.traceback) + "\n")
        elif "text/plain" in output.get("data", {}):
            parts.append(output.data["text/plain"] + "\n")
    return strip_ansi("".join(parts))


def outputs_with(cell: Any, mime_type: str) -> list[Any]:
    """The cell's display / result outputs that carry ``mime_type``."""
    return [o for o in cell.get("outputs", []) if mime_type in o.get("data", {})]


@contextmanager
def kernel_env() -> Iterator[None]:
    """One thread per kernel for the block: kernels started inside inherit the environment."""
    saved = {name: os.environ.get(name) for name in _KERNEL_ENV}
    os.environ.update(_KERNEL_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value




@contextmanager
def running_kernel(
    kernel_name: str = KERNEL_NAME, *, startup_timeout: float = 60, cwd: str | Path | None = None
) -> Iterator[Any]:
    """A started kernel's blocking client; the kernel is shut down on exit."""
    from jupyter_client import KernelManager

    manager = KernelManager(kernel_name=kernel_name)
    with kernel_env():
        manager.start_kernel(cwd=str(cwd or os.getcwd()))
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=startup_timeout)
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


@dataclass
class InteractiveRun:
    """What one execution showed, with the input requests it made and the answers given."""

    status: str  # the execute reply's status: "ok" or "error"
    transcript: str  # streams, displays' text, tracebacks, and "<prompt><answer>" lines, in order
    prompts: list[str] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)  # iopub message contents
    error: dict[str, Any] | None = None  # the execute reply's content when status is "error"


def execute_with_input(
    kc: Any,
    code: str,
    answers: Sequence[str],
    *,
    timeout: float = 60,
    then: str = "q",
) -> InteractiveRun:
    """Run ``code`` in the kernel, answering its input requests with ``answers`` in turn.

    Once ``answers`` are used up, every further request gets ``then`` (``"q"`` leaves a
    debugger), so a test whose debugger session goes astray ends instead of hanging.
    """
    msg_id = kc.execute(code, allow_stdin=True)
    run = InteractiveRun(status="", transcript="")
    pending = list(answers)
    deadline = time.monotonic() + timeout
    idle = False
    while not idle:
        if time.monotonic() > deadline:
            raise TimeoutError(f"kernel still busy after {timeout} s; so far:\n{run.transcript}")
        idle = _drain_iopub(kc, msg_id, run, wait=0.05)
        request = _next_message(kc.stdin_channel, wait=0.05)
        if request is None or request["msg_type"] != "input_request":
            continue
        _drain_iopub(kc, msg_id, run, wait=0.1)  # output printed just before the prompt
        answer = pending.pop(0) if pending else then
        run.prompts.append(request["content"]["prompt"])
        run.transcript += f"{strip_ansi(request['content']['prompt'])}{answer}\n"
        kc.input(answer)
    reply = kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
    run.status = reply["content"]["status"]
    if run.status == "error":
        run.error = reply["content"]
    return run


def _next_message(channel: Any, wait: float) -> dict[str, Any] | None:
    try:
        return channel.get_msg(timeout=wait)  # type: ignore[no-any-return]
    except queue.Empty:
        return None


def _drain_iopub(kc: Any, msg_id: str, run: InteractiveRun, wait: float) -> bool:
    """Record the iopub messages of ``msg_id`` that are waiting; True once the kernel is idle."""
    while (msg := _next_message(kc.iopub_channel, wait)) is not None:
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        content, kind = msg["content"], msg["msg_type"]
        if kind == "status" and content["execution_state"] == "idle":
            return True
        if kind in ("stream", "display_data", "execute_result", "error"):
            run.outputs.append(content)
            run.transcript += _message_text(kind, content)
    return False


def _message_text(kind: str, content: dict[str, Any]) -> str:
    if kind == "stream":
        return strip_ansi(content["text"])
    if kind == "error":
        return strip_ansi("\n".join(content["traceback"])) + "\n"
    return strip_ansi(content.get("data", {}).get("text/plain", "")) + "\n"


def terminal_ipython(cwd: str | Path, *, simple_prompt: bool = True, timeout: float = 60) -> Any:
    """Terminal IPython under pexpect, no colours; returns once the first prompt is up.

    ``simple_prompt=True``: plain ``input()`` prompts (``IN_PROMPT``, ``IPDB_PROMPT``; the
    debugger is IPython's ``Pdb``); send lines with ``child.sendline``, and a cell magic ends
    at its second blank line. ``False``: the prompt_toolkit front end (the debugger is
    ``TerminalPdb``); it redraws its prompts with escape codes, so send ``text + "\r"`` and
    expect what a command prints rather than the prompts.
    """
    import pexpect

    # A profile of its own, so the user's IPython configuration plays no part.
    env = {
        **os.environ,
        **_KERNEL_ENV,
        "TERM": "dumb" if simple_prompt else "xterm",
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "IPYTHONDIR": str(Path(cwd) / ".ipython"),
    }
    args = ["-m", "IPython", "--colors=nocolor", "--no-banner", "--HistoryManager.enabled=False"]
    if simple_prompt:
        args.append("--simple-prompt")
    child = pexpect.spawn(
        sys.executable,
        args,
        cwd=str(cwd),
        env=env,
        encoding="utf-8",
        timeout=timeout,
        dimensions=(50, 200),
    )
    child.expect(IN_PROMPT if simple_prompt else r"In \[")
    return child


IN_PROMPT = r"In \[\d+\]: "
IPDB_PROMPT = r"ipdb> "


# Two models with the classic shape bugs, shared by the %%shapecheck tests of every tier.
SHAPE_BUG_MODELS = """\
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

class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU()
        )
        self.fc1 = nn.Linear(16 * 5 * 5, 10)  # wrong: the features are 16 x 13 x 13

    def forward(self, x):
        x = self.features(x)
        x = x.flatten(1)
        return self.fc1(x)

mlp, x = MLP(), torch.randn(3, 4)
cnn, images = CNN(), torch.randn(2, 3, 32, 32)
"""

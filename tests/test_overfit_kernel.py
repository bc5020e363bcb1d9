"""``%overfit_batch`` in a real Jupyter kernel: the live panel, a kernel interrupt, the stop button."""

from __future__ import annotations

import queue
import time
from typing import Any

import pytest
from kernel_utils import SETUP_CELL, cell_text, kernel_env, outputs_with, run_notebook

pytestmark = pytest.mark.kernel

USER_CELL = """
import hashlib, torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
def state():
    tensors = list(model.parameters()) + list(model.buffers())
    data = b"".join(t.detach().numpy().tobytes() for t in tensors)
    ids = [id(p) for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    return hashlib.sha256(data).hexdigest(), hash(tuple(ids)), flags, torch.get_rng_state().sum().item()
before = state()
"""
WIDGET = "application/vnd.jupyter.widget-view+json"


def _widget_texts(nb: Any) -> str:
    states = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return " ".join(str(m["state"].get("value", "")) for m in states.values())


def test_magic_shows_a_live_panel_and_restores_the_model() -> None:
    nb = run_notebook(
        [
            SETUP_CELL,
            USER_CELL,
            "%overfit_batch model (x, y) --steps 120 --lr 1e-2",
            "print(state() == before, _overfit.verdict)",
        ],
        timeout=120,
    )
    (panel,) = outputs_with(nb.cells[2], WIDGET)
    # The live panel's output is updated with the final report, for HTML exports.
    assert "CONVERGED" in panel.data["text/html"] and "CONVERGED" in panel.data["text/plain"]
    texts = _widget_texts(nb)
    assert "CONVERGED" in texts and "<svg" in texts and "cross_entropy (inferred)" in texts
    assert cell_text(nb.cells[3]).strip() == "True converged"


def test_usage_error_in_a_kernel_is_short() -> None:
    nb = run_notebook([SETUP_CELL, USER_CELL, "%overfit_batch nomodel (x, y)"], timeout=60)
    text = cell_text(nb.cells[2])
    assert "UsageError: %overfit_batch model: name 'nomodel' is not defined" in text


class _Kernel:
    """A kernel with its manager (for interrupts) and a client that follows iopub."""

    def __init__(self) -> None:
        from jupyter_client import KernelManager

        self.manager = KernelManager(kernel_name="python3")
        with kernel_env():
            self.manager.start_kernel()
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60) -> dict[str, Any]:
        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=lambda msg: None)
        return reply["content"]

    def evaluate(self, expression: str) -> str:
        """The repr of ``expression`` in the kernel, read from the execute reply itself.

        (Streams can arrive after the idle status on a loaded machine; the reply cannot.)
        """
        reply = self.client.execute_interactive(
            "", user_expressions={"value": expression}, timeout=60, output_hook=lambda m: None
        )
        value = reply["content"]["user_expressions"]["value"]
        assert value["status"] == "ok", value
        return value["data"]["text/plain"]

    def wait_for_stop_button(self, msg_id: str, timeout: float = 60) -> str:
        """The comm id of the panel's Stop button, once the panel is on screen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.client.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            content = msg["content"]
            if (
                msg["msg_type"] == "comm_open"
                and content["data"]["state"].get("description") == "Stop"
            ):
                return content["comm_id"]
        raise TimeoutError("no Stop button appeared")

    def wait_idle(self, msg_id: str, timeout: float = 60) -> dict[str, Any]:
        reply = self.client.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.client.get_shell_msg(timeout=timeout)
        return reply["content"]

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture
def kernel():
    k = _Kernel()
    try:
        assert k.run(SETUP_CELL)["status"] == "ok"
        assert k.run(USER_CELL)["status"] == "ok"
        yield k
    finally:
        k.close()


def test_kernel_interrupt_mid_run_leaves_the_model_unchanged(kernel) -> None:
    msg_id = kernel.client.execute("%overfit_batch model (x, y) --steps 1000000")
    kernel.wait_for_stop_button(msg_id)
    time.sleep(1.5)  # well inside the training loop
    kernel.manager.interrupt_kernel()
    reply = kernel.wait_idle(msg_id)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    assert kernel.evaluate("state() == before") == "True"


def test_stop_button_stops_a_running_cell(kernel) -> None:
    msg_id = kernel.client.execute("%overfit_batch model (x, y) --steps 1000000")
    comm_id = kernel.wait_for_stop_button(msg_id)
    time.sleep(1.5)
    click = {"comm_id": comm_id, "data": {"method": "custom", "content": {"event": "click"}}}
    kernel.client.shell_channel.send(kernel.client.session.msg("comm_msg", click))
    reply = kernel.wait_idle(msg_id, timeout=30)
    assert reply["status"] == "ok", reply
    out = kernel.evaluate(
        "(_overfit.stopped, 0 < len(_overfit.losses) < 1000000, state() == before)"
    )
    assert out == "(True, True, True)"

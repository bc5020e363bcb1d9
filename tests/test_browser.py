"""What a student sees: the walkthrough notebooks run in JupyterLab in a real (headless) Chromium.

JupyterLab is served on 127.0.0.1 only, with temporary config, data, runtime and settings
directories, over a scratch copy of ``example_notebooks/``. Playwright drives Debian's
``chromium``, launched once for all notebooks: each test opens one notebook, waits for its
kernel, runs all cells, and asserts from the page itself what the student sees:

- ``02_get_the_model_to_run``: the ``%%shapecheck`` panel's failure box (the layer, both
  shapes, the user's line) and its Accordion of module groups;
- ``03_overfit_a_single_batch``: the ``%overfit_batch`` panel's progress bar, its SVG loss
  curve, its Stop button and the verdict;
- ``07_troubleshoot_panel``: the troubleshooting panel, whose own "Run check" button is clicked.

Element screenshots go to ``artifacts/screenshots/``; with NBTROUBLE_UPDATE_DOCS=1 the panels'
are copied to ``docs/`` for the README.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
    ),
]

OVERRIDES = {
    "@jupyterlab/notebook-extension:tracker": {"autoStartDefaultKernel": True},
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(url: str, token: str, method: str = "GET") -> Any:
    request = urllib.request.Request(
        url, method=method, headers={"Authorization": f"token {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """A JupyterLab server on loopback: (base URL, token, notebook folder)."""
    base = tmp_path_factory.mktemp("lab")
    notebooks = base / "example_notebooks"
    shutil.copytree(ROOT / "example_notebooks", notebooks)
    settings = base / "app-settings"
    settings.mkdir()
    (settings / "overrides.json").write_text(json.dumps(OVERRIDES))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name, folder in [
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_DATA_DIR", "data"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("IPYTHONDIR", "ipython"),
        ("MPLCONFIGDIR", "matplotlib"),
        ("JUPYTERLAB_SETTINGS_DIR", "user-settings"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
    ]:
        env[name] = str(base / folder)
    port, token = _free_port(), secrets.token_hex(16)
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--allow-root",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={notebooks}",
        f"--LabApp.app_settings_dir={settings}",
    ]
    log = (base / "lab.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _request(f"{url}/api/status", token), 60, "JupyterLab did not start", server)
        yield url, token, notebooks
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(lab: tuple[str, str, Path]) -> Iterator[Any]:
    """One Chromium for every notebook of the module (a launch costs seconds on a busy machine)."""
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(lab[2].parent / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
            viewport={"width": 1400, "height": 1500},
        )
        try:
            yield context
        finally:
            context.close()


def _wait(
    probe: Any, timeout: float, message: str, server: subprocess.Popen[bytes] | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise AssertionError(f"{message}: the server exited with {server.returncode}")
        try:
            result = probe()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(message)


def _session(url: str, token: str, notebook: str) -> dict[str, Any] | None:
    sessions = _request(f"{url}/api/sessions", token)
    return next((s for s in sessions if s["path"] == notebook and s.get("kernel")), None)


def _kernel_ready(url: str, token: str, notebook: str) -> bool:
    """The notebook's own kernel is idle and the page is connected to it."""
    session = _session(url, token, notebook)
    if session is None:
        return False
    kernel = _request(f"{url}/api/kernels/{session['kernel']['id']}", token)
    return kernel["execution_state"] == "idle" and kernel.get("connections", 0) >= 1


@contextmanager
def _notebook(browser: Any, lab: tuple[str, str, Path], notebook: str) -> Iterator[Any]:
    """Open ``notebook`` in a new tab and run all its cells; close it and its kernel after."""
    url, token, _ = lab
    page = browser.new_page()
    try:
        # A workspace of its own: JupyterLab would otherwise reopen the previous notebooks.
        workspace = Path(notebook).stem
        page.goto(f"{url}/lab/workspaces/{workspace}/tree/{notebook}?token={token}")
        # Clicking Run All before the kernel is connected silently runs nothing.
        _wait(lambda: _kernel_ready(url, token, notebook), 90, f"{notebook}'s kernel never idled")
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        yield page
    finally:
        page.close()
        for session in _request(f"{url}/api/sessions", token):  # the next notebook gets the CPU
            _request(f"{url}/api/sessions/{session['id']}", token, method="DELETE")


def _save(locator: Any, name: str, docs_name: str | None = None, *, tight: bool = False) -> None:
    """An element screenshot; copied to docs/ when NBTROUBLE_UPDATE_DOCS is set.

    ``tight`` crops the empty right-hand side of a panel whose content is narrower than the
    notebook.
    """
    locator.scroll_into_view_if_needed()
    path = str(SCREENSHOTS / name)
    if tight:
        box = locator.bounding_box()
        width = locator.evaluate(_CONTENT_WIDTH) + 12
        clip = {**box, "width": min(box["width"], width)}
        locator.page.screenshot(path=path, clip=clip)
    else:
        locator.screenshot(path=path)
    if docs_name and os.environ.get("NBTROUBLE_UPDATE_DOCS"):  # README pictures on request only
        shutil.copyfile(path, ROOT / "docs" / docs_name)


# How far right an element's drawn content reaches: its text, pictures and controls, not
# the full-width boxes that hold them.
_CONTENT_WIDTH = """element => {
    const left = element.getBoundingClientRect().left;
    let right = left;
    const range = document.createRange();
    const texts = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
    while (texts.nextNode()) {
        range.selectNodeContents(texts.currentNode);
        right = Math.max(right, range.getBoundingClientRect().right);
    }
    for (const drawn of element.querySelectorAll("svg, img, button, .progress")) {
        right = Math.max(right, drawn.getBoundingClientRect().right);
    }
    return right - left;
}"""


def _output(page: Any, text: str) -> Any:
    return page.locator(".jp-OutputArea-output", has_text=text)


# ------------------------------------------------------------ 02: the %%shapecheck panel


def test_shapecheck_panel_renders_in_jupyterlab(browser: Any, lab: tuple[str, str, Path]) -> None:
    with _notebook(browser, lab, "02_get_the_model_to_run.ipynb") as page:
        # The last cell prints the meta run's parameter count: the whole notebook ran,
        # past the two cells tagged raises-exception.
        _output(page, "parameters: 10007600010").wait_for(timeout=120_000)
        panel = page.locator(".widget-vbox").filter(has=page.locator(".nbtrouble-failure")).first
        _assert_failure_box(panel.locator(".nbtrouble-failure"))
        _assert_module_groups(panel)
        _save(panel, "shapecheck_panel.png", "shapecheck_panel.png")
        _open_first_module(panel)
        # The fixed model's trace and the silently broadcasting loss render as panels too.
        _shown_text(_output(page, "shapecheck ok: 12 ops in 12 modules"), "classifier.3")
        broadcast = _shown_text(_output(page, "shapecheck found 1 problem"), "silent_broadcast")
        assert "`predictions` (32, 1) - `targets` (32,) broadcast to (32, 32)" in broadcast


def _shown_text(locator: Any, expected: str) -> str:
    """The text the page shows in ``locator`` once it contains ``expected``.

    JupyterLab skips rendering cells outside the view, so their ``innerText`` is empty:
    scroll to the element and wait until it is drawn.
    """
    from playwright.sync_api import expect

    locator.scroll_into_view_if_needed()
    expect(locator).to_contain_text(expected, use_inner_text=True)
    return str(locator.inner_text())


def _assert_failure_box(box: Any) -> None:
    text = _shown_text(box, "FAILED shape_mismatch in classifier.1 (Linear)")  # the layer
    assert "input    (32, 64) float32" in text  # both shapes that do not fit
    assert "weight   (120, 400) float32" in text
    assert "your line:" in text
    assert "return self.classifier(self.features(x))" in text  # the user's own source line
    assert "Build the layer as nn.Linear(64, 120)" in text
    assert "Run %shapecheck_debug to open ipdb at your line" in text


def _assert_module_groups(panel: Any) -> None:
    """One Accordion section per module; only the failing module's is open."""
    from playwright.sync_api import expect

    accordion = panel.locator(".jupyter-widget-Accordion").first
    _shown_text(accordion, "classifier.1")
    titles = accordion.locator(".jupyter-widget-Collapse-header")
    # Six feature layers, the flatten, and the Linear layer that failed.
    modules = ["features.0 · Conv2d", "features.1 · ReLU", "features.2 · MaxPool2d"]
    modules += ["features.3 · Conv2d", "features.4 · ReLU", "features.5 · MaxPool2d"]
    modules += ["classifier.0 · Flatten", "✗ classifier.1 · Linear"]
    expect(titles).to_have_text([f"{module} (1 op)" for module in modules], use_inner_text=True)
    opened = accordion.locator(".jupyter-widget-Accordion-child-active")
    expect(opened).to_have_count(1)
    row = opened.locator("tr", has_text="FAILED")
    text = _shown_text(row, "torch.nn.functional.linear")
    assert "return self.classifier(self.features(x))" in text
    assert accordion.locator("table").count() == 8
    expect(accordion.locator("table:visible")).to_have_count(1)  # the others are collapsed


def _open_first_module(panel: Any) -> None:
    """A click on a collapsed section shows that module's ops with their shapes."""
    accordion = panel.locator(".jupyter-widget-Accordion").first
    accordion.locator(".jupyter-widget-Collapse-header", has_text="features.0").click()
    table = accordion.locator("table:visible")
    text = _shown_text(table, "torch.nn.functional.conv2d")
    assert "(32, 1, 8, 8)" in text and "(32, 6, 8, 8)" in text


# ------------------------------------------------------------ 03: the %overfit_batch panel


def test_overfit_panel_renders_in_jupyterlab(browser: Any, lab: tuple[str, str, Path]) -> None:
    with _notebook(browser, lab, "03_overfit_a_single_batch.ipynb") as page:
        _output(page, "verdict: explodes").wait_for(timeout=120_000)
        page.locator(".jp-RenderedImage img").nth(1).wait_for()  # the last cell's comparison plot
        stop = page.locator(".widget-button", has_text="Stop")
        panel = page.locator(".widget-vbox").filter(has=stop).first
        _assert_overfit_panel(panel)
        _save(panel, "overfit_panel.png", "overfit_panel.png", tight=True)
        _shown_text(_output(page, "verdict: converged | loss 2.305 ->"), "-> 0.0")


def _assert_overfit_panel(panel: Any) -> None:
    from playwright.sync_api import expect

    verdict = _shown_text(panel.locator(".widget-html").last, "CONVERGED: the loss")
    assert "model restored" in verdict
    title = panel.locator(".widget-html").first
    assert _shown_text(title, "overfit_batch: ").startswith("overfit_batch: CrossEntropyLoss")
    bar = panel.locator(".widget-hprogress .progress-bar")
    expect(bar).to_have_class(re.compile(r"\bprogress-bar-success\b"))  # green: converged
    assert bar.evaluate("bar => bar.style.width") == "100%"
    _shown_text(panel.locator(".widget-hbox"), "step 300/300")
    stop = panel.locator(".widget-button", has_text="Stop")
    expect(stop).to_be_visible()
    expect(stop).to_be_disabled()  # once the run is over
    # The loss curve is an inline SVG: a polyline through the (thinned) 300 losses.
    curve = panel.locator("svg")
    expect(curve).to_be_visible()
    expect(curve).to_contain_text("(loss, log scale)")  # an SVG has text, not innerText
    assert curve.bounding_box()["width"] >= 400
    points = panel.locator("svg polyline").get_attribute("points").split()
    assert len(points) >= 100
    first_y, last_y = float(points[0].split(",")[1]), float(points[-1].split(",")[1])
    assert last_y > first_y + 100  # drawn falling (SVG y grows downwards)


# ------------------------------------------------------------ 07: the troubleshooting panel


def test_troubleshoot_panel_renders_in_jupyterlab(browser: Any, lab: tuple[str, str, Path]) -> None:
    with _notebook(browser, lab, "07_troubleshoot_panel.ipynb") as page:
        # The last cell renders the exported log: the whole notebook ran.
        page.locator(".jp-RenderedMarkdown h1", has_text="Troubleshooting log").wait_for(
            timeout=180_000
        )
        _assert_panels(page)
        page.screenshot(path=str(SCREENSHOTS / "walkthrough_end.png"))
        _click_run_check(page)
        _save(page.locator(".nbtrouble-troubleshoot").first, "troubleshoot_panel.png", "panel.png")
        page.screenshot(path=str(SCREENSHOTS / "walkthrough_panel.png"))


def _assert_panels(page: Any) -> None:
    panel = page.locator(".nbtrouble-troubleshoot").first
    panel.wait_for(state="attached")
    assert page.locator(".widget-button").count() >= 3  # Run check, Next, Export
    assert page.locator(".widget-html").count() >= 3
    assert panel.locator(".widget-toggle-button").count() == 7  # the decision tree's steps
    assert "You are here: Bias-variance decomposition" in panel.inner_text()
    assert panel.locator(".nbt-log tr").count() == 9  # header + eight checks
    # The loss curve: the notebook's own plot, and the panel's image of the overfitting run.
    assert page.locator(".jp-RenderedImage img").count() >= 1
    assert page.locator(".jp-OutputArea-output", has_text="verdict: converged").count() >= 1
    assert "Tune hyperparameters: passed" in page.locator(".jp-Notebook").inner_text()


def _click_run_check(page: Any) -> None:
    """The panel's own buttons: run the current step's check, then go back and overfit a batch."""
    panel = page.locator(".nbtrouble-troubleshoot").first
    panel.locator(".widget-button", has_text="Run check").click()
    _wait_for_log_rows(page, 10)
    panel.locator(".nbt-verdict", has_text="Bias-variance decomposition: passed").wait_for()
    panel.locator(".widget-toggle-button", has_text="Overfit a single batch").click()
    page.wait_for_function(
        "() => document.querySelector('.nbtrouble-troubleshoot .nbt-current')"
        ".innerText.includes('Overfit')"
    )
    panel.locator(".widget-button", has_text="Run check").click()
    _wait_for_log_rows(page, 11)
    panel.locator(".nbt-verdict", has_text="Overfit a single batch: passed").wait_for()
    assert "verdict: converged" in panel.locator(".nbt-verdict").inner_text()
    curve = panel.locator("img.widget-image")
    curve.wait_for(state="visible")
    assert curve.evaluate("img => img.naturalWidth") > 100  # the loss curve, drawn


def _wait_for_log_rows(page: Any, rows: int) -> None:
    page.wait_for_function(
        f"() => document.querySelector('.nbtrouble-troubleshoot .nbt-log').rows.length === {rows}",
        timeout=60_000,
    )

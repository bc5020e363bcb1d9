"""How an overfitting run reads: a live widget panel, a tqdm bar, and the report's text form.

The panel and the bar follow the ``overfit.Observer`` protocol. Both are cheap per step: they
append the loss and redraw at most every ``min_interval`` seconds, so that showing the run
never slows the training it shows. The loss curve is an inline SVG (no plotting library on
the hot path).
"""

from __future__ import annotations

import html
import math
import threading
import time
from typing import Any

from nbtrouble.findings import format_findings

_SPARK = "▁▂▃▄▅▆▇█"
_COLOURS = {"converged": "#2e7d32", "goes_up": "#c62828", "explodes": "#c62828"}
_SEVERITY_COLOURS = {"error": "#c62828", "warning": "#ef6c00", "info": "#555"}


def sparkline(losses: list[float], width: int = 48) -> str:
    """A one-line text picture of the loss curve (log scale when the loss stays positive)."""
    values = [v for v in losses if math.isfinite(v)]
    if not values:
        return ""
    stride = max(1, math.ceil(len(values) / width))
    values = values[::stride]
    if min(values) > 0:
        values = [math.log10(v) for v in values]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[int((v - lo) / span * (len(_SPARK) - 1))] for v in values)


def report_text(report: Any) -> str:
    """The report's text form, for terminals, scripts and ``repr``."""
    ran = len(report.losses)
    lines = [
        (
            f"overfit_batch: {report.verdict.upper()} after {ran} of {report.steps} steps "
            f"({report.seconds:.2f} s)"
        ),
        f"  loss: {report.loss_name}; optimizer: {report.optimizer_name}",
    ]
    if report.summary:
        lines.append(f"  the loss {report.summary}")
    if report.losses:
        first, last = report.losses[0], report.losses[-1]
        lines.append(f"  curve: {first:.4g} {sparkline(report.losses)} {last:.4g}")
    if report.stopped:
        lines.append(f"  stopped by the user after step {ran - 1}")
    saved = f" (from a {report.snapshot_bytes / 2**20:.3g} MiB copy on the CPU)"
    lines.append(
        "  the trained weights were kept" if report.kept else f"  the model was restored{saved}"
    )
    lines.append(f"  advice: {report.advice}")
    lines.append("findings:")
    lines.extend("  " + line for line in format_findings(report.findings).splitlines())
    return "\n".join(lines)


def loss_curve_svg(losses: list[float], width: int = 480, height: int = 170) -> str:
    """An SVG line chart of the losses: log scale while they stay positive, else linear."""
    points = [(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    if not points:
        return f'<svg width="{width}" height="{height}"></svg>'
    stride = max(1, math.ceil(len(points) / 400))
    points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    log = all(v > 0 for _, v in points)
    ys = [math.log10(v) if log else v for _, v in points]
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    left, right, top, bottom = 56, 8, 8, 22
    last_step = max(len(losses) - 1, 1)

    def x_of(step: int) -> float:
        return left + step / last_step * (width - left - right)

    def y_of(y: float) -> float:
        return top + (hi - y) / (hi - lo) * (height - top - bottom)

    path = " ".join(f"{x_of(i):.1f},{y_of(y):.1f}" for (i, _), y in zip(points, ys))
    label = (lambda y: f"{10**y:.3g}") if log else (lambda y: f"{y:.3g}")
    scale = "log scale" if log else "linear scale"
    return (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" '
        f'font-family="sans-serif" font-size="10">'
        f'<rect x="{left}" y="{top}" width="{width - left - right}" '
        f'height="{height - top - bottom}" fill="none" stroke="#bbb"/>'
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{label(hi)}</text>'
        f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{label(lo)}</text>'
        f'<text x="{left}" y="{height - 6}">step 0</text>'
        f'<text x="{width - right}" y="{height - 6}" text-anchor="end">step {last_step} '
        f"(loss, {scale})</text>"
        f'<polyline points="{path}" fill="none" stroke="#1565c0" stroke-width="1.5"/></svg>'
    )


def findings_html(findings: list[Any]) -> str:
    """Findings as an HTML list, alarms first, each with its hint."""
    order = {"error": 0, "warning": 1, "info": 2}
    items = []
    for f in sorted(findings, key=lambda f: order[f.severity]):
        where = f"<br><small>at {html.escape(f.where)}</small>" if f.where else ""
        hint = f"<br>&rarr; {html.escape(f.hint)}" if f.hint else ""
        colour = _SEVERITY_COLOURS[f.severity]
        items.append(
            f'<li><b style="color:{colour}">{f.severity}</b> <code>{f.kind}</code>: '
            f"{html.escape(f.message)}{where}{hint}</li>"
        )
    return "<ul>" + "".join(items) + "</ul>" if items else "<p>No findings.</p>"


class OverfitPanel:
    """The live panel: progress bar, loss curve, stop button, then verdict and findings.

    A click on Stop reaches the kernel while the cell still runs only where the kernel
    dispatches widget messages concurrently (``route_clicks_concurrently``); interrupting the
    kernel stops the run everywhere, and the model is restored in both cases.
    """

    def __init__(self, min_interval: float = 0.5) -> None:
        import ipywidgets as w

        self.min_interval = min_interval
        self.losses: list[float] = []
        self.steps = 0
        self._stop = threading.Event()
        self._last_draw = -math.inf  # the first step is drawn at once
        self.title = w.HTML("<b>overfit_batch</b>")
        self.bar = w.FloatProgress(value=0, min=0, max=1, layout=w.Layout(width="320px"))
        self.status = w.HTML("")
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="warning")
        self.stop_button.on_click(lambda _: self._stop.set())
        self.curve = w.HTML(loss_curve_svg([]))
        self.result = w.HTML("")
        self.widget = w.VBox(
            [self.title, w.HBox([self.bar, self.status, self.stop_button]), self.curve, self.result]
        )

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def start(self, steps: int, description: str) -> None:
        self.steps = steps
        self.bar.max = steps
        self.title.value = f"<b>overfit_batch</b>: {html.escape(description)}"

    def update(self, step: int, loss: float) -> bool:
        self.losses.append(loss)
        now = time.perf_counter()
        if now - self._last_draw >= self.min_interval:
            self._last_draw = now
            self._draw(step)
        return self._stop.is_set()

    def _draw(self, step: int) -> None:
        self.bar.value = step + 1
        self.status.value = f"step {step + 1}/{self.steps} &middot; loss {self.losses[-1]:.4g}"
        self.curve.value = loss_curve_svg(self.losses)

    def finish(self, report: Any | None, error: BaseException | None) -> None:
        self.stop_button.disabled = True
        if report is None:
            self.bar.bar_style = "danger"
            what = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            self.status.value = f"{what} after {len(self.losses)} steps; the model was restored"
            self.curve.value = loss_curve_svg(self.losses)
            return
        self.losses = list(report.losses)
        self._draw(len(self.losses) - 1)
        self.bar.bar_style = "success" if report.verdict == "converged" else "danger"
        colour = _COLOURS.get(report.verdict, "#ef6c00")
        kept = "trained weights kept" if report.kept else "model restored"
        stopped = " (stopped)" if report.stopped else ""
        self.result.value = (
            f'<p><b style="color:{colour}">{report.verdict.upper()}</b>{stopped}: the loss '
            f"{html.escape(report.summary)}; {kept}.<br>{html.escape(report.advice)}</p>"
            + findings_html(report.findings)
        )


class TextProgress:
    """A tqdm bar for terminals and scripts; the report's text follows at the end."""

    def __init__(self, min_interval: float = 0.5) -> None:
        self.min_interval = min_interval
        self.bar: Any = None
        self._last_draw = -math.inf  # the first step is drawn at once
        self._drawn = 0

    def start(self, steps: int, description: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=steps, desc="overfit_batch", mininterval=self.min_interval)

    def update(self, step: int, loss: float) -> bool:
        now = time.perf_counter()
        if now - self._last_draw >= self.min_interval:
            self._last_draw = now
            self.bar.set_postfix_str(f"loss {loss:.4g}", refresh=False)
            self.bar.update(step + 1 - self._drawn)
            self._drawn = step + 1
        return False

    def finish(self, report: Any | None, error: BaseException | None) -> None:
        if self.bar is None:
            return
        if report is not None:
            self.bar.update(len(report.losses) - self._drawn)
        self.bar.close()


def route_clicks_concurrently(button: Any) -> bool:
    """Have the kernel handle ``button``'s clicks on a thread of their own while a cell runs.

    ipykernel 7 dispatches a comm's messages to the subshell named by its
    ``_reply_subshell_id``; a dedicated subshell runs the click handler at once, even while
    the main shell executes the training cell. Returns ``False`` (clicks wait for the cell
    to end) on kernels without subshells.
    """
    subshell = _stop_subshell_id()
    comm = getattr(button, "comm", None)
    if subshell is None or comm is None or not hasattr(comm, "_reply_subshell_for"):
        return False
    comm._reply_subshell_id = subshell
    return True


_SUBSHELL: list[str] = []  # one subshell per kernel process, made on first use


def _stop_subshell_id() -> str | None:
    if _SUBSHELL:
        return _SUBSHELL[0]
    from ipykernel.kernelbase import Kernel

    if not Kernel.initialized():
        return None
    kernel = Kernel.instance()
    thread = getattr(kernel, "shell_channel_thread", None)
    manager = getattr(thread, "manager", None)
    if not getattr(kernel, "_supports_kernel_subshells", False) or manager is None:
        return None
    made: list[str] = []
    done = threading.Event()

    def create() -> None:  # subshells are made on the shell channel thread only
        try:
            made.append(manager._create_subshell())
        finally:
            done.set()

    thread.io_loop.add_callback(create)
    if not done.wait(5) or not made:
        return None
    _SUBSHELL.append(made[0])
    return made[0]

"""The decision-tree panel: a view over a ``troubleshoot.Session``, built from stock ipywidgets.

The panel shows the lecture's steps with the current one highlighted, the current step's
advice, buttons to run its check, move on and export the log, the last outcome (with the loss
curve of an overfitting run) and the log so far. It redraws whenever the session changes, also
when the session is driven from code rather than from the buttons.
"""

from __future__ import annotations

import html
import io
from typing import Any

import ipywidgets as widgets

from nbtrouble.troubleshoot import STEPS, Outcome, Session, step_info

_MARKS = {True: "&#10003;", False: "&#10007;"}  # check mark, cross


def session_panel(session: Session) -> widgets.VBox:
    """A live panel for ``session``.

    Examples
    --------
    >>> panel = session_panel(troubleshoot(model, (x, y)))
    >>> [b.description for b in panel.children[2].children]
    ['Run check', 'Next step', 'Export Markdown']
    """
    tree = widgets.HTML(layout=widgets.Layout(margin="0 0 4px 0"))
    step = widgets.HTML()
    run = widgets.Button(description="Run check", button_style="primary", icon="play")
    advance = widgets.Button(description="Next step", icon="arrow-right")
    export = widgets.Button(description="Export Markdown", icon="download")
    status = widgets.HTML()
    result = widgets.Output()
    log = widgets.HTML()
    markdown = widgets.Textarea(layout=widgets.Layout(width="100%", height="12em", display="none"))
    panel = widgets.VBox(
        [tree, step, widgets.HBox([run, advance, export]), status, result, log, markdown],
        layout=widgets.Layout(border="1px solid #ccc", padding="8px"),
    )
    panel.add_class("nbtrouble-troubleshoot")

    def redraw(_: Session | None = None) -> None:
        tree.value = _tree_html(session)
        step.value = _step_html(session)
        advance.description = f"Next: {step_info(session.suggestion).title}"
        log.value = _log_html(session)
        result.clear_output()
        if session.log:
            with result:
                _show_outcome(session.log[-1])

    def on_run(_: Any) -> None:
        run.disabled = True
        status.value = f"<i>Running: {html.escape(session.step.check)} ...</i>"
        try:
            session.check()
            status.value = ""
        except Exception as e:  # shown in the panel, like tqdm's failed bar, then re-raised
            status.value = f"<b style='color:#b00'>{html.escape(type(e).__name__)}: {html.escape(str(e))}</b>"
            raise
        finally:
            run.disabled = False

    def on_export(_: Any) -> None:
        markdown.value = session.to_markdown()
        markdown.layout.display = ""

    run.on_click(on_run)
    advance.on_click(lambda _: session.advance())
    export.on_click(on_export)
    session.on_change(redraw)
    redraw()
    return panel


def _tree_html(session: Session) -> str:
    last = {o.step: o.passed for o in session.log}
    cells = []
    for step in STEPS:
        style = "padding:2px 6px;border-radius:4px;margin-right:4px;"
        if step.key == session.current:
            style += "background:#1976d2;color:white;font-weight:bold;"
        elif step.key in last:
            style += "background:#e8f5e9;" if last[step.key] else "background:#ffebee;"
        else:
            style += "background:#f0f0f0;"
        mark = _MARKS[last[step.key]] + " " if step.key in last else ""
        cells.append(
            f"<span class='nbt-step' title='{html.escape(step.part)}' style='{style}'>"
            f"{mark}{html.escape(step.title)}</span>"
        )
    return "<div class='nbt-tree'>" + "&rarr;".join(cells) + "</div>"


def _step_html(session: Session) -> str:
    step = session.step
    return (
        f"<div class='nbt-current'><b>You are here: {html.escape(step.title)}</b> "
        f"<span style='color:#666'>({html.escape(step.part)})</span><br>"
        f"{html.escape(step.advice)}<br><small>Check: {html.escape(step.check)}</small></div>"
    )


def _log_html(session: Session) -> str:
    if not session.log:
        return "<i>No checks run yet.</i>"
    rows = "".join(
        f"<tr><td>{n}</td><td>{html.escape(step_info(o.step).title)}</td>"
        f"<td>{_MARKS[o.passed]}</td><td>{html.escape(o.summary)}</td></tr>"
        for n, o in enumerate(session.log, 1)
    )
    return (
        "<table class='nbt-log'><tr><th>#</th><th>step</th><th></th><th>outcome</th></tr>"
        f"{rows}</table>"
    )


def _show_outcome(outcome: Outcome) -> None:
    from IPython.display import HTML, display

    verdict = "passed" if outcome.passed else "needs work"
    color = "#2e7d32" if outcome.passed else "#c62828"
    findings = "".join(
        f"<li><b>{html.escape(f.severity)}</b> <code>{html.escape(f.kind)}</code>: "
        f"{html.escape(f.message)}" + (f"<br><small>{html.escape(f.hint)}</small>" if f.hint else "")
        + "</li>"
        for f in outcome.findings
    )
    display(
        HTML(
            f"<div class='nbt-verdict'><b style='color:{color}'>{html.escape(step_info(outcome.step).title)}: "
            f"{verdict}</b>: {html.escape(outcome.summary)}"
            + (f"<ul>{findings}</ul>" if findings else "")
            + f"<div>Next: <b>{html.escape(step_info(outcome.next_step).title)}</b>. "
            f"{html.escape(outcome.advice)}</div></div>"
        )
    )
    losses = outcome.details.get("losses")
    if losses:
        display(widgets.Image(value=loss_curve_png(losses), format="png"))


def loss_curve_png(losses: list[float]) -> bytes:
    """A small PNG of a loss curve (log scale when every value is positive)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5, 2.4), dpi=90)
    axes = figure.subplots()
    axes.plot(range(len(losses)), losses, color="#1976d2")
    if all(v > 0 for v in losses):
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss on one batch")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()

"""The decision-tree panel: a view over a ``troubleshoot.Session``, built from stock ipywidgets.

The panel shows the lecture's steps as toggle buttons with the current one selected (click
another to go there) and each step's last outcome marked, the current step's advice,
buttons to run its check, move on and export the log, the last outcome (with the loss
curve of an overfitting run) and the log so far. It redraws whenever the session changes, also
when the session is driven from code rather than from the buttons.
"""

from __future__ import annotations

import html
import io
from typing import Any

import ipywidgets as widgets

from nbtrouble.troubleshoot import STEPS, Outcome, Session, step_info

_MARKS = {True: "&#10003;", False: "&#10007;"}  # check mark, cross, in HTML


def session_panel(session: Session) -> widgets.VBox:
    """A live panel for ``session``.

    Examples
    --------
    >>> panel = session_panel(troubleshoot(model, (x, y)))
    >>> [b.description for b in panel.children[2].children]
    ['Run check', 'Next step', 'Export Markdown']
    """
    tree = widgets.ToggleButtons(
        options=_tree_options(session),
        value=session.current,
        style={"button_width": "auto"},
        tooltips=[f"{step.part}: {step.check}" for step in STEPS],
    )
    tree.add_class("nbt-tree")
    step = widgets.HTML()
    fit = widgets.Layout(width="auto")
    run = widgets.Button(description="Run check", button_style="primary", icon="play", layout=fit)
    advance = widgets.Button(description="Next step", icon="arrow-right", layout=fit)
    export = widgets.Button(description="Export Markdown", icon="download", layout=fit)
    status = widgets.HTML()
    result = widgets.VBox()
    log = widgets.HTML()
    markdown = widgets.Textarea(layout=widgets.Layout(width="100%", height="12em", display="none"))
    panel = widgets.VBox(
        [tree, step, widgets.HBox([run, advance, export]), status, result, log, markdown],
        layout=widgets.Layout(border="1px solid #ccc", padding="8px"),
    )
    panel.add_class("nbtrouble-troubleshoot")

    syncing = False  # set while redraw() writes the tree, so that the write is not a user's move

    def redraw(_: Session | None = None) -> None:
        nonlocal syncing
        syncing = True
        try:
            tree.options = _tree_options(session)
            tree.value = session.current
        finally:
            syncing = False
        step.value = _step_html(session)
        advance.description = f"Next: {step_info(session.suggestion).title}"
        log.value = _log_html(session)
        result.children = _outcome_widgets(session.log[-1]) if session.log else ()

    def on_run(_: Any) -> None:
        run.disabled = True
        status.value = f"<i>Running: {html.escape(session.step.check)} ...</i>"
        try:
            session.check()
            status.value = ""
        except Exception as e:  # shown in the panel, like tqdm's failed bar, then re-raised
            status.value = (
                f"<b style='color:#b00'>{html.escape(type(e).__name__)}: {html.escape(str(e))}</b>"
            )
            raise
        finally:
            run.disabled = False

    def on_export(_: Any) -> None:
        markdown.value = session.to_markdown()
        markdown.layout.display = ""

    def on_step(change: dict[str, Any]) -> None:
        if not syncing and change["new"] != session.current:
            session.advance(change["new"])

    tree.observe(on_step, names="value")
    run.on_click(on_run)
    advance.on_click(lambda _: session.advance())
    export.on_click(on_export)
    session.on_change(redraw)
    redraw()
    return panel


def _tree_options(session: Session) -> list[tuple[str, str]]:
    """The steps as (label, key), each label marked with the step's last outcome."""
    last = {o.step: o.passed for o in session.log}
    marks = {True: "\u2713 ", False: "\u2717 "}  # check mark, cross
    return [(marks.get(last.get(step.key), "") + step.title, step.key) for step in STEPS]


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


def _outcome_widgets(outcome: Outcome) -> tuple[widgets.Widget, ...]:
    """The last outcome: its verdict, findings and advice, and the loss curve when there is one."""
    verdict = "passed" if outcome.passed else "needs work"
    color = "#2e7d32" if outcome.passed else "#c62828"
    findings = "".join(
        f"<li><b>{html.escape(f.severity)}</b> <code>{html.escape(f.kind)}</code>: "
        f"{html.escape(f.message)}"
        + (f"<br><small>{html.escape(f.hint)}</small>" if f.hint else "")
        + "</li>"
        for f in outcome.findings
    )
    text = widgets.HTML(
        f"<div class='nbt-verdict'><b style='color:{color}'>"
        f"{html.escape(step_info(outcome.step).title)}: {verdict}</b>: "
        f"{html.escape(outcome.summary)}"
        + (f"<ul>{findings}</ul>" if findings else "")
        + f"<div>Next: <b>{html.escape(step_info(outcome.next_step).title)}</b>. "
        f"{html.escape(outcome.advice)}</div></div>"
    )
    losses = outcome.details.get("losses")
    if not losses:
        return (text,)
    curve = widgets.Image(
        value=loss_curve_png(losses), format="png", layout=widgets.Layout(width="420px")
    )
    return (text, curve)


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

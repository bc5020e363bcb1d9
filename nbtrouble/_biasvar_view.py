"""How the bias-variance report, the error-analysis table and learning curves look.

Text for terminals and scripts, HTML for notebook exports, and an ipywidgets panel with a
waterfall chart (rendered to PNG with matplotlib's object API, so that the user's pyplot
figures and backend are left alone).
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbtrouble._error_analysis import ErrorAnalysis
    from nbtrouble._learning_curve import LearningCurve
    from nbtrouble.biasvar import BiasVariance

COLORS = {
    "irreducible": "#9e9e9e",
    "reducible": "#5b8db8",
    "negative": "#d9d9d9",
    "priority": "#e4572e",
    "total": "#333333",
}

SHORT = {
    "irreducible": "irreducible",
    "avoidable_bias": "avoidable\nbias",
    "variance": "variance",
    "distribution_shift": "distribution\nshift",
    "val_overfitting": "val\noverfitting",
}

ERROR_NAMES = {
    "irreducible": "irreducible (human-level)",
    "train": "train",
    "val": "validation (train distribution)",
    "test_val": "test-validation (test distribution)",
    "test": "test",
}


def format_error(value: float, metric: str) -> str:
    """Classification errors as percentages, other metrics as plain numbers."""
    if math.isnan(value):
        return "-"
    if metric == "error":
        return f"{100 * value:.1f}%"
    return f"{value:.5g}"


# ---------------------------------------------------------------------------------------
# Bias-variance report
# ---------------------------------------------------------------------------------------


def _title(bv: BiasVariance) -> str:
    reached = "test error" if "test" in bv.errors else "last error given"
    total = format_error(bv.total, bv.metric)
    return f"Bias-variance decomposition of the {reached} ({total}, metric: {bv.metric})"


def text(bv: BiasVariance) -> str:
    """The report as plain text."""
    from nbtrouble.biasvar import LABELS

    width = max(len(LABELS[k]) for k in bv.components) + 2
    lines = [_title(bv)]
    for name, value in bv.components.items():
        marker = "  <- fix first" if name == bv.priority else ""
        lines.append(f"  {LABELS[name]:<{width}}{format_error(value, bv.metric):>8}{marker}")
    lines.append(f"  {'= total':<{width}}{format_error(bv.total, bv.metric):>8}")
    measured = ", ".join(f"{k} {format_error(v, bv.metric)}" for k, v in bv.errors.items())
    lines.append(f"Errors: {measured}")
    lines.append(f"Next steps ({LABELS[bv.priority]}):")
    lines += [f"  {i}. {step}" for i, step in enumerate(bv.next_steps, 1)]
    if bv.notes:
        lines.append("Notes:")
        lines += [f"  - {note}" for note in bv.notes]
    return "\n".join(lines)


def _table_html(bv: BiasVariance) -> str:
    from nbtrouble.biasvar import LABELS

    rows = []
    running = 0.0
    for name, value in bv.components.items():
        running += value
        style = ' style="background:#fde3da;font-weight:bold"' if name == bv.priority else ""
        flag = " &larr; fix first" if name == bv.priority else ""
        rows.append(
            f"<tr{style}><td>{html_lib.escape(LABELS[name])}{flag}</td>"
            f"{_cell(format_error(value, bv.metric))}{_cell(format_error(running, bv.metric))}</tr>"
        )
    rows.append(
        f"<tr style='border-top:1px solid #999'><td><b>total</b></td>"
        f"{_cell(f'<b>{format_error(bv.total, bv.metric)}</b>')}<td></td></tr>"
    )
    errors = "".join(
        f"<tr><td>{html_lib.escape(ERROR_NAMES[k])}</td>{_cell(format_error(v, bv.metric))}</tr>"
        for k, v in bv.errors.items()
    )
    return (
        "<table class='nbtrouble-components'><thead><tr><th>component</th><th>value</th>"
        f"<th>cumulative</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        "<table class='nbtrouble-errors'><thead><tr><th>error</th><th>value</th></tr></thead>"
        f"<tbody>{errors}</tbody></table>"
    )


def _cell(content: str) -> str:
    return f"<td style='text-align:right'>{content}</td>"


def _steps_html(bv: BiasVariance) -> str:
    from nbtrouble.biasvar import LABELS

    steps = "".join(f"<li>{html_lib.escape(step)}</li>" for step in bv.next_steps)
    title = f"<b>Next steps: {html_lib.escape(LABELS[bv.priority])}</b>"
    return f"{title}<ol class='nbtrouble-next-steps'>{steps}</ol>"


def _notes_html(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{html_lib.escape(note)}</li>" for note in notes)
    return f"<b>Notes</b><ul class='nbtrouble-notes'>{items}</ul>"


def html(bv: BiasVariance) -> str:
    """The report as standalone HTML (chart embedded as a PNG), for notebook exports."""
    image = base64.b64encode(png(waterfall(bv))).decode("ascii")
    return (
        f"<div class='nbtrouble-biasvar'><h4>{html_lib.escape(_title(bv))}</h4>"
        f"<img alt='bias-variance waterfall chart' src='data:image/png;base64,{image}'/>"
        f"{_table_html(bv)}{_steps_html(bv)}{_notes_html(bv.notes)}</div>"
    )


def panel(bv: BiasVariance) -> Any:
    """The widget panel: title, chart, tables, next steps and notes."""
    import ipywidgets as widgets

    chart = widgets.Image(
        value=png(waterfall(bv)), format="png", layout=widgets.Layout(max_width="620px")
    )
    box = widgets.VBox(
        [
            widgets.HTML(f"<h4>{html_lib.escape(_title(bv))}</h4>"),
            widgets.HBox([chart, widgets.HTML(_table_html(bv))]),
            widgets.HTML(_steps_html(bv)),
            widgets.HTML(_notes_html(bv.notes)),
        ]
    )
    box.add_class("nbtrouble-biasvar")
    return box


def waterfall(bv: BiasVariance) -> Any:
    """A waterfall chart: each component stacked on the previous ones, ending at the total."""
    from matplotlib.figure import Figure

    names = list(bv.components)
    figure = Figure(figsize=(1.25 * (len(names) + 1) + 1, 3.6), dpi=100)
    ax = figure.add_subplot()
    running = 0.0
    for x, name in enumerate(names):
        value = bv.components[name]
        bottom = running if value >= 0 else running + value
        ax.bar(x, abs(value), bottom=bottom, width=0.7, **_bar_style(name, value, bv.priority))
        ax.text(
            x,
            max(running, running + value),
            format_error(value, bv.metric),
            ha="center",
            va="bottom",
            fontsize=9,
        )
        running += value
        ax.plot([x + 0.35, x + 0.65], [running, running], color="#777777", linewidth=0.8)
    total_x = len(names)
    ax.bar(total_x, bv.total, width=0.7, color=COLORS["total"])
    ax.text(
        total_x,
        bv.total,
        format_error(bv.total, bv.metric),
        ha="center",
        va="bottom",
        fontsize=9,
        weight="bold",
    )
    ax.set_xticks(
        range(len(names) + 1),
        [SHORT[n] for n in names] + ["test" if "test" in bv.errors else "total"],
    )
    _label_axis(ax, bv.metric)
    ax.set_title(
        f"fix first: {bv.priority.replace('_', ' ')}", color=COLORS["priority"], fontsize=10
    )
    ax.spines[["top", "right"]].set_visible(False)
    ax.axhline(0, color="#777777", linewidth=0.8)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.1 * (high - low))  # room for the labels on top
    figure.tight_layout()
    return figure


def _label_axis(ax: Any, metric: str) -> None:
    ax.set_ylabel(metric)
    if metric == "error":
        from matplotlib.ticker import PercentFormatter

        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))


def _bar_style(name: str, value: float, priority: str) -> dict[str, Any]:
    if name == priority:
        return {"color": COLORS["priority"], "edgecolor": "black", "linewidth": 1.5}
    if value < 0:
        return {"color": COLORS["negative"], "edgecolor": "#777777", "hatch": "//"}
    return {"color": COLORS["irreducible" if name == "irreducible" else "reducible"]}


def png(figure: Any) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------
# Error-analysis table
# ---------------------------------------------------------------------------------------

_EA_COLUMNS = (
    "slice",
    "n train-val",
    "n test-val",
    "error train-val",
    "error test-val",
    "share of error",
    "gain",
)


def _ea_cells(ea: ErrorAnalysis) -> list[list[str]]:
    return [
        [
            row.slice,
            str(row.n_train_val),
            str(row.n_test_val) if ea.error_test_val is not None else "-",
            format_error(row.error_train_val, ea.metric),
            format_error(row.error_test_val, ea.metric),
            f"{100 * row.share:.0f}%",
            format_error(row.gain, ea.metric),
        ]
        for row in ea.rows
    ]


def _ea_title(ea: ErrorAnalysis) -> str:
    overall = f"train-val {format_error(ea.error_train_val, ea.metric)}"
    if ea.error_test_val is not None:
        overall += f", test-val {format_error(ea.error_test_val, ea.metric)}"
    reference = "test-validation" if ea.reference == "test_val" else "train-validation"
    return f"Error analysis ({overall}); share and gain on the {reference} set, sorted by gain"


def error_analysis_text(ea: ErrorAnalysis) -> str:
    """The error-analysis table as aligned text."""
    cells = [list(_EA_COLUMNS), *_ea_cells(ea)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_EA_COLUMNS))]
    lines = [_ea_title(ea)]
    for row in cells:
        lines.append(
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    if not ea.rows:
        lines.append("  (no slice labels found)")
    lines += [f"  - {note}" for note in ea.notes]
    return "\n".join(lines)


def error_analysis_html(ea: ErrorAnalysis) -> str:
    """The error-analysis table as HTML."""
    head = "".join(f"<th>{c}</th>" for c in _EA_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html_lib.escape(c)}</td>" for c in row) + "</tr>"
        for row in _ea_cells(ea)
    )
    return (
        f"<div class='nbtrouble-error-analysis'><b>{html_lib.escape(_ea_title(ea))}</b>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{_notes_html(ea.notes)}</div>"
    )


# ---------------------------------------------------------------------------------------
# Learning curves
# ---------------------------------------------------------------------------------------


def plot_learning_curve(lc: LearningCurve, ax: Any = None) -> Any:
    """Train and validation error against data size, the irreducible error as a line."""
    if ax is None:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6, 3.6), dpi=100)
        ax = figure.add_subplot()
    ax.plot(lc.sizes, lc.train, "o-", label="train error", color=COLORS["reducible"])
    ax.plot(lc.sizes, lc.val, "o-", label="validation error", color=COLORS["priority"])
    ax.axhline(
        lc.irreducible, linestyle="--", color=COLORS["irreducible"], label="irreducible error"
    )
    ax.set_xscale("log")
    ax.set_xlabel("training examples")
    _label_axis(ax, lc.metric)
    ax.set_title(
        "more data likely helps" if lc.more_data_helps else "more data unlikely to help",
        fontsize=10,
    )
    ax.legend(frameon=False)
    ax.figure.tight_layout()
    return ax.figure


def learning_curve_text(lc: LearningCurve) -> str:
    """The learning curve as a table and its verdict."""
    lines = ["Learning curve", f"  {'size':>10}  {'train':>8}  {'val':>8}"]
    for size, train, val in zip(lc.sizes, lc.train, lc.val, strict=True):
        train_text, val_text = format_error(train, lc.metric), format_error(val, lc.metric)
        lines.append(f"  {size:>10,.0f}  {train_text:>8}  {val_text:>8}")
    lines.append(f"  irreducible error: {format_error(lc.irreducible, lc.metric)}")
    lines.append(lc.verdict)
    return "\n".join(lines)


def learning_curve_html(lc: LearningCurve) -> str:
    """The learning curve's plot and verdict as HTML."""
    image = base64.b64encode(png(plot_learning_curve(lc))).decode("ascii")
    return (
        "<div class='nbtrouble-learning-curve'>"
        f"<img alt='learning curve' src='data:image/png;base64,{image}'/>"
        f"<p>{html_lib.escape(lc.verdict)}</p></div>"
    )

"""How a shape trace reads: a text form (terminals, scripts, ``repr``) and a widget panel.

Both are built from the same groups of ops, one group per ``nn.Module``, so the panel, the
terminal and an HTML export tell the same story: the first failure first, then the findings,
then every op, collapsed by module.

Examples
--------
>>> with nbt.shapecheck() as trace:
...     model(x)
>>> print(trace_text(trace))  # what ``repr(trace)`` shows
"""

from __future__ import annotations

import functools
import html
import sys
from dataclasses import dataclass, field
from typing import Any

from nbtrouble.findings import SEVERITIES, Finding, alarms

# A trace of a big model has thousands of ops: the text stays a screenful per module and
# the panel stays light enough for the browser. The full data is always in ``trace.ops``.
TEXT_OPS_PER_MODULE = 8
TEXT_MODULES = 40
PANEL_OPS_PER_MODULE = 200
PANEL_MODULES = 200

OPERANDS_NAME = "nbt_operands"  # what the debugger calls the failing op's operands
DEBUG_TIP = (
    f"Run %shapecheck_debug to open ipdb at your line, with the operands in {OPERANDS_NAME}."
)
_FAILURE_COLOUR = "#c9302c"


@dataclass
class ModuleGroup:
    """The ops one ``nn.Module`` ran itself, in the order they ran."""

    path: str | None  # dotted path, "" for the top-level module, None outside any module
    type_name: str
    ops: list[Any] = field(default_factory=list)
    failed: bool = False

    @property
    def label(self) -> str:
        name = module_label(self.path)
        return f"{name} · {self.type_name}" if self.type_name else name

    @property
    def op_count(self) -> int:
        return sum(getattr(op, "count", 1) for op in self.ops)


def module_label(path: str | None) -> str:
    """A module's dotted path, or what stands for it at the top level and outside modules."""
    if path is None:
        return "(outside any module)"
    return path or "(top-level module)"


def module_groups(trace: Any) -> list[ModuleGroup]:
    """The trace's ops by module, in order of first appearance; the failing op ends its group."""
    type_names = {record.path: record.type_name for record in trace.modules}
    groups: dict[str | None, ModuleGroup] = {}

    def group_of(path: str | None) -> ModuleGroup:
        if path not in groups:
            groups[path] = ModuleGroup(path, type_names.get(path, "") if path is not None else "")
        return groups[path]

    for op in trace.ops:
        group_of(op.module).ops.append(op)
    failure = trace.failure
    if failure is not None:
        group = group_of(failure.module)
        group.failed = True
        if not any(op is failure for op in group.ops):
            group.ops.append(failure)
    return list(groups.values())


def shape_text(shape: Any) -> str:
    """``(3, 7)``, ``(5,)`` or ``()``: the way Python prints a shape tuple."""
    return str(tuple(shape))


def operand_rows(failure: Any) -> list[tuple[str, str]]:
    """``(name, "(3, 7) float32 cpu")`` for each operand of the failing op."""
    operands = getattr(failure, "operands", None) or {}
    rows = [(name, _tensor_text(value)) for name, value in operands.items()]
    if rows:
        return rows
    dtypes = list(failure.dtypes) + [""] * len(failure.input_shapes)
    return [
        (f"arg{i}", f"{shape_text(shape)} {dtype}".strip())
        for i, (shape, dtype) in enumerate(zip(failure.input_shapes, dtypes))
    ]


def _tensor_text(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is None:
        return repr(value)
    dtype = str(getattr(value, "dtype", "")).removeprefix("torch.")
    device = getattr(value, "device", None)
    return " ".join(part for part in (shape_text(shape), dtype, str(device or "")) if part)


def op_inputs_text(op: Any) -> str:
    dtypes = list(op.dtypes) + [""] * len(op.input_shapes)
    return ", ".join(
        f"{shape_text(shape)} {dtype}".strip() for shape, dtype in zip(op.input_shapes, dtypes)
    )


def op_outputs_text(op: Any) -> str:
    return ", ".join(shape_text(shape) for shape in op.output_shapes) or "-"


def error_line(error: BaseException | None) -> str:
    """The exception's type and the first line of its message."""
    if error is None:
        return ""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def other_findings(trace: Any) -> list[Finding]:
    """The trace's findings, errors first, without the one that explains the failure."""
    failure_finding = getattr(trace.failure, "finding", None)
    order = {severity: i for i, severity in enumerate(SEVERITIES)}
    kept = [f for f in trace.findings if f != failure_finding]
    return sorted(kept, key=lambda f: order[f.severity])


def summary_text(trace: Any, groups: list[ModuleGroup]) -> str:
    op_count = sum(group.op_count for group in groups)
    module_count = sum(1 for group in groups if group.path is not None)
    parts = [f"{plural(op_count, 'op')} in {plural(module_count, 'module')}"]
    if trace.meta:
        parts.append("meta tensors (shapes only)")
    if trace.folded:
        parts.append(f"{plural(trace.folded, 'repeat')} folded into counts")
    if trace.dropped:
        parts.append(f"{plural(trace.dropped, 'op')} not recorded (cap reached)")
    problems = alarms(trace.findings)
    if trace.failure is not None:
        verdict = "FAILED"
    elif problems:
        verdict = f"found {plural(len(problems), 'problem')}"
    else:
        verdict = "ok"
    return f"shapecheck {verdict}: " + ", ".join(parts)


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


# ---------------------------------------------------------------- text


def trace_text(trace: Any) -> str:
    """The whole trace as plain text: failure, findings, then ops by module.

    Examples
    --------
    >>> print(trace_text(trace))
    shapecheck FAILED: 4 ops in 3 modules
    FAILED shape_mismatch in fc1 (Linear): torch.nn.functional.linear
    ...
    """
    groups = module_groups(trace)
    lines = [summary_text(trace, groups)]
    if trace.failure is not None:
        lines += ["", *failure_lines(trace.failure, _type_name(groups, trace.failure.module))]
    findings = other_findings(trace)
    if findings:
        lines += ["", f"findings ({len(findings)}):"]
        lines += ["  " + line for f in findings for line in str(f).splitlines()]
    if groups:
        lines += ["", "ops by module:"]
        lines += _groups_lines(groups)
    return "\n".join(lines)


def display_location(location: str) -> str:
    """``file:line`` as IPython's tracebacks name it: ``Cell In[3], line 14`` for a cell.

    A kernel runs each cell from a temporary file; the traceback above the panel calls it by
    its execution count, so the panel does too.
    """
    filename, _, line = location.rpartition(":")
    shell = _ipython_shell()
    named = shell.compile.format_code_name(filename) if shell is not None and filename else None
    if not named:
        return location
    label, name = named
    return f"{label} {name}, line {line}"


def _ipython_shell() -> Any:
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None


def failure_lines(failure: Any, type_name: str = "") -> list[str]:
    """What failed, where in the user's code, why, and what to do next."""
    finding = getattr(failure, "finding", None)
    kind = finding.kind if finding is not None else "error"
    module = module_label(failure.module)
    module_text = module + (f" ({type_name})" if type_name else "")
    lines = [f"FAILED {kind} in {module_text}: {failure.name}"]
    lines += [f"  {name:<8} {text}" for name, text in operand_rows(failure)]
    if failure.location:
        lines.append(f"  your line: {display_location(failure.location)}")
        if failure.source_line:
            lines.append(f"      {failure.source_line}")
    lines.append(f"  module:    {module}")
    lines.append(f"  error:     {error_line(getattr(failure, 'error', None))}")
    if finding is not None:
        lines.append(f"  what happened: {finding.message}")
        if finding.hint:
            lines.append(f"  what to do:    {finding.hint}")
    return lines


def _type_name(groups: list[ModuleGroup], path: str | None) -> str:
    return next((group.type_name for group in groups if group.path == path), "")


def shown_groups(groups: list[ModuleGroup], limit: int) -> list[ModuleGroup]:
    """The first ``limit`` groups, plus the failing one wherever it is."""
    shown = groups[:limit]
    shown += [group for group in groups[limit:] if group.failed]
    return shown


def _groups_lines(groups: list[ModuleGroup]) -> list[str]:
    shown = shown_groups(groups, TEXT_MODULES)
    more = f"  ... {len(groups) - len(shown)} more modules (all in trace.ops)"
    lines: list[str] = []
    for index, group in enumerate(shown):
        if index == TEXT_MODULES:  # the failing module, listed past the cap
            lines.append(more)
        lines += _group_lines(group)
    if len(shown) == TEXT_MODULES < len(groups):
        lines.append(more)
    return lines


def _group_lines(group: ModuleGroup) -> list[str]:
    mark = "  <- failed here" if group.failed else ""
    lines = [f"  {group.label}  ({plural(group.op_count, 'op')}){mark}"]
    # In the failing module the ops just before the failure matter most.
    if group.failed:
        shown = group.ops[-TEXT_OPS_PER_MODULE:]
    else:
        shown = group.ops[:TEXT_OPS_PER_MODULE]
    hidden = len(group.ops) - len(shown)
    if hidden and group.failed:
        lines.append(f"      ... {hidden} earlier ops")
    lines += [f"    {_op_line(op)}" for op in shown]
    if hidden and not group.failed:
        lines.append(f"      ... {hidden} more ops (all in trace.ops)")
    return lines


def _op_line(op: Any) -> str:
    failed = hasattr(op, "error")
    line = f"{'x ' if failed else ''}{op.name}  {op_inputs_text(op)} -> "
    line += "FAILED" if failed else op_outputs_text(op)
    if op.location:
        line += f"  at {display_location(op.location)}"
    if getattr(op, "count", 1) > 1:
        line += f"  x{op.count}"
    return line


# ---------------------------------------------------------------- html


def trace_html(trace: Any) -> str:
    """The trace as static HTML (an HTML export, where widgets do not render)."""
    groups = module_groups(trace)
    parts = [f"<p><b>{_esc(summary_text(trace, groups))}</b></p>"]
    if trace.failure is not None:
        parts.append(failure_html(trace.failure, _type_name(groups, trace.failure.module)))
    parts.append(findings_html(other_findings(trace)))
    for group in shown_groups(groups, PANEL_MODULES):
        opened = " open" if group.failed else ""
        parts.append(
            f"<details{opened}><summary>{_esc(group_title(group))}</summary>"
            f"{ops_table_html(group)}</details>"
        )
    return "<div class='nbtrouble-shapecheck'>" + "".join(parts) + "</div>"


def failure_html(failure: Any, type_name: str = "") -> str:
    lines = failure_lines(failure, type_name)
    head, body = lines[0], lines[1:]
    return (
        f"<div style='border:2px solid {_FAILURE_COLOUR};padding:4px 8px;margin:4px 0'>"
        f"<b style='color:{_FAILURE_COLOUR}'>{_esc(head)}</b>"
        f"<pre style='margin:4px 0;white-space:pre-wrap'>{_esc(chr(10).join(body))}</pre></div>"
    )


def findings_html(findings: list[Finding]) -> str:
    if not findings:
        return ""
    items = "".join(
        f"<li><b>[{_esc(f.severity)}] {_esc(f.kind)}</b>: {_esc(f.message)}"
        + (f"<br>at <code>{_esc(f.where)}</code>" if f.where else "")
        + (f"<br>&rarr; {_esc(f.hint)}" if f.hint else "")
        + "</li>"
        for f in findings
    )
    return f"<p><b>findings ({len(findings)})</b></p><ul>{items}</ul>"


def group_title(group: ModuleGroup) -> str:
    mark = "✗ " if group.failed else ""
    return f"{mark}{group.label} ({plural(group.op_count, 'op')})"


def ops_table_html(group: ModuleGroup) -> str:
    head = "<tr><th>op</th><th>inputs</th><th>outputs</th><th>line</th><th>count</th></tr>"
    rows = "".join(_op_row_html(op) for op in group.ops[:PANEL_OPS_PER_MODULE])
    more = len(group.ops) - PANEL_OPS_PER_MODULE
    tail = f"<p>... {more} more ops (all in trace.ops)</p>" if more > 0 else ""
    return f"<table style='font-family:monospace;font-size:90%'>{head}{rows}</table>{tail}"


def _op_row_html(op: Any) -> str:
    failed = hasattr(op, "error")
    style = " style='background:#fde2e1'" if failed else ""
    outputs = "FAILED" if failed else op_outputs_text(op)
    line = display_location(op.location) if op.location else ""
    if op.source_line:
        line += f"  {op.source_line}"
    cells = (op.name, op_inputs_text(op), outputs, line, str(getattr(op, "count", 1)))
    return f"<tr{style}>" + "".join(f"<td>{_esc(cell)}</td>" for cell in cells) + "</tr>"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


# ---------------------------------------------------------------- widget


def trace_panel(trace: Any) -> Any:
    """A widget panel: the failure box first, the findings, then an Accordion per module.

    The panel also carries the text and HTML forms, so a notebook saved without widget
    state still shows the report when exported to HTML.
    """
    import ipywidgets as widgets

    groups = module_groups(trace)
    children: list[Any] = [widgets.HTML(f"<b>{_esc(summary_text(trace, groups))}</b>")]
    if trace.failure is not None:
        children.append(_failure_widget(trace.failure, _type_name(groups, trace.failure.module)))
    findings = other_findings(trace)
    if findings:
        children.append(widgets.HTML(findings_html(findings)))
    shown = shown_groups(groups, PANEL_MODULES)
    if shown:
        children.append(_modules_accordion(shown))
    if len(groups) > len(shown):
        children.append(
            widgets.HTML(f"... {len(groups) - len(shown)} more modules (all in trace.ops)")
        )
    return _panel_class()(children=children, text=trace_text(trace), html=trace_html(trace))


def _failure_widget(failure: Any, type_name: str) -> Any:
    import ipywidgets as widgets

    box = widgets.HTML(
        failure_html(failure, type_name) + f"<p><i>{_esc(DEBUG_TIP)}</i></p>",
        layout=widgets.Layout(margin="4px 0"),
    )
    box.add_class("nbtrouble-failure")
    return box


def _modules_accordion(groups: list[ModuleGroup]) -> Any:
    import ipywidgets as widgets

    accordion = widgets.Accordion(
        children=[widgets.HTML(ops_table_html(group)) for group in groups],
        titles=tuple(group_title(group) for group in groups),
    )
    # Collapsed, except the module that failed: that is where the user looks first.
    failed = [i for i, group in enumerate(groups) if group.failed]
    accordion.selected_index = failed[0] if failed else None
    return accordion


@functools.cache
def _panel_class() -> Any:
    """A stock ``VBox`` whose display bundle also carries the text and HTML forms."""
    import ipywidgets as widgets

    class TracePanel(widgets.VBox):  # type: ignore[misc]
        def __init__(self, *, text: str, html: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.text, self.html = text, html

        def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
            # Frontends with widget support pick the widget view; an HTML export of a
            # notebook saved without widget state falls back to text/html.
            bundle = super()._repr_mimebundle_(**kwargs) or {}
            bundle.update({"text/plain": self.text, "text/html": self.html})
            return bundle

    return TracePanel

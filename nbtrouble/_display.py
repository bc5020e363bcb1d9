"""Where a report is shown: a widget panel in a notebook, text elsewhere."""

from __future__ import annotations

import html
import sys
from typing import Any, Callable


def in_widget_frontend() -> bool:
    """True inside a Jupyter kernel (JupyterLab, Notebook 7, VS Code, Colab).

    Terminal IPython and plain scripts get text; widgets would only print their repr there.
    """
    ipython_module = sys.modules.get("IPython")
    if ipython_module is None:
        return False
    shell = ipython_module.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def panel_bundle(widget: Any, report: Any) -> dict[str, Any]:
    """The widget's display bundle, with the report's text and HTML forms beside it.

    Frontends with widgets show the panel; a notebook exported to HTML without the widgets'
    JavaScript (or saved without widget state) shows the HTML form instead of a widget repr.
    """
    bundle = dict(widget._repr_mimebundle_() or {})
    bundle["text/plain"] = repr(report)
    if "text/html" not in bundle:  # a panel may carry its own HTML form
        to_html = getattr(report, "_repr_html_", None)
        bundle["text/html"] = to_html() if to_html else f"<pre>{html.escape(repr(report))}</pre>"
    return bundle


def show(report: Any, make_panel: Callable[[Any], Any]) -> None:
    """Display ``make_panel(report)`` in a notebook, else print the report's text form."""
    if in_widget_frontend():
        from IPython.display import display

        display(panel_bundle(make_panel(report), report), raw=True)
    else:
        print(repr(report))

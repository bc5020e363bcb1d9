"""Where a report is shown: a widget panel in a notebook, text elsewhere."""

from __future__ import annotations

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


def show(report: Any, make_panel: Callable[[Any], Any]) -> None:
    """Display ``make_panel(report)`` in a notebook, else print the report's text form."""
    if in_widget_frontend():
        from IPython.display import display

        display(make_panel(report))
    else:
        print(repr(report))

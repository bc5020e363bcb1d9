"""nbtrouble: make deep-learning bugs visible in a notebook.

Public API (see the README): ``shapecheck``, ``overfit_batch``, ``biasvar``, ``troubleshoot``
and ``Finding``. ``%load_ext nbtrouble`` registers the magics.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from nbtrouble.findings import Finding, NbTroubleError

# Public name -> module that defines it; imported on first use so that `import nbtrouble`
# stays cheap and never needs IPython.
_LAZY = {
    "shapecheck": "nbtrouble.shapes",
    "Trace": "nbtrouble.shapes",
    "OpRecord": "nbtrouble.shapes",
    "Failure": "nbtrouble.shapes",
    "overfit_batch": "nbtrouble.overfit",
    "OverfitReport": "nbtrouble.overfit",
    "BiasVariance": "nbtrouble.biasvar",
    "error_analysis": "nbtrouble.biasvar",
    "learning_curve": "nbtrouble.biasvar",
}

# These two share their name with the module that defines them: importing the module would
# rebind the package attribute to the module, so bind the functions eagerly, after the import.
from nbtrouble.biasvar import biasvar  # noqa: E402
from nbtrouble.troubleshoot import troubleshoot  # noqa: E402

__all__ = ["Finding", "NbTroubleError", "biasvar", "troubleshoot", "load_ipython_extension", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nbtrouble' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """Register nbtrouble's magics; imported lazily so scripts never need IPython."""
    from nbtrouble._magics import register

    register(ipython)

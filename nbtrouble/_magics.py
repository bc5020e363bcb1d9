"""Registers nbtrouble's magics and holds what they share: argument parsing and name lookup.

Each magic lives beside its feature (``_magic_shapes.py``, ``_magic_overfit.py``, ...) and
is a thin layer over a plain-Python function.
"""

from __future__ import annotations

import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import parse_argstring


def parse(magic_func: Any, line: str) -> Any:
    """``parse_argstring`` whose ``UsageError`` ends with the usage line.

    An unbalanced quote (a ``ValueError`` from shlex) becomes a ``UsageError`` too.
    """
    try:
        return parse_argstring(magic_func, line)
    except ValueError as e:  # shlex: "No closing quotation"
        message = f"{magic_func.__name__}: could not parse {line!r}: {e}"
    except UsageError as e:
        message = str(e)
    usage = magic_func.parser.format_usage().removeprefix("::").strip()  # reST in the help
    raise UsageError(f"{message}\nusage: {usage}") from None


def resolve(shell: Any, expression: str, what: str) -> Any:
    """Evaluate a name or expression from the user namespace, or raise a ``UsageError``."""
    try:
        return eval(expression, shell.user_global_ns, shell.user_ns)  # noqa: S307 - user's own kernel
    except NameError as e:
        raise UsageError(f"{what}: {e}") from None
    except Exception as e:  # any failure of the user's expression is a usage problem here
        raise UsageError(
            f"{what}: could not evaluate {expression!r}: {type(e).__name__}: {e}"
        ) from None


def split_words(line: str) -> list[str]:
    """Shell-like split that reports an unbalanced quote as a ``UsageError``."""
    try:
        return shlex.split(line)
    except ValueError as e:
        raise UsageError(f"could not parse {line!r}: {e}") from None


def register(shell: Any) -> None:
    """Register every magic class that is available."""
    import importlib

    for module_name, class_name in _MAGIC_CLASSES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # a real missing dependency, not a feature not built yet
                raise
            continue
        shell.register_magics(getattr(module, class_name))


_MAGIC_CLASSES = [
    ("nbtrouble._magic_shapes", "ShapeMagics"),
    ("nbtrouble._magic_overfit", "OverfitMagics"),
    ("nbtrouble._magic_biasvar", "BiasVarMagics"),
    ("nbtrouble._magic_troubleshoot", "TroubleshootMagics"),
]

"""Which frame is the user's: the ``file:line`` a finding points at.

A tensor op runs deep inside torch; the line worth showing is the innermost frame outside
torch, nbtrouble, the standard library and the notebook machinery. These helpers run once per
traced op, so every answer is cached per code object (or file name).
"""

from __future__ import annotations

import linecache
import os
import sysconfig
from types import CodeType, FrameType, TracebackType

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_STDLIB_DIRS = tuple(
    {os.path.abspath(sysconfig.get_paths()[key]) + os.sep for key in ("stdlib", "platstdlib")}
)
_SITE_MARKERS = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)
# Installed packages that run a notebook or a test, never a model.
_MACHINERY = (
    "IPython",
    "ipykernel",
    "traitlets",
    "tornado",
    "zmq",
    "jupyter_client",
    "jupyter_core",
    "ipywidgets",
    "comm",
    "debugpy",
    "_pytest",
    "pytest",
    "pluggy",
    "torchsnooper",
    "snoop",
    "tsensor",
    "functorch",
)
# Code in torch that builds or converts modules rather than running them: ops made there
# (weight initialisation, ``model.to``) are not ops a user would call.
_HOUSEKEEPING_NAMES = frozenset(
    {
        "__init__",
        "__new__",
        "__setstate__",
        "__deepcopy__",
        "__repr__",
        "extra_repr",
        "reset_parameters",
        "_reset_parameters",
        "_init_weights",
        "_apply",
        "state_dict",
        "_save_to_state_dict",
        "load_state_dict",
        "_load_from_state_dict",
        "flatten_parameters",
    }
)
_HOUSEKEEPING_DIRS = tuple(
    _TORCH_DIR + part + os.sep for part in ("optim", os.path.join("nn", "utils"), "_dynamo")
)
_HOUSEKEEPING_FILES = (_TORCH_DIR + os.path.join("nn", "init.py"),)

# What a code object is to the tracer.
USER = 0  # anything outside torch, nbtrouble, the stdlib and the notebook machinery
INTERNAL = 1
HOUSEKEEPING = 2  # internal, and building / converting modules rather than running them

_file_internal: dict[str, bool] = {}
# The caches below are keyed by ``id(code)``: hashing a code object hashes its constants every
# time (microseconds for a big function), and these lookups run for every frame of every op.
# Every code object cached is kept here, so that its id stays its own.
_kept_codes: dict[int, CodeType] = {}
known_code_kinds: dict[int, int] = {}  # code_kind's cache by id(code), read by the tracer
_location_text: dict[tuple[int, int], str] = {}


def _keep(code: CodeType) -> int:
    _kept_codes[id(code)] = code
    return id(code)


def _machinery_package(filename: str) -> bool:
    for marker in _SITE_MARKERS:
        _, sep, rest = filename.partition(marker)
        if sep:
            top = rest.split(os.sep, 1)[0]
            return top in _MACHINERY or top.split("-", 1)[0] in _MACHINERY
    return False


def is_internal_file(filename: str) -> bool:
    """True for torch, nbtrouble, the standard library and notebook/test machinery.

    Examples
    --------
    >>> import torch
    >>> is_internal_file(torch.__file__)
    True
    """
    known = _file_internal.get(filename)
    if known is not None:
        return known
    if filename.startswith("<"):
        # "<frozen importlib._bootstrap>" is the stdlib; "<ipython-input-1>" and "<string>" are
        # code the user typed.
        internal = filename.startswith("<frozen")
    else:
        path = os.path.abspath(filename)
        internal = (
            path.startswith((_PACKAGE_DIR, _TORCH_DIR))
            or _machinery_package(path)
            or (path.startswith(_STDLIB_DIRS) and not any(m in path for m in _SITE_MARKERS))
        )
    _file_internal[filename] = internal
    return internal


def is_user_file(filename: str) -> bool:
    """True for the user's own code: not internal and not an installed library."""
    if is_internal_file(filename):
        return False
    return not any(marker in filename for marker in _SITE_MARKERS)


_user_code: dict[int, bool] = {}


def is_user_code(code: CodeType) -> bool:
    """``is_user_file`` of a code object's file (cached per code object)."""
    known = _user_code.get(id(code))
    if known is None:
        known = _user_code[_keep(code)] = is_user_file(code.co_filename)
    return known


# A function or dispatch mode's handler is plumbing wherever it is defined: the line worth
# showing is the one that made the op, above the handler.
_HANDLER_NAMES = frozenset({"__torch_function__", "__torch_dispatch__"})


def code_kind(code: CodeType) -> int:
    """``USER``, ``INTERNAL`` or ``HOUSEKEEPING`` for a code object (cached)."""
    kind = known_code_kinds.get(id(code))
    if kind is None:
        filename = code.co_filename
        if code.co_name in _HANDLER_NAMES:
            kind = INTERNAL
        elif not is_internal_file(filename):
            kind = USER
        elif filename.startswith(_TORCH_DIR) and (
            code.co_name in _HOUSEKEEPING_NAMES
            or filename.startswith(_HOUSEKEEPING_DIRS)
            or filename in _HOUSEKEEPING_FILES
        ):
            kind = HOUSEKEEPING
        else:
            kind = INTERNAL
        known_code_kinds[_keep(code)] = kind
    return kind


def location_text(code: CodeType, lineno: int) -> str:
    """``"file:line"`` for a code object and line (cached)."""
    key = (id(code), lineno)
    text = _location_text.get(key)
    if text is None:
        _keep(code)
        text = _location_text[key] = f"{code.co_filename}:{lineno}"
    return text


def source_line(filename: str, lineno: int) -> str:
    """The stripped text of a line, or ``""`` when the source is not available."""
    return linecache.getline(filename, lineno).strip()


_code_lines: dict[tuple[int, int], str] = {}


def code_line(code: CodeType, lineno: int) -> str:
    """``source_line`` of a line of a code object (cached; a reloaded file has new code)."""
    key = (id(code), lineno)
    text = _code_lines.get(key)
    if text is None:
        _keep(code)
        text = _code_lines[key] = source_line(code.co_filename, lineno)
    return text


def user_location(frame: FrameType | None) -> tuple[str | None, str, FrameType | None]:
    """The innermost frame at or above ``frame`` outside torch, nbtrouble and the stdlib.

    Returns
    -------
    (location, source_line, frame)
        ``location`` is ``"file:line"`` or ``None`` when no such frame exists.
    """
    while frame is not None and code_kind(frame.f_code) != USER:
        frame = frame.f_back
    if frame is None:
        return None, "", None
    code, lineno = frame.f_code, frame.f_lineno
    return location_text(code, lineno), source_line(code.co_filename, lineno), frame


def innermost_user_frame(tb: TracebackType | None) -> FrameType | None:
    """The innermost frame of a traceback that is not internal.

    For an error raised inside a layer, this is the line of the model's ``forward`` (or the
    cell) that called the failing layer.
    """
    found = None
    while tb is not None:
        if code_kind(tb.tb_frame.f_code) == USER:
            found = tb.tb_frame
        tb = tb.tb_next
    return found


def innermost_user_line(tb: TracebackType | None) -> tuple[str | None, str]:
    """``("file:line", source text)`` of the innermost user frame of a traceback."""
    found: tuple[str | None, str] = (None, "")
    while tb is not None:
        code = tb.tb_frame.f_code
        if code_kind(code) == USER:
            found = (location_text(code, tb.tb_lineno), source_line(code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    return found

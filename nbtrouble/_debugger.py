"""Post-mortem debugging of a shape trace's failure, at the user's own line.

A plain post-mortem stops in the innermost frame, which for a shape error is a line inside
torch. Here the debugger opens on the innermost frame of the user's code on the way to the
failing op (for a model: the line of its ``forward`` that called the failing layer); ``up``
goes on to the cell and ``down`` into torch.

While the debugger runs, two names are reachable from every user frame:

``nbt_operands``
    ``dict`` of the failing op's tensor operands by name (``"input"``, ``"weight"``,
    ``"other"``, ... or ``"arg0"``, ``"arg1"``): ``p nbt_operands["input"].shape``.
``nbt_failure``
    the ``Failure`` record: op name, module path, shapes, the original error and the finding.

They are added to those frames' globals for the session only and removed (or the user's own
values of those names put back) when it ends; the frames' locals are never touched.

Examples
--------
>>> with nbt.shapecheck() as trace:
...     model(x)  # raises
>>> post_mortem(trace)  # ipdb> p nbt_operands["input"].shape
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any

from nbtrouble._location import innermost_user_frame, is_internal_file
from nbtrouble._shapes_view import OPERANDS_NAME, module_label, operand_rows

FAILURE_NAME = "nbt_failure"
_SKIPPED_MODULES = ("torch", "torch.*", "nbtrouble", "nbtrouble.*")
_MISSING = object()


def post_mortem(trace: Any, shell: Any = None) -> None:
    """Open the debugger on the user's frame that led to ``trace.failure``.

    Parameters
    ----------
    trace
        A ``Trace`` whose ``failure`` is set.
    shell
        The IPython shell whose ``debugger_cls`` to use (ipdb's choice: ``InterruptiblePdb``
        in a kernel, ``TerminalPdb`` in terminal IPython); ``None``: the running shell if
        any, else the standard library's ``pdb``. Call this only while a cell (or a script)
        is executing: a kernel answers the debugger's input requests only then.

    Raises
    ------
    ValueError
        When the trace has no failure, or the failure's error carries no traceback.
    """
    failure = getattr(trace, "failure", None)
    if failure is None:
        raise ValueError("the trace recorded no failure to debug")
    tb = failure.error.__traceback__
    if tb is None:
        raise ValueError(f"{type(failure.error).__name__} has no traceback to debug")
    target = innermost_user_frame(tb) or _innermost_frame(tb)
    debugger_cls = _debugger_class(shell)
    # IPython's debugger skips these modules on `up` / `down`: one `up` reaches the cell.
    skip = _SKIPPED_MODULES if issubclass(debugger_cls, _ipython_pdb()) else None
    debugger = _positioned(debugger_cls, target)(skip=skip)
    debugger.reset()
    names = {OPERANDS_NAME: dict(failure.operands or {}), FAILURE_NAME: failure}
    with _names_in_globals(_user_frames(tb), names), _plain_displayhook():
        print(intro_text(failure, skips_internal=skip is not None), file=debugger.stdout)
        debugger.interaction(None, tb)


def intro_text(failure: Any, skips_internal: bool = True) -> str:
    """What the debugger opens on, and where the operands are."""
    operands = ", ".join(
        f"{OPERANDS_NAME}[{name!r}] {text}" for name, text in operand_rows(failure)
    )
    moves = (
        "`up` goes to the caller, skipping torch's frames (`unignore_module torch.*` shows them)"
        if skips_internal
        else "`up` goes towards the caller, through torch's frames"
    )
    return (
        f"nbtrouble: {failure.name} failed in module {module_label(failure.module)}.\n"
        f"Stopped at your line that led to it; {moves}.\n"
        f"Operands: {operands or '(none kept)'}\n"
        f"The failure record: {FAILURE_NAME}"
    )


def _debugger_class(shell: Any) -> type:
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    if shell is None:
        import pdb  # noqa: T100 - a debugger is what the user asked for

        return pdb.Pdb
    return shell.debugger_cls  # type: ignore[no-any-return]


def _ipython_pdb() -> type:
    from IPython.core.debugger import Pdb

    return Pdb


def _positioned(debugger_cls: type, target: FrameType) -> type:
    """A subclass of ``debugger_cls`` that starts on ``target`` instead of the innermost frame."""

    class UserFrameDebugger(debugger_cls):  # type: ignore[misc, valid-type]
        def setup(self, frame: FrameType | None, tb: TracebackType | None) -> Any:
            stop = super().setup(frame, tb)
            for index, (stack_frame, _) in enumerate(self.stack):
                if stack_frame is target:
                    self.curindex, self.curframe = index, stack_frame
                    # pdb evaluates commands in this cached dict where it is a plain
                    # attribute; where it is a property, it reads curframe.f_locals.
                    if not isinstance(getattr(type(self), "curframe_locals", None), property):
                        self.curframe_locals = stack_frame.f_locals
            return stop

    return UserFrameDebugger


def _innermost_frame(tb: TracebackType) -> FrameType:
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame


def _user_frames(tb: TracebackType | None) -> list[FrameType]:
    frames = []
    while tb is not None:
        if not is_internal_file(tb.tb_frame.f_code.co_filename):
            frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


@contextmanager
def _names_in_globals(frames: list[FrameType], names: dict[str, Any]) -> Iterator[None]:
    """Make ``names`` visible from ``frames`` for the block, then restore their globals."""
    spaces = list({id(frame.f_globals): frame.f_globals for frame in frames}.values())
    saved = [{name: space.get(name, _MISSING) for name in names} for space in spaces]
    try:
        for space in spaces:
            space.update(names)
        yield
    finally:
        for space, previous in zip(spaces, saved):
            for name, value in previous.items():
                if value is _MISSING:
                    space.pop(name, None)
                else:
                    space[name] = value


@contextmanager
def _plain_displayhook() -> Iterator[None]:
    """Python's own displayhook for the session, as IPython's ``%debug`` does.

    IPython's hook would number the debugger's expression values as cell outputs.
    """
    saved = sys.displayhook
    sys.displayhook = sys.__displayhook__
    try:
        yield
    finally:
        sys.displayhook = saved

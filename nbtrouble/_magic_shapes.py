"""``%%shapecheck`` and ``%shapecheck_debug``: shape tracing of a cell, and its debugger."""

from __future__ import annotations

import argparse
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from nbtrouble._magics import parse, resolve

TRACE_NAME = "_shapecheck"  # where the last cell's trace is kept, like IPython's `_`


def _variable_name(text: str) -> str:
    if not text.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid variable name")
    return text


@magics_class
class ShapeMagics(Magics):
    """Trace a cell's tensor ops and debug the first one that failed."""

    @magic_arguments("%shapecheck")  # the usage line reads %%shapecheck: a cell magic
    @argument(
        "--meta", action="store_true", help="run on shape-only (meta) tensors: no FLOPs, no memory"
    )
    @argument(
        "--debug",
        action="store_true",
        help="on failure, open ipdb at your line that led to the failing op",
    )
    @argument(
        "--quiet",
        action="store_true",
        help="show the report only when something failed or looks wrong",
    )
    @argument(
        "name",
        nargs="?",
        default=None,
        type=_variable_name,
        help="also store the trace in this variable",
    )
    @cell_magic
    def shapecheck(self, line: str, cell: str) -> None:
        """Run the cell and show every tensor op it ran, grouped by module, failure first.

        The trace is stored as ``_shapecheck`` (and in ``name`` when given); the cell's own
        exception is shown by IPython as usual. In the debugger the failing op's operands
        are ``nbt_operands`` (a dict by name) and its record is ``nbt_failure``.
        Example: ``%%shapecheck --debug``
        """
        from nbtrouble._display import show
        from nbtrouble._shapes_view import trace_panel
        from nbtrouble.findings import alarms
        from nbtrouble.shapes import shapecheck

        args = parse(self.shapecheck, line)
        with shapecheck(meta=args.meta) as trace:
            result = self.shell.run_cell(cell)
        if result.error_before_exec is not None:  # a syntax error: IPython said so, nothing ran
            return
        if result.error_in_exec is not None:
            trace.capture_exception(result.error_in_exec)
        self.shell.user_ns[TRACE_NAME] = trace
        if args.name is not None:
            self.shell.user_ns[args.name] = trace
        if not args.quiet or trace.failure is not None or alarms(trace.findings):
            show(trace, trace_panel)
        if args.debug and trace.failure is not None:
            self._debug(trace)

    @magic_arguments()
    @argument(
        "trace", nargs="?", default=TRACE_NAME, help="the trace to debug (default: the last one)"
    )
    @line_magic
    def shapecheck_debug(self, line: str) -> None:
        """Open ipdb at your line that led to the failing op of the last ``%%shapecheck``.

        Like ``%debug``, but on your own code rather than inside torch; ``up`` goes to the
        cell. The operands are ``nbt_operands``, the failure record ``nbt_failure``.
        """
        args = parse(self.shapecheck_debug, line)
        if args.trace == TRACE_NAME and TRACE_NAME not in self.shell.user_ns:
            raise UsageError("%shapecheck_debug: no trace yet; run a cell with %%shapecheck first")
        from nbtrouble.shapes import Trace

        trace = resolve(self.shell, args.trace, "%shapecheck_debug")
        if not isinstance(trace, Trace):
            raise UsageError(f"%shapecheck_debug: {args.trace} is not a shape trace")
        if trace.failure is None:
            raise UsageError(f"%shapecheck_debug: nothing failed in {args.trace}")
        self._debug(trace)

    def _debug(self, trace: Any) -> None:
        from nbtrouble._debugger import post_mortem

        post_mortem(trace, self.shell)

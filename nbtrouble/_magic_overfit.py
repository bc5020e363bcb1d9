"""``%overfit_batch``: overfit one batch from the user namespace, with a live panel."""

from __future__ import annotations

import math
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from nbtrouble._magics import resolve

REPORT_NAME = "_overfit"  # where the last report is kept, like IPython's `_`


@magics_class
class OverfitMagics(Magics):
    """Drive the loss on one batch towards zero and explain what stops it."""

    @magic_arguments()
    @argument("model", help="the nn.Module (a name or an expression)")
    @argument("batch", help="(inputs, targets) or a dict of model inputs")
    @argument(
        "loss_fn", nargs="?", default=None, help="loss_fn(output, targets); inferred if left out"
    )
    @argument("--steps", type=int, default=200, help="training steps (default 200)")
    @argument("--lr", type=float, default=None, help="Adam's learning rate (default 3e-4)")
    @argument("--optimizer", default=None, help="an optimizer over the model's parameters")
    @argument("--keep", action="store_true", help="keep the trained weights")
    @argument("--name", default=None, help="also store the report in this variable")
    @line_magic
    def overfit_batch(self, line: str) -> None:
        """Overfit one batch and show the loss curve, a verdict and the findings.

        The model is restored afterwards (unless ``--keep``), also when the run is stopped
        or interrupted. The report is stored as ``_overfit``.
        Example: ``%overfit_batch model (x, y) nn.CrossEntropyLoss() --steps 300``
        """
        from nbtrouble.findings import NbTroubleError
        from nbtrouble.overfit import overfit_batch

        args = self.overfit_batch.parser.parse_args(split_expressions(line))
        kwargs = self._resolve(args)
        observer, handle = self._observer()
        try:
            report = overfit_batch(**kwargs, steps=args.steps, keep=args.keep, observer=observer)
        except NbTroubleError as e:
            raise UsageError(f"%overfit_batch: {e}") from None
        self.shell.user_ns[REPORT_NAME] = report
        if args.name is not None:
            self.shell.user_ns[args.name] = report
        if handle is None:
            print(repr(report))
        else:  # the live panel's output also carries the final report, for HTML exports
            from nbtrouble._display import panel_bundle

            handle.update(panel_bundle(observer.widget, report), raw=True)

    def _resolve(self, args: Any) -> dict[str, Any]:
        if args.steps < 1:
            raise UsageError(
                f"%overfit_batch: --steps must be a positive integer, not {args.steps}"
            )
        if args.lr is not None and (not math.isfinite(args.lr) or args.lr <= 0):
            raise UsageError(f"%overfit_batch: --lr must be a positive number, not {args.lr}")
        if args.name is not None and not args.name.isidentifier():
            raise UsageError(f"%overfit_batch: {args.name!r} is not a valid variable name")
        kwargs: dict[str, Any] = {
            "model": resolve(self.shell, args.model, "%overfit_batch model"),
            "batch": resolve(self.shell, args.batch, "%overfit_batch batch"),
        }
        if args.loss_fn is not None:
            kwargs["loss_fn"] = resolve(self.shell, args.loss_fn, "%overfit_batch loss_fn")
            if not callable(kwargs["loss_fn"]):
                raise UsageError(f"%overfit_batch: loss_fn {args.loss_fn!r} is not callable")
        if args.optimizer is not None:
            kwargs["optimizer"] = resolve(self.shell, args.optimizer, "%overfit_batch --optimizer")
        if args.lr is not None:
            kwargs["lr"] = args.lr
        return kwargs

    def _observer(self) -> tuple[Any, Any]:
        """A live panel in a notebook (shown now) and its display handle, else a tqdm bar."""
        from nbtrouble._display import in_widget_frontend
        from nbtrouble._overfit_view import OverfitPanel, TextProgress, route_clicks_concurrently

        if not in_widget_frontend():
            return TextProgress(), None
        from IPython.display import display

        panel = OverfitPanel()
        handle = display(panel.widget, display_id=True)
        route_clicks_concurrently(panel.stop_button)
        return panel, handle


_CLOSING = {"(": ")", "[": "]", "{": "}"}


def split_expressions(line: str) -> list[str]:
    """Split a magic line into words, keeping Python expressions such as ``(x, y)`` whole.

    Whitespace separates words only outside brackets and string literals, so that
    ``model (x, y) nn.CrossEntropyLoss(reduction='sum')`` gives three words.
    """
    words: list[str] = []
    current: list[str] = []
    expected: list[str] = []  # closing brackets still to come
    quote: str | None = None
    for char in line:
        if quote is not None:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _CLOSING:
            expected.append(_CLOSING[char])
        elif char in ")]}":
            if not expected or expected.pop() != char:
                raise UsageError(f"%overfit_batch: could not parse {line!r}: unbalanced {char!r}")
        elif char.isspace() and not expected:
            if current:
                words.append("".join(current))
                current = []
            continue
        current.append(char)
    if quote is not None or expected:
        what = f"no closing quotation {quote}" if quote else f"missing {expected[-1]!r}"
        raise UsageError(f"%overfit_batch: could not parse {line!r}: {what}")
    if current:
        words.append("".join(current))
    return words

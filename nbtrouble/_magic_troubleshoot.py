"""``%troubleshoot``: the decision-tree panel for objects in the kernel."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from nbtrouble._magics import parse, resolve
from nbtrouble.troubleshoot import STEP_KEYS, Session, troubleshoot

_DATA_OPTIONS = ("loss", "train", "val", "test", "test_val", "tune")


@magics_class
class TroubleshootMagics(Magics):
    """Holds the notebook's current troubleshooting session."""

    session: Session | None = None

    @magic_arguments()
    @argument("model", nargs="?", help="the nn.Module to troubleshoot (starts a new session)")
    @argument("batch", nargs="?", help="one batch: (inputs, targets) or a dict")
    @argument("--loss", default=None, help="loss function: loss(model(inputs), targets)")
    @argument("--train", default=None, help="training data loader")
    @argument("--val", default=None, help="validation data loader")
    @argument("--test", default=None, help="test data loader")
    @argument(
        "--test-val",
        dest="test_val",
        default=None,
        help="validation loader from the test distribution",
    )
    @argument("--irreducible", type=float, default=None, help="irreducible (human-level) error")
    @argument("--known", action="append", default=[], metavar="NAME=ERROR", help="a known result")
    @argument("--tune", default=None, help="tune(lr) -> validation error, for the tuning step")
    @argument(
        "--steps", type=int, default=None, help="steps of the single-batch overfitting run (200)"
    )
    @argument("--lr", type=float, default=None, help="learning rate of that run (3e-4)")
    @argument("--check", action="store_true", help="run the current step's check")
    @argument(
        "--next",
        dest="goto",
        nargs="?",
        const="",
        default=None,
        metavar="STEP",
        help=f"move to STEP (one of {', '.join(STEP_KEYS)}) or to the suggested step",
    )
    @argument("--export", default=None, metavar="PATH", help="write the log as Markdown to PATH")
    @line_magic
    def troubleshoot(self, line: str) -> Any:
        """Walk the lecture's decision tree: ``%troubleshoot model batch --loss loss_fn --val val``.

        Without a model, acts on the current session: ``--check``, ``--next [STEP]``,
        ``--export log.md``, and data options such as ``--train bigger_loader`` replace that
        object for the next checks. Returns the session, which displays as an interactive panel
        (``--check`` returns the check's outcome).
        """
        args = parse(self.troubleshoot, line)
        if args.model is not None:
            self.session = self._start(args)
        elif self.session is None:
            raise UsageError("%troubleshoot: start a session first: %troubleshoot model batch")
        else:
            self._update(args, self.session)
        return self._act(args, self.session)

    def _data(self, args: Any) -> dict[str, Any]:
        return {
            name: resolve(self.shell, getattr(args, name), f"--{name.replace('_', '-')}")
            for name in _DATA_OPTIONS
            if getattr(args, name) is not None
        }

    def _update(self, args: Any, session: Session) -> None:
        """Options without a model swap new objects into the current session (e.g. more data)."""
        data = self._data(args)
        if "loss" in data:
            data["loss_fn"] = data.pop("loss")
        data.update(_settings(args))
        if data:
            try:
                session.use(**data)
            except (TypeError, ValueError) as e:
                raise UsageError(f"%troubleshoot: {e}") from None

    def _start(self, args: Any) -> Session:
        if args.batch is None:
            raise UsageError(
                "%troubleshoot: give a batch after the model: %troubleshoot model batch"
            )
        data = self._data(args)
        try:
            return troubleshoot(
                resolve(self.shell, args.model, "model"),
                resolve(self.shell, args.batch, "batch"),
                loss_fn=data.pop("loss", None),
                known=self._known(args.known),
                **_settings(args),
                **data,
            )
        except (TypeError, ValueError) as e:
            raise UsageError(f"%troubleshoot: {e}") from None

    def _known(self, items: list[str]) -> dict[str, float]:
        known = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise UsageError(f"%troubleshoot: --known wants NAME=ERROR, not {item!r}")
            number = resolve(self.shell, value, f"--known {name}")
            if not isinstance(number, (int, float)) or isinstance(number, bool):
                raise UsageError(f"%troubleshoot: --known {name} must be a number, not {number!r}")
            known[name] = float(number)
        return known

    def _act(self, args: Any, session: Session) -> Any:
        """Move, check, export, in that order; return what the user asked to see."""
        outcome = None
        try:
            if args.goto is not None:
                session.advance(args.goto or None)
            if args.check:
                outcome = session.check()
            if args.export is not None:
                print(f"wrote {session.export(args.export)}")
        except ValueError as e:  # unknown step, data a check needs, a path it cannot write
            raise UsageError(f"%troubleshoot: {e}") from None
        if args.check:
            return outcome
        return None if args.export is not None else session


def _settings(args: Any) -> dict[str, Any]:
    """The numbers given on the line: a new session's settings, or changes to the current one."""
    names = ("irreducible", "steps", "lr")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}

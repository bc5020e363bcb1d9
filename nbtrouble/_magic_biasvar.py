"""``%biasvar``: the bias-variance decomposition of the test error, from numbers or live objects."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from nbtrouble._magics import parse, resolve

REPORT_NAME = "_biasvar"  # where the last report is kept, like IPython's `_`

# The function's parameter -> the option that sets it, for messages.
OPTIONS = {
    "train": "--train",
    "val": "--val",
    "test": "--test",
    "test_val": "--test-val",
    "irreducible": "--human",
    "metric": "--metric",
}
POSITIONAL = ("model", "train", "val", "test")


@magics_class
class BiasVarMagics(Magics):
    """Decompose the test error and show what to fix first."""

    @magic_arguments()
    @argument(
        "objects",
        nargs="*",
        help="model train_loader val_loader [test_loader]: names or expressions",
    )
    @argument("--train", default=None, help="training error (a number or a variable)")
    @argument("--val", default=None, help="validation error, training distribution")
    @argument("--test", default=None, help="test error")
    @argument(
        "--test-val",
        dest="test_val",
        default=None,
        help="error on a validation set from the test distribution (or its loader)",
    )
    @argument(
        "--human",
        "--irreducible",
        dest="human",
        default=None,
        help="human-level (irreducible) error",
    )
    @argument(
        "--metric",
        default=None,
        help="error (default), mse, mae, or a callable metric(outputs, targets)",
    )
    @argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar over the loaders",
    )
    @argument("--name", default=None, help="also store the report in this variable")
    @line_magic
    def biasvar(self, line: str) -> None:
        """Decompose the test error into the lecture's components and show what to fix first.

        test error = irreducible error + avoidable bias + variance + distribution shift
        + validation overfitting.

        Shows a waterfall chart that adds up to the test error with the component to fix
        first highlighted, a table of the numbers, and the lecture's next steps for it. The
        report is stored as ``_biasvar``.

        From errors already measured (numbers or variables)::

            %biasvar --train 0.20 --val 0.27 --test 0.28 --human 0.01

        From a model and data loaders (evaluated in eval mode under ``torch.no_grad()``;
        batches are ``(inputs, targets)`` or dicts with a ``labels`` key)::

            %biasvar model train_loader val_loader test_loader --test-val test_val_loader
        """
        from nbtrouble._biasvar_view import panel
        from nbtrouble._display import show
        from nbtrouble.biasvar import biasvar
        from nbtrouble.findings import NbTroubleError

        args = parse(self.biasvar, line)
        kwargs = self._arguments(args)
        try:
            report = biasvar(**kwargs)
        except NbTroubleError as e:
            raise UsageError(_message(e)) from None
        self.shell.user_ns[REPORT_NAME] = report
        if args.name is not None:
            self.shell.user_ns[args.name] = report
        show(report, panel)

    def _arguments(self, args: Any) -> dict[str, Any]:
        if args.name is not None and not args.name.isidentifier():
            raise UsageError(f"%biasvar: {args.name!r} is not a valid variable name")
        kwargs: dict[str, Any] = {"progress": args.progress}
        if args.objects:
            kwargs.update(self._objects(args))
        for name in ("train", "val", "test", "test_val"):
            if getattr(args, name) is not None:
                kwargs[name] = self._value(getattr(args, name), OPTIONS[name])
        if args.human is not None:
            kwargs["irreducible"] = self._value(args.human, "--human")
        if args.metric is not None:
            kwargs["metric"] = self._metric(args.metric)
        return kwargs

    def _objects(self, args: Any) -> dict[str, Any]:
        if not 3 <= len(args.objects) <= 4:
            raise UsageError(
                f"%biasvar: got {' '.join(args.objects)!r}; give the model, the train loader and "
                "the val loader (and optionally the test loader), or the errors as "
                "--train/--val/--test numbers"
            )
        named = dict(zip(POSITIONAL, args.objects, strict=False))
        for name, text in named.items():
            if name != "model" and getattr(args, name) is not None:
                raise UsageError(
                    f"%biasvar: {name} given twice, as {text!r} and as {OPTIONS[name]}"
                )
        return {name: resolve(self.shell, text, f"%biasvar {name}") for name, text in named.items()}

    def _value(self, text: str, option: str) -> Any:
        """A number written on the line, else a variable or expression from the namespace."""
        try:
            return float(text)
        except ValueError:
            return resolve(self.shell, text, f"%biasvar {option}")

    def _metric(self, text: str) -> Any:
        if text in ("error", "mse", "mae"):
            return text
        if text.isidentifier() and text not in self.shell.user_ns:
            # A metric's name (f1, rmse, accuracy) rather than a function in the notebook.
            from nbtrouble.biasvar import SCORE_WORDS

            score = (
                " (a score: pass 1 - score as the errors)" if text.lower() in SCORE_WORDS else ""
            )
            raise UsageError(
                f"%biasvar --metric: name {text!r} is not defined: it is not a metric{score}; use "
                "error, mse, mae, or the name of a function metric(outputs, targets) defined in "
                "the notebook"
            )
        metric = resolve(self.shell, text, "%biasvar --metric")
        if not callable(metric):
            raise UsageError(
                f"%biasvar --metric: {text!r} is neither error, mse, mae nor a callable"
            )
        return metric


def _message(error: Exception) -> str:
    """The error in the magic's terms: ``irreducible`` is ``--human`` on the line."""
    argument = getattr(error, "argument", None)
    if argument is None:
        return f"%biasvar: {error}"
    return f"%biasvar {OPTIONS.get(argument, argument)}: {error.detail}"  # type: ignore[attr-defined]

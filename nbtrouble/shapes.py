"""``nbt.shapecheck``: trace every tensor op of a block with its module path and line.

A ``TorchFunctionMode`` sees each op the user's code (or a layer's ``forward``) calls; global
module forward hooks say which module is running. Each op is recorded cheaply (the function
object and top-level shapes); names and source lines are resolved once per distinct record, so
a training loop in the block folds into counts instead of growing the trace.

This module holds the context manager and the ``Trace`` it returns; the mode and hooks live in
``_recorder``, the records in ``_records``, op names in ``_op_names`` and the reading of
shapes, dtypes and devices in ``_tensor_info``.

Examples
--------
>>> import torch, nbtrouble as nbt
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
>>> x = torch.randn(2, 4)
>>> with nbt.shapecheck() as trace:
...     y = model(x)
>>> trace.ops[0].name, trace.ops[0].module, trace.ops[0].input_shapes
('torch.nn.functional.linear', '0', ((2, 4), (3, 4), (3,)))
"""

from __future__ import annotations

import collections
import contextlib
import re
import sys
import warnings
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)

from nbtrouble._events import Analyzer
from nbtrouble._recorder import Recorder, Running
from nbtrouble._records import Failure, ModuleRecord, OpRecord, module_failure
from nbtrouble._tensor_info import Shape, tensor_shape
from nbtrouble.findings import Finding

__all__ = [
    "DEFAULT_MAX_OPS",
    "Failure",
    "ModuleRecord",
    "OpRecord",
    "Shape",
    "Trace",
    "default_analyzers",
    "shapecheck",
    "tensor_shape",
]

DEFAULT_MAX_OPS = 5000
# Candidate failures kept while the block runs: the user's code may catch an op's error and go
# on, so the one that ends the block is matched by identity at the end.
_MAX_CANDIDATES = 4


@dataclass(repr=False)
class Trace:
    """Everything ``shapecheck`` saw in its block."""

    ops: list[OpRecord] = field(default_factory=list)
    modules: list[ModuleRecord] = field(default_factory=list)
    failure: Failure | None = None
    findings: list[Finding] = field(default_factory=list)
    meta: bool = False
    folded: int = 0
    dropped: int = 0
    _candidates: collections.deque[Failure] = field(
        default_factory=lambda: collections.deque(maxlen=_MAX_CANDIDATES),
        init=False,
        compare=False,
    )
    # An error raised by a module's own code, with the innermost module it left: the failure
    # is built when the exception is captured, once its traceback reaches the user's line.
    _module_errors: collections.deque[tuple[BaseException, Running]] = field(
        default_factory=lambda: collections.deque(maxlen=_MAX_CANDIDATES),
        init=False,
        compare=False,
    )

    def capture_exception(self, exc: BaseException) -> None:
        """Fill ``failure`` from an exception the traced code raised, unless already set.

        The exception itself is left as it was, apart from a note naming the mismatch.
        """
        if self.failure is not None or not isinstance(exc, Exception):
            return
        for link in _exception_chain(exc):
            failure = self._match(link)
            if failure is not None:
                self.failure = failure
                break
        self._candidates.clear()
        self._module_errors.clear()
        finding = self.failure.finding if self.failure is not None else None
        # An error shapecheck cannot explain (the user's own raise) is left without a note.
        if finding is not None and finding.kind != "op_error":
            _add_note_once(exc, finding)

    def debug(self) -> None:
        """Open the debugger on the user's line that led to ``failure``, with its variables.

        The same debugger as ``%%shapecheck --debug``, for scripts and plain Python: it stops
        in the innermost frame of the user's own code (the model's ``forward`` line that called
        the failing layer), where ``up`` / ``down`` / ``p x.shape`` work as usual.

        Raises
        ------
        ValueError
            When the trace recorded no failure, or its error carries no traceback.

        Examples
        --------
        >>> try:  # doctest: +SKIP
        ...     with nbt.shapecheck() as trace:
        ...         model(x)
        ... except RuntimeError:
        ...     trace.debug()
        """
        from nbtrouble import _debugger

        _debugger.post_mortem(self)

    def _forget_all_but_last_error(self) -> None:
        """Keep only the last error seen in a block that ended normally.

        ``%%shapecheck`` hands over the one error its cell raised; an error's traceback holds
        its frames' tensors, so older ones are let go.
        """
        for kept in (self._candidates, self._module_errors):
            while len(kept) > 1:
                kept.popleft()

    def _match(self, exc: BaseException) -> Failure | None:
        for candidate in self._candidates:
            if candidate.error is exc:
                return candidate
        for raised, running in self._module_errors:
            if raised is exc:
                try:
                    return module_failure(running, exc, self.meta)
                except Exception as own:  # noqa: BLE001 - the user's error must propagate as it was
                    warnings.warn(
                        f"nbtrouble: could not describe why {running.path or 'the model'} "
                        f"failed: {own!r}",
                        RuntimeWarning,
                        stacklevel=4,
                    )
        return None

    def __repr__(self) -> str:
        from nbtrouble._shapes_view import trace_text

        return trace_text(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text("Trace(...)" if cycle else repr(self))


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """The exception, then what it was raised from, outermost first, without cycles."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain and len(chain) < 8:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


def _add_note_once(exc: BaseException, finding: Finding) -> None:
    note = f"shapecheck: {finding.message}"
    if finding.hint:
        note += f"\n  hint: {finding.hint}"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


def default_analyzers() -> list[Analyzer]:
    """The analyzers every trace runs: silent broadcasts and non-finite values."""
    from nbtrouble._broadcast import BroadcastAnalyzer
    from nbtrouble._nonfinite import NonfiniteAnalyzer

    return [BroadcastAnalyzer(), NonfiniteAnalyzer()]


# --- the context manager --------------------------------------------------------------------


class shapecheck:
    """Trace the tensor ops of a block: shapes, module paths, lines, and what failed.

    Parameters
    ----------
    meta : bool
        Run the block on shape-only (meta) tensors: a model built in the block allocates no
        weights, an existing model's weights are read for their shapes only and never changed.
    max_ops : int
        Distinct op records kept; later new ones are only counted in ``trace.dropped``.

    A ``torch.compile``'d model is checked through its original module: compilation is
    switched off for the block (``torch.compiler.set_stance("force_eager")``), so the model's
    own ``forward`` (``model._orig_mod``) runs eagerly under the trace.

    Examples
    --------
    >>> with nbt.shapecheck() as trace:  # doctest: +SKIP
    ...     y = model(x)
    >>> trace.failure.finding.message  # doctest: +SKIP
    """

    def __init__(self, meta: bool = False, max_ops: int = DEFAULT_MAX_OPS) -> None:
        if not isinstance(meta, bool):
            raise TypeError(f"meta must be True or False, not {meta!r}")
        if isinstance(max_ops, bool) or not isinstance(max_ops, int) or max_ops < 1:
            raise ValueError(f"max_ops must be a positive integer, not {max_ops!r}")
        self.meta = meta
        self.max_ops = max_ops
        self.trace = Trace(meta=meta)
        self._exit_stack: contextlib.ExitStack | None = None
        self._recorder: Recorder | None = None
        self._analyzers: list[Analyzer] = []

    def __enter__(self) -> Trace:
        if self._exit_stack is not None:
            raise RuntimeError("this shapecheck is already active; create a new one per block")
        self._analyzers = default_analyzers()
        stack = contextlib.ExitStack()
        try:
            self._install(stack)
        except BaseException:
            stack.close()
            raise
        self._exit_stack = stack
        return self.trace

    def _install(self, stack: contextlib.ExitStack) -> None:
        stack.callback(torch._C._set_grad_enabled, torch.is_grad_enabled())
        # Importing the compiler costs seconds: run compiled code eagerly only once it is loaded
        # (a compiled model or function exists), or when a compiled model first runs.
        _quiet_compiled_module_warning(stack)
        compiling = "torch._dynamo" in sys.modules
        if compiling:
            stack.enter_context(_eager_compiled_models())
        converter = None
        if self.meta:
            from nbtrouble._meta import MetaConverter

            converter = stack.enter_context(MetaConverter())
        recorder = Recorder(self.trace, self._analyzers, self.max_ops, converter)
        stack.callback(register_module_forward_pre_hook(recorder.pre_hook).remove)
        stack.callback(register_module_forward_hook(recorder.post_hook, always_call=True).remove)
        if not compiling:
            recorder.on_compiled_model = lambda: stack.enter_context(_eager_compiled_models())
        stack.enter_context(recorder)
        self._recorder = recorder

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        stack, self._exit_stack = self._exit_stack, None
        if stack is not None:
            stack.close()
        if self._recorder is not None:
            self._recorder.running.clear()
            self._recorder = None
        if exc is not None:
            self.trace.capture_exception(exc)
        else:
            self.trace._forget_all_but_last_error()
        self.trace.findings = _collect_findings(self._analyzers)
        self._analyzers = []
        return False


def _collect_findings(analyzers: list[Analyzer]) -> list[Finding]:
    found: list[Finding] = []
    for analyzer in analyzers:
        try:
            found.extend(analyzer.findings())
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            warnings.warn(
                f"nbtrouble: {type(analyzer).__name__} failed to report: {e!r}",
                RuntimeWarning,
                stacklevel=3,
            )
    return found


@contextlib.contextmanager
def _eager_compiled_models() -> Any:
    """Run ``torch.compile``'d code eagerly, so its original Python forward is traced."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


# What ``warnings.filterwarnings("ignore", message=...)`` adds, built once: it is added on
# every entry to a trace.
_COMPILED_WRAPPER_FILTER = (
    "ignore",
    re.compile(r"Using `torch.compile\(module\)` when there", re.IGNORECASE),
    Warning,
    None,
    0,
)


def _quiet_compiled_module_warning(stack: contextlib.ExitStack) -> None:
    """Silence torch's warning that global hooks also fire for a compiled model's wrapper.

    The trace treats the wrapper and its original module as one. Only this one filter entry is
    added and removed again, so filters the user's own code sets in the block stay.
    """
    warnings.filters.insert(0, _COMPILED_WRAPPER_FILTER)
    warnings._filters_mutated()  # type: ignore[attr-defined]
    stack.callback(_remove_filter, _COMPILED_WRAPPER_FILTER)


def _remove_filter(entry: tuple[Any, ...]) -> None:
    with contextlib.suppress(ValueError):  # the user's code may have reset the filters
        warnings.filters.remove(entry)
        warnings._filters_mutated()  # type: ignore[attr-defined]

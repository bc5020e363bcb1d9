"""The tracer's hot path: a ``TorchFunctionMode`` that records each op, and module hooks.

The mode sees each op the user's code (or a layer's ``forward``) calls; global module forward
hooks say which module is running. Each op is recorded cheaply (the function object and
top-level shapes) and folded into an existing record when one matches; names and source lines
are resolved once per distinct record. Every op passes through ``Recorder.__torch_function__``:
keep its path free of extra calls and lookups.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode

from nbtrouble import _failures, _location
from nbtrouble._events import Analyzer, OpEvent
from nbtrouble._op_names import FuncInfo, func_info
from nbtrouble._records import ModuleRecord, OpRecord, failure_record
from nbtrouble._tensor_info import (
    device_names_of,
    dtype_names_of,
    output_tensors,
    shapes_of,
    sizes_of,
    tensor_operands,
)

if TYPE_CHECKING:
    from nbtrouble.shapes import Trace


def _wants(analyzer: Analyzer, name: str) -> bool:
    """Whether ``analyzer`` looks at every op called ``name``.

    An analyzer may declare ``wants(name) -> bool`` (a class method: the answer is cached per
    function) together with a ``following`` attribute, true while it needs every op to follow
    values it saw earlier. One without ``wants`` sees every op.
    """
    wants = getattr(type(analyzer), "wants", None)
    return True if wants is None else bool(wants(name))


def _event(
    info: FuncInfo,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    result: Any,
    module: str | None,
    code: Any,
    lineno: int,
    record: OpRecord | None,
) -> OpEvent:
    if code is None:
        location, user_code, line = None, False, ""
    else:
        location = _location.location_text(code, lineno)
        user_code = _location.is_user_code(code)
        line = record.source_line if record is not None else _location.code_line(code, lineno)
    return OpEvent(func, info.name, args, kwargs, result, location, module, user_code, line)


_untraced = torch._C.DisableTorchFunction


@dataclass(slots=True)
class Running:
    """A module whose forward is running: what an error raised in it needs.

    ``call_frame`` is the frame of torch's module call that ran the hooks; ``caller`` is, once
    an op asked, the user frame above that call and whether housekeeping made it. Every op in
    the module's forward has the same frames above the call, so they are walked only once.
    """

    module: torch.nn.Module
    path: str
    args: tuple[Any, ...]
    call_frame: FrameType | None = None
    caller: tuple[FrameType | None, bool] | None = None


class Recorder(TorchFunctionMode):
    """Records each top-level op; inside its handler torch calls are not traced again."""

    def __init__(self, trace: Trace, analyzers: list[Analyzer], max_ops: int, converter: Any):
        super().__init__()
        self.trace = trace
        self.analyzers = analyzers
        self.max_ops = max_ops
        self.converter = converter  # meta mode's tensor converter, or None
        # Called once when a torch.compile'd model first runs in the block.
        self.on_compiled_model: Callable[[], None] | None = None
        self.running: list[Running] = []
        self.paths: dict[int, str] = {}
        self._known_modules: list[torch.nn.Module] = []  # keeps ids in `paths` valid
        self._op_index: dict[tuple[Any, ...], OpRecord] = {}
        self._module_index: dict[tuple[Any, ...], ModuleRecord] = {}

    # Ops ---------------------------------------------------------------------------------

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        info = func_info(func)
        if not info.is_op:
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                # Not an op, but it failed in the user's code (``.item()`` on a meta tensor).
                frame, housekeeping = self._caller(sys._getframe(0), len(self.running) - 1)
                if not housekeeping:
                    self._note_failure(info, func, args, kwargs, exc, frame)
                raise
        frame, housekeeping = self._caller(sys._getframe(1), len(self.running) - 1)
        if housekeeping:
            return func(*args, **kwargs)
        if self.converter is not None:
            args, kwargs = self.converter.convert(args, kwargs)
        try:
            result = func(*args, **kwargs)
        except Exception as exc:
            self._note_failure(info, func, args, kwargs, exc, frame)
            raise
        self._record(info, func, args, kwargs, result, frame)
        return result

    def _caller(self, frame: FrameType | None, depth: int) -> tuple[FrameType | None, bool]:
        """The innermost user frame above ``frame``, and whether module housekeeping made the op.

        The walk stops early at the call of the running module ``self.running[depth]``: above
        it, the answer is that call's own, found once per call (frames cost to walk).
        """
        stop = self.running[depth].call_frame if depth >= 0 else None
        known = _location.known_code_kinds  # read directly: this loop runs for every op
        user, housekeeping = _location.USER, _location.HOUSEKEEPING
        while frame is not None:
            if frame is stop:
                entry = self.running[depth]
                if entry.caller is None:
                    entry.caller = self._caller(frame.f_back, depth - 1)
                return entry.caller
            code = frame.f_code
            kind = known.get(id(code))
            if kind is None:
                kind = _location.code_kind(code)
            if kind == user:
                return frame, False
            if kind == housekeeping:
                return None, True
            frame = frame.f_back
        return None, False

    def _record(
        self,
        info: FuncInfo,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: Any,
        frame: FrameType | None,
    ) -> None:
        inputs = tensor_operands(args, kwargs)
        # torch.Size hashes and compares like a tuple: plain tuples are made for new records only.
        sizes = sizes_of(inputs)
        running = self.running
        module = running[-1].path if running else None
        code, lineno = (frame.f_code, frame.f_lineno) if frame is not None else (None, 0)
        # id(code): hashing a code object is slow; the frame's code is kept by _location.
        key = (func, module, id(code), lineno, sizes)
        record = self._op_index.get(key)
        trace = self.trace
        if record is not None:
            record.count += 1
            trace.folded += 1
        elif len(trace.ops) >= self.max_ops:
            trace.dropped += 1
        else:
            record = self._new_record(info, module, inputs, sizes, result, args, (code, lineno))
            self._op_index[key] = record
            trace.ops.append(record)
        if self.analyzers:
            listeners = self._listeners(info)
            if listeners:
                event = _event(info, func, args, kwargs, result, module, code, lineno, record)
                self._tell(listeners, event)

    def _new_record(
        self,
        info: FuncInfo,
        module: str | None,
        inputs: list[torch.Tensor],
        sizes: tuple[Any, ...],
        result: Any,
        args: tuple[Any, ...],
        line_of_code: tuple[Any, int],
    ) -> OpRecord:
        location, line = _where(*line_of_code)
        return OpRecord(
            name=info.name,
            module=module,
            input_shapes=tuple([tuple(size) for size in sizes]),
            output_shapes=shapes_of(output_tensors(result, args)),
            dtypes=dtype_names_of(inputs),
            devices=device_names_of(inputs),
            location=location,
            source_line=line,
        )

    def _listeners(self, info: FuncInfo) -> list[Analyzer]:
        """The analyzers that look at this op now: most ops matter to none of them."""
        wanted_by = info.wanted_by
        listeners = []
        for analyzer in self.analyzers:
            wanted = wanted_by.get(type(analyzer))
            if wanted is None:
                wanted = wanted_by[type(analyzer)] = _wants(analyzer, info.name)
            if wanted or analyzer.following:  # type: ignore[attr-defined]
                listeners.append(analyzer)
        return listeners

    def _tell(self, listeners: list[Analyzer], event: OpEvent) -> None:
        for analyzer in listeners:
            try:
                analyzer.on_op(event)
            except Exception as e:  # noqa: BLE001 - a broken check must not break the user's code
                self._drop_analyzer(analyzer, e)

    def _drop_analyzer(self, analyzer: Analyzer, error: Exception) -> None:
        self.analyzers = [a for a in self.analyzers if a is not analyzer]
        warnings.warn(
            f"nbtrouble: {type(analyzer).__name__} stopped after an internal error: {error!r}",
            RuntimeWarning,
            stacklevel=2,
        )

    def _note_failure(self, info: FuncInfo, *failed: Any) -> None:
        """``_failed(info, func, args, kwargs, exc, frame)``, never raising.

        The user's own error must propagate as it was, whatever describing it runs into.
        """
        try:
            self._failed(info, *failed)
        except Exception as own:  # noqa: BLE001 - e.g. an operand whose shape cannot be read
            warnings.warn(
                f"nbtrouble: could not describe why {info.name} failed: {own!r}",
                RuntimeWarning,
                stacklevel=3,
            )

    def _failed(
        self,
        info: FuncInfo,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        exc: Exception,
        frame: FrameType | None,
    ) -> None:
        if any(candidate.error is exc for candidate in self.trace._candidates):
            return
        running = self.running[-1] if self.running else None
        inputs = tensor_operands(args, kwargs)
        try:
            site = _failures.failure_site(frame, exc)
            location, line = site.location, site.line
            operands = _failures.named_operands(func, args, kwargs)
            finding = _failures.classify_op(
                info.short,
                operands,
                args,
                kwargs,
                running.module if running else None,
                running.path if running else None,
                location,
                exc,
                meta=self.trace.meta,
                module_args=running.args if running else (),
                site=site,
            )
        except Exception:  # noqa: BLE001 - the user's own error must propagate as it was
            code, lineno = (frame.f_code, frame.f_lineno) if frame is not None else (None, 0)
            location, line = _where(code, lineno)
            operands = {f"arg{i}": t for i, t in enumerate(inputs)}
            finding = _failures.unexplained(info.name, inputs, location, exc)
        module = running.path if running else None
        self.trace._candidates.append(
            failure_record(info.name, module, inputs, (location, line), exc, finding, operands)
        )

    # Modules -----------------------------------------------------------------------------

    def pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self.on_compiled_model is not None and _is_compile_wrapper(type(module)):
            self.on_compiled_model()
            self.on_compiled_model = None
        path = self.paths.get(id(module))
        if path is None:
            path = self._discover(module)
        self.running.append(Running(module, path, args, sys._getframe(1)))

    def post_hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # Hooks run outside the mode's handler: without this, reading a shape here is traced.
        with _untraced():
            if output is None:
                raised = sys.exc_info()[1]
                if raised is not None:
                    self._module_raised(module, raised)
            entry = self._leave(module)
            if entry is not None:
                self._record_module(entry, args, output)

    def _leave(self, module: torch.nn.Module) -> Running | None:
        """Pop ``module`` off the running stack, with what an error left above it."""
        running = self.running
        if running and running[-1].module is module:
            return running.pop()
        for depth in range(len(running) - 1, -1, -1):
            if running[depth].module is module:
                entry = running[depth]
                del running[depth:]
                return entry
        return None

    def _record_module(self, running: Running, args: tuple[Any, ...], output: Any) -> None:
        module = running.module
        cls = type(module)
        if _is_compile_wrapper(cls):
            return
        sizes = sizes_of([a for a in args if isinstance(a, torch.Tensor)])
        key = (running.path, cls, sizes)
        record = self._module_index.get(key)
        if record is not None:
            record.count += 1
        elif len(self._module_index) < self.max_ops:
            record = ModuleRecord(
                path=running.path,
                type_name=cls.__name__,
                input_shapes=tuple([tuple(size) for size in sizes]),
                output_shapes=shapes_of(output_tensors(output, ())),
            )
            self._module_index[key] = record
            self.trace.modules.append(record)

    def _module_raised(self, module: torch.nn.Module, exc: BaseException) -> None:
        """An error left ``module``'s forward; keep what it needs, innermost module first."""
        if not isinstance(exc, Exception):
            return
        if any(raised is exc for raised, _ in self.trace._module_errors):
            return
        if any(candidate.error is exc for candidate in self.trace._candidates):
            return
        running = next(r for r in reversed(self.running) if r.module is module)
        args = running.args
        if self.converter is not None:
            args = self.converter.convert(args, {})[0]
        # Without its frames: the trace outlives the call.
        self.trace._module_errors.append((exc, Running(running.module, running.path, args)))

    def _discover(self, module: torch.nn.Module) -> str:
        """The dotted path of a module seen for the first time."""
        if not self.running:
            self._map_root(module)
            return ""
        parent = self.running[-1]
        self._map_children(parent.module, parent.path)
        path = self.paths.get(id(module))
        if path is None:
            prefix = f"{parent.path}." if parent.path else ""
            path = f"{prefix}<{type(module).__name__}>"
            self.paths[id(module)] = path
            self._known_modules.append(module)
        return path

    def _map_root(self, root: torch.nn.Module) -> None:
        self.paths[id(root)] = ""
        self._known_modules.append(root)
        # A torch.compile'd model: its original module is the same model. A part called on its
        # own earlier (``model.encoder(x)``) takes its path inside this bigger model.
        self._map_children(getattr(root, "_orig_mod", root), "", replace=True)

    def _map_children(self, module: torch.nn.Module, prefix: str, replace: bool = False) -> None:
        """Give ``module`` and all below it their dotted paths (a shared module its first one).

        ``named_modules`` in a plain loop: this runs for every root module of every trace.
        """
        paths, known, seen = self.paths, self._known_modules, set()
        pending = [(prefix, module)]
        while pending:
            path, sub = pending.pop()
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            if replace or id(sub) not in paths:
                paths[id(sub)] = path
                known.append(sub)
            dot = f"{path}." if path else ""
            children = [
                (dot + name, child) for name, child in sub._modules.items() if child is not None
            ]
            pending.extend(reversed(children))


_compile_wrapper_types: dict[type, bool] = {}


def _is_compile_wrapper(cls: type) -> bool:
    """Whether ``cls`` is ``torch.compile``'s module wrapper (checked without importing it)."""
    known = _compile_wrapper_types.get(cls)
    if known is None:
        known = cls.__name__ == "OptimizedModule" and cls.__module__.startswith("torch._dynamo")
        _compile_wrapper_types[cls] = known
    return known


_wheres: dict[tuple[Any, int], tuple[str | None, str]] = {}


def _where(code: Any, lineno: int) -> tuple[str | None, str]:
    """``("file:line", source text)`` of a line (cached: every new record asks)."""
    key = (id(code), lineno)  # the code is kept alive by _location's caches
    where = _wheres.get(key)
    if where is None:
        if code is None:
            where = (None, "")
        else:
            where = (_location.location_text(code, lineno), _location.code_line(code, lineno))
        _wheres[key] = where
    return where

"""``nbt.shapecheck``: trace every tensor op of a block with its module path and line.

A ``TorchFunctionMode`` sees each op the user's code (or a layer's ``forward``) calls; global
module forward hooks say which module is running. Each op is recorded cheaply (the function
object and top-level shapes); names and source lines are resolved once per distinct record, so
a training loop in the block folds into counts instead of growing the trace.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

import torch
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.overrides import TorchFunctionMode

from nbtrouble import _failures, _location
from nbtrouble._events import Analyzer, OpEvent
from nbtrouble.findings import Finding

DEFAULT_MAX_OPS = 5000
# Candidate failures kept while the block runs: the user's code may catch an op's error and go
# on, so the one that ends the block is matched by identity at the end.
_MAX_CANDIDATES = 4

Shape = tuple[int, ...]


@dataclass
class OpRecord:
    """One distinct tensor op of the trace; ``count`` says how often it ran."""

    name: str
    module: str | None
    input_shapes: tuple[Shape, ...]
    output_shapes: tuple[Shape, ...]
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]
    location: str | None
    source_line: str = ""
    count: int = 1


@dataclass
class ModuleRecord:
    """One distinct module call: its dotted path, class name and top-level shapes."""

    path: str
    type_name: str
    input_shapes: tuple[Shape, ...]
    output_shapes: tuple[Shape, ...]
    count: int = 1


@dataclass
class Failure(OpRecord):
    """What failed first: the op (or module call) record, the exception and its finding."""

    error: BaseException | None = None
    finding: Finding | None = None
    operands: dict[str, Any] = field(default_factory=dict)


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
    _module_errors: collections.deque[tuple[BaseException, _Running]] = field(
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
                    return _module_failure(running, exc, self.meta)
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


# --- naming ops -----------------------------------------------------------------------------

# Calls that read a tensor's metadata or convert it to Python: not ops a user thinks of.
_NON_OPS = frozenset(
    [
        "dim",
        "ndimension",
        "size",
        "numel",
        "nelement",
        "is_contiguous",
        "stride",
        "storage_offset",
        "element_size",
        "is_floating_point",
        "is_complex",
        "is_signed",
        "is_inference",
        "data_ptr",
        "item",
        "tolist",
        "numpy",
        "__len__",
        "__repr__",
        "__str__",
        "__format__",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "__hash__",
        "__iter__",
        "__reduce_ex__",
        "__deepcopy__",
        "__setstate__",
        "__getstate__",
        "__array__",
        "__dir__",
        "__contains__",
        "get_device",
        "has_names",
        "_is_view",
        "register_hook",
        "retain_grad",
        "requires_grad_",
        "_set_grad_enabled",
        "set_grad_enabled",
        "is_grad_enabled",
        "_has_compatible_shallow_copy_type",
        "is_nonzero",
        "untyped_storage",
        "storage",
        "_typed_storage",
        "is_pinned",
        "is_shared",
        "share_memory_",
        "__get__",
        "__set__",
        "__delete__",
        "_make_subclass",
        "_is_any_true",
        "_is_all_true",
    ]
)
# Properties that change a shape, so reading them is an op.
_SHAPE_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


class _FuncInfo:
    """What the tracer needs to know about a torch function, worked out once per function."""

    __slots__ = ("is_op", "name", "short", "wanted_by")

    def __init__(self, name: str, short: str, is_op: bool) -> None:
        self.name = name  # "torch.nn.functional.linear"
        self.short = short  # "linear"
        self.is_op = is_op
        # Analyzer class -> whether it looks at this op even when it follows no value.
        self.wanted_by: dict[type, bool] = {}


_func_info_cache: dict[Any, _FuncInfo] = {}


def _func_info(func: Callable[..., Any]) -> _FuncInfo:
    try:
        info = _func_info_cache.get(func)
    except TypeError:  # an unhashable callable: describe it every time
        return _describe(func)
    if info is None:
        info = _describe(func)
        _func_info_cache[func] = info
    return info


def _describe(func: Callable[..., Any]) -> _FuncInfo:
    short = getattr(func, "__name__", None) or type(func).__name__
    if short in ("__get__", "__set__", "__delete__"):
        attr = getattr(getattr(func, "__self__", None), "__name__", "?")
        is_op = short == "__get__" and attr in _SHAPE_PROPERTIES
        return _FuncInfo(f"torch.Tensor.{attr}.{short}", attr, is_op)
    qualname = getattr(func, "__qualname__", short)
    if qualname.split(".", 1)[0] in ("TensorBase", "Tensor"):
        name = "torch.Tensor." + qualname.split(".", 1)[1]
    elif getattr(torch.nn.functional, short, None) is func:
        name = "torch.nn.functional." + short
    elif getattr(torch, short, None) is func:
        name = "torch." + short
    elif getattr(torch.Tensor, short, None) is func:
        name = "torch.Tensor." + short
    else:
        name = f"{getattr(func, '__module__', None) or 'torch'}.{qualname}"
    return _FuncInfo(name, short, short not in _NON_OPS)


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> list[torch.Tensor]:
    """Tensor operands in argument order; a list or tuple of tensors is flattened."""
    found = []
    for value in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _outputs(result: Any, args: tuple[Any, ...]) -> list[torch.Tensor]:
    """Tensors an op produced; an in-place op returning ``None`` produced its first argument."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (list, tuple)):
        return [v for v in result if isinstance(v, torch.Tensor)]
    if result is None and args and isinstance(args[0], torch.Tensor):
        return [args[0]]
    return []


def _shapes(tensors: list[torch.Tensor]) -> tuple[Shape, ...]:
    return tuple([tensor_shape(t) if t.is_nested else tuple(t.shape) for t in tensors])


def _sizes(tensors: list[torch.Tensor]) -> tuple[Any, ...]:
    """Hashable shapes of ``tensors`` for a record's key (``torch.Size`` hashes like a tuple)."""
    return tuple([tensor_shape(t) if t.is_nested else t.shape for t in tensors])


def tensor_shape(t: torch.Tensor) -> Shape:
    """A tensor's shape; ``-1`` for an axis without one size (the ragged axis of a nested tensor)."""
    if not t.is_nested:
        return tuple(t.shape)
    sizes = []
    for axis in range(t.dim()):
        try:
            sizes.append(int(t.size(axis)))
        except (RuntimeError, AttributeError, TypeError):  # "dimension is irregular"
            sizes.append(-1)
    return tuple(sizes)


def _wants(analyzer: Analyzer, name: str) -> bool:
    """Whether ``analyzer`` looks at every op called ``name``.

    An analyzer may declare ``wants(name) -> bool`` (a class method: the answer is cached per
    function) together with a ``following`` attribute, true while it needs every op to follow
    values it saw earlier. One without ``wants`` sees every op.
    """
    wants = getattr(type(analyzer), "wants", None)
    return True if wants is None else bool(wants(name))


def _event(
    info: _FuncInfo,
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


# --- the mode and the hooks -----------------------------------------------------------------


_untraced = torch._C.DisableTorchFunction


@dataclass(slots=True)
class _Running:
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


class _Recorder(TorchFunctionMode):
    """Records each top-level op; inside its handler torch calls are not traced again."""

    def __init__(self, trace: Trace, analyzers: list[Analyzer], max_ops: int, converter: Any):
        super().__init__()
        self.trace = trace
        self.analyzers = analyzers
        self.max_ops = max_ops
        self.converter = converter  # meta mode's tensor converter, or None
        # Called once when a torch.compile'd model first runs in the block.
        self.on_compiled_model: Callable[[], None] | None = None
        self.running: list[_Running] = []
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
        info = _func_info(func)
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
        info: _FuncInfo,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: Any,
        frame: FrameType | None,
    ) -> None:
        inputs = _tensors(args, kwargs)
        # torch.Size hashes and compares like a tuple: plain tuples are made for new records only.
        sizes = _sizes(inputs)
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
        info: _FuncInfo,
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
            output_shapes=_shapes(_outputs(result, args)),
            dtypes=_dtype_names_of(inputs),
            devices=_device_names_of(inputs),
            location=location,
            source_line=line,
        )

    def _listeners(self, info: _FuncInfo) -> list[Analyzer]:
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

    def _note_failure(self, info: _FuncInfo, *failed: Any) -> None:
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
        info: _FuncInfo,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        exc: Exception,
        frame: FrameType | None,
    ) -> None:
        if any(candidate.error is exc for candidate in self.trace._candidates):
            return
        running = self.running[-1] if self.running else None
        inputs = _tensors(args, kwargs)
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
            _failure(info.name, module, inputs, (location, line), exc, finding, operands)
        )

    # Modules -----------------------------------------------------------------------------

    def pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self.on_compiled_model is not None and _is_compile_wrapper(type(module)):
            self.on_compiled_model()
            self.on_compiled_model = None
        path = self.paths.get(id(module))
        if path is None:
            path = self._discover(module)
        self.running.append(_Running(module, path, args, sys._getframe(1)))

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

    def _leave(self, module: torch.nn.Module) -> _Running | None:
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

    def _record_module(self, running: _Running, args: tuple[Any, ...], output: Any) -> None:
        module = running.module
        cls = type(module)
        if _is_compile_wrapper(cls):
            return
        sizes = _sizes([a for a in args if isinstance(a, torch.Tensor)])
        key = (running.path, cls, sizes)
        record = self._module_index.get(key)
        if record is not None:
            record.count += 1
        elif len(self._module_index) < self.max_ops:
            record = ModuleRecord(
                path=running.path,
                type_name=cls.__name__,
                input_shapes=tuple([tuple(size) for size in sizes]),
                output_shapes=_shapes(_outputs(output, ())),
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
        self.trace._module_errors.append((exc, _Running(running.module, running.path, args)))

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


def _module_failure(running: _Running, exc: Exception, meta: bool) -> Failure:
    """A failure raised by a module's own Python code rather than by a tensor op."""
    module = running.module
    site = _failures.module_failure_site(exc)
    location, line = site.location, site.line
    inputs = _tensors(running.args, None)
    operands = _failures.module_operands(module, running.args, exc, meta=meta)
    finding = _failures.classify_module(
        module, running.path, operands, location, exc, meta=meta, site=site
    )
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    return _failure(name, running.path, inputs, (location, line), exc, finding, operands)


def _failure(
    name: str,
    module: str | None,
    inputs: list[torch.Tensor],
    where: tuple[str | None, str],
    exc: Exception,
    finding: Finding,
    operands: dict[str, Any],
) -> Failure:
    """A failure record; ``where`` is the user's ``("file:line", source text)``."""
    return Failure(
        name=name,
        module=module,
        input_shapes=_shapes(inputs),
        output_shapes=(),
        dtypes=_dtype_names_of(inputs),
        devices=_device_names_of(inputs),
        location=where[0],
        source_line=where[1],
        error=exc,
        finding=finding,
        operands=operands,
    )


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


_device_names: dict[torch.device, str] = {}


def _device_name(device: torch.device) -> str:
    name = _device_names.get(device)
    if name is None:
        name = _device_names[device] = str(device)
    return name


_dtype_names: dict[torch.dtype, str] = {}


def _dtype_names_of(tensors: list[torch.Tensor]) -> tuple[str, ...]:
    names = _dtype_names
    return tuple([names.get(t.dtype) or _dtype_name(t.dtype) for t in tensors])


def _device_names_of(tensors: list[torch.Tensor]) -> tuple[str, ...]:
    # `is_cpu` first: reading `t.device` builds a new device object.
    return tuple(["cpu" if t.is_cpu else _device_name(t.device) for t in tensors])


def _dtype_name(dtype: torch.dtype) -> str:
    name = _dtype_names.get(dtype)
    if name is None:
        name = str(dtype).removeprefix("torch.")
        _dtype_names[dtype] = name
    return name


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
        self._recorder: _Recorder | None = None
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
        recorder = _Recorder(self.trace, self._analyzers, self.max_ops, converter)
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

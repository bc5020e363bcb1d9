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
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, NamedTuple

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
        default_factory=lambda: collections.deque(maxlen=_MAX_CANDIDATES), compare=False
    )
    # An error raised by a module's own code, with the innermost module it left: the failure
    # is built when the exception is captured, once its traceback reaches the user's line.
    _module_errors: collections.deque[tuple[BaseException, _Running]] = field(
        default_factory=lambda: collections.deque(maxlen=_MAX_CANDIDATES), compare=False
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
        if self.failure is not None and self.failure.finding is not None:
            _add_note_once(exc, self.failure.finding)

    def _forget_all_but_last_error(self) -> None:
        """After a block that ended normally only the last error may still be asked about
        (``%%shapecheck`` hands over the one its cell raised); an error's traceback holds its
        frames' tensors, so the older ones are let go."""
        for kept in (self._candidates, self._module_errors):
            while len(kept) > 1:
                kept.popleft()

    def _match(self, exc: BaseException) -> Failure | None:
        for candidate in self._candidates:
            if candidate.error is exc:
                return candidate
        for raised, running in self._module_errors:
            if raised is exc:
                return _module_failure(running, exc, self.meta)
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
    """dim ndimension size numel nelement is_contiguous stride storage_offset element_size
    is_floating_point is_complex is_signed is_inference data_ptr item tolist numpy __len__
    __repr__ __str__ __format__ __bool__ __int__ __float__ __index__ __hash__ __iter__
    __reduce_ex__ __deepcopy__ __setstate__ __getstate__ __array__ __dir__ __contains__
    get_device has_names _is_view register_hook retain_grad requires_grad_ _set_grad_enabled
    set_grad_enabled is_grad_enabled _has_compatible_shallow_copy_type is_nonzero
    untyped_storage storage _typed_storage is_pinned is_shared share_memory_ __get__ __set__
    __delete__ _make_subclass _is_any_true _is_all_true""".split()
)
# Properties that change a shape, so reading them is an op.
_SHAPE_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


@dataclass(frozen=True)
class _FuncInfo:
    name: str  # "torch.nn.functional.linear"
    short: str  # "linear"
    is_op: bool


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
    return tuple([tuple(t.shape) for t in tensors])


# --- the mode and the hooks -----------------------------------------------------------------


class _Running(NamedTuple):
    """A module whose forward is running: what an error raised in it needs."""

    module: torch.nn.Module
    path: str
    args: tuple[Any, ...]


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
                frame, housekeeping = _caller(sys._getframe(0))
                if not housekeeping:
                    self._failed(info, func, args, kwargs, exc, frame)
                raise
        frame, housekeeping = _caller(sys._getframe(1))
        if housekeeping:
            return func(*args, **kwargs)
        if self.converter is not None:
            args, kwargs = self.converter.convert(args, kwargs)
        try:
            result = func(*args, **kwargs)
        except Exception as exc:
            self._failed(info, func, args, kwargs, exc, frame)
            raise
        self._record(info, func, args, kwargs, result, frame)
        return result

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
        sizes = tuple([t.shape for t in inputs])
        running = self.running
        module = running[-1].path if running else None
        code, lineno = (frame.f_code, frame.f_lineno) if frame is not None else (None, 0)
        key = (func, module, code, lineno, sizes)
        record = self._op_index.get(key)
        trace = self.trace
        if record is not None:
            record.count += 1
            trace.folded += 1
        elif len(trace.ops) >= self.max_ops:
            trace.dropped += 1
        else:
            record = self._new_record(info, module, inputs, result, args, code, lineno)
            self._op_index[key] = record
            trace.ops.append(record)
        if self.analyzers:
            self._tell_analyzers(info, func, args, kwargs, result, module, code, lineno, record)

    def _new_record(
        self,
        info: _FuncInfo,
        module: str | None,
        inputs: list[torch.Tensor],
        result: Any,
        args: tuple[Any, ...],
        code: Any,
        lineno: int,
    ) -> OpRecord:
        location, line = _where(code, lineno)
        return OpRecord(
            name=info.name,
            module=module,
            input_shapes=_shapes(inputs),
            output_shapes=_shapes(_outputs(result, args)),
            dtypes=tuple([_dtype_name(t.dtype) for t in inputs]),
            devices=tuple([_device_name(t.device) for t in inputs]),
            location=location,
            source_line=line,
        )

    def _tell_analyzers(
        self,
        info: _FuncInfo,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: Any,
        module: str | None,
        code: Any,
        lineno: int,
        record: OpRecord | None,
    ) -> None:
        if code is None:
            location, user_code = None, False
        else:
            location = _location.location_text(code, lineno)
            user_code = _location.is_user_code(code)
        event = OpEvent(
            func,
            info.name,
            args,
            kwargs,
            result,
            location,
            module,
            user_code,
            record.source_line if record is not None else "",
        )
        for analyzer in self.analyzers:
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
        code, lineno = (frame.f_code, frame.f_lineno) if frame is not None else (None, 0)
        location, line = _where(code, lineno)
        inputs = _tensors(args, kwargs)
        try:
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
            )
        except Exception:  # noqa: BLE001 - the user's own error must propagate as it was
            operands = {f"arg{i}": t for i, t in enumerate(inputs)}
            finding = _failures.unexplained(info.name, inputs, location, exc)
        self.trace._candidates.append(
            Failure(
                name=info.name,
                module=running.path if running else None,
                input_shapes=_shapes(inputs),
                output_shapes=(),
                dtypes=tuple(_dtype_name(t.dtype) for t in inputs),
                devices=tuple(str(t.device) for t in inputs),
                location=location,
                source_line=line,
                error=exc,
                finding=finding,
                operands=operands,
            )
        )

    # Modules -----------------------------------------------------------------------------

    def pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self.on_compiled_model is not None and _is_compile_wrapper(type(module)):
            self.on_compiled_model()
            self.on_compiled_model = None
        path = self.paths.get(id(module))
        if path is None:
            path = self._discover(module)
        self.running.append(_Running(module, path, args))

    def post_hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if output is None:
            raised = sys.exc_info()[1]
            if raised is not None:
                self._module_raised(module, raised)
        running = self.running
        if running and running[-1].module is module:
            self._record_module(running.pop(), args, output)
            return
        # A forward left by an error, or a module's nested call: pop down to this module.
        for depth in range(len(running) - 1, -1, -1):
            if running[depth].module is module:
                entry = running[depth]
                del running[depth:]
                self._record_module(entry, args, output)
                return

    def _record_module(self, running: _Running, args: tuple[Any, ...], output: Any) -> None:
        module = running.module
        cls = type(module)
        if _is_compile_wrapper(cls):
            return
        sizes = tuple([a.shape for a in args if isinstance(a, torch.Tensor)])
        key = (running.path, cls, sizes)
        record = self._module_index.get(key)
        if record is not None:
            record.count += 1
        elif len(self._module_index) < self.max_ops:
            record = ModuleRecord(
                path=running.path,
                type_name=cls.__name__,
                input_shapes=tuple([tuple(s) for s in sizes]),
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
        if self.converter is not None:
            running = _Running(
                running.module, running.path, self.converter.convert(running.args, {})[0]
            )
        self.trace._module_errors.append((exc, running))

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
        # A torch.compile'd model: its original module is the same model.
        self._map_children(getattr(root, "_orig_mod", root), "")

    def _map_children(self, module: torch.nn.Module, prefix: str) -> None:
        for name, sub in module.named_modules(prefix=prefix):
            if id(sub) not in self.paths:
                self.paths[id(sub)] = name
                self._known_modules.append(sub)


def _module_failure(running: _Running, exc: Exception, meta: bool) -> Failure:
    """A failure raised by a module's own Python code rather than by a tensor op."""
    module = running.module
    location, line = _location.innermost_user_line(exc.__traceback__)
    inputs = _tensors(running.args, None)
    operands = {
        ("input" if i == 0 else f"arg{i}"): t
        for i, t in enumerate(a for a in running.args if isinstance(a, torch.Tensor))
    }
    finding = _failures.classify_module(module, running.path, operands, location, exc, meta=meta)
    cls = type(module)
    return Failure(
        name=f"{cls.__module__}.{cls.__qualname__}",
        module=running.path,
        input_shapes=_shapes(inputs),
        output_shapes=(),
        dtypes=tuple(_dtype_name(t.dtype) for t in inputs),
        devices=tuple(str(t.device) for t in inputs),
        location=location,
        source_line=line,
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


def _caller(frame: FrameType | None) -> tuple[FrameType | None, bool]:
    """The innermost user frame above ``frame``, and whether module housekeeping made the op."""
    code_kind = _location.code_kind
    while frame is not None:
        kind = code_kind(frame.f_code)
        if kind == _location.USER:
            return frame, False
        if kind == _location.HOUSEKEEPING:
            return None, True
        frame = frame.f_back
    return None, False


def _where(code: Any, lineno: int) -> tuple[str | None, str]:
    if code is None:
        return None, ""
    return _location.location_text(code, lineno), _location.source_line(code.co_filename, lineno)


_device_names: dict[torch.device, str] = {}


def _device_name(device: torch.device) -> str:
    name = _device_names.get(device)
    if name is None:
        name = _device_names[device] = str(device)
    return name


_dtype_names: dict[torch.dtype, str] = {}


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
        grad_enabled = torch.is_grad_enabled()
        stack.callback(torch.set_grad_enabled, grad_enabled)
        # Importing the compiler costs seconds: run compiled code eagerly only once it is loaded
        # (a compiled model or function exists), or when a compiled model first runs.
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
    with warnings.catch_warnings():
        # torch warns that global hooks also fire for the compiled wrapper; the trace treats
        # the wrapper and its original module as one.
        warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there")
        if set_stance is None:
            yield
            return
        with set_stance("force_eager"):
            yield

"""What the tracer tells the analyzers about each op it records.

The tracer in ``_recorder.py`` builds one ``OpEvent`` per top-level tensor op and hands it to
every analyzer of the trace (silent broadcasts, non-finite values, ...). Analyzers keep no
strong reference to tensors beyond what their own report needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from nbtrouble.findings import Finding


@dataclass
class OpEvent:
    """One top-level tensor op, as the analyzers see it."""

    func: Callable[..., Any]  # the torch function or Tensor method that ran
    name: str  # display name, e.g. "torch.Tensor.__sub__" or "torch.nn.functional.linear"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: Any
    location: str | None  # "file:line" of the innermost frame outside torch and nbtrouble
    module: str | None  # dotted path of the innermost running nn.Module, or None
    user_code: bool  # True when `location` is the user's own code, not an installed library
    source_line: str = ""  # the text of that line, stripped, when known
    extra: dict[str, Any] = field(default_factory=dict)


class Analyzer(Protocol):
    """Looks at recorded ops and reports findings at the end of the trace.

    An analyzer may also define a class method ``wants(name) -> bool`` (the ops it looks at,
    cached per function by the tracer) and a ``following`` property, true while it needs every
    op to follow a value it saw earlier; the tracer builds no event for an op nobody wants,
    which keeps tracing cheap. Without ``wants`` an analyzer sees every op.
    """

    def on_op(self, event: OpEvent) -> None: ...

    def findings(self) -> list[Finding]: ...

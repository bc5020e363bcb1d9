"""What a trace keeps: one record per distinct op or module call, and what failed.

Records are plain dataclasses: the text and widget views read them, and a training loop folds
into their ``count`` instead of growing the trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from nbtrouble import _failures
from nbtrouble._tensor_info import (
    Shape,
    device_names_of,
    dtype_names_of,
    shapes_of,
    tensor_operands,
)
from nbtrouble.findings import Finding

if TYPE_CHECKING:
    from nbtrouble._recorder import Running


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


def failure_record(
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
        input_shapes=shapes_of(inputs),
        output_shapes=(),
        dtypes=dtype_names_of(inputs),
        devices=device_names_of(inputs),
        location=where[0],
        source_line=where[1],
        error=exc,
        finding=finding,
        operands=operands,
    )


def module_failure(running: Running, exc: Exception, meta: bool) -> Failure:
    """A failure raised by a module's own Python code rather than by a tensor op."""
    module = running.module
    site = _failures.module_failure_site(exc)
    location, line = site.location, site.line
    inputs = tensor_operands(running.args, None)
    operands = _failures.module_operands(module, running.args, exc, meta=meta)
    finding = _failures.classify_module(
        module, running.path, operands, location, exc, meta=meta, site=site
    )
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    return failure_record(name, running.path, inputs, (location, line), exc, finding, operands)

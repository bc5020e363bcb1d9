"""Forward hooks that watch a model's passes without changing them.

``CallWatch`` records which modules ran and the first one that blows its input up;
``DeadUnitWatch`` records which ReLU units ever fire. Both remove every hook they registered
when the block they watch ends, also after an exception.

Examples
--------
>>> watch = DeadUnitWatch(model)
>>> with torch.no_grad(), watch.watching():
...     model(x)
>>> watch.findings()
[]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from nbtrouble.findings import Finding

_DEAD_FRACTION = 0.5  # share of a layer's units that never fire on the batch
_MIN_SAMPLES_FOR_DEAD = 4  # with fewer samples a unit is silent by chance too often
# A module whose output RMS exceeds this, and this many times its input's, blows activations up.
_BLOWUP_RMS = 1e3
_BLOWUP_GAIN = 100.0


@contextmanager
def hooked(registrations: Iterable[Any]) -> Iterator[None]:
    """Keep the hooks that ``registrations`` registers for the block, then remove every one."""
    handles: list[Any] = []
    try:
        handles.extend(registrations)  # one by one, so a failing registration leaves none behind
        yield
    finally:
        for handle in handles:
            handle.remove()


class CallWatch:
    """Which modules the forward passes it watches run, and the first that blows its input up.

    ``blowup`` is ``(path, module type, input RMS, output RMS)`` for the first module to finish
    whose output is far larger than its input (a recurrent weight with a spectral radius above
    one, a missing normalization), or ``None``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.called: set[str] = set()
        self.blowup: tuple[str, str, float, float] | None = None

    @contextmanager
    def watching(self) -> Iterator[CallWatch]:
        modules = self.model.named_modules()
        with hooked((m.register_forward_hook(self._hook(p)) for p, m in modules)):
            yield self

    def _hook(self, path: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            self.called.add(path)
            if self.blowup is None:
                size_in, size_out = _rms(args), _rms(output)
                if size_out > _BLOWUP_RMS and size_out > _BLOWUP_GAIN * max(size_in, 1e-3):
                    self.blowup = (path, type(module).__name__, size_in, size_out)

        return record


def _rms(value: Any) -> float:
    """Root mean square of the first float tensor in ``value`` (1.0 for token ids and the like)."""
    if isinstance(value, (tuple, list)):
        value = next((v for v in value if isinstance(v, torch.Tensor)), None)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or not value.numel():
        return 1.0
    size = float(value.detach().float().pow(2).mean().sqrt())
    return size if math.isfinite(size) else 0.0


class DeadUnitWatch:
    """Records which units of every ``nn.ReLU`` ever fire during the forward passes it watches."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.alive: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}

    @contextmanager
    def watching(self) -> Iterator[DeadUnitWatch]:
        relus = [
            (p, m) for p, m in self.model.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))
        ]
        with hooked(m.register_forward_hook(self._hook(p)) for p, m in relus):
            yield self

    def _hook(self, path: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor) or output.ndim < 2:
                return
            fired = _units_fired(output.detach())
            seen = self.alive.get(path)
            if seen is None or seen.shape != fired.shape:
                self.alive[path] = fired
            else:
                self.alive[path] = seen | fired
            self.samples[path] = int(output.shape[0])

        return record

    def findings(self) -> list[Finding]:
        found = []
        for path, alive in self.alive.items():
            dead = int((~alive).sum())
            share = dead / alive.numel()
            if share >= _DEAD_FRACTION and self.samples[path] >= _MIN_SAMPLES_FOR_DEAD:
                found.append(
                    Finding(
                        "dead_units",
                        "warning",
                        f"{dead} of {alive.numel()} units ({share:.0%}) of ReLU '{path}' output "
                        f"zero for all {self.samples[path]} samples of the batch",
                        "Check the inputs' normalization and the layer's initialization (bias "
                        "init, a huge learning rate); try LeakyReLU.",
                        where=path,
                    )
                )
        return found


def _units_fired(output: torch.Tensor) -> torch.Tensor:
    """Per unit (feature or channel), whether it was positive for any sample and position."""
    # (N, F) and (N, C, ...) images keep units in dim 1; sequences (N, T, F) in the last dim.
    feature_dim = 1 if output.ndim in (2, 4, 5) else output.ndim - 1
    per_unit = output.movedim(feature_dim, 0).reshape(output.shape[feature_dim], -1)
    return (per_unit > 0).any(dim=1)

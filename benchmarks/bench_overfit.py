"""Per-step cost of ``overfit_batch`` against a hand-written loop on the same model and batch.

Runs interleaved in one process (timings on shared machines swing too much to compare runs
made apart) and prints the ratio of median per-step times: ``overfit_batch`` alone, and with
the live panel fed as the magic feeds it (built, not displayed).

    python benchmarks/bench_overfit.py [--steps 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import nbtrouble as nbt
from nbtrouble._overfit_view import OverfitPanel


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def lenet_8x8() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def hand_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """What a user writes: Adam at 3e-4, cross-entropy, the loss read every step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return (time.perf_counter() - started) / steps


def tool_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, panel: bool) -> float:
    observer = OverfitPanel() if panel else None
    report = nbt.overfit_batch(model, (x, y), nn.CrossEntropyLoss(), steps=steps, observer=observer)
    return report.seconds / steps


def compare(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, repeats: int
) -> None:
    initial = copy.deepcopy(model.state_dict())
    times: dict[str, list[float]] = {"hand": [], "overfit_batch": [], "overfit_batch + panel": []}
    for _ in range(repeats):
        model.load_state_dict(initial)
        times["hand"].append(hand_loop(model, x, y, steps))
        model.load_state_dict(initial)
        times["overfit_batch"].append(tool_loop(model, x, y, steps, panel=False))
        times["overfit_batch + panel"].append(tool_loop(model, x, y, steps, panel=True))
    hand = statistics.median(times["hand"])
    print(f"{name}: {steps} steps, median of {repeats} interleaved runs")
    for label, values in times.items():
        per_step = statistics.median(values)
        print(f"  {label:22s} {per_step * 1e3:7.3f} ms/step   ratio {per_step / hand:5.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    compare("small CNN, 32x3x32x32", small_cnn(), x, y, args.steps, args.repeats)
    x8, y8 = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    compare("LeNet-like, 64x1x8x8", lenet_8x8(), x8, y8, args.steps, args.repeats)


if __name__ == "__main__":
    main()

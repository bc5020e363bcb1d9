"""Overhead of ``nbt.shapecheck`` on a successful forward, and the cost of ``meta=True`` at 7B.

Run::

    python benchmarks/bench_shapecheck.py            # overhead ratios
    python benchmarks/bench_shapecheck.py --meta     # 7B decoder config on meta: time, peak RSS

Ratios are traced time over plain time, medians over rounds measured interleaved in one
process with one torch thread (absolute times swing on shared machines; ratios measured side by
side do not). Each round is timed twice: by the thread's CPU time (``time.thread_time``), the
figure the targets are judged by, since time other processes take from a shared machine does
not count in it; and by wall time, what a user waits for. torchsnooper and tensor-sensor are
measured the same way when installed, each tool in its own loop. Targets: <= 1.5x on the small CNN, <= 1.1x on the
ResNet-18-sized model, the 7B meta check under 10 s and 1 GiB peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import nbtrouble as nbt


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _snoop() -> Any:
    import torchsnooper

    return torchsnooper.snoop(output=io.StringIO())


def _clarify() -> Any:
    import tsensor

    return tsensor.clarify()


def _tools() -> dict[str, Callable[[], Any]]:
    tools: dict[str, Callable[[], Any]] = {"shapecheck": nbt.shapecheck}
    for name, factory in (("torchsnooper", _snoop), ("tsensor", _clarify)):
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                factory()
        except ImportError:
            continue
        tools[name] = factory
    return tools


def _time(run: Callable[[], Any], context: Callable[[], Any] | None) -> tuple[float, float]:
    """(CPU seconds of this thread, wall seconds) of one run, in ``context`` when given."""
    cpu, wall = time.thread_time(), time.perf_counter()
    if context is None:
        run()
    else:
        with context():
            run()
    return time.thread_time() - cpu, time.perf_counter() - wall


def overhead(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median traced / median plain CPU time for every tool, interleaved round by round."""
    model.eval()

    def run() -> Any:
        with torch.no_grad():
            return model(x)

    ratios, shown, plain_ms = {}, [], []
    # Each tool in its own loop against plain: what one tool leaves behind (cold caches, a
    # trace function) does not weigh on the next one's rounds.
    for tool, context in _tools().items():
        cpu, wall = _ratios(run, context, repeats)
        ratios[tool] = cpu
        shown.append(f"{tool} {cpu:.2f}x (wall {wall:.2f}x)")
        plain_ms.append(_time(run, None)[0] * 1e3)
    print(f"{name:<24} plain {min(plain_ms):7.2f} ms  {'  '.join(shown)}", flush=True)
    return ratios


def _ratios(
    run: Callable[[], Any], context: Callable[[], Any], repeats: int
) -> tuple[float, float]:
    """Median traced / median plain, by CPU time and by wall time, interleaved round by round."""
    with contextlib.redirect_stderr(io.StringIO()):
        _time(run, None)  # warm-up: caches, allocator, first-call costs
        _time(run, context)
        rounds = [(_time(run, None), _time(run, context)) for _ in range(repeats)]
    cpu = [statistics.median(r[i][0] for r in rounds) for i in (0, 1)]
    wall = [statistics.median(r[i][1] for r in rounds) for i in (0, 1)]
    return cpu[1] / cpu[0], wall[1] / wall[0]


def per_op_cost(ops: int = 2000, repeats: int = 7) -> None:
    """Microseconds the trace adds to one tiny op, first seen (new record) and repeated (folded)."""
    x = torch.randn(8, 8)

    def distinct() -> None:
        for n in range(1, ops + 1):
            x[: n % 8 + 1] + 1.0  # a few distinct shapes: mostly folded records

    def plain_and_traced() -> tuple[float, float]:
        plain = _time(distinct, None)[0]
        traced = _time(distinct, nbt.shapecheck)[0]
        return plain, traced

    plain_and_traced()
    rounds = [plain_and_traced() for _ in range(repeats)]
    plain = statistics.median(r[0] for r in rounds)
    traced = statistics.median(r[1] for r in rounds)
    per_op = (traced - plain) / (2 * ops) * 1e6  # each iteration makes two ops
    print(f"{'per recorded op':<24} {per_op:.1f} us added per tiny op (loop, folded records)")


_SEVEN_B = """
import json, sys, time
import torch
import nbtrouble as nbt
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(1)
config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     intermediate_size=11008, vocab_size=32000)
start = time.perf_counter()
with nbt.shapecheck(meta=True) as trace:
    model = LlamaForCausalLM(config)
    logits = model(input_ids=torch.randint(0, 32000, (1, 512))).logits
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "ops": len(trace.ops), "folded": trace.folded,
                  "params": sum(p.numel() for p in model.parameters()),
                  "logits": list(logits.shape)}))
"""


def meta_7b() -> None:
    """Build and run a 7B decoder config on meta in a child process; report time and RSS."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _SEVEN_B], capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(
        f"7B decoder on meta: {result['params'] / 1e9:.2f}B parameters, logits {result['logits']}, "
        f"{result['ops']} op records ({result['folded']} folded)\n"
        f"  build + forward under shapecheck: {result['seconds']:.2f} s "
        f"(child process wall incl. imports {wall:.1f} s), peak RSS {peak_gib:.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta", action="store_true", help="7B decoder config on meta")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--resnet-batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.meta:
        meta_7b()
        return
    print("ratios: median CPU time of this thread, traced / plain (median wall time in brackets)")
    per_op_cost()
    overhead("tiny MLP 32x784", TinyMLP(), torch.randn(32, 784), args.repeats * 10)
    overhead("LeNet 32x1x28x28", LeNet(), torch.randn(32, 1, 28, 28), args.repeats * 4)
    overhead(
        f"ResNet-18 {args.resnet_batch}x3x224x224",
        ResNet18(),
        torch.randn(args.resnet_batch, 3, 224, 224),
        args.repeats,
    )


if __name__ == "__main__":
    main()

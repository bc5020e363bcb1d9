"""Silent broadcasts: the classic ``(N, 1)`` vs ``(N,)`` bugs are reported, deliberate ones are not.

Everything runs through the real tracer, ``nbt.shapecheck()``, as a user's code would.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import inspect
import math
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nbtrouble as nbt
from nbtrouble._broadcast import BroadcastAnalyzer
from nbtrouble._events import OpEvent
from nbtrouble.findings import Finding

torch.set_num_threads(1)

N = 16


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _traced(code: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own size warning for mse_loss / l1_loss
        with nbt.shapecheck() as trace:
            code()
    return trace


def _broadcasts(trace: Any) -> list[Finding]:
    return [f for f in trace.findings if f.kind == "silent_broadcast"]


def _line_of(code: Callable[..., Any], snippet: str) -> str:
    """``"file:line"`` of the one line of ``code`` that contains ``snippet``."""
    lines, first = inspect.getsourcelines(code)
    hits = [first + i for i, line in enumerate(lines) if snippet in line]
    assert len(hits) == 1, f"{snippet!r} is on {len(hits)} lines of {code.__name__}"
    return f"{inspect.getsourcefile(code)}:{hits[0]}"


def _regression() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model with one output per example, and targets of shape (N,): the classic setup."""
    return nn.Linear(4, 1), torch.randn(N, 4), torch.randn(N)


# -- the bugs --------------------------------------------------------------------------------


def hand_mse() -> None:
    model, x, y = _regression()
    out = model(x)
    ((out - y) ** 2).mean()


def hand_mae() -> None:
    model, x, y = _regression()
    out = model(x)
    (out - y).abs().mean()


def accuracy_unsqueezed_target() -> None:
    logits, labels = torch.randn(N, 5), torch.randint(0, 5, (N,))
    (logits.argmax(1) == labels.unsqueeze(1)).float().mean()


def accuracy_keepdim() -> None:
    logits, labels = torch.randn(N, 5), torch.randint(0, 5, (N,))
    pred = logits.argmax(1, keepdim=True)
    (pred == labels).sum().item()


def mse_loss_module() -> None:
    model, x, y = _regression()
    nn.MSELoss()(model(x), y)


def functional_l1_loss() -> None:
    model, x, y = _regression()
    F.l1_loss(model(x), y)


BUGS = [
    (hand_mse, "((out - y) ** 2).mean()", "`out` (16, 1) - `y` (16,) broadcast to (16, 16)"),
    (hand_mae, "(out - y).abs().mean()", "`out` (16, 1) - `y` (16,) broadcast to (16, 16)"),
    (
        accuracy_unsqueezed_target,
        "labels.unsqueeze(1)).float()",
        "`logits.argmax(1)` (16,) == `labels.unsqueeze(1)` (16, 1) broadcast to (16, 16)",
    ),
    (accuracy_keepdim, "(pred == labels)", "`pred` (16, 1) == `labels` (16,) broadcast to"),
    (mse_loss_module, "nn.MSELoss()", "mse_loss got input `model(x)` (16, 1) and target `y` (16,)"),
    (functional_l1_loss, "F.l1_loss(", "l1_loss got input `model(x)` (16, 1) and target `y` (16,)"),
]


@pytest.mark.parametrize("bug, snippet, message", BUGS, ids=[b[0].__name__ for b in BUGS])
def test_classic_bug_is_reported_at_its_line(
    bug: Callable[[], None], snippet: str, message: str
) -> None:
    found = _broadcasts(_traced(bug))
    assert len(found) == 1, found
    assert found[0].severity == "warning"
    assert found[0].where == _line_of(bug, snippet)
    assert message in found[0].message
    assert found[0].hint


def test_message_says_what_was_meant() -> None:
    (finding,) = _broadcasts(_traced(hand_mse))
    assert "256 values where 16 were meant" in finding.message
    assert "before mean() reduced them" in finding.message
    assert "`y.view(-1, 1)` (both (16, 1)) or `out.squeeze(1)` (both (16,))" in finding.message
    (finding,) = _broadcasts(_traced(accuracy_unsqueezed_target))
    # The fix of an axis added by hand is to leave it out.
    assert "or `labels` (both (16,))" in finding.message


def test_a_training_loop_reports_the_line_once() -> None:
    model, x, y = _regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def train() -> None:
        for _ in range(5):
            optimizer.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            optimizer.step()

    found = _broadcasts(_traced(train))
    assert [f.where for f in found] == [_line_of(train, "loss = ((model(x) - y)")]


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.fc(x) - y).pow(2).mean()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = _Head()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x), y)


def test_a_bug_inside_a_module_names_the_module() -> None:
    model, x, y = _Net(), torch.randn(N, 4), torch.randn(N)
    (finding,) = _broadcasts(_traced(lambda: model(x, y)))
    assert finding.where == f"{_line_of(_Head.forward, 'self.fc(x) - y')} head"


def test_bce_with_shape_different_targets_is_refused_by_torch_and_traced() -> None:
    logits, targets = torch.randn(N, 1), torch.randint(0, 2, (N,)).float()
    refused = pytest.raises(ValueError, match="must be the same as input size")
    with refused, nbt.shapecheck() as trace:
        nn.BCEWithLogitsLoss()(logits, targets)
    assert trace.failure is not None
    assert trace.failure.input_shapes[:2] == ((N, 1), (N,))
    assert _broadcasts(trace) == []


def test_no_tensor_is_kept_alive() -> None:
    model, x, y = _regression()
    with nbt.shapecheck() as trace:
        diff = model(x) - y
        grid = diff.pow(2)
        loss = grid.mean()
    refs = [weakref.ref(t) for t in (diff, grid, loss)]
    del diff, grid, loss
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert len(_broadcasts(trace)) == 1


def test_a_grid_left_unused_is_reported_only_without_an_axis_made_on_purpose() -> None:
    model, x, y = _regression()

    def bare() -> None:
        model(x) - y

    def unsqueezed() -> None:
        model(x).squeeze(1) - y.unsqueeze(1)

    assert [f.where for f in _broadcasts(_traced(bare))] == [_line_of(bare, "model(x) - y")]
    assert _broadcasts(_traced(unsqueezed)) == []


_LIBRARY_SOURCE = """
import torch

def mean_error(pred, target):
    return (pred - target).abs().mean()

def pairwise_mean(a, b):
    return (a.unsqueeze(1) - b).mean()

def loss(pred, target):
    return torch.nn.functional.mse_loss(pred, target)
"""


def test_library_code_is_trusted_unless_the_evidence_is_strongest(tmp_path: Path) -> None:
    filename = str(tmp_path / "site-packages" / "somelib" / "metrics.py")
    library: dict[str, Any] = {}
    exec(compile(_LIBRARY_SOURCE, filename, "exec"), library)  # noqa: S102 - a fake installed library
    pred, target = torch.randn(N, 1), torch.randn(N)
    # An axis made on purpose and a reduction: deliberate enough for library code.
    assert _broadcasts(_traced(lambda: library["pairwise_mean"](pred.squeeze(1), target))) == []
    # Neither operand shaped on purpose, reduced to a scalar: reported even in a library...
    (found,) = _broadcasts(_traced(lambda: library["mean_error"](pred, target)))
    assert found.where == f"{filename}:5"
    # ... and so is a loss whose input and target shapes differ.
    (found,) = _broadcasts(_traced(lambda: library["loss"](pred, target)))
    assert found.where == f"{filename}:11"


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensors_are_left_alone() -> None:
    # The analyzer on its own: nested tensors have no single shape to compare.
    nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])
    analyzer = BroadcastAnalyzer()
    for func, args in ((torch.Tensor.add, (nested, nested)), (torch.Tensor.unsqueeze, (nested, 1))):
        result = func(*args)
        event = OpEvent(
            func, f"torch.Tensor.{func.__name__}", args, {}, result, "f.py:1", None, True
        )
        analyzer.on_op(event)
    assert analyzer.findings() == []


@pytest.mark.parametrize("code", [hand_mse, functional_l1_loss])
def test_meta_mode_reports_the_same_bugs(code: Callable[[], None]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with nbt.shapecheck(meta=True) as trace:
            code()
    assert len(_broadcasts(trace)) == 1


_OPS = [torch.sub, torch.add, torch.mul, torch.eq, torch.maximum]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), op=st.sampled_from(_OPS), column_first=st.booleans())
def test_any_column_against_a_row_of_its_length_is_reported_when_reduced(
    n: int, op: Callable[..., torch.Tensor], column_first: bool
) -> None:
    column, row = torch.randn(n, 1), torch.randn(n)
    operands = (column, row) if column_first else (row, column)
    with nbt.shapecheck() as trace:
        op(*operands).float().mean()
    (found,) = _broadcasts(trace)
    assert f"broadcast to ({n}, {n})" in found.message


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data())
def test_stretching_one_side_only_is_never_reported(shape: list[int], data: Any) -> None:
    # The other operand: a trailing part of the shape, with some axes of size 1.
    tail = shape[data.draw(st.integers(0, len(shape) - 1)) :]
    smaller = [1 if data.draw(st.booleans()) else size for size in tail]
    big, small = torch.randn(shape), torch.randn(smaller)
    with nbt.shapecheck() as trace:
        ((big - small) ** 2).mean()
        (small * big).sum()
    assert _broadcasts(trace) == []


# -- deliberate broadcasting ------------------------------------------------------------------


def centering() -> None:
    x = torch.randn(N, 4)
    (x - x.mean(0)).pow(2).mean()


def standardizing_with_keepdim() -> None:
    x = torch.randn(N, 4)
    ((x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)).sum()


def bias_add() -> None:
    x, w, b = torch.randn(N, 4), torch.randn(4, 4), torch.randn(4)
    (x @ w + b).relu().mean()


def batch_norm_by_hand() -> None:
    x, gamma, beta = torch.randn(N, 4), torch.ones(4), torch.zeros(4)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    ((x - mean) / torch.sqrt(var + 1e-5) * gamma + beta).mean()


def pairwise_same_size() -> None:
    a, b = torch.randn(N, 3), torch.randn(N, 3)
    ((a[:, None] - b[None]) ** 2).sum(-1).mean()


def pairwise_different_sizes() -> None:
    a, b = torch.randn(5, 3), torch.randn(7, 3)
    ((a[:, None] - b[None]) ** 2).sum(-1).sqrt().min(1).values.mean()


def cdist_with_norms() -> None:
    a, b = torch.randn(N, 3), torch.randn(N, 3)
    squared = (a**2).sum(1, keepdim=True) + (b**2).sum(1) - 2 * a @ b.T
    squared.clamp_min(0).sqrt().mean()


def cosine_similarity_matrix() -> None:
    a, b = torch.randn(N, 3), torch.randn(N, 3)
    norms = a.norm(dim=1, keepdim=True) * b.norm(dim=1)
    (a @ b.T / norms.clamp_min(1e-8)).mean()


def self_pairwise_ranking() -> None:
    scores = torch.randn(N)
    (1 - (scores.unsqueeze(1) - scores)).clamp(min=0).mean()


def outer_product() -> None:
    x, y = torch.randn(N), torch.randn(N)
    (x[:, None] * y[None, :]).sum()


def relative_position_grid() -> None:
    table = nn.Embedding(2 * N - 1, 4)
    pos = torch.arange(N)
    relative = pos[:, None] - pos[None, :]
    table(relative + N - 1).mean()


def additive_attention_softmax() -> None:
    query_score, key_score = nn.Linear(4, 1), nn.Linear(4, 1)
    q, k, v = torch.randn(N, 4), torch.randn(N, 4), torch.randn(N, 4)
    weights = torch.softmax(query_score(q) + key_score(k).squeeze(1), dim=-1)
    (weights @ v).mean()


def masked_mean_from_lengths() -> None:
    token_loss, lengths = torch.rand(N, N), torch.randint(1, N, (N,))
    mask = (torch.arange(N) < lengths.unsqueeze(1)).float()
    count = mask.sum()
    ((token_loss * mask).sum() / count).item()


def one_hot_by_hand() -> None:
    log_probs, labels = torch.randn(N, N).log_softmax(1), torch.randint(0, N, (N,))
    one_hot = (labels.unsqueeze(1) == torch.arange(N)).float()
    -(one_hot * log_probs).sum(1).mean()


def box_union() -> None:
    area_a, area_b, inter = torch.rand(N) + 1, torch.rand(N) + 1, torch.rand(N, N)
    (inter / (area_a[:, None] + area_b - inter)).mean()


def attention_with_padding_and_causal_masks() -> None:
    # Batch, sequence, heads and head size all equal: every broadcast axis length coincides.
    batch = seq = heads = dim = 4
    q, k, v = (torch.randn(batch, heads, seq, dim) for _ in range(3))
    padding = torch.ones(batch, seq, dtype=torch.bool)
    padding[-1, -2:] = False
    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    allowed = ~future & padding[:, None, None, :]
    positions = torch.arange(seq)
    causal = positions[None, :] <= positions[:, None]
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~causal, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).add(out).pow(2).mean()


def rotary_embeddings() -> None:
    batch, heads, seq, dim = 2, 4, 8, 8
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.arange(seq).float()[:, None] * inv_freq[None, :]
    table = torch.cat([angles, angles], dim=-1)
    cos, sin = table.cos(), table.sin()
    x = torch.randn(batch, heads, seq, dim)
    rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], dim=-1)
    (x * cos + rotated * sin).pow(2).mean()


def sinusoidal_positions() -> None:
    max_len, d_model = 16, 32  # max_len == d_model / 2: the two stretched axes coincide
    position = torch.arange(max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    table.sum()


def torch_transformer_with_masks() -> None:
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    x = torch.randn(6, 6, 8)
    padding = torch.zeros(6, 6, dtype=torch.bool)
    padding[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    encoder(x, mask=causal, src_key_padding_mask=padding).pow(2).mean().backward()


def density_on_a_grid() -> None:
    samples, grid = torch.randn(N), torch.linspace(-3, 3, N)  # as many samples as grid points
    density = torch.exp(-((samples[:, None] - grid) ** 2)).sum(0)
    (density / density.sum()).max()


def graph_attention() -> None:
    features, a_source, a_target = torch.randn(N, 8), torch.randn(8, 1), torch.randn(8, 1)
    adjacency = torch.rand(N, N) > 0.5
    scores = F.leaky_relu(features @ a_source + (features @ a_target).T)
    weights = torch.where(adjacency, scores, torch.full_like(scores, -9e15)).softmax(1)
    (weights @ features).sum()


def correct_regression_and_accuracy() -> None:
    model, x, y = _regression()
    out = model(x)
    F.mse_loss(out.squeeze(1), y)
    ((out.squeeze(1) - y) ** 2).mean()
    (out.squeeze(1).round() == y.round()).float().mean()


CLEAN = [
    centering, standardizing_with_keepdim, bias_add, batch_norm_by_hand, pairwise_same_size,
    pairwise_different_sizes, cdist_with_norms, cosine_similarity_matrix, self_pairwise_ranking,
    outer_product, relative_position_grid, additive_attention_softmax, masked_mean_from_lengths,
    one_hot_by_hand, box_union, attention_with_padding_and_causal_masks, rotary_embeddings,
    sinusoidal_positions, torch_transformer_with_masks, density_on_a_grid, graph_attention,
    correct_regression_and_accuracy,
]  # fmt: skip


@pytest.mark.parametrize("code", CLEAN, ids=[c.__name__ for c in CLEAN])
def test_deliberate_broadcasting_is_quiet(code: Callable[[], None]) -> None:
    trace = _traced(code)
    assert trace.ops, "the code ran no traced op"
    assert _broadcasts(trace) == []


@pytest.mark.parametrize(
    "code", [self_pairwise_ranking, cdist_with_norms, attention_with_padding_and_causal_masks]
)
def test_deliberate_broadcasting_is_quiet_in_meta_mode(code: Callable[[], None]) -> None:
    with nbt.shapecheck(meta=True) as trace:
        code()
    assert _broadcasts(trace) == []


# -- real architectures ----------------------------------------------------------------------


@functools.cache
def _benchmark() -> Any:
    """``benchmarks/false_alarms.py``, whose model builders the test shares."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "false_alarms.py"
    spec = importlib.util.spec_from_file_location("false_alarms", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5"])
def test_tiny_transformers_raise_no_alarm(name: str) -> None:
    pytest.importorskip("transformers")
    benchmark = _benchmark()
    # Batch == sequence length, so that masks and position tables meet axes of equal length.
    found, judged = benchmark.model_alarms(benchmark.MODELS[name], 8, 8, "eager")
    assert found == []
    # Even with the library's lines judged as the user's own, the mechanism stays quiet...
    found, judged = benchmark.model_alarms(benchmark.MODELS[name], 8, 8, "eager", as_user_code=True)
    assert found == []
    # ... where masks of equal lengths meet, and only the flow of the result shows intent.
    assert judged["waits for its result's use"] > 0

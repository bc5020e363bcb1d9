"""The bug zoo: common model bugs ``nbt.shapecheck`` must name, and clean models it must not flag.

Each failing case marks its failing line with ``# zoo: <case>``; the trace must point at that
line and at the module that ran the failing op.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nbtrouble as nbt
from nbtrouble.findings import alarms

_SOURCE = Path(__file__).read_text().splitlines()


def marked(case: str) -> str:
    """``"file:line"`` of the line carrying ``# zoo: <case>`` in this file."""
    tag = f"# zoo: {case}"
    lines = [i for i, text in enumerate(_SOURCE, start=1) if text.rstrip().endswith(tag)]
    assert len(lines) == 1, f"marker {tag!r} must appear exactly once"
    return f"{__file__}:{lines[0]}"


# --- models -------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, n_in: int = 20, hidden: int = 64, fc2_in: int = 64, n_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(fc2_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))  # zoo: mlp_fc1
        return self.fc2(x)  # zoo: mlp


class LeNet(nn.Module):
    def __init__(self, flat: int = 16 * 4 * 4, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # zoo: conv_channels
        x = torch.flatten(x, 1)
        return self.classifier(x)  # zoo: flatten


class Tagger(nn.Module):
    def __init__(self, vocab: int = 100, dim: int = 16, lstm_in: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(lstm_in, 32, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)  # zoo: embedding
        out, _ = self.rnn(x)  # zoo: lstm
        return self.head(out)


class TwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(8, 4)
        self.right = nn.Linear(8, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.left(a), self.right(b)], dim=1)  # zoo: cat


class Reshaper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x.view(x.size(0), 8 * 16 * 16)  # zoo: view
        return self.fc(x)


class Attention(nn.Module):
    """Single-head attention; ``transpose_keys=False`` forgets to transpose k."""

    def __init__(self, dim: int = 16, transpose_keys: bool = True, causal: bool = False):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.transpose_keys = transpose_keys
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        keys = k.transpose(1, 2) if self.transpose_keys else k
        scores = torch.bmm(q, keys) / math.sqrt(q.size(-1))  # zoo: bmm
        if self.causal:
            t = x.size(1)
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
            scores = scores.masked_fill(mask, float("-inf"))
        return torch.bmm(scores.softmax(dim=-1), v)


class LogFeatures(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)  # zoo: nan_log


class Standardize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean()) / x.std()  # zoo: nan_div


class WithFeatures(nn.Module):
    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# --- failing cases ------------------------------------------------------------------------
# Each returns (callable run inside the trace, expected kind, module path, message fragments).


def mlp_in_features():
    model, x = MLP(fc2_in=32), torch.randn(8, 20)
    return (
        lambda: model(x),
        "shape_mismatch",
        "mlp",
        "fc2",
        ["Linear 'fc2'", "in_features=32", "(8, 64)"],
    )


def cnn_flatten_size():
    model, x = LeNet(), torch.randn(4, 1, 32, 32)
    frags = ["Linear 'classifier.0'", "in_features=256", "(4, 400)", "nn.Linear(400, 120)"]
    return lambda: model(x), "shape_mismatch", "flatten", "classifier.0", frags


def cnn_channels():
    model, x = LeNet(in_channels=3), torch.randn(4, 1, 28, 28)
    frags = ["Conv2d 'features.0'", "in_channels=3", "(4, 1, 28, 28)", "1 channels"]
    return lambda: model(x), "shape_mismatch", "conv_channels", "features.0", frags


def lstm_input_size():
    model, tokens = Tagger(dim=16, lstm_in=12), torch.randint(0, 100, (4, 7))
    frags = ["LSTM 'rnn'", "input_size=12", "(4, 7, 16)"]
    return lambda: model(tokens), "shape_mismatch", "lstm", "rnn", frags


def embedding_out_of_range():
    model, tokens = Tagger(vocab=100), torch.randint(0, 100, (4, 7))
    tokens[2, 3] = 150
    frags = ["Embedding 'emb'", "num_embeddings=100", "index 150"]
    return lambda: model(tokens), "shape_mismatch", "embedding", "emb", frags


def embedding_float_ids():
    model, tokens = Tagger(), torch.rand(4, 7) * 100
    frags = ["Embedding 'emb'", "int64", "float32"]
    return lambda: model(tokens), "dtype_mismatch", "embedding", "emb", frags


def cat_batch_mismatch():
    model, a, b = TwoTower(), torch.randn(8, 8), torch.randn(6, 8)
    frags = ["cat along dim 1", "(8, 4)", "(6, 4)", "dim 0 (8 vs 6)"]
    return lambda: model(a, b), "shape_mismatch", "cat", "", frags


def view_wrong_size():
    model, x = Reshaper(), torch.randn(2, 3, 32, 32)
    frags = ["(2, 8, 32, 32)", "16384 elements", "(2, 2048)"]
    return lambda: model(x), "shape_mismatch", "view", "", frags


def bmm_untransposed_keys():
    model, x = Attention(transpose_keys=False), torch.randn(2, 5, 16)
    frags = ["bmm cannot multiply (2, 5, 16) by (2, 5, 16)", "(16)", "(5)"]
    return lambda: model(x), "shape_mismatch", "bmm", "", frags


def float64_input():
    model, x = MLP(), torch.randn(8, 20, dtype=torch.float64)
    frags = ["float64", "Linear 'fc1'", "float32"]
    return lambda: model(x), "dtype_mismatch", "mlp_fc1", "fc1", frags


def long_input():
    model, x = MLP(), torch.randint(0, 5, (8, 20))
    frags = ["Linear 'fc1'", "int64", "floating-point"]
    return lambda: model(x), "dtype_mismatch", "mlp_fc1", "fc1", frags


def float_class_targets():
    logits, target = torch.randn(8, 10), torch.randint(0, 10, (8,)).float()

    def run() -> None:
        F.cross_entropy(logits, target)  # zoo: float_targets

    frags = ["cross_entropy", "float32 target (8,)", "int64"]
    return run, "dtype_mismatch", "float_targets", None, frags


def device_mismatch():
    model, x = MLP(), torch.randn(8, 20, device="meta")
    frags = ["Linear 'fc1'", "input on meta", "weight on cpu"]
    return lambda: model(x), "device_mismatch", "mlp_fc1", "fc1", frags


FAILING = [
    mlp_in_features,
    cnn_flatten_size,
    cnn_channels,
    lstm_input_size,
    embedding_out_of_range,
    embedding_float_ids,
    cat_batch_mismatch,
    view_wrong_size,
    bmm_untransposed_keys,
    float64_input,
    long_input,
    float_class_targets,
    device_mismatch,
]


@pytest.mark.parametrize("case", FAILING, ids=lambda c: c.__name__)
def test_failure_names_the_mismatch(case) -> None:
    run, kind, marker, module, fragments = case()
    with (
        pytest.raises((RuntimeError, IndexError, ValueError)) as excinfo,
        nbt.shapecheck() as trace,
    ):
        run()
    failure = trace.failure
    assert failure is not None
    assert failure.error is excinfo.value  # the user's own exception, unchanged
    assert failure.finding.kind == kind
    assert failure.location == marked(marker)
    assert failure.module == module
    said = f"{failure.finding.message} {failure.finding.hint}"
    for fragment in fragments:
        assert fragment in said
    assert failure.finding.where.startswith(failure.location)
    assert failure.finding.hint
    assert any("shapecheck:" in note for note in excinfo.value.__notes__)


# In a meta trace torch's own messages lose the shapes; the finding must not.
@pytest.mark.parametrize("case", [mlp_in_features, cnn_flatten_size, cnn_channels, lstm_input_size])
def test_meta_failure_speaks_in_user_terms(case) -> None:
    run, kind, marker, module, fragments = case()
    with pytest.raises((RuntimeError, IndexError, ValueError)), nbt.shapecheck(meta=True) as trace:
        run()
    assert trace.failure.finding.kind == kind
    assert trace.failure.location == marked(marker)
    assert trace.failure.module == module
    said = f"{trace.failure.finding.message} {trace.failure.finding.hint}"
    for fragment in fragments:
        assert fragment in said
    assert all(t.device.type == "meta" for t in trace.failure.operands.values())


# --- non-finite values ----------------------------------------------------------------------


def nonfinite_findings(run) -> list[nbt.Finding]:
    with nbt.shapecheck() as trace:
        run()
    assert trace.failure is None
    return [f for f in trace.findings if f.kind == "nonfinite"]


def test_nan_from_log_of_negative_names_the_module() -> None:
    model, x = WithFeatures(LogFeatures()), torch.randn(8, 4) - 3.0
    found = nonfinite_findings(lambda: F.mse_loss(model(x), torch.zeros(8, 2)))
    assert len(found) == 1
    assert found[0].where == f"{marked('nan_log')} features"
    assert "NaN first produced by log" in found[0].message


def test_nan_from_zero_over_zero() -> None:
    model, x = WithFeatures(Standardize()), torch.ones(8, 4)
    found = nonfinite_findings(lambda: model(x))
    assert len(found) == 1
    assert found[0].where == f"{marked('nan_div')} features"
    assert "0/0" in found[0].hint


def test_inf_from_exp_overflow_into_a_loss() -> None:
    logits, target = torch.full((4, 3), 200.0), torch.rand(4, 3)

    def run() -> None:
        probs = torch.exp(logits)  # zoo: exp_overflow
        F.mse_loss(probs, target)  # zoo: inf_loss

    found = nonfinite_findings(run)
    assert len(found) == 1
    assert found[0].where == marked("exp_overflow")
    assert "Inf reached the loss mse_loss" in found[0].message
    assert marked("inf_loss") in found[0].message


def test_inf_reaching_an_activation() -> None:
    x = torch.randn(4, 3)

    def run() -> None:
        big = torch.exp(x * 1000)  # zoo: exp_activation
        torch.relu(big)

    found = nonfinite_findings(run)
    assert len(found) == 1
    assert found[0].where == marked("exp_activation")
    assert "Inf reached the activation relu" in found[0].message


def test_fully_masked_row_is_a_nan() -> None:
    scores = torch.randn(2, 4)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1] = True

    def run() -> None:
        masked = scores.masked_fill(mask, float("-inf"))
        masked.softmax(dim=-1)

    found = nonfinite_findings(run)
    assert len(found) == 1
    assert "mask" in found[0].message


# --- clean controls: no alarms ----------------------------------------------------------------


def small_transformer_with_padding() -> None:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x = torch.randn(3, 6, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    padding[2, 2:] = True
    out = encoder(x, src_key_padding_mask=padding)
    F.mse_loss(out.mean(dim=1), torch.zeros(3, 16))


def causal_attention() -> None:
    model = Attention(causal=True)
    out = model(torch.randn(2, 5, 16))
    out.sum().backward()


def causal_multihead_attention() -> None:
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    mha(x, x, x, attn_mask=mask)


def mlp_training_step() -> None:
    model = MLP()
    x, y = torch.randn(16, 20), torch.randint(0, 10, (16,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()


def cnn_forward() -> None:
    LeNet(flat=16 * 4 * 4)(torch.randn(4, 1, 28, 28))


def lstm_tagger() -> None:
    model = Tagger()
    logits = model(torch.randint(0, 100, (4, 7)))
    F.cross_entropy(logits.reshape(-1, 5), torch.randint(0, 5, (28,)))


CLEAN = [
    mlp_training_step,
    cnn_forward,
    lstm_tagger,
    small_transformer_with_padding,
    causal_attention,
    causal_multihead_attention,
]


@pytest.mark.parametrize("run", CLEAN, ids=lambda c: c.__name__)
def test_clean_model_raises_no_alarm(run) -> None:
    with nbt.shapecheck() as trace:
        run()
    assert trace.failure is None
    assert alarms(trace.findings) == []
    assert trace.ops and trace.modules


# --- more single-op mistakes: the finding names them whatever torch's message says -----------

_conv, _gray_conv = nn.Conv2d(3, 8, 3), nn.Conv2d(1, 8, 3)
OP_MISTAKES = {
    "channels_last": (lambda: _conv(torch.randn(4, 28, 28, 3)), "x.permute(0, 3, 1, 2)"),
    "no_channel_dim": (lambda: _gray_conv(torch.randn(32, 28, 28)), "x.unsqueeze(1)"),
    "kernel_too_big": (lambda: nn.Conv2d(3, 8, 5)(torch.randn(1, 3, 3, 3)), "kernel (5, 5)"),
    "target_extra_dim": (
        lambda: F.cross_entropy(torch.randn(8, 5), torch.randint(0, 5, (8, 1))),
        "target.squeeze(1)",
    ),
    "class_out_of_range": (
        lambda: F.cross_entropy(torch.randn(8, 5), torch.full((8,), 7)),
        "target class 7 but input (8, 5) has 5 classes",
    ),
    "matmul_operator": (
        lambda: torch.randn(2, 5, 16) @ torch.randn(2, 5, 16),
        "cannot multiply (2, 5, 16) by (2, 5, 16)",
    ),
    "stack": (
        lambda: torch.stack([torch.randn(3, 4), torch.randn(3, 5)]),
        "tensors[0] is (3, 4) and tensors[1] is (3, 5)",
    ),
    "attention_embed_dim": (
        lambda: nn.MultiheadAttention(16, 4)(*[torch.randn(5, 2, 12)] * 3),
        "MultiheadAttention expects embed_dim=16 but got query (5, 2, 12)",
    ),
    "batchnorm_features": (
        lambda: nn.BatchNorm1d(10)(torch.randn(4, 12)),
        "BatchNorm1d has num_features=10 but got input (4, 12)",
    ),
    "layernorm_shape": (
        lambda: nn.LayerNorm(10)(torch.randn(4, 12)),
        "LayerNorm normalizes the last dims (10,) but got input (4, 12)",
    ),
    "broadcast": (lambda: torch.randn(4, 3) + torch.randn(4, 5), "sizes 3 and 5 differ"),
    "gru_batch_first": (
        lambda: nn.GRU(10, 5, batch_first=True)(torch.randn(2, 10, 7)),
        "GRU expects input_size=10",
    ),
    "expand": (lambda: torch.randn(3, 4).expand(5, 5), "only size-1 dims can be expanded"),
    "bce_target_shape": (
        lambda: F.binary_cross_entropy(torch.rand(8, 1), torch.rand(8)),
        "input (8, 1) and target (8,)",
    ),
    "view_after_transpose": (lambda: torch.randn(4, 6).t().view(24), "not contiguous"),
}


@pytest.mark.parametrize("name", OP_MISTAKES)
def test_single_op_mistakes_are_explained(name: str) -> None:
    run, fragment = OP_MISTAKES[name]
    errors = (RuntimeError, ValueError, IndexError, AssertionError)
    with pytest.raises(errors), nbt.shapecheck() as trace:
        run()
    finding = trace.failure.finding
    assert finding.kind == "shape_mismatch"
    assert fragment in f"{finding.message} {finding.hint}"
    assert trace.failure.location.startswith(f"{__file__}:")
    assert "failed on" not in finding.message  # a specific rule explained it, not the fallback

"""Bugs as users write them: each failure must name the user's line, the module and the cause.

Each failing line carries ``# case: <name>``; the failure must point at that line (never inside
torch or an installed library), name the module that ran the failing op, and say what is wrong
in the layer's own terms. Errors that are not about shapes, dtypes or devices must propagate
unchanged and get no shape diagnosis.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

import nbtrouble as nbt

_SOURCE = Path(__file__).read_text().splitlines()


def marked(case: str) -> str:
    """``"file:line"`` of the line carrying ``# case: <name>`` in this file."""
    tag = f"# case: {case}"
    lines = [i for i, text in enumerate(_SOURCE, start=1) if text.rstrip().endswith(tag)]
    assert len(lines) == 1, f"marker {tag!r} must appear exactly once"
    return f"{__file__}:{lines[0]}"


def traced_failure(run, meta: bool = False) -> tuple[nbt.shapes.Failure, BaseException]:
    with pytest.raises(Exception) as raised, nbt.shapecheck(meta=meta) as trace:
        run()
    assert trace.failure is not None
    assert trace.failure.error is raised.value  # the user's own exception object
    return trace.failure, raised.value


def said(failure) -> str:
    return f"{failure.finding.message} {failure.finding.hint}"


# --- models as users write them ----------------------------------------------------------


class TextCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(1000, 64)
        self.conv = nn.Conv1d(64, 128, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)  # (N, L, 64): the channels are last
        return self.conv(x).amax(dim=-1)  # case: conv1d_nlc


class SeqNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))  # case: batchnorm_nlc


class Encoder(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(10, 20, batch_first=True)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x, state)  # case: rnn_state
        return out


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + x)  # case: residual


class TinyUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.out = nn.Conv2d(16, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down(x)
        up = self.up(F.max_pool2d(skip, 2))
        return self.out(torch.cat([up, skip], dim=1))  # case: unet_skip


class Checked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 3, f"expected (B, T, D), got {tuple(x.shape)}"  # case: user_assert
        return self.fc(x)


class BadBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        return grad @ w, x.t() @ grad  # case: custom_backward


# --- cases: (run, kind, marker, module path, fragments of message + hint) ------------------


def missing_flatten():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Linear(8 * 26 * 26, 10))
    x = torch.randn(4, 1, 28, 28)

    def run() -> None:
        model(x)  # case: missing_flatten

    frags = ["Linear '2'", "in_features=5408", "(4, 8, 26, 26)", "torch.flatten(x, 1)"]
    return run, "shape_mismatch", "missing_flatten", "2", frags


def conv1d_channels_last():
    model, ids = TextCNN(), torch.randint(0, 1000, (8, 50))
    frags = ["Conv1d 'conv'", "in_channels=64", "(8, 50, 64)", "x.transpose(1, 2)"]
    return lambda: model(ids), "shape_mismatch", "conv1d_nlc", "conv", frags


def batchnorm_channels_last():
    model, x = SeqNorm(), torch.randn(4, 30, 8)
    frags = ["BatchNorm1d 'norm'", "num_features=16", "(4, 30, 16)", "nn.LayerNorm"]
    return lambda: model(x), "shape_mismatch", "batchnorm_nlc", "norm", frags


def lstm_state_not_a_tuple():
    model, x, h0 = Encoder(nn.LSTM), torch.randn(4, 7, 10), torch.zeros(1, 4, 20)
    frags = ["LSTM 'rnn'", "tuple (h0, c0)", "(1, 4, 20)"]
    return lambda: model(x, h0), "shape_mismatch", "rnn_state", "rnn", frags


def gru_state_batch_first():
    model, x, h0 = Encoder(nn.GRU), torch.randn(4, 7, 10), torch.zeros(4, 1, 20)
    frags = ["GRU 'rnn'", "h0 of shape (1, 4, 20)", "(4, 1, 20)", "h0.transpose(0, 1)"]
    return lambda: model(x, h0), "shape_mismatch", "rnn_state", "rnn", frags


def padding_mask_as_attn_mask():
    mha, x = nn.MultiheadAttention(32, 4, batch_first=True), torch.randn(2, 10, 32)
    padding = torch.zeros(2, 10, dtype=torch.bool)

    def run() -> None:
        mha(x, x, x, attn_mask=padding)  # case: attn_mask

    frags = ["attn_mask of shape (10, 10)", "got (2, 10)", "key_padding_mask="]
    return run, "shape_mismatch", "attn_mask", "", frags


def causal_mask_wrong_length():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x, mask = torch.randn(2, 10, 32), nn.Transformer.generate_square_subsequent_mask(8)

    def run() -> None:
        encoder(x, mask=mask)  # case: causal_mask

    frags = ["MultiheadAttention 'layers.0.self_attn'", "(8, 8)", "generate_square_subsequent_mask"]
    return run, "shape_mismatch", "causal_mask", "layers.0.self_attn", frags


def tagger_loss_classes_last():
    logits, tags = torch.randn(4, 20, 7), torch.randint(0, 7, (4, 20))

    def run() -> None:
        F.cross_entropy(logits, tags)  # case: classes_last

    frags = ["target of shape (4, 7)", "(4, 20, 7)", "logits.reshape(-1, 7)"]
    return run, "shape_mismatch", "classes_last", None, frags


def einsum_letters():
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 4, 10, 8)

    def run() -> None:
        torch.einsum("bhqd,bhkd->bhqk", q, k)  # case: einsum

    frags = ["subscript d is 16 in operand 0 (2, 4, 10, 16) but 8 in operand 1"]
    return run, "shape_mismatch", "einsum", None, frags


def weight_not_transposed():
    weight, x = torch.randn(64, 128), torch.randn(32, 128)

    def run() -> None:
        x @ weight  # case: weight_transposed

    frags = ["cannot multiply (32, 128) by (64, 128)", "looks transposed"]
    return run, "shape_mismatch", "weight_transposed", None, frags


def residual_channels():
    model, x = Block(16, 32), torch.randn(2, 16, 8, 8)
    frags = ["(2, 32, 8, 8) with (2, 16, 8, 8)", "differ in dim 1", "1x1 conv"]
    return lambda: model(x), "shape_mismatch", "residual", "", frags


def unet_odd_size():
    model, x = TinyUNet(), torch.randn(1, 3, 33, 33)
    frags = ["(1, 8, 32, 32)", "(1, 8, 33, 33)", "dim 2 (32 vs 33)", "U-Net"]
    return lambda: model(x), "shape_mismatch", "unet_skip", "", frags


def non_scalar_loss():
    model, x = nn.Linear(4, 2), torch.randn(3, 4)

    def run() -> None:
        loss = F.mse_loss(model(x), torch.zeros(3, 2), reduction="none")
        loss.backward()  # case: backward

    frags = ["scalar loss", "(3, 2)", "loss.mean()"]
    return run, "shape_mismatch", "backward", None, frags


def pooled_too_far():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), *[nn.MaxPool2d(2) for _ in range(3)])
    x = torch.randn(1, 1, 8, 8)

    def run() -> None:
        model(x)  # case: pool

    frags = ["MaxPool2d '3'", "kernel (2, 2)", "(1, 4, 1, 1)"]
    return run, "shape_mismatch", "pool", "3", frags


FAILING = [
    missing_flatten,
    conv1d_channels_last,
    batchnorm_channels_last,
    lstm_state_not_a_tuple,
    gru_state_batch_first,
    padding_mask_as_attn_mask,
    causal_mask_wrong_length,
    tagger_loss_classes_last,
    einsum_letters,
    weight_not_transposed,
    residual_channels,
    unet_odd_size,
    non_scalar_loss,
    pooled_too_far,
]


@pytest.mark.parametrize("case", FAILING, ids=lambda c: c.__name__)
def test_realistic_bug_is_named_at_the_users_line(case) -> None:
    run, kind, marker, module, fragments = case()
    failure, _ = traced_failure(run)
    assert failure.finding.kind == kind
    assert failure.location == marked(marker)
    assert failure.module == module
    for fragment in fragments:
        assert fragment in said(failure)
    assert failure.finding.where.startswith(marked(marker))


@pytest.mark.parametrize("case", [conv1d_channels_last, lstm_state_not_a_tuple])
def test_meta_trace_explains_the_same_bug(case) -> None:
    run, kind, marker, module, fragments = case()
    failure, _ = traced_failure(run, meta=True)
    assert (failure.finding.kind, failure.location, failure.module) == (
        kind,
        marked(marker),
        module,
    )
    for fragment in fragments:
        assert fragment in said(failure)
    assert all(t.device.type == "meta" for t in failure.operands.values())


def test_attention_mask_mistake_is_not_called_a_broadcast() -> None:
    run, *_ = padding_mask_as_attn_mask()
    failure, _ = traced_failure(run)
    assert "broadcast" not in failure.finding.message


# --- errors that are not about shapes ----------------------------------------------------


def test_users_own_assert_propagates_without_a_shape_diagnosis() -> None:
    model, x = Checked(), torch.randn(4, 8)
    failure, raised = traced_failure(lambda: model(x))
    assert isinstance(raised, AssertionError)
    assert not getattr(raised, "__notes__", [])  # the user's error is left exactly as raised
    assert failure.finding.kind == "op_error"
    assert failure.location == marked("user_assert")
    assert "expected (B, T, D), got (4, 8)" in failure.finding.message
    assert "x (4, 8) float32" in failure.finding.message
    assert "shape" not in failure.finding.hint


def test_error_in_a_custom_backward_points_into_it() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 3, requires_grad=True)
    failure, _ = traced_failure(lambda: BadBackward.apply(x, w).sum().backward())
    assert failure.location == marked("custom_backward")
    assert failure.finding.kind == "op_error"
    assert "mat1 and mat2 shapes cannot be multiplied" in failure.finding.message


def test_numpy_batch_is_named_as_not_a_tensor() -> None:
    np = pytest.importorskip("numpy")
    model, batch = nn.Sequential(nn.Linear(4, 2)), np.ones((3, 4))

    def run() -> None:
        model(batch)  # case: numpy

    failure, raised = traced_failure(run)
    assert isinstance(raised, TypeError)
    assert (failure.finding.kind, failure.location, failure.module) == (
        "bad_input",
        marked("numpy"),
        "0",
    )
    assert "Linear '0' got a numpy.ndarray (3, 4) float64 as input" in failure.finding.message
    assert "torch.from_numpy(x).float()" in failure.finding.hint


def test_error_with_a_broken_message_still_reaches_the_user() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no message")

    class Raiser(nn.Module):
        def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
            raise Unprintable

    model = Raiser()
    failure, raised = traced_failure(lambda: model(torch.randn(2), mask=torch.ones(3)))
    assert isinstance(raised, Unprintable)
    assert failure.finding.kind == "op_error"
    assert "x (2,) float32" in failure.finding.message


def test_keyboard_interrupt_mid_forward_leaves_no_trace_behind() -> None:
    class Interrupted(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise KeyboardInterrupt

    hooks = (len(module_globals._global_forward_hooks), torch._C._len_torch_function_stack())
    with pytest.raises(KeyboardInterrupt), nbt.shapecheck() as trace:
        Interrupted()(torch.randn(2))
    assert trace.failure is None
    assert (
        len(module_globals._global_forward_hooks),
        torch._C._len_torch_function_stack(),
    ) == hooks


# --- an installed library's model: the user's line, with the library's line as context -----


def test_library_model_failure_is_located_at_the_users_call() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = transformers.BertModel(config)
    ids = torch.randint(0, 100, (2, 10)).float()
    with pytest.raises(RuntimeError), nbt.shapecheck() as trace:
        model(input_ids=ids)  # case: library
    failure = trace.failure
    assert failure.location == marked("library")
    assert failure.module == "embeddings.word_embeddings"
    assert failure.finding.kind == "dtype_mismatch"
    assert "(in transformers/models/bert/" in failure.finding.message
    assert "float32 input (2, 10)" in failure.finding.message

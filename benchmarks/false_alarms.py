"""False alarms and detection rate of the silent-broadcast check.

Builds real transformer architectures from ``transformers`` configs at tiny sizes (no download),
and a few models written here by hand, runs a forward pass with a loss and its backward pass
under ``nbt.shapecheck()`` and counts the alarms each one raises: a correct model must raise
none. Each model runs twice: as it is, and with the library's lines judged as if they were the
user's own (nothing trusted for coming from an installed library). Then runs a list of classic
broadcasting bugs and counts how many are reported, once, at the right line.

Run::

    python benchmarks/false_alarms.py            # every model, eager and SDPA attention
    python benchmarks/false_alarms.py --quick    # a few models, default attention
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import nbtrouble as nbt
from nbtrouble import _location, shapes
from nbtrouble._broadcast import BroadcastAnalyzer
from nbtrouble.findings import Finding, alarms
from nbtrouble.shapes import default_analyzers

Batch = dict[str, Any]
ModelCase = Callable[[int, int], tuple[nn.Module, Batch]]

VOCAB = 97
_TINY: dict[str, Any] = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "vocab_size": VOCAB,
}


def _config(config_class: Any, **options: Any) -> Any:
    """A config with only the options given changed: every size tiny."""
    return config_class(**options)


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq))


def _padded_mask(batch: int, seq: int) -> torch.Tensor:
    """A padding mask whose last row is shorter, so that masking code paths really run."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0
    return mask


def _bert(b: int, t: int) -> tuple[nn.Module, Batch]:
    from transformers import BertConfig, BertForSequenceClassification

    config = _config(BertConfig, num_hidden_layers=2, num_labels=3, **_TINY)
    batch = {
        "input_ids": _ids(b, t),
        "attention_mask": _padded_mask(b, t),
        "labels": torch.arange(b) % 3,
    }
    return BertForSequenceClassification(config), batch


def _bert_regression(b: int, t: int) -> tuple[nn.Module, Batch]:
    """One output per example and float labels: the model's own MSE must not warn."""
    from transformers import BertConfig, BertForSequenceClassification

    config = _config(BertConfig, num_hidden_layers=1, num_labels=1, **_TINY)
    batch = {
        "input_ids": _ids(b, t),
        "attention_mask": _padded_mask(b, t),
        "labels": torch.randn(b),
    }
    return BertForSequenceClassification(config), batch


def _distilbert(b: int, t: int) -> tuple[nn.Module, Batch]:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = _config(
        DistilBertConfig,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=37,
        vocab_size=VOCAB,
        num_labels=2,
    )
    batch = {
        "input_ids": _ids(b, t),
        "attention_mask": _padded_mask(b, t),
        "labels": torch.arange(b) % 2,
    }
    return DistilBertForSequenceClassification(config), batch


def _gpt2(b: int, t: int) -> tuple[nn.Module, Batch]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = _config(GPT2Config, n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    ids = _ids(b, t)
    return GPT2LMHeadModel(config), {
        "input_ids": ids,
        "attention_mask": _padded_mask(b, t),
        "labels": ids,
    }


def _decoder(config_name: str, model_name: str, **extra: Any) -> ModelCase:
    """A Llama-style decoder with rotary position tables (Llama, Mistral, Qwen2, Gemma...)."""

    def build(b: int, t: int) -> tuple[nn.Module, Batch]:
        import transformers

        config = getattr(transformers, config_name)(
            num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=64, **_TINY, **extra
        )
        ids = _ids(b, t)
        batch = {"input_ids": ids, "attention_mask": _padded_mask(b, t), "labels": ids}
        return getattr(transformers, model_name)(config), batch

    return build


def _text_model(config_name: str, model_name: str, **extra: Any) -> ModelCase:
    """Any text model of ``transformers`` that takes ids, a padding mask and labels."""

    def build(b: int, t: int) -> tuple[nn.Module, Batch]:
        import transformers

        config = getattr(transformers, config_name)(num_hidden_layers=2, **_TINY, **extra)
        config.pad_token_id = 0
        ids = _ids(b, t)
        labels = ids if model_name.endswith(("CausalLM", "MaskedLM")) else torch.arange(b) % 2
        batch = {"input_ids": ids, "attention_mask": _padded_mask(b, t), "labels": labels}
        return getattr(transformers, model_name)(config), batch

    return build


def _t5(b: int, t: int) -> tuple[nn.Module, Batch]:
    from transformers import T5Config, T5ForConditionalGeneration

    config = _config(
        T5Config,
        d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=VOCAB,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    batch = {
        "input_ids": _ids(b, t),
        "attention_mask": _padded_mask(b, t),
        "labels": _ids(b, t - 2),
    }
    return T5ForConditionalGeneration(config), batch


def _bart(b: int, t: int) -> tuple[nn.Module, Batch]:
    from transformers import BartConfig, BartForConditionalGeneration

    config = _config(
        BartConfig,
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=VOCAB,
        max_position_embeddings=64,
    )  # fmt: skip
    batch = {
        "input_ids": _ids(b, t),
        "attention_mask": _padded_mask(b, t),
        "labels": _ids(b, t - 2),
    }
    return BartForConditionalGeneration(config), batch


def _vit(b: int, t: int) -> tuple[nn.Module, Batch]:
    from transformers import ViTConfig, ViTForImageClassification

    config = _config(
        ViTConfig,
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=16, patch_size=4, num_labels=3,
    )  # fmt: skip
    batch = {"pixel_values": torch.randn(b, 3, 16, 16), "labels": torch.arange(b) % 3}
    return ViTForImageClassification(config), batch


def _whisper(b: int, t: int) -> tuple[nn.Module, Batch]:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = _config(
        WhisperConfig,
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=VOCAB,
        num_mel_bins=8, max_source_positions=8, max_target_positions=16,
        decoder_start_token_id=1, pad_token_id=0,
    )  # fmt: skip
    batch = {"input_features": torch.randn(b, 8, 16), "labels": _ids(b, t - 2)}
    return WhisperForConditionalGeneration(config), batch


# -- models written here, by hand: their lines count as the user's own --------------------------


class _HandAttention(nn.Module):
    """Multi-head self-attention with rotary positions and padding + causal masks, by hand."""

    inv_freq: torch.Tensor

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        self.register_buffer("inv_freq", inv_freq)

    def rotary(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.shape[-2]
        angles = torch.arange(seq, dtype=torch.float32).unsqueeze(1) * self.inv_freq
        table = torch.cat([angles, angles], dim=-1)
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * table.cos() + rotated * table.sin()

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rotary(q), self.rotary(k)
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5
        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
        allowed = causal & padding.view(batch, 1, 1, seq)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ v
        return self.out(out.transpose(1, 2).reshape(batch, seq, dim))


class _HandGPT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(_HandAttention(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, VOCAB)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        padding = torch.arange(ids.shape[1]) < lengths.unsqueeze(1)
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x, padding)
        logits = self.head(self.norm(x))
        token_loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
        mask = padding.float().flatten()
        return (token_loss * mask).sum() / mask.sum()


class _Output:
    """What a hand-written model returns: its loss, like a library's model output."""

    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss


class _Wrapped(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> _Output:
        return _Output(self.model(**inputs))


def _hand_gpt(b: int, t: int) -> tuple[nn.Module, Batch]:
    lengths = torch.full((b,), t)
    lengths[-1] = max(1, t // 2)
    return _Wrapped(_HandGPT()), {"ids": _ids(b, t), "lengths": lengths}


class _Heatmaps(nn.Module):
    """Keypoint heatmaps against Gaussian targets drawn on a square grid by broadcasting."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))

    def forward(self, images: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        grid = torch.arange(self.size, dtype=torch.float32)
        targets = []
        for cx, cy in centers.tolist():
            squared = (grid - cx) ** 2 + (grid.view(-1, 1) - cy) ** 2
            target = torch.exp(-squared / 8.0)
            targets.append(target / target.sum())
        predicted = self.net(images).squeeze(1)
        return F.mse_loss(predicted, torch.stack(targets))


def _heatmaps(b: int, t: int) -> tuple[nn.Module, Batch]:
    inputs = {"images": torch.randn(b, 1, t, t), "centers": torch.rand(b, 2) * t}
    return _Wrapped(_Heatmaps(t)), inputs


class _Recommender(nn.Module):
    """Matrix factorization with user and item biases, and in-batch negatives."""

    def __init__(self, users: int = 50, items: int = 60, dim: int = 8) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(users, dim), nn.Embedding(items, dim)
        self.user_bias, self.item_bias = nn.Embedding(users, 1), nn.Embedding(items, 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        # Every user of the batch against every item of the batch: (B, 1) + (B,) on purpose.
        biases = self.user_bias(users) + self.item_bias(items).squeeze(1)
        scores = biases + self.user(users) @ self.item(items).T
        return F.cross_entropy(scores, torch.arange(len(users)))


def _recommender(b: int, t: int) -> tuple[nn.Module, Batch]:
    inputs = {"users": torch.randint(0, 50, (b,)), "items": torch.randint(0, 60, (b,))}
    return _Wrapped(_Recommender()), inputs


def _supcon(b: int, t: int) -> tuple[nn.Module, Batch]:
    """A supervised contrastive loss: positives are pairs of examples with the same label."""

    class SupCon(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(t, 16)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            z = F.normalize(self.encoder(x), dim=1)
            logits = z @ z.T / 0.1
            labels = labels.contiguous().view(-1, 1)
            positives = torch.eq(labels, labels.T).float()
            not_self = 1 - torch.eye(len(z))
            positives = positives * not_self
            log_prob = logits - torch.logsumexp(logits.masked_fill(not_self == 0, -1e9), 1, True)
            return -((positives * log_prob).sum(1) / positives.sum(1).clamp_min(1)).mean()

    return _Wrapped(SupCon()), {"x": torch.randn(b, t), "labels": torch.arange(b) % 3}


MODELS: dict[str, ModelCase] = {
    "bert": _bert,
    "bert-regression": _bert_regression,
    "distilbert": _distilbert,
    "gpt2": _gpt2,
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM", sliding_window=4),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM"),
    "gemma": _decoder("GemmaConfig", "GemmaForCausalLM", head_dim=8),
    "t5": _t5,
    "bart": _bart,
    "vit": _vit,
    "whisper": _whisper,
    "roberta": _text_model("RobertaConfig", "RobertaForMaskedLM"),
    "deberta-v2": _text_model(
        "DebertaV2Config",
        "DebertaV2ForSequenceClassification",
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        max_relative_positions=16,
        position_buckets=8,
    ),
    "xlnet": _text_model(
        "XLNetConfig", "XLNetForSequenceClassification", d_model=32, n_layer=2, n_head=4, d_inner=37
    ),
    "mpnet": _text_model("MPNetConfig", "MPNetForSequenceClassification"),
    "bloom (alibi)": _text_model("BloomConfig", "BloomForCausalLM", n_layer=2, n_head=4),
    "falcon (alibi)": _text_model(
        "FalconConfig", "FalconForCausalLM", alibi=True, new_decoder_architecture=False
    ),
    "gemma2": _decoder(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        head_dim=8,
        sliding_window=4,
        attn_logit_softcapping=None,
    ),
    "qwen2-moe": _decoder(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    "mamba": _text_model("MambaConfig", "MambaForCausalLM", state_size=4, expand=2),
    "own: hand GPT": _hand_gpt,
    "own: heatmaps": _heatmaps,
    "own: recommender": _recommender,
    "own: supcon": _supcon,
}
QUICK = ("bert", "gpt2", "llama", "t5")


def model_alarms(
    case: ModelCase, batch: int, seq: int, attention: str | None = None, as_user_code: bool = False
) -> tuple[list[Finding], Counter[str]]:
    """The alarms of a forward pass with a loss and its backward pass, under ``shapecheck``.

    Also returns how the silent-broadcast check judged each mutual broadcast it saw. With
    ``as_user_code`` the library's own lines count as the user's: nothing is trusted for
    coming from an installed library, as when someone copies a model's code into a notebook.
    """
    torch.manual_seed(0)
    model, inputs = case(batch, seq)
    if attention is not None:
        for sub in model.modules():
            config = getattr(sub, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = attention
    analyzers: list[Any] = []

    def keep_analyzers() -> list[Any]:
        analyzers[:] = default_analyzers()
        return analyzers

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(shapes, "default_analyzers", keep_analyzers))
        if as_user_code:
            for name in ("is_user_code", "is_user_file"):
                if hasattr(_location, name):
                    stack.enter_context(mock.patch.object(_location, name, lambda _: True))
        with nbt.shapecheck() as trace:
            output = model(**inputs)
            output.loss.backward()
    judged = next(a.judged for a in analyzers if isinstance(a, BroadcastAnalyzer))
    return alarms(trace.findings), judged


# -- the classic bugs: each function's line marked `# BUG` must be reported -------------------

N = 16


def _regressor() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return nn.Linear(4, 1), torch.randn(N, 4), torch.randn(N)


def bug_hand_mse() -> None:
    model, x, y = _regressor()
    out = model(x)
    ((out - y) ** 2).mean()  # BUG


def bug_hand_mae() -> None:
    model, x, y = _regressor()
    pred = model(x)
    torch.abs(pred - y).mean()  # BUG


def bug_rmse_sqrt() -> None:
    model, x, y = _regressor()
    pred = model(x)
    (pred - y).pow(2).mean().sqrt()  # BUG


def bug_accuracy_keepdim() -> None:
    logits, labels = torch.randn(N, 5), torch.randint(0, 5, (N,))
    pred = logits.argmax(dim=1, keepdim=True)
    (pred == labels).float().mean()  # BUG


def bug_accuracy_unsqueezed_target() -> None:
    logits, labels = torch.randn(N, 5), torch.randint(0, 5, (N,))
    (logits.argmax(1) == labels.unsqueeze(1)).sum().item()  # BUG


def bug_binary_accuracy() -> None:
    model, x, _ = _regressor()
    y = torch.randint(0, 2, (N,))
    ((torch.sigmoid(model(x)) > 0.5) == y).float().mean()  # BUG


def bug_mse_loss_module() -> None:
    model, x, y = _regressor()
    nn.MSELoss()(model(x), y)  # BUG


def bug_l1_loss() -> None:
    model, x, y = _regressor()
    F.l1_loss(model(x), y)  # BUG


def bug_smooth_l1_loss() -> None:
    model, x, y = _regressor()
    nn.SmoothL1Loss()(model(x), y)  # BUG


def bug_weighted_mse() -> None:
    model, x, y = _regressor()
    weights = torch.rand(N)
    (weights * (model(x) - y) ** 2).sum() / weights.sum()  # BUG


def bug_training_loop() -> None:
    model, x, y = _regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()  # BUG
        loss.backward()
        optimizer.step()


def bug_huber_by_hand() -> None:
    model, x, y = _regressor()
    diff = model(x) - y  # BUG
    torch.where(diff.abs() < 1, 0.5 * diff**2, diff.abs() - 0.5).mean()


def bug_cross_entropy_by_hand() -> None:
    logits, labels = torch.randn(N, 5), torch.randint(0, 5, (N,))
    picked = logits.gather(1, labels[:, None])
    (torch.logsumexp(logits, dim=1) - picked).mean()  # BUG


def bug_biases_not_squeezed() -> None:
    users, items = nn.Embedding(50, 8), nn.Embedding(60, 8)
    user_bias, item_bias = nn.Embedding(50, 1), nn.Embedding(60, 1)
    u, i, ratings = torch.randint(0, 50, (N,)), torch.randint(0, 60, (N,)), torch.rand(N) * 5
    dots = (users(u) * items(i)).sum(1)
    predicted = dots + user_bias(u) + item_bias(i).squeeze(1)  # BUG
    F.mse_loss(predicted, ratings)


def bug_per_sample_loss() -> None:
    model, x, y = _regressor()
    per_sample = ((model(x) - y) ** 2).mean(dim=1)  # BUG
    per_sample.mean()


def bug_segmentation_l1() -> None:
    masks, targets = torch.randn(4, 1, 8, 8), torch.rand(4, 8, 8)
    (torch.sigmoid(masks) - targets).abs().mean()  # BUG


BUGS: list[Callable[[], None]] = [
    bug_hand_mse, bug_hand_mae, bug_rmse_sqrt, bug_accuracy_keepdim,
    bug_accuracy_unsqueezed_target, bug_binary_accuracy, bug_mse_loss_module, bug_l1_loss,
    bug_smooth_l1_loss, bug_weighted_mse, bug_training_loop, bug_huber_by_hand,
    bug_cross_entropy_by_hand, bug_biases_not_squeezed, bug_per_sample_loss, bug_segmentation_l1,
]  # fmt: skip


def bug_line(bug: Callable[[], None]) -> str:
    """``"file:line"`` of the line marked ``# BUG`` in a bug function."""
    lines, first = inspect.getsourcelines(bug)
    offset = next(i for i, line in enumerate(lines) if line.rstrip().endswith("# BUG"))
    return f"{inspect.getsourcefile(bug)}:{first + offset}"


def bug_caught(bug: Callable[[], None]) -> bool:
    """Whether the bug is reported once, as a silent broadcast at its own line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own size warning for mse_loss / l1_loss
        with nbt.shapecheck() as trace:
            bug()
    expected = bug_line(bug)
    reported = [f for f in trace.findings if f.kind == "silent_broadcast"]
    return len(reported) == 1 and (reported[0].where or "").split(" ")[0] == expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few models, default attention")
    options = parser.parse_args()
    torch.set_num_threads(1)
    names = QUICK if options.quick else tuple(MODELS)
    library_attentions: tuple[str | None, ...] = (None,) if options.quick else ("eager", "sdpa")
    # Batch 2, sequence 7; then batch == sequence, where masks of equal lengths meet by chance.
    sizes = ((2, 7), (8, 8))
    header = f"{'model':16s} {'attention':9s} {'B,T':5s} {'alarms':>6s} {'as user':>7s}"
    print(f"{header}  mutual broadcasts seen, as user code: how each was judged")
    totals = Counter[str]()
    for name in names:
        attentions = (None,) if name.startswith("own:") else library_attentions
        for attention in attentions:
            for batch, seq in sizes:
                found, _ = model_alarms(MODELS[name], batch, seq, attention)
                found_user, judged = model_alarms(
                    MODELS[name], batch, seq, attention, as_user_code=True
                )
                totals["alarms"] += len(found)
                totals["as user"] += len(found_user)
                totals["runs"] += 1
                totals["mutual"] += sum(judged.values())
                print(f"{name:16s} {attention or 'default':9s} {f'{batch},{seq}':5s} "
                      f"{len(found):6d} {len(found_user):7d}  {dict(judged)}")  # fmt: skip
                for finding in found + found_user:
                    print(f"    {finding.kind}: {finding.message[:160]} at {finding.where}")
    print(f"false alarms: {totals['alarms']} in {totals['runs']} runs "
          f"({totals['as user']} with library code judged as the user's own)")  # fmt: skip
    print(f"mutual broadcasts seen, each of which a rule on sizes alone would flag: "
          f"{totals['mutual']}")  # fmt: skip
    caught = [bug for bug in BUGS if bug_caught(bug)]
    for bug in BUGS:
        print(f"{'caught' if bug in caught else 'MISSED':7s} {bug.__name__}")
    print(f"classic bugs caught: {len(caught)}/{len(BUGS)} ({100 * len(caught) / len(BUGS):.0f}%)")


if __name__ == "__main__":
    main()

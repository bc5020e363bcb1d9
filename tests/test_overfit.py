"""``nbt.overfit_batch``: a bug zoo (one case per finding kind and verdict) and clean controls.

Every case also checks the promise that nothing of the user's is lost: parameters (the same
objects, byte for byte), buffers, gradients, ``training`` flags, hooks, the optimizer's state
and the global random number generators are exactly as before the call.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nbtrouble as nbt
from nbtrouble.findings import alarms

torch.set_num_threads(1)


# -- the state-restoration promise ---------------------------------------------------------


def _bytes(t: torch.Tensor | None) -> Any:
    if t is None:
        return None
    t = t.detach().cpu()
    return (str(t.dtype), tuple(t.shape), t.contiguous().numpy().tobytes())


def _optimizer_state(optimizer: torch.optim.Optimizer | None) -> Any:
    if optimizer is None:
        return None
    state = optimizer.state_dict()
    tensors = {
        (k, name): _bytes(v) if isinstance(v, torch.Tensor) else v
        for k, per_param in state["state"].items()
        for name, v in per_param.items()
    }
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """Everything of the user's that ``overfit_batch`` must leave as it was."""
    return {
        "params": [
            (n, id(p), _bytes(p), _bytes(p.grad), p.requires_grad)
            for n, p in model.named_parameters()
        ],
        "buffers": [(n, id(b), _bytes(b)) for n, b in model.named_buffers()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        ],
        "global_hooks": len(torch.nn.modules.module._global_forward_hooks),
        "optimizer": _optimizer_state(optimizer),
        "torch_rng": _bytes(torch.get_rng_state()),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].tobytes(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_restored(before: Any, model: nn.Module, optimizer: Any = None) -> None:
    after = fingerprint(model, optimizer)
    for key in before:
        assert after[key] == before[key], f"{key} changed"


# -- models --------------------------------------------------------------------------------


def mlp(inputs: int = 10, outputs: int = 3, hidden: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


def classification(
    n: int = 32, features: int = 10, classes: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def regression(n: int = 64, features: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, features, generator=g)
    return x, torch.sin(x @ torch.randn(features, 1, generator=g))


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(data.target[:n])


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = 20, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.out = nn.Linear(32, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embed(tokens))
        return self.out(h[-1])


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 20, classes: int = 4, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(1, 12, width) * 0.1)
        layer = nn.TransformerEncoderLayer(width, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(self.embed(tokens) + self.position).mean(dim=1))


def sequences(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 20, (n, 12), generator=g)
    return tokens, tokens.sum(dim=1) % 4


# -- the zoo -------------------------------------------------------------------------------


@dataclass
class Case:
    model: nn.Module
    batch: Any
    loss_fn: Any = None
    kwargs: dict[str, Any] | None = None
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None


def _controls() -> dict[str, Callable[[], Case]]:
    def mlp_regression() -> Case:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
        )
        return Case(model, regression(), nn.MSELoss(), {"steps": 300, "lr": 3e-3})

    def lenet_digits() -> Case:
        torch.manual_seed(0)
        return Case(LeNet(), digits(), nn.CrossEntropyLoss(), {"steps": 200, "lr": 3e-3})

    def lstm() -> Case:
        torch.manual_seed(0)
        return Case(LSTMClassifier(), sequences(), None, {"steps": 200, "lr": 1e-2})

    def transformer() -> Case:
        torch.manual_seed(0)
        return Case(TinyTransformer(), sequences(), F.cross_entropy, {"steps": 150, "lr": 3e-3})

    return {
        "mlp_regression": mlp_regression,
        "lenet_digits": lenet_digits,
        "lstm": lstm,
        "transformer": transformer,
    }


CONTROLS = _controls()


def _run(case: Case) -> tuple[Any, Any]:
    optimizer = case.optimizer(case.model) if case.optimizer else None
    before = fingerprint(case.model, optimizer)
    report = nbt.overfit_batch(
        case.model, case.batch, case.loss_fn, optimizer=optimizer, **(case.kwargs or {})
    )
    assert_restored(before, case.model, optimizer)
    return report, optimizer


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_clean_controls_converge_without_alarms(name: str) -> None:
    report, _ = _run(CONTROLS[name]())
    assert report.verdict == "converged", repr(report)
    assert alarms(report.findings) == [], repr(report)
    assert report.losses[-1] < 0.05 * report.losses[0]


class SqrtHead(nn.Module):
    """A forward that takes the square root of values that can be negative."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.fc(x))


class FlippedCrossEntropy(nn.CrossEntropyLoss):
    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -super().forward(output, target)


class DetachedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(10, 16)
        self.unused = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)).detach())


def _dead_relu_model() -> nn.Module:
    model = mlp()
    with torch.no_grad():
        model[0].bias.fill_(-20.0)
    return model


def _saturating_tanh() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1), nn.Tanh())


def _tanh_targets() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(64, 10), torch.rand(64, 1) * 1.6 - 0.8


class MixupMLP(nn.Module):
    """Mixup on the inputs only: the labels are not mixed with them (the planted bug)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(hidden=64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            lam = torch.distributions.Beta(0.4, 0.4).sample()
            x = lam * x + (1 - lam) * x[torch.randperm(len(x))]
        return self.net(x)


def mixed_predictions(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss that mixes the predictions of shuffled samples but keeps each sample's label."""
    lam = torch.distributions.Beta(0.4, 0.4).sample()
    return F.cross_entropy(lam * output + (1 - lam) * output[torch.randperm(len(output))], target)


def _ascent(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda model: torch.optim.Adam(model.parameters(), lr=lr, maximize=True)


def _sgd(lr: float, **kw: Any) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda model: torch.optim.SGD(model.parameters(), lr=lr, **kw)


def _raw_pixels() -> Case:
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (32, 1, 8, 8), generator=g).float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    return Case(
        model, (x, torch.randint(0, 3, (32,), generator=g)), nn.CrossEntropyLoss(), {"steps": 30}
    )


def _wild_scales() -> Case:
    x, y = classification()
    x = x.clone()
    x[:, 0] *= 1e4
    x[:, 1] *= 1e-2
    return Case(mlp(), (x, y), nn.CrossEntropyLoss(), {"steps": 30})


def _softmax_into_ce() -> Case:
    model = nn.Sequential(mlp(), nn.Softmax(dim=1))
    return Case(model, classification(), nn.CrossEntropyLoss(), {"steps": 30})


def _sigmoid_into_bce_logits() -> Case:
    model = nn.Sequential(mlp(outputs=1), nn.Sigmoid())
    x, y = classification(classes=2)
    return Case(model, (x, y.float().unsqueeze(1)), nn.BCEWithLogitsLoss(), {"steps": 30})


def _eval_mode() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3)
    )
    model.eval()
    return Case(model, classification(), nn.CrossEntropyLoss(), {"steps": 30})


def _dropout_in_eval() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    model[2].eval()
    return Case(model, classification(), nn.CrossEntropyLoss(), {"steps": 30})


def _nan_inputs() -> Case:
    x, y = classification()
    x = x.clone()
    x[3, 4] = float("nan")
    return Case(mlp(), (x, y), nn.CrossEntropyLoss(), {"steps": 30})


def _broadcast_target() -> Case:
    x, y = regression()
    return Case(
        mlp(inputs=8, outputs=1), (x, y.squeeze(1)), nn.MSELoss(), {"steps": 100, "lr": 1e-2}
    )


def _duplicate_inputs_conflicting_labels() -> Case:
    x, y = classification()
    x, y = x.clone(), y.clone()
    x[5] = x[2]
    y[5] = (y[2] + 1) % 3
    return Case(mlp(), (x, y), nn.CrossEntropyLoss(), {"steps": 30})


# name -> (case, expected verdict or None, finding kinds that must be there)
ZOO: dict[str, tuple[Callable[[], Case], str | None, set[str]]] = {
    "raw_pixels": (_raw_pixels, None, {"unnormalized_input"}),
    "wild_feature_scales": (_wild_scales, None, {"unnormalized_input"}),
    "softmax_into_cross_entropy": (_softmax_into_ce, None, {"probabilities_to_logit_loss"}),
    "sigmoid_into_bce_with_logits": (
        _sigmoid_into_bce_logits,
        None,
        {"probabilities_to_logit_loss"},
    ),
    "model_in_eval_mode": (_eval_mode, None, {"eval_mode"}),
    "dropout_left_in_eval": (_dropout_in_eval, None, {"eval_mode"}),
    "nan_in_inputs": (_nan_inputs, "explodes", {"nonfinite"}),
    "target_broadcasts": (_broadcast_target, "plateaus", {"target_mismatch"}),
    "detached_branch": (
        lambda: Case(DetachedBranch(), classification(), nn.CrossEntropyLoss(), {"steps": 30}),
        None,
        {"no_gradient"},
    ),
    "dead_relus": (
        lambda: Case(_dead_relu_model(), classification(), nn.CrossEntropyLoss(), {"steps": 50}),
        "plateaus",
        {"dead_units"},
    ),
    "conflicting_labels": (_duplicate_inputs_conflicting_labels, None, {"label_noise"}),
    "flipped_sign_loss": (
        lambda: Case(mlp(), classification(), FlippedCrossEntropy(), {"steps": 100, "lr": 1e-2}),
        "goes_up",
        {"loss_increases"},
    ),
    "gradient_ascent": (
        lambda: Case(
            mlp(outputs=1),
            regression(n=32, features=10),
            nn.MSELoss(),
            {"steps": 80},
            lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, maximize=True),
        ),
        "goes_up",
        {"loss_increases"},
    ),
    "gradient_ascent_small_lr": (
        lambda: Case(mlp(), classification(), nn.CrossEntropyLoss(), {"steps": 200}, _ascent(1e-5)),
        "goes_up",
        {"loss_increases"},
    ),
    "flipped_sign_lambda": (
        lambda: Case(
            mlp(), classification(), lambda o, y: -F.cross_entropy(o, y), {"steps": 100, "lr": 1e-5}
        ),
        "goes_up",
        {"loss_increases"},
    ),
    "mixup_inputs_without_labels": (
        lambda: Case(MixupMLP(), classification(), nn.CrossEntropyLoss(), {"lr": 3e-3}),
        "oscillates",
        {"label_noise"},
    ),
    "lr_far_too_high": (
        lambda: Case(
            mlp(outputs=1),
            (classification()[0], regression(n=32, features=10)[1] * 100),
            nn.MSELoss(),
            {"steps": 100},
            _sgd(0.5),
        ),
        "explodes",
        {"nonfinite", "exploding_gradient"},
    ),
    "nan_from_an_op": (
        lambda: Case(SqrtHead(), classification(), nn.CrossEntropyLoss(), {"steps": 20}),
        "explodes",
        {"nonfinite"},
    ),
    "lr_too_high_oscillates": (
        lambda: Case(_saturating_tanh(), _tanh_targets(), nn.MSELoss(), {"steps": 150}, _sgd(3.0)),
        "oscillates",
        {"learning_rate"},
    ),
    "lr_too_low_plateaus": (
        lambda: Case(mlp(), classification(), nn.CrossEntropyLoss(), {"steps": 60, "lr": 1e-7}),
        "plateaus",
        {"learning_rate"},
    ),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_case_shows_its_finding_and_leaves_the_model_as_it_was(name: str) -> None:
    build, verdict, kinds = ZOO[name]
    report, _ = _run(build())
    found = {f.kind for f in report.findings}
    assert kinds <= found, repr(report)
    if verdict is not None:
        assert report.verdict == verdict, repr(report)
    if report.verdict != "converged":
        assert alarms(report.findings), "a failing verdict comes with its root cause"
    for finding in report.findings:
        if finding.kind in kinds:
            assert any(ch.isdigit() for ch in finding.message), finding  # concrete numbers


def test_verdict_root_causes_name_the_lecture_fix() -> None:
    up, _ = _run(ZOO["flipped_sign_loss"][0]())
    [increase] = [f for f in up.findings if f.kind == "loss_increases"]
    assert "perfect prediction" in increase.message and "sign" in increase.hint
    assert "falls as predictions get worse" in up.summary
    low, _ = _run(ZOO["lr_too_low_plateaus"][0]())
    [lr] = [f for f in low.findings if f.kind == "learning_rate"]
    assert "too low" in lr.message and "Raise the learning rate" in lr.hint
    assert "1e-07" in lr.message


def test_nonfinite_names_where_it_first_appeared() -> None:
    report, _ = _run(ZOO["nan_from_an_op"][0]())
    [nan] = [f for f in report.findings if f.kind == "nonfinite"]
    assert "sqrt" in nan.message and "test_overfit.py" in nan.where, nan
    assert report.losses and not np.isfinite(report.losses[-1])


def test_inferred_loss_is_reported() -> None:
    report, _ = _run(Case(mlp(), classification(), None, {"steps": 5}))
    [choice] = [f for f in report.findings if f.kind == "loss_choice"]
    assert (
        choice.severity == "info"
        and "cross_entropy" in choice.message
        and "(32, 3)" in choice.message
    )
    report, _ = _run(Case(mlp(inputs=8, outputs=1), regression(), None, {"steps": 5}))
    assert "mse" in report.loss_name


def test_user_optimizer_state_is_restored_and_used() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = classification()
    F.cross_entropy(model(x), y).backward()  # the user trained a step: grads and momentum exist
    optimizer.step()
    before = fingerprint(model, optimizer)
    report = nbt.overfit_batch(model, (x, y), nn.CrossEntropyLoss(), steps=40, optimizer=optimizer)
    assert_restored(before, model, optimizer)
    assert report.optimizer_name == "SGD(lr=0.1)"
    assert report.losses[-1] < 0.5 * report.losses[0], repr(report)


def test_dict_batch_uses_output_loss() -> None:
    class HFStyle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
            logits = self.net(input_ids)
            return {"logits": logits, "loss": F.cross_entropy(logits, labels)}

    x, y = classification()
    model = HFStyle()
    before = fingerprint(model)
    report = nbt.overfit_batch(model, {"input_ids": x, "labels": y}, steps=150, lr=1e-2)
    assert_restored(before, model)
    assert report.verdict == "converged" and report.loss_name == "output.loss"
    custom = nbt.overfit_batch(
        model,
        {"input_ids": x, "labels": y},
        lambda out, batch: F.cross_entropy(out["logits"], batch["labels"]),
        steps=5,
    )
    assert len(custom.losses) == 5


def test_keep_keeps_trained_weights_in_the_same_objects() -> None:
    model = mlp()
    x, y = classification()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    rng = torch.get_rng_state()
    report = nbt.overfit_batch(model, (x, y), steps=50, lr=1e-2, keep=True)
    assert report.kept and "kept" in repr(report)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    assert torch.equal(torch.get_rng_state(), rng)
    assert F.cross_entropy(model(x), y).item() < 0.1 * report.losses[0]


class _InterruptAt:
    """An observer that raises KeyboardInterrupt (a kernel interrupt) or asks to stop."""

    def __init__(self, step: int, interrupt: bool) -> None:
        self.step, self.interrupt = step, interrupt
        self.finished: Any = None

    def start(self, steps: int, description: str) -> None:
        pass

    def update(self, step: int, loss: float) -> bool:
        if step == self.step and self.interrupt:
            raise KeyboardInterrupt
        return step == self.step

    def finish(self, report: Any, error: BaseException | None) -> None:
        self.finished = (report, error)


def test_keyboard_interrupt_restores_everything_and_propagates() -> None:
    model = LeNet()
    before = fingerprint(model)
    observer = _InterruptAt(7, interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        nbt.overfit_batch(model, digits(32), nn.CrossEntropyLoss(), steps=100, observer=observer)
    assert_restored(before, model)
    assert isinstance(observer.finished[1], KeyboardInterrupt)


def test_stop_request_ends_the_run_with_a_report() -> None:
    model = mlp()
    before = fingerprint(model)
    report = nbt.overfit_batch(
        model, classification(), steps=100, observer=_InterruptAt(3, interrupt=False), keep=True
    )
    assert report.stopped and len(report.losses) == 4
    assert "stopped by the user" in repr(report)
    assert fingerprint(model)["params"] != before["params"]  # --keep honoured for a stopped run


def test_bad_input_is_named_and_nothing_is_touched() -> None:
    model = mlp()
    x, y = classification()
    too_wide = torch.randn(32, 7)
    before = fingerprint(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        nbt.overfit_batch("model", (x, y))
    with pytest.raises(TypeError, match=r"batch must be \(inputs, targets\) or a dict"):
        nbt.overfit_batch(model, x)
    with pytest.raises(ValueError, match=r"loss must be a scalar.*shape \(32,\)"):
        nbt.overfit_batch(model, (x, y), nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(RuntimeError, match="mat1 and mat2") as info:
        nbt.overfit_batch(model, (too_wide, y))
    assert any("cannot take the batch" in note for note in info.value.__notes__)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        nbt.overfit_batch(model, (x, y), steps=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        nbt.overfit_batch(model, (x, y), lr=float("nan"))
    with pytest.raises(ValueError, match="cannot infer a loss"):
        nbt.overfit_batch(model, (x, y.float()))
    assert_restored(before, model)


def test_a_loss_that_raises_propagates_with_the_preflight_finding() -> None:
    model = mlp()
    x, y = classification()
    before = fingerprint(model)
    with pytest.raises(RuntimeError) as info:
        nbt.overfit_batch(model, (x, y.float()), nn.CrossEntropyLoss())
    assert any("target_mismatch" in note for note in info.value.__notes__)
    assert_restored(before, model)


def test_report_text_repr() -> None:
    report, _ = _run(ZOO["lr_too_low_plateaus"][0]())
    text = repr(report)
    assert text.startswith("overfit_batch: PLATEAUS after 60 of 60 steps")
    assert "advice: Raise the learning rate" in text and "learning_rate" in text
    assert "the model was restored" in text


def test_hugging_face_model_with_labels_in_the_batch() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 50, (16, 12), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 3, (16,), generator=g),
    }
    before = fingerprint(model)
    report = nbt.overfit_batch(model, batch, steps=150, lr=1e-3)
    assert_restored(before, model)
    assert report.verdict == "converged" and alarms(report.findings) == [], repr(report)


# -- a rising loss, a loss that rewards being wrong, a batch that changes between steps ----


def test_gradient_ascent_at_a_small_lr_goes_up_however_small_the_rise() -> None:
    report, _ = _run(ZOO["gradient_ascent_small_lr"][0]())
    assert report.verdict == "goes_up", repr(report)
    assert report.losses[-1] < 1.05 * report.losses[0]  # a small rise, far below 1.2x
    [increase] = [f for f in report.findings if f.kind == "loss_increases"]
    assert increase.severity == "error" and "rising steadily" in increase.message
    assert "too low" not in str(report.findings)


@pytest.mark.parametrize("flipped", ["lambda", "subclass"])
def test_a_flipped_loss_is_caught_before_the_first_step_whatever_its_type(flipped: str) -> None:
    loss = FlippedCrossEntropy() if flipped == "subclass" else lambda o, y: -F.cross_entropy(o, y)
    report, _ = _run(Case(mlp(), classification(), loss, {"steps": 100, "lr": 1e-5}))
    assert report.verdict == "goes_up", repr(report)
    [increase] = [f for f in report.findings if f.kind == "loss_increases"]
    first = f"{report.losses[0]:.4g}"
    assert increase.severity == "error" and "rewards wrong predictions" in increase.message
    assert "gives 0 for a perfect prediction" in increase.message
    assert f"and {first} for the model's current output" in increase.message
    # Known before any training step: one step gives no curve to read, the finding is there.
    one_step, _ = _run(Case(mlp(), classification(), loss, {"steps": 1}))
    assert "loss_increases" in {f.kind for f in one_step.findings}, repr(one_step)


@pytest.mark.parametrize("where", ["forward", "loss"])
def test_mixup_that_leaves_the_labels_alone_points_at_the_data_not_only_the_lr(where: str) -> None:
    if where == "forward":
        case = Case(MixupMLP(), classification(), nn.CrossEntropyLoss(), {"lr": 3e-3})
    else:
        case = Case(mlp(hidden=64), classification(), mixed_predictions, {"lr": 3e-3})
    report, _ = _run(case)
    assert report.verdict == "oscillates", repr(report)
    [noise] = [f for f in report.findings if f.kind == "label_noise"]
    assert noise.severity == "warning" and "at fixed weights" in noise.message
    assert "randperm" in noise.message and "mix the labels" in noise.hint
    mode = "in eval mode it is" if where == "forward" else "in eval mode too"
    assert mode in noise.message, noise
    [lr] = [f for f in report.findings if f.kind == "learning_rate"]
    assert lr.severity == "info" and "will not remove swings" in lr.message


def test_an_oscillation_from_a_too_high_lr_blames_the_lr_only() -> None:
    report, _ = _run(ZOO["lr_too_high_oscillates"][0]())
    assert report.verdict == "oscillates", repr(report)
    [lr] = [f for f in report.findings if f.kind == "learning_rate"]
    assert lr.severity == "warning" and "too high" in lr.message
    assert "label_noise" not in {f.kind for f in report.findings}

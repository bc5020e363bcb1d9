"""``troubleshoot``: the decision-tree session, its panel, and ``%troubleshoot``.

Three tiers: the plain-Python session on tiny models, the panel built and driven as widgets,
and the magic through a real ``InteractiveShell``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nbtrouble as nbt
from nbtrouble.troubleshoot import STEP_KEYS, coarse_to_fine_lr, model_error, troubleshoot


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian classes in 4 normalized dimensions."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centers = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    x = centers[labels] + 0.3 * torch.randn(n, 4, generator=generator)
    return (x - x.mean(0)) / x.std(0), labels


def _loader(n: int, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(*_blobs(n, seed)), batch_size=32)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def _fit(model: nn.Module, loader: DataLoader, epochs: int = 40) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model


@pytest.fixture
def data() -> dict[str, DataLoader]:
    return {"train": _loader(96, 0), "val": _loader(60, 1), "test": _loader(60, 2)}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_session_starts_at_start_simple_and_walks_the_tree(data: dict[str, DataLoader]) -> None:
    model = _net()
    batch = next(iter(data["train"]))
    session = troubleshoot(model, batch, loss_fn=nn.CrossEntropyLoss(), steps=300, lr=1e-2, **data)
    assert session.current == "start_simple" and session.log == []
    for expected_next in ("run", "overfit", "compare"):
        outcome = session.check()
        assert outcome.passed, outcome
        assert outcome.next_step == expected_next
        session.advance()
    assert session.current == "compare"
    assert [o.step for o in session.log] == ["start_simple", "run", "overfit"]
    assert session.log[2].details["verdict"] == "converged"
    assert len(session.log[2].details["losses"]) == 300


def test_checks_leave_the_model_as_it_was(data: dict[str, DataLoader]) -> None:
    model = _net()
    model.eval()
    before = _state(model)
    batch = next(iter(data["train"]))  # iterating a loader draws from the RNG: before the capture
    rng = torch.get_rng_state()
    session = troubleshoot(model, batch, loss_fn=nn.CrossEntropyLoss(), **data)
    for step in ("run", "overfit", "compare", "evaluate"):
        session.goto(step)
        session.check()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and torch.equal(rng, torch.get_rng_state())


def test_start_simple_flags_unnormalized_inputs() -> None:
    x, y = _blobs(32, 0)
    outcome = troubleshoot(_net(), (x * 50 + 200, y)).check()
    assert not outcome.passed and outcome.next_step == "start_simple"
    assert [f.kind for f in outcome.findings] == ["unnormalized_input"]
    assert "mean" in outcome.findings[0].message


def test_start_simple_flags_features_on_different_scales() -> None:
    x, y = _blobs(32, 0)
    outcome = troubleshoot(_net(), (x * torch.tensor([1000.0, 1, 0.01, 1]), y)).check()
    assert "unnormalized_input" in [f.kind for f in outcome.findings]
    assert "apart" in outcome.findings[0].message


def test_run_step_reports_the_shape_mismatch_and_stays() -> None:
    x, y = _blobs(8, 0)
    model = nn.Sequential(nn.Linear(5, 3))  # the data has 4 features
    session = troubleshoot(model, (x, y), loss_fn=nn.CrossEntropyLoss())
    session.goto("run")
    outcome = session.check()
    assert not outcome.passed and outcome.next_step == "run"
    assert outcome.findings[0].kind == "shape_mismatch"
    assert "forward pass failed" in outcome.summary


def test_overfit_step_names_the_failure_and_stays() -> None:
    x, y = _blobs(32, 0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3), nn.Softmax(dim=1))
    session = troubleshoot(model, (x, y), loss_fn=nn.CrossEntropyLoss(), steps=100)
    session.goto("overfit")
    outcome = session.check()
    assert not outcome.passed and outcome.next_step == "overfit"
    assert outcome.details["verdict"] != "converged"
    assert "probabilities_to_logit_loss" in [f.kind for f in outcome.findings]


def test_compare_passes_a_trained_model_and_fails_an_untrained_one(
    data: dict[str, DataLoader],
) -> None:
    batch = next(iter(data["train"]))
    untrained = troubleshoot(_net(), batch, known={"linear": 0.02}, **data)
    untrained.goto("compare")
    failed = untrained.check()
    assert not failed.passed and failed.next_step == "overfit"
    assert set(failed.details["results"]) == {"most frequent class", "linear"}
    trained = troubleshoot(_fit(_net(), data["train"]), batch, known={"linear": 0.02}, **data)
    trained.goto("compare")
    passed = trained.check()
    assert passed.passed and passed.next_step == "evaluate", passed
    assert passed.details["model"] < 0.1


def test_evaluate_and_improve_use_the_decomposition(data: dict[str, DataLoader]) -> None:
    model = _fit(_net(), data["train"], epochs=1)
    session = troubleshoot(model, next(iter(data["train"])), irreducible=0.0, **data)
    session.goto("evaluate")
    evaluated = session.check()
    components = evaluated.details["components"]
    assert list(components)[:3] == ["irreducible", "avoidable_bias", "variance"]
    assert evaluated.details["priority"] in components and evaluated.next_step == "improve"
    session.advance()
    _fit(model, data["train"], epochs=40)  # the improvement: train longer
    improved = session.check()
    assert improved.passed and improved.next_step == "tune", improved
    assert improved.details["test_error"] < sum(components.values())


def test_tune_runs_a_coarse_to_fine_search_of_the_learning_rate() -> None:
    tried: list[float] = []

    def objective(lr: float) -> float:
        tried.append(lr)
        return abs(math.log10(lr) + 2.5)

    session = troubleshoot(_net(), _blobs(8, 0), tune=objective)
    session.goto("tune")
    outcome = session.check()
    assert len(tried) == 8 and outcome.next_step == "evaluate"
    assert 10**-3.5 < outcome.details["best_lr"] < 10**-1.5
    coarse, fine = tried[:4], tried[4:]
    assert max(fine) / min(fine) < max(coarse) / min(coarse)  # the second round is narrower


def test_coarse_to_fine_stays_in_range_and_is_reproducible() -> None:
    first = coarse_to_fine_lr(lambda lr: lr, low=1e-4, high=1e-1, trials=5, rounds=3, seed=1)
    assert first == coarse_to_fine_lr(
        lambda lr: lr, low=1e-4, high=1e-1, trials=5, rounds=3, seed=1
    )
    assert all(1e-4 <= lr <= 1e-1 for lr, _ in first) and len(first) == 15
    with pytest.raises(ValueError, match="0 < low < high"):
        coarse_to_fine_lr(lambda lr: lr, low=1e-1, high=1e-4)


def test_model_error_counts_errors_and_restores_train_mode(data: dict[str, DataLoader]) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    model.train()
    error, metric = model_error(model, data["val"])
    assert metric == "error" and 0.0 <= error <= 1.0 and model.training
    regression = DataLoader(TensorDataset(torch.zeros(10, 4), torch.ones(10)), batch_size=4)
    assert model_error(nn.Linear(4, 1, bias=False), regression) == (1.0, "mse")


def test_missing_data_for_a_check_is_a_clear_error() -> None:
    session = troubleshoot(_net(), _blobs(8, 0))
    session.goto("evaluate")
    with pytest.raises(ValueError, match="needs train, val, test"):
        session.check()
    session.goto("tune")
    with pytest.raises(ValueError, match="tune=..."):
        session.check()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "not a model"}, TypeError, "torch.nn.Module"),
        ({"batch": None}, ValueError, "give a batch"),
        ({"irreducible": -0.1}, ValueError, "irreducible"),
        ({"irreducible": float("nan")}, ValueError, "irreducible"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"steps": 1}, ValueError, "steps"),
        ({"known": {"paper": "low"}}, TypeError, "paper"),
        ({"tune": 3}, TypeError, "tune"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    arguments = {"model": _net(), "batch": _blobs(8, 0), **kwargs}
    with pytest.raises(error, match=match):
        troubleshoot(**arguments)


def test_unknown_step_and_unknown_objects() -> None:
    session = troubleshoot(_net(), _blobs(8, 0))
    with pytest.raises(ValueError, match="unknown step 'deploy'"):
        session.goto("deploy")
    with pytest.raises(ValueError, match="unknown objects"):
        session.use(trian=[])
    assert session.current == "start_simple"


def test_record_and_markdown_export(tmp_path: Path) -> None:
    session = troubleshoot(_net(), _blobs(8, 0))
    session.check()
    session.advance()
    session.record(False, "cuda out of memory | at batch 512")
    report = session.export(tmp_path / "log.md").read_text()
    assert report.startswith("# Troubleshooting log\n")
    assert "| 1 | Start simple | passed |" in report
    assert (
        "| 2 | Get the model to run | needs work | cuda out of memory \\| at batch 512 |" in report
    )
    assert "### 2. Get the model to run: needs work" in report
    assert "Current step: **Get the model to run** (Implement & debug)." in report
    assert "Model: `Sequential` (" in report


def test_use_swaps_objects_for_later_checks(data: dict[str, DataLoader]) -> None:
    session = troubleshoot(_net(), next(iter(data["train"])), **data)
    bigger = _loader(200, 5)
    session.use(train=bigger)
    assert session.options["train"] is bigger
    with pytest.raises(TypeError, match="nn.Module"):
        session.use(model=object())


def test_package_attribute_is_callable_in_any_import_order() -> None:
    import nbtrouble.troubleshoot  # noqa: F401  (sets the package attribute to the module)

    session = nbt.troubleshoot(_net(), _blobs(8, 0))
    assert session.current == STEP_KEYS[0]
    assert "Start simple" in repr(session)


# --- the panel ---------------------------------------------------------------------------


def test_panel_shows_where_the_user_is_and_follows_the_session() -> None:
    from nbtrouble._troubleshoot_view import session_panel

    session = troubleshoot(_net(), _blobs(32, 0), loss_fn=nn.CrossEntropyLoss(), steps=50)
    panel = session_panel(session)
    tree, step, buttons, _status, result, log, markdown = panel.children
    assert [label for label, _ in tree.options] == [
        "Start simple",
        "Get the model to run",
        "Overfit a single batch",
        "Compare to a known result",
        "Bias-variance decomposition",
        "Improve model and data",
        "Tune hyperparameters",
    ]
    assert tree.value == "start_simple" and "You are here: Start simple" in step.value
    assert [b.description for b in buttons.children] == [
        "Run check",
        "Next: Start simple",
        "Export Markdown",
    ]
    session.goto("overfit")  # driven from code: the panel follows
    assert tree.value == "overfit" and "Overfit a single batch" in step.value
    buttons.children[0].click()  # Run check
    assert len(session.log) == 1 and "<table class='nbt-log'>" in log.value
    assert tree.options[2][0].startswith("\u2713") or tree.options[2][0].startswith("\u2717")
    verdict, curve = result.children
    assert "nbt-verdict" in verdict.value and "verdict:" in verdict.value
    assert curve.format == "png" and bytes(curve.value).startswith(b"\x89PNG")
    tree.value = "compare"  # the user clicks a step
    assert session.current == "compare"
    buttons.children[2].click()  # Export Markdown
    assert markdown.value.startswith("# Troubleshooting log") and markdown.layout.display == ""


def test_panel_shows_a_failing_check() -> None:
    from nbtrouble._troubleshoot_view import session_panel

    session = troubleshoot(_net(), _blobs(8, 0))
    session.goto("evaluate")
    panel = session_panel(session)
    run = panel.children[2].children[0]
    run.click()  # the error is shown in the panel (and re-raised to the widget's log)
    assert "needs train" in panel.children[3].value and not run.disabled
    assert session.log == []


def test_loss_curve_png_is_an_image() -> None:
    from nbtrouble._troubleshoot_view import loss_curve_png

    png = loss_curve_png([2.3, 1.0, 0.1, float("nan")])
    assert png.startswith(b"\x89PNG") and len(png) > 1000


# --- the magic, through a real InteractiveShell ------------------------------------------


@pytest.fixture
def shell():
    from IPython.testing.globalipapp import get_ipython

    ip = get_ipython()
    ip.run_line_magic("load_ext", "nbtrouble")
    x, y = _blobs(32, 0)
    ip.user_ns.update(
        model=_net(),
        batch=(x, y),
        loss_fn=nn.CrossEntropyLoss(),
        train=_loader(96, 0),
        val=_loader(60, 1),
        test=_loader(60, 2),
        bigger=_loader(120, 3),
        paper_error=0.05,
    )
    return ip


def test_magic_starts_checks_moves_and_exports(shell, tmp_path: Path) -> None:
    from nbtrouble._magic_troubleshoot import TroubleshootMagics

    session = shell.run_line_magic(
        "troubleshoot",
        "model batch --loss loss_fn --train train --val val --test test --known paper=paper_error",
    )
    assert (
        session.options["known"] == {"paper": 0.05}
        and session.options["val"] is shell.user_ns["val"]
    )
    outcome = shell.run_line_magic("troubleshoot", "--check")
    assert outcome.step == "start_simple" and outcome.passed
    assert shell.run_line_magic("troubleshoot", "--next").current == "run"
    assert shell.run_line_magic("troubleshoot", "--next evaluate").current == "evaluate"
    shell.run_line_magic("troubleshoot", "--train bigger")
    assert session.options["train"] is shell.user_ns["bigger"]
    log = tmp_path / "log.md"
    assert shell.run_line_magic("troubleshoot", f"--export {log}") is None
    assert "| 1 | Start simple | passed |" in log.read_text()
    both = shell.run_line_magic("troubleshoot", f"--next start_simple --check --export {log}")
    assert both.step == "start_simple" and "| 2 | Start simple | passed |" in log.read_text()
    assert shell.magics_manager.registry[TroubleshootMagics.__name__].session is session


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("model", "give a batch"),
        ("nothing batch", "name 'nothing' is not defined"),
        ("model batch --steps many", "invalid int value"),
        ("model batch --irreducible nan", "irreducible"),
        ("model batch --known paper", "NAME=ERROR"),
        ("model batch --known paper='x'", "must be a number"),
        ("model batch --lr -1", "lr"),
        ("model batch --bogus", "unrecognized arguments"),
        ("model 'batch", "could not parse"),
        ("1 batch", "torch.nn.Module"),
    ],
)
def test_magic_usage_errors(shell, line: str, match: str) -> None:
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match=match):
        shell.run_line_magic("troubleshoot", line)


def test_magic_without_a_session_and_bad_step(shell) -> None:
    from IPython.core.error import UsageError

    from nbtrouble._magic_troubleshoot import TroubleshootMagics

    shell.magics_manager.registry[TroubleshootMagics.__name__].session = None
    with pytest.raises(UsageError, match="start a session first"):
        shell.run_line_magic("troubleshoot", "--check")
    shell.run_line_magic("troubleshoot", "model batch")
    with pytest.raises(UsageError, match="unknown step 'deploy'"):
        shell.run_line_magic("troubleshoot", "--next deploy")
    with pytest.raises(UsageError, match="needs train, val, test"):
        shell.run_line_magic("troubleshoot", "--next evaluate --check")

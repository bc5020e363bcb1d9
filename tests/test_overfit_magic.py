"""``%overfit_batch`` through a real ``InteractiveShell``, and the panel as widgets."""

from __future__ import annotations

import pytest
import torch
from IPython.core.error import UsageError
from test_overfit import ZOO, assert_restored, classification, fingerprint, mlp

from nbtrouble._overfit_view import OverfitPanel, loss_curve_svg, report_text

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shell(ipython_shell):
    ip = ipython_shell
    return ip


@pytest.fixture
def user_ns(shell):
    x, y = classification()
    model = mlp()
    shell.user_ns.update(model=model, x=x, y=y, nn=torch.nn)
    yield shell.user_ns
    for name in ("model", "x", "y", "_overfit", "rep", "opt"):
        shell.user_ns.pop(name, None)


def test_magic_trains_shows_text_and_restores(shell, user_ns, capsys) -> None:
    before = fingerprint(user_ns["model"])
    shell.run_line_magic(
        "overfit_batch", "model (x, y) nn.CrossEntropyLoss() --steps 150 --lr 1e-2 --name rep"
    )
    assert_restored(before, user_ns["model"])
    out = capsys.readouterr()
    assert "overfit_batch: CONVERGED after 150 of 150 steps" in out.out
    assert "Adam(lr=0.01)" in out.out
    assert user_ns["rep"] is user_ns["_overfit"] and user_ns["rep"].verdict == "converged"


def test_magic_infers_the_loss_and_says_so(shell, user_ns, capsys) -> None:
    shell.run_line_magic("overfit_batch", "model (x, y) --steps 5")
    out = capsys.readouterr().out
    assert "no loss_fn given: using cross_entropy" in out


def test_magic_uses_the_users_optimizer_and_keeps_weights_when_asked(shell, user_ns) -> None:
    model = user_ns["model"]
    user_ns["opt"] = torch.optim.SGD(model.parameters(), lr=0.1)
    first = model[0].weight.detach().clone()
    shell.run_line_magic("overfit_batch", "model (x, y) --optimizer opt --steps 10 --keep")
    assert user_ns["_overfit"].optimizer_name == "SGD(lr=0.1)"
    assert not torch.equal(first, model[0].weight)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("nomodel (x, y)", "name 'nomodel' is not defined"),
        ("model (x, y) --steps abc", "invalid int value"),
        ("model (x, y) --steps -3", "--steps must be a positive integer"),
        ("model (x, y) --lr nan", "--lr must be a positive number"),
        ("model (x, y) --lr -1", "--lr must be a positive number"),
        ("model (x, y) --bogus 1", "unrecognized arguments"),
        ("model '(x, y)", "could not parse"),
        ("x (x, y)", "model must be a torch.nn.Module"),
        ("model x", r"batch must be \(inputs, targets\)"),
        ("model (x, y) 3", "loss_fn '3' is not callable"),
        ("model (x, y) nn.CrossEntropyLoss(reduction='none')", "loss must be a scalar"),
        ("model (x, y) --name 1abc", "not a valid variable name"),
    ],
)
def test_magic_usage_errors_name_the_problem(shell, user_ns, line, message) -> None:
    before = fingerprint(user_ns["model"])
    with pytest.raises(UsageError, match=message):
        shell.run_line_magic("overfit_batch", line)
    assert_restored(before, user_ns["model"])


def test_a_batch_the_model_cannot_take_raises_the_models_error(shell, user_ns) -> None:
    user_ns["x"] = torch.zeros(32, 7)
    before = fingerprint(user_ns["model"])
    result = shell.run_cell("%overfit_batch model (x, y) --steps 5")
    assert isinstance(result.error_in_exec, RuntimeError)
    assert any("cannot take the batch" in n for n in result.error_in_exec.__notes__)
    assert_restored(before, user_ns["model"])


def test_panel_shows_progress_curve_stop_and_verdict() -> None:
    panel = OverfitPanel(min_interval=0.0)
    case = ZOO["lr_too_low_plateaus"][0]()
    from nbtrouble import overfit_batch

    report = overfit_batch(case.model, case.batch, case.loss_fn, observer=panel, **case.kwargs)
    _, row, curve, result = panel.widget.children
    bar, status, stop = row.children
    assert bar.value == bar.max == 60 and bar.bar_style == "danger"
    assert "step 60/60" in status.value
    assert curve.value.startswith("<svg") and "log scale" in curve.value
    assert "PLATEAUS" in result.value and "learning_rate" in result.value
    assert stop.disabled and stop.description == "Stop"
    assert report.verdict == "plateaus"


def test_stop_button_click_stops_the_run() -> None:
    panel = OverfitPanel(min_interval=0.0)
    original = panel.update

    def update(step: int, loss: float) -> bool:
        if step == 2:
            panel.stop_button.click()  # what the kernel runs when the button's click arrives
        return original(step, loss)

    panel.update = update  # type: ignore[method-assign]
    from nbtrouble import overfit_batch

    model = mlp()
    before = fingerprint(model)
    report = overfit_batch(model, classification(), steps=100, observer=panel)
    assert report.stopped and len(report.losses) == 3
    assert "(stopped)" in panel.widget.children[3].value
    assert_restored(before, model)


def test_panel_redraws_are_throttled() -> None:
    panel = OverfitPanel(min_interval=3600)
    panel.start(1000, "test")
    for step in range(1000):
        panel.update(step, 1.0 / (step + 1))
    assert panel.bar.value == 1  # drawn once, at the first step
    assert len(panel.losses) == 1000


def test_curve_svg_switches_to_linear_for_negative_losses_and_text_has_a_sparkline() -> None:
    assert "linear scale" in loss_curve_svg([1.0, -2.0, -5.0])
    report = ZOO["lr_too_low_plateaus"][0]
    from nbtrouble import overfit_batch

    case = report()
    text = report_text(overfit_batch(case.model, case.batch, case.loss_fn, **case.kwargs))
    assert "curve: " in text

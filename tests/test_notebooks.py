"""Every example notebook, executed top to bottom in a real kernel, with its key outputs asserted.

Each notebook runs in a fresh kernel with a scratch copy of ``example_notebooks/`` as its
working directory, through the same code as the README's main command
(``scripts/run_walkthrough.py``). After the notebook's own cells, one probe cell reads the
results the notebook computed (verdicts, findings, the decomposition, the troubleshooting log)
into JSON, and the checks below assert them. ``test_binder.py`` runs the same checks in an
environment built from ``binder/``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from kernel_utils import cell_text, kernel_env

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "example_notebooks"
PROBE_MARK = "NBTROUBLE-PROBE "
TIME_LIMIT_S = 120  # the promise: each notebook runs in under two minutes on a CPU


def load_runner() -> Any:
    """``scripts/run_walkthrough.py`` as a module (the README's main command)."""
    spec = importlib.util.spec_from_file_location(
        "run_walkthrough", ROOT / "scripts" / "run_walkthrough.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def kinds(expression: str, alarms_only: bool = True) -> str:
    """Probe expression: the sorted finding kinds of a report or trace."""
    condition = " if f.is_alarm" if alarms_only else ""
    return f"sorted({{f.kind for f in {expression}.findings{condition}}})"


def _approx(value: float, expected: float, tolerance: float = 1e-6) -> bool:
    return math.isclose(value, expected, abs_tol=tolerance)


def _check_01(r: dict[str, Any]) -> None:
    assert abs(r["normalized_mean"]) < 1e-3 and _approx(r["normalized_std"], 1.0, 1e-3)
    assert r["val_error"] < 0.2, r
    assert r["start"] == [True, "run"], r
    assert r["raw_start"] == [False, "start_simple"] and "unnormalized_input" in r["raw_kinds"], r


def _check_02(r: dict[str, Any]) -> None:
    assert r["shape_kind"] == "shape_mismatch" and r["shape_module"] == "classifier.1", r
    assert r["shape_inputs"][:2] == [[32, 64], [120, 400]], (
        r
    )  # the batch's 64 features, the layer's 400
    assert r["fixed_failure"] is None and r["fixed_output"] == [32, 10], r
    assert r["cast_kind"] == "dtype_mismatch", r
    assert "silent_broadcast" in r["broadcast_kinds"], r
    assert r["meta_device"] == "meta" and r["meta_parameters"] > 10**10, r
    assert r["llm_parameters"] > 6.5e9 and r["llm_failure"] is None, r
    assert r["llm_logits"] == [[1, 512, 32000], "meta"], r
    kind, module, message = r["llm_bug"]
    assert kind == "shape_mismatch" and module == "lm_head", r
    assert "in_features=4000" in message and "4096" in message, r
    assert r["big_batch"] == [[4096, 10], "meta", True], r
    assert r["raised"] == ["RuntimeError"] * 3, r


def _check_03(r: dict[str, Any]) -> None:
    assert r["verdict"] == "converged" and r["last_over_first"] < 0.05, r
    assert r["slow"] == "plateaus" and "learning_rate" in r["slow_kinds"], r
    assert r["too_fast"] == "explodes", r


def _check_04(r: dict[str, Any]) -> None:
    assert r["dummy_error"] > 0.8 and r["logreg_error"] < 0.06, r
    assert r["lenet_error"] < 0.08, r
    assert r["compared"] == [True, "evaluate"], r
    assert r["mismatch"] == [False, "overfit"] and r["mismatch_error"] > 0.5, r


def _check_05(r: dict[str, Any]) -> None:
    lecture = r["lecture"]
    assert list(lecture) == ["irreducible", "avoidable_bias", "variance", "val_overfitting"], r
    for key, value in zip(lecture, [0.01, 0.19, 0.07, 0.01]):
        assert _approx(lecture[key], value), r
    assert r["lecture_priority"] == "avoidable_bias", r
    components = r["components"]
    assert _approx(sum(components.values()), r["test_error"]), r
    assert components["avoidable_bias"] < 0.02, r  # 100 images are fit perfectly
    assert components["variance"] > 0.1 and components["distribution_shift"] > 0.1, r
    assert r["priority"] == max(
        ["avoidable_bias", "variance", "distribution_shift", "val_overfitting"], key=components.get
    ), r
    assert r["next_steps"], r


def _check_06(r: dict[str, Any]) -> None:
    before, more, augmented = r["before"], r["more_data"], r["augmented"]
    assert more["variance"] < before["variance"], r
    assert augmented["distribution_shift"] < more["distribution_shift"] / 2, r
    assert r["test_errors"][2] < r["test_errors"][0] / 2, r
    assert r["trials"] == [8, 6], r
    low, high = r["coarse_lr"] / 4, r["coarse_lr"] * 4
    assert all(low <= lr <= high for lr in r["fine_lrs"]), (
        r
    )  # the fine stage searched near the best
    assert 1e-4 < r["best_lr"] < 1e-1 and r["tuned_test_error"] < 0.1, r


def _check_07(r: dict[str, Any]) -> None:
    assert r["log"] == [
        ["start_simple", True],
        ["run", True],
        ["overfit", True],
        ["compare", False],
        ["compare", True],
        ["evaluate", True],
        ["improve", True],
        ["tune", True],
    ], r
    assert r["overfit_verdict"] == "converged" and r["current"] == "evaluate", r
    assert r["improved"][1] < r["improved"][0], r
    assert (
        r["report"].startswith("# Troubleshooting log")
        and "| 4 | Compare to a known result | needs work |" in r["report"]
    )
    assert "nbt-tree" in r["widget_state"] and "You are here" in r["widget_state"], (
        "panel not in the widget state"
    )


def _check_exercise_1(r: dict[str, Any]) -> None:
    assert "silent_broadcast" in r["shapes"], r
    assert "unnormalized_input" in r["preprocessing"], r
    assert (
        r["loss_input_verdict"] != "converged" and "probabilities_to_logit_loss" in r["loss_input"]
    ), r
    assert "eval_mode" in r["train_mode"], r
    assert "nonfinite" in r["numerics"], r


def _check_solution_1(r: dict[str, Any]) -> None:
    _check_exercise_1(r)
    assert r["fixed"] == {
        "shapes": [[], "converged"],
        "preprocessing": [[], "converged"],
        "loss_input": [[], "converged"],
        "train_mode": [[], "converged"],
        "numerics": [[], "converged"],
    }, r


def _check_exercise_2(r: dict[str, Any]) -> None:
    assert r["verdicts"] == ["goes_up", "explodes", "oscillates", "plateaus"], r
    assert "loss_increases" in r["kinds"][0], r
    assert "exploding_gradient" in r["kinds"][1], r
    assert "learning_rate" in r["kinds"][3], r


def _check_solution_2(r: dict[str, Any]) -> None:
    _check_exercise_2(r)
    assert r["fixed"] == ["converged"] * 4, r


_FIXED_1 = (
    '{"shapes": [fixed_shapes_kinds, shapes_fixed.verdict],'
    ' "preprocessing": [preprocessing_fixed_kinds, preprocessing_fixed.verdict],'
    f' "loss_input": [{kinds("loss_input_fixed")}, loss_input_fixed.verdict],'
    ' "train_mode": [train_mode_fixed_kinds, train_mode_fixed.verdict],'
    ' "numerics": [numerics_fixed_kinds, numerics_fixed.verdict]}'
)
_EXERCISE_1 = {
    "shapes": "shapes_kinds",
    "preprocessing": "preprocessing_kinds",
    "loss_input": "loss_input_kinds",
    "loss_input_verdict": "loss_input_report.verdict",
    "train_mode": "train_mode_kinds",
    "numerics": "numerics_kinds",
}
_EXERCISE_2 = {
    "verdicts": "[r.verdict for r in (report_1, report_2, report_3, report_4)]",
    "kinds": f"[{kinds('r')} for r in (report_1, report_2, report_3, report_4)]",
}

# notebook -> (probe: name -> Python expression evaluated in the notebook's kernel, checks)
NOTEBOOK_CHECKS: dict[str, tuple[dict[str, str], Callable[[dict[str, Any]], None]]] = {
    "01_start_simple.ipynb": (
        {
            "normalized_mean": "float(x[train_idx].mean())",
            "normalized_std": "float(x[train_idx].std())",
            "val_error": "val_error",
            "start": "[start.passed, start.next_step]",
            "raw_start": "[raw_start.passed, raw_start.next_step]",
            "raw_kinds": kinds("raw_start"),
        },
        _check_01,
    ),
    "02_get_the_model_to_run.ipynb": (
        {
            "shape_kind": "shape_failure.finding.kind",
            "shape_module": "shape_failure.module",
            "shape_inputs": "[list(s) for s in shape_failure.input_shapes]",
            "fixed_failure": "fixed_trace.failure",
            "fixed_output": "list(logits.shape)",
            "cast_kind": "cast_trace.failure.finding.kind",
            "broadcast_kinds": kinds("broadcast_trace"),
            "meta_device": "str(huge_logits.device)",
            "meta_parameters": "sum(p.numel() for p in huge.parameters())",
            "llm_parameters": "sum(p.numel() for p in llm.parameters())",
            "llm_logits": "[list(next_token_logits.shape), str(next_token_logits.device)]",
            "llm_failure": "llm_trace.failure",
            "llm_bug": "[llm_bug_trace.failure.finding.kind, llm_bug_trace.failure.module,"
            " llm_bug_trace.failure.finding.message]",
            "big_batch": "[list(big_logits.shape), str(big_logits.device), unchanged]",
        },
        _check_02,
    ),
    "03_overfit_a_single_batch.ipynb": (
        {
            "verdict": "report.verdict",
            "last_over_first": "report.losses[-1] / report.losses[0]",
            "slow": "slow.verdict",
            "slow_kinds": kinds("slow"),
            "too_fast": "too_fast.verdict",
        },
        _check_03,
    ),
    "04_compare_to_a_known_result.ipynb": (
        {
            "dummy_error": "dummy_error",
            "logreg_error": "logreg_error",
            "lenet_error": "lenet_error",
            "compared": "[compared.passed, compared.next_step]",
            "mismatch": "[mismatch.passed, mismatch.next_step]",
            "mismatch_error": "mismatch.details['model']",
        },
        _check_04,
    ),
    "05_evaluate_bias_variance.ipynb": (
        {
            "lecture": "lecture.components",
            "lecture_priority": "lecture.priority",
            "components": "bv.components",
            "test_error": "bv.errors['test']",
            "priority": "bv.priority",
            "next_steps": "bv.next_steps",
        },
        _check_05,
    ),
    "06_improve_and_tune.ipynb": (
        {
            "before": "before.components",
            "more_data": "more_data.components",
            "augmented": "augmented.components",
            "test_errors": "[b.errors['test'] for b in (before, more_data, augmented)]",
            "trials": "[len(coarse.trials), len(fine.trials)]",
            "coarse_lr": "coarse_lr",
            "fine_lrs": "[t.params['lr'] for t in fine.trials]",
            "best_lr": "best_lr",
            "tuned_test_error": "tuned.errors['test']",
        },
        _check_06,
    ),
    "07_troubleshoot_panel.ipynb": (
        {
            "log": "[[o.step, o.passed] for o in session.log]",
            "overfit_verdict": "overfit.details['verdict']",
            "current": "session.current",
            "improved": "[sum(evaluate.details['components'].values()),"
            " improve.details['test_error']]",
            "report": "open('troubleshooting_log.md').read()",
        },
        _check_07,
    ),
    "exercise_1_five_common_bugs.ipynb": (_EXERCISE_1, _check_exercise_1),
    "solution_1_five_common_bugs.ipynb": ({**_EXERCISE_1, "fixed": _FIXED_1}, _check_solution_1),
    "exercise_2_overfitting_fails.ipynb": (_EXERCISE_2, _check_exercise_2),
    "solution_2_overfitting_fails.ipynb": (
        {**_EXERCISE_2, "fixed": "[r.verdict for r in (fixed_1, fixed_2, fixed_3, fixed_4)]"},
        _check_solution_2,
    ),
}


def probe_source(probe: dict[str, str]) -> str:
    items = ", ".join(f"{name!r}: {expression}" for name, expression in probe.items())
    return f"import json as _json\nprint({PROBE_MARK!r} + _json.dumps({{{items}}}, default=str))"


def run_checked(
    name: str,
    workdir: Path,
    runner: Any,
    kernel_name: str = "python3",
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Execute notebook ``name`` in ``workdir`` with its probe, assert its checks; return the probe.

    ``extra`` adds probe expressions (name -> Python expression) for the caller's own checks.
    """
    probe, check = NOTEBOOK_CHECKS[name]
    probe = {**probe, **(extra or {})}
    path = workdir / name
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(probe_source(probe)))
    probed = workdir / f"probed_{name}"
    nbformat.write(notebook, probed)
    start = time.perf_counter()
    with kernel_env():
        executed = runner.execute(probed, workdir, kernel_name=kernel_name, timeout=TIME_LIMIT_S)
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT_S, f"{name} took {elapsed:.0f} s"
    check_error_outputs(executed)
    text = cell_text(executed.cells[-1])
    assert PROBE_MARK in text, text
    results = json.loads(text.split(PROBE_MARK, 1)[1])
    results["widget_state"] = json.dumps(executed.metadata.get("widgets", {}))
    results["raised"] = [
        output.ename
        for cell in executed.cells
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]
    check(results)
    return results


def check_error_outputs(notebook: Any) -> None:
    """Errors appear exactly in the cells tagged ``raises-exception``."""
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        tagged = "raises-exception" in cell.metadata.get("tags", [])
        assert bool(errors) == tagged, (
            f"cell {index} (tagged: {tagged}) errors: {errors}\n{cell.source}"
        )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch copy of ``example_notebooks/``: files the notebooks write stay out of the repo."""
    target = tmp_path_factory.mktemp("notebooks") / "example_notebooks"
    shutil.copytree(NOTEBOOKS, target)
    return target


def test_every_notebook_has_checks() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NOTEBOOK_CHECKS)


def test_walkthrough_covers_the_lecture() -> None:
    runner = load_runner()
    names = [p.name for p in runner.walkthrough()]
    assert names == sorted(n for n in NOTEBOOK_CHECKS if re.match(r"\d\d_", n))
    parts = [
        "start_simple",
        "get_the_model_to_run",
        "overfit_a_single_batch",
        "compare_to_a_known_result",
        "evaluate_bias_variance",
        "improve_and_tune",
    ]
    assert all(any(part in name for name in names) for part in parts), names
    assert len(runner.walkthrough(include_exercises=True)) == len(NOTEBOOK_CHECKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOK_CHECKS))
def test_notebook_downloads_nothing(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    for pattern in (
        r"https?://",
        r"\bfetch_\w+",
        r"urlopen|urlretrieve|requests\.",
        r"download=True",
        r"!pip|%pip",
    ):
        assert not re.search(pattern, code), f"{name}: {pattern}"
    assert "torch.manual_seed(0)" in code, f"{name} sets no seed"


@pytest.mark.kernel
@pytest.mark.parametrize("name", sorted(NOTEBOOK_CHECKS))
def test_notebook_runs_and_shows_its_results(name: str, workdir: Path) -> None:
    run_checked(name, workdir, load_runner())

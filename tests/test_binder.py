"""The Binder environment: built from exactly the files in ``binder/``, it runs every notebook.

Binder (repo2docker) reads ``binder/runtime.txt`` (the Python version) and runs
``pip install -r binder/requirements.txt`` from the repository root. This test does the same
in a fresh virtual environment, with one substitution, because this machine installs offline:

- the line ``--extra-index-url https://download.pytorch.org/whl/cpu`` is dropped, and
- the line ``torch==<version>+cpu`` becomes ``torch==2.13.0``, the CPU wheel available here
  (the same build: ``torch.__version__`` is ``2.13.0+cpu`` either way).

Every other line is installed as written. Then every example notebook is executed in a kernel
of that environment and its key outputs are asserted, as in ``test_notebooks.py``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_notebooks import NOTEBOOK_CHECKS, NOTEBOOKS, load_runner, run_checked

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
LOCAL_TORCH = "torch==2.13.0"
KERNEL_NAME = "nbtrouble-binder"
CPU_INDEX = re.compile(r"^--extra-index-url\s+https://download\.pytorch\.org/whl/cpu\s*$")
CPU_TORCH = re.compile(r"^torch==[\w.]+\+cpu\s*$")

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def local_requirements(text: str) -> str:
    """``binder/requirements.txt`` with Binder's CPU torch download swapped for the local wheel."""
    lines = text.splitlines()
    assert any(CPU_INDEX.match(line) for line in lines), (
        "binder/requirements.txt names no CPU torch index"
    )
    assert sum(bool(CPU_TORCH.match(line)) for line in lines) == 1, (
        "binder/requirements.txt pins no +cpu torch"
    )
    kept = [
        LOCAL_TORCH if CPU_TORCH.match(line) else line
        for line in lines
        if not CPU_INDEX.match(line)
    ]
    return "\n".join(kept) + "\n"


def test_local_requirements_changes_only_the_torch_lines() -> None:
    text = (BINDER / "requirements.txt").read_text()
    local = local_requirements(text)
    removed = set(text.splitlines()) - set(local.splitlines())
    assert all(CPU_INDEX.match(line) or CPU_TORCH.match(line) for line in removed), removed
    assert set(local.splitlines()) - set(text.splitlines()) == {LOCAL_TORCH}
    assert any(re.match(r"^-e \.(\[.*\])?$", line) for line in local.splitlines()), (
        "the project itself"
    )


def test_runtime_names_this_python() -> None:
    runtime = (BINDER / "runtime.txt").read_text().strip()
    assert runtime == f"python-{sys.version_info.major}.{sys.version_info.minor}", runtime


@pytest.fixture(scope="module")
def binder_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment from ``binder/``, registered as kernel ``nbtrouble-binder``."""
    base = tmp_path_factory.mktemp("binder")
    venv = base / "venv"
    requirements = base / "requirements.txt"
    requirements.write_text(local_requirements((BINDER / "requirements.txt").read_text()))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # From the repository root, as repo2docker runs it: "-e ." is the project itself.
    _run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)], cwd=ROOT)
    kernels = base / "kernels"
    _run(
        [str(python), "-m", "ipykernel", "install", "--prefix", str(kernels), "--name", KERNEL_NAME]
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(kernels / "share" / "jupyter"))
        yield venv


def _run(command: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(
        command, check=False, cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_binder_env_has_cpu_torch_and_widgets_in_jupyterlab(binder_env: Path) -> None:
    python = binder_env / "bin" / "python"
    versions = _run(
        [
            str(python),
            "-c",
            (
                "import torch, ipywidgets, nbtrouble, optuna, sklearn;"
                "print(torch.__version__, ipywidgets.__version__, nbtrouble.__file__)"
            ),
        ]
    )
    torch_version, widgets_version, package = versions.split()
    assert torch_version.endswith("+cpu"), torch_version
    assert int(widgets_version.split(".")[0]) >= 8, widgets_version
    assert Path(package).is_relative_to(ROOT), package  # the project, installed from the repository
    extensions = _run([str(binder_env / "bin" / "jupyter"), "labextension", "list"])
    assert re.search(
        r"@jupyter-widgets/jupyterlab-manager\s+v?[\d.]+\s+\S*\s*enabled", extensions
    ), extensions


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("binder-notebooks") / "example_notebooks"
    shutil.copytree(NOTEBOOKS, target)
    return target


@pytest.mark.parametrize("name", sorted(NOTEBOOK_CHECKS))
def test_notebook_runs_in_binder_env(name: str, binder_env: Path, workdir: Path) -> None:
    prefix = {"prefix": "__import__('sys').prefix"}  # which Python the kernel runs
    results = run_checked(name, workdir, load_runner(), kernel_name=KERNEL_NAME, extra=prefix)
    assert Path(results["prefix"]) == binder_env, results["prefix"]

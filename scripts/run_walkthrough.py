"""Execute the lecture's walkthrough notebooks in a real kernel and write them as HTML.

    python scripts/run_walkthrough.py            # the walkthrough: example_notebooks/0*.ipynb
    python scripts/run_walkthrough.py --all      # also the exercises and their solutions

Each notebook runs top to bottom in a fresh kernel, with a copy of ``example_notebooks/`` as
its working directory (so files a notebook writes never land in the repository). The
executed notebooks, outputs and widget state included, are written to ``artifacts/notebooks/``
as ``.html`` (and ``.ipynb``), with an ``index.html`` linking them. A cell that fails without
the ``raises-exception`` tag stops the run with the cell's error and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import copy
import html
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "example_notebooks"
ARTIFACTS = ROOT / "artifacts" / "notebooks"


def walkthrough(include_exercises: bool = False) -> list[Path]:
    """The walkthrough notebooks in lecture order, then (optionally) exercises and solutions."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if include_exercises:
        paths += sorted(NOTEBOOKS.glob("exercise_*.ipynb")) + sorted(
            NOTEBOOKS.glob("solution_*.ipynb")
        )
    return paths


def execute(
    path: Path, workdir: Path, kernel_name: str = "python3", timeout: int = 120
) -> nbformat.NotebookNode:
    """Run ``path`` top to bottom in a fresh ``kernel_name`` kernel, in ``workdir``.

    Returns the executed notebook; raises ``nbclient.exceptions.CellExecutionError`` when a
    cell not tagged ``raises-exception`` fails.
    """
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=timeout,
        resources={"metadata": {"path": str(workdir)}},
        store_widget_state=True,
    )
    client.execute()
    return notebook


def write_html(notebook: nbformat.NotebookNode, destination: Path) -> Path:
    """Render ``notebook`` to ``destination``, readable offline.

    With the widget state saved, nbconvert renders only the live widgets, whose JavaScript comes
    from a CDN; without it, each panel falls back to the HTML report it carries beside the widget.
    """
    notebook = copy.deepcopy(notebook)
    notebook.metadata.pop("widgets", None)
    body, _ = HTMLExporter().from_notebook_node(notebook)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(body, encoding="utf-8")
    return destination


def write_index(timings: list[tuple[Path, float]], out: Path) -> Path:
    """A page linking every rendered notebook, with how long each took to run."""
    rows = "\n".join(
        f'<li><a href="{path.stem}.html">{html.escape(path.stem)}</a> ({seconds:.1f} s)</li>'
        for path, seconds in timings
    )
    index = out / "index.html"
    index.write_text(
        "<!doctype html><title>nbtrouble walkthrough</title>"
        f"<h1>nbtrouble walkthrough</h1><ol>{rows}</ol>\n",
        encoding="utf-8",
    )
    return index


def run(paths: list[Path], out: Path, kernel_name: str, timeout: int) -> list[tuple[Path, float]]:
    """Execute and render every notebook; returns each notebook's wall time in seconds."""
    timings = []
    with tempfile.TemporaryDirectory(prefix="nbtrouble-walkthrough-") as scratch:
        workdir = Path(scratch) / "example_notebooks"
        shutil.copytree(NOTEBOOKS, workdir)
        for path in paths:
            start = time.perf_counter()
            notebook = execute(path, workdir, kernel_name, timeout)
            elapsed = time.perf_counter() - start
            page = write_html(notebook, out / f"{path.stem}.html")
            nbformat.write(notebook, out / path.name)
            timings.append((path, elapsed))
            print(f"{path.name:45s} {elapsed:6.1f} s -> {page}", flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also run the exercises and solutions")
    parser.add_argument("--out", type=Path, default=ARTIFACTS, help="where the HTML goes")
    parser.add_argument(
        "--kernel", default="python3", help="Jupyter kernel name (default: python3)"
    )
    parser.add_argument("--timeout", type=int, default=120, help="seconds allowed per cell")
    parser.add_argument("notebooks", nargs="*", type=Path, help="run only these notebooks")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or walkthrough(args.all)
    out = args.out.resolve()
    timings = run(paths, out, args.kernel, args.timeout)
    total = sum(seconds for _, seconds in timings)
    print(f"{len(timings)} notebooks executed in {total:.1f} s; open {write_index(timings, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

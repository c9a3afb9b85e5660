"""Execute the notebooks in notebooks/ top to bottom and write them with their outputs (.ipynb).

    python scripts/run_notebooks.py --root . --out notebooks/rendered [quickstart ...]

The sources are percent-format .py files (jupytext); each runs in a fresh kernel with DD_ROOT and
DD_PRESET set, so it reads the project at --root (prepared presets, its MLflow store). A cell that
raises ends the run with exit status 1 and names the notebook and cell; `make test` runs this on
the micro presets, `make notebooks` renders the committed copies.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ORDER = ("quickstart", "registry_review", "how_dd_works", "experiments")


def execute(name: str, root: Path, out: Path, preset: str, timeout: int) -> float:
    """Run notebooks/<name>.py in a fresh kernel (cwd = root) and write out/<name>.ipynb atomically."""
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    os.environ |= {
        "DD_ROOT": str(root),
        "DD_PRESET": preset,
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    t0 = time.perf_counter()
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(root)}}
    ).execute()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.ipynb.tmp"
    nbformat.write(nb, tmp)
    tmp.replace(out / f"{name}.ipynb")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "names", nargs="*", default=list(ORDER), help=f"notebooks to run (default: {' '.join(ORDER)})"
    )
    ap.add_argument("--root", type=Path, default=Path("."), help="the project the notebooks read")
    ap.add_argument("--out", type=Path, default=NOTEBOOKS / "rendered", help="where the executed .ipynb go")
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = ap.parse_args(argv)
    for name in args.names:
        if name not in ORDER:
            print(f"unknown notebook {name!r}; allowed: {', '.join(ORDER)}", file=sys.stderr)
            return 2
        try:
            seconds = execute(name, args.root.resolve(), args.out.resolve(), args.preset, args.timeout)
        except CellExecutionError as e:
            print(f"notebook {name}: a cell failed\n{e}", file=sys.stderr)
            return 1
        print(f"{name}: executed in {seconds:.1f} s -> {args.out / (name + '.ipynb')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

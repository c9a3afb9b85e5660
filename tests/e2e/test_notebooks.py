"""The notebooks, executed top to bottom on the micro preset by the same command `make notebooks` uses.

The project is a copy of the session's micro pipeline with two registered students of the micro
teacher in its own SQLite store: the pipeline's student, then one trained for half the steps, so the
review notebook has a champion and a challenger with a gate decision between them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from micro_project import PRESET, MicroProject, micro_project, project_env
from servers import ROOT

from ddcore.params import load_preset

NOTEBOOKS = ("quickstart", "registry_review", "how_dd_works", "experiments")


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory) -> MicroProject:
    project = micro_project(tmp_path_factory)
    root = tmp_path_factory.mktemp("notebooks") / "repo"
    shutil.copytree(project.root, root, symlinks=True)
    p = MicroProject(root, project.env, 0, "")
    home = Path(project.env["HOME"])  # the experiments notebook queues a DVC experiment: git needs a user
    home.mkdir(exist_ok=True)
    (home / ".gitconfig").write_text("[user]\n\tname = test\n\temail = test@localhost\n")
    p.ddcore("--quiet", "register", "--preset", PRESET)
    steps = max(1, load_preset(PRESET, root / "params.yaml").dd1.train.steps // 2)
    for stage in ("distill", "evaluate", "bench", "register"):
        p.ddcore("--quiet", stage, "--preset", PRESET, "--set", f"dd1.train.steps={steps}")
    return p


def test_every_notebook_runs_and_shows_its_figures(reviewed, tmp_path):
    out = tmp_path / "rendered"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "run_notebooks.py"),
        "--root",
        str(reviewed.root),
        "--out",
        str(out),
    ]
    done = subprocess.run(
        cmd, env=reviewed.env, cwd=reviewed.root, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for name in NOTEBOOKS:
        cells = json.loads((out / f"{name}.ipynb").read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code and all(c.get("execution_count") for c in code), f"{name}: a cell did not run"
        errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
        assert not errors, f"{name}: {errors[0]['ename']}"
        figures = [o for c in code for o in c["outputs"] if "image/png" in o.get("data", {})]
        assert figures, f"{name}: no figure"


def test_a_failing_cell_fails_the_run(tmp_path):
    """The runner must not swallow an error: point the notebooks at a project with nothing prepared."""
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(ROOT / "params.yaml", empty / "params.yaml")
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "run_notebooks.py"),
        "quickstart",
        "--root",
        str(empty),
        "--out",
        str(tmp_path / "o"),
    ]
    done = subprocess.run(cmd, env=project_env(empty), cwd=empty, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "notebook quickstart: a cell failed" in done.stderr
    assert not (tmp_path / "o" / "quickstart.ipynb").exists()

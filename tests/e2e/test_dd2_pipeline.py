"""DD2 part 1 through real DVC: `micro-dd2` on the micro preset's teacher build (teacher.copy_of),
every stage through the console command, then a no-op repro, and a stage that resumes after a kill.

Works on a copy of the session's micro checkout (tests/fixtures/micro_project.py), so the DD1
tests keep their outputs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import torch
from micro_project import MicroProject, micro_project, run
from safetensors.torch import load_file
from servers import BIN

pytestmark = pytest.mark.slow
DD2 = "micro-dd2"
STAGES = ("dd2-prepare", "samples", "continuous", "ar-diffusion-dsm", "ar-diffusion", "dd2-evaluate")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> MicroProject:
    base = micro_project(tmp_path_factory)
    root = tmp_path_factory.mktemp("dd2") / "repo"
    shutil.copytree(base.root, root, symlinks=True)
    t0 = time.monotonic()
    p = run([str(BIN / "dvc"), "repro", f"dd2-evaluate@{DD2}"], base.env, root, timeout=900)
    return MicroProject(root, base.env, time.monotonic() - t0, p.stdout + p.stderr)


def test_dvc_runs_dd2_on_the_dd1_teacher_build(project):
    log = project.repro_log
    for s in STAGES:
        assert f"Running stage '{s}@{DD2}'" in log, log[-3000:]
    teacher = json.loads((project.root / "models" / DD2 / "teacher" / "_stage.json").read_text())
    source = json.loads((project.root / "models" / "micro" / "teacher" / "_stage.json").read_text())
    assert teacher["fingerprint"] == source["fingerprint"] and teacher["result"]["copied_from"] == "micro"
    rows = json.loads((project.root / "metrics" / DD2 / "eval.json").read_text())["samplers"]
    assert set(rows) == {"teacher", "teacher-continuous", "ar-diffusion", "ar-diffusion-dsm"}
    assert all(r["fid"] > 0 for r in rows.values())
    for name in ("train_log.csv", "continuous_train_log.csv", "dsm_train_log.csv"):
        assert (project.root / "metrics" / DD2 / name).read_text().startswith("step,loss")
    again = run([str(BIN / "dvc"), "repro", f"dd2-evaluate@{DD2}"], project.env, project.root, timeout=300)
    assert "Running stage" not in again.stdout + again.stderr


def test_the_registered_dd2_model_serves_every_evaluated_sampler(project):
    """The registered model carries the folders beside the student that DD2's other samplers read
    (the continuous-input teacher, the DSM model), so each row of eval.json can be served from it."""
    run([str(BIN / "dvc"), "repro", f"dd2-register@{DD2}"], project.env, project.root, timeout=600)
    from ddcore.params import load_preset
    from ddcore.registry.store import load_model

    model = load_model("dd-micro", "champion", f"sqlite:///{project.root / 'mlflow.db'}")
    assert model.unwrap_python_model().preset.method == "dd2"
    request = pd.DataFrame({"label": [1, 2], "seed": [5, 6]})
    for sampler in load_preset(DD2, project.root / "params.yaml").eval.samplers:
        images = model.predict(request, params={"sampler": sampler})
        assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8, sampler


def test_a_killed_training_stage_resumes_to_the_same_model(project, tmp_path):
    """SIGKILL `ddcore ar-diffusion` after its first checkpoint; the rerun resumes to the weights of
    the uninterrupted run (the DVC output)."""
    root = project.root
    student = root / "models" / DD2 / "student"
    want = load_file(str(student / "ar_diffusion.safetensors"))
    shutil.rmtree(student)
    cmd = [str(BIN / "ddcore"), "--root", ".", "--quiet", "ar-diffusion", "--preset", DD2]
    proc = subprocess.Popen(
        cmd, cwd=root, env=project.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (student / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    run(cmd, project.env, root, timeout=300)
    got = load_file(str(student / "ar_diffusion.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-7)
    assert not (student / "checkpoint.pt").exists()

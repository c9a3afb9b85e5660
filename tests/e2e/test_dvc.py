"""Real DVC on a copy of the repository: repro of the micro preset, selective reruns, S3 push/pull.

The pipeline runs once per session (tests/fixtures/micro_project.py); the param-change test works on a
copy of that checkout so other tests keep the original outputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from micro_project import PRESET, TARGETS, MicroProject, micro_project
from servers import moto_s3, s3_keys

from ddcore.params import load_preset

pytestmark = pytest.mark.slow
STAGES = ("prepare", "trajectories", "distill", "evaluate", "bench")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> MicroProject:
    return micro_project(tmp_path_factory)


def ran(log: str, stage: str) -> bool:
    return f"Running stage '{stage}@{PRESET}'" in log


def skipped(log: str, stage: str) -> bool:
    return f"Stage '{stage}@{PRESET}' didn't change, skipping" in log


def tree_hashes(root: Path, rels: list[str]) -> dict[str, str]:
    out = {}
    for rel in rels:
        base = root / rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_repro_runs_every_stage_through_the_console_command(project):
    log = project.repro_log
    for s in STAGES:
        assert ran(log, s), f"stage {s}@{PRESET} did not run:\n{log[-3000:]}"
    assert f"ddcore --root . --quiet distill --preset {PRESET}" in log
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())["stages"]
    assert set(lock) >= {f"{s}@{PRESET}" for s in ("params", *STAGES)}
    assert list(lock[f"params@{PRESET}"]["params"]["params.yaml"]) == [f"presets.{PRESET}"]
    # each stage depends on the resolved values it reads, and those are what it ran with
    deps = {d["path"] for d in lock[f"distill@{PRESET}"]["deps"]}
    assert f"metrics/{PRESET}/params/distill.json" in deps
    resolved = json.loads((project.root / "metrics" / PRESET / "params" / "distill.json").read_text())
    preset = load_preset(PRESET, project.root / "params.yaml")
    assert resolved == {
        "dd1.student": preset.dd1.student.model_dump(mode="json"),
        "dd1.train": preset.dd1.train.model_dump(mode="json"),
    }
    ev = json.loads((project.root / "metrics" / PRESET / "eval.json").read_text())
    assert "teacher" in ev["samplers"] and any(k.startswith("dd1") for k in ev["samplers"])
    assert (project.root / "metrics" / PRESET / "train_log.csv").read_text().startswith("step")
    assert list((project.root / "metrics" / PRESET / "grids").glob("*.png"))
    print(f"dvc repro {' '.join(TARGETS)} (6 stages): {project.repro_seconds:.0f} s")


def test_repro_again_is_a_no_op_and_metrics_show(project):
    p = project.dvc("repro", *TARGETS)
    for s in STAGES:
        assert skipped(p.stdout, s) and not ran(p.stdout, s)
    shown = json.loads(project.dvc("metrics", "show", "--json").stdout)
    flat = json.dumps(shown)
    assert f"metrics/{PRESET}/eval.json" in flat and f"metrics/{PRESET}/bench.json" in flat and "fid" in flat
    plots = project.dvc("plots", "show", "--json").stdout
    assert f"metrics/{PRESET}/fid_vs_steps.csv" in plots and f"metrics/{PRESET}/train_log.csv" in plots


def test_changing_a_param_reruns_only_what_depends_on_it(project, tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(project.root, clone, symlinks=True)
    params = clone / "params.yaml"
    data = yaml.safe_load(params.read_text())
    bench = data["presets"][PRESET].setdefault("bench", {})
    bench["repeats"] = int(bench.get("repeats", 5)) + 1
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    before = tree_hashes(
        clone, [f"models/{PRESET}", f"data/{PRESET}/trajectories", f"metrics/{PRESET}/eval.json"]
    )

    status = json.loads(project.dvc("status", "--json", "--with-deps", *TARGETS, cwd=clone).stdout)
    assert set(status) == {f"params@{PRESET}"}, status  # only the resolver reads params.yaml

    log = project.dvc("repro", *TARGETS, cwd=clone).stdout
    assert ran(log, "params") and ran(log, "bench")
    for s in ("prepare", "trajectories", "distill", "evaluate"):
        assert skipped(log, s), f"{s} reran:\n{log}"
    after = tree_hashes(
        clone, [f"models/{PRESET}", f"data/{PRESET}/trajectories", f"metrics/{PRESET}/eval.json"]
    )
    assert before == after
    b = json.loads((clone / "metrics" / PRESET / "bench.json").read_text())
    assert b["settings"]["repeats"] == bench["repeats"]


def test_s3_remote_push_pull_is_byte_identical(project, tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(project.root, clone, symlinks=True)
    outs = [f"models/{PRESET}/teacher", f"models/{PRESET}/student", f"data/{PRESET}/trajectories"]
    before = tree_hashes(clone, outs)
    assert len(before) >= 5
    with moto_s3(buckets=("ddcore-dvc",)) as s3:
        env = project.env | s3["env"]
        dvc = MicroProject(clone, env, 0, "")
        dvc.dvc("remote", "modify", "--local", "store", "endpointurl", s3["url"])
        push = dvc.dvc("push", "-r", "store", "--with-deps", *TARGETS, timeout=600)
        assert "pushed" in push.stdout
        keys = s3_keys(s3["client"], "ddcore-dvc")
        assert keys and all(k.startswith("store/") for k in keys)

        for rel in outs:
            shutil.rmtree(clone / rel)
        shutil.rmtree(clone / ".dvc" / "cache")
        dvc.dvc("pull", "-r", "store", "--with-deps", *TARGETS, timeout=600)
    after = tree_hashes(clone, outs)
    assert after == before
    st = project.dvc("status", "--json", "--with-deps", *TARGETS, cwd=clone).stdout.strip()
    assert st in ("{}", ""), st

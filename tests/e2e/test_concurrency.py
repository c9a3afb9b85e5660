"""Two processes doing the same work at once, on a copy of the session's micro pipeline: two
trajectory workers on the same shard range, two registrations of the same student. Nothing may be
corrupt, nothing registered twice."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import pytest
from micro_project import PRESET, MicroProject, micro_project
from servers import BIN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> MicroProject:
    base = micro_project(tmp_path_factory)
    root = tmp_path_factory.mktemp("concurrent") / "repo"
    shutil.copytree(base.root, root, symlinks=True)
    return MicroProject(root, base.env, 0, "")


def _both(project: MicroProject, *args: str) -> list[subprocess.CompletedProcess]:
    cmd = [str(BIN / "ddcore"), "--root", str(project.root), "--quiet", *args, "--preset", PRESET]
    procs = [
        subprocess.Popen(
            cmd, cwd=project.root, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_two_trajectory_workers_on_the_same_shards(project):
    traj = project.root / "data" / PRESET / "trajectories"
    want = {p.name: p.read_bytes() for p in traj.glob("shard_*.safetensors")}
    shutil.rmtree(traj)
    shards = ",".join(str(i) for i in range(len(want)))
    for p in _both(project, "trajectories", "--shards", shards):
        assert p.returncode == 0, p.stderr[-2000:]
    got = {p.name: p.read_bytes() for p in traj.glob("shard_*.safetensors")}
    assert got == want  # the same bytes, no shard twice, nothing half-written
    assert not list(traj.glob(".*.tmp"))
    manifest = json.loads((traj / "manifest.json").read_text())
    assert (
        manifest["done"] == manifest["num_pairs"]
        if "done" in manifest
        else len(manifest["shards"]) == len(want)
    )


def test_two_registrations_of_one_student_make_one_version(project):
    results = _both(project, "register")
    for p in results:
        assert p.returncode == 0, p.stderr[-2000:]
    with sqlite3.connect(project.root / "mlflow.db") as con:
        versions = con.execute("select count(*) from model_versions where name = 'dd-micro'").fetchone()[0]
        aliases = dict(
            con.execute(
                "select alias, version from registered_model_aliases where name = 'dd-micro'"
            ).fetchall()
        )
    assert versions == 1 and aliases == {"champion": 1, "challenger": 1}
    reused = [json.loads(p.stdout)["reused"] for p in results]
    assert sorted(reused) == [False, True]

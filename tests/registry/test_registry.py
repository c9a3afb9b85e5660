"""MLflow registry on real stores: a SQLite tracking store, and a real `mlflow server` process whose
artifacts go to an S3 API (moto server) on loopback.

The students are real: the session's micro pipeline (tests/fixtures/micro_project.py) and, for the
promotion gate, a second student distilled from the same trajectories with fewer steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from micro_project import PRESET, MicroProject, micro_project
from mlflow import MlflowClient
from servers import mlflow_server, moto_s3, s3_keys

from ddcore.eval.evaluate import LABEL_PROTOCOL
from ddcore.params import PromoteParams, load_preset
from ddcore.pipeline.layout import Layout
from ddcore.registry import gate, store
from ddcore.registry.gate import Scores, promotion_decision
from ddcore.registry.register import register_student
from ddcore.results import BenchResult, EvalResult
from ddcore.samplers.registry import build_samplers
from ddcore.teachers.loading import load_teacher

pytestmark = pytest.mark.slow
SECRET = "do-not-leak-4f9c2e"


# --------------------------------------------------------------------------------------------
# the gate itself (known answers)
# --------------------------------------------------------------------------------------------
def test_gate_known_answers():
    limits = PromoteParams(max_fid_ratio=1.0, max_latency_ratio=1.10)
    champ = Scores(fid=10.0, sec_per_image=0.020)
    assert promotion_decision(Scores(12.0, 0.001), None, limits).promote  # first version
    assert promotion_decision(Scores(10.0, 0.022), champ, limits).promote  # both limits inclusive
    d = promotion_decision(Scores(10.01, 0.010), champ, limits)
    assert not d.promote and "FID 10.01 > 1 x champion FID 10" in d.reason
    d = promotion_decision(Scores(9.0, 0.0221), champ, limits)
    assert not d.promote and "s/img" in d.reason and d.latency_limit == pytest.approx(0.022)
    d = promotion_decision(
        Scores(11.0, 0.030), champ, PromoteParams(max_fid_ratio=1.2, max_latency_ratio=2.0)
    )
    assert d.promote and d.fid_limit == pytest.approx(12.0)
    assert not promotion_decision(Scores(float("nan"), 0.01), champ, limits).promote
    # the gate compares FIDs of one evaluation protocol only
    same = gate.Champion("3", champ, "n=8000 labels=balanced seed=1 reference=world")
    d = gate.gate_decision(Scores(9.0, 0.010), same.protocol, same, limits)
    assert d.promote and d.champion_version == "3" and d.fid_limit == pytest.approx(10.0)
    for other in ("n=2000 labels=random seed=1 reference=world", None):
        d = gate.gate_decision(
            Scores(1.0, 0.001), same.protocol, dataclasses.replace(same, protocol=other), limits
        )
        assert not d.promote and "another evaluation protocol" in d.reason and d.champion_version == "3"
    assert gate.gate_decision(Scores(1.0, 0.001), same.protocol, None, limits).reason == "no champion yet"


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> MicroProject:
    return micro_project(tmp_path_factory)


@pytest.fixture(scope="module")
def second(project, tmp_path_factory) -> MicroProject:
    """Same teacher and trajectories, a student trained for half the steps: a different model."""
    root = tmp_path_factory.mktemp("second") / "repo"
    shutil.copytree(project.root, root, symlinks=True)
    p = MicroProject(root, project.env, 0, "")
    steps = max(1, load_preset(PRESET, root / "params.yaml").dd1.train.steps // 2)
    for stage in ("distill", "evaluate", "bench"):
        p.ddcore("--quiet", stage, "--preset", PRESET, "--set", f"dd1.train.steps={steps}")
    p.overrides = {"dd1": {"train": {"steps": steps}}}  # type: ignore[attr-defined]
    return p


def layout_of(p: MicroProject, tracking: str) -> Layout:
    return dataclasses.replace(Layout.create(PRESET, root=p.root), tracking_uri=tracking)


def preset_of(p: MicroProject, **promote):
    over = dict(getattr(p, "overrides", {}))
    if promote:
        over["promote"] = promote
    return load_preset(PRESET, p.root / "params.yaml", overrides=over or None)


def scores_of(p: MicroProject) -> Scores:
    preset = preset_of(p)
    ev = EvalResult.load(p.root / "metrics" / PRESET / "eval.json")
    be = BenchResult.load(p.root / "metrics" / PRESET / "bench.json")
    return gate.headline_scores(preset, ev, be)[1]


def assert_no_secret(client: MlflowClient, run_id: str, name: str, version: str) -> None:
    run = client.get_run(run_id)
    blob = json.dumps([run.data.params, run.data.tags])
    mv = client.get_model_version(name, version)
    blob += json.dumps([mv.tags, mv.description])
    assert SECRET not in blob


# --------------------------------------------------------------------------------------------
# SQLite store
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered(project, tmp_path_factory):
    tracking = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    layout = layout_of(project, tracking)
    from ddcore.settings import get_settings

    with pytest.MonkeyPatch.context() as mp:  # a secret in the settings must not reach the registry
        mp.setenv("DD_AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("DD_HF_TOKEN", SECRET)
        get_settings.cache_clear()
        try:
            res = register_student(PRESET, preset_of(project), layout, flow_run_id="flow-run-123")
        finally:
            get_settings.cache_clear()
            if os.environ.get("AWS_SECRET_ACCESS_KEY") == SECRET:  # exported for boto3 by configure()
                del os.environ["AWS_SECRET_ACCESS_KEY"]
    return {"res": res, "tracking": tracking, "layout": layout}


def test_an_eval_scored_against_another_reference_is_refused():
    """eval.json names the reference it read ('world', or the path made absolute against the
    project); the protocol check compares it with the preset's `eval.reference`."""
    scored = {"protocol": {"n_samples": 64, "seed": 3, "labels": LABEL_PROTOCOL["random"]}}

    def check(param: str, scored_name: str | None) -> None:
        preset = load_preset(PRESET, overrides={"eval": {"num_samples": 64, "seed": 3, "reference": param}})
        ref = {} if scored_name is None else {"reference": {"name": scored_name}}
        gate.check_scored_protocol(preset, EvalResult({**scored, **ref}), "eval.json")

    check("world", "world")
    check("refs/val.npz", "/project/refs/val.npz")  # relative param, resolved against the project
    check("/data/refs/val.npz", "/data/refs/val.npz")
    for param, name in [
        ("world", "/project/refs/val.npz"),
        ("refs/val.npz", "world"),
        ("refs/val.npz", "/project/refs/train.npz"),
        ("/data/refs/val.npz", "/other/data/refs/val.npz"),
        ("world", None),
    ]:
        with pytest.raises(ValueError, match=r"eval\.json was scored with reference .*\(preset: "):
            check(param, name)


def test_register_logs_everything(registered, project):
    res, tracking = registered["res"], registered["tracking"]
    c = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    name, version = res["model_name"], res["version"]
    assert name == "dd-micro" and version == "1"
    run = c.get_run(res["run_id"])
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    preset = preset_of(project)
    assert p["dd1.train.steps"] == str(preset.dd1.train.steps) and p["teacher.name"] == "micro"
    assert t["teacher"] == "micro" and t["method"] == "dd1" and t["prefect_flow_run_id"] == "flow-run-123"
    assert t["steps"] == "1" or t["steps"].isdigit()
    assert len(t["git_commit"].split("-")[0]) == 40
    assert t["dvc_data_hash"].endswith(".dir")  # md5 of the trajectory folder from dvc.lock
    assert m["fid"] > 0 and m["sec_per_image"] > 0
    assert any(k.startswith("eval/teacher/") for k in m) and any(k.startswith("bench/") for k in m)
    hist = c.get_metric_history(res["run_id"], "train/loss")
    assert len(hist) >= 2 and hist[0].step < hist[-1].step
    arts = {a.path for a in c.list_artifacts(res["run_id"], "metrics")}
    assert {"metrics/eval.json", "metrics/bench.json", "metrics/train_log.csv", "metrics/grids"} <= arts
    mv = c.get_model_version(name, version)
    assert set(mv.aliases) == {"champion", "challenger"}
    assert mv.tags["decision"] == "champion" and mv.tags["decision_reason"] == "no champion yet"
    assert float(mv.tags["fid"]) == pytest.approx(m["fid"], rel=1e-5)
    assert "FID" in mv.description and "champion" in mv.description
    assert_no_secret(c, res["run_id"], name, version)
    assert res["run_url"].endswith(f"runs/{res['run_id']}")


def test_registering_the_same_student_again_returns_the_version(registered, project):
    again = register_student(PRESET, preset_of(project), registered["layout"])
    assert again["version"] == registered["res"]["version"] and again["reused"]
    # the same record as the first registration (registry.json does not change on a re-run)
    assert {**again, "reused": False} == registered["res"]
    c = MlflowClient(tracking_uri=registered["tracking"], registry_uri=registered["tracking"])
    assert len(c.search_model_versions("name='dd-micro'")) == 1


def test_a_student_rescored_under_another_protocol_is_a_new_version_the_gate_keeps_apart(
    project, tmp_path_factory
):
    """The same student file, evaluated again with another eval seed: a new version (its FID must not
    overwrite the one the first decision used), and no promotion over a champion whose FID came from
    another protocol. An eval.json that does not match the preset's eval params is refused."""
    tracking = f"sqlite:///{tmp_path_factory.mktemp('mlflow-protocol') / 'mlflow.db'}"
    root = tmp_path_factory.mktemp("rescored") / "repo"
    shutil.copytree(project.root, root, symlinks=True)
    rescored = MicroProject(root, project.env, 0, "")
    seed = preset_of(project).eval.seed + 1
    with pytest.raises(ValueError, match=r"eval\.json was scored with seed .*re-run the evaluate stage"):
        register_student(
            PRESET,
            load_preset(PRESET, root / "params.yaml", overrides={"eval": {"seed": seed}}),
            layout_of(rescored, tracking),
        )
    rescored.ddcore("--quiet", "evaluate", "--preset", PRESET, "--set", f"eval.seed={seed}")
    r1 = register_student(PRESET, preset_of(project), layout_of(project, tracking))
    preset2 = load_preset(PRESET, root / "params.yaml", overrides={"eval": {"seed": seed}})
    r2 = register_student(PRESET, preset2, layout_of(rescored, tracking))
    assert (r1["version"], r2["version"]) == ("1", "2") and r1["decision"]["promote"]
    assert not r2["decision"]["promote"] and "another evaluation protocol" in r2["decision"]["reason"]
    c = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    v1, v2 = c.get_model_version("dd-micro", "1"), c.get_model_version("dd-micro", "2")
    assert v1.tags["student_sha256"] == v2.tags["student_sha256"]
    assert v1.tags["eval_protocol"] != v2.tags["eval_protocol"] == gate.eval_protocol(preset2)
    assert v2.tags["champion_eval_protocol"] == v1.tags["eval_protocol"]
    assert str(c.get_model_version_by_alias("dd-micro", "champion").version) == "1"
    # registering either again finds its own version
    assert register_student(PRESET, preset2, layout_of(rescored, tracking))["version"] == "2"
    again = register_student(PRESET, preset_of(project), layout_of(project, tracking))
    assert (
        again["version"] == "1"
        and again["reused"]
        and again["scores"]["fid"] == pytest.approx(float(v1.tags["fid"]))
    )


def test_pyfunc_loads_and_predicts_images(registered, project):
    mlflow.set_tracking_uri(registered["tracking"])
    mlflow.set_registry_uri(registered["tracking"])
    model = mlflow.pyfunc.load_model("models:/dd-micro@champion")
    labels, seeds = [0, 1, 2, 1], [11, 12, 13, 12]
    out = model.predict(pd.DataFrame({"label": labels, "seed": seeds}))
    size = preset_of(project).teacher.world.image_size
    assert out.dtype == np.uint8 and out.shape == (4, size, size, 3)
    assert np.array_equal(out[1], out[3])  # same label + seed -> same image
    assert not np.array_equal(out[0], out[1])
    again = model.predict({"label": labels[:2], "seed": seeds[:2]})  # dict input works too
    assert np.array_equal(again, out[:2])

    # the model reproduces the preset's own sampler exactly
    preset = preset_of(project)
    layout = registered["layout"]
    teacher, _ = load_teacher(preset, layout.teacher_dir, device="cpu")
    (s,) = build_samplers([gate.headline_sampler(preset)], teacher, layout.student_dir, preset)
    ref = (
        (s.images(torch.tensor(labels), seeds).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    )
    assert np.array_equal(out, ref.numpy())
    teacher_imgs = model.predict({"label": [0], "seed": [11]}, params={"sampler": "teacher"})
    assert teacher_imgs.shape == (1, size, size, 3)


@pytest.mark.parametrize("outcome", ["stays-challenger", "promoted"])
def test_promotion_gate_with_two_students(project, second, tmp_path, outcome):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    a, b = scores_of(project), scores_of(second)
    # order and gate chosen from the measured numbers so that the outcome is known in advance
    first, new = (project, second)
    f_first, f_new = a, b
    if outcome == "stays-challenger":
        gate = {"max_fid_ratio": 0.5 * f_new.fid / f_first.fid, "max_latency_ratio": 1000.0}
    else:
        gate = {"max_fid_ratio": 2.0 * f_new.fid / f_first.fid, "max_latency_ratio": 1000.0}
    r1 = register_student(PRESET, preset_of(first), layout_of(first, tracking))
    r2 = register_student(PRESET, preset_of(new, **gate), layout_of(new, tracking))
    assert (r1["version"], r2["version"]) == ("1", "2")
    c = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    champ = str(c.get_model_version_by_alias("dd-micro", "champion").version)
    chall = str(c.get_model_version_by_alias("dd-micro", "challenger").version)
    mv2 = c.get_model_version("dd-micro", "2")
    assert chall == "2"
    assert mv2.tags["compared_to_version"] == "1"
    assert float(mv2.tags["champion_fid"]) == pytest.approx(f_first.fid, rel=1e-5)
    if outcome == "promoted":
        assert champ == "2" and mv2.tags["decision"] == "champion" and r2["decision"]["promote"]
    else:
        assert champ == "1" and mv2.tags["decision"] == "challenger" and not r2["decision"]["promote"]
        assert "FID" in mv2.tags["decision_reason"] and "stays **challenger**" in mv2.description


# --------------------------------------------------------------------------------------------
# tracking server + S3 artifacts
# --------------------------------------------------------------------------------------------
def test_tracking_server_with_s3_artifacts(project, tmp_path, monkeypatch):
    with (
        moto_s3(buckets=("ddcore-mlflow",)) as s3,
        mlflow_server(tmp_path, "s3://ddcore-mlflow/artifacts", s3["env"]) as srv,
    ):
        # the client talks only to the server (proxied artifacts): no S3 credentials here
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(k, raising=False)
        res = register_student(PRESET, preset_of(project), layout_of(project, srv.url))
        keys = s3_keys(s3["client"], "ddcore-mlflow")
        assert any(k.endswith("metrics/eval.json") for k in keys), keys[:20]
        assert any(k.endswith(".safetensors") and "/student/" in k for k in keys), "model files must be in S3"
        assert res["run_url"].startswith(srv.url)

        model = store.load_model("dd-micro", "champion", tracking_uri=srv.url)
        out = model.predict({"label": [1, 2], "seed": [5, 6]})
        assert out.dtype == np.uint8 and out.shape[0] == 2


def test_local_store_with_s3_artifacts_by_settings(project, tmp_path, monkeypatch):
    """No server: SQLite tracking, artifacts straight to S3, configured only by DD_* variables."""
    from ddcore.settings import get_settings

    with moto_s3(buckets=("ddcore-artifacts",)) as s3:
        for k in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("DD_S3_BUCKET", "ddcore-artifacts")
        monkeypatch.setenv("DD_S3_ENDPOINT_URL", s3["url"])
        monkeypatch.setenv("DD_AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("DD_AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        get_settings.cache_clear()
        try:
            tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
            res = register_student(PRESET, preset_of(project), layout_of(project, tracking))
            keys = s3_keys(s3["client"], "ddcore-artifacts")
            assert keys and all(k.startswith("mlflow/") for k in keys)
            assert any(k.endswith("student/student.safetensors") for k in keys)
            model = store.load_model("dd-micro", res["version"], tracking_uri=tracking)
            assert model.predict({"label": [3], "seed": [9]}).shape[0] == 1
        finally:
            get_settings.cache_clear()
            for k in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                os.environ.pop(k, None)  # exported by store.configure from the settings


def test_compiled_sampler_rows_log_under_valid_metric_names(tmp_path):
    """bench rows such as "dd1-1step+compile" carry a character MLflow rejects in metric names."""
    assert (
        store.metric_name("bench/world/dd1-1step+compile/speedup") == "bench/world/dd1-1step_compile/speedup"
    )
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=tracking)
    run_id = c.create_run(c.create_experiment("names")).info.run_id
    rows = [
        {"sampler": "teacher+compile", "speedup": 1.0},
        {"sampler": "dd1-1step+compile", "speedup": 9.5, "name": "x"},
    ]
    store.log_table_metrics(c, run_id, "bench/world", rows)
    assert c.get_run(run_id).data.metrics == {
        "bench/world/teacher_compile/speedup": 1.0,
        "bench/world/dd1-1step_compile/speedup": 9.5,
    }

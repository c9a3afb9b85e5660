"""Stage bookkeeping: paths, completion markers, fingerprints that follow exactly the params a stage
reads, and retries that only retry transient failures. (The stages themselves run end to end in
the DVC, CLI and flow tests.)"""

from __future__ import annotations

import dataclasses

import pytest

from ddcore.methods.dd1.stages import traj_dir, trajectory_shards
from ddcore.params import Preset
from ddcore.pipeline import plan
from ddcore.pipeline.layout import Layout
from ddcore.pipeline.markers import MARKER, StageRun
from ddcore.results import EvalResult, write_fid_curve
from ddcore.retry import with_retries

PRESET = Preset.model_validate(
    {
        "family": "llamagen",
        "teacher": {"name": "micro", "world": {"image_size": 16}},
        "dd1": {"trajectories": {"num_pairs": 100, "shard_size": 32}},
    }
)


def with_(preset: Preset, **sections) -> Preset:
    """with_(p, dd1__train__lr=1e-2): a copy with one nested value replaced."""
    data = preset.model_dump()
    for dotted, value in sections.items():
        *path, key = dotted.split("__")
        node = data
        for part in path:
            node = node[part]
        node[key] = value
    return Preset.model_validate(data)


@pytest.fixture
def layout(tmp_path):
    return Layout.create("micro", root=tmp_path)


def finish(layout: Layout, stage: str, fp: str, result: dict | None = None, files=()) -> dict:
    run = StageRun(stage, "micro", PRESET, layout, fp, plan.marker_path(layout, PRESET, stage))
    return run.finish(result or {}, files)


def complete(layout: Layout, stage: str, fp: str):
    return StageRun(stage, "micro", PRESET, layout, fp, plan.marker_path(layout, PRESET, stage)).complete()


def test_layout_under_a_root(layout, tmp_path):
    assert layout.teacher_dir == tmp_path / "models" / "micro" / "teacher"
    assert traj_dir(layout) == tmp_path / "data" / "micro" / "trajectories"
    assert layout.student_dir == tmp_path / "models" / "micro" / "student"
    assert layout.eval_json == tmp_path / "metrics" / "micro" / "eval.json"
    assert layout.bench_json == tmp_path / "metrics" / "micro" / "bench.json"
    assert layout.params_file == tmp_path / "params.yaml"
    assert layout.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_the_stages_come_from_the_method():
    assert plan.stage_names(PRESET) == ("prepare", "trajectories", "distill", "evaluate", "bench", "register")


def test_trajectory_shards_cover_all_pairs():
    assert trajectory_shards(PRESET) == [0, 1, 2, 3]  # 100 pairs in shards of 32
    assert trajectory_shards(with_(PRESET, dd1__trajectories__num_pairs=64)) == [0, 1]


def test_marker_completion_follows_fingerprint_and_files(layout):
    out = layout.metrics_dir / "bench.json"
    out.parent.mkdir(parents=True)
    out.write_text('{"x": 1}')
    finish(layout, "bench", "fp1", {"ok": True}, [out])
    assert complete(layout, "bench", "fp1").result == {"ok": True}
    assert complete(layout, "bench", "fp2") is None  # other params
    out.write_text('{"x": 2}')
    assert complete(layout, "bench", "fp1") is None  # output changed since
    out.unlink()
    assert complete(layout, "bench", "fp1") is None  # output deleted (e.g. by DVC)


def test_directory_stage_marker_lives_inside_its_output(layout):
    finish(layout, "prepare", "abc", {"kind": "tiny"})
    assert (layout.teacher_dir / MARKER).is_file()
    assert complete(layout, "prepare", "abc")
    finish(layout, "trajectories", "t")
    assert (traj_dir(layout) / MARKER).is_file()


def test_fingerprints_follow_the_params_each_stage_reads(layout):
    fp = {"prepare": plan.stage_fingerprint(layout, PRESET, "prepare")}
    with pytest.raises(FileNotFoundError, match="stage 'prepare' of preset 'micro' has not completed"):
        plan.stage_fingerprint(layout, PRESET, "trajectories")
    finish(layout, "prepare", fp["prepare"])
    for s in ("trajectories", "distill"):
        fp[s] = plan.stage_fingerprint(layout, PRESET, s)
        finish(layout, s, fp[s])

    # training params change distill only; eval params do not touch distill
    assert plan.stage_fingerprint(layout, with_(PRESET, dd1__train__lr=1e-2), "distill") != fp["distill"]
    assert plan.stage_fingerprint(layout, with_(PRESET, eval__num_samples=7), "distill") == fp["distill"]
    # the flow map changes the trajectories and what the teacher-assisted samplers evaluate
    flow = with_(PRESET, dd1__flow__steps=8)
    assert plan.stage_fingerprint(layout, flow, "trajectories") != fp["trajectories"]
    assert plan.stage_fingerprint(layout, flow, "prepare") == fp["prepare"]
    # a changed upstream output changes everything downstream of it
    ev = plan.stage_fingerprint(layout, PRESET, "evaluate")
    finish(layout, "distill", "retrained")
    assert plan.stage_fingerprint(layout, PRESET, "evaluate") != ev
    # registering into another store is other work; so is another headline sampler
    finish(layout, "evaluate", "e")
    finish(layout, "bench", "b")
    reg = plan.stage_fingerprint(layout, PRESET, "register")
    other_store = dataclasses.replace(layout, tracking_uri="http://127.0.0.1:1")
    assert plan.stage_fingerprint(other_store, PRESET, "register") != reg
    assert plan.stage_fingerprint(layout, with_(PRESET, headline="dd1-2step"), "register") != reg


def test_the_teacher_sampling_reruns_prepare(layout):
    """The tiny world's quality gate samples with teacher.sampling, so prepare must depend on it
    (it once did not: a changed sampling never re-ran the gate)."""
    base = plan.stage_fingerprint(layout, PRESET, "prepare")
    other = with_(PRESET, teacher__sampling={"top_k": 5})
    assert plan.stage_fingerprint(layout, other, "prepare") != base
    assert plan.stage_params(other, "prepare")["teacher.sampling"]["top_k"] == 5


def test_retries_only_transient_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "ok"

    assert with_retries(flaky, "download", attempts=4, delay_s=0) == "ok" and len(calls) == 3

    for exc in (FileNotFoundError("no such file"), ValueError("bad value")):
        calls.clear()

        def fails(exc=exc):
            calls.append(1)
            raise exc

        with pytest.raises(type(exc)):
            with_retries(fails, "x", attempts=4, delay_s=0)
        assert len(calls) == 1

    calls.clear()
    with pytest.raises(TimeoutError):
        with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(TimeoutError()), "x", 3, 0)
    assert len(calls) == 3  # gives up after the last attempt


def test_fid_curve_csv(tmp_path):
    ev = EvalResult.from_dict(
        {
            "samplers": {
                "teacher": {"steps": 16, "fid": 3.0},
                "dd1-1step": {"steps": 1, "fid": 9.5},
                "x": {"fid": 1.0},
            }
        }
    )
    path = tmp_path / "c.csv"
    write_fid_curve(ev, path)
    assert path.read_text().splitlines() == ["sampler,steps,fid", "dd1-1step,1,9.5", "teacher,16,3"]


def test_results_are_read_typed_and_refuse_other_shapes():
    with pytest.raises(ValueError, match="no 'samplers' mapping"):
        EvalResult.from_dict({"teacher": {"fid": 1.0}})


def test_prefect_retry_condition_separates_transient_from_permanent():
    from prefect.states import Completed, Failed

    from flows.distill import retry_transient

    assert retry_transient(None, None, Failed(data=ConnectionError("x")))
    assert retry_transient(None, None, Failed(data=OSError("disk")))
    assert not retry_transient(None, None, Failed(data=FileNotFoundError("gone")))
    assert not retry_transient(None, None, Failed(data=ValueError("bad param")))
    assert not retry_transient(None, None, Failed(data=NotImplementedError("missing piece")))
    assert not retry_transient(None, None, Completed(data=1))


def test_stage_params_are_exactly_what_each_stage_reads():
    assert set(plan.stage_params(PRESET, "distill")) == {"dd1.student", "dd1.train"}
    assert plan.stage_params(PRESET, "bench")["eval.samplers"] == PRESET.eval.samplers
    assert plan.stage_params(PRESET, "prepare")["teacher.world"]["image_size"] == 16
    assert set(plan.stage_params(PRESET, "register")) == {"promote", "method", "headline", "eval.samplers"}
    with pytest.raises(ValueError, match="allowed: prepare, trajectories"):
        plan.stage_params(PRESET, "train")


def test_stage_files_change_only_where_inputs_change(tmp_path):
    files = {p.stem: p for p in plan.write_stage_params(PRESET, tmp_path)}
    assert set(files) == set(plan.stage_names(PRESET))
    before = {k: (p.read_text(), p.stat().st_mtime_ns) for k, p in files.items()}
    plan.write_stage_params(with_(PRESET, bench__repeats=9), tmp_path)
    after = {k: (p.read_text(), p.stat().st_mtime_ns) for k, p in files.items()}
    changed = {k for k in files if before[k] != after[k]}
    assert changed == {"bench"}  # unchanged files are not even rewritten

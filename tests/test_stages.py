"""Stage bookkeeping: paths, completion markers, fingerprints that follow exactly the params a stage
reads, and retries that only retry transient failures. (The stages themselves run end to end in
test_dvc / test_cli / test_flows.)"""

from __future__ import annotations

import dataclasses

import pytest

from ddcore import stages
from ddcore.params import Preset

PRESET = Preset.model_validate(
    {
        "family": "llamagen",
        "teacher": {"name": "micro", "world": {"image_size": 16}},
        "trajectories": {"num_pairs": 100, "shard_size": 32},
    }
)


def with_(preset: Preset, **sections) -> Preset:
    data = preset.model_dump()
    for dotted, value in sections.items():
        sec, key = dotted.split("__")
        data[sec][key] = value
    return Preset.model_validate(data)


@pytest.fixture
def layout(tmp_path):
    return stages.Layout.create("micro", root=tmp_path)


def test_layout_under_a_root(layout, tmp_path):
    assert layout.teacher_dir == tmp_path / "models" / "micro" / "teacher"
    assert layout.traj_dir == tmp_path / "data" / "micro" / "trajectories"
    assert layout.student_dir == tmp_path / "models" / "micro" / "student"
    assert layout.eval_json == tmp_path / "metrics" / "micro" / "eval.json"
    assert layout.bench_json == tmp_path / "metrics" / "micro" / "bench.json"
    assert layout.params_file == tmp_path / "params.yaml"
    assert layout.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_trajectory_shards_cover_all_pairs():
    assert stages.trajectory_shards(PRESET) == [0, 1, 2, 3]  # 100 pairs in shards of 32
    assert stages.trajectory_shards(with_(PRESET, trajectories__num_pairs=64)) == [0, 1]


def test_marker_completion_follows_fingerprint_and_files(layout):
    out = layout.metrics_dir / "bench.json"
    out.parent.mkdir(parents=True)
    out.write_text('{"x": 1}')
    stages._finish(layout, "bench", "fp1", {"ok": True}, [out])
    assert stages._complete(layout, "bench", "fp1").result == {"ok": True}
    assert stages._complete(layout, "bench", "fp2") is None  # other params
    out.write_text('{"x": 2}')
    assert stages._complete(layout, "bench", "fp1") is None  # output changed since
    out.unlink()
    assert stages._complete(layout, "bench", "fp1") is None  # output deleted (e.g. by DVC)


def test_directory_stage_marker_lives_inside_its_output(layout):
    stages._finish(layout, "prepare", "abc", {"kind": "tiny"})
    assert (layout.teacher_dir / stages.MARKER).is_file()
    assert stages._complete(layout, "prepare", "abc")


def test_fingerprints_follow_the_params_each_stage_reads(layout):
    fp = {s: None for s in stages.STAGES}
    fp["prepare"] = stages.stage_fingerprint(layout, PRESET, "prepare")
    with pytest.raises(FileNotFoundError, match="stage 'prepare' of preset 'micro' has not completed"):
        stages.stage_fingerprint(layout, PRESET, "trajectories")
    stages._finish(layout, "prepare", fp["prepare"], {})
    for s in ("trajectories", "distill"):
        fp[s] = stages.stage_fingerprint(layout, PRESET, s)
        stages._finish(layout, s, fp[s], {})

    # sampling changes the trajectories, not the teacher
    other = with_(PRESET, teacher__sampling={"top_k": 5})
    assert stages.stage_fingerprint(layout, other, "prepare") == fp["prepare"]
    assert stages.stage_fingerprint(layout, other, "trajectories") != fp["trajectories"]
    # training params change distill only; eval params do not touch distill
    assert stages.stage_fingerprint(layout, with_(PRESET, train__lr=1e-2), "distill") != fp["distill"]
    assert stages.stage_fingerprint(layout, with_(PRESET, eval__num_samples=7), "distill") == fp["distill"]
    # a changed upstream output changes everything downstream of it
    ev = stages.stage_fingerprint(layout, PRESET, "evaluate")
    stages._finish(layout, "distill", "retrained", {})
    assert stages.stage_fingerprint(layout, PRESET, "evaluate") != ev
    # registering into another store is other work
    stages._finish(layout, "evaluate", "e", {})
    stages._finish(layout, "bench", "b", {})
    reg = stages.stage_fingerprint(layout, PRESET, "register")
    other_store = dataclasses.replace(layout, tracking_uri="http://127.0.0.1:1")
    assert stages.stage_fingerprint(other_store, PRESET, "register") != reg


def test_retries_only_transient_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "ok"

    assert stages.with_retries(flaky, "download", attempts=4, delay_s=0) == "ok" and len(calls) == 3

    for exc in (FileNotFoundError("no such file"), ValueError("bad value")):
        calls.clear()

        def fails(exc=exc):
            calls.append(1)
            raise exc

        with pytest.raises(type(exc)):
            stages.with_retries(fails, "x", attempts=4, delay_s=0)
        assert len(calls) == 1

    calls.clear()
    with pytest.raises(TimeoutError):
        stages.with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(TimeoutError()), "x", 3, 0)
    assert len(calls) == 3  # gives up after the last attempt


def test_missing_piece_is_a_clear_not_implemented_error():
    with pytest.raises(
        NotImplementedError, match=r"the test needs ddcore\.not_there\.f, which does not exist yet"
    ):
        stages._piece("ddcore.not_there", "f", "the test")
    with pytest.raises(NotImplementedError, match=r"ddcore\.stages\.nope"):
        stages._piece("ddcore.stages", "nope", "the test")


def test_fid_curve_csv(tmp_path):
    ev = {
        "samplers": {
            "teacher": {"steps": 16, "fid": 3.0},
            "dd1-1step": {"steps": 1, "fid": 9.5},
            "x": {"fid": 1.0},
        }
    }
    path = tmp_path / "c.csv"
    stages.write_fid_curve(ev, path)
    assert path.read_text().splitlines() == ["sampler,steps,fid", "dd1-1step,1,9.5", "teacher,16,3"]


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
    assert set(stages.stage_params(PRESET, "distill")) == {"student", "train"}
    assert stages.stage_params(PRESET, "bench")["eval.samplers"] == PRESET.eval.samplers
    assert "teacher.sampling" not in stages.stage_params(PRESET, "prepare")
    assert stages.stage_params(PRESET, "prepare")["teacher.world"]["image_size"] == 16
    with pytest.raises(ValueError, match="allowed: prepare, trajectories"):
        stages.stage_params(PRESET, "train")


def test_stage_files_change_only_where_inputs_change(tmp_path):
    files = {p.stem: p for p in stages.write_stage_params(PRESET, tmp_path)}
    assert set(files) == set(stages.STAGES)
    before = {k: (p.read_text(), p.stat().st_mtime_ns) for k, p in files.items()}
    stages.write_stage_params(with_(PRESET, bench__repeats=9), tmp_path)
    after = {k: (p.read_text(), p.stat().st_mtime_ns) for k, p in files.items()}
    changed = {k for k in files if before[k] != after[k]}
    assert changed == {"bench"}  # unchanged files are not even rewritten

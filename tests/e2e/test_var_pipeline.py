"""The VAR family through the same pipeline stages as LlamaGen (`micro-var`: test scale).

prepare (VQVAE, VAR, judge) -> trajectories over scales -> DD1 VAR student -> evaluate -> bench,
through the runner the Prefect tasks and the DVC stages call.
"""

from __future__ import annotations

import json

import pytest

from ddcore.methods.dd1.students import load_student
from ddcore.methods.dd1.var_student import DD1VARStudent
from ddcore.params import load_preset
from ddcore.pipeline.layout import layout_for
from ddcore.pipeline.runner import run_stage
from ddcore.teachers.loading import load_teacher
from ddcore.teachers.var.tiny_world import check_var_quality, scale_prefix_accuracy

PRESET = "micro-var"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("micro_var")
    preset = load_preset(PRESET)
    layout = layout_for(PRESET, root=root)
    out = {"layout": layout, "preset": preset}
    for stage in ("prepare", "trajectories", "distill", "evaluate", "bench"):
        out[stage] = run_stage(PRESET, preset, layout, stage, progress=False)
    return out


def test_prepare_trains_a_var_world(run):
    info = run["prepare"]
    assert info["family"] == "var" and info["kind"] == "tiny"
    report = info["report"]
    assert report["patch_nums"] == [1, 2, 3, 4, 6, 8]
    assert report["teacher"]["sampling"]["cfg_scale"] == 5.0  # the preset's sampling, not a fixed one
    assert set(report["teacher"]["sample_accuracy_per_class"]) and report["teacher"]["num_samples"] == 500
    assert 0.0 <= report["vq"]["recon_accuracy"] <= 1.0 and report["vq"]["recon_accuracy_ratio"] > 0


def test_scale_prefix_probe_ends_at_reconstructions(run):
    """k = every scale given is the plain reconstruction: its accuracy is the judge's on the
    reconstructions, independent of sampling; k = 0 is ordinary teacher sampling."""
    preset, layout = run["preset"], run["layout"]
    teacher, evaluator = load_teacher(preset, layout.teacher_dir)
    res = scale_prefix_accuracy(teacher, evaluator, preset.teacher.world, preset.teacher.sampling, n=40)
    assert sorted(res) == list(range(len(teacher.step_sizes) + 1))
    other = preset.teacher.sampling.model_copy(update={"cfg_scale": 1.0, "top_p": 0.5})
    again = scale_prefix_accuracy(teacher, evaluator, preset.teacher.world, other, n=40)
    last = len(teacher.step_sizes)
    assert res[last] == again[last]  # nothing sampled: the same images whatever the sampling


def test_student_is_a_var_student_over_scales(run):
    layout = run["layout"]
    teacher, _ = load_teacher(run["preset"], layout.teacher_dir, device="cpu")
    student, meta = load_student(layout.student_dir, teacher, device="cpu")
    assert isinstance(student, DD1VARStudent)
    assert meta["t_list"] == [0, 3] and student.num_steps == 6 and int(student.data_len(3)) == 14


def test_eval_and_bench_cover_every_sampler(run):
    layout = run["layout"]
    ev = json.loads(layout.eval_json.read_text())
    names = {"teacher", "dd1-1step", "dd1-2step", "dd1-teacher-0-3", "onestep-baseline"}
    assert set(ev["samplers"]) == names
    for name in names:
        row = ev["samplers"][name]
        for key in ("fid", "is", "precision", "recall", "class_acc", "teacher_nll", "steps", "n_samples"):
            assert key in row, (name, key)
        assert row["n_samples"] == 64
    assert ev["samplers"]["teacher"]["steps"] == 6
    assert ev["samplers"]["dd1-1step"]["steps"] == 1 and ev["samplers"]["dd1-2step"]["steps"] == 2
    assert ev["samplers"]["dd1-teacher-0-3"]["steps"] == 4  # three teacher scales, one student pass
    bench = json.loads(layout.bench_json.read_text())
    world = bench["cases"]["world"]
    assert world["teacher"]["ar_steps"] == 6 and world["teacher"]["seq_len"] == 130
    assert world["samplers"]["dd1-1step"]["speedup"] > 0
    assert (layout.metrics_dir / "grids").is_dir()


def test_var_quality_gates_follow_the_world():
    tiny = load_preset("tiny-var").teacher.world
    micro = load_preset(PRESET).teacher.world
    report = {
        "vq": {"val_rec_mse": 0.2},
        "var": {"val_nll": 6.0, "uniform_nll": 6.24},
        "evaluator": {"val_accuracy": 0.5},
        "teacher": {"sample_accuracy": 0.2},
    }
    problems = check_var_quality(report, tiny)
    assert len(problems) == 4 and any("recognised" in p and p.endswith("< 0.9") for p in problems)
    assert any("reconstructions" in p for p in problems)  # no judge-on-reconstruction measurement
    report["vq"]["recon_accuracy_ratio"] = 0.97
    assert len(check_var_quality(report, tiny)) == 3
    assert check_var_quality(report, micro) == []  # test scale: gates off

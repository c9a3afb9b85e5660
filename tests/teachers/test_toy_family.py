"""A third teacher family, registered from outside `ddcore/`, through the real pipeline:
prepare -> trajectories -> distill -> evaluate at micro scale (tests/fixtures/toy_family.py)."""

from __future__ import annotations

import json

import pytest
import torch
import toy_family
import yaml
from dd1_toy import chi2_pvalue

from ddcore.methods.dd1.stages import traj_dir
from ddcore.methods.dd1.students import load_student
from ddcore.methods.dd1.trajectories import TrajectoryDataset
from ddcore.params import ParamsError
from ddcore.pipeline.layout import Layout
from ddcore.pipeline.presets import resolve_preset
from ddcore.pipeline.runner import run_pipeline
from ddcore.teachers.loading import load_teacher

pytestmark = pytest.mark.slow  # the real pipeline, prepare to evaluate

SAMPLERS = ["teacher", "dd1-1step", "dd1-2step", "onestep-baseline"]


def toy_preset(root) -> dict:
    return {
        "family": "toy",
        "teacher": {"name": "toy", "world": {"seed": 0}, "sampling": {"cfg_scale": 2.0}},
        "dd1": {
            "flow": {"steps": 8},
            "trajectories": {"num_pairs": 192, "shard_size": 64, "batch_size": 64, "seed": 0},
            "student": {"t_list": [0, 8], "split_t": 16},
            "train": {
                "steps": 40,
                "batch_size": 16,
                "lr": 3e-3,
                "warmup_steps": 2,
                "val_pairs": 32,
                "val_every": 10,
                "ckpt_every": 10,
            },
        },
        "eval": {
            "num_samples": 96,
            "batch_size": 48,
            "reference": str(root / "models" / "toy" / "teacher" / toy_family.REFERENCE),
            "samplers": SAMPLERS,
        },
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    (root / "params.yaml").write_text(yaml.safe_dump({"presets": {"toy": toy_preset(root)}}))
    toy_family.register()
    try:
        preset = resolve_preset("toy", [], root / "params.yaml")
        layout = Layout.create("toy", root=root)
        out = run_pipeline(
            "toy", preset, layout, ["prepare", "trajectories", "distill", "evaluate"], progress=False
        )
        yield {"root": root, "preset": preset, "layout": layout, "out": out}
    finally:
        toy_family.unregister()


def test_an_unregistered_family_is_refused_with_the_registered_ones(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"presets": {"toy": toy_preset(tmp_path)}}))
    with pytest.raises(ParamsError, match="unknown family 'toy'; allowed: llamagen, var"):
        resolve_preset("toy", [], tmp_path / "params.yaml")


def test_the_toy_world_is_prepared_and_loads(run):
    assert run["out"]["prepare"]["kind"] == "tiny" and run["out"]["prepare"]["family"] == "toy"
    teacher, evaluator = load_teacher(run["preset"], run["layout"].teacher_dir)
    assert isinstance(teacher, toy_family.ToyTeacher) and evaluator is not None


def test_trajectories_follow_the_exact_teacher_distribution(run):
    """The flow map is distribution-preserving: the first token of each stored pair, per class,
    fits the exact marginal of the guided Markov chain."""
    teacher, _ = load_teacher(run["preset"], run["layout"].teacher_dir)
    ds = TrajectoryDataset(traj_dir(run["layout"]))
    assert len(ds) == 192
    tokens, labels = ds.tokens.long(), ds.labels.long()
    sampling = run["preset"].teacher.sampling
    for c in range(toy_family.CLASSES):
        first = tokens[labels == c, 0]
        counts = torch.bincount(first, minlength=toy_family.VOCAB)
        assert chi2_pvalue(counts, teacher.exact_marginals(c, sampling)[0]) > 1e-3


def test_the_dd1_student_of_the_toy_family_trains(run):
    teacher, _ = load_teacher(run["preset"], run["layout"].teacher_dir)
    student, meta = load_student(run["layout"].student_dir, teacher)
    assert meta["teacher_family"] == "toy" and meta["t_list"] == [0, 8]
    log = (run["layout"].train_log).read_text().splitlines()
    rows = [dict(zip(log[0].split(","), r.split(","), strict=True)) for r in log[1:]]
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])


def test_every_sampler_is_evaluated(run):
    ev = json.loads(run["layout"].eval_json.read_text())
    assert ev["sampler_order"] == SAMPLERS and set(ev["samplers"]) == set(SAMPLERS)
    for name, row in ev["samplers"].items():
        assert row["n_samples"] == 96 and row["fid"] >= 0 and torch.isfinite(torch.tensor(row["fid"])), name
    assert ev["samplers"]["teacher"]["steps"] == 16 and ev["samplers"]["dd1-1step"]["steps"] == 1
    assert ev["reference"]["kind"] == "npz-images"

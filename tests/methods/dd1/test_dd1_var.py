"""DD1 for VAR end to end on a small random VAR teacher in the official layout: trajectories over
scales, student training, re-loading, and the 1-step / 2-step / teacher-assisted samplers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from dd1_toy import small_train_params
from var_helpers import NUM_CLASSES, PATCH_NUMS, small_var, small_vqvae

from ddcore.methods.dd1.flowmap import FlowChooser, FlowSolver
from ddcore.methods.dd1.samplers import DD1Sampler, DD1TeacherAssistedSampler, FlowTeacherSampler
from ddcore.methods.dd1.students import load_student
from ddcore.methods.dd1.train import train_student
from ddcore.methods.dd1.trajectories import TrajectoryDataset, generate_trajectories
from ddcore.methods.dd1.var_student import DD1VARStudent
from ddcore.params import DD1TrainParams as TrainParams
from ddcore.params import FlowParams, SamplingParams, StudentParams, TrajectoryParams
from ddcore.teachers.var.teacher import VARTeacher

SAMPLING = SamplingParams(cfg_scale=2.0, top_k=20, top_p=0.95)  # guidance ramped to w = 2, top-k then top-p
FLOW = FlowParams(steps=16)
SP = StudentParams(t_list=[0, 2], split_t=3)  # t counts scales: data_len 0 / 5; split after 14 positions
STARTS = [0, 1, 5, 14, 30]  # data_len(t) for PATCH_NUMS (1, 2, 3, 4)


def _teacher() -> VARTeacher:
    return VARTeacher(small_var(std=0.3), small_vqvae())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Trajectories and a student trained on them (shared by the tests below)."""
    root = tmp_path_factory.mktemp("var_dd1")
    teacher = _teacher()
    man = generate_trajectories(
        teacher,
        SAMPLING,
        FLOW,
        TrajectoryParams(num_pairs=96, shard_size=48, batch_size=48, seed=3),
        root / "traj",
        progress=False,
    )
    tp = small_train_params(steps=40, batch_size=16, lr=3e-3, val_every=10)
    summary = train_student(teacher, root / "traj", SP, tp, root / "student", progress=False)
    return {"root": root, "teacher": teacher, "manifest": man, "summary": summary}


def test_trajectories_are_the_flow_teacher_samples(world):
    """A stored pair is (noise, the teacher's flow-chooser sample from that noise), per seed."""
    teacher, ds = world["teacher"], TrajectoryDataset(world["root"] / "traj")
    assert world["manifest"].teacher["family"] == "var"
    eps, tok, lab = ds[5]
    assert eps.shape == (teacher.seq_len, teacher.token_dim) and tok.shape == (teacher.seq_len,)
    chooser = FlowChooser(teacher.codebook, FlowSolver.from_params(FLOW))
    again = teacher.generate(torch.tensor([lab]), SAMPLING, eps[None], chooser=chooser)[0]
    assert torch.equal(again, tok)
    # several codes per scale, so the map from noise is not trivial
    assert len({tuple(ds[i][1][5:14].tolist()) for i in range(10)}) > 1


def test_student_is_the_var_student_and_reloads(world):
    teacher = world["teacher"]
    student, meta = load_student(world["root"] / "student", teacher, device="cpu")
    assert isinstance(student, DD1VARStudent)
    assert meta["teacher_family"] == "var" and meta["t_list"] == [0, 2] and meta["split_t"] == 3
    assert [int(student.data_len(t)) for t in range(len(PATCH_NUMS) + 1)] == STARTS
    assert student.num_steps == len(PATCH_NUMS)
    # training learnt something: the last logged loss is below the first
    with open(world["root"] / "student" / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert rows[-1]["val_acc_t2"] not in ("", None)


def test_t_list_is_checked_in_scales(world, tmp_path):
    tp = TrainParams(steps=2, batch_size=8, val_pairs=8, val_every=1, ckpt_every=10)
    with pytest.raises(ValueError, match=r"scales given as data\) must be in \[0, 4\)"):
        train_student(world["teacher"], world["root"] / "traj", StudentParams(t_list=[0, 4]), tp, tmp_path)


def test_samplers_scale_semantics(world):
    teacher = world["teacher"]
    student, _ = load_student(world["root"] / "student", teacher, device="cpu")
    labels, seeds = torch.arange(6) % NUM_CLASSES, list(range(100, 106))
    one = DD1Sampler(student, teacher, "1step", split_t=3)
    two = DD1Sampler(student, teacher, "2step", t2=2, split_t=3)
    t1, t2 = one.tokens(labels, seeds), two.tokens(labels, seeds)
    assert t1.shape == (6, teacher.seq_len) and (t1 >= 0).all() and (t1 < teacher.vocab_size).all()
    # the second step keeps the first two scales (5 positions) of the first pass
    assert torch.equal(t2[:, :5], t1[:, :5])
    # the same as the student's own few-step loop in vector space
    vec, tok = student.sample_vectors(labels, teacher.noise(seeds).half().float(), [0, 2], split_t=3)
    assert torch.equal(two._tokens_of(vec, tok), t2)
    img = two.images(labels, seeds)
    assert img.shape == (6, 3, 8, 8) and torch.isfinite(img).all()
    with pytest.raises(ValueError, match=r"0 < t2 < 4"):
        DD1Sampler(student, teacher, "2step", t2=4)

    # teacher-assisted: n = 0, m = S is the flow teacher itself, no student involved
    flow = FlowTeacherSampler(teacher, SAMPLING, FLOW)
    whole = DD1TeacherAssistedSampler(student, teacher, 0, 4, SAMPLING, FLOW, split_t=3)
    assert torch.equal(whole.tokens(labels, seeds), flow.tokens(labels, seeds))
    assert whole.steps == 4
    # n = 1, m = 3: scale 0 from the student, scales 1..2 from the teacher given that prefix, then a pass
    mid = DD1TeacherAssistedSampler(student, teacher, 1, 3, SAMPLING, FLOW, split_t=3)
    got = mid.tokens(labels, seeds)
    assert mid.steps == 1 + 2 + 1 and mid.name == "dd1-teacher-1-3"
    assert torch.equal(got[:, :1], t1[:, :1])
    chooser = FlowChooser(teacher.codebook, FlowSolver.from_params(FLOW))
    eps = teacher.noise(seeds).half().float()
    gen = teacher.generate(labels, SAMPLING, eps, chooser=chooser, prefix=t1[:, :1], stop=14)
    assert torch.equal(got[:, :14], gen[:, :14])


def test_student_of_another_family_is_refused(world, tmp_path):
    from dd1_toy import small_llamagen_teacher

    with pytest.raises(ValueError, match="belongs to a var teacher, not to a llamagen one"):
        load_student(world["root"] / "student", small_llamagen_teacher(), device="cpu")


def test_trajectory_dir_of_another_teacher_is_refused(world, tmp_path: Path):
    other = VARTeacher(small_var(seed=7, std=0.3), small_vqvae())
    tp = TrainParams(steps=2, batch_size=8, val_pairs=8, val_every=1, ckpt_every=10)
    with pytest.raises(ValueError, match="trajectories come from teacher"):
        train_student(other, world["root"] / "traj", SP, tp, tmp_path)

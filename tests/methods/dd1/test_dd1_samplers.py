"""DD1 samplers: 1-step, 2-step (same noise), teacher-assisted, flow teacher, one-step baseline."""

from __future__ import annotations

import pytest
import torch
from dd1_toy import chi2_pvalue, make_small_trajectories, small_llamagen_teacher

from ddcore.methods.dd1.flowmap import FlowChooser, FlowSolver
from ddcore.methods.dd1.samplers import (
    DD1Sampler,
    DD1TeacherAssistedSampler,
    FlowTeacherSampler,
)
from ddcore.methods.dd1.student import DD1Student
from ddcore.methods.dd1.train import train_student
from ddcore.params import (
    DD1Params,
    DD1TrainParams,
    FlowParams,
    Preset,
    SamplingParams,
    StudentParams,
    TeacherParams,
)
from ddcore.samplers.base import ImageSampler, TeacherSampler
from ddcore.samplers.baseline import OneStepBaselineSampler
from ddcore.samplers.registry import build_samplers

SAMPLING = SamplingParams()
FLOW = FlowParams(steps=16)


@pytest.fixture(scope="module")
def setup():
    teacher = small_llamagen_teacher(0)
    torch.manual_seed(1)
    student = DD1Student.from_teacher(teacher.gpt, teacher.codebook)
    with torch.no_grad():  # a random but non-degenerate student (the teacher's head is not zero here)
        for p in (student.tok_embeddings.weight, student.final_layer_conti.linear.weight):
            p.normal_(0, 0.5)
    return teacher, student.eval()


LABELS = torch.tensor([0, 3, 7, 9, 1])
SEEDS = [11, 12, 13, 14, 15]


def test_one_step(setup):
    teacher, student = setup
    s = DD1Sampler(student, teacher, "1step", split_t=10)
    assert isinstance(s, ImageSampler) and s.name == "dd1-1step" and s.steps == 1
    eps = teacher.noise(SEEDS).half().float()
    vec, tok = student.predict_vectors(eps, LABELS, torch.zeros(5, dtype=torch.long), 10)
    out = s.tokens(LABELS, SEEDS)
    assert torch.equal(out[:, :10], tok[:, :10])
    assert torch.equal(out[:, 10:], student.nearest_indices(vec)[:, 10:])
    torch.testing.assert_close(s.images(LABELS, SEEDS), teacher.decode_vectors(vec))
    # per-sample randomness: a sub-batch gives the same rows
    assert torch.equal(s.tokens(LABELS[1:3], SEEDS[1:3]), out[1:3])


def test_two_step_reuses_the_noise(setup):
    teacher, student = setup
    t2 = 6
    one = DD1Sampler(student, teacher, "1step").tokens(LABELS, SEEDS)
    s = DD1Sampler(student, teacher, "2step", t2=t2)
    assert s.name == "dd1-2step" and s.steps == 2
    two = s.tokens(LABELS, SEEDS)
    assert torch.equal(two[:, :t2], one[:, :t2])
    eps = teacher.noise(SEEDS).half().float()
    x = torch.cat([teacher.codebook[one[:, :t2]], eps[:, t2:]], dim=1)
    _, want = student.predict_vectors(x, LABELS, torch.full((5,), t2), 16)
    assert torch.equal(two, want)
    with pytest.raises(ValueError):
        DD1Sampler(student, teacher, "2step", t2=None)


def test_teacher_assisted(setup):
    teacher, student = setup
    n, m = 4, 10
    s = DD1TeacherAssistedSampler(student, teacher, n, m, SAMPLING, FLOW)
    assert s.name == f"dd1-teacher-{n}-{m}" and s.steps == 1 + (m - n) + 1
    out = s.tokens(LABELS, SEEDS)
    one = DD1Sampler(student, teacher, "1step").tokens(LABELS, SEEDS)
    assert torch.equal(out[:, :n], one[:, :n])
    eps = teacher.noise(SEEDS).half().float()
    chooser = FlowChooser(teacher.codebook, FlowSolver.from_params(FLOW))
    gen = teacher.generate(LABELS, SAMPLING, eps, chooser=chooser, prefix=one[:, :n], stop=m)
    assert torch.equal(out[:, n:m], gen[:, n:m])
    x = torch.cat([teacher.codebook[gen[:, :m]], eps[:, m:]], dim=1)
    _, want = student.predict_vectors(x, LABELS, torch.full((5,), m), 16)
    assert torch.equal(out, want)
    # n = 0: the teacher makes the first m tokens alone, exactly the flow teacher's
    s0 = DD1TeacherAssistedSampler(student, teacher, 0, m, SAMPLING, FLOW)
    assert s0.steps == m + 1
    flow = FlowTeacherSampler(teacher, SAMPLING, FLOW).tokens(LABELS, SEEDS)
    assert torch.equal(s0.tokens(LABELS, SEEDS)[:, :m], flow[:, :m])
    # m = L: no final student step
    full = DD1TeacherAssistedSampler(student, teacher, 0, teacher.seq_len, SAMPLING, FLOW)
    assert full.steps == teacher.seq_len and torch.equal(full.tokens(LABELS, SEEDS), flow)
    with pytest.raises(ValueError):
        DD1TeacherAssistedSampler(student, teacher, 8, 8, SAMPLING)


def test_onestep_baseline_samples_the_marginals(setup):
    teacher, _ = setup
    L, V = teacher.seq_len, teacher.vocab_size
    g = torch.Generator().manual_seed(0)
    marg = torch.softmax(2 * torch.randn(L, V, generator=g), -1)
    s = OneStepBaselineSampler(marg, teacher)
    assert s.name == "onestep-baseline" and s.steps == 1
    n = 2000
    tok = s.tokens(torch.zeros(n, dtype=torch.long), list(range(n)))
    for pos in (0, 7, 15):
        counts = torch.bincount(tok[:, pos], minlength=V)
        assert chi2_pvalue(counts, marg[pos]) > 1e-3
        assert chi2_pvalue(counts, marg[(pos + 1) % L]) < 1e-6
    assert s.images(torch.zeros(2, dtype=torch.long), [1, 2]).shape == (2, 3, 8, 8)


def test_build_samplers_from_a_trained_student(tmp_path):
    teacher = small_llamagen_teacher(0)
    make_small_trajectories(tmp_path / "traj")
    train_student(
        teacher,
        tmp_path / "traj",
        StudentParams(t_list=[0, 6], split_t=12),
        DD1TrainParams(steps=2, batch_size=8, val_pairs=8, val_every=1, warmup_steps=0),
        tmp_path / "student",
        device="cpu",
        progress=False,
    )
    preset = Preset(
        family="llamagen", teacher=TeacherParams(name="tiny", sampling=SAMPLING), dd1=DD1Params(flow=FLOW)
    )
    names = ["teacher", "teacher-flow", "dd1-1step", "dd1-2step", "dd1-teacher-2-6", "onestep-baseline"]
    samplers = build_samplers(names, teacher, tmp_path / "student", preset)
    assert [s.name for s in samplers] == names
    assert [s.steps for s in samplers] == [16, 16, 1, 2, 1 + 4 + 1, 1]
    assert isinstance(samplers[0], TeacherSampler)
    assert samplers[2].split_t == 12 and samplers[3].t2 == 6
    for s in samplers:
        img = s.images(LABELS[:2], SEEDS[:2])
        assert img.shape == (2, 3, 8, 8) and float(img.min()) >= 0.0 and float(img.max()) <= 1.0
        if hasattr(s, "tokens_and_images"):  # one run gives what tokens() and images() give
            tok, img2 = s.tokens_and_images(LABELS[:2], SEEDS[:2])
            assert torch.equal(tok, s.tokens(LABELS[:2], SEEDS[:2])) and torch.equal(img2, img)
    with pytest.raises(ValueError, match="unknown sampler"):
        build_samplers(["dd1-3step"], teacher, tmp_path / "student", preset)


def test_compiled_variant_shares_weights_and_leaves_the_sampler_alone(setup):
    teacher, student = setup
    s = DD1Sampler(student, teacher, "2step", t2=6, split_t=10)
    fast = s.compiled()
    assert fast.name == "dd1-2step+compile" and fast.steps == 2 and fast.t2 == 6
    assert fast.teacher.is_compiled and fast.teacher.gpt is teacher.gpt and not teacher.is_compiled
    assert fast.student is not student and fast.student.output.weight is student.output.weight
    assert s.name == "dd1-2step" and s.student is student and "forward" not in vars(student)


def test_compiled_variant_needs_a_compilable_teacher(setup):
    """A compiled student is only ever timed against a teacher compiled the same way."""
    teacher, student = setup
    s = DD1Sampler(student, teacher, "1step")
    s.teacher = object()  # a teacher family without compile()
    assert getattr(s, "compiled", None) is None
    with pytest.raises(AttributeError, match="no compile"):
        s.compiled()


@pytest.mark.slow
def test_compiled_samplers_match_eager(setup):
    """Real inductor compiles on CPU: the compiled student pass and VQ decode give the eager
    tokens and images (1-step, and 2-step whose second pass starts from a different X_t)."""
    torch._dynamo.reset()
    teacher, student = setup
    for s in (DD1Sampler(student, teacher, "1step", split_t=10), DD1Sampler(student, teacher, "2step", t2=6)):
        fast = s.compiled()
        tok, img = s.tokens_and_images(LABELS, SEEDS)
        ftok, fimg = fast.tokens_and_images(LABELS, SEEDS)
        assert torch.equal(ftok, tok)
        torch.testing.assert_close(fimg, img, atol=1e-5, rtol=1e-5)
    ts = TeacherSampler(teacher, SAMPLING)
    torch.testing.assert_close(ts.compiled().teacher.decode(tok), teacher.decode(tok), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()

"""evaluate_samplers end to end on a stand-in world: fixed image banks as samplers, a fixed random
conv net as the feature extractor, a prefix-independent table as the teacher's token model."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import RandomConvEvaluator

from ddcore.eval.evaluate import EVAL_SEED_BASE, eval_labels, eval_seeds, evaluate_samplers, grid_plan
from ddcore.eval.fidelity import reference_from_images, tiny_extractor, to_uint8
from ddcore.eval.report import render_results_table
from ddcore.params import EvalParams, ParamsError, SamplingParams, load_preset
from ddcore.sampling import logits_to_probs

N, L, V, C = 64, 6, 12, 4


class StandInTeacher:
    name = "stand-in"
    family = "test"
    num_classes = C
    image_size = 16
    seq_len = L
    vocab_size = V
    device = torch.device("cpu")

    def __init__(self):
        self.table = torch.randn(L, V, generator=torch.Generator().manual_seed(0)) * 2

    def teacher_forced_probs(self, tokens, labels, params: SamplingParams):
        p = logits_to_probs(self.table, params.temperature, params.top_k, params.top_p)
        return p.unsqueeze(0).expand(tokens.shape[0], -1, -1)

    def decode(self, tokens):
        raise AssertionError("stand-in samplers are not TeacherSampler; decode must not be called")


class BankSampler:
    """Image i of the evaluation is bank[i] (+ shift); tokens come from the teacher's table
    (teacher-like) or uniformly at random."""

    def __init__(self, name, bank, teacher, shift=0.0, random_tokens=False, steps=1):
        self.name, self.bank, self.teacher, self.shift, self.random_tokens = (
            name,
            bank,
            teacher,
            shift,
            random_tokens,
        )
        self.steps = steps

    def _idx(self, seeds):
        return [(s - EVAL_SEED_BASE) % self.bank.shape[0] for s in seeds]

    def tokens(self, labels, seeds):
        rows = []
        probs = torch.softmax(self.teacher.table, dim=-1)
        for s in seeds:
            g = torch.Generator().manual_seed(int(s) + (7 if self.random_tokens else 0))
            if self.random_tokens:
                rows.append(torch.randint(0, V, (L,), generator=g))
            else:
                rows.append(torch.multinomial(probs, 1, generator=g).squeeze(1))
        return torch.stack(rows)

    def images(self, labels, seeds):
        return (self.bank[self._idx(seeds)] + self.shift).clamp(0, 1)


@pytest.fixture
def world():
    g = torch.Generator().manual_seed(1)
    bank = torch.rand(N, 3, 16, 16, generator=g) * 0.7 + 0.1
    return bank, StandInTeacher()


def test_labels_and_seeds_are_reproducible_and_disjoint():
    assert torch.equal(eval_labels(10, 50, 3), eval_labels(10, 50, 3))
    assert not torch.equal(eval_labels(10, 50, 3), eval_labels(10, 50, 4))
    assert set(eval_seeds(100, 0)).isdisjoint(eval_seeds(100, 1))
    assert min(eval_seeds(10, 0)) >= EVAL_SEED_BASE
    labels, seeds, ncol = grid_plan(1000, 4, 0)
    assert ncol == 4 and len(seeds) == labels.numel() == 32 and labels[0] == 207


def test_balanced_labels_give_every_class_its_share_in_a_seeded_order():
    lab = eval_labels(10, 2005, 3, balanced=True)
    counts = torch.bincount(lab, minlength=10)
    assert counts.tolist() == [201] * 5 + [200] * 5  # n // C, the first n % C classes once more
    assert torch.equal(lab, eval_labels(10, 2005, 3, balanced=True))
    assert not torch.equal(lab, eval_labels(10, 2005, 4, balanced=True))
    assert not torch.equal(lab[:10], torch.arange(10))  # shuffled, not in class order
    # random labels (LlamaGen's protocol, the default) are not balanced at this size
    assert torch.bincount(eval_labels(10, 2005, 3), minlength=10).tolist() != counts.tolist()
    with pytest.raises(ParamsError, match=r"presets\.micro\.eval\.labels: .*'random' or 'balanced'"):
        load_preset("micro", overrides={"eval": {"labels": "stratified"}})


def test_evaluate_samplers_identical_vs_shifted(world, tmp_path):
    bank, teacher = world
    ext = tiny_extractor(RandomConvEvaluator(num_classes=C), name="ddcore-test-eval")
    ref = reference_from_images(to_uint8(bank), ext, "bank")
    samplers = [
        BankSampler("teacher", bank, teacher, steps=L),
        BankSampler("shifted", bank, teacher, shift=0.2, random_tokens=True, steps=1),
    ]
    params = EvalParams(num_samples=N, batch_size=24, seed=0)
    out = evaluate_samplers(
        samplers, teacher, ext, ref, params, tmp_path, kid_subset_size=32, kid_subsets=5, progress=False
    )

    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk["teacher_name"] == "stand-in"
    assert on_disk["reference"]["name"] == "bank" and on_disk["reference"]["n"] == N
    keys = {"fid", "is", "precision", "recall", "kid", "class_acc", "teacher_nll", "teacher_nll_std",
            "marginal_tv", "steps", "n_samples", "sec_per_image"}  # fmt: skip
    for name in ("teacher", "shifted"):
        assert keys <= set(on_disk["samplers"][name]), name
        assert on_disk["samplers"][name]["n_samples"] == N
    t, s = on_disk["samplers"]["teacher"], on_disk["samplers"]["shifted"]
    assert abs(t["fid"]) < 1e-4
    assert s["fid"] > 100 * max(abs(t["fid"]), 1e-6)
    assert t["precision"] == 1.0 and t["recall"] == 1.0
    assert s["precision"] < 0.5
    assert (t["steps"], s["steps"]) == (L, 1)
    # the teacher's own tokens are likely under its table; uniform tokens are not
    assert t["teacher_nll"] < s["teacher_nll"]
    assert t["teacher_support_miss"] == 0.0
    # the teacher row's marginal TV is the sampling-noise floor; random tokens sit above it
    assert 0 < t["marginal_tv"] < s["marginal_tv"]
    assert 0.0 <= t["class_acc"] <= 1.0
    assert out["samplers"]["teacher"]["fid"] == t["fid"]

    from PIL import Image

    for name in ("teacher", "shifted"):
        im = Image.open(tmp_path / f"grid_{name}.png")
        # 8 columns x one row per class; 16-px images enlarged 4x to 64-px cells, 2-px padding
        assert im.size == (8 * 66 + 2, C * 66 + 2)
    assert (tmp_path / "fid_vs_steps.png").stat().st_size > 1000

    table = render_results_table(tmp_path / "eval.json")
    assert table.index("| teacher |") < table.index("| shifted |")  # evaluation order, not alphabetical


def test_reference_dimension_mismatch_is_reported(world, tmp_path):
    from ddcore.eval.fidelity import EvaluationUnavailable, Reference

    bank, teacher = world
    ext = tiny_extractor(RandomConvEvaluator(num_classes=C), name="ddcore-test-eval2")
    bad = Reference("wrong", "npz-stats", "x", torch.zeros(5).numpy(), torch.eye(5).numpy(), 10)
    with pytest.raises(EvaluationUnavailable, match="5-d"):
        evaluate_samplers(
            [BankSampler("teacher", bank, teacher)], teacher, ext, bad, EvalParams(num_samples=8, batch_size=8),
            tmp_path, progress=False,
        )  # fmt: skip


class GreedySampler:
    """The same teacher with argmax instead of its multinomial draw: sharper, lower-NLL, collapsed."""

    name, steps = "greedy", 16

    def __init__(self, teacher, params):
        self.teacher, self.params = teacher, params

    def tokens(self, labels, seeds):
        from ddcore.sampling import GreedyChooser

        return self.teacher.sample(labels, seeds, self.params, GreedyChooser())

    def images(self, labels, seeds):
        return self.teacher.decode(self.tokens(labels, seeds))


def test_evaluate_with_a_real_small_llamagen_teacher(tmp_path):
    from llamagen_helpers import three_class_teacher

    from ddcore.samplers.base import TeacherSampler
    from ddcore.tiny.evaluator import EvaluatorConfig, TinyEvaluator

    teacher = three_class_teacher()
    params = SamplingParams(cfg_scale=1.5, top_k=8)
    evaluator = TinyEvaluator(EvaluatorConfig(image_size=8, num_classes=3, width=8, feature_dim=16)).eval()
    ext = tiny_extractor(evaluator, name="ddcore-test-real")
    ref_labels = eval_labels(3, 48, 99)
    ref = reference_from_images(
        to_uint8(teacher.decode(teacher.sample(ref_labels, range(48), params))), ext, "t"
    )
    samplers = [TeacherSampler(teacher, params), GreedySampler(teacher, params)]
    res = evaluate_samplers(
        samplers, teacher, evaluator, ref, EvalParams(num_samples=48, batch_size=16), tmp_path, progress=False
    )
    t, g = res["samplers"]["teacher"], res["samplers"]["greedy"]
    assert res["protocol"]["nll_sampling"]["top_k"] == 8  # taken from the teacher sampler
    assert t["teacher_support_miss"] == 0.0 and g["teacher_support_miss"] == 0.0
    assert g["teacher_nll"] < t["teacher_nll"]  # argmax tokens are the most likely ones
    assert g["marginal_tv"] > t["marginal_tv"]  # greedy collapses to one sequence per class
    assert g["fid"] > t["fid"] >= 0
    assert (tmp_path / "grid_teacher.png").is_file() and (tmp_path / "grid_greedy.png").is_file()

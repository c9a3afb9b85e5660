"""DD2 part 1 on small real teachers: teacher samples, the continuous-input teacher, the
AR-diffusion model (its KV-cached sampler against its teacher-forced features), exact resume."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch
from dd1_toy import small_llamagen_teacher
from safetensors.torch import load_file
from var_helpers import small_var, small_vqvae

from ddcore.methods.dd2.ardiffusion import new_ar_diffusion
from ddcore.methods.dd2.continuous import (
    continuous_teacher,
    fit_embedding,
    held_out_nll,
    load_continuous,
    new_continuous_gpt,
    train_continuous,
)
from ddcore.methods.dd2.init_train import head_config, load_ar_diffusion, train_ar_diffusion
from ddcore.methods.dd2.ode import nearest_code
from ddcore.methods.dd2.samples import SampleSet, generate_samples, shard_path
from ddcore.params import (
    ARDiffusionParams,
    ContinuousParams,
    SamplesParams,
    SamplingParams,
    TrainParams,
    load_preset,
)
from ddcore.samplers.registry import build_samplers
from ddcore.teachers.var.teacher import VARTeacher

SAMPLING = SamplingParams(cfg_scale=2.0, top_k=20)
SP = SamplesParams(num_samples=96, shard_size=32, batch_size=16, val_samples=16)


def _train(**kw) -> TrainParams:
    base = dict(steps=8, batch_size=8, lr=2e-3, warmup_steps=2, val_every=2, ckpt_every=3, ema_decay=0.9)
    return TrainParams(**{**base, **kw})


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def teacher():
    return small_llamagen_teacher(0)


@pytest.fixture(scope="module")
def samples(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    generate_samples(teacher, SAMPLING, SP, out, progress=False)
    return out


def test_samples_are_the_teachers_draws_and_resume_shard_by_shard(teacher, samples, tmp_path):
    data = SampleSet(samples)
    assert data.tokens.shape == (96, teacher.seq_len) and data.n_val == 16 and data.n_train == 80
    assert torch.equal(data.labels, torch.arange(96) % teacher.num_classes)
    # a partial run writes no manifest; the rest resumes, a truncated shard is redone, same bytes
    out = tmp_path / "s"
    generate_samples(teacher, SAMPLING, SP, out, shard_ids=[0, 2], progress=False)
    assert not (out / "manifest.json").exists()
    shard_path(out, 2).write_bytes(shard_path(out, 2).read_bytes()[:100])
    generate_samples(teacher, SAMPLING, SP, out, progress=False)
    for k in range(3):
        assert shard_path(out, k).read_bytes() == shard_path(samples, k).read_bytes()
    # another sampling configuration replaces the shards rather than mixing them in
    other = SamplingParams(cfg_scale=1.0)
    generate_samples(teacher, other, SP, out, progress=False)
    assert not torch.equal(SampleSet(out).tokens, data.tokens)


def test_the_continuous_teacher_reads_codes_and_vectors_the_same_way(teacher):
    gpt = new_continuous_gpt(teacher, 128)  # width >= min(V, D): an exact fit is reachable
    fit = fit_embedding(
        gpt.tok_embeddings.embed, teacher.codebook, teacher.gpt.tok_embeddings.weight, 500, 3e-3
    )
    assert fit["fit_rel_error"] < 0.05 * fit["fit_rel_error_start"]
    cont = continuous_teacher(teacher, gpt.eval())
    tok = torch.randint(0, teacher.vocab_size, (3, teacher.seq_len))
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        a = cont.teacher_forced_logits(tok, labels, SAMPLING)
        b = cont.vector_forced_logits(teacher.codebook[tok], labels, SAMPLING)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_continuous_teacher_training_keeps_the_teacher_and_resumes_exactly(teacher, samples, tmp_path):
    # an MLP too narrow for an exact fit (48 < min(V, D)): the fine-tuning recovers part of the gap
    cp = ContinuousParams(mlp_width=48, fit_steps=300, fit_lr=3e-3, train=_train(steps=20, lr=1e-3))
    straight = train_continuous(teacher, samples, cp, SAMPLING, tmp_path / "a", device="cpu", progress=False)
    assert straight["fit_rel_error"] < straight["fit_rel_error_start"]
    assert straight["kept"] == "fine-tuned" and straight["nll_fine_tuned"] < straight["nll_fit"]
    kl = [float(r["val_kl"]) for r in _rows(tmp_path / "a" / "train_log.csv")]
    assert kl[-1] < kl[0]
    stopped = train_continuous(
        teacher, samples, cp, SAMPLING, tmp_path / "b", device="cpu", progress=False, stop_at=5
    )
    assert stopped == {"stopped_at": 5}
    resumed = train_continuous(teacher, samples, cp, SAMPLING, tmp_path / "b", device="cpu", progress=False)
    assert resumed["nll"] == straight["nll"]
    a, b = (load_file(str(tmp_path / d / "continuous.safetensors")) for d in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    cont = load_continuous(teacher, tmp_path / "a")
    data = SampleSet(samples)
    assert held_out_nll(cont, *data.val(), SAMPLING) == pytest.approx(straight["nll"], rel=1e-6)


def test_an_exact_fit_is_kept_over_a_fine_tuning_that_moves_it(teacher, samples, tmp_path):
    cp = ContinuousParams(mlp_width=128, fit_steps=500, fit_lr=3e-3, train=_train(steps=4, lr=1e-3))
    s = train_continuous(teacher, samples, cp, SAMPLING, tmp_path, device="cpu", progress=False)
    assert s["fit_rel_error"] < 1e-3 and s["kept"] == "fit"
    assert s["nll_ratio"] == pytest.approx(1.0, abs=1e-3) and s["nll_fine_tuned"] > s["nll_fit"]


@pytest.fixture(scope="module")
def continuous(teacher, samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("continuous")
    cp = ContinuousParams(mlp_width=128, fit_steps=300, fit_lr=3e-3, train=_train(steps=2))
    train_continuous(teacher, samples, cp, SAMPLING, out, device="cpu", progress=False)
    return load_continuous(teacher, out)


@pytest.mark.parametrize("loss", ["gts", "dsm"])
def test_ar_diffusion_training_learns_and_resumes_exactly(teacher, continuous, samples, tmp_path, loss):
    ap = ARDiffusionParams(head_width=32, head_depth=2, noise_draws=2, train=_train(steps=10))
    args = (teacher, continuous, samples, ap, SAMPLING, loss)
    straight = train_ar_diffusion(*args, tmp_path / "a", device="cpu", progress=False)
    rows = _rows(tmp_path / "a" / "train_log.csv")
    assert float(rows[-1]["val_gts"]) < float(rows[0]["val_gts"])
    assert train_ar_diffusion(*args, tmp_path / "b", device="cpu", progress=False, stop_at=5) == {
        "stopped_at": 5
    }
    train_ar_diffusion(*args, tmp_path / "b", device="cpu", progress=False)
    a, b = (load_file(str(tmp_path / d / "ar_diffusion.safetensors")) for d in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    assert [r["loss"] for r in rows] == [r["loss"] for r in _rows(tmp_path / "b" / "train_log.csv")]
    assert straight["loss"] == loss and load_ar_diffusion(teacher, tmp_path / "a").training is False
    # the student folder alone (what the registry stores) makes the sampler: no continuous-teacher folder
    alone = tmp_path / "registered" / "student"
    shutil.copytree(tmp_path / "a", alone)
    (sampler,) = build_samplers(["ar-diffusion"], teacher, alone, load_preset("micro-dd2"))
    assert sampler.tokens(torch.tensor([1, 2]), [5, 6]).shape == (2, teacher.seq_len)


def test_head_only_steps_leave_the_backbone_untouched(teacher, continuous, samples, tmp_path):
    ap = ARDiffusionParams(
        head_width=32, head_depth=2, noise_draws=2, head_only_steps=10, train=_train(steps=6)
    )
    train_ar_diffusion(
        teacher, continuous, samples, ap, SAMPLING, "gts", tmp_path, device="cpu", progress=False
    )
    trained = load_ar_diffusion(teacher, tmp_path)
    start = new_ar_diffusion(continuous, head_config(teacher, ap))
    for (name, p), q in zip(trained.named_parameters(), start.parameters(), strict=True):
        same = torch.equal(p, q)
        assert same != name.startswith("head."), name  # the head moved, nothing else did


def _randomised(model):
    """A non-zero head (it starts at v = 0, which would make every token the nearest code of its noise)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_kv_cached_sampling_equals_the_teacher_forced_model(teacher, continuous, family):
    """Each token the sampler solves with its cached features is the one the teacher-forced pass
    (features of the sampled prefix) solves from the same noise."""
    base = continuous if family == "llamagen" else VARTeacher(small_var(std=0.3), small_vqvae())
    ap = ARDiffusionParams(head_width=32, head_depth=2)
    model = _randomised(new_ar_diffusion(base, head_config(base, ap)))
    labels, eps = torch.tensor([0, 1, 2]) % base.num_classes, base.noise([1, 2, 3])
    tok = model.sample(labels, eps, 4)
    with torch.no_grad():
        z = model.features(base.codebook[tok], labels)
        again = model.solve(z, eps, 4)
    assert tok.shape == (3, base.seq_len) and torch.equal(again, tok)
    assert not torch.equal(
        tok, nearest_code(eps, base.codebook)
    )  # the head moves the tokens (v = 0 would not)

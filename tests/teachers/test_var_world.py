"""The VAR tiny world's training pieces, and its part-by-part build, at toy size (the full world
is trained by the pipeline)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from var_helpers import random_images, small_var_config, small_vq_config, small_vqvae

from ddcore.models.var import VAR
from ddcore.params import SamplingParams, TinyWorldParams
from ddcore.teachers.var.teacher import VARTeacher
from ddcore.teachers.var.tiny_world import (
    check_var_quality,
    encode_images,
    init_var_weights,
    load_tiny_var_world,
    prepare_tiny_var_world,
    tiny_var_configs,
    token_nll,
    train_var,
    train_var_vqvae,
    var_stage_hashes,
)
from ddcore.tiny.data import make_dataset, to_model_range


def test_tiny_var_configs():
    vq, var = tiny_var_configs(TinyWorldParams())
    assert vq.patch_nums == var.patch_nums == (1, 2, 3, 4, 6, 8)
    assert vq.image_size == 32 and var.seq_len == 130
    assert (vq.vocab_size, vq.Cvae) == (512, 8) and (var.vocab_size, var.Cvae) == (512, 8)
    assert var.num_classes == 10 and var.cond_drop_rate == 0.1
    vq16, _ = tiny_var_configs(TinyWorldParams(image_size=16, vq_ch_mult=[1, 2]))
    assert vq16.patch_nums == (1, 2, 3, 4, 6, 8) and vq16.image_size == 16


def test_init_var_weights_starts_blocks_near_identity():
    var = VAR(small_var_config())
    init_var_weights(var)
    c = var.cfg.embed_dim
    for block in var.blocks:
        assert block.ada_lin[-1].weight[: 2 * c].abs().max() < 1e-4  # gamma1, gamma2 rows
        assert block.ada_lin[-1].weight[2 * c :].abs().max() > 1e-3
        assert block.ada_lin[-1].bias.abs().max() == 0


@pytest.mark.slow
def test_train_var_vqvae_learns_to_reconstruct():
    images = to_model_range(make_dataset(48, image_size=8, num_classes=4, seed=0)[0])
    vq, last = train_var_vqvae(images, small_vq_config(), steps=250, batch_size=16, lr=3e-3, progress=False)
    assert not vq.training and set(last) == {"rec_mse", "vq_loss"}
    with torch.no_grad():
        rec = vq.idx_pyramid_to_img(vq.img_to_idx_pyramid(images))
    # far better than the best constant image (the per-pixel mean)
    assert F.mse_loss(rec, images) < 0.3 * F.mse_loss(images.mean(0, keepdim=True).expand_as(images), images)
    assert vq.quantize.ema_vocab_hit_SV.sum() > 0  # usage statistics were recorded


def test_train_var_fits_a_small_token_set():
    vq = small_vqvae()
    tokens = encode_images(vq, random_images(8, seed=2), batch_size=3)
    labels = torch.arange(8) % 4
    assert tokens.shape == (8, 30)
    var, last = train_var(
        tokens,
        labels,
        vq,
        small_var_config(cond_drop_rate=0.0),
        steps=60,
        batch_size=8,
        lr=3e-3,
        progress=False,
    )
    teacher = VARTeacher(var, vq)
    untrained = VAR(small_var_config())
    init_var_weights(untrained)
    nll0 = token_nll(VARTeacher(untrained.eval(), vq), tokens, labels)
    nll = token_nll(teacher, tokens, labels)
    assert abs(nll0 - torch.log(torch.tensor(32.0)).item()) < 0.1  # the small head starts near uniform
    assert nll < 0.6 * nll0 and abs(nll - last["ce"]) < 0.5


# --------------------------------------------------------------------------------------------
# the world, built part by part (ddcore.tiny.builder)
# --------------------------------------------------------------------------------------------
TOY = TinyWorldParams(
    image_size=16,
    num_classes=4,
    train_images=100,
    vq_codebook_size=16,
    vq_codebook_dim=4,
    vq_ch=8,
    vq_steps=3,
    vq_batch_size=8,
    gpt_dim=16,
    gpt_layers=1,
    gpt_heads=2,
    gpt_steps=3,
    gpt_batch_size=8,
    evaluator_steps=3,
    evaluator_batch_size=8,
    quality_samples_per_class=2,
    min_evaluator_accuracy=0.0,
    min_recon_ratio=0.0,
    min_sample_accuracy=0.0,
)
PARTS = ("vqvae", "tokens", "var", "evaluator", "quality")
WEIGHTS = [f"{p}.safetensors" for p in ("vqvae", "tokens", "var", "evaluator")]
SAMPLING = SamplingParams(cfg_scale=2.0, top_k=8)


def _prepare(world: TinyWorldParams, out, sampling: SamplingParams = SAMPLING) -> dict:
    return prepare_tiny_var_world(world, out, progress=False, sampling=sampling)


def test_var_world_resumes_part_by_part(tmp_path):
    first = _prepare(TOY, tmp_path)
    assert first["reused"] == [] and first["hashes"] == var_stage_hashes(TOY, SAMPLING)
    for name in [
        *WEIGHTS,
        "vqvae.part.json",
        "var.part.json",
        "quality.json",
        "var_world.json",
        "samples.png",
    ]:
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "var_world.json").read_text()) == json.loads(json.dumps(first))
    assert first["teacher"]["num_samples"] == 8 and check_var_quality(first, TOY) == []
    teacher, evaluator = load_tiny_var_world(tmp_path)  # the configs stay plain: the loader is strict
    assert teacher.var.cfg.depth == 1 and evaluator is not None

    mtimes = {f: (tmp_path / f).stat().st_mtime_ns for f in WEIGHTS}
    again = _prepare(TOY, tmp_path)
    assert again["reused"] == list(PARTS)
    assert {k: again[k] for k in ("vq", "var", "evaluator", "teacher")} == {
        k: first[k] for k in ("vq", "var", "evaluator", "teacher")
    }
    assert {f: (tmp_path / f).stat().st_mtime_ns for f in WEIGHTS} == mtimes

    # an interrupted VAR save (weights written, no record) and new sampling: VAR and quality only
    var_bytes = (tmp_path / "var.safetensors").read_bytes()
    (tmp_path / "var.part.json").unlink()
    other = _prepare(TOY, tmp_path, SamplingParams(cfg_scale=1.0))
    assert other["reused"] == ["vqvae", "tokens", "evaluator"]
    assert (tmp_path / "var.safetensors").read_bytes() == var_bytes, "rebuilt from reloaded parts: same bits"
    assert other["var"] == first["var"] and other["teacher"]["sampling"]["cfg_scale"] == 1.0


def test_var_stage_hashes_chain_through_dependencies():
    base = var_stage_hashes(TOY, SAMPLING)
    gpt = var_stage_hashes(TOY.model_copy(update={"gpt_steps": 4}), SAMPLING)
    assert [p for p in base if gpt[p] != base[p]] == ["var", "quality"]
    vq = var_stage_hashes(TOY.model_copy(update={"vq_steps": 4}), SAMPLING)
    assert [p for p in base if vq[p] != base[p]] == ["vqvae", "tokens", "var", "quality"]
    assert var_stage_hashes(TOY, SamplingParams(cfg_scale=3.0))["var"] == base["var"]
    assert var_stage_hashes(TOY.model_copy(update={"min_sample_accuracy": 0.5}), SAMPLING) == base
    more_val = var_stage_hashes(TOY, SAMPLING, val_images=5)
    assert all(more_val[p] != base[p] for p in base)

"""The VAR tiny world's training pieces, at toy size (the full world is trained by the pipeline)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from var_helpers import random_images, small_var_config, small_vq_config, small_vqvae

from ddcore.models.var import VAR
from ddcore.params import TinyWorldParams
from ddcore.teachers.var.teacher import VARTeacher
from ddcore.teachers.var.tiny_world import (
    encode_images,
    init_var_weights,
    tiny_var_configs,
    token_nll,
    train_var,
    train_var_vqvae,
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

"""VAR transformer and multi-scale VQVAE: official layout, quantisation math, masked vs cached forward."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from var_helpers import PATCH_NUMS, random_images, small_var, small_var_config, small_vq_config, small_vqvae

from ddcore.checkpoints import CheckpointError, load_strict
from ddcore.models.var import VAR, VARConfig, var_config
from ddcore.models.var_vqvae import OFFICIAL_PHI_INDEX, VQVAE, Phi, VQVAEConfig, phi_index_list
from ddcore.teachers.var.teacher import suggest_var

# ---------------------------------------------------------------------------------------------
# official layout (meta device: no memory)
# ---------------------------------------------------------------------------------------------


def _meta(build):
    with torch.device("meta"):
        return build()


def _nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_vqvae_official_layout():
    vq = _meta(lambda: VQVAE(VQVAEConfig()))
    sd = vq.state_dict()
    assert len(sd) == 324
    assert round(_nparams(vq) / 1e6, 2) == 108.95
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["quantize.embedding.weight"] == (4096, 32)
    assert shapes["quantize.ema_vocab_hit_SV"] == (10, 4096)
    assert {k for k in sd if k.startswith("quantize.quant_resi.")} == {
        f"quantize.quant_resi.qresi_ls.{i}.{w}" for i in range(4) for w in ("weight", "bias")
    }
    assert shapes["quantize.quant_resi.qresi_ls.3.weight"] == (32, 32, 3, 3)
    assert shapes["quant_conv.weight"] == shapes["post_quant_conv.weight"] == (32, 32, 3, 3)
    # encoder levels 160, 160, 320, 320, 640; attention only at the last level, one qkv conv
    assert shapes["encoder.down.4.block.0.conv1.weight"] == (640, 320, 3, 3)
    assert shapes["encoder.down.4.attn.1.qkv.weight"] == (1920, 640, 1, 1)
    assert "encoder.down.3.attn.0.qkv.weight" not in sd and "encoder.down.4.downsample.conv.weight" not in sd
    # decoder up.{i} indexed by level: up.4 is the 640-channel one (run first), up.0 has no upsample
    assert shapes["decoder.conv_in.weight"] == (640, 32, 3, 3)
    assert shapes["decoder.up.4.block.2.conv1.weight"] == (640, 640, 3, 3)
    assert shapes["decoder.up.4.attn.2.proj_out.weight"] == (640, 640, 1, 1)
    assert shapes["decoder.up.0.block.0.conv1.weight"] == (160, 160, 3, 3)
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == (160, 320, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "decoder.up.1.upsample.conv.weight" in sd


@pytest.mark.parametrize(
    ("name", "millions", "nkeys"),
    [("var-d16", 310.3, 220), ("var-d20", 600.9, 272), ("var-d24", 1033.4, 324), ("var-d30", 2010.0, 402)],
)
def test_var_official_layout(name, millions, nkeys):
    cfg = var_config(name)
    d = cfg.depth
    assert (cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attn_l2_norm, cfg.shared_aln) == (
        64 * d,
        d,
        4.0,
        1e-6,
        True,
        False,
    )
    var = _meta(lambda: VAR(cfg))
    sd = var.state_dict()
    assert len(sd) == nkeys
    assert round(_nparams(var) / 1e6, 1) == millions
    c = 64 * d
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["pos_start"] == (1, 1, c) and shapes["pos_1LC"] == (1, 680, c)
    assert shapes["lvl_1L"] == (1, 680) and sd["lvl_1L"].dtype == torch.int64
    assert shapes["attn_bias_for_masking"] == (1, 1, 680, 680)
    assert shapes["class_emb.weight"] == (1001, c) and shapes["lvl_embed.weight"] == (10, c)
    assert shapes["word_embed.weight"] == (c, 32)
    assert shapes[f"blocks.{d - 1}.attn.scale_mul_1H11"] == (1, d, 1, 1)
    assert shapes["blocks.0.attn.mat_qkv.weight"] == (3 * c, c) and "blocks.0.attn.mat_qkv.bias" not in sd
    assert shapes["blocks.0.attn.zero_k_bias"] == (c,)
    assert shapes["blocks.0.ada_lin.1.weight"] == (6 * c, c)
    assert shapes["head_nm.ada_lin.1.weight"] == (2 * c, c) and shapes["head.weight"] == (4096, c)


def test_var_config_names_and_round_trip():
    assert var_config("var-d20").embed_dim == 1280
    with pytest.raises(ValueError, match="var-d16"):
        var_config("var-d18")
    cfg = small_var_config(shared_aln=True)
    assert VARConfig.from_dict(cfg.to_dict()) == cfg
    vq = small_vq_config()
    assert VQVAEConfig.from_dict(vq.to_dict()) == vq
    with pytest.raises(ValueError, match="unknown"):
        VARConfig.from_dict({**cfg.to_dict(), "typo": 1})


def test_attn_mask_buffer_is_block_causal_by_scale():
    var = small_var()
    lvl = var.lvl_1L[0]
    assert lvl.tolist() == [0] + [1] * 4 + [2] * 9 + [3] * 16
    bias = var.attn_bias_for_masking[0, 0]
    allowed = lvl.view(-1, 1) >= lvl.view(1, -1)
    assert torch.equal(bias == 0, allowed) and torch.isinf(bias[~allowed]).all()


# ---------------------------------------------------------------------------------------------
# Phi and its scale -> conv mapping
# ---------------------------------------------------------------------------------------------


def test_phi_index_list_official_and_general_rule():
    assert phi_index_list(10, 4) == list(OFFICIAL_PHI_INDEX) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    # Scales 2 and 7 sit exactly halfway between two ticks; exact arithmetic picks the lower conv,
    # the original's float64 arithmetic the upper one. That is why the list is hard-coded.
    ticks = [Fraction(1, 12) + Fraction(i, 3) * Fraction(10, 12) for i in range(4)]
    exact = [min(range(4), key=lambda i: abs(ticks[i] - Fraction(si, 9))) for si in range(10)]
    assert exact == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    # other pyramids follow the nearest-tick rule (K = 4: margins 1/(3K); otherwise 1/(2K))
    assert phi_index_list(6, 4) == [0, 0, 1, 2, 3, 3]
    assert phi_index_list(4, 4) == [0, 1, 2, 3]
    assert phi_index_list(5, 2) == [0, 0, 0, 1, 1]  # ticks 1/4, 3/4; 1/2 is a tie -> lower
    assert phi_index_list(3, 3) == [0, 1, 2]


def test_phi_is_half_identity_half_conv():
    torch.manual_seed(0)
    phi = Phi(4, 0.5)
    h = torch.randn(2, 4, 5, 5)
    conv = F.conv2d(h, phi.weight, phi.bias, padding=1)
    torch.testing.assert_close(phi(h), 0.5 * h + 0.5 * conv)


# ---------------------------------------------------------------------------------------------
# residual multi-scale quantisation
# ---------------------------------------------------------------------------------------------


def _identity_phi(vq: VQVAE) -> None:
    """Make every Phi the identity: 0.5 h + 0.5 conv(h) with conv = identity kernel."""
    with torch.no_grad():
        for phi in vq.quantize.quant_resi.qresi_ls:
            phi.weight.zero_()
            phi.bias.zero_()
            for c in range(phi.weight.shape[0]):
                phi.weight[c, c, 1, 1] = 1.0


def test_residual_quantisation_known_answer():
    """Two scales (1x1, 2x2) over a 2-d codebook: the coarse code takes the mean, the fine codes the rest."""
    vq = VQVAE(small_vq_config(vocab_size=5, Cvae=2, patch_nums=(1, 2))).eval()
    _identity_phi(vq)
    code = torch.tensor([[10.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [-1.0, 0.0]])
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(code)
    fine = torch.tensor([1, 2, 3, 4])
    f = (code[0].view(2, 1, 1) + code[fine].T.reshape(2, 2, 2)).unsqueeze(0)  # (1, 2, 2, 2)
    with torch.no_grad():
        idx, f_hat = vq.f_to_idx_pyramid(f)
    assert [i.tolist() for i in idx] == [[[0]], [fine.tolist()]]
    torch.testing.assert_close(f_hat, f)


def test_vqvae_shapes_and_idx_round_trip():
    vq = small_vqvae()
    x = random_images(3)
    with torch.no_grad():
        f = vq.img_to_f(x)
        idx, f_hat = vq.f_to_idx_pyramid(f)
        assert [tuple(i.shape) for i in idx] == [(3, p * p) for p in PATCH_NUMS]
        assert all(i.dtype == torch.long and i.min() >= 0 and i.max() < 32 for i in idx)
        assert len({int(t) for i in idx for t in i.flatten()}) > 3  # not a degenerate code
        # rebuilding f_hat from the indices alone gives the quantiser's f_hat (flat or per-scale input)
        torch.testing.assert_close(vq.idx_pyramid_to_fhat(idx), f_hat, rtol=0, atol=1e-6)
        torch.testing.assert_close(vq.idx_pyramid_to_fhat(torch.cat(idx, 1)), f_hat, rtol=0, atol=1e-6)
        # each scale's code is the nearest one to the area-downsampled residual
        rest = f.clone()
        for si, p in enumerate(PATCH_NUMS):
            z = F.interpolate(rest, size=(p, p), mode="area").flatten(2).transpose(1, 2)  # (B, p*p, C)
            dist = torch.cdist(z, vq.codebook.unsqueeze(0).expand(3, -1, -1))
            assert torch.equal(dist.argmin(-1), idx[si])
            rest = rest - vq.scale_contribution(si, vq.embed_scale(idx[si]))
        img = vq.fhat_to_img(f_hat)
        assert img.shape == x.shape and img.min() >= -1 and img.max() <= 1
        torch.testing.assert_close(vq.idx_pyramid_to_img(idx), img)
        # continuous decoding of the code vectors is the discrete decoding
        vecs = vq.codebook[torch.cat(idx, 1)]
        torch.testing.assert_close(vq.decode_vectors_pyramid(vecs), img)


def test_next_input_chain_matches_teacher_forcing_input():
    """vectors_to_var_input is next_input applied scale after scale; the last scale has no next input."""
    vq = small_vqvae()
    with torch.no_grad():
        idx = vq.img_to_idx_pyramid(random_images(2))
        tf = vq.idx_to_var_input(idx)
        assert tf.shape == (2, sum(p * p for p in PATCH_NUMS[1:]), 4)
        f_hat, pieces = vq.new_fhat(2, "cpu"), []
        for si in range(len(PATCH_NUMS)):
            f_hat, nxt = vq.next_input(si, f_hat, vq.embed_scale(idx[si]))
            if si < len(PATCH_NUMS) - 1:
                assert nxt.shape == (2, 4, PATCH_NUMS[si + 1], PATCH_NUMS[si + 1])
                torch.testing.assert_close(nxt, F.interpolate(f_hat, size=nxt.shape[-2:], mode="area"))
                pieces.append(nxt.flatten(2).transpose(1, 2))
            else:
                assert nxt is None
        torch.testing.assert_close(torch.cat(pieces, 1), tf)
        torch.testing.assert_close(f_hat, vq.idx_pyramid_to_fhat(idx))


def test_vqvae_training_forward_has_gradients():
    vq = small_vqvae().train()
    rec, loss, idx = vq(random_images(2))
    assert rec.shape == (2, 3, 8, 8) and loss.ndim == 0
    assert [tuple(i.shape) for i in idx] == [(2, p * p) for p in PATCH_NUMS]
    loss.add(rec.square().mean()).backward()
    for name in (
        "quantize.embedding.weight",
        "quantize.quant_resi.qresi_ls.0.weight",
        "encoder.conv_in.weight",
        "decoder.conv_out.weight",
    ):
        g = dict(vq.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# VAR transformer
# ---------------------------------------------------------------------------------------------


def test_strict_load_of_raw_state_dict_with_buffers():
    src = small_var(seed=3)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    assert {"lvl_1L", "attn_bias_for_masking", "blocks.0.attn.zero_k_bias"} <= set(sd)
    dst = VAR(small_var_config())
    load_strict(dst, sd, drop_patterns=(), what="VAR", suggest=suggest_var)
    vq = small_vqvae()
    idx = vq.img_to_idx_pyramid(random_images(2))
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(
            dst.forward_teacher(idx, labels, vq), src.forward_teacher(idx, labels, vq), rtol=0, atol=0
        )
    vq2 = VQVAE(small_vq_config())
    load_strict(vq2, vq.state_dict(), drop_patterns=(), what="VQVAE", suggest=suggest_var)
    assert torch.equal(vq2.quantize.ema_vocab_hit_SV, vq.quantize.ema_vocab_hit_SV)


@pytest.mark.parametrize(
    ("kw", "hint"),
    [
        ({"depth": 3}, "wrong depth/width: checkpoint depth 3"),
        ({"embed_dim": 48, "num_heads": 2}, "wrong depth/width"),
        ({"patch_nums": (1, 2, 4)}, "wrong patch_nums"),
        ({"num_classes": 7}, "wrong num_classes"),
    ],
)
def test_mismatched_var_checkpoint_is_rejected(kw, hint):
    sd = small_var(**kw).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_strict(VAR(small_var_config()), sd, drop_patterns=(), what="VAR", suggest=suggest_var)
    assert hint in str(err.value)
    assert any(w in str(err.value) for w in ("missing keys", "unexpected keys", "shape mismatches"))


def test_mismatched_vqvae_checkpoint_is_rejected():
    sd = small_vqvae(patch_nums=(1, 2, 4)).state_dict()  # 3 scales: the ema buffer has 3 rows
    with pytest.raises(CheckpointError, match="VQVAE built for 4 scales"):
        load_strict(VQVAE(small_vq_config()), sd, drop_patterns=(), what="VQVAE", suggest=suggest_var)


def test_cached_stepping_equals_masked_forward():
    """Greedy KV-cached decoding, scale by scale, reproduces argmax (and logits) of the masked forward."""
    var, vq = small_var(), small_vqvae()
    labels = torch.tensor([0, 2, 3])
    with torch.no_grad():
        cond = var.cond(labels)
        cache = var.new_cache()
        logits = var.step(var.first_input(cond), cond, cache)
        f_hat, tokens, step_logits = vq.new_fhat(3, "cpu"), [], []
        for si in range(len(PATCH_NUMS)):
            step_logits.append(logits)
            tok = logits.argmax(-1)
            tokens.append(tok)
            if si + 1 < len(PATCH_NUMS):
                f_hat, nxt = vq.next_input(si, f_hat, vq.embed_scale(tok))
                logits = var.step(var.scale_input(si + 1, nxt), cond, cache)
        assert len(cache) == var.cfg.depth and all(c.length == var.cfg.seq_len for c in cache)
        assert cache[0].k.shape == (
            3,
            var.cfg.num_heads,
            var.cfg.seq_len,
            var.cfg.embed_dim // var.cfg.num_heads,
        )
        full = var.forward_teacher(tokens, labels, vq)
    torch.testing.assert_close(full, torch.cat(step_logits, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(full.argmax(-1), torch.cat(tokens, 1))


def test_masked_forward_is_causal_across_scales():
    """Changing scale k's tokens leaves the logits at scales <= k unchanged and changes scale k+1."""
    var, vq = small_var(), small_vqvae()
    idx = vq.img_to_idx_pyramid(random_images(2))
    labels = torch.tensor([1, 1])
    k = 1
    changed = list(idx)
    changed[k] = (idx[k] + 7) % 32
    with torch.no_grad():
        a, b = var.forward_teacher(idx, labels, vq), var.forward_teacher(changed, labels, vq)
    end_k = var.cfg.begin_ends[k][1]
    end_next = var.cfg.begin_ends[k + 1][1]
    torch.testing.assert_close(a[:, :end_k], b[:, :end_k], rtol=0, atol=1e-6)
    assert (a[:, end_k:end_next] - b[:, end_k:end_next]).abs().max() > 1e-3


def test_label_dropout_only_when_asked():
    var, vq = small_var(cond_drop_rate=1.0), small_vqvae()
    idx = vq.img_to_idx_pyramid(random_images(2))
    labels = torch.tensor([0, 3])
    null = torch.full_like(labels, var.null_class)
    with torch.no_grad():
        plain1, plain2 = var.forward_teacher(idx, labels, vq), var.forward_teacher(idx, labels, vq)
        dropped = var.forward_teacher(idx, labels, vq, drop_labels=True)
        uncond = var.forward_teacher(idx, null, vq)
    assert torch.equal(plain1, plain2)
    torch.testing.assert_close(dropped, uncond, rtol=0, atol=0)
    assert (plain1 - uncond).abs().max() > 1e-3


@pytest.mark.parametrize(("shared_aln", "l2"), [(True, True), (False, False)])
def test_variants_cached_equals_masked(shared_aln, l2):
    """Shared AdaLN (the 512-px d36 layout) and plain scaled attention also step consistently."""
    var, vq = small_var(shared_aln=shared_aln, attn_l2_norm=l2), small_vqvae()
    if shared_aln:
        assert "shared_ada_lin.1.weight" in var.state_dict() and "blocks.0.ada_gss" in var.state_dict()
        assert "blocks.0.ada_lin.1.weight" not in var.state_dict()
    if not l2:
        assert "blocks.0.attn.scale_mul_1H11" not in var.state_dict()
    idx = vq.img_to_idx_pyramid(random_images(2))
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        full = var.forward_teacher(idx, labels, vq)
        x_in = vq.idx_to_var_input(idx)
        cond, cache, outs = var.cond(labels), var.new_cache(), []
        outs.append(var.step(var.first_input(cond), cond, cache))
        for si in range(1, len(PATCH_NUMS)):
            b, e = var.cfg.begin_ends[si]
            outs.append(var.step(var.scale_input(si, x_in[:, b - 1 : e - 1]), cond, cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)

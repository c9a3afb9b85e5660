"""LlamaGen VQ tokenizer: published key layout, official {"model": sd} loading, encode/decode semantics."""

import json

import pytest
import torch
import torch.nn.functional as F
from llamagen_helpers import small_vq, small_vq_config

from ddcore.models.vq import VQ_CONFIGS, VQConfig, VQModel
from ddcore.teachers.llamagen.teacher import load_llamagen_vq


def meta_vq(name: str) -> VQModel:
    with torch.device("meta"):
        return VQModel(VQ_CONFIGS[name])


def test_vq16_keys_shapes_and_size():
    vq = meta_vq("VQ-16")
    sd = vq.state_dict()
    assert len(sd) == 344
    assert round(vq.num_params() / 1e6, 2) == 71.88
    assert vq.downsample == 16
    assert sd["quantize.embedding.weight"].shape == (16384, 8)
    assert sd["quantize.codebook_used"].shape == (65536,)
    assert sd["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert sd["encoder.conv_out.weight"].shape == (256, 512, 3, 3)
    assert sd["quant_conv.weight"].shape == (8, 256, 1, 1)
    assert sd["post_quant_conv.weight"].shape == (256, 8, 1, 1)
    assert sd["decoder.conv_in.weight"].shape == (512, 256, 3, 3)
    assert sd["decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    # encoder: attention only at the last level, downsampling on all but the last
    assert {k.split(".")[4] for k in sd if k.startswith("encoder.conv_blocks.4.attn.")} == {"0", "1"}
    assert not any(k.startswith("encoder.conv_blocks.3.attn.") for k in sd)
    assert "encoder.conv_blocks.0.downsample.conv.weight" in sd and not any(
        "conv_blocks.4.downsample" in k for k in sd
    )
    assert "encoder.conv_blocks.1.res.0.nin_shortcut.weight" not in sd  # 128 -> 128
    assert sd["encoder.conv_blocks.2.res.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    for i in range(3):
        assert f"encoder.mid.{i}.norm1.weight" in sd or f"encoder.mid.{i}.norm.weight" in sd
    assert "encoder.mid.1.q.weight" in sd and "encoder.mid.1.proj_out.weight" in sd
    # decoder levels are in processing order: 0 is the widest (512 channels) with 3 res + 3 attn
    assert sd["decoder.conv_blocks.0.res.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert {k.split(".")[4] for k in sd if k.startswith("decoder.conv_blocks.0.attn.")} == {"0", "1", "2"}
    assert {k.split(".")[4] for k in sd if k.startswith("decoder.conv_blocks.2.res.")} == {"0", "1", "2"}
    assert sd["decoder.conv_blocks.4.res.0.conv1.weight"].shape == (128, 128, 3, 3)
    assert "decoder.conv_blocks.3.upsample.conv.weight" in sd
    assert not any("conv_blocks.4.upsample" in k for k in sd)


def test_vq8_downsample():
    assert meta_vq("VQ-8").downsample == 8


def test_config_roundtrip_and_group_check():
    cfg = small_vq_config(norm_groups=8, ch=16)
    assert VQConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    VQModel(cfg)  # 16, 32 channels with 8 groups
    with pytest.raises(ValueError, match="GroupNorm"):
        small_vq_config(ch=24)  # 32 groups do not divide 24


def test_official_layout_loads_strictly(tmp_path):
    src = small_vq(seed=1)
    with torch.no_grad():
        src.quantize.codebook_used.copy_(torch.arange(65536.0) % 48)
    sd = src.state_dict()
    assert "quantize.codebook_used" in sd
    path = tmp_path / "vq_tiny.pt"
    torch.save({"model": sd}, path)
    vq = load_llamagen_vq(path, small_vq_config())
    assert torch.equal(vq.quantize.codebook_used, src.quantize.codebook_used)
    idx = torch.randint(0, 48, (2, 16))
    with torch.no_grad():
        assert torch.equal(vq.decode_code(idx), src.decode_code(idx))


def test_encode_is_nearest_l2_normalised_code_in_raster_order():
    vq = small_vq()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        idx = vq.encode_indices(x)
        z = vq.encode_latent(x)  # (2, 8, 4, 4)
    assert idx.shape == (2, 16) and idx.dtype == torch.long
    zn = F.normalize(z.permute(0, 2, 3, 1), dim=-1)  # (B, h, w, d)
    cb = vq.codebook_vectors()
    assert torch.allclose(cb.norm(dim=-1), torch.ones(48), atol=1e-5)
    expected = torch.cdist(zn.reshape(-1, 8), cb).argmin(-1).view(2, 16)  # raster: row-major over (h, w)
    assert torch.equal(idx, expected)


def test_decode_layout_and_vectors():
    vq = small_vq()
    idx = torch.randint(0, 48, (2, 16))
    seen = {}
    handle = vq.post_quant_conv.register_forward_hook(lambda m, i, o: seen.__setitem__("z", i[0]))
    with torch.no_grad():
        img = vq.decode_code(idx)
    handle.remove()
    assert img.shape == (2, 3, 8, 8)
    cb = vq.codebook_vectors()
    z = seen["z"]
    assert z.shape == (2, 8, 4, 4)
    for b, t in [(0, 0), (0, 5), (1, 7), (1, 15)]:
        r, c = divmod(t, 4)
        assert torch.allclose(z[b, :, r, c], cb[idx[b, t]])
    with torch.no_grad():
        assert torch.allclose(vq.decode_vectors(cb[idx]), img, atol=1e-6)
        # non-square token count needs an explicit grid
        with pytest.raises(ValueError, match="grid"):
            vq.decode_vectors(cb[idx[:, :8]])
        assert vq.decode_vectors(cb[idx[:, :8]], grid=4).shape == (2, 3, 4, 8)


def test_training_forward_losses_and_straight_through():
    vq = small_vq(commit_loss_beta=0.25).train()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    recon, losses = vq(x)
    assert recon.shape == x.shape
    assert {"codebook", "commit", "entropy"} <= set(losses)
    # commit = beta * codebook loss (same squared distance, different gradient paths)
    assert losses["commit"].item() == pytest.approx(0.25 * losses["codebook"].item(), rel=1e-5)
    (recon.pow(2).mean() + losses["codebook"] + losses["commit"]).backward()
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0  # gradient reaches the encoder (straight-through)
    assert vq.quantize.embedding.weight.grad.abs().sum() > 0
    used = vq.quantize.codebook_used[-32:].long()
    with torch.no_grad():
        assert torch.equal(used, vq.eval().encode_indices(x).flatten())

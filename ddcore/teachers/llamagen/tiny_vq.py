"""Train the tiny world's VQ tokenizer and tokenize the data set with it.

The tokenizer is LlamaGen's own VQModel (ddcore.models.vq) with a scaled-down config, so the
tiny world exercises exactly the code paths of the published tokenizer: l2-normalised codebook,
nearest-code lookup, straight-through estimator, decode from indices or from continuous vectors.

Loss: L1 + MSE reconstruction plus the codebook / commitment (/ entropy) terms. Codes that stay
unused are re-seeded from the current encoder outputs a few times early in training (a common
remedy for dead codes, harmless to the architecture); without it a small l2 codebook trained for
a few hundred steps uses a fraction of its entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ddcore.models.vq import VQConfig, VQModel
from ddcore.params import TinyWorldParams
from ddcore.tiny.training import optimise, random_batch, seeded, step_bar, warmup_cosine


def _groups_for(channels: list[int], preferred: int = 32) -> int:
    """The largest group count <= preferred that divides every channel count."""
    for g in range(min(preferred, *channels), 0, -1):
        if all(c % g == 0 for c in channels):
            return g
    return 1


def vq_config_for(world: TinyWorldParams) -> VQConfig:
    mult = tuple(int(m) for m in world.vq_ch_mult)
    if world.image_size % 2 ** (len(mult) - 1):
        raise ValueError(
            f"image_size {world.image_size} is not divisible by the VQ stride {2 ** (len(mult) - 1)}"
        )
    groups = _groups_for([world.vq_ch * m for m in (1, *mult)])
    return VQConfig(
        codebook_size=world.vq_codebook_size,
        codebook_embed_dim=world.vq_codebook_dim,
        codebook_l2_norm=True,
        codebook_show_usage=True,
        encoder_ch_mult=mult,
        decoder_ch_mult=mult,
        z_channels=world.vq_z_channels,
        ch=world.vq_ch,
        num_res_blocks=world.vq_num_res_blocks,
        dropout_p=0.0,
        norm_groups=groups,
    )


@torch.no_grad()
def _reseed_dead_codes(model: VQModel, x: Tensor, counts: Tensor, generator: torch.Generator) -> int:
    """Replace codes never chosen since the last call by random current encoder outputs."""
    dead = torch.nonzero(counts == 0).flatten()
    if dead.numel() == 0:
        return 0
    z = model.encode_latent(x).permute(0, 2, 3, 1).reshape(-1, model.cfg.codebook_embed_dim)
    pick = torch.randint(0, z.shape[0], (dead.numel(),), generator=generator)
    new = z[pick] + 0.01 * torch.randn(dead.numel(), z.shape[1], generator=generator)
    if model.cfg.codebook_l2_norm:
        new = F.normalize(new, dim=-1)
    model.quantize.embedding.weight[dead] = new
    return int(dead.numel())


def train_vq(
    images: Tensor,
    cfg: VQConfig,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    reseed_every: int = 50,
    reseed_until: float = 0.5,
    progress: bool = True,
) -> tuple[VQModel, dict]:
    """Train on float images in [-1, 1] (N, 3, H, W); returns the model (eval mode) and stats.

    Dead codes are re-seeded every `reseed_every` steps during the first `reseed_until` fraction
    of training. Stats: final losses (smoothed) and the fraction of the codebook in use.
    """
    g = seeded(seed)
    model = VQModel(cfg).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = warmup_cosine(opt, steps, max_warmup=100)
    counts = torch.zeros(cfg.codebook_size, dtype=torch.long)
    ema: dict[str, float] = {}
    reseeded = 0
    model.train()
    bar = step_bar(steps, "vq", progress)
    for step in bar:
        idx = random_batch(images.shape[0], batch_size, g)
        x = images[idx].contiguous(memory_format=torch.channels_last)
        z_q, vq_losses, codes = model.quantize(model.encode_latent(x))
        recon = model.decoder(model.post_quant_conv(z_q))
        l1 = (recon - x).abs().mean()
        l2 = F.mse_loss(recon, x)
        optimise(opt, sched, l1 + l2 + vq_losses["codebook"] + vq_losses["commit"] + vq_losses["entropy"])
        counts += torch.bincount(codes.flatten(), minlength=cfg.codebook_size)
        if (step + 1) % reseed_every == 0:
            if step + 1 <= reseed_until * steps:
                reseeded += _reseed_dead_codes(model, x, counts, g)
            counts.zero_()
        for k, v in (("l1", l1), ("mse", l2), ("commit", vq_losses["commit"])):
            ema[k] = v.item() if k not in ema else 0.95 * ema[k] + 0.05 * v.item()
        bar.set_postfix(l1=f"{ema['l1']:.4f}", mse=f"{ema['mse']:.4f}", refresh=False)
    model.eval()
    stats = {**{f"final_{k}": v for k, v in ema.items()}, "codes_reseeded": reseeded}
    return model, stats


@torch.no_grad()
def tokenize(model: VQModel, images: Tensor, batch_size: int = 500) -> Tensor:
    """Images in [-1, 1] (N, 3, H, W) -> token indices (N, h*w), int64, raster order."""
    model.eval()
    out = [
        model.encode_indices(images[i : i + batch_size].contiguous(memory_format=torch.channels_last))
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out).long()


@torch.no_grad()
def reconstruct(model: VQModel, images: Tensor, batch_size: int = 500) -> Tensor:
    """Images in [-1, 1] -> tokenize -> decode -> images in [0, 1] (what the GPT can at best produce)."""
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        codes = model.encode_indices(images[i : i + batch_size].contiguous(memory_format=torch.channels_last))
        out.append(((model.decode_code(codes).float() + 1.0) / 2.0).clamp(0.0, 1.0))
    return torch.cat(out)


def codebook_usage(tokens: Tensor, codebook_size: int) -> dict:
    """Fraction of codes used and the perplexity of the code histogram over a token set."""
    hist = torch.bincount(tokens.flatten(), minlength=codebook_size).double()
    p = hist / hist.sum()
    nz = p[p > 0]
    return {
        "used_fraction": float((hist > 0).double().mean()),
        "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
    }

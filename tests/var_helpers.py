"""Small random VAR transformers / multi-scale VQVAEs in the official layout, for the tests."""

from __future__ import annotations

import torch

from ddcore.models.var import VAR, VARConfig
from ddcore.models.var_vqvae import VQVAE, VQVAEConfig

NUM_CLASSES = 4
PATCH_NUMS = (1, 2, 3, 4)


def small_vq_config(**kw) -> VQVAEConfig:
    """8x8 images, 2x downsample to a 4x4 latent, four scales."""
    base = dict(
        vocab_size=32, Cvae=4, ch=16, ch_mult=(1, 2), num_res_blocks=1, patch_nums=PATCH_NUMS, norm_groups=8
    )
    base.update(kw)
    return VQVAEConfig(**base)


def small_var_config(**kw) -> VARConfig:
    base = dict(
        depth=2,
        embed_dim=32,
        num_heads=2,
        patch_nums=PATCH_NUMS,
        vocab_size=32,
        Cvae=4,
        num_classes=NUM_CLASSES,
    )
    base.update(kw)
    return VARConfig(**base)


def small_vqvae(seed: int = 0, **kw) -> VQVAE:
    """Random weights; a codebook spread wide enough that several codes get used at every scale."""
    torch.manual_seed(seed)
    vq = VQVAE(small_vq_config(**kw))
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_(0.0, 0.15)  # about the latent scale
        vq.quantize.ema_vocab_hit_SV.uniform_(0, 5)  # a buffer with content, so that loading it is tested
    return vq.eval()


def small_var(seed: int = 1, std: float = 0.2, **kw) -> VAR:
    """Random weights, non-trivial AdaLN gammas and head (the original inits them near zero)."""
    torch.manual_seed(seed)
    var = VAR(small_var_config(**kw))
    with torch.no_grad():
        for name, p in var.named_parameters():
            if p.ndim > 1 and "pos" not in name:
                p.normal_(0.0, std)
    return var.eval()


def random_images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1

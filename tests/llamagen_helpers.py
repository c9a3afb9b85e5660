"""Small random LlamaGen GPT/VQ models and official-layout checkpoint files for the tests."""

from __future__ import annotations

import torch

from ddcore.models.llamagen import GPT, GPTConfig
from ddcore.models.vq import VQConfig, VQModel

NUM_CLASSES = 10


def small_gpt_config(**kw) -> GPTConfig:
    base = dict(
        dim=64,
        n_layer=2,
        n_head=4,
        multiple_of=32,
        vocab_size=48,
        num_classes=NUM_CLASSES,
        block_size=16,
        token_dropout_p=0.0,
        resid_dropout_p=0.0,
        ffn_dropout_p=0.0,
    )
    base.update(kw)
    return GPTConfig(**base)


def small_gpt(seed: int = 0, std: float = 0.15, **kw) -> GPT:
    """Random weights with a non-zero output layer (LlamaGen zero-inits it)."""
    torch.manual_seed(seed)
    gpt = GPT(small_gpt_config(**kw))
    with torch.no_grad():
        for p in gpt.parameters():
            if p.ndim > 1:
                p.normal_(0.0, std)
    return gpt.eval()


def small_vq_config(**kw) -> VQConfig:
    base = dict(
        codebook_size=48,
        codebook_embed_dim=8,
        encoder_ch_mult=(1, 2),
        decoder_ch_mult=(1, 2),
        z_channels=32,
        ch=32,
        num_res_blocks=1,
    )
    base.update(kw)
    return VQConfig(**base)


def small_vq(seed: int = 0, **kw) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(small_vq_config(**kw)).eval()

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


def three_class_teacher(std: float | None = 0.3, seed: int = 0):
    """A real `LlamaGenTeacher` small enough for metric tests: 16 tokens, vocab 32, 3 classes,
    8 px images. `std` re-draws the GPT's matrices (LlamaGen zero-inits the head); None keeps init."""
    from ddcore.teachers.llamagen.teacher import LlamaGenTeacher

    torch.manual_seed(seed)
    gpt = GPT(
        GPTConfig(dim=32, n_layer=1, n_head=2, multiple_of=16, vocab_size=32, num_classes=3, block_size=16)
    )
    if std is not None:
        with torch.no_grad():
            for p in gpt.parameters():
                if p.ndim > 1:
                    p.normal_(0.0, std)
    vq = VQModel(small_vq_config(codebook_size=32))
    return LlamaGenTeacher(gpt.eval(), vq.eval(), num_classes=3, image_size=8)

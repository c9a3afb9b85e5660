"""State-dict compatible re-implementations of the teachers' networks."""

from ddcore.models.llamagen import (
    GPT,
    GPT_CONFIGS,
    GPTConfig,
    TransformerBlock,
    gpt_config,
    precompute_freqs_cis_2d,
)
from ddcore.models.vq import VQ_CONFIGS, VQConfig, VQModel

__all__ = [
    "GPT",
    "GPT_CONFIGS",
    "GPTConfig",
    "TransformerBlock",
    "gpt_config",
    "precompute_freqs_cis_2d",
    "VQ_CONFIGS",
    "VQConfig",
    "VQModel",
]

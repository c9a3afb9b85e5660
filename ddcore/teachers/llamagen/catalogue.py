"""The published LlamaGen c2i checkpoints and what their state dicts look like.

The RoPE grid is not in a LlamaGen state dict, so `block_size` is derived from the file name
(``_256`` -> 16x16 tokens, ``_384`` -> 24x24). `suggest_llamagen` turns a mismatched state dict
into hints naming the config it looks like, for `CheckpointError` messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from ddcore.sources import CheckpointInfo, register_checkpoint

DEFAULT_TOKENIZER = "vq-ds16-c2i"
# the names a preset may give as teacher.name (params.yaml: llamagen-b, llamagen-l, ...)
PUBLISHED_TEACHERS = (
    "llamagen-b",
    "llamagen-l",
    "llamagen-b-384",
    "llamagen-l-384",
    "llamagen-xl-384",
    "llamagen-xxl-384",
    "llamagen-3b-384",
)

LLAMAGEN_HF_REPO = "FoundationVision/LlamaGen"
_LLAMAGEN_SIZES = {"B": "GPT-B", "L": "GPT-L", "XL": "GPT-XL", "XXL": "GPT-XXL", "3B": "GPT-3B"}
_C2I_RE = re.compile(r"c2i_(B|L|XL|XXL|3B)_(\d+)(?:\.[A-Za-z]+)?$")
# GETTING_STARTED cfg values (384 checkpoints, eval at 256); 2.0 for the 256-px ones is an inference.
_LLAMAGEN_CFG = {"B": 2.0, "L": 2.0, "XL": 1.75, "XXL": 1.75, "3B": 1.65}


def llamagen_block_size_from_filename(filename: str, downsample: int = 16) -> int:
    """c2i_B_256.pt -> 256 tokens; c2i_L_384.pt -> 576 (the RoPE grid is not in the state dict)."""
    m = re.search(r"_(\d+)(?:\.[A-Za-z]+)?$", filename.rsplit("/", 1)[-1])
    if not m:
        raise ValueError(f"{filename!r}: cannot read the image size (_256 / _384) from the file name")
    size = int(m.group(1))
    if size % downsample:
        raise ValueError(
            f"{filename!r}: image size {size} is not a multiple of the tokenizer stride {downsample}"
        )
    return (size // downsample) ** 2


def llamagen_info_from_filename(filename: str, name: str | None = None) -> CheckpointInfo:
    """Build the registry entry a published c2i file name implies (config, image and block size)."""
    fname = filename.rsplit("/", 1)[-1]
    m = _C2I_RE.search(fname)
    if not m:
        raise ValueError(f"{filename!r} is not a LlamaGen c2i file name (c2i_<B|L|XL|XXL|3B>_<256|384>.pt)")
    size_key, image_size = m.group(1), int(m.group(2))
    suffix = "" if image_size == 256 else f"-{image_size}"
    return CheckpointInfo(
        name=name or f"llamagen-{size_key.lower()}{suffix}",
        family="llamagen",
        kind="gpt",
        source=f"hf://{LLAMAGEN_HF_REPO}/{fname}",
        config=_LLAMAGEN_SIZES[size_key],
        image_size=image_size,
        block_size=llamagen_block_size_from_filename(fname),
        # B/L/XL files were saved by train_c2i.py ({"model": ...}); XXL/3B are FSDP-consolidated raw dicts
        layout="raw" if size_key in ("XXL", "3B") else "model",
        tokenizer="vq-ds16-c2i",
        num_classes=1000,
        sampling={"cfg_scale": _LLAMAGEN_CFG[size_key], "top_k": 0, "top_p": 1.0, "temperature": 1.0},
    )


for _f in (
    "c2i_B_256.pt",
    "c2i_L_256.pt",
    "c2i_B_384.pt",
    "c2i_L_384.pt",
    "c2i_XL_384.pt",
    "c2i_XXL_384.pt",
    "c2i_3B_384.pt",
):
    register_checkpoint(llamagen_info_from_filename(_f))
for _name, _file, _cfg in (
    ("vq-ds16-c2i", "vq_ds16_c2i.pt", "VQ-16"),
    ("vq-ds8-c2i", "vq_ds8_c2i.pt", "VQ-8"),
):
    register_checkpoint(
        CheckpointInfo(
            name=_name,
            family="llamagen",
            kind="vq",
            source=f"hf://{LLAMAGEN_HF_REPO}/{_file}",
            config=_cfg,
            layout="model",
            extra={"downsample": 16 if _cfg == "VQ-16" else 8},
        )
    )


def suggest_llamagen(sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor]) -> list[str]:
    """Hints for LlamaGen GPT / VQ state dicts: which config the file looks like."""
    hints: list[str] = []
    if "tok_embeddings.weight" in sd:
        from ddcore.models.llamagen import guess_gpt_config_name

        vocab, dim = sd["tok_embeddings.weight"].shape
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
        n_layer = max(layers) + 1 if layers else 0
        name = guess_gpt_config_name(int(dim), n_layer) or guess_gpt_config_name(int(dim))
        want = model_sd.get("tok_embeddings.weight")
        want_layers = {int(m.group(1)) for k in model_sd if (m := re.match(r"layers\.(\d+)\.", k))}
        if want is not None and (int(want.shape[1]) != int(dim) or len(want_layers) != n_layer):
            hints.append(
                f"wrong config: checkpoint dim {dim}, {n_layer} layers"
                + (f" looks like {name}" if name else " (no published config has this width)")
                + f"; the model has dim {int(want.shape[1])}, {len(want_layers)} layers"
            )
        if want is not None and int(want.shape[0]) != int(vocab):
            hints.append(
                f"wrong vocab_size: checkpoint has {vocab} token embeddings, model {int(want.shape[0])}"
            )
        cls = sd.get("cls_embedding.embedding_table.weight")
        wcls = model_sd.get("cls_embedding.embedding_table.weight")
        if cls is not None and wcls is not None and cls.shape[0] != wcls.shape[0]:
            hints.append(
                f"wrong num_classes/class_dropout_prob: checkpoint has {cls.shape[0]} class rows "
                f"(num_classes + 1 null row when trained with label dropout), model {wcls.shape[0]}"
            )
        hints.append(
            "note: block_size / image size is not stored in the state dict (RoPE is recomputed); "
            "take it from the file name (_256 -> 256 tokens, _384 -> 576)"
        )
    if "quantize.embedding.weight" in sd:
        cb = sd["quantize.embedding.weight"]
        want = model_sd.get("quantize.embedding.weight")
        if want is not None and tuple(cb.shape) != tuple(want.shape):
            hints.append(f"wrong codebook: checkpoint {tuple(cb.shape)} vs model {tuple(want.shape)}")
        n_enc = len({k.split(".")[2] for k in sd if k.startswith("encoder.conv_blocks.")})
        n_want = len({k.split(".")[2] for k in model_sd if k.startswith("encoder.conv_blocks.")})
        if n_want and n_enc != n_want:
            hints.append(
                f"wrong ch_mult: checkpoint has {n_enc} resolution levels (downsample {2 ** (n_enc - 1)}), "
                f"model {n_want}; VQ-16 has 5 levels, VQ-8 has 4"
            )
        if "quantize.codebook_used" in model_sd and "quantize.codebook_used" not in sd:
            hints.append("codebook_used buffer missing: build the model with codebook_show_usage=False")
    return hints

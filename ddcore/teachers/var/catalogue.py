"""The published VAR c2i checkpoints (var-d16 ... d30 and the shared VQVAE) and what their state
dicts look like (`suggest_var`: hints for `CheckpointError` messages)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from ddcore.sources import CheckpointInfo, register_checkpoint

VAR_HF_REPO = "FoundationVision/var"
VAR_VQVAE_NAME = "var-vqvae"
PUBLISHED_TEACHERS = ("var-d16", "var-d20", "var-d24", "var-d30")
# The protocol behind the published FIDs (VAR README / issues): VAR's cfg 1.5 is w = 2.5.
VAR_FID_SAMPLING = {"cfg_scale": 2.5, "top_k": 900, "top_p": 0.96, "temperature": 1.0}

register_checkpoint(
    CheckpointInfo(
        name=VAR_VQVAE_NAME,
        family="var",
        kind="vqvae",
        source=f"hf://{VAR_HF_REPO}/vae_ch160v4096z32.pth",
        config="vae_ch160v4096z32",
        image_size=256,
        layout="raw",
    )
)
for _d in (16, 20, 24, 30):
    register_checkpoint(
        CheckpointInfo(
            name=f"var-d{_d}",
            family="var",
            kind="var",
            source=f"hf://{VAR_HF_REPO}/var_d{_d}.pth",
            config=f"var-d{_d}",
            image_size=256,
            block_size=680,
            layout="raw",
            tokenizer=VAR_VQVAE_NAME,
            num_classes=1000,
            sampling=dict(VAR_FID_SAMPLING),
        )
    )


def suggest_var(sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor]) -> list[str]:
    """Hints naming the VAR / VQVAE config a state dict looks like, for CheckpointError messages."""
    hints: list[str] = []

    def blocks(d: Mapping[str, Tensor]) -> int:
        idx = {int(m.group(1)) for k in d if (m := re.match(r"blocks\.(\d+)\.", k))}
        return max(idx) + 1 if idx else 0

    if "word_embed.weight" in sd and "word_embed.weight" in model_sd:
        got = (blocks(sd), int(sd["word_embed.weight"].shape[0]))
        want = (blocks(model_sd), int(model_sd["word_embed.weight"].shape[0]))
        if got != want:
            name = (
                f" (looks like var-d{got[0]})" if got[1] == 64 * got[0] and got[0] in (16, 20, 24, 30) else ""
            )
            hints.append(
                f"wrong depth/width: checkpoint depth {got[0]}, C {got[1]}{name}; model depth {want[0]}, C {want[1]}"
            )
    for key, dim, what in (
        ("pos_1LC", 1, "sequence length L = sum(pn^2)"),
        ("lvl_embed.weight", 0, "number of scales"),
    ):
        if key in sd and key in model_sd and sd[key].shape[dim] != model_sd[key].shape[dim]:
            hints.append(
                f"wrong patch_nums: checkpoint {what} {sd[key].shape[dim]}, model {model_sd[key].shape[dim]}"
            )
    if (
        "class_emb.weight" in sd
        and "class_emb.weight" in model_sd
        and sd["class_emb.weight"].shape[0] != model_sd["class_emb.weight"].shape[0]
    ):
        hints.append(
            f"wrong num_classes: checkpoint has {sd['class_emb.weight'].shape[0]} class rows (num_classes + 1 null row)"
        )
    if "shared_ada_lin.1.weight" in sd and "shared_ada_lin.1.weight" not in model_sd:
        hints.append("checkpoint uses shared AdaLN (shared_aln=True, e.g. the 512-px d36)")
    if "quantize.ema_vocab_hit_SV" in sd and "quantize.ema_vocab_hit_SV" in model_sd:
        got, want = (
            tuple(sd["quantize.ema_vocab_hit_SV"].shape),
            tuple(model_sd["quantize.ema_vocab_hit_SV"].shape),
        )
        if got != want:
            hints.append(
                f"VQVAE built for {want[0]} scales / V {want[1]}, checkpoint has {got[0]} scales / V {got[1]}"
            )
    if "encoder.conv_in.weight" in sd and "encoder.conv_in.weight" in model_sd:
        got, want = sd["encoder.conv_in.weight"].shape[0], model_sd["encoder.conv_in.weight"].shape[0]
        if got != want:
            hints.append(f"wrong VQVAE ch: checkpoint {got}, model {want}")
    return hints

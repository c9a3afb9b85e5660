"""VAR as a `Teacher`: one AR step per scale (step_sizes = [1, 4, 9, ..., 256]).

Sampling follows the original `autoregressive_infer_cfg` exactly, except that the draw itself is
the shared noise-driven chooser (so a VAR sample is reproducible per seed and batch-independent):
  * classifier-free guidance runs cond and uncond rows in one batch [cond; null class] and
    ramps with the scale: ratio = (w - 1) si / (S - 1), logits = (1 + ratio) cond - ratio uncond
    (scale 0 is unguided). `params.cfg_scale` is the project-wide weight w (1 = off), so VAR's
    own `cfg` c is w = 1 + c (official FID setting c = 1.5, w = 2.5);
  * top-k keeps logits >= the k-th largest, then VAR's top-p: sort ascending and drop the tokens
    whose ascending cumulative probability is <= 1 - p (the most likely token always stays);
  * there is no temperature in VAR: `params.temperature` must be 1 and `cfg_interval` -1;
  * the softmax is taken in fp32.
The token "embedding space" DD works in (`codebook`) is the raw VQVAE codebook (V, Cvae),
Euclidean, not normalised. Continuous token vectors decode through the same f_hat accumulation
as codes (`VQVAE.decode_vectors_pyramid`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ddcore.checkpoints import (
    CheckpointError,
    load_model_config,
    load_safetensors_model,
    load_state_dict_file,
    load_strict,
    save_model,
    unwrap_state_dict,
)
from ddcore.models.kv_cache import KVCache
from ddcore.models.var import VAR, VARConfig, var_config
from ddcore.models.var_vqvae import VQVAE, VQVAEConfig
from ddcore.params import SamplingParams
from ddcore.sampling import top_k_filter
from ddcore.sources import find_checkpoint, resolve_source
from ddcore.teachers.base import StepState, Teacher
from ddcore.teachers.var.catalogue import VAR_VQVAE_NAME, suggest_var

# --------------------------------------------------------------------------------------------
# VAR's logits processing
# --------------------------------------------------------------------------------------------


def var_top_p_filter(logits: Tensor, p: float) -> Tensor:
    """VAR's nucleus filter: sort ascending, drop tokens whose cumulative probability is <= 1 - p.

    The largest-logit token is always kept. p >= 1 (or the original's p = 0) is a no-op.
    """
    if p <= 0.0 or p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - p)
    remove[..., -1:] = False
    mask = torch.zeros_like(remove).scatter(-1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def var_guided_logits(cond: Tensor, uncond: Tensor | None, si: int, num_scales: int, w: float) -> Tensor:
    """(1 + r) cond - r uncond with r = (w - 1) si / (S - 1): the weight ramps linearly from 1 at
    the first scale to w at the last (VAR's `cfg` c is w - 1, computed as VAR computes it)."""
    ratio = (w - 1.0) * si / (num_scales - 1) if num_scales > 1 else 0.0
    if uncond is None or ratio == 0.0:
        return cond
    return (1.0 + ratio) * cond - ratio * uncond


def var_logits_to_probs(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """top-k, then VAR's top-p, then softmax, all in fp32 (no temperature, as in VAR)."""
    logits = var_top_p_filter(top_k_filter(logits.float(), top_k), top_p)
    return torch.softmax(logits, dim=-1)


def check_var_sampling(params: SamplingParams) -> None:
    if params.temperature != 1.0:
        raise ValueError(
            f"VAR samples without temperature (the original has none); got temperature={params.temperature}. "
            "Set teacher.sampling.temperature to 1.0 for VAR presets."
        )
    if params.cfg_interval != -1:
        raise ValueError(
            f"VAR guides every scale with a linear ramp; cfg_interval={params.cfg_interval} is a LlamaGen "
            "option. Set it to -1 for VAR presets."
        )


# --------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------


@dataclass
class VARState(StepState):
    cache: list[KVCache]  # one per VAR block
    cond: Tensor  # (B, C) or (2B, C) with the null-class rows second
    f_hat: Tensor  # (B, Cvae, H, W): accumulated over the scales fed so far
    batch: int
    guided: bool
    next_step: int  # the step whose tokens `advance` expects next


class VARTeacher(Teacher):
    family = "var"

    def __init__(self, var: VAR, vqvae: VQVAE, amp_dtype: torch.dtype | None = None):
        vc, qc = var.cfg, vqvae.cfg
        problems = []
        if tuple(vc.patch_nums) != tuple(qc.patch_nums):
            problems.append(f"patch_nums {vc.patch_nums} vs VQVAE {qc.patch_nums}")
        if vc.vocab_size != qc.vocab_size:
            problems.append(f"vocab_size {vc.vocab_size} vs VQVAE {qc.vocab_size}")
        if vc.Cvae != qc.Cvae:
            problems.append(f"Cvae {vc.Cvae} vs VQVAE {qc.Cvae}")
        if problems:
            raise ValueError("VAR and VQVAE do not fit together: " + "; ".join(problems))
        self.var, self.vqvae = var.eval(), vqvae.eval()
        self.num_classes = vc.num_classes
        self.image_size = qc.image_size
        self.amp_dtype = amp_dtype
        self._step_sizes = [p * p for p in vc.patch_nums]

    # --- structure ---------------------------------------------------------------------------
    @property
    def step_sizes(self) -> list[int]:
        return list(self._step_sizes)

    @property
    def num_scales(self) -> int:
        return len(self._step_sizes)

    @property
    def codebook(self) -> Tensor:
        return self.vqvae.codebook.detach()

    @property
    def device(self) -> torch.device:
        return self.var.pos_1LC.device

    @property
    def dtype(self) -> torch.dtype:
        return self.var.pos_1LC.dtype

    def to(self, device: str | torch.device) -> VARTeacher:
        self.var.to(device)
        self.vqvae.to(device)
        return self

    def _amp(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _probs(self, logits: Tensor, si: int, batch: int, guided: bool, params: SamplingParams) -> Tensor:
        cond, uncond = (logits[:batch], logits[batch:]) if guided else (logits, None)
        guided_logits = var_guided_logits(cond.float(), uncond, si, self.num_scales, params.cfg_scale)
        return var_logits_to_probs(guided_logits, params.top_k, params.top_p)

    # --- AR stepping -------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, labels: Tensor, params: SamplingParams) -> tuple[VARState, Tensor]:
        check_var_sampling(params)
        labels = self._labels(labels)
        batch, guided = labels.shape[0], params.cfg_scale != 1.0
        if guided:
            labels = torch.cat((labels, torch.full_like(labels, self.var.null_class)))
        cond = self.var.cond(labels)
        cache = self.var.new_cache()
        with self._amp():
            logits = self.var.step(self.var.first_input(cond), cond, cache)
        state = VARState(cache, cond, self.vqvae.new_fhat(batch, self.device), batch, guided, next_step=0)
        return state, self._probs(logits, 0, batch, guided, params)

    @torch.no_grad()
    def advance(self, state: VARState, step: int, tokens: Tensor, params: SamplingParams) -> Tensor:
        if step != state.next_step:
            raise ValueError(f"advance expects the tokens of step {state.next_step}, got step {step}")
        if step >= self.num_scales - 1:
            raise ValueError(f"step {step} is the last scale; there is nothing to predict after it")
        tokens = tokens.to(self.device).long()
        if tokens.shape != (state.batch, self._step_sizes[step]):
            raise ValueError(f"step {step} takes tokens of shape {(state.batch, self._step_sizes[step])}")
        state.f_hat, nxt = self.vqvae.next_input(step, state.f_hat, self.vqvae.embed_scale(tokens))
        x = self.var.scale_input(step + 1, nxt)
        if state.guided:
            x = torch.cat((x, x))
        with self._amp():
            logits = self.var.step(x, state.cond, state.cache)
        state.next_step = step + 1
        return self._probs(logits, step + 1, state.batch, state.guided, params)

    @torch.no_grad()
    def forward_logits(self, tokens: Tensor, labels: Tensor, with_null: bool) -> Tensor:
        """Masked full forward: (B, L, V) conditional logits, or (2B, L, V) [cond; null class]."""
        tokens = tokens.to(self.device).long()
        return self._input_logits(self.vqvae.idx_to_var_input(tokens), labels, with_null)

    def _input_logits(self, x: Tensor, labels: Tensor, with_null: bool) -> Tensor:
        labels = self._labels(labels)
        if with_null:
            labels = torch.cat((labels, torch.full_like(labels, self.var.null_class)))
            x = torch.cat((x, x))
        with self._amp():
            return self.var(labels, x)

    @torch.no_grad()
    def teacher_forced_logits(self, tokens: Tensor, labels: Tensor, params: SamplingParams) -> Tensor:
        """(B, L, V) fp32 guided logits (VAR's per-scale CFG ramp, before top-k / top-p)."""
        check_var_sampling(params)
        guided = params.cfg_scale != 1.0
        return self._guided_scales(self.forward_logits(tokens, labels, guided).float(), params)

    @torch.no_grad()
    def vector_forced_logits(self, vectors: Tensor, labels: Tensor, params: SamplingParams) -> Tensor:
        """VAR reads continuous vectors natively: f_hat accumulated from them, as from codes."""
        check_var_sampling(params)
        guided = params.cfg_scale != 1.0
        x = self.vqvae.vectors_to_var_input(vectors.to(self.device, torch.float32))
        return self._guided_scales(self._input_logits(x, labels, guided).float(), params)

    def _guided_scales(self, logits: Tensor, params: SamplingParams) -> Tensor:
        """[cond; null] (or cond) logits -> VAR's per-scale CFG ramp applied, (B, L, V)."""
        guided = params.cfg_scale != 1.0
        batch = logits.shape[0] // 2 if guided else logits.shape[0]
        cond, uncond = (logits[:batch], logits[batch:]) if guided else (logits, None)
        out = []
        for si, (b, e) in enumerate(self.var.cfg.begin_ends):
            u = None if uncond is None else uncond[:, b:e]
            out.append(var_guided_logits(cond[:, b:e], u, si, self.num_scales, params.cfg_scale))
        return torch.cat(out, dim=1)

    def sampling_probs(self, logits: Tensor, params: SamplingParams) -> Tensor:
        return var_logits_to_probs(logits, params.top_k, params.top_p)

    # --- decoding ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        tokens = tokens.to(self.device).long()
        if tokens.shape[1] != self.seq_len:
            raise ValueError(f"expected (B, {self.seq_len}) tokens, got {tuple(tokens.shape)}")
        if (tokens < 0).any() or (tokens >= self.vocab_size).any():
            raise ValueError(
                "token indices out of range (unfinished generation? -1 marks positions not sampled)"
            )
        return ((self.vqvae.idx_pyramid_to_img(tokens) + 1) / 2).float()

    @torch.no_grad()
    def decode_vectors(self, vectors: Tensor) -> Tensor:
        if vectors.shape[1:] != (self.seq_len, self.token_dim):
            raise ValueError(
                f"expected (B, {self.seq_len}, {self.token_dim}) vectors, got {tuple(vectors.shape)}"
            )
        return ((self.vqvae.decode_vectors_pyramid(vectors.to(self.device).float()) + 1) / 2).float()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def load_var_vqvae(
    source: str | os.PathLike | None = None, cfg: VQVAEConfig | None = None, device: str = "cpu"
) -> VQVAE:
    """The official VQVAE (default: the registry's hf:// file) loaded strictly, buffers included."""
    path = resolve_source(source or find_checkpoint(VAR_VQVAE_NAME).source)
    sd = unwrap_state_dict(load_state_dict_file(path))
    with torch.device("meta"):
        vqvae = VQVAE(cfg or VQVAEConfig())
    load_strict(
        vqvae, sd, drop_patterns=(), what=f"VAR VQVAE ({path.name})", suggest=suggest_var, assign=True
    )
    return vqvae.to(device).eval()


def load_var_model(cfg: VARConfig, source: str | os.PathLike, device: str = "cpu") -> VAR:
    path = resolve_source(source)
    sd = unwrap_state_dict(load_state_dict_file(path))
    with torch.device("meta"):
        var = VAR(cfg)
    load_strict(
        var,
        sd,
        drop_patterns=(),
        what=f"VAR depth {cfg.depth} ({path.name})",
        suggest=suggest_var,
        assign=True,
    )
    return var.to(device).eval()


def load_var_teacher(
    name: str = "var-d16",
    source: str | os.PathLike | None = None,
    vq_source: str | os.PathLike | None = None,
    device: str = "cpu",
    amp_dtype: torch.dtype | None = None,
    cfg: VARConfig | None = None,
    vq_cfg: VQVAEConfig | None = None,
) -> VARTeacher:
    """An official VAR teacher, loaded strictly from the original `.pth` state dicts.

    `name` picks the config (var-d16/20/24/30) and the registry's default hf:// files; `source` /
    `vq_source` may be local paths or s3:// copies. `cfg` / `vq_cfg` override the architecture
    (checkpoints in the official layout but of another size).
    """
    cfg = cfg or var_config(name)
    if source is None:
        info = find_checkpoint(name)
        if info is None:
            raise CheckpointError(f"no registered VAR checkpoint {name!r} and no source given")
        source = info.source
    var = load_var_model(cfg, source, device)
    vqvae = load_var_vqvae(vq_source, vq_cfg or VQVAEConfig(patch_nums=cfg.patch_nums), device)
    return VARTeacher(var, vqvae, amp_dtype=amp_dtype)


# --- our own checkpoints: var.safetensors/var.json + vqvae.safetensors/vqvae.json --------------


def save_var_teacher(directory: str | os.PathLike, var: VAR, vqvae: VQVAE) -> Path:
    directory = Path(directory)
    save_model(directory / "vqvae", vqvae, vqvae.cfg.to_dict())
    save_model(directory / "var", var, var.cfg.to_dict())
    return directory


def build_var_teacher_from_dir(
    directory: str | os.PathLike, device: str = "cpu", amp_dtype: torch.dtype | None = None
) -> VARTeacher:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory}: not a directory (expected var.safetensors/json, vqvae.safetensors/json)"
        )
    vq_cfg = VQVAEConfig.from_dict(load_model_config(directory / "vqvae"))
    var_cfg = VARConfig.from_dict(load_model_config(directory / "var"))
    with torch.device("meta"):
        vqvae, var = VQVAE(vq_cfg), VAR(var_cfg)
    load_safetensors_model(
        directory / "vqvae",
        vqvae,
        what=f"{directory}/vqvae",
        drop_patterns=(),
        suggest=suggest_var,
        assign=True,
    )
    load_safetensors_model(
        directory / "var", var, what=f"{directory}/var", drop_patterns=(), suggest=suggest_var, assign=True
    )
    return VARTeacher(var.to(device), vqvae.to(device), amp_dtype=amp_dtype)

"""LlamaGen c2i as a `Teacher`: one position per AR step, KV-cached, batched CFG as generate.py.

Per step the sampling distribution is
    p = softmax(top_p(top_k(guided / max(T, 1e-5)))),   guided = uncond + s (cond - uncond)
computed in fp32 from the last-position logits (`ddcore.sampling.logits_to_probs`). The batch is
stacked [cond ; null] (null = class `num_classes`). Prefill (token 0) is always guided; with
`cfg_interval` > -1, decode step i (which predicts token i + 1) uses the cond logits alone once
i > cfg_interval. With cfg_scale == 1 the guided logits are the cond logits, so the null half is
skipped (same probabilities, half the work). Unlike generate.py, which ignores cfg_scale <= 1,
any scale != 1 is applied (0 gives the unconditional model).

`teacher_forced_probs` computes the same distributions for every position with one full forward
of the cond and null batches; a test checks it equals what start/advance produce.

Speed: each step feeds one token per row (the prefix is never recomputed: it lives in the KV
cache, which is reused across generations of the same batch size), and cond and null rows go
through one forward. `compile()` gives a twin whose decode steps run the torch.compile'd,
static-shape step (`GPT.compiled_decode`, CUDA graphs on CUDA) with the position held in a
device tensor, so the per-token loop has no host sync of its own; its VQ decode is compiled too.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from ddcore.checkpoints import (
    CheckpointError,
    load_model_config,
    load_state_dict_file,
    load_strict,
    unwrap_state_dict,
)
from ddcore.models.compiled import compiled, default_mode
from ddcore.models.llamagen import GPT, GPTConfig, gpt_config
from ddcore.models.vq import VQ_CONFIGS, VQConfig, VQModel
from ddcore.params import SamplingParams
from ddcore.sampling import cfg_logits, logits_to_probs
from ddcore.teachers.base import StepState, Teacher
from ddcore.teachers.llamagen.catalogue import (
    DEFAULT_TOKENIZER,
    llamagen_info_from_filename,
    suggest_llamagen,
)

__all__ = [
    "LlamaGenState",
    "LlamaGenTeacher",
    "build_llamagen_teacher_from_dir",
    "load_llamagen_gpt",
    "load_llamagen_teacher",
    "load_llamagen_vq",
]


@dataclass
class LlamaGenState(StepState):
    batch: int
    guided: bool  # whether the batch holds a null half
    pos: int = 0  # next image position whose probabilities were returned
    # compiled teachers only: the decode function and the step as a (1,) device tensor
    decode: Callable[[Tensor, Tensor], Tensor] | None = None
    pos_t: Tensor | None = None


class LlamaGenTeacher(Teacher):
    family = "llamagen"

    def __init__(
        self,
        gpt: GPT,
        vq: VQModel,
        num_classes: int,
        image_size: int,
        dtype: torch.dtype | None = None,
        vector_embed: nn.Module | None = None,
    ):
        self.gpt = gpt.eval()
        # DD2's continuous-input teacher: codebook-space vectors (d) -> the GPT's input embeddings
        self.vector_embed = None if vector_embed is None else vector_embed.eval()
        # channels-last convolutions: the same numbers, a faster decode on CPU (and cuDNN) for every sampler
        self.vq = vq.eval().to(memory_format=torch.channels_last)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        if dtype is not None:
            self.gpt.to(dtype)
        cfg = gpt.cfg
        if cfg.num_classes != self.num_classes:
            raise ValueError(
                f"GPT has {cfg.num_classes} classes, teacher was given num_classes={num_classes}"
            )
        if vq.cfg.codebook_size != cfg.vocab_size:
            raise ValueError(f"VQ codebook size {vq.cfg.codebook_size} != GPT vocab_size {cfg.vocab_size}")
        if cfg.grid_size * vq.downsample != self.image_size:
            raise ValueError(
                f"image_size {image_size} != token grid {cfg.grid_size} x VQ downsample {vq.downsample}; "
                "wrong block_size for this checkpoint?"
            )
        with torch.no_grad():
            self._codebook = vq.codebook_vectors().detach().float().clone()
        self._compiled = False
        self._compile_mode: str | None = None

    # --- structure ------------------------------------------------------------------------------
    @property
    def step_sizes(self) -> list[int]:
        return [1] * self.gpt.cfg.block_size

    @property
    def codebook(self) -> Tensor:
        if self._codebook.device != self.device:
            self._codebook = self._codebook.to(self.device)
        return self._codebook

    @property
    def device(self) -> torch.device:
        return self.gpt.device

    @property
    def dtype(self) -> torch.dtype:
        return self.gpt.dtype

    def to(self, device: str | torch.device) -> LlamaGenTeacher:
        self.gpt.to(device)
        self.vq.to(device)
        if self.vector_embed is not None:
            self.vector_embed.to(device)
        self.gpt.clear_caches()
        return self

    # --- compilation ----------------------------------------------------------------------------
    @property
    def is_compiled(self) -> bool:
        return self._compiled

    def compile(self, mode: str | None = None) -> LlamaGenTeacher:
        """A twin of this teacher whose decode steps run the torch.compile'd step; self is unchanged.

        The twin shares the GPT and VQ modules (weights and KV caches; use one at a time) and
        replaces `advance`'s forward by `GPT.compiled_decode(mode)` and the VQ decoder by its
        compiled form (`ddcore.models.compiled`): mode None means "reduce-overhead" (CUDA
        graphs) on CUDA and "default" elsewhere, resolved on the device the model is on when
        sampling. Prefill and teacher forcing stay eager. The first generation (and decode) at
        each batch size compiles (slow); later ones reuse the graph.
        """
        if mode is not None:
            try:  # unknown modes fail here, not mid-sampling
                torch._inductor.list_mode_options(mode)
            except RuntimeError as e:
                raise ValueError(f"LlamaGenTeacher.compile: {e}") from None
        twin = copy.copy(self)
        twin._compiled, twin._compile_mode = True, mode
        return twin

    # --- helpers ------------------------------------------------------------------------------
    def _use_null(self, params: SamplingParams) -> bool:
        if params.cfg_scale == 1.0:
            return False
        if not self.gpt.cfg.has_null_class:
            raise ValueError(
                f"cfg_scale={params.cfg_scale} needs the null class row, but this GPT was built without "
                "label dropout (class_dropout_prob=0); use cfg_scale=1.0"
            )
        return True

    def _probs(self, logits: Tensor, guided: bool, use_cfg: bool, params: SamplingParams) -> Tensor:
        """logits (2B or B, ..., V) fp32 -> probs (B, ..., V)."""
        if guided:
            cond, uncond = logits.chunk(2, dim=0)
            logits = cfg_logits(cond, uncond, params.cfg_scale) if use_cfg else cond
        return logits_to_probs(logits.float(), params.temperature, params.top_k, params.top_p)

    def _cfg_active(self, decode_step: int, params: SamplingParams) -> bool:
        return not (params.cfg_interval > -1 and decode_step > params.cfg_interval)

    # --- AR stepping --------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, labels: Tensor, params: SamplingParams) -> tuple[LlamaGenState, Tensor]:
        labels = self._labels(labels)
        bsz = labels.shape[0]
        guided = self._use_null(params)
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.gpt.null_class)])
        self.gpt.setup_caches(
            labels.shape[0], self.gpt.cfg.block_size + self.gpt.cfg.cls_token_num, self.dtype
        )
        logits = self.gpt.prefill(labels)  # (B', V)
        probs = self._probs(logits, guided, True, params)  # prefill is always guided
        state = LlamaGenState(batch=bsz, guided=guided, pos=0)
        if self._compiled:
            state.decode = self.gpt.compiled_decode(self._compile_mode)
            state.pos_t = torch.zeros(1, dtype=torch.long, device=self.device)
        return state, probs.unsqueeze(1)

    @torch.no_grad()
    def advance(self, state: LlamaGenState, step: int, tokens: Tensor, params: SamplingParams) -> Tensor:
        if step != state.pos:
            raise ValueError(f"advance(step={step}) out of order: the state expects step {state.pos}")
        x = tokens.to(self.device).long().reshape(state.batch)
        if state.guided:
            x = torch.cat([x, x])
        if state.decode is not None:
            state.pos_t.fill_(step)  # a device-side write: no host sync, no new tensor
            logits = state.decode(x, state.pos_t)
        else:
            logits = self.gpt.decode_step(x, step)
        state.pos = step + 1
        probs = self._probs(logits, state.guided, self._cfg_active(step, params), params)
        return probs.unsqueeze(1)

    @torch.no_grad()
    def teacher_forced_logits(self, tokens: Tensor, labels: Tensor, params: SamplingParams) -> Tensor:
        """(B, T, V) fp32 guided logits (before temperature / top-k / top-p) for every position."""
        tokens = tokens.to(self.device).long()
        return self._guided_forced_logits(self.gpt.tok_embeddings(tokens[:, :-1]), labels, params)

    def vector_forced_logits(self, vectors: Tensor, labels: Tensor, params: SamplingParams) -> Tensor:
        if self.vector_embed is None:
            raise ValueError(
                "this LlamaGen teacher reads token indices only; DD2's continuous-input teacher "
                "(a fitted vector embedding) reads vectors"
            )
        prefix = self.vector_embed(vectors[:, :-1].to(self.device, torch.float32)).to(self.dtype)
        return self._guided_forced_logits(prefix, labels, params)

    def _guided_forced_logits(self, prefix: Tensor, labels: Tensor, params: SamplingParams) -> Tensor:
        """Guided logits of every position from the input embeddings (B, T - 1, D) of its prefix."""
        labels = self._labels(labels)
        if not self._use_null(params):
            return self.gpt.logits(self.gpt.hidden_states(prefix, labels))
        null = torch.full_like(labels, self.gpt.null_class)
        hidden = self.gpt.hidden_states(torch.cat([prefix, prefix]), torch.cat([labels, null]))
        cond, uncond = self.gpt.logits(hidden).chunk(2, dim=0)
        guided = cfg_logits(cond, uncond, params.cfg_scale)
        if params.cfg_interval > -1:
            # position p comes from decode step p - 1; guidance stops once p - 1 > cfg_interval
            stop = params.cfg_interval + 2
            guided[:, stop:] = cond[:, stop:]
        return guided

    def sampling_probs(self, logits: Tensor, params: SamplingParams) -> Tensor:
        return logits_to_probs(logits, params.temperature, params.top_k, params.top_p)

    # --- decoding -------------------------------------------------------------------------------
    def _to_unit(self, x: Tensor) -> Tensor:
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        tokens = tokens.to(self.vq.device).long()
        return self.decode_vectors(self.vq.codebook_vectors()[tokens])

    @torch.no_grad()
    def decode_vectors(self, vectors: Tensor) -> Tensor:
        """The compiled twin runs the VQ decoder compiled too (students decode through it)."""
        vectors = vectors.to(self.vq.device).float()
        if not self._compiled:
            return self._to_unit(self.vq.decode_vectors(vectors, self.gpt.cfg.grid_size))
        fn = compiled(VQModel.decode_vectors, self._compile_mode or default_mode(self.vq.device))
        return self._to_unit(fn(self.vq, vectors, self.gpt.cfg.grid_size))


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def _meta_then_load(build, sd: dict, what: str, device, dtype):
    """Build on the meta device (no random init of billions of params), then adopt the checkpoint."""
    with torch.device("meta"):
        model = build()
    load_strict(model, sd, what=what, suggest=suggest_llamagen, assign=True)
    return model.to(device=device, dtype=dtype or torch.float32)


def load_llamagen_gpt(
    path: str | os.PathLike,
    cfg: GPTConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    what: str | None = None,
) -> GPT:
    """Strictly load a published (or raw) GPT state dict into a model of config `cfg`."""
    sd = unwrap_state_dict(load_state_dict_file(path), prefer=("model", "module", "state_dict"))
    what = what or f"LlamaGen GPT (dim {cfg.dim}, {cfg.n_layer} layers, block_size {cfg.block_size})"
    gpt = _meta_then_load(lambda: GPT(cfg), sd, what, device, dtype)
    gpt.freqs_cis = gpt._rope_table(gpt.device)
    return gpt.eval()


def load_llamagen_vq(path: str | os.PathLike, cfg: VQConfig, device: str | torch.device = "cpu") -> VQModel:
    sd = unwrap_state_dict(load_state_dict_file(path), prefer=("model", "module", "state_dict", "ema"))
    what = f"LlamaGen VQ (codebook {cfg.codebook_size}x{cfg.codebook_embed_dim}, {len(cfg.encoder_ch_mult)} levels)"
    return _meta_then_load(lambda: VQModel(cfg), sd, what, device, torch.float32).eval()


def load_llamagen_teacher(
    name_or_gpt_path: str,
    vq_path: str | None = None,
    *,
    source: str | None = None,
    gpt_model: str | GPTConfig | None = None,
    image_size: int | None = None,
    vq_model: str | VQConfig | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    settings=None,
) -> LlamaGenTeacher:
    """Build a teacher from a registry name (``llamagen-b``) or a GPT checkpoint source.

    The GPT config and image size come from the registry entry (by name, or by the file name of
    the source: ``c2i_L_384.pt``), or from `gpt_model` / `image_size`. `source` / `vq_path`
    override the registry's download locations (local path, s3://, hf://).
    """
    from ddcore.sources import find_checkpoint, get_checkpoint, resolve_source

    info = find_checkpoint(name_or_gpt_path)
    if info is None:
        try:
            info = llamagen_info_from_filename(name_or_gpt_path)
        except ValueError:
            info = None
    if gpt_model is None and info is None:
        raise ValueError(
            f"{name_or_gpt_path!r} is not a known LlamaGen checkpoint; pass gpt_model= and image_size="
        )
    is_name = info is not None and name_or_gpt_path == info.name
    gpt_src = source or (info.source if is_name else name_or_gpt_path)
    tok_info = get_checkpoint(info.tokenizer) if info is not None and info.tokenizer else None
    vq_src = vq_path or (tok_info.source if tok_info else get_checkpoint(DEFAULT_TOKENIZER).source)
    if isinstance(vq_model, VQConfig):
        vq_cfg = vq_model
    else:
        vq_cfg = VQ_CONFIGS[vq_model or (tok_info.config if tok_info and tok_info.config else "VQ-16")]

    size = image_size or (info.image_size if info else None)
    if size is None:
        raise ValueError("image_size is unknown; pass image_size=")
    block = (size // vq_cfg.downsample) ** 2
    if isinstance(gpt_model, GPTConfig):
        cfg = gpt_model
        if cfg.block_size != block:
            raise ValueError(
                f"gpt_model.block_size {cfg.block_size} != (image_size/{vq_cfg.downsample})^2 = {block}"
            )
        if num_classes is not None and num_classes != cfg.num_classes:
            raise ValueError(f"num_classes={num_classes} but gpt_model.num_classes={cfg.num_classes}")
        config_name = "GPT"
    else:
        config_name = gpt_model or info.config
        ncls = num_classes or (info.num_classes if info else 1000)
        # the RoPE grid is not in the state dict: block_size always comes from the image size
        cfg = gpt_config(config_name, block_size=block, num_classes=ncls)

    gpt_file = resolve_source(gpt_src, settings=settings)
    vq_file = resolve_source(vq_src, settings=settings)
    label = f"LlamaGen {config_name} ({Path(gpt_file).name}, block_size {cfg.block_size})"
    gpt = load_llamagen_gpt(gpt_file, cfg, device=device, dtype=dtype, what=label)
    vq = load_llamagen_vq(vq_file, vq_cfg, device=device)
    return LlamaGenTeacher(gpt, vq, num_classes=cfg.num_classes, image_size=size)


def _known_fields(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def build_llamagen_teacher_from_dir(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LlamaGenTeacher:
    """Load our own `gpt.safetensors/gpt.json` + `vq.safetensors/vq.json` (e.g. the tiny world).

    gpt.json holds the GPTConfig fields plus `image_size` (at the top level or under "config");
    vq.json holds the VQConfig fields (likewise). Other keys are metadata and are ignored.
    """
    d = Path(directory)
    gj, vj = load_model_config(d / "gpt"), load_model_config(d / "vq")
    gcfg_d = {**gj, **gj.get("config", {})}
    image_size = gcfg_d.get("image_size")
    if image_size is None:
        raise CheckpointError(f"{d / 'gpt.json'}: 'image_size' missing")
    # extra metadata (image_size, training stats, ...) may sit beside the config fields
    gcfg = GPTConfig.from_dict(_known_fields(GPTConfig, gcfg_d))
    num_classes = int(gcfg_d.get("num_classes", gcfg.num_classes))
    vcfg = VQConfig.from_dict(_known_fields(VQConfig, {**vj, **vj.get("config", {})}))
    gpt = load_llamagen_gpt(d / "gpt.safetensors", gcfg, device=device, dtype=dtype, what=f"GPT from {d}")
    vq = load_llamagen_vq(d / "vq.safetensors", vcfg, device=device)
    if math.isqrt(gcfg.block_size) * vq.downsample != int(image_size):
        raise CheckpointError(
            f"{d}: image_size {image_size} does not match block_size {gcfg.block_size} x VQ stride"
        )
    return LlamaGenTeacher(gpt, vq, num_classes=num_classes, image_size=int(image_size))

"""Experiment parameters: ``params.yaml`` presets, validated before any work starts.

A preset is one complete experiment: the teacher (family, name, sampling), the distillation
method (`method`, and that method's own section, e.g. `dd1:`), evaluation, benchmark and the
promotion gate. Bad values fail here with the key path and what is allowed; which families and
teacher names exist is checked against the family registry when a preset is resolved for work
(`ddcore.pipeline.presets.resolve_preset`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ddcore.settings import PROJECT_ROOT

PARAMS_FILE = PROJECT_ROOT / "params.yaml"
METHODS = ("dd1", "dd2")

Prob = Annotated[float, Field(gt=0.0, le=1.0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingParams(Strict):
    """How the teacher samples: p = softmax(top_p(top_k(guided_logits / temperature))).

    Guidance has one meaning in every family: guided = uncond + w (cond - uncond) with
    w = `cfg_scale`, so 1 is off and 0 is the unconditional model. LlamaGen applies w at every
    step (until `cfg_interval`); VAR ramps it linearly from 1 at the first scale to w at the last
    (VAR's own schedule; VAR's `cfg` c is w = 1 + c)."""

    cfg_scale: float = Field(
        default=1.0,
        ge=0.0,
        description="guidance weight w: 1 = off, 0 = unconditional; negative means nothing",
    )
    temperature: float = Field(default=1.0, gt=0.0)
    top_k: int = Field(default=0, ge=0, description="0 = off")
    top_p: Prob = Field(default=1.0, description="1.0 = off")
    cfg_interval: int = Field(default=-1, ge=-1, description="-1 = guide every step")


class TinyWorldParams(Strict):
    """The offline tiny world: procedural data, a tiny VQ, a tiny GPT, an evaluator."""

    image_size: int = Field(default=32, ge=8)
    num_classes: int = Field(default=10, ge=2)
    train_images: int = Field(default=20000, ge=100)
    seed: int = 0
    vq_codebook_size: int = Field(default=512, ge=16)
    vq_codebook_dim: int = Field(default=8, ge=2)
    vq_ch: int = Field(default=32, ge=8)
    vq_ch_mult: list[int] = [1, 2, 2]
    vq_z_channels: int = Field(default=64, ge=8)
    vq_num_res_blocks: int = Field(default=1, ge=1)
    vq_steps: int = Field(default=1500, ge=1)
    vq_batch_size: int = Field(default=64, ge=1)
    vq_lr: float = Field(default=1e-3, gt=0)
    gpt_dim: int = Field(default=192, ge=16)
    gpt_layers: int = Field(default=4, ge=1)
    gpt_heads: int = Field(default=4, ge=1)
    gpt_steps: int = Field(default=2500, ge=1)
    gpt_batch_size: int = Field(default=128, ge=1)
    gpt_lr: float = Field(default=1e-3, gt=0)
    class_dropout_prob: float = Field(default=0.1, ge=0.0, lt=1.0)
    evaluator_steps: int = Field(default=800, ge=1)
    evaluator_batch_size: int = Field(default=128, ge=1)
    evaluator_lr: float = Field(default=2e-3, gt=0)
    holdout_images: int = Field(default=2000, ge=10, description="held-out real images for the accuracies")
    quality_samples_per_class: int = Field(default=50, ge=1, description="teacher samples per class")
    min_evaluator_accuracy: float = Field(
        default=0.98, ge=0.0, le=1.0, description="quality bar, real images"
    )
    min_recon_ratio: float = Field(
        default=0.95, ge=0.0, le=1.0, description="quality bar, recon/real accuracy"
    )
    min_sample_accuracy: float = Field(default=0.90, ge=0.0, le=1.0, description="quality bar, CFG samples")


class TeacherParams(Strict):
    name: str = Field(
        description="a teacher name the preset's family registers (tiny, llamagen-l, var-d16, ...)"
    )
    source: str | None = Field(default=None, description="override: local path, s3://..., hf://repo/file")
    vq_source: str | None = None
    sampling: SamplingParams = SamplingParams()
    world: TinyWorldParams | None = None
    copy_of: str | None = Field(
        default=None,
        description="a preset whose prepared teacher (same teacher params) this one copies instead of rebuilding",
    )


class FlowParams(Strict):
    """The deterministic noise -> token ODE (see docs/dd1.md)."""

    steps: int = Field(default=64, ge=1)
    solver: Literal["euler", "heun"] = "heun"
    r_min: float = Field(default=1e-2, gt=0)
    r_max: float = Field(default=1e3, gt=0)
    dtype: Literal["float32", "float64"] = "float64"


class TrajectoryParams(Strict):
    num_pairs: int = Field(default=20000, ge=1)
    shard_size: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=500, ge=1)
    seed: int = 0


class StudentParams(Strict):
    t_list: list[int] = Field(
        default=[0, 32], description="AR steps given as data (tokens; VAR: scales) the student trains from"
    )
    split_t: int = Field(
        default=64,
        ge=0,
        description="AR steps (tokens; VAR: scales) from split_t on decode continuous outputs",
    )
    extra_layers: int = Field(
        default=0,
        ge=0,
        description="blocks added to the teacher's (identity at initialisation); 0 = the released layout",
    )


class TrainParams(Strict):
    """The shared training loop (`ddcore.training.loop`): schedule, optimizer, EMA, checkpoints,
    precision and compilation. Methods extend it with their loss terms."""

    steps: int = Field(default=3000, ge=1)
    batch_size: int = Field(default=128, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    optimizer: Literal["adamw", "muon"] = Field(
        default="adamw",
        description="adamw; or muon: Muon on the transformer blocks' matrices, AdamW on the rest",
    )
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=100, ge=0)
    lr_end_ratio: float = Field(
        default=0.1, ge=0, le=1, description="the cosine decay's end: lr x lr_end_ratio at the last step"
    )
    grad_clip: float = Field(default=1.0, gt=0)
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    val_every: int = Field(default=100, ge=1)
    ckpt_every: int = Field(default=500, ge=1)
    seed: int = 0
    compile: bool = Field(
        default=False,
        description="torch.compile the student's training forward and backward (weights and EMA stay eager)",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="the training forward/backward: auto = bf16 autocast on CUDA, fp32 on CPU; "
        "fp32; bf16 = bf16 autocast on either (for CPUs with bf16 matrix units, e.g. AMX)",
    )


class DD1TrainParams(TrainParams):
    """DD1's loss terms and its held-out pairs on top of the shared loop (docs/dd1.md)."""

    ce_weight: float = Field(default=1.0, ge=0)
    mse_weight: float = Field(default=1.0, ge=0)
    lpips_weight: float = Field(default=0.0, ge=0)
    val_pairs: int = Field(default=256, ge=0)


class DD1Params(Strict):
    """DD1: the flow map, its trajectory data, the student and its training."""

    flow: FlowParams = FlowParams()
    trajectories: TrajectoryParams = TrajectoryParams()
    student: StudentParams = StudentParams()
    train: DD1TrainParams = DD1TrainParams()


class SamplesParams(Strict):
    """Teacher samples (DD2's data-free training data): sharded, resumable, seeded per sample."""

    num_samples: int = Field(default=20000, ge=2)
    shard_size: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=500, ge=1)
    val_samples: int = Field(
        default=500, ge=1, description="the last samples, held out for NLL and validation"
    )
    seed: int = 0


class ContinuousParams(Strict):
    """The continuous-input teacher (LlamaGen; DD2 App. E.4): an MLP d -> D fitted to the token
    embedding on the codebook, then the whole model fine-tuned with the AR loss on teacher samples."""

    mlp_width: int = Field(default=256, ge=1)
    fit_steps: int = Field(default=2000, ge=0, description="full-codebook Adam steps of the MLP fit")
    fit_lr: float = Field(default=1e-3, gt=0)
    train: TrainParams = TrainParams(steps=500, batch_size=64, lr=1e-4, warmup_steps=20, val_every=50)


class ARDiffusionParams(Strict):
    """The AR-diffusion model (DD2 Stage 1): the backbone of the continuous-input teacher with an
    MLP velocity head, trained on teacher samples to the teacher's analytic velocity (GTS)."""

    head_width: int = Field(default=256, ge=8)
    head_depth: int = Field(default=3, ge=1)
    noise_draws: int = Field(
        default=4, ge=1, description="m: noise draws per sequence (MAR's diffusion_batch_mul)"
    )
    t_min: float = Field(default=1e-3, gt=0, lt=1)
    head_only_steps: int = Field(
        default=0,
        ge=0,
        description="first steps that train the head alone, backbone frozen (the paper's VAR schedule)",
    )
    train: TrainParams = TrainParams(steps=1000, batch_size=64, lr=1e-4, warmup_steps=50, val_every=100)


class DD2SamplerParams(Strict):
    ode_steps: int = Field(
        default=10, ge=1, description="Euler steps per token of the AR-diffusion sampler (paper: 10)"
    )


class DD2Params(Strict):
    """DD2: teacher samples, the continuous-input teacher, the AR-diffusion initialisation (GTS, and
    the plain diffusion loss for comparison), its sampler (docs/dd2.md)."""

    samples: SamplesParams = SamplesParams()
    continuous: ContinuousParams = ContinuousParams()
    ar_diffusion: ARDiffusionParams = ARDiffusionParams()
    sampler: DD2SamplerParams = DD2SamplerParams()


class EvalParams(Strict):
    num_samples: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=250, ge=1)
    seed: int = 12345
    labels: Literal["random", "balanced"] = Field(
        default="random",
        description="random: torch.randint, LlamaGen's FID protocol; balanced: every class equally often",
    )
    reference: str = Field(default="world", description="'world' (tiny evaluator) or an npz / stats path")
    samplers: list[str] = ["teacher", "dd1-1step", "dd1-2step", "onestep-baseline"]


class BenchParams(Strict):
    throughput_batch: int = Field(default=64, ge=1)
    repeats: int = Field(default=5, ge=1)
    warmup: int = Field(default=1, ge=0)
    cases: list[str] = ["world"]
    compile: bool | None = Field(
        default=None,
        description="also time torch.compile'd variants (teacher and students alike); None: on CUDA only",
    )


class PromoteParams(Strict):
    """Gate: a challenger becomes champion only if it is better on FID at no worse speed."""

    max_fid_ratio: float = Field(default=1.0, gt=0, description="challenger FID <= ratio x champion FID")
    max_latency_ratio: float = Field(default=1.10, gt=0, description="challenger s/img <= ratio x champion")


class Preset(Strict):
    family: str = Field(description="teacher family, as registered (llamagen, var, ...)")
    teacher: TeacherParams
    method: Literal["dd1", "dd2"] = Field(
        default="dd1", description="the distillation method; its section holds its params"
    )
    headline: str | None = Field(
        default=None,
        description="the sampler a registered model stands for; None: the method's first in eval.samplers",
    )
    dd1: DD1Params = DD1Params()
    dd2: DD2Params = DD2Params()
    eval: EvalParams = EvalParams()
    bench: BenchParams = BenchParams()
    promote: PromoteParams = PromoteParams()

    @model_validator(mode="after")
    def _headline_is_evaluated(self) -> Preset:
        if self.headline is not None and self.headline not in self.eval.samplers:
            raise ValueError(f"headline {self.headline!r} is not in eval.samplers {self.eval.samplers}")
        return self


class ParamsError(ValueError):
    """A params.yaml problem, phrased with the key path and the allowed values."""


def _format_errors(preset: str, err: ValidationError) -> str:
    lines = [f"params.yaml: preset {preset!r} is invalid:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in ("presets", preset, *e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(
            f"  {loc}: {msg} (got {e.get('input')!r})" if e["type"] != "missing" else f"  {loc}: {msg}"
        )
    return "\n".join(lines)


def load_presets(path: Path | str = PARAMS_FILE) -> dict:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if "presets" not in raw or not isinstance(raw["presets"], dict):
        raise ParamsError(f"{path}: top-level key 'presets' (a mapping of preset name -> preset) is missing")
    return raw["presets"]


def load_preset(name: str, path: Path | str = PARAMS_FILE, overrides: dict | None = None) -> Preset:
    presets = load_presets(path)
    if name not in presets:
        raise ParamsError(f"unknown preset {name!r}; allowed: {', '.join(sorted(presets))}")
    data = presets[name]
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return Preset.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format_errors(name, err)) from None


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """``train.lr=1e-4`` -> {"train": {"lr": 1e-4}} (value parsed as YAML)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = yaml.safe_load(value)
    return out

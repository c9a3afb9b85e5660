"""Train the AR-diffusion model (DD2 Stage 1) on teacher samples, with the GTS or the DSM loss.

Each example is one teacher sample q (its code vectors) with m noisings per position, every
position with its own t (`losses.noisy_batch`'s draw, made here for the whole global batch of a
step from a per-step generator, so that a resumed run and every DDP split see the same noise).
GTS regresses the teacher's analytic velocity v_Phi(x_t, t | q_<i) of its sampling distribution
(the original teacher, teacher-forced on q); DSM regresses eps - q. `head_only_steps` first
steps train the head alone on detached features (the paper's VAR schedule; one process).
DDP, EMA, exact resume and the log are the shared loop's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Unpack

import torch
from torch import Tensor, nn

from ddcore.checkpoints import load_model_config, load_state_dict_file, load_strict, save_model
from ddcore.hashing import json_digest, seed_from
from ddcore.methods.dd2.ardiffusion import ARDiffusion, feature_dim, new_ar_diffusion
from ddcore.methods.dd2.continuous import continuous_like
from ddcore.methods.dd2.head import HeadConfig
from ddcore.methods.dd2.losses import dsm_loss, gts_loss, sample_times
from ddcore.methods.dd2.samples import SampleSet
from ddcore.methods.dd2.score import noised
from ddcore.params import ARDiffusionParams, SamplingParams
from ddcore.teachers.base import Teacher, teacher_fingerprint
from ddcore.training.loop import (
    CKPT,
    RunKwargs,
    RunOptions,
    barrier,
    processes,
    run_training,
    step_indices,
)

MODEL = "ar_diffusion"
LOG_COLUMNS = ("step", "loss", "val_gts", "lr", "elapsed_s")
Loss = Literal["gts", "dsm"]


@dataclass
class NoisyBatch:
    idx: Tensor  # (B,) sample indices
    eps: Tensor  # (B * m, L, d)
    t: Tensor  # (B * m, L)
    head_only: bool


def step_noise(
    step: int, rows: int, seq_len: int, dim: int, seed: int, t_min: float
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed_from("dd2-noise", seed, step))
    eps = torch.randn((rows, seq_len, dim), generator=g)
    return eps, sample_times((rows, seq_len), g, t_min)


class ARDiffusionTask:
    """The shared loop's task: (q, x_t, t) batches from teacher samples and the GTS / DSM loss."""

    log_columns = LOG_COLUMNS
    running = ("loss",)

    def __init__(
        self,
        teacher: Teacher,
        data: SampleSet,
        ap: ARDiffusionParams,
        sampling: SamplingParams,
        loss: Loss,
        dev,
    ):
        self.teacher, self.data, self.ap, self.sampling, self.kind, self.dev = (
            teacher,
            data,
            ap,
            sampling,
            loss,
            dev,
        )
        self.name = f"dd2 ar-diffusion ({loss})"
        self.codebook = teacher.codebook.float().to(dev)
        n_val = min(64, data.n_val)
        tok, lab = (x[:n_val] for x in data.val())
        eps, t = step_noise(-1, n_val, tok.shape[1], self.codebook.shape[1], ap.train.seed, ap.t_min)
        self.val = (tok.to(dev), lab.to(dev), eps.to(dev), t.to(dev))

    def global_batch(self, step: int) -> NoisyBatch:
        tp, m = self.ap.train, self.ap.noise_draws
        idx = step_indices(step, tp.batch_size, self.data.n_train, tp.seed)
        eps, t = step_noise(
            step, len(idx) * m, self.data.tokens.shape[1], self.codebook.shape[1], tp.seed, self.ap.t_min
        )
        return NoisyBatch(idx, eps, t, step < self.ap.head_only_steps)

    def micro_batch(self, model: nn.Module, batch: NoisyBatch, sl: slice):
        m = self.ap.noise_draws
        tok, lab = self.data.train_batch(batch.idx[sl])
        rows = slice(sl.start * m, sl.stop * m)
        return (
            tok.to(self.dev),
            lab.to(self.dev),
            batch.eps[rows].to(self.dev),
            batch.t[rows].to(self.dev),
            batch.head_only,
        )

    def _loss(
        self, fwd, tok: Tensor, lab: Tensor, eps: Tensor, t: Tensor, head_only: bool, kind: Loss
    ) -> Tensor:
        m = eps.shape[0] // tok.shape[0]
        q = self.codebook[tok]
        q_rep = q.repeat_interleave(m, dim=0)
        x_t = noised(q_rep, eps, t)
        v = fwd(q, lab, x_t, t, head_only)
        if kind == "dsm":
            return dsm_loss(v, q_rep, eps)
        probs = self.teacher.teacher_forced_probs(tok, lab, self.sampling).repeat_interleave(m, dim=0)
        return gts_loss(v, x_t, t, probs, self.codebook)

    def loss(self, fwd, model: nn.Module, inputs) -> tuple[Tensor, dict]:
        return self._loss(fwd, *inputs, kind=self.kind), {}

    def row(self, means: dict[str, float]) -> dict:
        return means

    @torch.no_grad()
    def validate(self, ema: nn.Module, micro: int) -> dict:
        """The GTS loss of the EMA model on held-out samples and fixed noise (for either loss)."""
        ema.eval()
        return {"val_gts": float(self._loss(ema, *self.val, False, "gts"))}


def head_config(teacher: Teacher, ap: ARDiffusionParams) -> HeadConfig:
    return HeadConfig(teacher.token_dim, feature_dim(teacher), ap.head_width, ap.head_depth)


def _run_fingerprint(
    ap: ARDiffusionParams, loss: Loss, sampling: SamplingParams, samples: str, teacher_fp: str
) -> str:
    return json_digest(
        {
            "ar_diffusion": ap.model_dump(mode="json"),
            "loss": loss,
            "sampling": sampling.model_dump(mode="json"),
            "samples": samples,
            "continuous_teacher": teacher_fp,
        }  # fmt: skip
    )


def train_ar_diffusion(
    teacher: Teacher,
    continuous: Teacher,
    samples_dir: Path,
    ap: ARDiffusionParams,
    sampling: SamplingParams,
    loss: Loss,
    out: Path,
    **run: Unpack[RunKwargs],
) -> dict:
    """Train (or resume) the AR-diffusion model initialised from `continuous` (the continuous-input
    teacher) toward `teacher`'s distribution; write ar_diffusion.safetensors/json (EMA weights) and
    train_log.csv into `out`. Returns its summary."""
    t0, opts = time.perf_counter(), RunOptions(**run)
    data = SampleSet(samples_dir)
    if data.manifest["teacher_fingerprint"] != teacher_fingerprint(teacher):
        raise ValueError(
            f"{samples_dir}: samples of another teacher ({data.manifest['teacher_fingerprint']})"
        )
    run_fp = _run_fingerprint(ap, loss, sampling, data.config, teacher_fingerprint(continuous))
    out.mkdir(parents=True, exist_ok=True)
    meta = out / f"{MODEL}.json"
    if opts.resume and meta.is_file() and json.loads(meta.read_text()).get("run_fingerprint") == run_fp:
        return json.loads(meta.read_text())["summary"]
    with processes(opts.device) as procs:
        if procs.world > 1 and ap.head_only_steps:
            raise ValueError(
                "ar_diffusion.head_only_steps > 0 trains on one process only (set DD_NPROC_PER_NODE=1)"
            )
        dev, tp = procs.device, ap.train
        micro = tp.batch_size // (procs.world * tp.grad_accum)
        if micro * procs.world * tp.grad_accum != tp.batch_size:
            raise ValueError(f"train.batch_size {tp.batch_size} is not divisible by processes x grad_accum")
        teacher, continuous = teacher.to(dev), continuous.to(dev)
        cfg = head_config(teacher, ap)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_from("dd2-head", tp.seed))
            model = new_ar_diffusion(continuous, cfg).to(dev)
        task = ARDiffusionTask(teacher, data, ap, sampling, loss, dev)
        res = run_training(task, model, tp, out, run_fp, procs, micro, opts)
        if res.stopped:
            return {"stopped_at": res.step}
        summary = {
            "loss": loss,
            "steps": res.step,
            "num_params": sum(p.numel() for p in model.parameters()),
            "head_params": sum(p.numel() for p in model.head.parameters()),
            "final": res.rows[-1] if res.rows else {},
            "seconds": round(time.perf_counter() - t0, 3),
            "world_size": procs.world,
        }
        if procs.rank == 0:
            config = {
                "head": cfg.to_dict(),
                "family": teacher.family,
                "loss": loss,
                "run_fingerprint": run_fp,
            }
            save_model(out / MODEL, res.ema, {**config, "summary": summary})
            (out / CKPT).unlink(missing_ok=True)
        barrier()
    return summary


def load_ar_diffusion(teacher: Teacher, out: Path) -> ARDiffusion:
    """The model written by `train_ar_diffusion`, from the original teacher alone (the backbone's
    shape is read off the weights), so a registered model needs no continuous-teacher folder."""
    cfg = load_model_config(out / MODEL)
    weights = load_state_dict_file(out / f"{MODEL}.safetensors")
    model = new_ar_diffusion(continuous_like(teacher, weights, "gpt."), HeadConfig.from_dict(cfg["head"]))
    load_strict(model, weights, what="AR-diffusion model")
    return model.to(teacher.device).eval()

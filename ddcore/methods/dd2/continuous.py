"""The continuous-input teacher (DD2 App. E.4): a teacher that reads codebook-space vectors.

DD2's generator emits continuous tokens, and the teacher must score them as its prefix. VAR reads
continuous per-scale vectors natively (f_hat is built from them), so its teacher is used as it is.
LlamaGen reads token indices through an embedding table; here that table is replaced by a small
MLP on the code vector (`VectorEmbedding`), in two steps:

1. fit: mlp(c_i) ~ emb(i) for every code i (full-codebook MSE, Adam), so the model starts as the
   teacher up to the fit error;
2. fine-tune the whole model (MLP + Transformer) with the AR loss on teacher samples, with the
   teacher's own next-token distribution as the soft target (the expectation of the ordinary
   next-token CE over the teacher's draws, of lower variance) on the conditional and on the
   null-class branch, so classifier-free guidance keeps its meaning. Hard targets from guided
   samples would teach the conditional branch the *guided* distribution and guidance would then
   apply twice (docs/dd2.md). The fine-tuned model is kept only if its held-out NLL is below the
   fitted one's (an exact fit is the teacher already).

As a `Teacher` the result samples, teacher-forces and decodes like the original: its token
embedding is `CodeVectorEmbedding` (index -> code vector -> MLP), and `vector_forced_logits` reads
vectors through the same MLP.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Unpack

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddcore.checkpoints import load_model_config, load_safetensors_model, save_model
from ddcore.hashing import json_digest, seed_from
from ddcore.methods.dd2.samples import SampleSet
from ddcore.params import ContinuousParams, SamplingParams
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

CONTINUOUS = "continuous"
LOG_COLUMNS = ("step", "loss", "val_kl", "lr", "elapsed_s")


class VectorEmbedding(nn.Module):
    """d -> width -> width -> D: the input embedding of a continuous token."""

    def __init__(self, token_dim: int, width: int, model_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(token_dim, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, model_dim),
        )

    def forward(self, v: Tensor) -> Tensor:
        return self.net(v.to(self.net[0].weight.dtype))


class CodeVectorEmbedding(nn.Module):
    """Token indices -> their code vectors -> `VectorEmbedding`: the GPT's token embedding of the
    continuous-input teacher, so index-based sampling and teacher forcing go through the MLP."""

    def __init__(self, codebook: Tensor, embed: VectorEmbedding):
        super().__init__()
        self.register_buffer("codebook", codebook.detach().float().clone())
        self.embed = embed

    def forward(self, tokens: Tensor) -> Tensor:
        return self.embed(self.codebook[tokens])

    @property
    def weight(self) -> Tensor:
        """A parameter of the embedding: where GPT reads its device and dtype from."""
        return self.embed.net[0].weight


def fit_embedding(embed: VectorEmbedding, codebook: Tensor, target: Tensor, steps: int, lr: float) -> dict:
    """Fit mlp(codebook) to target (V, D) by full-batch MSE; the relative error before and after."""
    codebook, target = codebook.float(), target.detach().float()

    def rel() -> float:
        with torch.no_grad():
            return float(((embed(codebook) - target) ** 2).sum() / (target**2).sum())

    start = rel()
    opt = torch.optim.Adam(embed.parameters(), lr=lr)
    for s in range(steps):
        for g in opt.param_groups:  # cosine to lr / 100: the last steps polish the fit
            g["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
        loss = F.mse_loss(embed(codebook), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"fit_rel_error_start": start, "fit_rel_error": rel(), "fit_steps": steps}


def is_native(teacher: Teacher) -> bool:
    """VAR-style teachers read vectors already (their `vector_forced_logits` needs no new module)."""
    return teacher.family != "llamagen"


def continuous_teacher(teacher: Teacher, gpt: nn.Module) -> Teacher:
    """A LlamaGen teacher over `gpt` (whose token embedding is a `CodeVectorEmbedding`)."""
    from ddcore.teachers.llamagen.teacher import LlamaGenTeacher

    embed = gpt.tok_embeddings.embed
    return LlamaGenTeacher(gpt, teacher.vq, teacher.num_classes, teacher.image_size, vector_embed=embed)


def new_continuous_gpt(teacher: Teacher, width: int) -> nn.Module:
    gpt = copy.deepcopy(teacher.gpt).float()
    embed = VectorEmbedding(teacher.token_dim, width, gpt.cfg.dim).to(teacher.device)
    gpt.tok_embeddings = CodeVectorEmbedding(teacher.codebook.to(teacher.device), embed)
    return gpt


def soft_ar_loss(gpt: Callable[..., Tensor], target_gpt: nn.Module, tokens: Tensor, labels: Tensor) -> Tensor:
    """KL(teacher || model) of the next-token distributions at every position, conditional and
    null-class branches, mean over examples and positions."""
    tok, lab = tokens, labels
    if target_gpt.cfg.has_null_class:
        tok, lab = (
            torch.cat([tokens, tokens]),
            torch.cat([labels, torch.full_like(labels, target_gpt.null_class)]),
        )
    with torch.no_grad():
        target = F.log_softmax(target_gpt.forward_teacher(tok, lab).float(), dim=-1)
    logp = F.log_softmax(gpt(tok, lab).float(), dim=-1)
    return (target.exp() * (target - logp)).sum(-1).mean()


@torch.no_grad()
def held_out_nll(
    teacher: Teacher, tokens: Tensor, labels: Tensor, sampling: SamplingParams, bs: int = 250
) -> float:
    """Mean per-token NLL of `tokens` under the teacher's guided distribution before top-k/top-p
    (truncation would give the other model's rare tokens infinite NLL)."""
    plain = sampling.model_copy(update={"top_k": 0, "top_p": 1.0})
    total = 0.0
    for i in range(0, len(tokens), bs):
        tok = tokens[i : i + bs].to(teacher.device)
        p = teacher.teacher_forced_probs(tok, labels[i : i + bs].to(teacher.device), plain)
        total += float(-torch.log(p.gather(-1, tok[..., None]).clamp_min(1e-30)).sum())
    return total / tokens.numel()


class ContinuousTask:
    """The shared loop's task: soft-target AR loss of the continuous-input GPT on teacher samples."""

    name = "dd2 continuous teacher"
    log_columns = LOG_COLUMNS
    running = ("loss",)

    def __init__(self, teacher: Teacher, data: SampleSet, cp: ContinuousParams, dev: torch.device):
        self.teacher, self.data, self.cp, self.dev = teacher, data, cp, dev
        self.val = [t[:256] for t in data.val()]

    def global_batch(self, step: int) -> Tensor:
        return step_indices(step, self.cp.train.batch_size, self.data.n_train, self.cp.train.seed)

    def micro_batch(self, model: nn.Module, batch: Tensor, sl: slice):
        tok, lab = self.data.train_batch(batch[sl])
        return tok.to(self.dev), lab.to(self.dev)

    def loss(self, fwd, model: nn.Module, inputs) -> tuple[Tensor, dict]:
        return soft_ar_loss(fwd, self.teacher.gpt, *inputs), {}

    def row(self, means: dict[str, float]) -> dict:
        return means

    @torch.no_grad()
    def validate(self, ema: nn.Module, micro: int) -> dict:
        ema.eval()
        tok, lab = (t.to(self.dev) for t in self.val)
        return {"val_kl": float(soft_ar_loss(ema, self.teacher.gpt, tok, lab))}


def _run_fingerprint(cp: ContinuousParams, samples_config: str, teacher_fp: str) -> str:
    return json_digest(
        {"continuous": cp.model_dump(mode="json"), "samples": samples_config, "teacher": teacher_fp}
    )


def train_continuous(
    teacher: Teacher,
    samples_dir: Path,
    cp: ContinuousParams,
    sampling: SamplingParams,
    out: Path,
    **run: Unpack[RunKwargs],
) -> dict:
    """Fit and fine-tune the continuous-input teacher into `out` (continuous.safetensors/json,
    train_log.csv); VAR-style teachers get only the report. Returns its summary."""
    t0, opts = time.perf_counter(), RunOptions(**run)
    data = SampleSet(samples_dir)
    tfp = teacher_fingerprint(teacher)
    if data.manifest["teacher_fingerprint"] != tfp:
        raise ValueError(
            f"{samples_dir}: samples of teacher {data.manifest['teacher_fingerprint']}, not of {tfp}"
        )
    run_fp = _run_fingerprint(cp, data.config, tfp)
    out.mkdir(parents=True, exist_ok=True)
    meta = out / f"{CONTINUOUS}.json"
    if opts.resume and meta.is_file() and json.loads(meta.read_text()).get("run_fingerprint") == run_fp:
        return json.loads(meta.read_text())["summary"]
    val_tok, val_lab = data.val()
    nll_teacher = held_out_nll(teacher, val_tok, val_lab, sampling)
    if is_native(teacher):
        summary = {"native": True, "nll_teacher": nll_teacher, "nll": nll_teacher, "nll_ratio": 1.0}
        save_model(out / CONTINUOUS, {}, {"native": True, "run_fingerprint": run_fp, "summary": summary})
        return summary
    with processes(opts.device) as procs:
        dev = procs.device
        teacher = teacher.to(dev)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_from("dd2-embed", cp.train.seed))
            gpt = new_continuous_gpt(teacher, cp.mlp_width).to(dev)
        fit = fit_embedding(
            gpt.tok_embeddings.embed,
            teacher.codebook.to(dev),
            teacher.gpt.tok_embeddings.weight,
            cp.fit_steps,
            cp.fit_lr,
        )
        fitted = copy.deepcopy(gpt).eval()
        nll_fit = held_out_nll(continuous_teacher(teacher, fitted), val_tok, val_lab, sampling)
        tp, micro = cp.train, cp.train.batch_size // (procs.world * cp.train.grad_accum)
        task = ContinuousTask(teacher, data, cp, dev)
        res = run_training(task, gpt, tp, out, run_fp, procs, micro, opts)
        if res.stopped:
            return {"stopped_at": res.step}
        nll_tuned = held_out_nll(continuous_teacher(teacher, res.ema), val_tok, val_lab, sampling)
        # model selection on the held-out samples: an (almost) exact fit is the teacher already, and
        # Adam's first steps move every weight by ~lr whatever the gradient, so tuning can only hurt it
        kept = "fine-tuned" if nll_tuned <= nll_fit else "fit"
        best = res.ema if kept == "fine-tuned" else fitted
        nll = min(nll_tuned, nll_fit)
        summary = {
            "native": False,
            **fit,
            "nll_teacher": nll_teacher,
            "nll_fit": nll_fit,
            "nll_fine_tuned": nll_tuned,
            "kept": kept,
            "nll": nll,
            "nll_ratio": nll / nll_teacher,
            "steps": res.step,
            "final": res.rows[-1] if res.rows else {},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if procs.rank == 0:
            config = {"mlp_width": cp.mlp_width, "token_dim": teacher.token_dim, "teacher_fingerprint": tfp}
            save_model(out / CONTINUOUS, best, {**config, "run_fingerprint": run_fp, "summary": summary})
            (out / CKPT).unlink(missing_ok=True)
        barrier()
    return summary


def continuous_like(teacher: Teacher, weights: dict[str, Tensor], prefix: str) -> Teacher:
    """A continuous-input teacher shaped like the one whose GPT weights sit under `prefix` in
    `weights` (its MLP width read off them), for loading a model built on it; VAR-style: the teacher."""
    if is_native(teacher):
        return teacher
    width = int(weights[f"{prefix}tok_embeddings.embed.net.0.weight"].shape[0])
    return continuous_teacher(teacher, new_continuous_gpt(teacher, width).eval())


def load_continuous(teacher: Teacher, out: Path) -> Teacher:
    """The continuous-input teacher written by `train_continuous` (VAR-style: the teacher itself)."""
    cfg = load_model_config(out / CONTINUOUS)
    if cfg.get("native"):
        return teacher
    gpt = new_continuous_gpt(teacher, int(cfg["mlp_width"]))
    load_safetensors_model(out / CONTINUOUS, gpt, what="continuous-input teacher")
    return continuous_teacher(teacher, gpt.to(teacher.device).eval())

"""Distil the DD1 student: X_t -> the teacher's final token sequence, for t in t_list.

Each training example is one stored pair (eps, q) and one t drawn uniformly from t_list; t counts
the teacher's AR steps given as data (tokens for LlamaGen, whole scales for VAR), which cover the
first n = student.data_len(t) positions. The input is X_t = (codebook[q_<n], eps_>=n) and the
targets are the tokens q_>=n (the data positions carry no loss; below, "i >= t" means i >= n).
The student class comes from the teacher's family (`ddcore.methods.dd1.students`). The loss (the papers do not publish one; see docs/dd1.md) is

    ce_weight    * CE(logits_i, q_i)                       summed over positions i >= t
  + mse_weight   * ||cont_i - codebook[q_i]||^2 / d         summed over positions i >= t
  + lpips_weight * LPIPS(decode(pred), decode(codebook[q]))  (frozen VQ decoder; optional)

with position sums divided by (examples x L), a normalisation that does not depend on how a
batch is split over processes or accumulation steps, so DDP and gradient accumulation compute
exactly the single-process gradient.

Determinism and resume: the examples and t of step s are a pure function of (seed, s) (epoch
permutations of the training pairs, hashed per epoch; t from a per-step generator), so a run
resumed from the checkpoint of step k replays steps k+1.. exactly, and every DDP rank knows the
global batch and takes its slice. DDP, EMA, checkpoints, precision and compilation are the shared
loop's (`ddcore.training.loop`); this module is DD1's `TrainTask` and its outputs.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Unpack

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddcore.checkpoints import save_model
from ddcore.hashing import json_digest, seed_from
from ddcore.methods.dd1.students import STUDENT, new_student
from ddcore.methods.dd1.trajectories import TrajectoryDataset
from ddcore.params import DD1TrainParams, StudentParams
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

__all__ = [
    "LOG_COLUMNS",
    "LPIPSUnavailable",
    "StepBatch",
    "dd1_loss",
    "initial_student",
    "step_batch",
    "train_student",
]

LOG_COLUMNS = ("step", "loss", "ce", "mse", "lpips", "val_acc_t0", "val_acc_t2", "lr", "elapsed_s")
BASELINE = "baseline.safetensors"


class LPIPSUnavailable(RuntimeError):
    """lpips_weight > 0 but the LPIPS network (with its pretrained backbone) cannot be built."""


# --------------------------------------------------------------------------------------------
# initialisation and data order (pure functions of the seed and the step)
# --------------------------------------------------------------------------------------------
def initial_student(teacher: Teacher, extra_layers: int, seed: int) -> nn.Module:
    """The student training starts from; the new layers' init depends on `seed` (train.seed) only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_from("init", seed))
        return new_student(teacher, extra_layers)


@dataclass
class StepBatch:
    idx: Tensor  # (B,) indices into the training pairs
    t: Tensor  # (B,) data-token counts


def step_batch(step: int, batch_size: int, n_train: int, t_list: list[int], seed: int) -> StepBatch:
    """The global batch of optimizer step `step`: the shared epoch-permutation indices, and a t
    drawn from `t_list` per example from its own per-step generator."""
    g = torch.Generator().manual_seed(seed_from("t", seed, step))
    t = torch.tensor(t_list)[torch.randint(0, len(t_list), (batch_size,), generator=g)]
    return StepBatch(step_indices(step, batch_size, n_train, seed), t)


# --------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------
def dd1_loss(
    logits: Tensor,
    cont: Tensor,
    targets: Tensor,
    t: Tensor,
    codebook: Tensor,
    ce_weight: float,
    mse_weight: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CE + MSE over positions >= t, t (B,) counting data *positions* (`student.data_len`);
    position sums / (B x L) (see the module docstring)."""
    bsz, seq_len, V = logits.shape
    w = (torch.arange(seq_len, device=logits.device)[None, :] >= t.to(logits.device)[:, None]).float()
    ce = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), reduction="none").view(
        bsz, seq_len
    )
    target_vec = codebook.to(cont.device)[targets]
    mse = ((cont.float() - target_vec) ** 2).mean(-1)
    norm = bsz * seq_len
    ce_l = (ce * w).sum() / norm
    mse_l = (mse * w).sum() / norm
    return ce_weight * ce_l + mse_weight * mse_l, {"ce": ce_l.detach(), "mse": mse_l.detach()}


class LPIPSLoss(nn.Module):
    """LPIPS between VQ-decoded predictions (continuous, differentiable) and decoded targets."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        try:
            import lpips

            self.net = lpips.LPIPS(net="alex", verbose=False).eval()
        except Exception as err:  # no package, or its torchvision backbone weights cannot be fetched
            raise LPIPSUnavailable(f"LPIPS unavailable: {type(err).__name__}: {err}") from err
        for p in self.net.parameters():
            p.requires_grad_(False)
        vq = getattr(teacher, "vq", None)
        if vq is None:
            raise LPIPSUnavailable("LPIPS unavailable: the teacher has no VQ decoder to decode predictions")
        self.vq = vq
        for p in vq.parameters():
            p.requires_grad_(False)
        self.grid = int(math.isqrt(teacher.seq_len))

    def forward(self, pred_vec: Tensor, target_vec: Tensor) -> Tensor:
        a = self.vq.decode_vectors(pred_vec, self.grid).clamp(-1, 1)
        with torch.no_grad():
            b = self.vq.decode_vectors(target_vec, self.grid).clamp(-1, 1)
        return self.net(a.float(), b.float()).mean()


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _val_accuracy(
    model: nn.Module, ds: TrajectoryDataset, idx: Tensor, t: int, bs: int, device
) -> float | None:
    """Token accuracy of argmax logits vs the trajectory targets over the noise positions of X_t."""
    if idx.numel() == 0:
        return None
    model.eval()
    correct = total = 0
    for i in range(0, idx.numel(), bs):
        sl = idx[i : i + bs]
        tt = torch.full((sl.numel(),), t)
        n = int(model.data_len(t))  # data positions of X_t
        x, tok, lab = ds.batch(sl, torch.full_like(tt, n), model.codebook.cpu())
        logits, _ = model(x.to(device), lab.to(device), tt.to(device), with_cont=False)
        pred = logits[:, n:].argmax(-1).cpu()
        correct += int((pred == tok[:, n:]).sum())
        total += pred.numel()
    return correct / total


# --------------------------------------------------------------------------------------------
# the task the shared loop runs
# --------------------------------------------------------------------------------------------
class DD1Task:
    """DD1's part of the training loop: batches of (X_t, targets), the DD1 loss, held-out accuracy."""

    name = "dd1 train"
    log_columns = LOG_COLUMNS
    running = ("loss", "ce", "mse", "lpips")

    def __init__(
        self, ds, sp: StudentParams, tp: DD1TrainParams, codebook: Tensor, n_train: int, dev, lpips_loss
    ):
        self.ds, self.sp, self.tp, self.codebook, self.n_train, self.dev = ds, sp, tp, codebook, n_train, dev
        self.lpips_loss = lpips_loss
        self.val_idx = torch.arange(n_train, len(ds))
        self.t2 = sp.t_list[1] if len(sp.t_list) > 1 else None

    def global_batch(self, step: int) -> StepBatch:
        return step_batch(step, self.tp.batch_size, self.n_train, self.sp.t_list, self.tp.seed)

    def micro_batch(self, model: nn.Module, batch: StepBatch, sl: slice):
        idx, t = batch.idx[sl], batch.t[sl]
        t_pos = model.data_len(t)  # t counts AR steps (tokens or scales); X_t is built per position
        x, tok, lab = self.ds.batch(idx, t_pos, self.codebook.cpu())
        dev = self.dev
        return x.to(dev), tok.to(dev), lab.to(dev), t.to(dev), t_pos.to(dev)

    def loss(self, fwd, model: nn.Module, inputs) -> tuple[Tensor, dict]:
        x, tok, lab, t, t_pos = inputs
        logits, cont = fwd(x, lab, t)
        tp = self.tp
        loss, parts = dd1_loss(logits, cont, tok, t_pos, self.codebook, tp.ce_weight, tp.mse_weight)
        if self.lpips_loss is not None:
            keep = model.data_mask(t, x.shape[0], self.dev)[..., None]
            pred = torch.where(keep, x, cont.float())
            lp = self.lpips_loss(pred, self.codebook[tok])
            loss = loss + tp.lpips_weight * lp
            parts["lpips"] = lp.detach()
        return loss, parts

    def row(self, means: dict[str, float]) -> dict:
        return {**means, "lpips": means["lpips"] if self.lpips_loss is not None else None}

    def validate(self, ema: nn.Module, micro: int) -> dict:
        vbs = max(1, micro)
        acc2 = (
            _val_accuracy(ema, self.ds, self.val_idx, self.t2, vbs, self.dev) if self.t2 is not None else None
        )
        return {"val_acc_t0": _val_accuracy(ema, self.ds, self.val_idx, 0, vbs, self.dev), "val_acc_t2": acc2}


def _run_fingerprint(sp: StudentParams, tp: DD1TrainParams, traj_config: str, teacher_fp: str) -> str:
    return json_digest(
        {
            "student": sp.model_dump(mode="json"),
            "train": tp.model_dump(mode="json"),
            "traj": traj_config,
            "teacher": teacher_fp,
        }
    )


# --------------------------------------------------------------------------------------------
# the training entry point
# --------------------------------------------------------------------------------------------
def train_student(
    teacher: Teacher,
    traj_dir: str | os.PathLike,
    student_params: StudentParams,
    train_params: DD1TrainParams,
    out_dir: str | os.PathLike,
    **run: Unpack[RunKwargs],
) -> dict:
    """Train (or resume) the DD1 student; write student.safetensors/json (EMA weights),
    baseline.safetensors (per-position token marginals) and train_log.csv into `out_dir`.

    `log_fn(row)` gets every logged row (a dict with the LOG_COLUMNS); `stop_at` ends the run
    right after that optimizer step without saving anything, as if the process were killed.
    Returns a summary dict.
    """
    opts = RunOptions(**run)
    with processes(opts.device) as procs:
        return _train(teacher, traj_dir, student_params, train_params, Path(out_dir), opts, procs)


def _train(teacher, traj_dir, sp, tp, out, opts: RunOptions, procs) -> dict:
    t_start = time.perf_counter()
    rank, world, dev = procs.rank, procs.world, procs.device
    if not isinstance(teacher, Teacher):
        raise TypeError(f"train_student needs a Teacher, got {type(teacher).__name__}")
    ds = TrajectoryDataset(traj_dir)
    man = ds.manifest
    tfp = teacher_fingerprint(teacher)
    if man.teacher.get("fingerprint") != tfp:
        raise ValueError(
            f"{traj_dir}: trajectories come from teacher {man.teacher.get('fingerprint')}, not from this one ({tfp})"
        )
    L, n_steps = teacher.seq_len, len(teacher.step_sizes)
    unit = "tokens" if n_steps == L else "scales"
    bad_t = [t for t in sp.t_list if not 0 <= t < n_steps]
    if bad_t or not sp.t_list:
        raise ValueError(
            f"student.t_list {sp.t_list}: every t ({unit} given as data) must be in [0, {n_steps})"
        )
    n_val = min(tp.val_pairs, len(ds) // 2)
    n_train = len(ds) - n_val
    micro = tp.batch_size // (world * tp.grad_accum)
    if micro * world * tp.grad_accum != tp.batch_size:
        raise ValueError(
            f"train.batch_size {tp.batch_size} must be divisible by world_size {world} x grad_accum {tp.grad_accum}"
        )
    run_fp = _run_fingerprint(sp, tp, man.config, tfp)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    barrier()

    # finished already?
    meta_path = out / f"{STUDENT}.json"
    if opts.resume and meta_path.is_file() and (out / f"{STUDENT}.safetensors").is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("run_fingerprint") == run_fp:
            return meta.get("summary", {})

    codebook = teacher.codebook.detach().float().to(dev)
    model = initial_student(teacher, sp.extra_layers, tp.seed).to(device=dev, dtype=torch.float32)
    lpips_loss = LPIPSLoss(teacher).to(dev) if tp.lpips_weight > 0 else None
    task = DD1Task(ds, sp, tp, codebook, n_train, dev, lpips_loss)
    res = run_training(task, model, tp, out, run_fp, procs, micro, opts)
    if res.stopped:
        return {"stopped_at": res.step}

    summary = {
        "steps": res.step,
        "seconds": round(time.perf_counter() - t_start, 3),
        "train_pairs": n_train,
        "val_pairs": n_val,
        "num_params": model.num_params(),
        "final": res.rows[-1] if res.rows else {},
        "world_size": world,
    }
    if rank == 0:
        marg = ds.marginals(torch.arange(n_train)).float()
        save_model(out / "baseline", {"marginals": marg}, {"kind": "onestep-baseline", "pairs": n_train})
        save_model(
            out / STUDENT,
            res.ema,
            {
                "config": model.cfg.to_dict(),
                "codebook_dim": teacher.token_dim,
                "t_list": list(sp.t_list),
                "split_t": sp.split_t,
                "teacher_family": teacher.family,
                "teacher_fingerprint": tfp,
                "trajectories": man.config,
                "run_fingerprint": run_fp,
                "weights": "ema",
                "summary": summary,
            },
        )
        (out / CKPT).unlink(missing_ok=True)
    barrier()
    return summary

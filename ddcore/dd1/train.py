"""Distil the DD1 student: X_t -> the teacher's final token sequence, for t in t_list.

Each training example is one stored pair (eps, q) and one t drawn uniformly from t_list; t counts
the teacher's AR steps given as data (tokens for LlamaGen, whole scales for VAR), which cover the
first n = student.data_len(t) positions. The input is X_t = (codebook[q_<n], eps_>=n) and the
targets are the tokens q_>=n (the data positions carry no loss; below, "i >= t" means i >= n).
The student class comes from the teacher's family (`ddcore.dd1.students`). The loss (the papers do not publish one; see docs/dd1.md) is

    ce_weight    * CE(logits_i, q_i)                       summed over positions i >= t
  + mse_weight   * ||cont_i - codebook[q_i]||^2 / d         summed over positions i >= t
  + lpips_weight * LPIPS(decode(pred), decode(codebook[q]))  (frozen VQ decoder; optional)

with position sums divided by (examples x L), a normalisation that does not depend on how a
batch is split over processes or accumulation steps, so DDP and gradient accumulation compute
exactly the single-process gradient.

Determinism and resume: the examples and t of step s are a pure function of (seed, s) (epoch
permutations of the training pairs, hashed per epoch; t from a per-step generator), so a run
resumed from the checkpoint of step k replays steps k+1.. exactly, and every DDP rank knows the
global batch and takes its slice. The checkpoint holds model, EMA, optimizer, RNG states and
the log rows; it is written atomically (rank 0) every `ckpt_every` steps.

Runs unchanged under `torchrun` (gloo on CPU, nccl on CUDA); bf16 autocast on CUDA, and on a CPU
with `train.precision: bf16`; `train.compile` runs the training forward/backward through torch.compile.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ddcore.checkpoints import atomic_path, atomic_write_text, save_model
from ddcore.dd1.optim import build_optimizer
from ddcore.dd1.students import STUDENT, load_student, new_student
from ddcore.dd1.trajectories import TrajectoryDataset, teacher_fingerprint
from ddcore.params import StudentParams, TrainParams
from ddcore.teachers.base import Teacher

__all__ = [
    "LOG_COLUMNS",
    "LPIPSUnavailable",
    "StepBatch",
    "dd1_loss",
    "initial_student",
    "load_student",
    "lr_at",
    "step_batch",
    "train_student",
]

LOG_COLUMNS = ("step", "loss", "ce", "mse", "lpips", "val_acc_t0", "val_acc_t2", "lr", "elapsed_s")
CKPT = "checkpoint.pt"
BASELINE = "baseline.safetensors"


class LPIPSUnavailable(RuntimeError):
    """lpips_weight > 0 but the LPIPS network (with its pretrained backbone) cannot be built."""


# --------------------------------------------------------------------------------------------
# schedule and data order (pure functions of the step)
# --------------------------------------------------------------------------------------------
def lr_at(step: int, p: TrainParams) -> float:
    """Linear warm-up for `warmup_steps`, then cosine decay to lr x `lr_end_ratio` (default 10%)
    at the last step. `step` counts optimizer updates from 0."""
    if p.warmup_steps and step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    span = max(1, p.steps - p.warmup_steps)
    prog = min(1.0, (step - p.warmup_steps) / span)
    end = p.lr_end_ratio
    return p.lr * (end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * prog)))


def trains_in_bf16(tp: TrainParams, device: torch.device | str) -> bool:
    """train.precision: bf16 autocast on CUDA by default, on a CPU only when asked (docs/dd1.md)."""
    return tp.precision == "bf16" or (tp.precision == "auto" and torch.device(device).type == "cuda")


def _hash_seed(*parts) -> int:
    d = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(d[:8], "little") & ((1 << 63) - 1)


def initial_student(teacher: Teacher, extra_layers: int, seed: int) -> nn.Module:
    """The student training starts from; the new layers' init depends on `seed` (train.seed) only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_hash_seed("init", seed))
        return new_student(teacher, extra_layers)


@dataclass
class StepBatch:
    idx: Tensor  # (B,) indices into the training pairs
    t: Tensor  # (B,) data-token counts


def step_batch(step: int, batch_size: int, n_train: int, t_list: list[int], seed: int) -> StepBatch:
    """The global batch of optimizer step `step`: consecutive slices of per-epoch permutations."""
    start = step * batch_size
    out, pos = [], start
    while pos < start + batch_size:
        epoch, off = divmod(pos, n_train)
        perm = torch.randperm(
            n_train, generator=torch.Generator().manual_seed(_hash_seed("perm", seed, epoch))
        )
        take = min(n_train - off, start + batch_size - pos)
        out.append(perm[off : off + take])
        pos += take
    g = torch.Generator().manual_seed(_hash_seed("t", seed, step))
    t = torch.tensor(t_list)[torch.randint(0, len(t_list), (batch_size,), generator=g)]
    return StepBatch(torch.cat(out), t)


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
# distributed helpers
# --------------------------------------------------------------------------------------------
def _dist_setup(device: str | None) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, we_initialised). Initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialised_here = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and (device or "cuda").startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        initialised_here = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device is None:
        from ddcore.settings import get_settings

        device = get_settings().resolve_device()
    if device == "cuda" and dist.is_initialized():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return rank, world, dev, initialised_here


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------
# checkpoint / outputs
# --------------------------------------------------------------------------------------------
def _run_fingerprint(sp: StudentParams, tp: TrainParams, traj_config: str, teacher_fp: str) -> str:
    blob = json.dumps(
        {
            "student": sp.model_dump(mode="json"),
            "train": tp.model_dump(mode="json"),
            "traj": traj_config,
            "teacher": teacher_fp,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())


def _write_log(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=LOG_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in LOG_COLUMNS})
    atomic_write_text(path, out.getvalue())


def _resolve_teacher(teacher_dir_or_teacher, device: torch.device) -> Teacher:
    if isinstance(teacher_dir_or_teacher, Teacher):
        return teacher_dir_or_teacher
    from ddcore.teachers.llamagen import build_llamagen_teacher_from_dir

    return build_llamagen_teacher_from_dir(teacher_dir_or_teacher, device=device)


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
# the training entry point
# --------------------------------------------------------------------------------------------
def train_student(
    teacher_dir_or_teacher: str | os.PathLike | Teacher,
    traj_dir: str | os.PathLike,
    student_params: StudentParams,
    train_params: TrainParams,
    out_dir: str | os.PathLike,
    resume: bool = True,
    log_fn: Callable[[dict], None] | None = None,
    device: str | None = None,
    progress: bool = True,
    stop_at: int | None = None,
) -> dict:
    """Train (or resume) the DD1 student; write student.safetensors/json (EMA weights),
    baseline.safetensors (per-position token marginals) and train_log.csv into `out_dir`.

    `log_fn(row)` gets every logged row (a dict with the LOG_COLUMNS); `stop_at` ends the run
    right after that optimizer step without saving anything, as if the process were killed.
    Returns a summary dict.
    """
    sp, tp = student_params, train_params
    rank, world, dev, own_pg = _dist_setup(device)
    try:
        return _train(
            teacher_dir_or_teacher,
            traj_dir,
            sp,
            tp,
            Path(out_dir),
            resume,
            log_fn,
            progress,
            stop_at,
            rank,
            world,
            dev,
        )
    finally:
        if own_pg and dist.is_initialized():
            dist.destroy_process_group()


def _train(teacher_src, traj_dir, sp, tp, out, resume, log_fn, progress, stop_at, rank, world, dev) -> dict:
    t_start = time.perf_counter()
    teacher = _resolve_teacher(teacher_src, dev)
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
    _barrier()

    # finished already?
    meta_path = out / f"{STUDENT}.json"
    if resume and meta_path.is_file() and (out / f"{STUDENT}.safetensors").is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("run_fingerprint") == run_fp:
            return meta.get("summary", {})

    codebook = teacher.codebook.detach().float().to(dev)
    model = initial_student(teacher, sp.extra_layers, tp.seed).to(device=dev, dtype=torch.float32)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = build_optimizer(model, tp)
    lpips_loss = LPIPSLoss(teacher).to(dev) if tp.lpips_weight > 0 else None

    step, rows = 0, []
    acc = {"loss": 0.0, "ce": 0.0, "mse": 0.0, "lpips": 0.0, "n": 0}  # losses since the last row
    ckpt_path = out / CKPT
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("run_fingerprint") != run_fp:
            raise ValueError(
                f"{ckpt_path}: checkpoint of another run (params or data changed); delete {out} to start over"
            )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if dev.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], dev)
        step, rows, acc = int(state["step"]), list(state["rows"]), dict(state["acc"])
        if rank == 0:
            _write_log(out / "train_log.csv", rows)  # drop rows logged after the checkpoint
            if progress:
                print(f"[dd1 train] resuming from step {step}")

    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    # compiled: the same module and parameters, fused kernels (docs/dd1.md: 1.2-1.4x per step on 2 CPU cores)
    train_fwd = torch.compile(ddp_model) if tp.compile else ddp_model
    val_idx = torch.arange(n_train, len(ds))
    t2 = sp.t_list[1] if len(sp.t_list) > 1 else None

    bf16 = trains_in_bf16(tp, dev)

    def amp():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    elapsed0 = rows[-1]["elapsed_s"] if rows else 0.0
    t_run = time.perf_counter()

    def save_ckpt() -> None:
        if rank != 0:
            return
        _save_checkpoint(
            ckpt_path,
            {
                "run_fingerprint": run_fp,
                "step": step,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                "rows": rows,
                "acc": acc,
            },
        )

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=tp.steps, initial=step, desc="dd1 train", leave=False)
    while step < tp.steps:
        model.train()
        lr = lr_at(step, tp)
        for g in opt.param_groups:
            g["lr"] = lr
        sb = step_batch(step, tp.batch_size, n_train, sp.t_list, tp.seed)
        opt.zero_grad(set_to_none=True)
        for a in range(tp.grad_accum):
            # this rank's share of micro-batch `a`
            off = (a * world + rank) * micro
            idx, t = sb.idx[off : off + micro], sb.t[off : off + micro]
            t_pos = model.data_len(t)  # t counts AR steps (tokens or scales); X_t is built per position
            x, tok, lab = ds.batch(idx, t_pos, codebook.cpu())
            x, tok, lab, t, t_pos = x.to(dev), tok.to(dev), lab.to(dev), t.to(dev), t_pos.to(dev)
            sync = a == tp.grad_accum - 1 or world == 1
            ctx = ddp_model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx, amp():
                logits, cont = train_fwd(x, lab, t)
                loss, parts = dd1_loss(logits, cont, tok, t_pos, codebook, tp.ce_weight, tp.mse_weight)
                if lpips_loss is not None:
                    keep = model.data_mask(t, x.shape[0], dev)[..., None]
                    pred = torch.where(keep, x, cont.float())
                    lp = lpips_loss(pred, codebook[tok])
                    loss = loss + tp.lpips_weight * lp
                    parts["lpips"] = lp.detach()
            (loss / tp.grad_accum).backward()
            acc["loss"] += float(loss.detach()) / tp.grad_accum
            for k in ("ce", "mse", "lpips"):
                if k in parts:
                    acc[k] += float(parts[k]) / tp.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
        opt.step()
        step += 1
        acc["n"] += 1
        decay = min(tp.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm.detach(), 1.0 - decay)
        if bar is not None:
            bar.update(1)
        if stop_at is not None and step >= stop_at and step < tp.steps:
            return {"stopped_at": step}

        if step % tp.val_every == 0 or step == tp.steps:
            sums = torch.tensor([acc["loss"], acc["ce"], acc["mse"], acc["lpips"]], dtype=torch.float64)
            if world > 1:  # each rank summed its own shard's losses: average them over ranks
                sums = sums.to(dev)
                dist.all_reduce(sums)
                sums = sums.cpu() / world
            loss_m, ce_m, mse_m, lp_m = (sums / acc["n"]).tolist()
            row = {
                "step": step,
                "loss": loss_m,
                "ce": ce_m,
                "mse": mse_m,
                "lpips": lp_m if lpips_loss is not None else None,
                "lr": lr,
                "elapsed_s": round(elapsed0 + time.perf_counter() - t_run, 3),
            }
            # validation on rank 0 only (the EMA model is identical on all ranks)
            if rank == 0:
                vbs = max(1, micro)
                row["val_acc_t0"] = _val_accuracy(ema, ds, val_idx, 0, vbs, dev)
                row["val_acc_t2"] = _val_accuracy(ema, ds, val_idx, t2, vbs, dev) if t2 is not None else None
                rows.append(row)
                _write_log(out / "train_log.csv", rows)
                if log_fn is not None:
                    log_fn(dict(row))
            acc = {"loss": 0.0, "ce": 0.0, "mse": 0.0, "lpips": 0.0, "n": 0}
        if step % tp.ckpt_every == 0 and step < tp.steps:
            save_ckpt()
    if bar is not None:
        bar.close()

    summary = {
        "steps": step,
        "seconds": round(time.perf_counter() - t_start, 3),
        "train_pairs": n_train,
        "val_pairs": n_val,
        "num_params": model.num_params(),
        "final": rows[-1] if rows else {},
        "world_size": world,
    }
    if rank == 0:
        marg = ds.marginals(torch.arange(n_train)).float()
        save_model(out / "baseline", {"marginals": marg}, {"kind": "onestep-baseline", "pairs": n_train})
        save_model(
            out / STUDENT,
            ema,
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
        ckpt_path.unlink(missing_ok=True)
    _barrier()
    return summary

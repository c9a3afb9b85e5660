"""The training loop every method shares: DDP, gradient accumulation, EMA, exact resume, the log.

A method supplies a `TrainTask`: the global batch of an optimizer step (a pure function of the
step, so a resumed run replays the steps after its checkpoint exactly), the loss of one
micro-batch, and the validation figures of a logged row. The loop owns everything else:

* schedule: linear warm-up, then cosine decay to lr x `lr_end_ratio` (`lr_at`);
* precision and compilation: bf16 autocast on CUDA, and on a CPU with `train.precision: bf16`;
  `train.compile` runs the forward/backward through torch.compile (weights and EMA stay eager);
* DDP under torchrun (gloo on CPU, nccl on CUDA): rank r takes its slice of each micro-batch, and
  losses normalised per example make every split compute the single-process gradient;
* EMA with the progressive decay min(ema_decay, (1 + s) / (10 + s));
* checkpoints every `ckpt_every` steps (rank 0, atomic): model, EMA, optimizer, RNG states, the
  log rows and the running loss sums; `stop_at` ends a run after that step as if it were killed.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypedDict

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ddcore.checkpoints import atomic_path, atomic_write_text
from ddcore.hashing import seed_from
from ddcore.params import TrainParams
from ddcore.training.optim import build_optimizer

CKPT = "checkpoint.pt"


class RunKwargs(TypedDict, total=False):
    """The keyword options of every method's training entry point: how a call runs, not what it trains."""

    resume: bool  # continue from a finished result or a checkpoint of this same run (default True)
    log_fn: Callable[[dict], None] | None  # gets every logged row
    device: str | None  # None: DD_DEVICE or the environment's default
    progress: bool  # progress bar on rank 0 (default True)
    stop_at: int | None  # end after this optimizer step without saving, as if killed


@dataclass(frozen=True)
class RunOptions:
    """`RunKwargs` with their defaults filled in."""

    resume: bool = True
    log_fn: Callable[[dict], None] | None = None
    device: str | None = None
    progress: bool = True
    stop_at: int | None = None


# --------------------------------------------------------------------------------------------
# schedule and precision
# --------------------------------------------------------------------------------------------
def lr_at(step: int, p: TrainParams) -> float:
    """Linear warm-up for `warmup_steps`, then cosine decay to lr x `lr_end_ratio` at the last
    step. `step` counts optimizer updates from 0."""
    if p.warmup_steps and step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    span = max(1, p.steps - p.warmup_steps)
    prog = min(1.0, (step - p.warmup_steps) / span)
    end = p.lr_end_ratio
    return p.lr * (end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * prog)))


def trains_in_bf16(tp: TrainParams, device: torch.device | str) -> bool:
    """train.precision: bf16 autocast on CUDA by default, on a CPU only when asked (docs/dd1.md)."""
    return tp.precision == "bf16" or (tp.precision == "auto" and torch.device(device).type == "cuda")


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device
    own_group: bool  # this call initialised the process group (and destroys it)


def setup_processes(device: str | None) -> Processes:
    """Initialise the process group under torchrun; pick each process's device.

    Under torchrun every process takes the GPU of its LOCAL_RANK (whatever index the settings
    name); alone, a bare "cuda" means the current GPU (torch.cuda.set_device needs an index)."""
    if device is None:
        from ddcore.settings import get_settings

        device = get_settings().resolve_device()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialised_here = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        initialised_here = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    dev = torch.device(device)
    if dev.type == "cuda":
        if dist.is_initialized():
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return Processes(rank, world, dev, initialised_here)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def processes(device: str | None):
    """`setup_processes`, and the process group torn down again if this call made it."""
    procs = setup_processes(device)
    try:
        yield procs
    finally:
        if procs.own_group and dist.is_initialized():
            dist.destroy_process_group()


def step_indices(step: int, batch_size: int, n_train: int, seed: int) -> Tensor:
    """The training-example indices of optimizer step `step`: consecutive slices of per-epoch
    seeded permutations, so a resumed run and every DDP split see the same examples."""
    start = step * batch_size
    out, pos = [], start
    while pos < start + batch_size:
        epoch, off = divmod(pos, n_train)
        perm = torch.randperm(
            n_train, generator=torch.Generator().manual_seed(seed_from("perm", seed, epoch))
        )
        take = min(n_train - off, start + batch_size - pos)
        out.append(perm[off : off + take])
        pos += take
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())


def write_log(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})
    atomic_write_text(path, out.getvalue())


def last_log_row(path: Path) -> dict[str, float]:
    """The numeric columns of a train log's last row ({} when there is none)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    out = {}
    for k, v in rows[-1].items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
class TrainTask(Protocol):
    """What a method adds to the loop."""

    name: str  # progress-bar label
    log_columns: tuple[str, ...]  # train_log.csv columns ("step", the running means, validation, "lr", ...)
    running: tuple[str, ...]  # running means logged per row; "loss" first

    def global_batch(self, step: int) -> Any:
        """The whole batch of optimizer step `step` (a pure function of the step)."""

    def micro_batch(self, model: nn.Module, batch: Any, sl: slice) -> Any:
        """Rows `sl` of the global batch, as the inputs of `loss`, on the device."""

    def loss(self, fwd: Callable[..., Any], model: nn.Module, inputs: Any) -> tuple[Tensor, dict]:
        """Loss of one micro-batch through `fwd` (called under autocast), and its logged parts."""

    def row(self, means: dict[str, float]) -> dict:
        """The logged running means (e.g. None for a loss term that is off)."""

    def validate(self, ema: nn.Module, micro: int) -> dict:
        """Validation figures of a logged row (rank 0 only)."""


@dataclass
class TrainResult:
    model: nn.Module
    ema: nn.Module
    step: int
    rows: list[dict] = field(default_factory=list)
    stopped: bool = False  # ended by `stop_at`, nothing saved


def _zero(names: Sequence[str]) -> dict[str, float]:
    return {**{k: 0.0 for k in names}, "n": 0}


def run_training(
    task: TrainTask,
    model: nn.Module,
    tp: TrainParams,
    out: Path,
    run_fp: str,
    procs: Processes,
    micro: int,
    opts: RunOptions,
) -> TrainResult:
    """Train `model` (already on the device, fp32) for `tp.steps` optimizer steps, resuming from
    `out`/checkpoint.pt when it belongs to the run `run_fp`; rows go to `out`/train_log.csv."""
    rank, world, dev = procs.rank, procs.world, procs.device
    resume, log_fn, progress, stop_at = opts.resume, opts.log_fn, opts.progress, opts.stop_at
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = build_optimizer(model, tp)

    step, rows, acc = 0, [], _zero(task.running)  # losses since the last row
    ckpt_path = out / CKPT
    log_path = out / "train_log.csv"
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
            write_log(log_path, rows, task.log_columns)  # drop rows logged after the checkpoint
            if progress:
                print(f"[{task.name}] resuming from step {step}")

    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    # compiled: the same module and parameters, fused kernels (docs/dd1.md: 1.2-1.4x per step on 2 CPU cores)
    fwd = torch.compile(ddp_model) if tp.compile else ddp_model
    bf16 = trains_in_bf16(tp, dev)

    def amp():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    elapsed0 = rows[-1]["elapsed_s"] if rows else 0.0
    t_run = time.perf_counter()

    def save_ckpt() -> None:
        if rank != 0:
            return
        save_checkpoint(
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

        bar = tqdm(total=tp.steps, initial=step, desc=task.name, leave=False)
    while step < tp.steps:
        model.train()
        lr = lr_at(step, tp)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = task.global_batch(step)
        opt.zero_grad(set_to_none=True)
        for a in range(tp.grad_accum):
            off = (a * world + rank) * micro  # this rank's share of micro-batch `a`
            inputs = task.micro_batch(model, batch, slice(off, off + micro))
            sync = a == tp.grad_accum - 1 or world == 1
            ctx = ddp_model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx, amp():
                loss, parts = task.loss(fwd, model, inputs)
            (loss / tp.grad_accum).backward()
            acc["loss"] += float(loss.detach()) / tp.grad_accum
            for k in task.running[1:]:
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
            return TrainResult(model, ema, step, rows, stopped=True)

        if step % tp.val_every == 0 or step == tp.steps:
            sums = torch.tensor([acc[k] for k in task.running], dtype=torch.float64)
            if world > 1:  # each rank summed its own shard's losses: average them over ranks
                sums = sums.to(dev)
                dist.all_reduce(sums)
                sums = sums.cpu() / world
            means = dict(zip(task.running, (sums / acc["n"]).tolist(), strict=True))
            row = {
                "step": step,
                **task.row(means),
                "lr": lr,
                "elapsed_s": round(elapsed0 + time.perf_counter() - t_run, 3),
            }
            if rank == 0:  # validation on rank 0 only (the EMA model is identical on all ranks)
                row.update(task.validate(ema, micro))
                rows.append(row)
                write_log(log_path, rows, task.log_columns)
                if log_fn is not None:
                    log_fn(dict(row))
            acc = _zero(task.running)
        if step % tp.ckpt_every == 0 and step < tp.steps:
            save_ckpt()
    if bar is not None:
        bar.close()
    return TrainResult(model, ema, step, rows)

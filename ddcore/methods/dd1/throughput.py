"""Trajectory-generation and training throughput for the benchmark file.

Both are timed through the stages' own code paths (`trajectory_batch`, `train_student`), on the
machine and in the run that times the samplers, with peak memory traced on a separate call so
the memory watcher never runs inside a timed one.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ddcore.eval.timing import Timed, peak_memory, time_in_turns
from ddcore.methods.dd1.flowmap import FlowChooser, FlowSolver
from ddcore.methods.dd1.train import train_student
from ddcore.methods.dd1.trajectories import pair_seeds, shard_labels, trajectory_batch
from ddcore.params import DD1TrainParams, FlowParams, SamplingParams, StudentParams, TrajectoryParams
from ddcore.teachers.base import Teacher
from ddcore.training.loop import trains_in_bf16

__all__ = ["trajectory_throughput", "training_throughput"]


def trajectory_throughput(
    teacher: Teacher,
    sampling: SamplingParams,
    flow: FlowParams,
    traj: TrajectoryParams,
    repeats: int = 2,
    warmup: int = 1,
) -> dict:
    """Pairs/s of one generation batch (`traj.batch_size` pairs: teacher + flow map), median of
    `repeats` after `warmup`."""
    chooser = FlowChooser(teacher.codebook, FlowSolver.from_params(flow))
    n = traj.batch_size
    seeds, labels = pair_seeds(traj.seed, 0, n), shard_labels(traj.seed, 0, n, teacher.num_classes)
    job = Timed(lambda: trajectory_batch(teacher, sampling, chooser, seeds, labels), teacher.device)
    time_in_turns({"trajectories": job}, repeats, warmup)
    return {
        "pairs_per_s": n / job.median,
        "batch": n,
        "seconds_per_batch": job.median,
        "times": job.times,
        **job.mem,
    }


def training_throughput(
    teacher: Teacher,
    traj_dir: str | os.PathLike,
    student: StudentParams,
    train: DD1TrainParams,
    steps: tuple[int, int] = (10, 40),
) -> dict:
    """Optimizer steps/s and samples/s of the real training loop on the real trajectories.

    Two runs from scratch stop after k1 and k2 steps (nothing saved); the time difference over
    k2 - k1 steps leaves out the setup both share (loading and verifying the shards, building the
    student, compiling it under `train.compile`). k2 stays below `train.steps`, so a tiny preset's
    validation steps can fall inside. Peak memory: a run of k1 steps under the memory watcher,
    made first, so that both timed runs find the same warm caches (a cold compile would otherwise
    fall on the first only and shrink the difference). When the preset trains in bf16, the same
    runs in fp32 are made in turns with its own, and `fp32` and `speedup_vs_fp32` report them.
    """
    k2 = max(2, min(steps[1], train.steps - 1))
    k1 = max(1, min(steps[0], k2 - 1))
    variants = {"preset": train}
    if trains_in_bf16(train, teacher.device):
        variants["fp32"] = train.model_copy(update={"precision": "fp32"})
    secs: dict[str, dict[int, float]] = {v: {} for v in variants}
    with tempfile.TemporaryDirectory() as d:

        def run(name: str, k: int) -> None:
            train_student(
                teacher,
                traj_dir,
                student,
                variants[name],
                Path(d) / f"{name}{k}",
                resume=False,
                progress=False,
                stop_at=k,
            )

        with peak_memory(teacher.device) as mem:
            run("preset", k1)
        for name in variants:
            if name != "preset":
                run(name, k1)  # its compile, too, before anything is timed
        for k in (k1, k2):
            for name in variants:
                t0 = time.perf_counter()
                run(name, k)
                secs[name][k] = time.perf_counter() - t0
    figures = {name: _per_step_figures(secs[name], k1, k2, train.batch_size) for name in variants}
    out = {**figures["preset"], **mem}
    if "fp32" in figures:
        out["fp32"] = figures["fp32"]
        fast, slow = figures["preset"]["steps_per_s"], figures["fp32"]["steps_per_s"]
        out["speedup_vs_fp32"] = fast / slow if fast and slow else None
    return out


def _per_step_figures(secs: dict[int, float], k1: int, k2: int, batch_size: int) -> dict:
    per_step = (secs[k2] - secs[k1]) / (k2 - k1)
    ok = per_step > 0  # a shared machine can make the longer run the quicker one: no figure then
    return {
        "steps_per_s": 1.0 / per_step if ok else None,
        "samples_per_s": batch_size / per_step if ok else None,
        "batch_size": batch_size,
        "timed_steps": [k1, k2],
        "run_seconds": [secs[k1], secs[k2]],
    }

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

from ddcore.dd1.flowmap import FlowChooser, FlowSolver
from ddcore.dd1.train import train_student
from ddcore.dd1.trajectories import pair_seeds, shard_labels, trajectory_batch
from ddcore.eval.bench import Timed, peak_memory, time_in_turns
from ddcore.params import FlowParams, SamplingParams, StudentParams, TrainParams, TrajectoryParams
from ddcore.teachers.base import Teacher

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
    train: TrainParams,
    steps: tuple[int, int] = (10, 40),
) -> dict:
    """Optimizer steps/s and samples/s of the real training loop on the real trajectories.

    Two runs from scratch stop after k1 and k2 steps (nothing saved); the time difference over
    k2 - k1 steps leaves out the setup both share (loading and verifying the shards, building the
    student, compiling it under `train.compile`). k2 stays below `train.steps`, so a tiny preset's
    validation steps can fall inside. Peak memory: a run of k1 steps under the memory watcher,
    made first, so that both timed runs find the same warm caches (a cold compile would otherwise
    fall on the first only and shrink the difference).
    """
    k2 = max(2, min(steps[1], train.steps - 1))
    k1 = max(1, min(steps[0], k2 - 1))
    secs = {}
    with tempfile.TemporaryDirectory() as d:
        with peak_memory(teacher.device) as mem:
            train_student(
                teacher, traj_dir, student, train, Path(d) / "mem", resume=False, progress=False, stop_at=k1
            )
        for k in (k1, k2):
            t0 = time.perf_counter()
            train_student(
                teacher,
                traj_dir,
                student,
                train,
                Path(d) / f"run{k}",
                resume=False,
                progress=False,
                stop_at=k,
            )
            secs[k] = time.perf_counter() - t0
    per_step = (secs[k2] - secs[k1]) / (k2 - k1)
    ok = per_step > 0  # a shared machine can make the longer run the quicker one: no figure then
    return {
        "steps_per_s": 1.0 / per_step if ok else None,
        "samples_per_s": train.batch_size / per_step if ok else None,
        "batch_size": train.batch_size,
        "timed_steps": [k1, k2],
        "run_seconds": [secs[k1], secs[k2]],
        **mem,
    }

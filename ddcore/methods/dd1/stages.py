"""DD1's own stages: trajectories (sharded, resumable) and distill (the student's training).

Both receive a `StageRun` from the pipeline runner, which knows their fingerprint and marker;
the Prefect flow, the DVC stages and `ddcore pipeline` all reach them through that runner.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from ddcore.methods.dd1.train import train_student
from ddcore.methods.dd1.trajectories import generate_trajectories
from ddcore.params import Preset
from ddcore.pipeline.markers import StageRun, jsonable
from ddcore.teachers.loading import load_teacher
from ddcore.training.launch import is_torchrun_worker, nproc_per_node, torchrun_stage
from ddcore.training.loop import last_log_row

log = logging.getLogger("ddcore.dd1")

TRAJECTORIES = "trajectories"


def traj_dir(layout) -> Path:
    return layout.data_dir(TRAJECTORIES)


def trajectory_shards(preset: Preset) -> list[int]:
    """Shard ids of the trajectory set; each can be generated independently (and in parallel)."""
    t = preset.dd1.trajectories
    return list(range(math.ceil(t.num_pairs / t.shard_size)))


def trajectories_stage(run: StageRun, shard_ids: Sequence[int] | None = None) -> dict:
    """Generate the (noise, teacher tokens) pairs. With `shard_ids`, only those shards (a worker's
    share); without, all missing shards, and the stage is marked complete."""
    if m := run.complete():
        log.info("trajectories[%s]: complete, skipping", run.preset_name)
        return m.result
    # a stale claim goes; the shards stay: the generator keeps those this configuration would
    # write again (e.g. after num_pairs was raised) and regenerates the others in place
    if run.stale() is not None:
        run.drop_marker()
    p, layout = run.preset, run.layout
    teacher, _ = load_teacher(p, layout.teacher_dir)
    manifest = generate_trajectories(
        teacher,
        p.teacher.sampling,
        p.dd1.flow,
        p.dd1.trajectories,
        traj_dir(layout),
        shard_ids=list(shard_ids) if shard_ids is not None else None,
        progress=run.progress,
        replace=True,
    )
    result = {"manifest": jsonable(manifest.to_dict())}  # no absolute paths: this lands in a DVC output
    if shard_ids is not None:
        return result  # partial work; the all-shards call marks the stage complete
    return run.finish(result)


def distill_stage(run: StageRun, log_fn: Callable[[dict], None] | None = None) -> dict:
    """Train the DD1 student on the trajectories (resumes from its last checkpoint).

    With DD_NPROC_PER_NODE > 1 (or 'auto' on a machine with several GPUs) the training runs under
    `torchrun --standalone` with one process per device; the trainer is DDP-aware and computes the
    single-process gradient, and this process keeps the bookkeeping.
    """
    layout = run.layout
    if m := run.complete():
        log.info("distill[%s]: complete, skipping", run.preset_name)
        layout.copy_train_log()
        return m.result
    if is_torchrun_worker():  # a worker started by torchrun_stage: train, nothing else
        return _train(run, log_fn)
    if run.stale() is not None and layout.student_dir.exists():
        shutil.rmtree(layout.student_dir)
    nproc = nproc_per_node()
    if nproc > 1:
        roots = {
            "data": layout.data_root,
            "model": layout.model_root,
            "metrics": layout.metrics_root,
            "project": layout.project_root,
        }
        preset_json = run.preset.model_dump(mode="json")
        torchrun_stage("distill", run.preset_name, preset_json, roots, layout.state_dir, nproc)
        out = _student_summary(layout.student_dir)
    else:
        out = _train(run, log_fn)
    layout.copy_train_log()
    result = {"summary": jsonable(out) if isinstance(out, dict) else None, "processes": nproc}
    result["final"] = last_log_row(layout.train_log)
    return run.finish(result)


def _train(run: StageRun, log_fn) -> dict:
    p, layout = run.preset, run.layout
    teacher, _ = load_teacher(p, layout.teacher_dir)
    return train_student(
        teacher,
        traj_dir(layout),
        p.dd1.student,
        p.dd1.train,
        layout.student_dir,
        resume=True,
        log_fn=log_fn,
        progress=run.progress,
    )


def _student_summary(student_dir: Path) -> dict:
    import json

    return json.loads((student_dir / "student.json").read_text()).get("summary", {})

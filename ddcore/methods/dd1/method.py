"""DD1 as one `Method` record: its stages, its samplers, its headline, its bench extras."""

from __future__ import annotations

from ddcore.methods.base import Method, StageSpec
from ddcore.methods.dd1 import throughput
from ddcore.methods.dd1.samplers import SAMPLERS, random_students
from ddcore.methods.dd1.stages import distill_stage, traj_dir, trajectories_stage, trajectory_shards


def _bench_extra(preset, teacher, layout) -> dict:
    """bench.json `extra`: trajectory-generation and training throughput (and peak memory),
    measured in the bench run through the stages' own code."""
    d = preset.dd1
    return {
        "trajectories": lambda: throughput.trajectory_throughput(
            teacher, preset.teacher.sampling, d.flow, d.trajectories
        ),
        "training": lambda: throughput.training_throughput(teacher, traj_dir(layout), d.student, d.train),
    }


DD1 = Method(
    name="dd1",
    title="DD1 student",
    stages=(
        StageSpec(
            "trajectories",
            trajectories_stage,
            reads=("teacher.sampling", "dd1.flow", "dd1.trajectories"),
            after=("prepare",),
            output=traj_dir,
            help="generate DD1 (noise, teacher tokens) trajectory shards",
            shards=trajectory_shards,
        ),
        StageSpec(
            "distill",
            distill_stage,
            reads=("dd1.student", "dd1.train"),
            after=("trajectories",),
            output=lambda layout: layout.student_dir,
            help="train the DD1 student on the trajectories (resumes)",
        ),
    ),
    samplers=SAMPLERS,
    headline_prefix="dd1",
    bench_extra=_bench_extra,
    bench_reads=("dd1.trajectories", "dd1.student", "dd1.train"),
    random_students=random_students,
)

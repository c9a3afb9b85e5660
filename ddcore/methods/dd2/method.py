"""DD2 as one `Method` record (part 1: the AR-diffusion initialisation and its sampler)."""

from __future__ import annotations

from ddcore.methods.base import Method, StageSpec
from ddcore.methods.dd2.samplers import CONTINUOUS_DIR, DSM_DIR, SAMPLERS
from ddcore.methods.dd2.stages import (
    ar_diffusion_dsm_stage,
    ar_diffusion_stage,
    continuous_dir,
    continuous_stage,
    dsm_dir,
    sample_shards,
    samples_dir,
    samples_stage,
)

_TRAIN = ("teacher.sampling", "dd2.ar_diffusion")

DD2 = Method(
    name="dd2",
    title="DD2 AR-diffusion model",
    stages=(
        StageSpec(
            "samples",
            samples_stage,
            reads=("teacher.sampling", "dd2.samples"),
            after=("prepare",),
            output=samples_dir,
            help="draw DD2's training data from the teacher (sharded, resumable)",
            shards=sample_shards,
        ),
        StageSpec(
            "continuous",
            continuous_stage,
            reads=("teacher.sampling", "dd2.continuous"),
            after=("samples",),
            output=continuous_dir,
            help="fit and fine-tune DD2's continuous-input teacher (resumes)",
        ),
        StageSpec(
            "ar-diffusion-dsm",
            ar_diffusion_dsm_stage,
            reads=_TRAIN,
            after=("continuous",),
            output=dsm_dir,
            help="train the AR-diffusion model with the plain diffusion loss, for comparison (resumes)",
        ),
        StageSpec(
            "ar-diffusion",
            ar_diffusion_stage,
            reads=_TRAIN,
            after=("continuous",),
            output=lambda layout: layout.student_dir,
            help="train the AR-diffusion model with the GTS loss: the preset's student (resumes)",
        ),
    ),
    samplers=SAMPLERS,
    headline_prefix="ar-diffusion",
    served=(CONTINUOUS_DIR, DSM_DIR),
)

"""DD2's samplers: the AR-diffusion model (`ar-diffusion`, and `ar-diffusion-dsm` for the model
trained with the plain diffusion loss) and the continuous-input teacher (`teacher-continuous`).

The models live beside the student folder of the preset (models/<preset>/): the GTS model is the
student (what part 1 registers; it loads from the teacher and its own folder), the DSM model and
the continuous-input teacher are its siblings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ddcore.methods.dd2.ardiffusion import ARDiffusion
from ddcore.methods.dd2.continuous import load_continuous
from ddcore.methods.dd2.init_train import load_ar_diffusion
from ddcore.samplers.base import SamplerContext, SamplerSpec, TeacherSampler
from ddcore.teachers.base import Teacher

CONTINUOUS_DIR, DSM_DIR = "continuous", "ar-diffusion-dsm"


class ARDiffusionSampler:
    """AR over the teacher's steps with the KV cache; each token solved from its noise by
    `ode_steps` Euler steps of the learned velocity, snapped to the codebook; decoded by the teacher."""

    def __init__(self, model: ARDiffusion, teacher: Teacher, ode_steps: int, name: str = "ar-diffusion"):
        self.model, self.teacher, self.ode_steps, self.name = model, teacher, int(ode_steps), name
        self.steps = len(teacher.step_sizes)  # backbone passes (each with ode_steps head passes)

    @torch.no_grad()
    def tokens(self, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        labels = labels.to(self.teacher.device)
        return self.model.sample(labels, self.teacher.noise(seeds), self.ode_steps)

    @torch.no_grad()
    def images(self, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        return self.teacher.decode(self.tokens(labels, seeds))


def sibling(ctx: SamplerContext, name: str) -> Path:
    return ctx.student_dir.parent / name


def _continuous(ctx: SamplerContext) -> Teacher:
    if "dd2-continuous" not in ctx.cache:
        ctx.cache["dd2-continuous"] = load_continuous(ctx.teacher, sibling(ctx, CONTINUOUS_DIR))
    return ctx.cache["dd2-continuous"]


def _ar_diffusion(m: re.Match, ctx: SamplerContext) -> ARDiffusionSampler:
    where = ctx.student_dir if m.group(1) is None else sibling(ctx, DSM_DIR)
    model = load_ar_diffusion(ctx.teacher, where)
    return ARDiffusionSampler(model, ctx.teacher, ctx.preset.dd2.sampler.ode_steps, name=m.group(0))


SAMPLERS = (
    SamplerSpec(r"ar-diffusion(-dsm)?", "ar-diffusion[-dsm]", _ar_diffusion, reads=("dd2.sampler",)),
    SamplerSpec(
        "teacher-continuous",
        "teacher-continuous",
        lambda m, c: TeacherSampler(_continuous(c), c.preset.teacher.sampling, name="teacher-continuous"),
    ),
)

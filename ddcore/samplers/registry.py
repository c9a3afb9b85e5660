"""Sampler names -> `ImageSampler`s: the one factory evaluation, benchmark, CLI and serving use.

Names are matched against registered patterns: the teacher and the one-step baseline here, and
every method's own samplers (`Method.samplers`, e.g. DD1's `dd1-1step`, `dd1-teacher-<n>-<m>`).
A builder gets the regex match and a `SamplerContext` (teacher, student folder, preset) whose
`cache` lets several samplers share one loaded student.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ddcore.params import Preset
from ddcore.samplers.base import ImageSampler, SamplerContext, SamplerSpec, TeacherSampler
from ddcore.samplers.baseline import OneStepBaselineSampler, load_marginals
from ddcore.teachers.base import Teacher

COMMON_SAMPLERS = (
    SamplerSpec("teacher", "teacher", lambda m, c: TeacherSampler(c.teacher, c.preset.teacher.sampling)),
    SamplerSpec(
        "onestep-baseline",
        "onestep-baseline",
        lambda m, c: OneStepBaselineSampler(load_marginals(c.student_dir), c.teacher),
    ),
)


def sampler_specs() -> tuple[SamplerSpec, ...]:
    from ddcore.methods.registry import all_methods

    return COMMON_SAMPLERS + tuple(s for m in all_methods() for s in m.samplers)


def sampler_names() -> tuple[str, ...]:
    return tuple(s.shown for s in sampler_specs())


def unknown_sampler(name: str) -> ValueError:
    return ValueError(f"unknown sampler {name!r}; allowed: {', '.join(sampler_names())}")


def build_samplers(
    names: Sequence[str], teacher: Teacher, student_dir: str | Path, preset: Preset
) -> list[ImageSampler]:
    """The samplers named in `names`, for a prepared teacher and the student in `student_dir`."""
    ctx = SamplerContext(teacher, Path(student_dir), preset)
    specs = sampler_specs()
    out = []
    for name in names:
        for spec in specs:
            if m := re.fullmatch(spec.pattern, name):
                out.append(spec.build(m, ctx))
                break
        else:
            raise unknown_sampler(name)
    return out

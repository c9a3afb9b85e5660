"""One interface for every way of producing images: the teacher, DD1 students, baselines, later DD2.

Evaluation and benchmarks only ever see `ImageSampler`, so adding a sampler never touches them.
A `SamplerSpec` names samplers by pattern and builds them from a `SamplerContext`
(`ddcore.samplers.registry.build_samplers` is the factory).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ddcore.params import Preset, SamplingParams
from ddcore.teachers.base import Teacher

# name suffix of a sampler's torch.compile'd variant ("dd1-1step+compile")
COMPILED_SUFFIX = "+compile"


@runtime_checkable
class ImageSampler(Protocol):
    name: str  # "teacher", "dd1-1step", "dd1-2step", "onestep-baseline", ...
    steps: int  # sequential network evaluations per image

    def tokens(self, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        """(B, seq_len) codebook indices the images decode from."""
        ...

    def images(self, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        """(B, 3, H, W) float images in [0, 1]."""
        ...


class TeacherSampler:
    """The AR teacher itself, with its own multinomial draw."""

    def __init__(self, teacher: Teacher, params: SamplingParams, name: str = "teacher"):
        self.teacher, self.params, self.name = teacher, params, name
        self.steps = len(teacher.step_sizes)

    @torch.no_grad()
    def tokens(self, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        return self.teacher.sample(labels, seeds, self.params)

    @torch.no_grad()
    def images(self, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        return self.teacher.decode(self.tokens(labels, seeds))

    @property
    def compiled(self) -> Callable[[], TeacherSampler]:
        """`sampler.compiled()`: the same sampler (same class, params, chooser) over
        `teacher.compile()`; see `compiled_variant`."""
        return compiled_variant(self)


def compiled_variant(sampler, compile_more: Callable[[object], None] | None = None) -> Callable[[], object]:
    """The factory of a sampler's compiled variant: a shallow copy named f"{name}+compile" over
    `teacher.compile()` (which shares the teacher's weights), then `compile_more(twin)` swaps in
    the sampler's own compiled parts (a student's forward pass).

    Only samplers whose teacher has a `compile()` have a compiled variant, so that a compiled
    student is always timed against a teacher compiled the same way. For the others this raises
    AttributeError saying so, which is also what lets `getattr(sampler, "compiled", None)`
    callers (the benchmark) skip them.
    """
    compile_teacher = getattr(sampler.teacher, "compile", None)
    if not callable(compile_teacher):
        raise AttributeError(
            f"sampler {sampler.name!r} has no compiled variant: its teacher "
            f"({type(sampler.teacher).__name__}) has no compile() method"
        )

    def make():
        twin = copy.copy(sampler)
        twin.teacher = compile_teacher()
        twin.name = f"{sampler.name}{COMPILED_SUFFIX}"
        if compile_more is not None:
            compile_more(twin)
        return twin

    return make


@dataclass
class SamplerContext:
    teacher: Teacher
    student_dir: Path
    preset: Preset
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplerSpec:
    """`pattern` (a full-match regex) names the samplers `build(match, ctx)` makes; `shown` is how
    error messages list it; `reads` the preset keys its samplers depend on (stage fingerprints)."""

    pattern: str
    shown: str
    build: Callable[[re.Match, SamplerContext], ImageSampler]
    reads: tuple[str, ...] = ()

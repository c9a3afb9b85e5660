"""One interface for every way of producing images: the teacher, DD1 students, baselines, later DD2.

Evaluation and benchmarks only ever see `ImageSampler`, so adding a sampler never touches them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ddcore.params import SamplingParams
from ddcore.teachers.base import Teacher


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

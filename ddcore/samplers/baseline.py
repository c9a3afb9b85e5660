"""The one-step set-prediction baseline of the DD1 paper.

A model that predicts all positions at once from the label alone, trained with a per-position
loss, is optimal when it samples every position independently from its marginal token
distribution (DD1, Prop. 3.1). Its best case is therefore analytic: independent per-position
sampling from the token frequencies of the trajectory data. It shows what one step can reach
without modelling the dependencies between positions, which is exactly what DD1's flow-map
pairing adds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ddcore.checkpoints import load_state_dict_file
from ddcore.sampling import MultinomialChooser
from ddcore.teachers.base import Teacher

__all__ = ["OneStepBaselineSampler", "load_marginals"]


def load_marginals(student_dir: str | os.PathLike) -> Tensor:
    """(L, V) per-position token frequencies saved next to the student (training pairs only)."""
    return load_state_dict_file(Path(student_dir) / "baseline.safetensors")["marginals"]


class OneStepBaselineSampler:
    """Independent per-position draws from the marginals; one step, no network at all.

    Each sample's randomness is its seed's noise (u = Phi(eps[..., 0]) per position, the
    teacher's multinomial rule), so results do not depend on batch composition.
    """

    name = "onestep-baseline"
    steps = 1

    def __init__(self, marginals: Tensor, teacher: Teacher, name: str = "onestep-baseline"):
        if marginals.shape != (teacher.seq_len, teacher.vocab_size):
            raise ValueError(
                f"marginals {tuple(marginals.shape)} != (seq_len, vocab) = ({teacher.seq_len}, {teacher.vocab_size})"
            )
        self.marginals = marginals.double() / marginals.double().sum(-1, keepdim=True)
        self.teacher, self.name = teacher, name

    @torch.no_grad()
    def tokens(self, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        noise = self.teacher.noise(seeds)
        probs = self.marginals.to(noise.device).expand(noise.shape[0], -1, -1)
        return MultinomialChooser()(probs, noise)

    @torch.no_grad()
    def images(self, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        return self.teacher.decode(self.tokens(labels, seeds))

    @torch.no_grad()
    def tokens_and_images(self, labels: Tensor, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        tok = self.tokens(labels, seeds)
        return tok, self.teacher.decode(tok)

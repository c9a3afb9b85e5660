"""The teacher's conditional score and velocity (DD2 Eq. 1), in DD2's RectFlow convention.

Position i's next-token distribution p(. | q_<i) (after guidance, temperature, top-k, top-p:
exactly what the teacher samples from) is a Dirac mixture over the codebook; noised on the path
x_t = (1 - t) q + t eps it has the closed-form score s = ((1 - t) D(x_t) - x_t) / t^2 and velocity
v = dx/dt = (x_t - D(x_t)) / t, with D the posterior mean of the clean token (`ddcore.dirac`).
One teacher-forced pass gives p at every position, so every position gets its own t_i.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddcore import dirac
from ddcore.params import SamplingParams
from ddcore.teachers.base import Teacher


def noised(q: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) q + t eps, with t (...,) broadcast over the token dimension."""
    t = t.to(q.dtype).unsqueeze(-1)
    return (1.0 - t) * q + t * eps


def conditional_velocity(probs: Tensor, x_t: Tensor, t: Tensor, codebook: Tensor) -> Tensor:
    """v(x_t, t | p) = (x_t - D(x_t)) / t for the mixture sum_j p_j delta(c_j): probs (..., V),
    x_t (..., d), t (...,) in (0, 1]. Zero-probability codes get exactly zero weight."""
    return dirac.dd2_velocity(x_t, dirac.safe_log(probs.to(x_t.dtype)), codebook, t)


def conditional_score(probs: Tensor, x_t: Tensor, t: Tensor, codebook: Tensor) -> Tensor:
    """s(x_t, t | p) = grad log of the noised mixture density, same shapes as `conditional_velocity`."""
    return dirac.dd2_score(x_t, dirac.safe_log(probs.to(x_t.dtype)), codebook, t)


@torch.no_grad()
def teacher_velocity(
    teacher: Teacher, tokens: Tensor, labels: Tensor, params: SamplingParams, x_t: Tensor, t: Tensor
) -> Tensor:
    """The teacher's analytic velocity at every position of `tokens` (B, L): the prefix q_<i is the
    clean token sequence, x_t (B, L, d) the noisy token of each position at its own t (B, L)."""
    probs = teacher.teacher_forced_probs(tokens, labels, params)
    return conditional_velocity(probs.to(x_t.device), x_t, t.to(x_t.device), teacher.codebook.to(x_t.device))

"""The AR-diffusion model's two training losses (DD2 Stage 1), both in velocity space.

* GTS (ground-truth score): regress the teacher's analytic velocity v_Phi(x_t, t | q_<i) at every
  position, an exact target instead of a Monte-Carlo one.
* DSM (the plain diffusion loss, for the comparison): regress eps - q, whose expectation given x_t
  is v_Phi.
The network predicts velocity (DD2 App. E.1), so the losses are squared velocity errors; in score
terms ||v_psi - v_Phi||^2 = (t / (1 - t))^2 ||s_psi - s_Phi||^2, a weighting the paper leaves open
(docs/dd2.md). Each sequence is noised `m` times with its own t per position (MAR's
`diffusion_batch_mul`); t is drawn uniformly from [t_min, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddcore.methods.dd2.score import conditional_velocity, noised


def sample_times(shape: tuple[int, ...], generator: torch.Generator, t_min: float = 1e-3) -> Tensor:
    """Per-position t, uniform on [t_min, 1] (t = 0 is the data itself, where v is undefined)."""
    return t_min + (1.0 - t_min) * torch.rand(shape, generator=generator)


def gts_loss(v_pred: Tensor, x_t: Tensor, t: Tensor, probs: Tensor, codebook: Tensor) -> Tensor:
    """Mean squared error to the analytic velocity of the teacher's distribution at each position."""
    with torch.no_grad():
        target = conditional_velocity(probs.to(torch.float32), x_t.float(), t.float(), codebook.float())
    return ((v_pred.float() - target) ** 2).mean()


def dsm_loss(v_pred: Tensor, q: Tensor, eps: Tensor) -> Tensor:
    """Mean squared error to the Monte-Carlo velocity eps - q of the path x_t = (1 - t) q + t eps."""
    return ((v_pred.float() - (eps - q).float()) ** 2).mean()


def noisy_batch(
    q: Tensor, m: int, generator: torch.Generator, t_min: float = 1e-3
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The m-times repeated clean tokens q (B, L, d) with fresh noise and t: (q_rep, eps, t, x_t)."""
    q_rep = q.repeat_interleave(m, dim=0)
    eps = torch.randn(q_rep.shape, generator=generator).to(q.device, q.dtype)
    t = sample_times(q_rep.shape[:-1], generator, t_min).to(q.device)
    return q_rep, eps, t, noised(q_rep, eps, t)

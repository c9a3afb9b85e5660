"""Solving one token from noise: the per-token ODE of DD2's AR-diffusion sampler.

dx/dt = v(x, t) from t = 1 (x = eps) down to t = 0 with N Euler steps (DD2 samples with 10 per
token) on a grid t_k = (k / N)^power (uniform at power 1); the end point is snapped to the nearest codebook entry. Driven by the analytic velocity of
the teacher's distribution (`AnalyticODEChooser`) this is a deterministic token chooser that
reproduces p as N grows; driven by a learned head it is the `ar-diffusion` sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ddcore.methods.dd2.score import conditional_velocity

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x (..., d), t (...,)) -> v (..., d)


def time_grid(steps: int, power: float = 1.0) -> list[float]:
    """t_k = (k / N)^power for k = N .. 0: uniform at power 1, denser near t = 0 above it."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if power <= 0:
        raise ValueError(f"the time grid's power must be > 0, got {power}")
    return [(k / steps) ** power for k in range(steps, -1, -1)]


def euler_solve(velocity: Velocity, eps: Tensor, steps: int, power: float = 1.0) -> Tensor:
    """x_0 from x_1 = eps by `steps` Euler steps on `time_grid(steps, power)`."""
    grid, x = time_grid(steps, power), eps
    for t_hi, t_lo in zip(grid[:-1], grid[1:], strict=True):
        t = torch.full(x.shape[:-1], t_hi, dtype=x.dtype, device=x.device)
        x = x - (t_hi - t_lo) * velocity(x, t)
    return x


def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook entry (Euclidean) for each vector of x (..., d)."""
    c = codebook.to(x.dtype)
    d2 = (x * x).sum(-1, keepdim=True) - 2 * x @ c.T + (c * c).sum(-1)
    return d2.argmin(-1)


class AnalyticODEChooser:
    """A `TokenChooser`: each position's token solved from its noise by the ODE of the teacher's own
    distribution at that position (no network: the exact GTS target), then snapped."""

    def __init__(
        self, codebook: Tensor, steps: int = 10, dtype: torch.dtype = torch.float64, power: float = 1.0
    ):
        self.codebook, self.steps, self.dtype, self.power = codebook, int(steps), dtype, float(power)

    def __call__(self, probs: Tensor, noise: Tensor) -> Tensor:
        cb = self.codebook.to(device=noise.device, dtype=self.dtype)
        p = probs.to(self.dtype)
        x0 = euler_solve(
            lambda x, t: conditional_velocity(p, x, t, cb), noise.to(self.dtype), self.steps, self.power
        )
        return nearest_code(x0, cb)

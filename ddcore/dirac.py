"""Gaussian-noised Dirac mixtures: the closed-form math both DD1 and DD2 stand on.

The teacher's next-token distribution p over a codebook C = {c_j} is the Dirac mixture
sum_j p_j delta(c_j). Noise it on a Gaussian path  x = alpha * c + sigma * eps,  eps ~ N(0, I).
Then everything is closed form:

  posterior weights  w_j(x) = softmax_j( log p_j - ||x - alpha c_j||^2 / (2 sigma^2) )
  denoiser           D(x)   = E[c | x] = sum_j w_j c_j
  score              s(x)   = grad_x log p(x) = (alpha D(x) - x) / sigma^2

Time conventions (both papers use straight paths, with opposite directions):
  DD1 (flow from noise at t=0 to data at t=1):  alpha = t,     sigma = 1 - t,  v = (D - x) / (1 - t)
  DD2 (RectFlow, data at t=0, noise at t=1):   alpha = 1 - t, sigma = t,      v = (x - D) / t
and DD2's relation v = (-sigma s - x) / alpha holds for its convention (tested).

Numerics: logits use log-sum-exp (softmax of fp32/fp64 logits), zero-probability entries carry
log p = -inf and get exactly zero weight. The squared distance is expanded as
||x||^2 - 2 alpha x.c + alpha^2 ||c||^2; the ||x||^2 term is constant over j and dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor


def safe_log(p: Tensor) -> Tensor:
    """log p with exact -inf for p == 0 (never NaN)."""
    return torch.where(p > 0, p.clamp_min(torch.finfo(p.dtype).tiny).log(), torch.full_like(p, float("-inf")))


def posterior_logits(
    x: Tensor, log_p: Tensor, codebook: Tensor, alpha: Tensor | float, sigma: Tensor | float
) -> Tensor:
    """Unnormalised log posterior over codebook entries, up to a per-row constant.

    x: (..., d); log_p: (..., V); codebook: (V, d); alpha, sigma: scalars or (...,) tensors.
    """
    alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if alpha.dim() > 0:
        alpha = alpha.unsqueeze(-1)
        sigma = sigma.unsqueeze(-1)
    c = codebook.to(x.dtype)
    cross = x @ c.T  # (..., V)
    c2 = (c * c).sum(-1)  # (V,)
    # -||x - a c||^2 / (2 s^2) = (a x.c - a^2 |c|^2 / 2) / s^2 - |x|^2 / (2 s^2)
    return log_p.to(x.dtype) + (alpha * cross - 0.5 * alpha * alpha * c2) / (sigma * sigma)


def posterior_weights(x: Tensor, log_p: Tensor, codebook: Tensor, alpha, sigma) -> Tensor:
    return torch.softmax(posterior_logits(x, log_p, codebook, alpha, sigma), dim=-1)


def denoiser(x: Tensor, log_p: Tensor, codebook: Tensor, alpha, sigma) -> Tensor:
    """E[c | x]: the posterior mean of the clean token embedding."""
    return posterior_weights(x, log_p, codebook, alpha, sigma) @ codebook.to(x.dtype)


def score(x: Tensor, log_p: Tensor, codebook: Tensor, alpha, sigma) -> Tensor:
    """grad_x log of the noised mixture density."""
    alpha_t = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
    sigma_t = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if alpha_t.dim() > 0:
        alpha_t, sigma_t = alpha_t.unsqueeze(-1), sigma_t.unsqueeze(-1)
    return (alpha_t * denoiser(x, log_p, codebook, alpha, sigma) - x) / (sigma_t * sigma_t)


def dd1_velocity(x: Tensor, log_p: Tensor, codebook: Tensor, t) -> Tensor:
    """DD1 convention: x_t = t c + (1 - t) eps, t in [0, 1); v = (D - x) / (1 - t)."""
    t_ = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    d = denoiser(x, log_p, codebook, t_, 1.0 - t_)
    if t_.dim() > 0:
        t_ = t_.unsqueeze(-1)
    return (d - x) / (1.0 - t_)


def dd2_score(x: Tensor, log_p: Tensor, codebook: Tensor, t) -> Tensor:
    """DD2 Eq. 1 convention: x_t = (1 - t) c + t eps, t in (0, 1]."""
    t_ = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return score(x, log_p, codebook, 1.0 - t_, t_)


def dd2_velocity(x: Tensor, log_p: Tensor, codebook: Tensor, t) -> Tensor:
    """DD2 convention velocity dx/dt = E[eps - c | x] = (x - D) / t."""
    t_ = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    d = denoiser(x, log_p, codebook, 1.0 - t_, t_)
    if t_.dim() > 0:
        t_ = t_.unsqueeze(-1)
    return (x - d) / t_

"""Token sampling shared by every teacher family.

Randomness is per sample: each image owns a seed, and all its randomness is one noise tensor
``eps`` of shape (seq_len, d) drawn from that seed. The multinomial chooser turns the first noise
coordinate into a uniform u = Phi(eps[..., 0]) and inverts the CDF; the DD1 flow chooser pushes the
whole vector through the AR flow-matching ODE. So teacher samples and flow samples with the same
seed share the same noise, and results never depend on batch composition or batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor


def sample_noise(seeds: Sequence[int], seq_len: int, dim: int, device: str | torch.device = "cpu") -> Tensor:
    """(B, seq_len, dim) standard normal noise; row b depends only on seeds[b]."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        rows.append(torch.randn(seq_len, dim, generator=g, dtype=torch.float32))
    return torch.stack(rows).to(device)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep logits >= the k-th largest (ties kept); 0 or k >= V is a no-op."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest prefix (by descending prob) whose mass reaches p; 1.0 = off."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    remove = cum > p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses p
    remove[..., 0] = False
    mask = torch.zeros_like(remove).scatter(-1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """LlamaGen order: temperature, then top-k, then top-p, then softmax (all in fp32)."""
    logits = logits.float() / max(temperature, 1e-5)
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    return torch.softmax(logits, dim=-1)


def cfg_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """LlamaGen guidance: uncond + s * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


class TokenChooser(Protocol):
    """Turns the sampling distribution of some positions into token indices, given their noise."""

    def __call__(self, probs: Tensor, noise: Tensor) -> Tensor:  # (B, n, V), (B, n, d) -> (B, n)
        ...


def uniform_from_noise(noise: Tensor) -> Tensor:
    """u = Phi(eps[..., 0]) in (0, 1), computed in fp64 so the inverse CDF is exact enough."""
    return 0.5 * (1.0 + torch.erf(noise[..., 0].double() / math.sqrt(2.0)))


class MultinomialChooser:
    """The teacher's own draw: inverse-CDF sampling with u from the per-sample noise."""

    def __call__(self, probs: Tensor, noise: Tensor) -> Tensor:
        p = probs.double()
        cdf = p.cumsum(dim=-1)
        u = uniform_from_noise(noise).unsqueeze(-1) * cdf[..., -1:]
        idx = torch.searchsorted(cdf, u.contiguous(), right=True).squeeze(-1)
        idx = idx.clamp_max(p.shape[-1] - 1)
        # never return a zero-probability index (can only happen through rounding at the tail)
        bad = p.gather(-1, idx.unsqueeze(-1)).squeeze(-1) <= 0
        return torch.where(bad, p.argmax(dim=-1), idx)  # unconditional: no host sync per token


class GreedyChooser:
    def __call__(self, probs: Tensor, noise: Tensor) -> Tensor:
        return probs.argmax(dim=-1)

"""The lightweight velocity head of DD2's AR-diffusion model (MAR's diffusion MLP, RectFlow velocity).

Input: the noisy token x_t (d), its time t and the backbone feature z of its position. Time is a
sinusoidal embedding through an MLP, the feature a linear map; their sum y conditions every
residual block by adaLN (LayerNorm -> shift/scale from SiLU(y) -> Linear-SiLU-Linear -> gated
residual). The adaLN and output layers start at zero, so the head starts at v = 0. Output: the
velocity v (d) of x_t = (1 - t) q + t eps, so q = x_t - t v at the end of the flow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class HeadConfig:
    token_dim: int
    feature_dim: int
    width: int = 256
    depth: int = 3
    time_freqs: int = 256

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HeadConfig:
        return cls(**d)


def time_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as MAR's diffusion steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.ada(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class VelocityHead(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.inp = nn.Linear(cfg.token_dim, w)
        self.time = nn.Sequential(nn.Linear(cfg.time_freqs, w), nn.SiLU(), nn.Linear(w, w))
        self.cond = nn.Linear(cfg.feature_dim, w)
        self.blocks = nn.ModuleList(ResBlock(w) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.out = nn.Linear(w, cfg.token_dim)
        for m in [b.ada[-1] for b in self.blocks] + [self.ada[-1], self.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """x_t (..., d), t (...,), z (..., feature_dim) -> v (..., d)."""
        y = self.time(time_embedding(t, self.cfg.time_freqs).to(x_t.dtype)) + self.cond(z)
        h = self.inp(x_t)
        for block in self.blocks:
            h = block(h, y)
        shift, scale = self.ada(y).chunk(2, dim=-1)
        return self.out(self.norm(h) * (1 + scale) + shift)

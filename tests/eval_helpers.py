"""Stand-ins for the evaluation tests: a fixed random conv net with the TinyEvaluator call
signature (features / forward on [0, 1] images). It only exercises the metric plumbing."""

from __future__ import annotations

import torch
from torch import nn


class RandomConvEvaluator(nn.Module):
    """Fixed random conv features + a linear head."""

    def __init__(self, num_classes: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2)
        )
        self.head = nn.Linear(32, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.eval()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images * 2 - 1).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

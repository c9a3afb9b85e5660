"""The tiny world's judge: a small CNN that plays the role Inception plays for ImageNet.

It classifies the procedural classes (for "does the teacher draw what it was asked for") and
its penultimate layer is the feature space for FID / precision / recall on the tiny world.

A classifier alone would be free to ignore colour, position and size, so an FID in its feature
space could not see a generator that collapses to one colour or one position. The network
therefore also regresses the generating attributes (lighter/darker colour, centre, size) from
the same features; that keeps those factors linearly present in the FID features.

Training uses light augmentation (colour gain/offset, Gaussian noise, slight blur) so that the
judge keys on shape rather than on the exact pixel statistics of the clean renderer; generated
images are blurrier and noisier than the renders and must not be rejected for that alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddcore.tiny.data import ATTRIBUTE_NAMES, CLASS_NAMES, to_unit
from ddcore.tiny.training import cosine_with_warmup as cosine_with_warmup  # re-exported: older imports
from ddcore.tiny.training import optimise, random_batch, seeded, step_bar, warmup_cosine

# seeds of the teacher samples the judge scores in a world's quality check (both families)
SAMPLE_SEED_BASE = 1_000_000


@dataclass
class EvaluatorConfig:
    image_size: int = 32
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128
    num_attributes: int = len(ATTRIBUTE_NAMES)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvaluatorConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class TinyEvaluator(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> class logits; `features` -> (B, feature_dim)."""

    def __init__(self, cfg: EvaluatorConfig):
        super().__init__()
        if cfg.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {cfg.image_size}")
        self.cfg = cfg
        w = cfg.width
        # space-to-depth stem: 3-channel convolutions at full resolution are slow on CPU for no gain
        self.trunk = nn.Sequential(
            nn.PixelUnshuffle(2),
            _conv(12, w),
            _conv(w, w),
            nn.MaxPool2d(2),
            _conv(w, 2 * w),
            _conv(2 * w, 2 * w),
            nn.MaxPool2d(2),
        )
        # flatten (not global pooling): position must survive into the features
        flat = 2 * w * (cfg.image_size // 8) ** 2
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(flat, cfg.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)
        self.attr_head = nn.Linear(cfg.feature_dim, cfg.num_attributes)

    def features(self, images: Tensor) -> Tensor:
        """(B, feature_dim) penultimate activations: the FID / precision / recall space."""
        x = (images * 2.0 - 1.0).contiguous(memory_format=torch.channels_last)
        return self.embed(self.trunk(x))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    def forward_all(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(images)
        return self.head(f), self.attr_head(f)


# --- augmentation ----------------------------------------------------------------------------------
def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Light, label-preserving corruption of [0, 1] images (B, 3, H, W)."""
    b = images.shape[0]

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    gain = 1.0 + (rand(b, 3, 1, 1) - 0.5) * 0.12
    offset = (rand(b, 1, 1, 1) - 0.5) * 0.08
    x = images * gain + offset
    # blur half the batch with a 3x3 Gaussian of random width (sigma 0.3..1.0)
    sigma = 0.3 + 0.7 * rand(b)
    t = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, dim=0)[:, None]  # (3b, 1, 3, 3)
    blurred = F.conv2d(
        F.pad(x.reshape(1, 3 * b, *x.shape[2:]), (1, 1, 1, 1), mode="replicate"), k2, groups=3 * b
    )
    blur = (rand(b, 1, 1, 1) < 0.5).float()
    x = blur * blurred.reshape_as(x) + (1.0 - blur) * x
    noise_std = 0.04 * rand(b, 1, 1, 1)
    x = x + noise_std * torch.randn(x.shape, generator=generator)
    return x.clamp(0.0, 1.0)


# --- training / evaluation -------------------------------------------------------------------------
def train_evaluator(
    images: np.ndarray,
    labels: np.ndarray,
    attributes: np.ndarray,
    cfg: EvaluatorConfig,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    attr_weight: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> TinyEvaluator:
    """Train on uint8 images (N, H, W, 3); returns the network in eval mode."""
    g = seeded(seed)
    model = TinyEvaluator(cfg).to(memory_format=torch.channels_last)
    x_all = to_unit(images)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    a_all = torch.as_tensor(attributes, dtype=torch.float32)
    a_mask = ~torch.isnan(a_all)
    a_all = torch.nan_to_num(a_all)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps, max_warmup=50)
    model.train()
    bar = step_bar(steps, "evaluator", progress)
    for _ in bar:
        idx = random_batch(x_all.shape[0], batch_size, g)
        logits, attr = model.forward_all(augment(x_all[idx], g))
        ce = F.cross_entropy(logits, y_all[idx])
        m = a_mask[idx]
        mse = ((attr - a_all[idx]) ** 2 * m).sum() / m.sum().clamp_min(1)
        optimise(opt, sched, ce + attr_weight * mse)
        bar.set_postfix(ce=f"{ce.item():.3f}", attr=f"{mse.item():.4f}", refresh=False)
    return model.eval()


@torch.no_grad()
def predict(model: TinyEvaluator, images01: Tensor, batch_size: int = 500) -> Tensor:
    """Predicted classes for float images in [0, 1] (N, 3, H, W)."""
    model.eval()
    out = [
        model(images01[i : i + batch_size].float()).argmax(dim=1)
        for i in range(0, images01.shape[0], batch_size)
    ]
    return torch.cat(out)


def accuracy(
    model: TinyEvaluator, images01: Tensor, labels: Tensor | np.ndarray, batch_size: int = 500
) -> float:
    pred = predict(model, images01, batch_size)
    return (pred == torch.as_tensor(labels, dtype=torch.long)).float().mean().item()


def accuracy_per_class(
    model: TinyEvaluator, images01: Tensor, labels: Tensor, batch_size: int = 500
) -> tuple[float, dict[str, float]]:
    """Accuracy on generated images, overall and per class name (the classes present in labels)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    hit = (predict(model, images01, batch_size) == labels).float()
    per = {CLASS_NAMES[int(k)]: float(hit[labels == k].mean()) for k in labels.unique()}
    return float(hit.mean()), per


# --- persistence -----------------------------------------------------------------------------------
def save_evaluator(path: Path | str, model: TinyEvaluator, extra: dict | None = None) -> None:
    """Write `path`.safetensors + `path`.json ({"config": ..., **extra}, e.g. a config hash)."""
    from ddcore.checkpoints import save_model

    save_model(Path(path), model, {"config": model.cfg.to_dict(), **(extra or {})})


def load_evaluator(path: Path | str, device: str | torch.device = "cpu") -> TinyEvaluator:
    """Rebuild from `path`.json and load `path`.safetensors strictly; returned in eval mode."""
    from ddcore.checkpoints import load_model_config, load_safetensors_model

    meta = load_model_config(path)
    model = TinyEvaluator(EvaluatorConfig.from_dict(meta.get("config", meta)))
    load_safetensors_model(path, model, what="tiny evaluator")
    return model.to(device).eval()

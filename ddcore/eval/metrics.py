"""Sample-quality metrics computed from feature vectors (and classifier logits).

Everything here is plain numpy/torch on already-extracted features, so the same code scores
the tiny world (tiny evaluator features) and ImageNet (Inception pool features), and each
function can be checked against closed-form answers. Statistics are accumulated in float64:
FID differences of a few tenths are what we compare, and float32 covariances of 2048-d
features lose that.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor


def _np64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ddof=1) covariance of (N, F) features, the FID statistics."""
    f = _np64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N>=2, F) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh (negative round-off eigenvalues clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    Tr((S1 S2)^{1/2}) equals Tr((A S2 A)^{1/2}) with A = S1^{1/2}; the latter is a symmetric PSD
    matrix, so its eigenvalues come from eigh and are real and non-negative up to round-off.
    This avoids the complex results and retry-with-offset dance of a general sqrtm.
    """
    mu1, mu2 = _np64(mu1), _np64(mu2)
    s1, s2 = _np64(sigma1), _np64(sigma2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    a = _sqrt_psd(s1)
    m = a @ s2 @ a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_features(features1: ArrayLike, features2: ArrayLike) -> float:
    mu1, s1 = feature_stats(features1)
    mu2, s2 = feature_stats(features2)
    return frechet_distance(mu1, s1, mu2, s2)


def _kth_nn_radii(x: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each row of x to its k-th nearest other row of x."""
    if x.shape[0] <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {x.shape[0]}")
    out = []
    for rows in x.split(chunk):
        d = torch.cdist(rows, x)
        # the point itself is at distance 0 and is the 1st value, so the k-th neighbour is k+1-th
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _covered(points: Tensor, centers: Tensor, radii: Tensor, chunk: int) -> Tensor:
    """For each point: does it fall inside any ball (center, radius)?"""
    out = []
    for rows in points.split(chunk):
        d = torch.cdist(rows, centers)
        out.append((d <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(out)


def precision_recall(
    generated: ArrayLike,
    real: ArrayLike,
    k: int = 3,
    chunk: int = 2048,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision/recall (k-NN manifolds, Kynkäänniemi et al. 2019).

    precision: fraction of generated samples inside the real manifold (union of balls around
    real samples with radius = distance to their k-th nearest real neighbour);
    recall: fraction of real samples inside the generated manifold, built the same way.
    On CPU (default) distances are float64; on a CUDA `device` float32, as torch-fidelity does,
    because 50k x 50k distances of 2048-d features are GPU work.
    """
    dtype = torch.float32 if device is not None and torch.device(device).type == "cuda" else torch.float64
    g = torch.as_tensor(_np64(generated)).to(device or "cpu", dtype)
    r = torch.as_tensor(_np64(real)).to(device or "cpu", dtype)
    precision = _covered(g, r, _kth_nn_radii(r, k, chunk), chunk).double().mean().item()
    recall = _covered(r, g, _kth_nn_radii(g, k, chunk), chunk).double().mean().item()
    return precision, recall


def inception_score(logits: ArrayLike, splits: int = 1) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` consecutive chunks.

    Samples are taken in the order given (the caller's samples are already in random label
    order), so the result is a deterministic function of the input.
    """
    z = torch.as_tensor(_np64(logits))
    if z.ndim != 2:
        raise ValueError(f"need (N, C) logits, got {tuple(z.shape)}")
    n = z.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits={splits} must be in [1, N={n}]")
    log_p = torch.log_softmax(z, dim=1)
    scores = []
    for i in range(splits):
        lp = log_p[i * n // splits : (i + 1) * n // splits]
        log_marg = torch.logsumexp(lp, dim=0) - np.log(lp.shape[0])
        kl = (lp.exp() * (lp - log_marg)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    m = x.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kernel_inception_distance(
    features1: ArrayLike, features2: ArrayLike, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3, mean/std over subsets.

    Subsets are drawn without replacement; subset_size is capped at the smaller set so small
    evaluations still produce a (noisier) number.
    """
    f1, f2 = _np64(features1), _np64(features2)
    size = min(subset_size, f1.shape[0], f2.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 samples per set")
    rng = np.random.RandomState(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        a = f1[rng.choice(f1.shape[0], size, replace=False)]
        b = f2[rng.choice(f2.shape[0], size, replace=False)]
        vals[i] = _mmd2_unbiased(a, b)
    return float(vals.mean()), float(vals.std())


def class_accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of images whose classifier argmax equals the label they were generated for."""
    z = torch.as_tensor(_np64(logits))
    y = torch.as_tensor(np.asarray(labels)).long()
    return (z.argmax(dim=1) == y).double().mean().item()

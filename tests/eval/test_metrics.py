"""Known-answer tests for the feature-space metrics (FID, precision/recall, IS, KID)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full

from ddcore.eval.metrics import (
    class_accuracy,
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16))
    assert abs(fid_from_features(feats, feats)) < 1e-8


def test_fid_diagonal_gaussians_closed_form():
    # For commuting (diagonal) covariances Tr(S1+S2-2(S1S2)^1/2) = sum (sqrt(s1)-sqrt(s2))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1.0 + 0.0 + 9.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_fid_full_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_from_samples_approaches_gaussian_closed_form():
    rng = np.random.default_rng(2)
    n, d = 40000, 4
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    exact = frechet_distance(mu1, s1, mu2, s2)
    assert fid_from_features(x, y) == pytest.approx(exact, abs=0.05)


def test_fid_agrees_with_torch_fidelity_on_same_features():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(300, 32)))
    y = torch.from_numpy(rng.normal(loc=0.3, scale=1.2, size=(300, 32)))
    theirs = fid_statistics_to_metric(fid_features_to_statistics(x), fid_features_to_statistics(y), False)
    ours = fid_from_features(x, y)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)


def test_fid_rejects_mismatched_shapes():
    mu, sig = feature_stats(np.random.default_rng(0).normal(size=(10, 3)))
    with pytest.raises(ValueError):
        frechet_distance(mu, sig, np.zeros(4), np.eye(4))


def test_precision_recall_identical_sets():
    x = np.random.default_rng(4).normal(size=(200, 8))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_disjoint_far_sets():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(200, 8))
    gen = rng.normal(size=(200, 8)) + 100.0
    assert precision_recall(gen, real) == (0.0, 0.0)


def test_precision_recall_generated_covers_one_of_two_modes():
    rng = np.random.default_rng(6)
    mode_a = rng.normal(size=(150, 4))
    mode_b = rng.normal(size=(150, 4)) + 50.0
    real = np.concatenate([mode_a, mode_b])
    gen = mode_a.copy()
    p, r = precision_recall(gen, real)
    assert p == 1.0
    assert r == 0.5


def test_precision_recall_half_of_a_continuous_support():
    # Real: uniform grid on the unit square; generated: the left half of it.
    g = np.linspace(0, 1, 40)
    real = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
    gen = real[real[:, 0] < 0.5]
    p, r = precision_recall(gen, real)
    assert p == 1.0
    assert 0.5 <= r <= 0.55  # only a thin strip right of x=0.5 falls into the generated balls


def test_precision_recall_matches_torch_fidelity():
    rng = np.random.default_rng(7)
    gen = torch.from_numpy(rng.normal(size=(300, 6)))
    real = torch.from_numpy(rng.normal(loc=0.4, size=(250, 6)))
    theirs = calculate_precision_recall_full(gen, real, neighborhood=3)
    assert precision_recall(gen, real, k=3) == pytest.approx(theirs, abs=1e-6)  # theirs averages in fp32


def test_inception_score_uniform_predictions_is_one():
    mean, std = inception_score(np.zeros((100, 10)), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_inception_score_confident_spread_over_k_classes_is_k(k):
    labels = np.arange(200) % k
    logits = np.full((200, 10), -1e3)
    logits[np.arange(200), labels] = 0.0
    mean, _ = inception_score(logits)
    assert mean == pytest.approx(k, rel=1e-9)


def test_inception_score_matches_torch_fidelity_single_split():
    z = torch.from_numpy(np.random.default_rng(8).normal(scale=3.0, size=(400, 20)))
    theirs = isc_features_to_metric(z, splits=1)["inception_score_mean"]
    assert inception_score(z)[0] == pytest.approx(theirs, rel=1e-10)


def test_kid_matches_torch_fidelity_and_separates_distributions():
    rng = np.random.default_rng(9)
    x = torch.from_numpy(rng.normal(size=(400, 16)))
    y_same = torch.from_numpy(rng.normal(size=(400, 16)))
    y_shift = torch.from_numpy(rng.normal(loc=0.5, size=(400, 16)))
    kw = dict(kid_subsets=20, kid_subset_size=200, rng_seed=11, verbose=False)
    theirs = kid_features_to_metric(x, y_shift, **kw)
    ours = kernel_inception_distance(x, y_shift, subsets=20, subset_size=200, seed=11)
    assert ours[0] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
    assert ours[1] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-9)
    same = kernel_inception_distance(x, y_same, subsets=20, subset_size=200, seed=11)[0]
    # the unbiased estimator is centred at 0 for equal distributions
    assert abs(same) < 0.1 * ours[0]


def test_class_accuracy():
    logits = np.eye(4)[[0, 1, 2, 3, 0]]
    assert class_accuracy(logits, [0, 1, 2, 0, 0]) == pytest.approx(0.8)

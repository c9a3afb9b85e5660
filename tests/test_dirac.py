"""The closed-form Dirac-mixture math (ddcore/dirac.py) against brute-force references.

Every reference here is computed a different way from the code under test: the score by finite
differences of the log mixture density written out with explicit Gaussian densities, the
denoiser by Bayes' rule over explicit densities and by a Monte-Carlo orthogonality check, the
velocities from their defining conditional expectations.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddcore import dirac

F64 = torch.float64


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _problem(V: int = 7, d: int = 3, seed: int = 0, zero: int = 2):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(V, d, generator=g, dtype=torch.float64)
    p = torch.rand(V, generator=g, dtype=torch.float64) + 0.05
    p[:zero] = 0.0  # some zero-probability entries (top-k filtered)
    p = p / p.sum()
    return codebook, p


def _log_density(x: torch.Tensor, p: torch.Tensor, codebook: torch.Tensor, alpha: float, sigma: float):
    """log sum_j p_j N(x; alpha c_j, sigma^2 I), written out term by term (no shared code)."""
    d = x.shape[-1]
    terms = []
    for j in range(codebook.shape[0]):
        if p[j] == 0:
            continue
        sq = ((x - alpha * codebook[j]) ** 2).sum(-1)
        terms.append(math.log(p[j]) - sq / (2 * sigma**2) - d * math.log(sigma * math.sqrt(2 * math.pi)))
    return torch.logsumexp(torch.stack(terms, -1), -1)


def _bayes_denoiser(x, p, codebook, alpha, sigma):
    num = torch.zeros_like(x)
    den = torch.zeros(x.shape[:-1], dtype=x.dtype)
    for j in range(codebook.shape[0]):
        w = p[j] * torch.exp(-((x - alpha * codebook[j]) ** 2).sum(-1) / (2 * sigma**2))
        num += w[..., None] * codebook[j]
        den += w
    return num / den[..., None]


@pytest.mark.parametrize("alpha,sigma", [(0.3, 0.9), (0.8, 0.4), (1.0, 1.0)])
def test_score_matches_finite_difference_gradient(alpha, sigma):
    codebook, p = _problem()
    x = _randn(5, 3, seed=1)
    s = dirac.score(x, dirac.safe_log(p), codebook, alpha, sigma)
    h = 1e-6
    fd = torch.zeros_like(x)
    for k in range(3):
        e = torch.zeros(3, dtype=F64)
        e[k] = h
        fd[:, k] = (
            _log_density(x + e, p, codebook, alpha, sigma) - _log_density(x - e, p, codebook, alpha, sigma)
        ) / (2 * h)
    torch.testing.assert_close(s, fd, rtol=1e-6, atol=1e-7)


def test_denoiser_matches_bayes_rule_and_per_row_alpha():
    codebook, p = _problem()
    x = _randn(6, 3, seed=2)
    alphas = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.8, 0.9], dtype=F64)
    sigmas = 1.0 - alphas
    got = dirac.denoiser(x, dirac.safe_log(p).expand(6, -1), codebook, alphas, sigmas)
    want = torch.stack(
        [_bayes_denoiser(x[i], p, codebook, float(alphas[i]), float(sigmas[i])) for i in range(6)]
    )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_denoiser_is_the_conditional_mean_monte_carlo():
    """E[(c - D(x)) g(x)] = 0 for test functions g; the prior mean (a wrong denoiser) fails it."""
    codebook, p = _problem(V=5, d=2, zero=1)
    alpha, sigma = 0.6, 0.7
    n = 200_000
    g = torch.Generator().manual_seed(3)
    j = torch.multinomial(p, n, replacement=True, generator=g)
    c = codebook[j]
    x = alpha * c + sigma * torch.randn(n, 2, generator=g, dtype=F64)
    d = dirac.denoiser(x, dirac.safe_log(p).expand(n, -1), codebook, alpha, sigma)
    tests = [torch.ones(n, dtype=F64), x[:, 0], x[:, 1], torch.tanh(x[:, 0] * x[:, 1])]
    for gx in tests:
        resid = (c - d) * gx[:, None]
        mean, se = resid.mean(0), resid.std(0) / math.sqrt(n)
        assert (mean.abs() < 5 * se + 1e-12).all(), (mean, se)
    wrong = (p @ codebook).expand(n, -1)
    resid = (c - wrong) * x[:, :1]
    mean, se = resid.mean(0), resid.std(0) / math.sqrt(n)
    assert (mean.abs() > 5 * se).any()


def test_dd1_velocity_is_conditional_expectation_of_c_minus_eps():
    """x = t c + (1-t) eps  =>  v = E[c - eps | x]; computed here from Bayes weights directly."""
    codebook, p = _problem()
    x = _randn(4, 3, seed=4)
    for t in (0.05, 0.5, 0.9):
        want = torch.zeros_like(x)
        den = torch.zeros(4, dtype=F64)
        for j in range(codebook.shape[0]):
            w = p[j] * torch.exp(-((x - t * codebook[j]) ** 2).sum(-1) / (2 * (1 - t) ** 2))
            eps = (x - t * codebook[j]) / (1 - t)
            want += w[:, None] * (codebook[j] - eps)
            den += w
        want = want / den[:, None]
        got = dirac.dd1_velocity(x, dirac.safe_log(p), codebook, t)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_dd2_velocity_score_relation():
    """DD2 (RectFlow, alpha = 1 - t, sigma = t): v = (-sigma s - x) / alpha and v = E[eps - c | x]."""
    codebook, p = _problem()
    x = _randn(4, 3, seed=5)
    for t in (0.1, 0.5, 0.95):
        s = dirac.dd2_score(x, dirac.safe_log(p), codebook, t)
        v = dirac.dd2_velocity(x, dirac.safe_log(p), codebook, t)
        torch.testing.assert_close(v, (-t * s - x) / (1 - t), rtol=1e-9, atol=1e-10)
        dn = _bayes_denoiser(x, p, codebook, 1 - t, t)
        eps = (x - (1 - t) * dn) / t  # E[eps | x] from x = (1-t) c + t eps
        torch.testing.assert_close(v, eps - dn, rtol=1e-9, atol=1e-10)


def test_zero_probability_entries_get_exactly_zero_weight():
    codebook, p = _problem(V=6, d=3, zero=2)
    # put x exactly on a zero-probability atom with tiny noise level: it must still get weight 0
    x = torch.stack([codebook[0], codebook[1], 1e3 * codebook[0]])
    w = dirac.posterior_weights(x, dirac.safe_log(p).expand(3, -1), codebook, 1.0, 1e-3)
    assert torch.isfinite(w).all()
    assert (w[:, :2] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=F64))
    assert dirac.safe_log(torch.tensor([0.0, 1.0])).tolist() == [float("-inf"), 0.0]

"""DD2's analytic conditional score and the per-token ODE, against known answers: autograd of the
noised mixture's log density, the velocity identity, the toy teacher's exact distribution."""

from __future__ import annotations

import pytest
import torch
from dd1_toy import MarkovTeacher, chi2_pvalue

from ddcore import dirac
from ddcore.methods.dd2.head import HeadConfig, VelocityHead
from ddcore.methods.dd2.losses import dsm_loss, gts_loss, noisy_batch
from ddcore.methods.dd2.ode import AnalyticODEChooser, euler_solve, nearest_code
from ddcore.methods.dd2.score import conditional_score, conditional_velocity, noised, teacher_velocity
from ddcore.params import SamplingParams


def log_density(x: torch.Tensor, p: torch.Tensor, codebook: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log sum_j p_j N(x; (1 - t) c_j, t^2 I), summed over the batch (fp64, for autograd)."""
    d = x.shape[-1]
    diff = x[..., None, :] - (1 - t)[..., None, None] * codebook
    log_n = (
        -(diff**2).sum(-1) / (2 * t[..., None] ** 2)
        - d * torch.log(t[..., None])
        - 0.5 * d * torch.log(torch.tensor(2 * torch.pi, dtype=x.dtype))
    )
    return torch.logsumexp(dirac.safe_log(p) + log_n, dim=-1).sum()


def test_score_is_the_gradient_of_the_log_density_and_matches_the_velocity():
    g = torch.Generator().manual_seed(0)
    V, d = 7, 3
    codebook = torch.randn(V, d, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(4, 5, V, generator=g, dtype=torch.float64), -1)
    p[0, 0, :3] = 0.0  # zero-probability codes get zero weight, never NaN
    p = p / p.sum(-1, keepdim=True)
    t = torch.rand(4, 5, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x = torch.randn(4, 5, d, generator=g, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(log_density(x, p, codebook, t), x)
    s = conditional_score(p, x.detach(), t, codebook)
    torch.testing.assert_close(s, grad, rtol=1e-9, atol=1e-9)
    v = conditional_velocity(p, x.detach(), t, codebook)
    torch.testing.assert_close(v, dirac.dd2_velocity(x.detach(), dirac.safe_log(p), codebook, t))
    # DD2 App. E.1: v = (-sigma s - x) / alpha with alpha = 1 - t, sigma = t
    torch.testing.assert_close(v, (-t[..., None] * s - x.detach()) / (1 - t[..., None]), rtol=1e-9, atol=1e-9)


def test_teacher_velocity_uses_each_positions_own_distribution():
    teacher = MarkovTeacher(seq_len=6, vocab=8, dim=4)
    params = SamplingParams(cfg_scale=2.0, top_k=5)
    labels = torch.tensor([0, 2])
    tokens = teacher.sample(labels, [1, 2], params)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 6, 4, generator=g), torch.rand(2, 6, generator=g) * 0.9 + 0.05
    v = teacher_velocity(teacher, tokens, labels, params, x, t)
    probs = teacher.teacher_forced_probs(tokens, labels, params)
    for i in (0, 3, 5):
        want = conditional_velocity(probs[:, i], x[:, i], t[:, i], teacher.codebook)
        torch.testing.assert_close(v[:, i], want)


def test_euler_ends_on_the_denoiser_and_snaps():
    codebook = torch.eye(3, dtype=torch.float64)
    p = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)  # a single code: the flow must land on it
    eps = torch.randn(1, 3, dtype=torch.float64)
    x0 = euler_solve(lambda x, t: conditional_velocity(p, x, t, codebook), eps, steps=4)
    torch.testing.assert_close(x0, codebook[1:2])
    assert nearest_code(x0, codebook).tolist() == [1]


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(cfg_scale=2.0, top_k=5)], ids=["plain", "guided"]
)
def test_the_analytic_ode_reproduces_the_teachers_distribution(params):
    """AR over positions, each token solved from its noise by the ODE of the analytic score: the
    joint of (q_0, q_1) and the last marginal match the exact Markov distribution (chi-square)."""
    teacher = MarkovTeacher(seq_len=4, vocab=6, dim=4, num_classes=2, seed=3)
    n, label = 3000, 1
    labels = torch.full((n,), label)
    tokens = teacher.sample(
        labels, list(range(n)), params, chooser=AnalyticODEChooser(teacher.codebook, steps=32)
    )
    V = teacher.vocab_size
    pair = torch.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V)
    assert chi2_pvalue(pair, teacher.exact_pair(label, 1, params).reshape(-1)) > 1e-3
    last = torch.bincount(tokens[:, -1], minlength=V)
    assert chi2_pvalue(last, teacher.exact_marginals(label, params)[-1]) > 1e-3


def test_head_starts_at_zero_and_learns_the_gts_target():
    """The velocity head starts at v = 0 (zero-initialised output), and trained with GTS on a fixed
    distribution its loss falls well below where it started; DSM's target has the GTS target as its mean."""
    torch.manual_seed(0)
    V, d = 5, 2
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(V, d, generator=g)
    probs = torch.softmax(torch.randn(1, 1, V, generator=g), -1)
    head = VelocityHead(HeadConfig(token_dim=d, feature_dim=4, width=64, depth=2))
    z = torch.zeros(64, 1, 4)
    assert head(torch.randn(64, 1, d), torch.rand(64, 1), z).abs().max() == 0
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        q = codebook[torch.multinomial(probs[0, 0], 64, replacement=True, generator=g)][:, None]
        q_rep, eps, t, x_t = noisy_batch(q, 2, g)
        loss = gts_loss(head(x_t, t, z.repeat(2, 1, 1)), x_t, t, probs.expand(q_rep.shape[0], 1, V), codebook)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:10]) / 10
    # DSM: E[eps - q | x_t] is the analytic velocity, so the two targets agree on average
    q = codebook[torch.multinomial(probs[0, 0], 20000, replacement=True, generator=g)][:, None]
    eps, t = torch.randn(q.shape, generator=g), torch.full((20000, 1), 0.5)
    x_t = noised(q, eps, t)
    v = conditional_velocity(probs.expand(20000, 1, V), x_t, t, codebook)
    assert dsm_loss(v, q, eps) < dsm_loss(torch.zeros_like(v), q, eps)

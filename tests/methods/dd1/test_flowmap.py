"""The DD1 flow map: it is a deterministic map from Gaussian noise to tokens that reproduces p.

Statistical tests use fixed seeds (so they are deterministic) and are paired with a power check:
the same test on the same samples rejects a slightly wrong distribution, so they can fail.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dd1_toy import MarkovTeacher, chi2_pvalue

from ddcore import dirac
from ddcore.methods.dd1 import flowmap
from ddcore.methods.dd1.flowmap import FlowChooser, FlowSolver
from ddcore.params import FlowParams, SamplingParams
from ddcore.sampling import MultinomialChooser

V, D = 32, 8


def _codebook(seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(V, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _probs(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(V, generator=g)
    if kind == "peaked":
        return torch.softmax(3.0 * z, -1)
    if kind == "near-uniform":
        return torch.softmax(0.1 * z, -1)
    if kind == "top-k":
        logits = z.clone()
        logits[torch.argsort(z, descending=True)[5:]] = float("-inf")
        return torch.softmax(logits, -1)
    raise ValueError(kind)


def _noise(n: int, seed: int = 2, d: int = D) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _perturbed(p: torch.Tensor, amount: float = 0.04) -> torch.Tensor:
    """Move `amount` (at most half of the top token's mass) from the most to the least likely
    supported token."""
    q = p.clone().double()
    hi = int(q.argmax())
    amount = min(amount, 0.5 * float(q[hi]))
    lo = int(torch.where(q > 0, q, torch.full_like(q, 2.0)).argmin())
    q[hi] -= amount
    q[lo] += amount
    return q


@pytest.mark.parametrize("kind", ["peaked", "near-uniform", "top-k"])
def test_flow_reproduces_p_chi_square(kind):
    cb, p = _codebook(), _probs(kind)
    n = 3000
    tok = FlowSolver().tokens(_noise(n), p.expand(n, V), cb)
    counts = torch.bincount(tok, minlength=V)
    assert chi2_pvalue(counts, p) > 1e-3
    assert chi2_pvalue(counts, _perturbed(p)) < 1e-6  # the test has power against a small error


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flow_is_deterministic_and_batch_size_stable(dtype):
    cb = _codebook()
    n = 120
    probs = torch.softmax(2.0 * torch.randn(n, V, generator=torch.Generator().manual_seed(3)), -1)
    noise = _noise(n)
    solver = FlowSolver(steps=32, dtype=dtype)
    full = solver.tokens(noise, probs, cb)
    assert torch.equal(full, solver.tokens(noise, probs, cb))
    parts = torch.cat([solver.tokens(noise[i : i + 17], probs[i : i + 17], cb) for i in range(0, n, 17)])
    assert torch.equal(full, parts)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    assert torch.equal(full[perm], solver.tokens(noise[perm], probs[perm], cb))
    # extra leading dims (B, n, d) as the teacher's generate loop passes them
    assert torch.equal(full.view(4, 30), solver.tokens(noise.view(4, 30, D), probs.view(4, 30, V), cb))


def test_cpu_chunked_solve_gives_the_same_tokens(monkeypatch):
    """Large CPU solves run in cache-sized row chunks; the chunking must not change any token."""
    cb = _codebook()
    n = 300
    probs = torch.softmax(2.0 * torch.randn(n, V, generator=torch.Generator().manual_seed(5)), -1)
    noise = _noise(n)
    solver = FlowSolver(steps=32)
    whole = solver.tokens(noise, probs, cb)  # n * V is below the default chunk: one solve
    assert n * V <= flowmap.CPU_CHUNK_ELEMENTS
    calls = []
    integrate = FlowSolver.integrate
    monkeypatch.setattr(flowmap, "CPU_CHUNK_ELEMENTS", 7 * V)  # 7-row chunks, the last one short
    monkeypatch.setattr(FlowSolver, "integrate", lambda self, *a: calls.append(1) or integrate(self, *a))
    chunked = solver.tokens(noise.view(3, 100, D), probs.view(3, 100, V), cb)
    assert len(calls) == -(-n // 7) and chunked.shape == (3, 100)
    assert torch.equal(chunked.flatten(), whole)


def test_zero_probability_entries_never_win():
    cb, p = _codebook(), _probs("top-k")
    excluded = torch.nonzero(p == 0).squeeze(1)
    # noise aimed straight at excluded atoms, plus plain noise
    aimed = torch.cat([s * cb[excluded] for s in (1.0, 3.0, 10.0)])
    noise = torch.cat([aimed, _noise(2000)])
    tok = FlowSolver().tokens(noise, p.expand(noise.shape[0], V), cb)
    assert (p[tok] > 0).all()
    for solver in ("euler", "heun"):
        tok = FlowSolver(steps=4, solver=solver).tokens(noise, p.expand(noise.shape[0], V), cb)
        assert (p[tok] > 0).all()


def test_flow_map_is_the_dd1_t_space_ode():
    """Integrating DD1's dx/dt = (D - x)/(1 - t) in t (RK4, fine grid) lands on the same state:
    y(r) = x(t) / (1 - t) with r = t / (1 - t)."""
    cb = _codebook()
    n = 64
    probs = torch.softmax(2.0 * torch.randn(n, V, generator=torch.Generator().manual_seed(5)), -1).double()
    noise = _noise(n).double()
    r_end = 4.0
    t_end = r_end / (1 + r_end)
    y = FlowSolver(steps=1000, r_min=1e-3, r_max=r_end).integrate(noise, probs, cb)
    log_p = dirac.safe_log(probs)
    cbd = cb.double()
    x = noise.clone()
    steps = 150  # RK4 in t is converged here (250 and 1000 steps agree to 1e-8)
    h = t_end / steps
    for i in range(steps):
        t = i * h

        def v(xx, tt):
            return dirac.dd1_velocity(xx, log_p, cbd, tt)

        k1 = v(x, t)
        k2 = v(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = v(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = v(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    # Heun with 1000 steps is within ~6e-5 of its own 2000-step result at this r
    torch.testing.assert_close(y, x / (1 - t_end), rtol=2e-4, atol=2e-4)


def test_solver_converges_to_reference():
    """More steps -> closer to a 512-step reference; the default agrees on >= 99% of draws
    (the 1024-step table is in docs/dd1.md)."""
    cb = _codebook()
    n = 600
    probs = torch.softmax(2.0 * torch.randn(n, V, generator=torch.Generator().manual_seed(6)), -1)
    noise = _noise(n)
    ref = FlowSolver(steps=512).tokens(noise, probs, cb)
    agree = {
        s: (FlowSolver(steps=s).tokens(noise, probs, cb) == ref).float().mean().item() for s in (4, 16, 64)
    }
    assert agree[4] < agree[16] <= agree[64]
    assert agree[64] >= 0.99
    assert FlowSolver.from_params(FlowParams()).steps == FlowParams().steps


# ---------------------------------------------------------------------------------------------
# (d) the flow chooser inside a teacher's AR loop samples the same distribution as multinomial
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(cfg_scale=2.0, top_k=4)])
def test_flow_chooser_matches_multinomial_in_ar_teacher(params):
    teacher = MarkovTeacher(seq_len=5, vocab=8, dim=4, num_classes=2, seed=0)
    n, label = 3000, 1
    labels = torch.full((n,), label)
    noise = teacher.noise(range(10_000, 10_000 + n))
    flow = teacher.generate(labels, params, noise, chooser=FlowChooser(teacher.codebook))
    multi = teacher.generate(labels, params, noise, chooser=MultinomialChooser())
    exact = teacher.exact_marginals(label, params)
    Vt = teacher.vocab_size
    pvals = {"flow": [], "multinomial": []}
    for name, tok in (("flow", flow), ("multinomial", multi)):
        for pos in range(teacher.seq_len):
            pvals[name].append(chi2_pvalue(torch.bincount(tok[:, pos], minlength=Vt), exact[pos]))
        # the conditional structure: joint of (q_{i-1}, q_i) at the last position
        pos = teacher.seq_len - 1
        pair = torch.bincount(tok[:, pos - 1] * Vt + tok[:, pos], minlength=Vt * Vt)
        pvals[name].append(chi2_pvalue(pair, teacher.exact_pair(label, pos, params).reshape(-1)))
    # Bonferroni over the 6 tests per chooser
    for name, ps in pvals.items():
        assert min(ps) > 1e-3 / len(ps), (name, ps)
    # power: the flow samples reject the marginal of the *other* class at the first position
    other = teacher.exact_marginals(0, params)[0]
    assert chi2_pvalue(torch.bincount(flow[:, 0], minlength=Vt), other) < 1e-6
    # same noise, different draw rules: the samples are not simply identical
    assert not torch.equal(flow, multi)
    assert math.isfinite(pvals["flow"][0])


def test_measurement_tool():
    from ddcore.methods.dd1.measure import flow_agreement_table, teacher_token_distributions

    teacher = MarkovTeacher(seq_len=5, vocab=8, dim=4)
    probs = teacher_token_distributions(teacher, SamplingParams(), n=40, batch=4)
    assert probs.shape == (40, 8)
    torch.testing.assert_close(probs.sum(-1), torch.ones(40))
    noise = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    rows = flow_agreement_table(
        probs.double(),
        teacher.codebook,
        noise,
        [FlowSolver(steps=32), FlowSolver(steps=1)],
        FlowSolver(steps=32),
    )
    assert rows[0]["agreement"] == 1.0 and rows[0]["nfe"] == 64
    assert rows[1]["agreement"] < 1.0

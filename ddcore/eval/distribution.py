"""Token-level distances between a sampler and the teacher it imitates.

Image metrics see the decoded picture; these see the token sequences, where DD's claim lives:
a perfect student draws sequences the teacher itself would draw. Two views:

* teacher NLL: the teacher's own per-token negative log-likelihood of a sampler's sequences,
  with each position's distribution taken given the sequence's own prefix (teacher forcing).
  On the teacher's own samples this estimates the teacher's entropy rate; a student whose
  sequences the teacher finds unlikely scores higher.
* per-position marginals: for each position, the distribution of the token over samples;
  the mean total variation between two samplers' marginals.

Top-k/top-p give probability 0 to most of the vocabulary, so a student token outside the
teacher's support has infinite NLL under the sampling distribution. We therefore report (see
docs/evaluation.md): the NLL under the sampling distribution over in-support tokens only, the
fraction of tokens outside the support, and the NLL under the unfiltered distribution (the same
guidance and temperature, no top-k/top-p), which is finite for every token and is the number to
compare samplers on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ddcore.params import SamplingParams

UNDERFLOW_NLL = -math.log(torch.finfo(torch.float32).tiny)  # 87.3 nats: the most fp32 probs can express


def unfiltered(params: SamplingParams) -> SamplingParams:
    """The same guidance and temperature without top-k/top-p truncation."""
    return params.model_copy(update={"top_k": 0, "top_p": 1.0})


def is_filtered(params: SamplingParams) -> bool:
    return params.top_k > 0 or params.top_p < 1.0


@dataclass
class NLLResult:
    """Per-sequence values (each a mean over that sequence's tokens), in nats/token."""

    nll: Tensor  # under the sampling distribution, over in-support tokens (NaN if none)
    outside: Tensor  # fraction of tokens with probability 0 under the sampling distribution
    nll_unfiltered: Tensor  # under the cfg-only distribution, over all tokens

    def summary(self) -> dict[str, float]:
        def ms(x: Tensor) -> tuple[float, float]:
            x = x[~torch.isnan(x)].double()
            if x.numel() == 0:
                return float("nan"), float("nan")
            return x.mean().item(), (x.std(unbiased=False).item() if x.numel() > 1 else 0.0)

        nll, nll_std = ms(self.nll)
        nll_u, nll_u_std = ms(self.nll_unfiltered)
        return {
            "teacher_nll": nll,
            "teacher_nll_std": nll_std,
            "teacher_support_miss": self.outside.double().mean().item(),
            "teacher_nll_unfiltered": nll_u,
            "teacher_nll_unfiltered_std": nll_u_std,
        }


def token_nll(probs: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token NLL and an in-support mask, from probs (B, L, V) and tokens (B, L)."""
    p = probs.gather(-1, tokens.unsqueeze(-1).to(probs.device)).squeeze(-1).double()
    inside = p > 0
    return torch.where(inside, -torch.log(p.clamp_min(1e-300)), torch.full_like(p, float("inf"))), inside


@torch.no_grad()
def teacher_nll(
    teacher, tokens: Tensor, labels: Tensor, params: SamplingParams, batch_size: int = 16
) -> NLLResult:
    """The teacher's per-token NLL of each sequence, under its sampling and unfiltered distributions.

    Batched because teacher_forced_probs returns (B, seq_len, V): 16 x 256 x 16384 floats is
    already 268 MB for LlamaGen.
    """
    if tokens.ndim != 2 or tokens.shape[1] != teacher.seq_len:
        raise ValueError(f"tokens must be (N, {teacher.seq_len}), got {tuple(tokens.shape)}")
    if tokens.min() < 0 or tokens.max() >= teacher.vocab_size:
        raise ValueError(
            f"token indices must lie in [0, {teacher.vocab_size}); got {tokens.min()}..{tokens.max()}"
        )
    p_free = unfiltered(params)
    filtered = is_filtered(params)
    nll, outside, nll_u = [], [], []
    for i in range(0, tokens.shape[0], batch_size):
        tok = tokens[i : i + batch_size].to(teacher.device)
        lab = labels[i : i + batch_size].to(teacher.device)
        per_tok, inside = token_nll(teacher.teacher_forced_probs(tok, lab, params), tok)
        if filtered:
            per_tok_u, inside_u = token_nll(teacher.teacher_forced_probs(tok, lab, p_free), tok)
        else:
            per_tok_u, inside_u = per_tok, inside
        n_in = inside.sum(dim=1)
        in_sum = torch.where(inside, per_tok, torch.zeros_like(per_tok)).sum(dim=1)
        nll.append(
            torch.where(n_in > 0, in_sum / n_in.clamp_min(1), torch.full_like(in_sum, float("nan"))).cpu()
        )
        outside.append((~inside).double().mean(dim=1).cpu())
        # a softmax of finite logits is positive unless it underflows fp32; cap such tokens there
        nll_u.append(
            torch.where(inside_u, per_tok_u, torch.full_like(per_tok_u, UNDERFLOW_NLL)).mean(dim=1).cpu()
        )
    return NLLResult(torch.cat(nll), torch.cat(outside), torch.cat(nll_u))


def token_marginals(tokens: Tensor, vocab_size: int) -> Tensor:
    """(L, V) float64: for each position, the empirical distribution of its token over the N samples."""
    n, length = tokens.shape
    flat = (torch.arange(length).unsqueeze(0) * vocab_size + tokens.cpu().long()).reshape(-1)
    counts = torch.bincount(flat, minlength=length * vocab_size).double()
    return counts.view(length, vocab_size) / n


def marginal_tv(tokens_a: Tensor, tokens_b: Tensor, vocab_size: int) -> float:
    """Mean over positions of the total variation 0.5 * sum_v |p_a(v) - p_b(v)| between marginals.

    An empirical TV is biased upwards by sampling noise (two finite samples of one distribution
    differ), so it is only comparable between sample sets of the same size; the evaluation
    reports a teacher-vs-teacher value of the same size as the noise floor.
    """
    if tokens_a.shape[1] != tokens_b.shape[1]:
        raise ValueError(f"sequence lengths differ: {tokens_a.shape[1]} vs {tokens_b.shape[1]}")
    pa, pb = token_marginals(tokens_a, vocab_size), token_marginals(tokens_b, vocab_size)
    return (0.5 * (pa - pb).abs().sum(dim=1)).mean().item()

"""Known answers for teacher NLL and per-position marginal distances."""

from __future__ import annotations

import math

import pytest
import torch

from ddcore.eval.distribution import (
    UNDERFLOW_NLL,
    marginal_tv,
    teacher_nll,
    token_marginals,
    unfiltered,
)
from ddcore.params import SamplingParams
from ddcore.sampling import logits_to_probs


class TableTeacher:
    """Prefix-independent teacher: position i has fixed logits table[i]; the NLL code under test
    only needs seq_len, vocab_size, device and teacher_forced_probs."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.seq_len, self.vocab_size = table.shape
        self.device = torch.device("cpu")
        self.calls = 0

    def teacher_forced_probs(self, tokens, labels, params: SamplingParams):
        self.calls += 1
        p = logits_to_probs(self.table, params.temperature, params.top_k, params.top_p)
        return p.unsqueeze(0).expand(tokens.shape[0], -1, -1)


def test_nll_known_answer_with_top_k_support_miss():
    table = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]))
    teacher = TableTeacher(table)
    params = SamplingParams(top_k=2)
    # seq 0: both tokens inside the top-2; seq 1: its second token (index 2, p=0.1) is filtered out
    tokens = torch.tensor([[0, 1], [1, 2]])
    res = teacher_nll(teacher, tokens, torch.zeros(2, dtype=torch.long), params)
    topk = [[0.5 / 0.8, 0.3 / 0.8], [0.6 / 0.9, 0.3 / 0.9]]
    expected0 = -(math.log(topk[0][0]) + math.log(topk[1][1])) / 2
    expected1 = -math.log(topk[0][1])  # only its in-support token counts
    torch.testing.assert_close(res.nll, torch.tensor([expected0, expected1], dtype=torch.float64))
    torch.testing.assert_close(res.outside, torch.tensor([0.0, 0.5], dtype=torch.float64))
    free = [
        -(math.log(0.5) + math.log(0.3)) / 2,
        -(math.log(0.3) + math.log(0.1)) / 2,
    ]
    torch.testing.assert_close(
        res.nll_unfiltered, torch.tensor(free, dtype=torch.float64), rtol=1e-6, atol=1e-6
    )
    s = res.summary()
    assert s["teacher_support_miss"] == pytest.approx(0.25)
    assert s["teacher_nll"] == pytest.approx((expected0 + expected1) / 2)
    assert s["teacher_nll_std"] == pytest.approx(abs(expected0 - expected1) / 2)


def test_unfiltered_keeps_guidance_and_temperature_and_skips_second_pass():
    p = SamplingParams(cfg_scale=2.0, temperature=0.9, top_k=10, top_p=0.9)
    u = unfiltered(p)
    assert (u.cfg_scale, u.temperature, u.top_k, u.top_p) == (2.0, 0.9, 0, 1.0)
    teacher = TableTeacher(torch.zeros(3, 4))
    teacher_nll(
        teacher, torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, dtype=torch.long), SamplingParams()
    )
    assert teacher.calls == 1  # unfiltered == sampling distribution: one pass per batch


def test_nll_of_teachers_own_samples_estimates_its_entropy():
    torch.manual_seed(0)
    table = torch.randn(6, 20) * 2
    teacher = TableTeacher(table)
    probs = torch.softmax(table, dim=-1)
    n = 4000
    tokens = torch.stack([torch.multinomial(probs[i], n, replacement=True) for i in range(6)], dim=1)
    res = teacher_nll(teacher, tokens, torch.zeros(n, dtype=torch.long), SamplingParams(), batch_size=1000)
    entropy = -(probs * probs.log()).sum(dim=1).mean().item()
    assert res.summary()["teacher_nll"] == pytest.approx(entropy, abs=0.03)
    assert res.summary()["teacher_support_miss"] == 0.0


def test_unfiltered_nll_is_capped_where_fp32_underflows():
    table = torch.tensor([[0.0, -200.0]])  # p(token 1) underflows to exactly 0 in fp32
    res = teacher_nll(
        TableTeacher(table), torch.tensor([[1]]), torch.zeros(1, dtype=torch.long), SamplingParams()
    )
    assert res.nll_unfiltered.item() == pytest.approx(UNDERFLOW_NLL)
    assert res.outside.item() == 1.0 and math.isnan(res.nll.item())


def test_nll_rejects_bad_tokens():
    teacher = TableTeacher(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        teacher_nll(teacher, torch.tensor([[0, 3]]), torch.zeros(1, dtype=torch.long), SamplingParams())
    with pytest.raises(ValueError):
        teacher_nll(teacher, torch.tensor([[0, 1, 2]]), torch.zeros(1, dtype=torch.long), SamplingParams())


def test_real_llamagen_teacher_own_samples_never_leave_its_top_k_support():
    from llamagen_helpers import three_class_teacher

    teacher = three_class_teacher()
    params = SamplingParams(cfg_scale=2.0, top_k=4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    tokens = teacher.sample(labels, list(range(100, 106)), params)
    res = teacher_nll(teacher, tokens, labels, params, batch_size=4).summary()
    assert res["teacher_support_miss"] == 0.0
    assert 0.0 < res["teacher_nll"] <= math.log(4) + 1e-6  # at most uniform over the top-4
    assert res["teacher_nll_unfiltered"] > res["teacher_nll"]  # renormalised top-k mass is larger
    # a uniformly random token sequence leaves the top-4 of 32 most of the time
    rand = torch.randint(0, 32, (6, 16), generator=torch.Generator().manual_seed(1))
    miss = teacher_nll(teacher, rand, labels, params).summary()["teacher_support_miss"]
    assert miss > 0.6


def test_token_marginals_and_tv_known_answers():
    a = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 2]])
    m = token_marginals(a, vocab_size=3)
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype=torch.float64))
    assert marginal_tv(a, a, 3) == 0.0
    b = torch.tensor([[2, 0], [2, 0], [2, 0], [2, 0]])
    assert marginal_tv(a, b, 3) == 1.0  # disjoint supports at every position
    c = torch.tensor([[0, 1], [1, 1], [0, 1], [1, 1]])
    # position 0: {0:1} vs {0:.5,1:.5} -> 0.5; position 1: {1:.5,2:.5} vs {1:1} -> 0.5
    assert marginal_tv(a, c, 3) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        marginal_tv(a, a[:, :1], 3)

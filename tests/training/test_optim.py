"""The student's optimizer: Muon takes exactly the transformer blocks' matrices (both families),
AdamW the rest; a first Muon step is an orthogonalised update at AdamW's RMS."""

from __future__ import annotations

import math

import pytest
import torch
from dd1_toy import small_llamagen_teacher, small_train_params
from var_helpers import small_var, small_vqvae

from ddcore.methods.dd1.student import DD1Student
from ddcore.methods.dd1.var_student import DD1VARStudent
from ddcore.params import ParamsError, TrainParams, load_preset
from ddcore.training.optim import (
    NS_COEFFICIENTS,
    MuonWithAdamW,
    StackedMuon,
    block_matrices,
    build_optimizer,
    orthogonalise,
)


def _llamagen() -> torch.nn.Module:
    t = small_llamagen_teacher(0)
    return DD1Student.from_teacher(t.gpt, t.codebook, extra_layers=1)


def _var() -> torch.nn.Module:
    return DD1VARStudent.from_teacher(small_var(), small_vqvae().codebook.detach())


@pytest.mark.parametrize("make", [_llamagen, _var], ids=["llamagen", "var"])
def test_muon_takes_the_block_matrices_and_adamw_everything_else(make):
    model = make()
    opt = build_optimizer(model, small_train_params(optimizer="muon"))
    assert isinstance(opt, MuonWithAdamW)
    muon = [p for g in opt.muon.param_groups for p in g["params"]]
    adamw = [p for g in opt.adamw.param_groups for p in g["params"]]
    in_blocks = {id(p) for p in model.transformer_blocks.parameters()}
    assert {id(p) for p in muon} == {id(p) for p in block_matrices(model)}
    assert muon and all(p.ndim == 2 and id(p) in in_blocks for p in muon)
    # every trainable parameter is stepped by exactly one of the two
    ids = [id(p) for p in muon + adamw]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    # the embeddings, norms and heads stay with AdamW
    assert all(id(p) not in in_blocks or p.ndim != 2 for p in adamw)
    assert len(opt.param_groups) == 2


def test_first_muon_step_is_orthogonalised_at_adamw_rms():
    model = _llamagen()
    tp = small_train_params(optimizer="muon", lr=1e-3)
    opt = build_optimizer(model, tp)
    w = model.transformer_blocks[0].feed_forward.w1.weight
    emb = model.tok_embeddings.weight
    before_w, before_e = w.detach().clone(), emb.detach().clone()
    torch.manual_seed(0)
    w.grad = torch.randn_like(w)
    emb.grad = torch.randn_like(emb)
    opt.step()
    # Muon: the update's singular values are all about lr * 0.2 * sqrt(max(A, B)) (Newton-Schulz
    # leaves them in roughly [0.7, 1.2] of that); a plain gradient step would spread them widely
    sv = torch.linalg.svdvals(before_w - w.detach())
    scale = tp.lr * 0.2 * math.sqrt(max(w.shape))
    assert 0.5 * scale < sv.min() and sv.max() < 1.5 * scale
    # AdamW's first step moves each entry by lr (sign of the gradient)
    torch.testing.assert_close(
        (before_e - emb.detach()).abs(), torch.full_like(emb, tp.lr), rtol=1e-3, atol=0
    )


def test_optimizer_state_round_trips_and_refuses_an_adamw_state():
    model = _llamagen()
    opt = build_optimizer(model, small_train_params(optimizer="muon"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    twin = build_optimizer(model, small_train_params(optimizer="muon"))
    twin.load_state_dict(opt.state_dict())
    w = model.transformer_blocks[0].attention.wqkv.weight
    torch.testing.assert_close(twin.muon.state[w]["momentum_buffer"], opt.muon.state[w]["momentum_buffer"])
    adamw_state = build_optimizer(model, small_train_params()).state_dict()
    with pytest.raises(ValueError, match="Muon \\+ AdamW"):
        twin.load_state_dict(adamw_state)


def test_unknown_optimizer_names_the_key_and_the_allowed_values():
    with pytest.raises(ParamsError, match=r"presets\.micro\.dd1\.train\.optimizer: .*'adamw' or 'muon'"):
        load_preset("micro", overrides={"dd1": {"train": {"optimizer": "sgd"}}})
    assert TrainParams().optimizer == "adamw"  # the released recipe's optimizer stays the default


def _stacked_model_params(seed: int) -> list[torch.nn.Parameter]:
    """Matrices in the shapes a block holds, several of each (plus a tall one), as the student has."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(96, 32), (32, 32), (88, 32), (88, 32), (32, 88)] * 3 + [(40, 24)]
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.05) for s in shapes]


def _run(opt_cls: type, params: list[torch.nn.Parameter], steps: int) -> torch.optim.Optimizer:
    opt = opt_cls(params, lr=2e-2, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


@pytest.mark.skipif(
    not hasattr(torch.optim, "Muon"), reason="torch < 2.9 has no torch.optim.Muon to compare with"
)
def test_stacked_muon_takes_torch_muons_steps():
    """Batching the Newton-Schulz iterations per shape is the same algorithm: after 5 steps the weights
    agree with torch's per-matrix Muon to bf16 rounding (the steps themselves move them ~100x more),
    and each optimizer resumes from the other's state."""
    ours, ref, start = _stacked_model_params(0), _stacked_model_params(0), _stacked_model_params(0)
    ours_opt = _run(StackedMuon, ours, 5)
    ref_opt = _run(torch.optim.Muon, ref, 5)
    for a, b, s in zip(ours, ref, start, strict=True):
        moved = (b - s).abs().max().item()
        assert moved > 1e-2
        assert (a - b).abs().max().item() < 1e-2 * moved
    # the state layout is torch's: a momentum buffer per parameter, loadable both ways
    twin = torch.optim.Muon(ours, lr=2e-2, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    twin.load_state_dict(ours_opt.state_dict())
    back = StackedMuon(ref, lr=2e-2, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    back.load_state_dict(ref_opt.state_dict())
    torch.testing.assert_close(
        back.state[ref[0]]["momentum_buffer"], ref_opt.state[ref[0]]["momentum_buffer"]
    )


def test_stacked_muon_orthogonalises_each_matrix_of_a_stack_alone():
    """A stack's members do not mix: each comes out as the orthogonalisation of itself alone."""
    g = torch.Generator().manual_seed(2)
    stack = torch.randn(4, 24, 40, generator=g)
    stack[1] *= 100.0  # a much larger member must not change the others' normalisation
    together = orthogonalise(stack, NS_COEFFICIENTS, 5, 1e-7).float()
    for k in range(4):
        alone = orthogonalise(stack[k : k + 1], NS_COEFFICIENTS, 5, 1e-7).float()[0]
        torch.testing.assert_close(together[k], alone)
        sv = torch.linalg.svdvals(together[k])
        assert sv.min() > 0.5 and sv.max() < 1.5
    with pytest.raises(ValueError, match="2-D parameters only"):
        StackedMuon([torch.nn.Parameter(torch.zeros(3))])

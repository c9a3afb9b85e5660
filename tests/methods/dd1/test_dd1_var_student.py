"""The DD1 VAR student: released state-dict layout, initialisation from the teacher, the level
mask with its diagonal, the noise/data boundary and the read-outs."""

from __future__ import annotations

import pytest
import torch
from var_helpers import PATCH_NUMS, small_var, small_vqvae

from ddcore.checkpoints import CheckpointError
from ddcore.methods.dd1.student import layer_sources
from ddcore.methods.dd1.var_student import (
    DD1VARStudent,
    clone_var_student,
    load_var_student_checkpoint,
    student_mask,
)
from ddcore.models.var import VAR, var_config

SEQ = sum(p * p for p in PATCH_NUMS)  # 30
LEVEL = torch.cat([torch.full((p * p,), k) for k, p in enumerate(PATCH_NUMS)])  # scale of each position


def official_keys(cfg) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released DD1 VAR student (DD_Model) state dict, written out from the
    official model definition: the VAR keys with patch_nums (1, *patch_nums), plus the noise/data
    embeddings and the continuous final layer."""
    c, v, cv, seq1, s1 = cfg.embed_dim, cfg.vocab_size, cfg.Cvae, cfg.seq_len + 1, len(cfg.patch_nums) + 1
    hid = round(c * cfg.mlp_ratio)
    keys = {
        "word_embed.weight": (c, cv),
        "word_embed.bias": (c,),
        "class_emb.weight": (cfg.num_classes + 1, c),
        "pos_start": (1, 1, c),
        "pos_1LC": (1, seq1, c),
        "lvl_embed.weight": (s1, c),
        "lvl_1L": (1, seq1),
        "attn_bias_for_masking": (1, 1, seq1, seq1),
        "head_nm.ada_lin.1.weight": (2 * c, c),
        "head_nm.ada_lin.1.bias": (2 * c,),
        "head.weight": (v, c),
        "head.bias": (v,),
        "n_d_embed.weight": (2, c),
        "final_layer_conti.scale_shift_table": (2, c),
        "final_layer_conti.linear.weight": (cv, c),
        "final_layer_conti.linear.bias": (cv,),
    }
    for i in range(cfg.depth + 1):
        keys[f"layerwise_n_d_embed.{i}.weight"] = (c, c)
        keys[f"layerwise_n_d_embed.{i}.bias"] = (c,)
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        keys |= {
            p + "attn.scale_mul_1H11": (1, cfg.num_heads, 1, 1),
            p + "attn.q_bias": (c,),
            p + "attn.v_bias": (c,),
            p + "attn.zero_k_bias": (c,),
            p + "attn.mat_qkv.weight": (3 * c, c),
            p + "attn.proj.weight": (c, c),
            p + "attn.proj.bias": (c,),
            p + "ffn.fc1.weight": (hid, c),
            p + "ffn.fc1.bias": (hid,),
            p + "ffn.fc2.weight": (c, hid),
            p + "ffn.fc2.bias": (c,),
            p + "ada_lin.1.weight": (6 * c, c),
            p + "ada_lin.1.bias": (6 * c,),
        }
    return keys


def _student(seed: int = 0, std: float = 0.2) -> tuple[DD1VARStudent, VAR, torch.Tensor]:
    var = small_var(seed=seed + 1)
    cb = small_vqvae(seed=seed).codebook.detach()
    torch.manual_seed(seed + 100)
    s = DD1VARStudent.from_teacher(var, cb).eval()
    with torch.no_grad():  # non-trivial new parts, so that every path shows in the outputs
        for name, p in s.named_parameters():
            if "n_d_embed" in name or "final_layer_conti" in name:
                p.normal_(0.0, std)
    return s, var, cb


def _inputs(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, SEQ, 4, generator=g), torch.arange(b) % 4


@pytest.mark.parametrize("depth,millions", [(16, 327), (20, 635), (24, 1090)])
def test_official_layout_and_size_on_meta(depth, millions):
    cfg = var_config(f"var-d{depth}")
    with torch.device("meta"):
        s = DD1VARStudent(cfg, torch.empty(cfg.vocab_size, cfg.Cvae))
        teacher = VAR(cfg)
    got = {k: tuple(v.shape) for k, v in s.state_dict().items()}
    assert got == official_keys(cfg)
    c = cfg.embed_dim
    added = (cfg.depth + 1) * (c * c + c) + 2 * c + 2 * c + (2 * c + c * cfg.Cvae + cfg.Cvae)
    assert s.num_params() == sum(p.numel() for p in teacher.parameters()) + added
    # DD1 Table 1 quotes 327M / 635M / 1.09B (rounded)
    assert abs(s.num_params() / 1e6 - millions) / millions < 0.005
    if depth == 16:
        layerwise = sum(p.numel() for p in s.layerwise_n_d_embed.parameters())
        assert round(layerwise / 1e6, 1) == 17.8  # the reference's +17.8M for d16


def test_mask_levels_and_diagonal():
    m = student_mask(PATCH_NUMS)[0, 0]
    lvl = torch.cat([torch.zeros(1, dtype=torch.long), LEVEL + 1])  # sos is level 0
    visible = m == 0
    want = (lvl[:, None] > lvl[None, :]) | torch.eye(SEQ + 1, dtype=torch.bool)
    assert torch.equal(visible, want)
    assert visible[0].sum() == 1  # sos sees itself only
    assert visible[1, :2].all() and visible[3, :2].all() and not visible[3, 2]  # 2x2 scale: no scale-mates


@pytest.mark.parametrize("t", [0, 2])
def test_changing_a_token_changes_only_finer_levels_and_itself(t):
    s, _, _ = _student()
    x, labels = _inputs()
    with torch.no_grad():
        logits0, cont0 = s(x, labels, t)
        for j in (0, 1, 3, 7, 20, SEQ - 1):
            x2 = x.clone()
            x2[:, j] += 1.5
            logits1, cont1 = s(x2, labels, t)
            changed = ((logits1 - logits0).abs().amax((0, 2)) > 1e-6) | (
                (cont1 - cont0).abs().amax((0, 2)) > 1e-6
            )
            want = LEVEL[j] < LEVEL
            want[j] = True
            assert torch.equal(changed, want), (j, changed.nonzero().flatten().tolist())


def test_noise_boundary_and_time_signal():
    s, _, _ = _student()
    # data positions for t data scales: L - sum_{s >= t} pn_s^2
    want = [SEQ - sum(p * p for p in PATCH_NUMS[t:]) for t in range(len(PATCH_NUMS) + 1)]
    assert s.data_len(torch.arange(len(PATCH_NUMS) + 1)).tolist() == want == [0, 1, 5, 14, 30]
    with pytest.raises(ValueError, match="data scales"):
        s.data_len(len(PATCH_NUMS) + 1)
    x, labels = _inputs()
    with torch.no_grad():
        a, _ = s(x, labels, torch.tensor([0, 0, 0]))
        b, _ = s(x, labels, torch.tensor([0, 2, 0]))  # t is per row
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not torch.allclose(a[1], b[1])  # the flag is the only time signal, and it is seen
    noise = torch.randn_like(x)
    xt = s.perturb(x, noise, torch.tensor([0, 1, 3]))
    assert torch.equal(xt[0], noise[0])
    assert torch.equal(xt[1, :1], x[1, :1]) and torch.equal(xt[1, 1:], noise[1, 1:])
    assert torch.equal(xt[2, :14], x[2, :14]) and torch.equal(xt[2, 14:], noise[2, 14:])


def test_from_teacher_copies_weights_and_uses_teacher_head():
    s, var, cb = _student()
    for name in ("word_embed", "class_emb", "head_nm", "head", "blocks"):
        ssd, tsd = getattr(s, name).state_dict(), getattr(var, name).state_dict()
        assert ssd.keys() == tsd.keys()
        assert all(torch.equal(ssd[k], tsd[k]) for k in tsd), name
    assert torch.equal(s.pos_start, var.pos_start)
    for new, old in ((s.lvl_embed.weight, var.lvl_embed.weight), (s.pos_1LC[0], var.pos_1LC[0])):
        assert new.shape[0] == old.shape[0] + 1
        assert torch.equal(new[0], old[0]) and torch.equal(new[2:], old[1:])
        assert not torch.equal(new[1], old[1])  # the new 1x1 slot is its own row
    assert torch.equal(s.codebook, cb.float())
    x, labels = _inputs()
    with torch.no_grad():
        logits, cont = s(x, labels, 1)
        h, cond, _ = s.hidden(x, labels, 1)
        # the logits are the teacher's own head (head_nm + head) on the student's last state
        assert torch.allclose(logits, var.logits(h, cond)[:, 1:], atol=1e-6)
        assert torch.allclose(cont, s.final_layer_conti(h, cond[:, None])[:, 1:], atol=1e-6)
    assert logits.shape == (3, SEQ, var.cfg.vocab_size) and cont.shape == (3, SEQ, 4)
    assert logits.dtype == cont.dtype == torch.float32


def test_from_teacher_with_shared_adaln():
    var = small_var(shared_aln=True)
    s = DD1VARStudent.from_teacher(var, small_vqvae().codebook.detach())
    ssd, tsd = s.shared_ada_lin.state_dict(), var.shared_ada_lin.state_dict()
    assert ssd.keys() == tsd.keys() and all(torch.equal(ssd[k], tsd[k]) for k in tsd)
    x, labels = _inputs()
    with torch.no_grad():
        logits, _ = s(x, labels, 0)
    assert torch.isfinite(logits).all()


def test_final_predict_keeps_data_positions():
    s, _, cb = _student()
    x, labels = _inputs()
    idx = torch.randint(0, cb.shape[0], (3, SEQ))
    x = cb[idx].clone()
    t = torch.tensor([0, 2, 3])
    with torch.no_grad():
        logits, cont = s(x, labels, t)
        pcont, plogits = s.final_predict(x, labels, t)
    for row, n in enumerate([0, 5, 14]):
        assert torch.equal(pcont[row, :n], x[row, :n])
        assert torch.equal(pcont[row, n:], cont[row, n:])
        assert torch.equal(plogits[row, n:], logits[row, n:])
        assert torch.equal(plogits[row, :n].argmax(-1), idx[row, :n])
        assert torch.isinf(plogits[row, :n]).sum() == n * (cb.shape[0] - 1)  # one-hot 0 / -inf
    with torch.no_grad():
        vec, tokens = s.predict_vectors(x, labels, t, split_t=2)
    assert torch.equal(tokens, plogits.argmax(-1))
    assert torch.equal(vec[:, :5], s.codebook[tokens[:, :5]])  # scales < split_t snapped
    assert torch.equal(vec[:, 5:], pcont[:, 5:])  # later scales stay continuous


def _save_released(path, ema_sd, raw_sd):
    torch.save(
        {"trainer": {"ema_parameters": ema_sd, "var_wo_ddp": raw_sd, "epoch": 3}, "args": {"depth": 2}}, path
    )


def test_released_layout_loads_strictly_both_dicts(tmp_path):
    s, var, cb = _student()
    other = clone_var_student(s)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    # EMA weights as parameters only (what an EMA tracks); the raw model as a full state dict
    ema_sd = {k: v.clone() for k, v in s.named_parameters()}
    raw_sd = {k: v.clone() for k, v in other.state_dict().items()}
    path = tmp_path / "var-d2.pth"
    _save_released(path, ema_sd, raw_sd)
    x, labels = _inputs()
    with torch.no_grad():
        want_ema, want_raw = s(x, labels, 1), other(x, labels, 1)
        for ema, want in ((True, want_ema), (False, want_raw)):
            loaded = load_var_student_checkpoint(path, var.cfg, cb, ema=ema)
            got = loaded(x, labels, 1)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), ema
    assert torch.equal(loaded.attn_bias_for_masking, s.attn_bias_for_masking)
    assert not loaded.training


def test_released_layout_rejects_misfits(tmp_path):
    s, var, cb = _student()
    sd = dict(s.state_dict())
    del sd["layerwise_n_d_embed.2.weight"]
    _save_released(tmp_path / "a.pth", sd, sd)
    with pytest.raises(CheckpointError, match="layerwise_n_d_embed.2.weight"):
        load_var_student_checkpoint(tmp_path / "a.pth", var.cfg, cb)
    # a teacher checkpoint (no extra 1x1 slot) is not a student
    _save_released(tmp_path / "b.pth", var.state_dict(), var.state_dict())
    with pytest.raises(CheckpointError, match="pos_1LC"):
        load_var_student_checkpoint(tmp_path / "b.pth", var.cfg, cb)


def test_codebook_stays_fp32_and_follows_device():
    s, _, _ = _student()
    s = s.to(torch.float64)
    assert s.head.weight.dtype == torch.float64 and s.codebook.dtype == torch.float32
    with pytest.raises(ValueError, match="codebook"):
        DD1VARStudent(s.cfg, torch.zeros(3, 4))


def test_one_and_two_step_sampling():
    s, _, _ = _student()
    noise, labels = _inputs()
    one, tok1 = s.sample_vectors(labels, noise, [0], split_t=2)
    want, want_tok = s.predict_vectors(noise, labels, 0, split_t=2)
    assert torch.equal(one, want) and torch.equal(tok1, want_tok)
    two, _ = s.sample_vectors(labels, noise, (0, 2), split_t=2)
    assert torch.equal(two[:, :5], one[:, :5])  # the first two scales stay from step one
    again, _ = s.predict_vectors(s.perturb(one, noise, 2), labels, 2, split_t=2)
    assert torch.equal(two, again)  # step two restarts the rest from the same noise
    assert not torch.equal(two[:, 5:], one[:, 5:])
    with torch.no_grad():
        img = small_vqvae().decode_vectors_pyramid(two)  # continuous tokens decode without snapping
    assert img.shape == (3, 3, 8, 8) and torch.isfinite(img).all()
    with pytest.raises(ValueError, match="t_list"):
        s.sample_vectors(labels, noise, (2,), split_t=2)


def test_extra_blocks_copy_the_teacher_blocks_and_start_as_identity():
    var = small_var(seed=1)
    deep = DD1VARStudent.from_teacher(var, small_vqvae().codebook.detach(), extra_layers=2).eval()
    sources = layer_sources(var.cfg.depth, 2)
    assert deep.cfg.depth == var.cfg.depth + 2 == len(deep.blocks) == len(deep.layerwise_n_d_embed) - 1
    keep = [i for i, s in enumerate(sources) if s is not None]
    for i, src in enumerate(sources):
        block = deep.blocks[i]
        if src is None:
            assert not any(lin.weight.any() or lin.bias.any() for lin in (block.attn.proj, block.ffn.fc2))
        else:
            tsd = var.blocks[src].state_dict()
            assert all(torch.equal(v, tsd[k]) for k, v in block.state_dict().items())
    x, labels = _inputs()
    with torch.no_grad():
        for i, src in enumerate(sources):  # a new block's only other input: its n/d projection
            if src is None:
                torch.nn.init.zeros_(deep.layerwise_n_d_embed[i].weight)
                torch.nn.init.zeros_(deep.layerwise_n_d_embed[i].bias)
        logits, cont = deep(x, labels, 1)
        proj = deep.layerwise_n_d_embed
        deep.blocks = torch.nn.ModuleList(deep.blocks[i] for i in keep)
        deep.layerwise_n_d_embed = torch.nn.ModuleList([*(proj[i] for i in keep), proj[-1]])
        logits0, cont0 = deep(x, labels, 1)
    assert torch.equal(logits, logits0) and torch.equal(cont, cont0)

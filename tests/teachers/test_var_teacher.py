"""VARTeacher: stepping vs teacher forcing, VAR's CFG ramp and top-k/top-p, seeds, loading."""

from __future__ import annotations

import pytest
import torch
from var_helpers import NUM_CLASSES, PATCH_NUMS, small_var, small_var_config, small_vq_config, small_vqvae

from ddcore.checkpoints import CheckpointError
from ddcore.params import SamplingParams
from ddcore.sampling import GreedyChooser, top_k_filter
from ddcore.sources import find_checkpoint
from ddcore.teachers.var.teacher import (
    VARTeacher,
    build_var_teacher_from_dir,
    load_var_teacher,
    save_var_teacher,
    var_logits_to_probs,
    var_top_p_filter,
)

GUIDED = SamplingParams(cfg_scale=2.5, top_k=20, top_p=0.9)  # VAR cfg 1.5: w = 1 + c


@pytest.fixture(scope="module")
def teacher() -> VARTeacher:
    return VARTeacher(small_var(), small_vqvae())


def _walk(
    teacher: VARTeacher, tokens: torch.Tensor, labels: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """start/advance along given tokens; the per-step probabilities concatenated to (B, L, V)."""
    state, probs = teacher.start(labels, params)
    out = [probs]
    for step, (s0, n) in enumerate(zip(teacher.step_starts, teacher.step_sizes, strict=True)):
        if step + 1 < len(teacher.step_sizes):
            out.append(teacher.advance(state, step, tokens[:, s0 : s0 + n], params))
    return torch.cat(out, 1)


def test_structure(teacher):
    assert teacher.family == "var"
    assert teacher.step_sizes == [1, 4, 9, 16] and teacher.seq_len == 30
    assert teacher.step_starts == [0, 1, 5, 14]
    assert teacher.image_size == 8 and teacher.num_classes == NUM_CLASSES
    # the raw (not normalised) VQVAE codebook
    assert torch.equal(teacher.codebook, teacher.vqvae.quantize.embedding.weight)
    assert teacher.vocab_size == 32 and teacher.token_dim == 4
    assert not torch.allclose(teacher.codebook.norm(dim=-1), torch.ones(32))


@pytest.mark.parametrize(
    "params",
    [SamplingParams(cfg_scale=1.0), GUIDED, SamplingParams(cfg_scale=5.0, top_k=5, top_p=0.95)],
)
def test_teacher_forced_probs_equal_stepping(teacher, params):
    labels = torch.tensor([0, 1, 3])
    tokens = teacher.sample(labels, [11, 12, 13], params)
    stepped = _walk(teacher, tokens, labels, params)
    forced = teacher.teacher_forced_probs(tokens, labels, params)
    assert forced.shape == (3, 30, 32)
    torch.testing.assert_close(forced, stepped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(forced.sum(-1), torch.ones(3, 30))
    # every sampled token had non-zero probability under its step's distribution
    assert (forced.gather(-1, tokens.unsqueeze(-1)) > 0).all()


def test_greedy_generation_is_argmax_of_masked_forward(teacher):
    labels = torch.tensor([2, 3])
    params = SamplingParams(cfg_scale=1.0)  # 1 = no guidance, in every family
    tokens = teacher.generate(labels, params, teacher.noise([0, 1]), chooser=GreedyChooser())
    with torch.no_grad():
        logits = teacher.var.forward_teacher(tokens, labels, teacher.vqvae)
    assert torch.equal(logits.argmax(-1), tokens)


def test_cfg_ramp(teacher):
    """probs at scale si = softmax((1 + r) cond - r uncond), r = (w - 1) si / (S - 1): the weight ramps
    from 1 at scale 0 (unguided) to w at the last scale (VAR's cfg c = w - 1)."""
    labels = torch.tensor([1, 2])
    tokens = teacher.sample(labels, [5, 6], GUIDED)
    w = 3.0  # VAR's cfg 2.0
    params = SamplingParams(cfg_scale=w)
    with torch.no_grad():
        cond = teacher.var.forward_teacher(tokens, labels, teacher.vqvae)
        uncond = teacher.var.forward_teacher(tokens, torch.full_like(labels, NUM_CLASSES), teacher.vqvae)
    probs = teacher.teacher_forced_probs(tokens, labels, params)
    stepped = _walk(teacher, tokens, labels, params)
    n_scales = len(PATCH_NUMS)
    for si, (b, e) in enumerate(teacher.var.cfg.begin_ends):
        r = (w - 1) * si / (n_scales - 1)
        want = torch.softmax((1 + r) * cond[:, b:e] - r * uncond[:, b:e], dim=-1)
        torch.testing.assert_close(probs[:, b:e], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stepped[:, b:e], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs[:, :1], torch.softmax(cond[:, :1], -1))
    torch.testing.assert_close(
        teacher.teacher_forced_logits(tokens, labels, params)[:, -16:],
        3 * cond[:, -16:] - 2 * uncond[:, -16:],
    )
    # the guidance really acts at the last scale
    assert (probs[:, -16:] - torch.softmax(cond[:, -16:], -1)).abs().max() > 1e-3


def test_var_top_p_known_answers():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()

    def kept(p: float, k: int = 0) -> list[int]:
        return torch.isfinite(var_top_p_filter(top_k_filter(logits, k), p)).nonzero().flatten().tolist()

    assert kept(0.75) == [1, 3]  # ascending cum 0.05, 0.20 <= 1 - p = 0.25: both dropped
    assert kept(0.9) == [1, 2, 3]  # only 0.05 <= 0.1 dropped
    assert kept(0.97) == [0, 1, 2, 3]
    assert kept(0.01) == [1]  # the most likely token always stays
    assert kept(1.0) == [0, 1, 2, 3]
    # order: top-k first, then top-p on the renormalised survivors
    assert kept(0.83) == [1, 2, 3]  # 1 - p = 0.17: only 0.05 goes
    assert kept(0.83, k=3) == [1, 3]  # after top-3, 0.15 renormalises to 0.158 <= 0.17 and goes too
    got = var_logits_to_probs(logits.view(1, 1, 4), top_k=3, top_p=0.83)[0, 0]
    torch.testing.assert_close(got, torch.tensor([0.0, 0.5, 0.0, 0.3]) / 0.8)


def test_top_k_keeps_ties_and_top1_is_greedy(teacher):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0]])
    assert torch.isfinite(var_logits_to_probs(logits, top_k=2).log()).sum() == 2
    assert (var_logits_to_probs(torch.tensor([[1.0, 3.0, 2.0, 3.0]]), top_k=3) > 0).sum() == 3
    labels = torch.tensor([0, 1])
    params = SamplingParams(cfg_scale=2.5, top_k=1)
    tokens = teacher.sample(labels, [3, 4], params)
    probs = teacher.teacher_forced_probs(tokens, labels, params)
    assert torch.equal(probs.max(-1).values, torch.ones(2, 30))


def test_rejects_temperature_and_cfg_interval(teacher):
    labels = torch.tensor([0])
    with pytest.raises(ValueError, match="temperature"):
        teacher.start(labels, SamplingParams(temperature=0.9))
    with pytest.raises(ValueError, match="cfg_interval"):
        teacher.teacher_forced_probs(
            torch.zeros(1, 30, dtype=torch.long), labels, SamplingParams(cfg_interval=3)
        )


def test_advance_checks_order(teacher):
    state, _ = teacher.start(torch.tensor([0]), GUIDED)
    with pytest.raises(ValueError, match="step 0"):
        teacher.advance(state, 1, torch.zeros(1, 4, dtype=torch.long), GUIDED)


def test_seeded_reproducibility_and_batch_independence(teacher):
    labels = torch.tensor([0, 1, 2, 3])
    seeds = [101, 102, 103, 104]
    a = teacher.sample(labels, seeds, GUIDED)
    b = teacher.sample(labels, seeds, GUIDED)
    assert torch.equal(a, b)
    assert a.shape == (4, 30) and a.min() >= 0
    singles = torch.cat([teacher.sample(labels[i : i + 1], seeds[i : i + 1], GUIDED) for i in range(4)])
    assert torch.equal(a, singles)
    reordered = teacher.sample(labels.flip(0), seeds[::-1], GUIDED)
    assert torch.equal(reordered.flip(0), a)
    assert not torch.equal(teacher.sample(labels, [1, 2, 3, 4], GUIDED), a)


def test_prefix_and_stop(teacher):
    labels = torch.tensor([1, 2])
    full = teacher.sample(labels, [7, 8], GUIDED)
    other = teacher.sample(labels, [70, 80], GUIDED)
    forced = teacher.generate(labels, GUIDED, teacher.noise([7, 8]), prefix=other[:, :5])
    assert torch.equal(forced[:, :5], other[:, :5])
    partial = teacher.generate(labels, GUIDED, teacher.noise([7, 8]), stop=5)
    assert torch.equal(partial[:, :5], full[:, :5]) and (partial[:, 5:] == -1).all()


def test_decode_and_decode_vectors(teacher):
    labels = torch.tensor([0, 3])
    tokens = teacher.sample(labels, [1, 2], GUIDED)
    img = teacher.decode(tokens)
    assert img.shape == (2, 3, 8, 8) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    with torch.no_grad():
        want = (teacher.vqvae.fhat_to_img(teacher.vqvae.idx_pyramid_to_fhat(tokens)) + 1) / 2
    torch.testing.assert_close(img, want)
    torch.testing.assert_close(teacher.decode_vectors(teacher.codebook[tokens]), img)
    # continuous vectors off the codebook decode to something else
    assert (teacher.decode_vectors(teacher.codebook[tokens] + 0.3) - img).abs().max() > 1e-3
    with pytest.raises(ValueError, match="out of range"):
        teacher.decode(torch.full((1, 30), -1))


def test_mismatched_var_and_vqvae_are_rejected():
    with pytest.raises(ValueError, match="patch_nums"):
        VARTeacher(small_var(patch_nums=(1, 2, 4)), small_vqvae())
    with pytest.raises(ValueError, match="vocab_size"):
        VARTeacher(small_var(vocab_size=64), small_vqvae())


def test_save_and_build_from_dir(teacher, tmp_path):
    save_var_teacher(tmp_path, teacher.var, teacher.vqvae)
    assert {p.name for p in tmp_path.iterdir()} == {
        "var.safetensors",
        "var.json",
        "vqvae.safetensors",
        "vqvae.json",
    }
    again = build_var_teacher_from_dir(tmp_path)
    assert again.var.cfg == teacher.var.cfg and again.vqvae.cfg == teacher.vqvae.cfg
    labels = torch.tensor([0, 1])
    tokens = teacher.sample(labels, [1, 2], GUIDED)
    torch.testing.assert_close(
        again.teacher_forced_probs(tokens, labels, GUIDED),
        teacher.teacher_forced_probs(tokens, labels, GUIDED),
        rtol=0,
        atol=0,
    )
    assert torch.equal(again.sample(labels, [1, 2], GUIDED), tokens)


def test_load_official_layout_files(teacher, tmp_path):
    """Raw .pth state dicts, buffers included, as the published files; strict load, same results."""
    torch.save(teacher.var.state_dict(), tmp_path / "var_tiny.pth")
    torch.save(teacher.vqvae.state_dict(), tmp_path / "vae_tiny.pth")
    loaded = load_var_teacher(
        source=tmp_path / "var_tiny.pth",
        vq_source=tmp_path / "vae_tiny.pth",
        cfg=small_var_config(),
        vq_cfg=small_vq_config(),
    )
    labels = torch.tensor([3, 0])
    assert torch.equal(loaded.sample(labels, [9, 10], GUIDED), teacher.sample(labels, [9, 10], GUIDED))
    assert torch.equal(loaded.vqvae.quantize.ema_vocab_hit_SV, teacher.vqvae.quantize.ema_vocab_hit_SV)
    # a deeper checkpoint under the small config is refused with a hint
    torch.save(small_var(depth=3).state_dict(), tmp_path / "var_deeper.pth")
    with pytest.raises(CheckpointError, match="checkpoint depth 3"):
        load_var_teacher(
            source=tmp_path / "var_deeper.pth",
            vq_source=tmp_path / "vae_tiny.pth",
            cfg=small_var_config(),
            vq_cfg=small_vq_config(),
        )


def test_registry_entries():
    info = find_checkpoint("var-d16")
    assert info is not None and info.family == "var" and info.source.endswith("/var_d16.pth")
    assert (
        info.tokenizer == "var-vqvae" and info.sampling["cfg_scale"] == 2.5 and info.sampling["top_k"] == 900
    )
    assert find_checkpoint("vae_ch160v4096z32.pth").name == "var-vqvae"
    assert find_checkpoint("var_d30.pth").config == "var-d30"


def test_autocast_bf16_is_close_to_fp32(teacher):
    amp = VARTeacher(teacher.var, teacher.vqvae, amp_dtype=torch.bfloat16)
    labels = torch.tensor([0, 1])
    tokens = teacher.sample(labels, [1, 2], GUIDED)
    a = amp.teacher_forced_probs(tokens, labels, GUIDED)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, teacher.teacher_forced_probs(tokens, labels, GUIDED), rtol=0, atol=0.05)


def test_chunked_teacher_forcing_and_label_checks(teacher):
    labels = torch.tensor([0, 1, 2])
    tokens = teacher.sample(labels, [4, 5, 6], GUIDED)
    whole = teacher.teacher_forced_probs(tokens, labels, GUIDED)
    teacher.forced_chunk = 2
    try:
        torch.testing.assert_close(teacher.teacher_forced_probs(tokens, labels, GUIDED), whole)
    finally:
        teacher.forced_chunk = 16
    with pytest.raises(ValueError, match="labels must be in"):
        teacher.start(torch.tensor([NUM_CLASSES]), GUIDED)
    assert teacher.to("cpu") is teacher and teacher.dtype == torch.float32


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(cfg_scale=3.0, top_k=5)])
def test_vector_forced_probs_equal_teacher_forcing_on_codebook_vectors(teacher, params):
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, teacher.vocab_size, (3, teacher.seq_len), generator=g)
    labels = torch.tensor([0, 1, 2])
    got = teacher.vector_forced_probs(teacher.codebook[tokens], labels, params)
    torch.testing.assert_close(got, teacher.teacher_forced_probs(tokens, labels, params), rtol=0, atol=1e-6)

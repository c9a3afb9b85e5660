"""LlamaGenTeacher: KV-cached stepping, CFG / temperature / top-k / top-p / cfg_interval, decoding, loading."""

import pytest
import torch
from llamagen_helpers import NUM_CLASSES, small_gpt, small_gpt_config, small_vq, small_vq_config

from ddcore.checkpoints import CheckpointError, save_model
from ddcore.params import SamplingParams
from ddcore.sampling import GreedyChooser, cfg_logits, logits_to_probs, top_p_filter
from ddcore.teachers.llamagen.teacher import (
    LlamaGenTeacher,
    build_llamagen_teacher_from_dir,
    load_llamagen_teacher,
)

IMAGE = 8  # 4x4 tokens, VQ stride 2


def make_teacher(seed=0, **gpt_kw) -> LlamaGenTeacher:
    return LlamaGenTeacher(small_gpt(seed=seed, **gpt_kw), small_vq(seed=seed), NUM_CLASSES, IMAGE)


def stepped_probs(teacher, labels, tokens, params):
    """Probabilities from start/advance while feeding the given tokens."""
    state, probs = teacher.start(labels, params)
    out = [probs]
    for step in range(tokens.shape[1] - 1):
        out.append(teacher.advance(state, step, tokens[:, step : step + 1], params))
    return torch.cat(out, dim=1)


def raw_logits(teacher, tokens, labels):
    null = torch.full_like(labels, NUM_CLASSES)
    with torch.no_grad():
        return teacher.gpt.forward_teacher(tokens, labels), teacher.gpt.forward_teacher(tokens, null)


PARAMS = [
    SamplingParams(),
    SamplingParams(cfg_scale=2.5),
    SamplingParams(cfg_scale=4.0, temperature=0.7, top_k=10),
    SamplingParams(cfg_scale=1.75, top_p=0.8),
    SamplingParams(cfg_scale=3.0, cfg_interval=5, temperature=1.3),
    SamplingParams(cfg_scale=0.0),
]


def test_structure():
    t = make_teacher()
    assert t.family == "llamagen"
    assert t.step_sizes == [1] * 16 and t.seq_len == 16
    assert t.codebook.shape == (48, 8) and t.vocab_size == 48 and t.token_dim == 8
    assert torch.allclose(t.codebook, t.vq.codebook_vectors())
    assert t.device == torch.device("cpu")


@pytest.mark.parametrize(
    "params", PARAMS, ids=lambda p: f"s{p.cfg_scale}-T{p.temperature}-k{p.top_k}-p{p.top_p}-i{p.cfg_interval}"
)
def test_stepping_equals_teacher_forced_probs(params):
    t = make_teacher()
    labels = torch.tensor([2, 7, 7])
    tokens = torch.randint(0, 48, (3, 16))
    stepped = stepped_probs(t, labels, tokens, params)
    forced = t.teacher_forced_probs(tokens, labels, params)
    assert stepped.shape == forced.shape == (3, 16, 48)
    assert torch.allclose(stepped, forced, atol=1e-5)
    assert torch.allclose(forced.sum(-1), torch.ones(3, 16), atol=1e-5)


def test_cfg_probs_are_softmax_of_guided_logits_before_temperature():
    t = make_teacher()
    labels = torch.tensor([1, 4])
    tokens = torch.randint(0, 48, (2, 16))
    cond, uncond = raw_logits(t, tokens, labels)
    params = SamplingParams(cfg_scale=3.0, temperature=0.5)
    expected = torch.softmax((uncond + 3.0 * (cond - uncond)) / 0.5, dim=-1)
    assert torch.allclose(t.teacher_forced_probs(tokens, labels, params), expected, atol=1e-5)
    # differs from guiding after temperature only through the order of operations; check the cond-only case too
    plain = t.teacher_forced_probs(tokens, labels, SamplingParams(temperature=0.5))
    assert torch.allclose(plain, torch.softmax(cond / 0.5, dim=-1), atol=1e-5)


def test_cfg_scale_one_skips_the_null_batch():
    t = make_teacher()
    labels = torch.tensor([3, 5])
    state, p1 = t.start(labels, SamplingParams(cfg_scale=1.0))
    assert not state.guided
    assert t.gpt.layers[0].attention.kv_cache.k.shape[0] == 2
    state, p2 = t.start(labels, SamplingParams(cfg_scale=2.0))
    assert state.guided and t.gpt.layers[0].attention.kv_cache.k.shape[0] == 4
    cond, _ = raw_logits(t, torch.zeros(2, 1, dtype=torch.long), labels)
    assert torch.allclose(p1[:, 0], torch.softmax(cond[:, 0], -1), atol=1e-5)
    assert not torch.allclose(p1, p2, atol=1e-3)


def test_top_k_keeps_exactly_k():
    t = make_teacher()
    tokens = torch.randint(0, 48, (2, 16))
    probs = t.teacher_forced_probs(tokens, torch.tensor([0, 9]), SamplingParams(cfg_scale=2.0, top_k=7))
    assert torch.all((probs > 0).sum(-1) == 7)
    cond, uncond = raw_logits(t, tokens, torch.tensor([0, 9]))
    guided = uncond + 2.0 * (cond - uncond)
    top = guided.topk(7, dim=-1).indices
    assert torch.all(probs.gather(-1, top) > 0)


def test_top_p_semantics():
    # constructed distribution: probabilities 0.5, 0.3, 0.15, 0.05 (in shuffled order)
    p = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = p.log()
    kept = lambda q: (top_p_filter(logits, q) > float("-inf")).nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.4) == [1]  # the top token alone already crosses 0.4
    assert kept(0.7) == [1, 3]  # 0.5 < 0.7, 0.5 + 0.3 crosses it
    assert kept(0.9) == [0, 1, 3]
    assert kept(1.0) == [0, 1, 2, 3]
    renorm = logits_to_probs(logits, top_p=0.7)
    assert torch.allclose(renorm, torch.tensor([0.0, 0.625, 0.0, 0.375]))
    # the teacher keeps the smallest descending-probability prefix whose mass reaches p
    t = make_teacher()
    tokens = torch.randint(0, 48, (2, 16))
    params = SamplingParams(cfg_scale=1.5, top_p=0.6)
    probs = t.teacher_forced_probs(tokens, torch.tensor([2, 3]), params)
    full = t.teacher_forced_probs(tokens, torch.tensor([2, 3]), SamplingParams(cfg_scale=1.5))
    for b in range(2):
        for i in range(16):
            order = full[b, i].argsort(descending=True)
            mass = full[b, i][order].cumsum(0)
            n = int((mass < 0.6).sum()) + 1
            assert set((probs[b, i] > 0).nonzero().flatten().tolist()) == set(order[:n].tolist())


def test_temperature():
    t = make_teacher()
    tokens = torch.randint(0, 48, (1, 16))
    cond, _ = raw_logits(t, tokens, torch.tensor([4]))
    for temp in (0.25, 1.0, 2.0):
        probs = t.teacher_forced_probs(tokens, torch.tensor([4]), SamplingParams(temperature=temp))
        assert torch.allclose(probs, torch.softmax(cond / temp, -1), atol=1e-5)
    cold = t.teacher_forced_probs(tokens, torch.tensor([4]), SamplingParams(temperature=0.25))
    hot = t.teacher_forced_probs(tokens, torch.tensor([4]), SamplingParams(temperature=2.0))
    assert cold.max(-1).values.mean() > hot.max(-1).values.mean()


def test_cfg_interval_uses_cond_logits_after_the_interval():
    t = make_teacher()
    labels = torch.tensor([6])
    tokens = torch.randint(0, 48, (1, 16))
    cond, uncond = raw_logits(t, tokens, labels)
    params = SamplingParams(cfg_scale=3.0, cfg_interval=4)
    probs = stepped_probs(t, labels, tokens, params)
    guided = torch.softmax(cfg_logits(cond, uncond, 3.0), -1)
    plain = torch.softmax(cond, -1)
    # position 0 = prefill (always guided); position p comes from decode step p-1, guided while p-1 <= 4
    assert torch.allclose(probs[:, :6], guided[:, :6], atol=1e-5)
    assert torch.allclose(probs[:, 6:], plain[:, 6:], atol=1e-5)
    assert not torch.allclose(guided[:, 6:], plain[:, 6:], atol=1e-3)


def test_greedy_generation_equals_argmax_of_full_forward():
    t = make_teacher()
    labels = torch.tensor([0, 3, 8])
    params = SamplingParams(cfg_scale=2.0)
    seq = t.generate(labels, params, t.noise([1, 2, 3]), chooser=GreedyChooser())
    forced = t.teacher_forced_probs(seq, labels, params)
    assert torch.equal(forced.argmax(-1), seq)
    assert len(set(seq.flatten().tolist())) > 3


def test_seeded_sampling_is_reproducible_and_batch_independent():
    t = make_teacher()
    params = SamplingParams(cfg_scale=2.0, top_k=20)
    seeds = [11, 12, 13, 14]
    labels = torch.tensor([1, 5, 5, 9])
    batch = t.sample(labels, seeds, params)
    assert torch.equal(batch, t.sample(labels, seeds, params))
    singles = torch.cat([t.sample(labels[i : i + 1], [s], params) for i, s in enumerate(seeds)])
    assert torch.equal(batch, singles)
    assert not torch.equal(batch, t.sample(labels, [21, 22, 23, 24], params))
    assert batch.min() >= 0 and batch.max() < 48


def test_decode_to_unit_range():
    t = make_teacher()
    tokens = torch.randint(0, 48, (2, 16))
    imgs = t.decode(tokens)
    assert imgs.shape == (2, 3, IMAGE, IMAGE) and imgs.dtype == torch.float32
    assert imgs.min() >= 0 and imgs.max() <= 1
    with torch.no_grad():
        raw = t.vq.decode_code(tokens)
    assert torch.allclose(imgs, ((raw + 1) / 2).clamp(0, 1))
    assert torch.allclose(t.decode_vectors(t.codebook[tokens]), imgs, atol=1e-6)


def test_invalid_requests():
    t = make_teacher()
    with pytest.raises(ValueError, match="labels"):
        t.start(torch.tensor([NUM_CLASSES]), SamplingParams())
    no_null = make_teacher(class_dropout_prob=0.0)
    assert no_null.gpt.cls_embedding.embedding_table.num_embeddings == NUM_CLASSES
    with pytest.raises(ValueError, match="null class"):
        no_null.start(torch.tensor([1]), SamplingParams(cfg_scale=2.0))
    no_null.start(torch.tensor([1]), SamplingParams(cfg_scale=1.0))
    with pytest.raises(ValueError, match="image_size"):
        LlamaGenTeacher(small_gpt(), small_vq(), NUM_CLASSES, 16)


def test_bf16_teacher_probabilities_are_fp32():
    t = LlamaGenTeacher(small_gpt(), small_vq(), NUM_CLASSES, IMAGE, dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16
    state, probs = t.start(torch.tensor([1, 2]), SamplingParams(cfg_scale=2.0))
    assert probs.dtype == torch.float32
    assert t.advance(state, 0, torch.tensor([[3], [4]]), SamplingParams(cfg_scale=2.0)).dtype == torch.float32


def test_build_from_dir(tmp_path):
    gpt, vq = small_gpt(seed=4), small_vq(seed=4)
    save_model(tmp_path / "gpt", gpt, {**gpt.cfg.to_dict(), "image_size": IMAGE})
    save_model(tmp_path / "vq", vq, {"config": vq.cfg.to_dict()})
    t = build_llamagen_teacher_from_dir(tmp_path)
    ref = LlamaGenTeacher(gpt, vq, NUM_CLASSES, IMAGE)
    tokens = torch.randint(0, 48, (2, 16))
    params = SamplingParams(cfg_scale=2.0)
    assert torch.equal(
        t.teacher_forced_probs(tokens, torch.tensor([1, 2]), params),
        ref.teacher_forced_probs(tokens, torch.tensor([1, 2]), params),
    )
    assert torch.equal(t.decode(tokens), ref.decode(tokens))
    (tmp_path / "gpt.json").write_text('{"dim": 64}')
    with pytest.raises(CheckpointError, match="image_size"):
        build_llamagen_teacher_from_dir(tmp_path)


def test_load_teacher_from_official_files(tmp_path):
    gpt, vq = small_gpt(seed=6), small_vq(seed=6)
    gpt_path, vq_path = tmp_path / "c2i_tiny.pt", tmp_path / "vq_tiny.pt"
    torch.save({"model": gpt.state_dict()}, gpt_path)
    torch.save({"model": vq.state_dict()}, vq_path)
    t = load_llamagen_teacher(
        str(gpt_path),
        str(vq_path),
        gpt_model=small_gpt_config(),
        image_size=IMAGE,
        vq_model=small_vq_config(),
    )
    ref = LlamaGenTeacher(gpt, vq, NUM_CLASSES, IMAGE)
    tokens = torch.randint(0, 48, (1, 16))
    params = SamplingParams(cfg_scale=2.0)
    assert torch.equal(
        t.teacher_forced_probs(tokens, torch.tensor([3]), params),
        ref.teacher_forced_probs(tokens, torch.tensor([3]), params),
    )
    # block_size must match the image size (RoPE grid is not in the file)
    with pytest.raises(ValueError, match="block_size"):
        load_llamagen_teacher(
            str(gpt_path),
            str(vq_path),
            gpt_model=small_gpt_config(),
            image_size=16,
            vq_model=small_vq_config(),
        )
    with pytest.raises(ValueError, match="not a known LlamaGen checkpoint"):
        load_llamagen_teacher(str(gpt_path), str(vq_path))


def test_load_named_teacher_offline_fails_before_building(tmp_path, monkeypatch):
    from ddcore.settings import Settings
    from ddcore.sources import SourceError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="c2i_L_384.pt"):
        load_llamagen_teacher("llamagen-l-384", settings=Settings(cache_dir=tmp_path))


def test_teacher_forced_probs_are_chunk_independent():
    t = make_teacher()
    tokens = torch.randint(0, 48, (5, 16))
    labels = torch.tensor([0, 1, 2, 3, 4])
    params = SamplingParams(cfg_scale=2.0, top_p=0.9)
    whole = t.teacher_forced_probs(tokens, labels, params)
    t.forced_chunk = 2
    assert torch.allclose(t.teacher_forced_probs(tokens, labels, params), whole, atol=1e-6)


def test_published_file_name_selects_config_and_block_size(tmp_path):
    # tiny weights under a published name: the registry picks GPT-B with 24x24 tokens, and the strict
    # load names the mismatch (the model is built on the meta device, so nothing big is allocated)
    path = tmp_path / "c2i_B_384.pt"
    torch.save({"model": small_gpt().state_dict()}, path)
    vq_path = tmp_path / "vq.pt"
    torch.save({"model": small_vq().state_dict()}, vq_path)
    with pytest.raises(CheckpointError) as err:
        load_llamagen_teacher(str(path), str(vq_path))
    msg = str(err.value)
    assert "LlamaGen GPT-B (c2i_B_384.pt, block_size 576)" in msg
    assert "checkpoint dim 64" in msg and "model has dim 768" in msg


class _CodeLookup(torch.nn.Module):
    """A vector embedding that is exact on the codebook: nearest code, then the GPT's own embedding."""

    def __init__(self, teacher: LlamaGenTeacher):
        super().__init__()
        self.codebook, self.emb = teacher.codebook.clone(), teacher.gpt.tok_embeddings

    def forward(self, v):
        return self.emb(torch.cdist(v, self.codebook.expand(v.shape[0], -1, -1)).argmin(-1))


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(cfg_scale=3.0, top_k=7)])
def test_vector_forced_probs_equal_teacher_forcing_on_codebook_vectors(params):
    teacher = make_teacher()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, teacher.vocab_size, (3, teacher.seq_len), generator=g)
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="reads token indices only"):
        teacher.vector_forced_logits(teacher.codebook[tokens], labels, params)
    teacher.vector_embed = _CodeLookup(teacher)
    got = teacher.vector_forced_probs(teacher.codebook[tokens], labels, params)
    assert torch.equal(got, teacher.teacher_forced_probs(tokens, labels, params))

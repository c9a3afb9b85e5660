"""The DD1 LlamaGen student: official state-dict layout, initialisation, causality, read-outs."""

from __future__ import annotations

import pytest
import torch
from llamagen_helpers import small_gpt, small_gpt_config

from ddcore.checkpoints import CheckpointError
from ddcore.methods.dd1.student import DD1Student, layer_sources, load_student_checkpoint
from ddcore.models.llamagen import gpt_config

D = 8


def official_keys(cfg, d: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released DD1 LlamaGen student (DDTransformer) state dict, written out
    from the official model definition: teacher keys minus the token embedding table, plus the
    Linear token embedding, the continuous final layer and the noise/data embedding."""
    dim, hid, V = cfg.dim, cfg.ffn_hidden, cfg.vocab_size
    keys = {
        "cls_embedding.embedding_table.weight": (cfg.num_classes + 1, dim),
        "tok_embeddings.weight": (dim, d),
        "tok_embeddings.bias": (dim,),
        "norm.weight": (dim,),
        "output.weight": (V, dim),
        "final_layer_conti.linear.weight": (d, dim),
        "final_layer_conti.linear.bias": (d,),
        "final_layer_conti.scale_shift_table": (2, dim),
        "n_d_embed.weight": (2, dim),
    }
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        keys[p + "attention.wqkv.weight"] = (3 * dim, dim)
        keys[p + "attention.wo.weight"] = (dim, dim)
        keys[p + "feed_forward.w1.weight"] = (hid, dim)
        keys[p + "feed_forward.w3.weight"] = (hid, dim)
        keys[p + "feed_forward.w2.weight"] = (dim, hid)
        keys[p + "attention_norm.weight"] = (dim,)
        keys[p + "ffn_norm.weight"] = (dim,)
    return keys


def _student(seed: int = 0):
    gpt = small_gpt(seed=seed)
    cb = torch.nn.functional.normalize(torch.randn(gpt.cfg.vocab_size, D), dim=-1)
    return DD1Student.from_teacher(gpt, cb).eval(), gpt, cb


@pytest.mark.parametrize("name,millions", [("GPT-B", 98.3), ("GPT-L", 326.1)])
def test_official_layout_and_size_on_meta(name, millions):
    cfg = gpt_config(name, block_size=256, num_classes=1000)
    with torch.device("meta"):
        s = DD1Student(cfg, torch.empty(cfg.vocab_size, D))
    got = {k: tuple(v.shape) for k, v in s.state_dict().items()}
    assert got == official_keys(cfg, D)
    assert abs(s.num_params() / 1e6 - millions) < 0.1


def test_released_checkpoint_layout_loads_strictly(tmp_path):
    cfg = small_gpt_config()
    sd = {k: torch.randn(shape) for k, shape in official_keys(cfg, D).items()}
    path = tmp_path / "llamagen-dd.pt"
    torch.save({"ema": sd, "model": {k: torch.zeros_like(v) for k, v in sd.items()}, "steps": 7}, path)
    cb = torch.randn(cfg.vocab_size, D)
    s = load_student_checkpoint(path, cfg, cb)
    for k, v in s.state_dict().items():
        assert torch.equal(v, sd[k]), k  # the EMA weights, not the raw ones
    x = torch.randn(2, cfg.block_size, D)
    logits, cont = s(x, torch.tensor([1, 2]), torch.tensor([0, 3]))
    assert logits.shape == (2, cfg.block_size, cfg.vocab_size) and cont.shape == (2, cfg.block_size, D)
    bad = dict(sd)
    bad.pop("n_d_embed.weight")
    torch.save({"ema": bad}, path)
    with pytest.raises(CheckpointError, match="n_d_embed.weight"):
        load_student_checkpoint(path, cfg, cb)


def test_initialised_from_teacher():
    s, gpt, _ = _student()
    tsd = gpt.state_dict()
    for k, v in s.state_dict().items():
        if k.startswith(("cls_embedding", "layers", "norm", "output")):
            assert torch.equal(v, tsd[k]), k
    assert s.tok_embeddings.weight.shape == (gpt.cfg.dim, D)
    assert torch.equal(s.freqs_cis, gpt.freqs_cis)
    assert s.cfg.token_dropout_p == 0.0 and s.cfg.resid_dropout_p == 0.0


def test_causal_and_noise_data_flags():
    s, gpt, _ = _student()
    L = gpt.cfg.block_size
    x = torch.randn(1, L, D)
    lab = torch.tensor([3])
    logits, cont = s(x, lab, torch.tensor([0]))
    x2 = x.clone()
    x2[0, 5] += 1.0
    logits2, cont2 = s(x2, lab, torch.tensor([0]))
    assert torch.equal(logits[:, :5], logits2[:, :5]) and torch.equal(cont[:, :5], cont2[:, :5])
    assert not torch.allclose(logits[:, 5], logits2[:, 5])
    # t = 2 vs t = 5: flags differ for tokens 2..4 only, so outputs 0, 1 agree and output 2 does not
    a, _ = s(x, lab, torch.tensor([2]))
    b, _ = s(x, lab, torch.tensor([5]))
    assert torch.equal(a[:, :2], b[:, :2])
    assert not torch.allclose(a[:, 2], b[:, 2])
    # the class token matters through attention values (its q/k RoPE rows are zero)
    c, _ = s(x, torch.tensor([4]), torch.tensor([2]))
    assert not torch.allclose(a, c)


def test_final_predict_and_predict_vectors():
    s, gpt, cb = _student()
    L = gpt.cfg.block_size
    tokens = torch.randint(0, gpt.cfg.vocab_size, (2, L))
    noise = torch.randn(2, L, D)
    t = torch.tensor([0, 6])
    is_data = torch.arange(L)[None, :] < t[:, None]
    x = torch.where(is_data[..., None], cb[tokens], noise)
    raw_logits, raw_cont = s(x, torch.tensor([0, 1]), t)
    cont, logits = s.final_predict(x, torch.tensor([0, 1]), t)
    assert torch.equal(cont[1, :6], x[1, :6]) and torch.equal(logits[1, :6].argmax(-1), tokens[1, :6])
    assert torch.isinf(logits[1, :6]).sum() == 6 * (gpt.cfg.vocab_size - 1)
    assert torch.equal(cont[0], raw_cont[0]) and torch.equal(logits[1, 6:], raw_logits[1, 6:])
    vec, tok = s.predict_vectors(x, torch.tensor([0, 1]), t, split_t=10)
    assert torch.equal(vec[:, :10], cb[tok[:, :10]])
    assert torch.equal(vec[:, 10:], cont[:, 10:])
    assert torch.equal(tok, logits.argmax(-1))


def test_dtype_cast_keeps_codebook_fp32():
    s, _, _ = _student()
    s = s.to(torch.bfloat16)
    assert s.codebook.dtype == torch.float32 and s.freqs_cis.dtype == torch.float32
    assert s.output.weight.dtype == torch.bfloat16


def test_layer_sources_spread_new_blocks_behind_the_teachers():
    assert layer_sources(3, 0) == [0, 1, 2]
    assert layer_sources(3, 3) == [0, None, 1, None, 2, None]
    assert layer_sources(3, 4) == [0, None, None, 1, None, 2, None]
    assert layer_sources(2, 1) == [0, None, 1]
    with pytest.raises(ValueError, match="extra_layers"):
        layer_sources(3, -1)


def test_extra_layers_copy_the_teacher_blocks_and_start_as_identity():
    gpt = small_gpt(seed=0)
    cb = torch.nn.functional.normalize(torch.randn(gpt.cfg.vocab_size, D), dim=-1)
    deep = DD1Student.from_teacher(gpt, cb, extra_layers=3).eval()
    n = gpt.cfg.n_layer
    assert deep.cfg.n_layer == n + 3 and len(deep.layers) == n + 3
    sources = layer_sources(n, 3)
    for block, src in zip(deep.layers, sources, strict=True):
        if src is None:
            assert not block.attention.wo.weight.any() and not block.feed_forward.w2.weight.any()
        else:
            tsd = gpt.layers[src].state_dict()
            assert all(torch.equal(v, tsd[k]) for k, v in block.state_dict().items())
    x, lab, t = torch.randn(2, gpt.cfg.block_size, D), torch.tensor([1, 2]), torch.tensor([0, 3])
    with torch.no_grad():
        logits, cont = deep(x, lab, t)
        # the same network without the new blocks gives the same outputs: they are the identity
        deep.layers = torch.nn.ModuleList(
            b for b, s in zip(deep.layers, sources, strict=True) if s is not None
        )
        logits0, cont0 = deep(x, lab, t)
    assert torch.equal(logits, logits0) and torch.equal(cont, cont0)

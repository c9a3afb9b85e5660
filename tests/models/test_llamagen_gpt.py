"""LlamaGen GPT: published key layout and sizes, 2D RoPE, KV-cached decoding vs the full forward."""

import math

import pytest
import torch
import torch.nn.functional as F
from llamagen_helpers import NUM_CLASSES, small_gpt

from ddcore.models.attention import attend
from ddcore.models.llamagen import (
    GPT,
    GPT_CONFIGS,
    GPTConfig,
    TransformerBlock,
    apply_rotary_emb,
    gpt_config,
    precompute_freqs_cis_2d,
)

# parameter counts measured with the original code (shared reference §1a)
REFERENCE_PARAMS_M = {"GPT-B": 110.9, "GPT-L": 342.9, "GPT-XL": 774.7, "GPT-XXL": 1411.0, "GPT-3B": 3096.7}
REFERENCE_FFN = {"GPT-B": 2048, "GPT-L": 2816, "GPT-XL": 3584, "GPT-XXL": 4096, "GPT-3B": 8704}


def meta_gpt(name: str, **kw) -> GPT:
    with torch.device("meta"):
        return GPT(gpt_config(name, **kw))


def test_gpt_b_param_count_on_meta_device():
    gpt = meta_gpt("GPT-B")
    assert gpt.output.weight.is_meta
    assert gpt.num_params() == 110_888_448
    assert round(gpt.num_params() / 1e6, 1) == 110.9


@pytest.mark.parametrize("name", list(GPT_CONFIGS))
def test_published_config_sizes(name):
    gpt = meta_gpt(name)
    assert round(gpt.num_params() / 1e6, 1) == REFERENCE_PARAMS_M[name]
    assert gpt.cfg.ffn_hidden == REFERENCE_FFN[name]
    assert gpt.layers[0].feed_forward.w1.weight.shape == (REFERENCE_FFN[name], gpt.cfg.dim)


def test_gpt_b_state_dict_keys_and_shapes():
    gpt = meta_gpt("GPT-B")
    sd = gpt.state_dict()
    assert len(sd) == 88
    assert sd["cls_embedding.embedding_table.weight"].shape == (1001, 768)
    assert sd["tok_embeddings.weight"].shape == (16384, 768)
    assert sd["output.weight"].shape == (16384, 768)
    assert sd["norm.weight"].shape == (768,)
    for i in range(12):
        assert sd[f"layers.{i}.attention.wqkv.weight"].shape == (3 * 768, 768)
        assert sd[f"layers.{i}.attention.wo.weight"].shape == (768, 768)
        assert sd[f"layers.{i}.feed_forward.w1.weight"].shape == (2048, 768)
        assert sd[f"layers.{i}.feed_forward.w3.weight"].shape == (2048, 768)
        assert sd[f"layers.{i}.feed_forward.w2.weight"].shape == (768, 2048)
        assert sd[f"layers.{i}.attention_norm.weight"].shape == (768,)
        assert sd[f"layers.{i}.ffn_norm.weight"].shape == (768,)
    assert not any(k.endswith("bias") for k in sd)
    assert "freqs_cis" not in sd


def test_caches_and_rope_stay_out_of_the_state_dict():
    gpt = small_gpt()
    keys = set(gpt.state_dict())
    gpt.setup_caches(3, 17, torch.float32)
    assert set(gpt.state_dict()) == keys
    assert not any("kv_cache" in k or "freqs" in k for k in keys)


def test_rope_table_layout():
    grid, hd = 4, 16
    table = precompute_freqs_cis_2d(grid, hd, 10000.0, cls_token_num=1)
    assert table.shape == (1 + grid * grid, hd // 2, 2)
    assert table.dtype == torch.float32
    assert torch.all(table[0] == 0)  # class token: zeros, not the identity
    quarter = hd // 4
    freqs = [10000.0 ** (-2 * j / (hd // 2)) for j in range(quarter)]
    for t in range(grid * grid):
        r, c = divmod(t, grid)
        for j in range(quarter):
            assert table[1 + t, j, 0].item() == pytest.approx(math.cos(r * freqs[j]), abs=1e-6)
            assert table[1 + t, j, 1].item() == pytest.approx(math.sin(r * freqs[j]), abs=1e-6)
            assert table[1 + t, quarter + j, 0].item() == pytest.approx(math.cos(c * freqs[j]), abs=1e-6)
            assert table[1 + t, quarter + j, 1].item() == pytest.approx(math.sin(c * freqs[j]), abs=1e-6)


def test_rope_rotates_interleaved_pairs():
    hd = 8
    table = precompute_freqs_cis_2d(2, hd, 10000.0, 1)
    x = torch.zeros(1, 1, 1, hd)
    x[..., 2] = 1.0  # pair 1 = (x[2], x[3]) = (1, 0)
    pos = 1 + 3  # image token 3 -> row 1, column 1
    out = apply_rotary_emb(x, table[pos : pos + 1])
    cos, sin = table[pos, 1]
    expected = torch.zeros(hd)
    expected[2], expected[3] = cos, sin
    assert torch.allclose(out.flatten(), expected)
    # the class position zeroes q and k entirely
    assert torch.all(apply_rotary_emb(torch.randn(1, 1, 2, hd), table[:1]) == 0)


def test_config_dict_roundtrip_and_validation():
    cfg = gpt_config("GPT-L", block_size=576)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.grid_size == 24
    with pytest.raises(ValueError, match="square"):
        GPTConfig(dim=64, n_head=4, block_size=20)
    with pytest.raises(ValueError, match="unknown field"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_layers": 3})
    with pytest.raises(ValueError, match="unknown GPT config"):
        gpt_config("GPT-Q")


def test_teacher_forced_logits_are_causal_and_fp32():
    gpt = small_gpt()
    tokens = torch.randint(0, 48, (2, 16))
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        full = gpt.forward_teacher(tokens, labels)
        changed = tokens.clone()
        changed[:, 9:] = (changed[:, 9:] + 1) % 48
        other = gpt.forward_teacher(changed, labels)
        prefix = gpt.forward_teacher(tokens[:, :6], labels)
    assert full.shape == (2, 16, 48) and full.dtype == torch.float32
    # logits[:, i] depends only on tokens[:, :i]
    assert torch.allclose(full[:, :10], other[:, :10], atol=1e-5)
    assert not torch.allclose(full[:, 10:], other[:, 10:], atol=1e-3)
    assert torch.allclose(full[:, :6], prefix, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_kv_cached_greedy_decoding_equals_full_forward_argmax(n_kv_head):
    gpt = small_gpt(n_kv_head=n_kv_head)
    labels = torch.tensor([0, 5, 9])
    with torch.no_grad():
        gpt.setup_caches(3, 17, torch.float32)
        step_logits = [gpt.prefill(labels)]
        tokens = [step_logits[0].argmax(-1)]
        for pos in range(15):
            step_logits.append(gpt.decode_step(tokens[-1], pos))
            tokens.append(step_logits[-1].argmax(-1))
        seq = torch.stack(tokens, 1)
        full = gpt.forward_teacher(seq, labels)
    cached = torch.stack(step_logits, 1)
    assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()
    assert torch.equal(full.argmax(-1), seq)
    assert len(set(seq.flatten().tolist())) > 3  # not a degenerate constant sequence


def test_cache_is_reused_and_cleared():
    gpt = small_gpt()
    gpt.setup_caches(2, 17, torch.float32)
    assert gpt.layers[0].attention.kv_cache.k.shape == (2, 4, 24, 16)  # 17 rounded up to 24
    cache = gpt.layers[0].attention.kv_cache
    gpt.setup_caches(2, 17, torch.float32)
    assert gpt.layers[0].attention.kv_cache is cache
    gpt.clear_caches()
    assert gpt.layers[0].attention.kv_cache is None
    with pytest.raises(RuntimeError, match="setup_caches"):
        gpt.prefill(torch.tensor([1, 2]))


def test_forward_train_loss_and_class_dropout():
    gpt = small_gpt(class_dropout_prob=1.0)  # every label dropped in training mode
    tokens = torch.randint(0, 48, (4, 16))
    labels = torch.tensor([1, 2, 3, 4])
    null = torch.full_like(labels, NUM_CLASSES)
    with torch.no_grad():
        gpt.eval()
        logits, loss = gpt.forward_train(tokens, labels)
        assert torch.allclose(logits, gpt.forward_teacher(tokens, labels))
        assert loss.item() == pytest.approx(
            F.cross_entropy(logits.reshape(-1, 48), tokens.reshape(-1)).item()
        )
        gpt.train()
        dropped, _ = gpt.forward_train(tokens, labels)
        gpt.eval()
        assert torch.allclose(dropped, gpt.forward_teacher(tokens, null), atol=1e-6)
    gpt.train()
    _, loss = gpt.forward_train(tokens, labels)
    loss.backward()
    assert gpt.tok_embeddings.weight.grad is not None and gpt.output.weight.grad.abs().sum() > 0


def test_bf16_weights_keep_fp32_rope_and_logits():
    gpt = small_gpt()
    tokens = torch.randint(0, 48, (2, 16))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        ref = gpt.forward_teacher(tokens, labels)
        gpt.to(torch.bfloat16)
        out = gpt.forward_teacher(tokens, labels)
    assert gpt.freqs_cis.dtype == torch.float32
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_attention_under_cpu_bf16_autocast_runs_in_fp32():
    """bf16 autocast on a CPU keeps attention in fp32 (its bf16 backward is slow there), gradients included."""
    q, k, v = (torch.randn(2, 3, 9, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, is_causal=True)
        bf16 = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert torch.equal(out, exact)
    assert not torch.equal(bf16.float(), exact)  # bf16 attention would have rounded
    out.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
    # without autocast the call is plain SDPA in the inputs' dtype
    assert attend(q.detach(), k.detach(), v.detach(), is_causal=True).dtype == torch.bfloat16


def test_transformer_block_is_reusable_with_masks():
    cfg = small_gpt().cfg
    block = TransformerBlock(cfg).eval()
    freqs = precompute_freqs_cis_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base, 1)[:6]
    x = torch.randn(2, 6, cfg.dim)
    with torch.no_grad():
        causal = block(x, freqs)
        explicit = block(x, freqs, mask=torch.ones(6, 6).tril().bool())
        full = block(x, freqs, mask=torch.ones(6, 6, dtype=torch.bool))
        x2 = x.clone()
        x2[:, 4:] += 1.0
        causal2 = block(x2, freqs)
    assert torch.allclose(causal, explicit, atol=1e-6)
    assert torch.allclose(causal[:, :4], causal2[:, :4], atol=1e-6)
    assert not torch.allclose(causal[:, :4], full[:, :4], atol=1e-4)


def test_bad_inputs_are_rejected():
    gpt = small_gpt()
    with pytest.raises(ValueError, match="class labels"):
        gpt.forward_teacher(torch.zeros(1, 4, dtype=torch.long), torch.tensor([NUM_CLASSES + 1]))
    with pytest.raises(ValueError, match="sequence length"):
        gpt.forward_teacher(torch.zeros(1, 17, dtype=torch.long), torch.tensor([0]))
    gpt.setup_caches(1, 17, torch.float32)
    with pytest.raises(ValueError, match="decode position"):
        gpt.decode_step(torch.tensor([0]), 15)

"""Fast LlamaGen teacher sampling: the static-shape decode step (position as a device tensor),
one compiled graph for every position, no prefix recomputation, cache reuse, the compiled twin.

Compilation with inductor is slow on CPU, so only the tests marked slow run it, all on one
batch shape (one compile). The others trace with dynamo's "eager" backend, which checks the
same property (one full graph, no recompiles) without generating code.
"""

import pytest
import torch
from llamagen_helpers import NUM_CLASSES, small_gpt, small_vq
from torch._dynamo.utils import counters

from ddcore.params import SamplingParams
from ddcore.samplers.base import TeacherSampler
from ddcore.sampling import GreedyChooser
from ddcore.teachers.llamagen.teacher import LlamaGenTeacher

IMAGE = 8  # 4x4 tokens, VQ stride 2
LABELS = torch.tensor([2, 7])
GUIDED = SamplingParams(cfg_scale=2.0, top_k=20)  # batch 2 -> GPT batch 4 everywhere below


def make_teacher(seed: int = 0, **gpt_kw) -> LlamaGenTeacher:
    return LlamaGenTeacher(small_gpt(seed=seed, **gpt_kw), small_vq(seed=seed), NUM_CLASSES, IMAGE)


def stepped_probs(teacher, labels, tokens, params):
    """Probabilities from start/advance while feeding the given tokens."""
    state, probs = teacher.start(labels, params)
    out = [probs]
    for step in range(tokens.shape[1] - 1):
        out.append(teacher.advance(state, step, tokens[:, step : step + 1], params))
    return torch.cat(out, dim=1)


def decode_logits(gpt, labels, tokens, position) -> torch.Tensor:
    """Prefill, then feed tokens[:, p] at every position p; position(p) gives the int or tensor."""
    with torch.no_grad():
        out = [gpt.prefill(labels)]
        for p in range(tokens.shape[1] - 1):
            out.append(gpt.decode_step(tokens[:, p], position(p)).clone())
    return torch.stack(out, 1)


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_tensor_position_path_equals_int_path(n_kv_head):
    gpt = small_gpt(n_kv_head=n_kv_head)
    labels = torch.tensor([0, 5, 9])
    tokens = torch.randint(0, 48, (3, 16), generator=torch.Generator().manual_seed(1))
    gpt.setup_caches(3, 17)
    by_int = decode_logits(gpt, labels, tokens, lambda p: p)
    # the static path attends over the whole cache: slots not written yet must be masked out,
    # so fill them with large garbage first
    for layer in gpt.layers:
        layer.attention.kv_cache.k.fill_(50.0)
        layer.attention.kv_cache.v.fill_(-50.0)
    by_tensor = decode_logits(gpt, labels, tokens, lambda p: torch.tensor([p]))
    assert torch.allclose(by_tensor, by_int, atol=1e-5), (by_tensor - by_int).abs().max()
    with torch.no_grad():
        full = gpt.forward_teacher(tokens, labels)
    assert torch.allclose(by_tensor, full, atol=1e-4)


def test_static_decode_is_one_graph_for_every_position():
    """Dynamo traces the step whole (no .item(), no branching on tensor values) and the position
    tensor does not specialise it: one graph, never recompiled, for all 15 positions."""
    torch._dynamo.reset()
    counters.clear()
    gpt = small_gpt()
    gpt.setup_caches(4, 17)
    step = torch.compile(gpt.decode_step_static, backend="eager", fullgraph=True, dynamic=False)
    tokens = torch.randint(0, 48, (4, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1, 2, 3, NUM_CLASSES])
    pos = torch.zeros(1, dtype=torch.long)
    out = []
    with torch.no_grad():
        out.append(gpt.prefill(labels))
        for p in range(15):
            pos.fill_(p)
            with torch.compiler.set_stance("fail_on_recompile" if p else "default"):
                out.append(step(tokens[:, p], pos))
    assert counters["stats"]["unique_graphs"] == 1
    eager = decode_logits(gpt, labels, tokens, lambda p: p)
    assert torch.allclose(torch.stack(out, 1), eager, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("params", [SamplingParams(), GUIDED], ids=["cfg1", "cfg2"])
def test_each_step_feeds_one_token_per_row_over_a_reused_cache(params):
    """No prefix recomputation: every network call sees one position per row (the class token,
    then one image token per step), rows are doubled only for CFG, and a second generation of
    the same shape writes into the same cache tensors."""
    t = make_teacher()
    seen = []
    hook = t.gpt.layers[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[:2])))
    rows = 2 * len(LABELS) if params.cfg_scale != 1.0 else len(LABELS)
    try:
        t.sample(LABELS, [1, 2], params)
        cache = t.gpt.layers[0].attention.kv_cache
        ptrs = (cache.k.data_ptr(), cache.v.data_ptr())
        t.sample(LABELS, [3, 4], params)
    finally:
        hook.remove()
    assert seen == [(rows, 1)] * (2 * t.seq_len)
    cache = t.gpt.layers[0].attention.kv_cache
    assert cache.k.shape[0] == rows and (cache.k.data_ptr(), cache.v.data_ptr()) == ptrs


def test_compile_returns_a_twin_sharing_weights():
    t = make_teacher()
    twin = t.compile()
    assert twin is not t and twin.is_compiled and not t.is_compiled
    assert twin.gpt is t.gpt and twin.vq is t.vq
    with pytest.raises(ValueError, match="mode"):
        t.compile(mode="fastest")


def test_teacher_sampler_compiled_variant():
    t = make_teacher()
    sampler = TeacherSampler(t, GUIDED)
    fast = sampler.compiled()
    assert isinstance(fast, TeacherSampler) and fast.name == "teacher+compile"
    assert fast.teacher.is_compiled and fast.teacher.gpt is t.gpt and fast.params == GUIDED
    assert fast.steps == sampler.steps
    assert sampler.name == "teacher" and sampler.teacher is t and not t.is_compiled

    class NoCompileTeacher:
        step_sizes = [1] * 4

    plain = TeacherSampler(NoCompileTeacher(), GUIDED)
    assert getattr(plain, "compiled", None) is None  # what the benchmark checks
    with pytest.raises(AttributeError, match="no compile"):
        plain.compiled()


@pytest.mark.slow
def test_compiled_teacher_matches_eager_with_one_graph():
    """Real inductor compile (one, on CPU): same probabilities and greedy tokens as the eager
    teacher, one graph for every position and generation, and the graph reads the weights of
    whichever model calls it."""
    torch._dynamo.reset()
    counters.clear()
    t = make_teacher()
    fast = t.compile()
    tokens = torch.randint(0, 48, (2, 16), generator=torch.Generator().manual_seed(3))
    eager_probs = stepped_probs(t, LABELS, tokens, GUIDED)
    fast_probs = stepped_probs(fast, LABELS, tokens, GUIDED)
    assert torch.allclose(fast_probs, eager_probs, atol=1e-5), (fast_probs - eager_probs).abs().max()
    assert counters["stats"]["unique_graphs"] == 1

    with torch.compiler.set_stance("fail_on_recompile"):
        greedy = fast.generate(LABELS, GUIDED, fast.noise([5, 6]), chooser=GreedyChooser())
        sampled = TeacherSampler(t, GUIDED).compiled().tokens(LABELS, [7, 8])
        # another model of the same shape: the graph takes the weights as inputs, not constants
        other = make_teacher(seed=1)
        other_probs = stepped_probs(other.compile(), LABELS, tokens, GUIDED)
    assert torch.equal(greedy, t.generate(LABELS, GUIDED, t.noise([5, 6]), chooser=GreedyChooser()))
    assert torch.equal(sampled, TeacherSampler(t, GUIDED).tokens(LABELS, [7, 8]))
    assert torch.allclose(other_probs, stepped_probs(other, LABELS, tokens, GUIDED), atol=1e-5)
    assert not torch.allclose(other_probs, eager_probs, atol=1e-3)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()

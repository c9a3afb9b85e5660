"""DD1 test helpers: a Markov-chain `Teacher` with exact marginals, a chi-square test, small LlamaGen teachers.

p(q_0 | y) = softmax(A[y]),  p(q_i | q_{i-1}, y) = softmax(T[q_{i-1}] + B[y]), with the sampling
params applied exactly as LlamaGen does (CFG on the class term, temperature, top-k, top-p), so
the flow chooser and the multinomial chooser can both be compared to the exact distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor

from ddcore.params import SamplingParams
from ddcore.sampling import cfg_logits, logits_to_probs
from ddcore.teachers.base import StepState, Teacher


def chi2_pvalue(counts: torch.Tensor, p: torch.Tensor) -> float:
    """Pearson goodness of fit; cells with expected count < 5 are pooled; a count in a p=0 cell -> 0."""
    n = counts.sum().item()
    counts, p = counts.double(), p.double()
    if (counts[p == 0] > 0).any():
        return 0.0
    exp = n * p / p.sum()
    big = exp >= 5
    obs_cells = [*counts[big].tolist()]
    exp_cells = [*exp[big].tolist()]
    rest = (~big) & (p > 0)
    if rest.any():
        obs_cells.append(counts[rest].sum().item())
        exp_cells.append(exp[rest].sum().item())
    if len(obs_cells) < 2:
        return 1.0
    return float(stats.chisquare(obs_cells, exp_cells).pvalue)


@dataclass
class _State(StepState):
    labels: Tensor


class MarkovTeacher(Teacher):
    family = "toy"

    def __init__(self, seq_len: int = 6, vocab: int = 8, dim: int = 4, num_classes: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.image_size = seq_len  # decode() gives (B, 3, 2, seq_len) strips; only shape-checked
        self._L = seq_len
        self._codebook = F.normalize(torch.randn(vocab, dim, generator=g), dim=-1)
        self.A = 1.5 * torch.randn(num_classes, vocab, generator=g)
        self.T = 1.5 * torch.randn(vocab, vocab, generator=g)
        self.B = 1.0 * torch.randn(num_classes, vocab, generator=g)

    @property
    def step_sizes(self) -> list[int]:
        return [1] * self._L

    @property
    def codebook(self) -> Tensor:
        return self._codebook

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    # --- the distributions ------------------------------------------------------------------
    def first_probs(self, labels: Tensor, params: SamplingParams) -> Tensor:
        cond = self.A[labels]
        guided = cfg_logits(cond, self.A.mean(0).expand_as(cond), params.cfg_scale)
        return logits_to_probs(guided, params.temperature, params.top_k, params.top_p)

    def next_probs(self, prev: Tensor, labels: Tensor, params: SamplingParams) -> Tensor:
        uncond = self.T[prev]
        guided = cfg_logits(uncond + self.B[labels], uncond, params.cfg_scale)
        return logits_to_probs(guided, params.temperature, params.top_k, params.top_p)

    def exact_marginals(self, label: int, params: SamplingParams) -> Tensor:
        """(L, V) exact per-position marginals for one class."""
        V = self.vocab_size
        lab = torch.full((V,), label)
        P = self.next_probs(torch.arange(V), lab, params).double()  # (V, V) transition matrix
        m = self.first_probs(torch.tensor([label]), params)[0].double()
        out = [m]
        for _ in range(self._L - 1):
            m = m @ P
            out.append(m)
        return torch.stack(out)

    def exact_pair(self, label: int, pos: int, params: SamplingParams) -> Tensor:
        """(V, V) exact joint of (q_{pos-1}, q_pos) for one class."""
        V = self.vocab_size
        P = self.next_probs(torch.arange(V), torch.full((V,), label), params).double()
        m = self.exact_marginals(label, params)[pos - 1]
        return m[:, None] * P

    # --- Teacher interface ------------------------------------------------------------------
    def start(self, labels: Tensor, params: SamplingParams):
        return _State(labels.long()), self.first_probs(labels.long(), params).unsqueeze(1)

    def advance(self, state, step: int, tokens: Tensor, params: SamplingParams) -> Tensor:
        return self.next_probs(tokens.reshape(-1).long(), state.labels, params).unsqueeze(1)

    def teacher_forced_probs(self, tokens: Tensor, labels: Tensor, params: SamplingParams) -> Tensor:
        first = self.first_probs(labels, params).unsqueeze(1)
        rest = [self.next_probs(tokens[:, i - 1], labels, params).unsqueeze(1) for i in range(1, self._L)]
        return torch.cat([first, *rest], dim=1)

    def decode_vectors(self, vectors: Tensor) -> Tensor:
        b = vectors.shape[0]
        img = torch.sigmoid(vectors.float().mean(-1))  # (B, L)
        return img[:, None, None, :].expand(b, 3, 2, self._L).contiguous()

    def decode(self, tokens: Tensor) -> Tensor:
        return self.decode_vectors(self.codebook[tokens.long()])


def generate_toy_shards(out_dir: str, shard_ids: list[int], num_pairs: int, shard_size: int) -> None:
    """Process entry point for the parallel-generation test (spawned children import this)."""
    import torch

    from ddcore.methods.dd1.trajectories import generate_trajectories
    from ddcore.params import FlowParams, SamplingParams, TrajectoryParams

    torch.set_num_threads(1)
    generate_trajectories(
        MarkovTeacher(),
        SamplingParams(),
        FlowParams(steps=16),
        TrajectoryParams(num_pairs=num_pairs, shard_size=shard_size, batch_size=16, seed=3),
        out_dir,
        shard_ids=shard_ids,
        progress=False,
    )


def small_llamagen_teacher(seed: int = 0):
    """A real `LlamaGenTeacher` on a small random GPT (16 tokens, vocab 48) and VQ (8 px images)."""
    from llamagen_helpers import small_gpt, small_vq

    from ddcore.teachers.llamagen.teacher import LlamaGenTeacher

    return LlamaGenTeacher(small_gpt(seed=seed, std=0.3), small_vq(seed=seed), num_classes=10, image_size=8)


def small_train_params(**kw):
    """DD1 training at test scale (a few steps, frequent validation)."""
    from ddcore.params import DD1TrainParams as TrainParams

    base = dict(
        steps=10,
        batch_size=8,
        lr=2e-3,
        warmup_steps=2,
        val_pairs=16,
        val_every=2,
        ckpt_every=100,
        ema_decay=0.9,
    )
    return TrainParams(**{**base, **kw})


def make_small_trajectories(out_dir, num_pairs: int = 96, seed: int = 0):
    from ddcore.methods.dd1.trajectories import generate_trajectories
    from ddcore.params import FlowParams, SamplingParams, TrajectoryParams

    return generate_trajectories(
        small_llamagen_teacher(seed),
        SamplingParams(),
        FlowParams(steps=16),
        TrajectoryParams(num_pairs=num_pairs, shard_size=48, batch_size=48, seed=seed),
        out_dir,
        progress=False,
    )


def ddp_train_worker(rank: int, world: int, port: int, traj_dir: str, out_dir: str, train_kw: dict) -> None:
    """One rank of the DDP equivalence test (gloo on CPU, loopback)."""
    import os

    import torch

    from ddcore.methods.dd1.train import train_student
    from ddcore.params import DD1TrainParams as TrainParams
    from ddcore.params import StudentParams

    dist_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
    }
    saved = {k: os.environ.get(k) for k in dist_env}
    os.environ.update(dist_env)
    torch.set_num_threads(1)
    try:
        train_student(
            small_llamagen_teacher(0),
            traj_dir,
            StudentParams(t_list=[0, 6], split_t=10),
            TrainParams(**train_kw),
            out_dir,
            device="cpu",
            progress=False,
        )
    finally:  # rank 0 runs in the test process too: leave no distributed env behind
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

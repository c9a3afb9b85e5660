"""LlamaGen class-conditional GPT, state-dict compatible with the published c2i checkpoints.

Written from LlamaGen's published architecture (its `gpt.py` and the checkpoints' keys): pre-norm Llama blocks
without biases, fp32 RMSNorm, SwiGLU FFN, 2D RoPE on interleaved pairs (first half of the pairs
rotates by the token's row, second half by its column; the class-token rows are all zero, which
zeroes the class token's q and k), SDPA attention, logits in fp32.

Positions: the class token sits at position 0 and image token t (raster order) at t + 1.
`forward_teacher` is the teacher-forced forward (logits[:, i] predicts token i from the label and
tokens[:, :i]); `prefill` / `decode_step` run the same network one token at a time over a
preallocated KV cache per layer (`ddcore.models.kv_cache`), so greedy cached decoding equals
the argmax of the full forward.

Decoding has two equivalent paths. With an int position the step attends over the cache prefix
(shapes change every token: fine eagerly). With the position as a device tensor
(`decode_step_static`) it writes the cache by index and attends over the whole preallocated cache
under a mask, so every position has the same shapes and needs no host sync: `compiled_decode`
compiles that step once per batch size (CUDA graphs on CUDA), in the style of gpt-fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddcore.models.attention import attend
from ddcore.models.compiled import compiled, default_mode
from ddcore.models.kv_cache import KVCache

__all__ = [
    "GPT",
    "GPTConfig",
    "GPT_CONFIGS",
    "Attention",
    "FeedForward",
    "LabelEmbedder",
    "RMSNorm",
    "TransformerBlock",
    "apply_rotary_emb",
    "find_multiple",
    "gpt_config",
    "guess_gpt_config_name",
    "precompute_freqs_cis_2d",
]


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class GPTConfig:
    """LlamaGen's ModelArgs (c2i fields only; caption_dim/model_type/max_* are t2i or unused)."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"GPTConfig: dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise ValueError(f"GPTConfig: head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"GPTConfig: n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}"
            )
        g = math.isqrt(self.block_size)
        if g * g != self.block_size:
            raise ValueError(f"GPTConfig: block_size {self.block_size} is not a square (token grid side²)")
        if self.cls_token_num != 1:
            raise ValueError(
                "GPTConfig: class-conditional LlamaGen uses exactly one class token (cls_token_num=1)"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def has_null_class(self) -> bool:
        """The CFG null row exists only when the model was built with label dropout (as LlamaGen)."""
        return self.class_dropout_prob > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"GPTConfig: unknown field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**d)


GPT_CONFIGS: dict[str, GPTConfig] = {
    "GPT-B": GPTConfig(n_layer=12, n_head=12, dim=768),  # 110.9M
    "GPT-L": GPTConfig(n_layer=24, n_head=16, dim=1024),  # 342.9M
    "GPT-XL": GPTConfig(n_layer=36, n_head=20, dim=1280),  # 774.7M
    "GPT-XXL": GPTConfig(n_layer=48, n_head=24, dim=1536),  # 1411.0M
    "GPT-3B": GPTConfig(n_layer=24, n_head=32, dim=3200),  # 3096.7M, head_dim 100
}


def gpt_config(name: str, **overrides) -> GPTConfig:
    if name not in GPT_CONFIGS:
        raise ValueError(f"unknown GPT config {name!r}; allowed: {', '.join(GPT_CONFIGS)}")
    return replace(GPT_CONFIGS[name], **overrides)


def guess_gpt_config_name(dim: int, n_layer: int | None = None) -> str | None:
    """Which published config has this width (and depth)? Used in checkpoint error messages."""
    for name, c in GPT_CONFIGS.items():
        if c.dim == dim and (n_layer is None or c.n_layer == n_layer):
            return name
    return None


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------
def precompute_freqs_cis_2d(
    grid_size: int, n_elem: int, base: float = 10000.0, cls_token_num: int = 1
) -> Tensor:
    """(cls_token_num + grid², n_elem/2, 2) table of (cos, sin) in fp32.

    n_elem = head_dim. Pairs 0..n_elem/4-1 rotate by the row index, the rest by the column index,
    with f_j = base^(-2j / (n_elem/2)). Class-token rows are zeros (not the identity), as LlamaGen.
    """
    half_dim = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: half_dim // 2].float() / half_dim))
    t = torch.arange(grid_size, dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # (grid, n_elem/4)
    freqs_grid = torch.cat(
        [freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )  # (grid rows, grid cols, n_elem/2)
    cache = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, n_elem // 2, 2), cache])


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """x (B, S, H, hd), freqs_cis (S, hd/2, 2): rotate interleaved pairs (x[2i], x[2i+1]) in fp32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [
            xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
            xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class DropPath(nn.Module):
    """Stochastic depth (per sample); identity in eval mode. No parameters."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class LabelEmbedder(nn.Module):
    """Class embedding; row `num_classes` is the null class used for CFG (present iff dropout > 0)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor) -> Tensor:
        drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor, train: bool = False) -> Tensor:
        if train and self.dropout_prob > 0:
            labels = self.token_drop(labels)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, dim)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.ffn_hidden
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.dim = cfg.dim
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None = None, input_pos=None) -> Tensor:
        """x (B, S, dim); freqs_cis (S, hd/2, 2) for these positions.

        Without a cache (or input_pos None): causal attention when mask is None, else the given
        mask (bool, True = attend, broadcastable to (B, H, S, S)). With a cache and an int
        input_pos (the first position of x): k/v are written there and the queries attend to
        every cached position up to their own. With a cache and a tensor input_pos (S,) (the
        cache index of each query): k/v are written at those indices and the queries attend over
        the whole cache, masked to indices <= their own (or by `mask`, (S, S_max)).
        """
        bsz, seqlen, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = apply_rotary_emb(q.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis).transpose(1, 2)
        k = apply_rotary_emb(k.view(bsz, seqlen, self.n_kv_head, self.head_dim), freqs_cis).transpose(1, 2)
        v = v.view(bsz, seqlen, self.n_kv_head, self.head_dim).transpose(1, 2)

        is_causal = False
        if self.kv_cache is not None and isinstance(input_pos, Tensor):
            k, v = self.kv_cache.update_at(input_pos, k, v)
            if mask is None:
                mask = input_pos[:, None] >= torch.arange(k.shape[2], device=x.device)[None, :]
        elif self.kv_cache is not None and input_pos is not None:
            start = int(input_pos)
            k, v = self.kv_cache.update(start, k, v)
            if mask is None and seqlen > 1:
                # queries at start..start+S-1 over keys 0..start+S-1
                qpos = torch.arange(start, start + seqlen, device=x.device)
                mask = qpos[:, None] >= torch.arange(start + seqlen, device=x.device)[None, :]
        elif mask is None:
            is_causal = True
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = attend(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(bsz, seqlen, self.dim)
        return self.resid_dropout(self.wo(out))


class TransformerBlock(nn.Module):
    """Pre-norm Llama block: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h))."""

    def __init__(self, cfg: GPTConfig, drop_path: float = 0.0):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None = None, input_pos=None) -> Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs_cis, mask, input_pos))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


# --------------------------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------------------------
class GPT(nn.Module):
    """LlamaGen c2i Transformer. `freqs_cis` is a plain fp32 attribute (not in the state dict)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        dpr = [x.item() for x in torch.linspace(0, cfg.drop_path_rate, cfg.n_layer, device="cpu")]
        self.layers = nn.ModuleList(TransformerBlock(cfg, dpr[i]) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.freqs_cis = self._rope_table("cpu")
        self._cache_shape: tuple | None = None
        if not self.output.weight.is_meta:
            self.initialize_weights()

    # --- init / bookkeeping ---------------------------------------------------------------------
    def _rope_table(self, device) -> Tensor:
        c = self.cfg
        with torch.device("cpu"):
            table = precompute_freqs_cis_2d(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num)
        return table.to(device)

    def initialize_weights(self) -> None:
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=std)
        nn.init.zeros_(self.output.weight)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def _freqs(self, device) -> Tensor:
        if self.freqs_cis.device != torch.device(device) or self.freqs_cis.is_meta:
            self.freqs_cis = self._rope_table(device)
        return self.freqs_cis

    def logits(self, h: Tensor) -> Tensor:
        """fp32 logits of last-layer states (final norm, then the output layer)."""
        return self.output(self.norm(h)).float()

    def _check_labels(self, labels: Tensor) -> None:
        hi = self.cls_embedding.embedding_table.num_embeddings
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= hi):
            raise ValueError(
                f"class labels must be in [0, {hi}); got [{int(labels.min())}, {int(labels.max())}]"
            )

    # --- full (teacher-forced) forward ------------------------------------------------------------
    def hidden_states(self, prefix: Tensor, labels: Tensor, train_labels: bool = False) -> Tensor:
        """(B, T, D) last-layer states (before the final norm) from the class token and `prefix`,
        the (B, T - 1, D) input embeddings of tokens 0..T-2: state i reads the label and tokens < i.

        Embeddings rather than indices, so that a model fed continuous tokens (DD2's continuous-input
        teacher and its AR-diffusion model) runs the same Transformer as the teacher.
        """
        seqlen = prefix.shape[1] + 1
        if not 1 <= seqlen <= self.cfg.block_size:
            raise ValueError(f"sequence length {seqlen} outside [1, block_size={self.cfg.block_size}]")
        self._check_labels(labels)
        cond = self.cls_embedding(labels, train=train_labels)[:, : self.cfg.cls_token_num]
        h = torch.cat([cond, prefix], dim=1)
        h = self.tok_dropout(h)
        freqs = self._freqs(h.device)[:seqlen]
        for layer in self.layers:
            h = layer(h, freqs)
        return h

    def _forward_full(self, tokens: Tensor, labels: Tensor, train_labels: bool) -> Tensor:
        prefix = self.tok_embeddings(tokens[:, : tokens.shape[1] - 1])
        return self.logits(self.hidden_states(prefix, labels, train_labels))

    def forward_teacher(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """(B, T, V) fp32 logits; [:, i] predicts token i from [label, tokens[:, :i]]. No label dropout."""
        return self._forward_full(tokens, labels, train_labels=False)

    def forward_train(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Training forward: label dropout (in training mode) and mean next-token cross-entropy."""
        logits = self._forward_full(tokens, labels, train_labels=self.training)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        return logits, loss

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        return self.forward_teacher(tokens, labels)

    # --- KV-cached decoding -------------------------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype=None) -> None:
        """Allocate per-layer KV caches for `max_seq_length` positions (class token included).

        Rounded up to a multiple of 8 like LlamaGen; reused when the shape is unchanged, so
        repeated generations at one batch size allocate nothing and keep the addresses a CUDA
        graph was recorded with (stale entries are never read: each query attends only to
        positions already written).
        """
        dtype = dtype or self.dtype
        max_seq = find_multiple(max_seq_length, 8)
        shape = (max_batch_size, max_seq, dtype, self.device)
        if self._cache_shape == shape and all(lay.attention.kv_cache is not None for lay in self.layers):
            return
        c = self.cfg
        for lay in self.layers:
            lay.attention.kv_cache = KVCache(max_seq).allocate(
                max_batch_size, c.kv_heads, c.head_dim, dtype, self.device
            )
        self._cache_shape = shape
        torch._dynamo.mark_static_address(self._freqs(self.device))

    def clear_caches(self) -> None:
        for lay in self.layers:
            lay.attention.kv_cache = None
        self._cache_shape = None

    def step_hidden(self, h: Tensor, pos: int) -> Tensor:
        """Feed input embeddings (B, S, D) at cache positions pos..pos+S-1; return the (B, D)
        last-layer state of the last one (before the final norm)."""
        if self._cache_shape is None:
            raise RuntimeError("call setup_caches() before prefill()/decode_step()")
        freqs = self._freqs(h.device)[pos : pos + h.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs, None, pos)
        return h[:, -1]

    def _step(self, h: Tensor, pos: int) -> Tensor:
        return self.logits(self.step_hidden(h, pos))

    def class_input(self, labels: Tensor) -> Tensor:
        """(B,) labels -> the (B, cls_token_num, D) class-token input of cache position 0."""
        self._check_labels(labels)
        return self.cls_embedding(labels, train=False)[:, : self.cfg.cls_token_num]

    def prefill(self, labels: Tensor) -> Tensor:
        """Feed the class token at cache position 0; return (B, V) fp32 logits of image token 0."""
        return self._step(self.class_input(labels), 0)

    def decode_step(self, tokens: Tensor, pos: int | Tensor) -> Tensor:
        """Feed image token `pos` (B,) at cache index pos+1; return (B, V) logits of token pos+1.

        An int position is range-checked and attends over the cache prefix; a tensor position
        runs `decode_step_static` (same result, static shapes, unchecked).
        """
        if isinstance(pos, Tensor):
            return self.decode_step_static(tokens, pos)
        if not 0 <= pos < self.cfg.block_size - 1:
            raise ValueError(f"decode position {pos} outside [0, {self.cfg.block_size - 1})")
        h = self.tok_embeddings(tokens.reshape(-1, 1))
        return self._step(h, pos + self.cfg.cls_token_num)

    def decode_step_static(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """`decode_step` with the image position as a (1,) long tensor on the model's device.

        Every position runs the same shapes (attention over the whole preallocated cache, masked
        beyond the current index; RoPE row and cache slot picked by indexing with `pos`) and
        nothing is read back to the host, so one compiled graph serves the whole sequence. The
        position is not range-checked here: checking it would read it on the host.
        """
        if self._cache_shape is None:
            raise RuntimeError("call setup_caches() before prefill()/decode_step()")
        cache_pos = pos.reshape(1) + self.cfg.cls_token_num
        h = self.tok_embeddings(tokens.reshape(-1, 1))
        freqs = self.freqs_cis[cache_pos]
        mask = cache_pos[:, None] >= torch.arange(self._cache_shape[1], device=h.device)[None, :]
        for layer in self.layers:
            h = layer(h, freqs, mask, cache_pos)
        return self.logits(h[:, -1])

    def compiled_decode(self, mode: str | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """`decode_step_static` under torch.compile(fullgraph=True, dynamic=False)
        (`ddcore.models.compiled`): mode None picks "reduce-overhead" (CUDA graphs) on CUDA and
        inductor's "default" elsewhere. One compiled function per mode serves every GPT, so
        graphs are made once per shape, never per position or per model instance. Prefill stays
        eager (one call per image).
        """
        fn = compiled(GPT.decode_step_static, mode or default_mode(self.device))
        return lambda tokens, pos: fn(self, tokens, pos)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

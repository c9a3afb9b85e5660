"""VAR transformer (next-scale prediction), state-dict compatible with `var_d{16,20,24,30}.pth`.

The sequence is the token pyramid flattened coarse to fine (L = sum pk^2 = 680 for 256 px). The
first pk0^2 = 1 position holds the class embedding (+ `pos_start`); the positions of scale k >= 1
hold word_embed(f_hat of scales < k, area-downsampled to pk x pk) — built by the VQVAE, see
`VQVAE.next_input`. Every position adds its level embedding and its absolute position embedding.
Attention is block-causal by scale (a position sees every position of its own and coarser scales),
so the outputs at scale k's positions predict scale k's tokens, all at once.

Blocks are AdaLN-conditioned on the class embedding c: SiLU -> Linear gives, in this order,
gamma1, gamma2, scale1, scale2, shift1, shift2;
    x += gamma1 * Attn(LN(x) (1 + scale1) + shift1);  x += gamma2 * FFN(LN(x) (1 + scale2) + shift2).
Attention l2-normalises q and k per head and multiplies q by exp(min(scale_mul, ln 100)); the
softmax scale is 1. The qkv bias is (q_bias, 0, v_bias); the zero is a buffer (`zero_k_bias`).

Two ways to run it:
  * `forward` / `forward_teacher`: the whole pyramid with the block-causal mask (training, NLL,
    teacher-forced probabilities). Labels are dropped (-> the null class) only when asked.
  * `new_cache` + `step`: one scale at a time, each block appending the scale's keys and values
    to its preallocated KV cache (`ddcore.models.kv_cache`, one per block) and attending to the
    cache without a mask; equal to the masked forward up to float rounding.
The VQVAE is never a submodule: the state dict stays exactly the official one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddcore.models.attention import attend
from ddcore.models.kv_cache import KVCache
from ddcore.models.var_vqvae import OFFICIAL_PATCH_NUMS

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ddcore.models.var_vqvae import VQVAE

VAR_DEPTHS = (16, 20, 24, 30)


@dataclass
class VARConfig:
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    vocab_size: int = 4096
    Cvae: int = 32  # noqa: N815  (the official name; the VQVAE code dimension)
    num_classes: int = 1000
    attn_l2_norm: bool = True
    shared_aln: bool = False
    cond_drop_rate: float = 0.1  # used only by forward(..., drop_labels=True)

    def __post_init__(self) -> None:
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def begin_ends(self) -> list[tuple[int, int]]:
        out, cur = [], 0
        for p in self.patch_nums:
            out.append((cur, cur + p * p))
            cur += p * p
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VARConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown VARConfig keys: {sorted(unknown)}")
        return cls(**d)


def var_config(name: str) -> VARConfig:
    """The official 256-px configs: 'var-d16' | 'var-d20' | 'var-d24' | 'var-d30'."""
    prefix = "var-d"
    if (
        not name.startswith(prefix)
        or not name[len(prefix) :].isdigit()
        or int(name[len(prefix) :]) not in VAR_DEPTHS
    ):
        raise ValueError(
            f"unknown VAR config {name!r}; allowed: {', '.join(f'var-d{d}' for d in VAR_DEPTHS)}"
        )
    d = int(name[len(prefix) :])
    return VARConfig(depth=d, embed_dim=64 * d, num_heads=d)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        c, h = cfg.embed_dim, cfg.num_heads
        self.num_heads, self.head_dim = h, c // h
        self.l2_norm = cfg.attn_l2_norm
        if self.l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, h, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))
        self.proj = nn.Linear(c, c)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """With a cache, this scale's keys and values are appended to it and attended with it."""
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, n, hd)
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.append(k, v)
        out = attend(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class FFN(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        c = cfg.embed_dim
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(c, round(c * cfg.mlp_ratio))
        self.ln = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        self.shared_aln = cfg.shared_aln
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        nd: Tensor | None = None,
    ) -> Tensor:
        """cond: (B, D) class embedding, or (B, 1, 6, C) from the shared AdaLN when shared_aln.

        `nd` (broadcastable to x), when given, is added to the residual stream between attention
        and FFN: the DD1 VAR student's per-block noise/data embedding (the teacher passes none).
        """
        if self.shared_aln:
            mods = self.ada_gss + cond
        else:
            mods = self.ada_lin(cond).view(-1, 1, 6, x.shape[-1])
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)
        x = x + self.attn(self.ln(x) * (1 + scale1) + shift1, mask, cache) * gamma1
        if nd is not None:
            x = x + nd
        return x + self.ffn(self.ln(x) * (1 + scale2) + shift2) * gamma2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        c = cfg.embed_dim
        self.ln = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return self.ln(x) * (1 + scale) + shift


class SharedAdaLin(nn.Linear):
    def forward(self, cond: Tensor) -> Tensor:
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VARConfig()
        c, n_lvl, seq = cfg.embed_dim, len(cfg.patch_nums), cfg.seq_len
        std = math.sqrt(1 / c / 3)
        self.word_embed = nn.Linear(cfg.Cvae, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)  # last row: the null class for CFG
        self.pos_start = nn.Parameter(torch.empty(1, cfg.first_l, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, seq, c))
        self.lvl_embed = nn.Embedding(n_lvl, c)
        for t in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(t, std=std)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c))
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg) for _ in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(c, cfg.vocab_size)

        lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)])
        self.register_buffer("lvl_1L", lvl.view(1, seq))
        bias = torch.where(lvl.view(seq, 1) >= lvl.view(1, seq), 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", bias.view(1, 1, seq, seq))

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    # --- embeddings ----------------------------------------------------------------------------
    def lvl_pos(self, begin: int, end: int) -> Tensor:
        return self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]

    def cond(self, labels: Tensor) -> Tensor:
        """(B,) labels (num_classes = the null class) -> (B, C) class embedding."""
        return self.class_emb(labels)

    def block_cond(self, cond: Tensor) -> Tensor:
        return self.shared_ada_lin(cond) if self.cfg.shared_aln else cond

    def first_input(self, cond: Tensor) -> Tensor:
        """(B, C) class embedding -> the scale-0 input (B, pn0^2, C)."""
        b, n = cond.shape[0], self.cfg.first_l
        return cond.unsqueeze(1).expand(b, n, -1) + self.pos_start.expand(b, n, -1) + self.lvl_pos(0, n)

    def scale_input(self, si: int, x: Tensor) -> Tensor:
        """Scale si >= 1: (B, Cvae, pn, pn) map or (B, pn*pn, Cvae) vectors -> (B, pn*pn, C)."""
        if si < 1:
            raise ValueError("scale 0 is the class token; use first_input")
        if x.dim() == 4:
            x = x.flatten(2).transpose(1, 2)
        begin, end = self.cfg.begin_ends[si]
        if x.shape[1] != end - begin:
            raise ValueError(f"scale {si} has {end - begin} positions, got {x.shape[1]}")
        return self.word_embed(x.float()) + self.lvl_pos(begin, end)

    def logits(self, h: Tensor, cond: Tensor) -> Tensor:
        return self.head(self.head_nm(h.float(), cond.float())).float()

    # --- masked full forward ---------------------------------------------------------------------
    def forward(self, labels: Tensor, x_wo_first_l: Tensor, drop_labels: bool = False) -> Tensor:
        """Teacher-forced logits (B, L, V) from the scale inputs of scales 1.. (B, L - pn0^2, Cvae).

        `drop_labels` replaces labels by the null class with probability cfg.cond_drop_rate (CFG
        training); it is off by default so that teacher-forced logits are deterministic.
        """
        return self.logits(*self.hidden_states(labels, x_wo_first_l, drop_labels))

    def hidden_states(
        self, labels: Tensor, x_wo_first_l: Tensor, drop_labels: bool = False
    ) -> tuple[Tensor, Tensor]:
        """(last-block states (B, L, C), class embedding (B, C)): `forward` before the head, for
        heads other than the teacher's (DD2's AR-diffusion model)."""
        if drop_labels and self.cfg.cond_drop_rate > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.cfg.cond_drop_rate
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        seq = self.cfg.seq_len
        if x_wo_first_l.shape[1] != seq - self.cfg.first_l:
            raise ValueError(
                f"expected {seq - self.cfg.first_l} input positions, got {x_wo_first_l.shape[1]}"
            )
        cond = self.cond(labels)
        b, n0 = labels.shape[0], self.cfg.first_l
        sos = cond.unsqueeze(1).expand(b, n0, -1) + self.pos_start.expand(b, n0, -1)
        x = torch.cat((sos, self.word_embed(x_wo_first_l.float())), dim=1) + self.lvl_pos(0, seq)
        mask = self.attn_bias_for_masking.to(x.dtype)
        bc = self.block_cond(cond)
        for block in self.blocks:
            x = block(x, bc, mask=mask)
        return x, cond

    def forward_teacher(
        self, tokens: Tensor | Sequence[Tensor], labels: Tensor, vqvae: VQVAE, drop_labels: bool = False
    ) -> Tensor:
        """Token pyramid (list of (B, pn*pn) or flat (B, L)) -> logits (B, L, V); the outputs at
        scale k's positions are the distribution of scale k's tokens given the scales before."""
        return self.forward(labels, vqvae.idx_to_var_input(tokens), drop_labels=drop_labels)

    # --- KV-cached stepping --------------------------------------------------------------------
    def new_cache(self) -> list[KVCache]:
        """One KV cache per block, each for the whole pyramid (allocated by the first `step`)."""
        return [KVCache(self.cfg.seq_len) for _ in self.blocks]

    def step(self, x: Tensor, cond: Tensor, cache: list[KVCache]) -> Tensor:
        """Feed one scale's input (B, pn*pn, C) (from first_input / scale_input) -> its logits.

        No mask is needed: the cache holds exactly the coarser scales, and within a scale all
        positions see each other.
        """
        return self.logits(self.step_hidden(x, cond, cache), cond)

    def step_hidden(self, x: Tensor, cond: Tensor, cache: list[KVCache]) -> Tensor:
        """`step` before the head: the scale's last-block states (B, pn*pn, C)."""
        bc = self.block_cond(cond)
        for block, block_cache in zip(self.blocks, cache, strict=True):
            x = block(x, bc, cache=block_cache)
        return x

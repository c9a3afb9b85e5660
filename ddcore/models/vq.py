"""LlamaGen VQ tokenizer (VQ-16 / VQ-8), state-dict compatible with vq_ds16_c2i.pt / vq_ds8_c2i.pt.

Key layout (of the published vq_ds16_c2i.pt): encoder.conv_in, encoder.conv_blocks.{i}.res/attn/downsample,
encoder.mid.{0,1,2}, encoder.norm_out/conv_out, quant_conv, quantize.embedding.weight, buffer
quantize.codebook_used [65536], post_quant_conv, decoder.conv_in, decoder.mid,
decoder.conv_blocks (in processing order: 0 is the widest level), decoder.norm_out/conv_out.

The same classes build the tiny world's tokenizer (small `ch`, short `ch_mult`, `norm_groups`).
Images are in [-1, 1]; tokens are raster order over the (h, w) grid; decoder output is not clamped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VQConfig", "VQ_CONFIGS", "VQModel", "Encoder", "Decoder", "VectorQuantizer"]

CODEBOOK_USED_LEN = 65536


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2
    dropout_p: float = 0.0
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.encoder_ch_mult = tuple(int(m) for m in self.encoder_ch_mult)
        self.decoder_ch_mult = tuple(int(m) for m in self.decoder_ch_mult)
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError("VQConfig: encoder_ch_mult and decoder_ch_mult must have the same length")
        for m in {1, *self.encoder_ch_mult, *self.decoder_ch_mult}:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(
                    f"VQConfig: GroupNorm groups {self.norm_groups} do not divide channel count {self.ch * m}"
                )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_ch_mult"] = list(self.encoder_ch_mult)
        d["decoder_ch_mult"] = list(self.decoder_ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VQConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"VQConfig: unknown field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**d)


VQ_CONFIGS: dict[str, VQConfig] = {
    "VQ-16": VQConfig(),
    "VQ-8": VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),
}


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float, groups: int):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with separate 1x1 q/k/v convs, scale C^-1/2."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (m(h).reshape(b, 1, c, hh * ww).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(c)
        out = out.transpose(-1, -2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig, in_channels: int = 3):
        super().__init__()
        ch, mult, g = cfg.ch, cfg.encoder_ch_mult, cfg.norm_groups
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1, *mult)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            blk = nn.Module()
            res, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[i], ch * m
            for _ in range(cfg.num_res_blocks):
                res.append(ResnetBlock(block_in, block_out, cfg.dropout_p, g))
                block_in = block_out
                if i == len(mult) - 1:
                    attn.append(AttnBlock(block_in, g))
            blk.res, blk.attn = res, attn
            if i != len(mult) - 1:
                blk.downsample = Downsample(block_in)
            self.conv_blocks.append(blk)
        self.mid = nn.ModuleList(
            [
                ResnetBlock(block_in, block_in, cfg.dropout_p, g),
                AttnBlock(block_in, g),
                ResnetBlock(block_in, block_in, cfg.dropout_p, g),
            ]
        )
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for blk in self.conv_blocks:
            for j in range(self.num_res_blocks):
                h = blk.res[j](h)
                if len(blk.attn):
                    h = blk.attn[j](h)
            if hasattr(blk, "downsample"):
                h = blk.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig, out_channels: int = 3):
        super().__init__()
        ch, mult, g = cfg.ch, cfg.decoder_ch_mult, cfg.norm_groups
        self.num_res_blocks = cfg.num_res_blocks
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList(
            [
                ResnetBlock(block_in, block_in, cfg.dropout_p, g),
                AttnBlock(block_in, g),
                ResnetBlock(block_in, block_in, cfg.dropout_p, g),
            ]
        )
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):  # processing order: widest level first
            blk = nn.Module()
            res, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResnetBlock(block_in, block_out, cfg.dropout_p, g))
                block_in = block_out
                if i == len(mult) - 1:
                    attn.append(AttnBlock(block_in, g))
            blk.res, blk.attn = res, attn
            if i != 0:
                blk.upsample = Upsample(block_in)
            self.conv_blocks.append(blk)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for blk in self.conv_blocks:
            for j in range(self.num_res_blocks + 1):
                h = blk.res[j](h)
                if len(blk.attn):
                    h = blk.attn[j](h)
            if hasattr(blk, "upsample"):
                h = blk.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def compute_entropy_loss(affinity: Tensor, temperature: float = 0.01) -> Tensor:
    flat = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(flat, dim=-1)
    log_probs = F.log_softmax(flat + 1e-5, dim=-1)
    avg_probs = probs.mean(0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.n_e, self.e_dim = cfg.codebook_size, cfg.codebook_embed_dim
        self.beta = cfg.commit_loss_beta
        self.entropy_loss_ratio = cfg.entropy_loss_ratio
        self.l2_norm = cfg.codebook_l2_norm
        self.show_usage = cfg.codebook_show_usage
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        if not self.embedding.weight.is_meta:
            with torch.no_grad():
                self.embedding.weight.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
                if self.l2_norm:
                    self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if self.show_usage:
            self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USED_LEN))

    def codebook(self) -> Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def nearest(self, z_flat: Tensor) -> tuple[Tensor, Tensor]:
        """z_flat (N, d) -> (indices (N,), -squared distances (N, V)); z l2-normalised if configured."""
        emb = self.codebook()
        if self.l2_norm:
            z_flat = F.normalize(z_flat, p=2, dim=-1)
        d = z_flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * z_flat @ emb.t()
        return d.argmin(dim=1), -d

    def forward(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """z (B, d, h, w) -> (z_q straight-through (B, d, h, w), losses, indices (B, h*w))."""
        b, _, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        idx, neg_d = self.nearest(z.reshape(-1, self.e_dim))
        z_q = self.codebook()[idx].view(z.shape)
        losses: dict[str, Tensor] = {}
        if self.show_usage and self.training:
            with torch.no_grad():
                n = min(idx.shape[0], CODEBOOK_USED_LEN)
                used = self.codebook_used
                used[: CODEBOOK_USED_LEN - n] = used[n:].clone()
                used[CODEBOOK_USED_LEN - n :] = idx[-n:].to(used.dtype)
                losses["usage"] = torch.tensor(len(torch.unique(used)) / self.n_e)
        if self.training:
            losses["codebook"] = torch.mean((z_q - z.detach()) ** 2)
            losses["commit"] = self.beta * torch.mean((z_q.detach() - z) ** 2)
            losses["entropy"] = self.entropy_loss_ratio * compute_entropy_loss(neg_d)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), losses, idx.view(b, h * w)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def encode_latent(self, x: Tensor) -> Tensor:
        """Pre-quantisation latent (B, d, h, w)."""
        return self.quant_conv(self.encoder(x))

    def encode_indices(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> token indices (B, h*w), raster order."""
        z = self.encode_latent(x)
        b, d, h, w = z.shape
        idx, _ = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, d))
        return idx.view(b, h * w)

    def codebook_vectors(self) -> Tensor:
        """(V, d) the vectors the decoder sees (l2-normalised when codebook_l2_norm)."""
        return self.quantize.codebook()

    @staticmethod
    def _grid(n: int, grid: int | None) -> tuple[int, int]:
        if grid is None:
            grid = math.isqrt(n)
            if grid * grid != n:
                raise ValueError(f"{n} tokens do not form a square grid; pass grid=")
        if n % grid:
            raise ValueError(f"{n} tokens do not fill rows of {grid}")
        return n // grid, grid

    def decode_vectors(self, vectors: Tensor, grid: int | None = None) -> Tensor:
        """Continuous token vectors (B, h*w, d), raster order -> images (B, 3, H, W), ~[-1, 1]."""
        b, n, d = vectors.shape
        h, w = self._grid(n, grid)
        # (b, h, w, d) permuted is already channels-last in memory: no copy
        z = vectors.to(self.post_quant_conv.weight.dtype).reshape(b, h, w, d).permute(0, 3, 1, 2)
        z = z.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(z))

    def decode_code(self, indices: Tensor, grid: int | None = None) -> Tensor:
        """Token indices (B, h*w) -> images (B, 3, H, W) in ~[-1, 1] (not clamped)."""
        return self.decode_vectors(self.codebook_vectors()[indices.long()], grid)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Training forward: (reconstruction, {'codebook', 'commit', 'entropy'[, 'usage']})."""
        z_q, losses, _ = self.quantize(self.encode_latent(x))
        return self.decoder(self.post_quant_conv(z_q)), losses

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

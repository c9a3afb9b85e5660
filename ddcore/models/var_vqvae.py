"""VAR's multi-scale VQVAE, state-dict compatible with `vae_ch160v4096z32.pth`.

An image is encoded to a latent f (B, Cvae, H, W) and quantised *residually* over a pyramid of
scales patch_nums = (1, 2, 3, ..., 16): at scale k the residual is area-downsampled to pk x pk and
snapped to its nearest code (plain Euclidean); the code map is bicubic-upsampled back to H x W,
passed through a small conv Phi_k(h) = (1 - r) h + r conv3x3(h) (r = quant_resi = 0.5), added to
the running reconstruction f_hat and subtracted from the residual. The decoder sees only f_hat.

The VAR transformer never sees codes directly: the input for scale k+1 is f_hat (accumulated over
scales 0..k) area-downsampled to p_{k+1} x p_{k+1}. `next_input` is that one update, shared by
the quantiser, the teacher's sampler, the teacher-forced input and continuous (DD) decoding, so
they cannot drift apart.

Layout notes (pitfalls of the official code):
  * the decoder's `up.{i}` is indexed by resolution level and runs from the deepest level (up.4)
    to up.0 — the reverse of LlamaGen's decoder;
  * four Phi convs are shared by ten scales; scale si uses the conv whose tick in
    linspace(1/(3K), 1 - 1/(3K), K) (K = 4; 1/(2K) margins for other K) is nearest to
    si / (S - 1). Two scales sit on exact ties that float64 rounding breaks, so the ten-scale
    list [0, 0, 1, 1, 1, 2, 2, 3, 3, 3] is hard-coded and the general rule reproduces float64;
  * `quantize.ema_vocab_hit_SV` is a training statistic (one row per scale) kept only so that
    official files load strictly; a wrong row count is rejected (it means a different pyramid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
OFFICIAL_PHI_INDEX = (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)


@dataclass
class VQVAEConfig:
    """Hyper-parameters; the defaults are the official `vae_ch160v4096z32.pth`."""

    vocab_size: int = 4096
    Cvae: int = 32  # noqa: N815  (the official name; the code dimension)
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    quant_resi: float = 0.5
    share_quant_resi: int = 4  # number of Phi convs shared by the scales
    quant_conv_ks: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    norm_groups: int = 32
    in_channels: int = 3

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ValueError(f"patch_nums must be strictly increasing, got {self.patch_nums}")
        if self.share_quant_resi < 1:
            raise ValueError("share_quant_resi must be >= 1 (this layout keeps the Phi convs in qresi_ls)")
        if self.quant_resi <= 0:
            raise ValueError("quant_resi must be > 0 (the official Identity variant has no keys)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"], d["patch_nums"] = list(self.ch_mult), list(self.patch_nums)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VQVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VQVAEConfig keys: {sorted(unknown)}")
        return cls(**d)


def phi_index_list(num_scales: int, num_phi: int) -> list[int]:
    """Which of the `num_phi` shared Phi convs each scale uses (see module docstring)."""
    if num_scales == len(OFFICIAL_PHI_INDEX) and num_phi == 4:
        return list(OFFICIAL_PHI_INDEX)
    if num_scales == 1:
        return [0]
    k = num_phi
    margin = 1 / 3 / k if k == 4 else 1 / 2 / k
    ticks = np.linspace(margin, 1 - margin, k)
    return [int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales)]


# ---------------------------------------------------------------------------------------------
# Convolutional encoder / decoder (the taming / latent-diffusion VQ-f16 body)
# ---------------------------------------------------------------------------------------------


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; q, k, v come from one 1x1 conv (`qkv`)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)  # each (B, C, HW)
        attn = torch.softmax(q.transpose(1, 2) @ k * c**-0.5, dim=-1)  # (B, HWq, HWk)
        out = (v @ attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in the original


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res blocks, optional attention after each, optional resampling."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, c: int, groups: int, attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups) if attn else nn.Identity()
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        g, ch, n_lvl = cfg.norm_groups, cfg.ch, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(cfg.ch_mult):
            lvl = _Level()
            c_out = ch * mult
            for _ in range(cfg.num_res_blocks):
                lvl.block.append(ResnetBlock(c_in, c_out, g))
                c_in = c_out
                if i == n_lvl - 1 and cfg.using_sa:
                    lvl.attn.append(AttnBlock(c_in, g))
            if i != n_lvl - 1:
                lvl.downsample = Downsample(c_in)
            self.down.append(lvl)
        self.mid = _Mid(c_in, g, cfg.using_mid_sa)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.Cvae, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for lvl in self.down:
            for j, block in enumerate(lvl.block):
                h = block(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        g, ch, n_lvl = cfg.norm_groups, cfg.ch, len(cfg.ch_mult)
        c_in = ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.Cvae, c_in, 3, padding=1)
        self.mid = _Mid(c_in, g, cfg.using_mid_sa)
        levels: list[_Level] = []
        for i in reversed(range(n_lvl)):  # built deepest first, stored by level index
            lvl = _Level()
            c_out = ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                lvl.block.append(ResnetBlock(c_in, c_out, g))
                c_in = c_out
                if i == n_lvl - 1 and cfg.using_sa:
                    lvl.attn.append(AttnBlock(c_in, g))
            if i != 0:
                lvl.upsample = Upsample(c_in)
            levels.insert(0, lvl)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for lvl in reversed(self.up):  # up.{last} first
            for j, block in enumerate(lvl.block):
                h = block(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# Residual multi-scale quantiser
# ---------------------------------------------------------------------------------------------


class Phi(nn.Conv2d):
    """Phi(h) = (1 - r) h + r conv3x3(h): the per-scale refinement after upsampling a code map."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, kernel_size=3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: Tensor) -> Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class PhiBank(nn.Module):
    """K Phi convs shared by the scales (`quant_resi.qresi_ls.{k}`)."""

    def __init__(self, c: int, ratio: float, k: int, num_scales: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(c, ratio) for _ in range(k)])
        self.index = phi_index_list(num_scales, k)

    def forward(self, si: int, h: Tensor) -> Tensor:
        return self.qresi_ls[self.index[si]](h)


class MultiScaleQuantizer(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.Cvae)
        self.quant_resi = PhiBank(cfg.Cvae, cfg.quant_resi, cfg.share_quant_resi, len(cfg.patch_nums))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))

    def nearest(self, z: Tensor) -> Tensor:
        """(N, C) -> (N,) index of the nearest code, ||z||^2 + ||e||^2 - 2 z.e as the original."""
        e = self.embedding.weight.float()
        d = (z * z).sum(1, keepdim=True) + (e * e).sum(1) - 2.0 * z @ e.T
        return d.argmin(dim=1)


class VQVAE(nn.Module):
    """Multi-scale VQVAE. Images are in [-1, 1]; token pyramids are lists of (B, pn*pn) indices."""

    def __init__(self, cfg: VQVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VQVAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, ks, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, ks, padding=ks // 2)

    # --- small helpers -----------------------------------------------------------------------
    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.cfg.patch_nums

    @property
    def codebook(self) -> Tensor:
        return self.quantize.embedding.weight

    def split(self, flat: Tensor) -> list[Tensor]:
        """(B, L, ...) flattened pyramid -> list of (B, pn*pn, ...) per scale."""
        return list(torch.split(flat, [p * p for p in self.patch_nums], dim=1))

    def _as_pyramid(self, tokens: Tensor | Sequence[Tensor]) -> list[Tensor]:
        if isinstance(tokens, Tensor):
            if tokens.shape[1] != self.cfg.seq_len:
                raise ValueError(f"expected {self.cfg.seq_len} positions, got {tuple(tokens.shape)}")
            return self.split(tokens)
        if len(tokens) != len(self.patch_nums):
            raise ValueError(f"expected {len(self.patch_nums)} scales, got {len(tokens)}")
        return list(tokens)

    def embed_scale(self, idx: Tensor) -> Tensor:
        """(B, pn*pn) indices -> (B, Cvae, pn, pn) code map."""
        return self.vectors_to_map(self.quantize.embedding(idx))

    @staticmethod
    def vectors_to_map(v: Tensor) -> Tensor:
        """(B, pn*pn, C) raster-ordered vectors -> (B, C, pn, pn)."""
        b, n, c = v.shape
        pn = round(n**0.5)
        if pn * pn != n:
            raise ValueError(f"{n} positions are not a square scale")
        return v.transpose(1, 2).reshape(b, c, pn, pn)

    def new_fhat(self, batch: int, device: torch.device | str) -> Tensor:
        s = self.patch_nums[-1]
        return torch.zeros(batch, self.cfg.Cvae, s, s, device=device, dtype=torch.float32)

    # --- the one shared f_hat update ---------------------------------------------------------
    def scale_contribution(self, si: int, h: Tensor) -> Tensor:
        """Phi(bicubic-upsample(h)) for scale si's code map h (B, Cvae, pn, pn); no resize at the last scale."""
        h = h.float()
        full = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(full, full), mode="bicubic")
        return self.quantize.quant_resi(si, h)

    def next_input(self, si: int, f_hat: Tensor, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """Add scale si's code map h (B, Cvae, pn, pn) to f_hat; return (f_hat, next scale's input).

        The next input is the new f_hat area-downsampled to (B, Cvae, p_{si+1}, p_{si+1}); None
        after the last scale. f_hat is not modified in place.
        """
        f_hat = f_hat + self.scale_contribution(si, h)
        if si == len(self.patch_nums) - 1:
            return f_hat, None
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")

    # --- encoding ----------------------------------------------------------------------------
    def img_to_f(self, x: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(x))

    def f_to_idx_pyramid(self, f: Tensor) -> tuple[list[Tensor], Tensor]:
        """Residual quantisation of a latent f (B, Cvae, H, W) -> (index pyramid, final f_hat)."""
        idx, f_hats = self._residual_quantize(f)
        return idx, f_hats[-1]

    def _residual_quantize(self, f: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Index pyramid and f_hat after every scale. f_hat carries gradients to the codebook and
        the Phi convs (for training); the residual that picks the codes does not."""
        f = f.detach().float()
        b, c, hgt, wid = f.shape
        if hgt != self.patch_nums[-1] or wid != self.patch_nums[-1]:
            raise ValueError(f"latent is {hgt}x{wid}, the last scale is {self.patch_nums[-1]}")
        rest, f_hat, idx_out, f_hats = f.clone(), torch.zeros_like(f), [], []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = rest if si == last else F.interpolate(rest, size=(pn, pn), mode="area")
            idx = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, c)).view(b, pn * pn)
            delta = self.scale_contribution(si, self.embed_scale(idx))
            f_hat = f_hat + delta
            rest = rest - delta.detach()
            idx_out.append(idx)
            f_hats.append(f_hat)
        return idx_out, f_hats

    def img_to_idx_pyramid(self, x: Tensor) -> list[Tensor]:
        """Images in [-1, 1] (B, 3, H, W) -> list of (B, pn*pn) LongTensors, coarse to fine."""
        return self.f_to_idx_pyramid(self.img_to_f(x))[0]

    # --- pyramid -> f_hat -> image -------------------------------------------------------------
    def vectors_pyramid_to_fhat(self, vectors: Sequence[Tensor]) -> Tensor:
        """Continuous per-scale vectors (B, pn*pn, Cvae) through the same accumulation as codes."""
        vectors = self._as_pyramid(vectors)
        f_hat = self.new_fhat(vectors[0].shape[0], vectors[0].device)
        for si, v in enumerate(vectors):
            f_hat, _ = self.next_input(si, f_hat, self.vectors_to_map(v))
        return f_hat

    def idx_pyramid_to_fhat(self, idx: Tensor | Sequence[Tensor]) -> Tensor:
        return self.vectors_pyramid_to_fhat([self.quantize.embedding(i) for i in self._as_pyramid(idx)])

    def fhat_to_img(self, f_hat: Tensor) -> Tensor:
        """f_hat -> image in [-1, 1] (clamped, as the original)."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def idx_pyramid_to_img(self, idx: Tensor | Sequence[Tensor]) -> Tensor:
        return self.fhat_to_img(self.idx_pyramid_to_fhat(idx))

    def decode_vectors_pyramid(self, vectors: Tensor | Sequence[Tensor]) -> Tensor:
        """Continuous tokens ((B, L, Cvae) or a per-scale list) -> image in [-1, 1]."""
        return self.fhat_to_img(self.vectors_pyramid_to_fhat(vectors))

    # --- VAR teacher forcing -----------------------------------------------------------------
    def vectors_to_var_input(self, vectors: Tensor | Sequence[Tensor]) -> Tensor:
        """Per-scale vectors -> VAR's teacher-forcing input (B, L - pn0^2, Cvae) for scales 1..S-1.

        The input at scale k is f_hat accumulated over scales < k, area-downsampled to pk x pk.
        """
        vectors = self._as_pyramid(vectors)
        f_hat = self.new_fhat(vectors[0].shape[0], vectors[0].device)
        out = []
        for si in range(len(self.patch_nums) - 1):
            f_hat, nxt = self.next_input(si, f_hat, self.vectors_to_map(vectors[si]))
            out.append(nxt.flatten(2).transpose(1, 2))
        if not out:
            return f_hat.new_zeros(f_hat.shape[0], 0, self.cfg.Cvae)
        return torch.cat(out, dim=1)

    def idx_to_var_input(self, idx: Tensor | Sequence[Tensor]) -> Tensor:
        return self.vectors_to_var_input([self.quantize.embedding(i) for i in self._as_pyramid(idx)])

    # --- training forward (straight-through), used by the tiny world ------------------------
    def forward(self, x: Tensor, beta: float = 0.25) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(reconstruction, VQ loss, index pyramid) for training a small VQVAE the way the original
        does: the loss averages, over scales, beta ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2,
        and the decoder sees f_hat through a straight-through estimator."""
        f = self.img_to_f(x).float()
        idx, f_hats = self._residual_quantize(f)
        vq_loss = sum(beta * F.mse_loss(fh.detach(), f) + F.mse_loss(fh, f.detach()) for fh in f_hats)
        f_st = f + (f_hats[-1] - f).detach()
        return self.decoder(self.post_quant_conv(f_st)), vq_loss / len(f_hats), idx

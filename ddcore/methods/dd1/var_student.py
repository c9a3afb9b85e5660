"""The DD1 VAR student: the teacher VAR re-wired to map a noise trajectory state X_t (per-scale
code vectors, the first t scales data, the rest Gaussian noise) to the whole final pyramid in one
forward pass.

Layout (the released `VAR-DD/var-d{16,20,24}.pth` students, `DD_Model` in the DD1 code):
  * patch_nums gets an extra leading 1: the sequence is [sos] + the L = sum pn^2 token positions,
    so `pos_1LC` has L + 1 rows and `lvl_embed` S + 1 rows. The teacher's rows are shifted by one;
    row 1 (the new 1x1 slot, where the first real scale now sits) is new.
  * inputs are the raw per-scale code vectors (B, L, Cvae) through the teacher's `word_embed` (the
    teacher instead sees upsampled cumulative f_hat): a noise vector has no meaningful f_hat.
  * attention: a token at level k sees all strictly lower levels and itself only. Within a scale
    q_j = f(eps_j, previous scales), so a token must not mix with its scale-mates' noise.
  * noise/data flag: `n_d_embed` = Embedding(2, C) added at the input (1 for sos and data
    positions), and `layerwise_n_d_embed` = Linear(C, C) x (depth + 1): block i (the teacher's
    `AdaLNSelfAttn`, its `nd` argument) adds its projection between attention and FFN, the last
    one is added before both heads. The flag is the only time signal (t = number of data
    scales; data positions are < L - sum_{s>=t} pn_s^2).
  * heads: the teacher's logits head (`head_nm` + `head`) and a continuous PixArt-style
    `final_layer_conti` (C -> Cvae, adaLN on the class embedding). Outputs are [:, 1:], so output
    j belongs to input position j (token j predicts itself: q_j from eps_j and coarser scales).
Parameter and buffer names match the released checkpoints, so `load_var_student_checkpoint` loads
them strictly (EMA weights under ['trainer']['ema_parameters'], raw under ['trainer']['var_wo_ddp']).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import replace

import torch
from torch import Tensor, nn

from ddcore.checkpoints import load_state_dict_file, load_strict, unwrap_state_dict
from ddcore.methods.dd1.student import FinalLayer, StudentReadout, layer_sources
from ddcore.models.var import VAR, AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin, VARConfig
from ddcore.teachers.var.teacher import suggest_var

__all__ = [
    "DD1VARStudent",
    "clone_var_student",
    "load_var_student_checkpoint",
    "student_levels",
    "student_mask",
]

NEW_ROW_STD = 0.02  # new embedding rows and n_d_embed, as the DD1 teacher initialisation


def student_levels(patch_nums: tuple[int, ...]) -> Tensor:
    """(1, L + 1) level of every position: 0 for sos, k + 1 for the teacher's scale k."""
    pns = (1, *patch_nums)
    return torch.cat([torch.full((p * p,), i) for i, p in enumerate(pns)]).view(1, -1)


def student_mask(patch_nums: tuple[int, ...]) -> Tensor:
    """(1, 1, L + 1, L + 1) additive mask: strictly lower levels and the diagonal are visible."""
    lvl = student_levels(patch_nums).view(-1)
    bias = torch.where(lvl[:, None] > lvl[None, :], 0.0, -torch.inf)
    bias.fill_diagonal_(0.0)
    return bias.view(1, 1, lvl.numel(), lvl.numel())


class DD1VARStudent(StudentReadout, nn.Module):
    def __init__(self, cfg: VARConfig, codebook: Tensor):
        super().__init__()
        if tuple(codebook.shape) != (cfg.vocab_size, cfg.Cvae):
            raise ValueError(
                f"codebook is {tuple(codebook.shape)}, the config wants ({cfg.vocab_size}, {cfg.Cvae})"
            )
        self.cfg = cfg  # the teacher's config; the student's own patch_nums are (1, *cfg.patch_nums)
        c, seq, n_scales = cfg.embed_dim, cfg.seq_len, len(cfg.patch_nums)
        std = math.sqrt(1 / c / 3)
        self.word_embed = nn.Linear(cfg.Cvae, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)  # null row kept: teacher layout
        self.pos_start = nn.Parameter(torch.empty(1, 1, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, seq + 1, c))
        self.lvl_embed = nn.Embedding(n_scales + 1, c)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c))
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg) for _ in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(c, cfg.vocab_size)
        self.n_d_embed = nn.Embedding(2, c)
        self.layerwise_n_d_embed = nn.ModuleList([nn.Linear(c, c) for _ in range(cfg.depth + 1)])
        self.final_layer_conti = FinalLayer(c, cfg.Cvae)
        # persistent like the original's, so a full `var_wo_ddp` state dict loads strictly
        self.register_buffer("lvl_1L", student_levels(cfg.patch_nums))
        self.register_buffer("attn_bias_for_masking", student_mask(cfg.patch_nums))
        # data positions for t data scales are < starts[t] (t = S: everything is data)
        starts = [b for b, _ in cfg.begin_ends] + [seq]
        self._starts = torch.tensor(starts, dtype=torch.long, device="cpu")
        # fp32 plain attribute: not a parameter, not in the released state dicts, never cast to bf16
        self.codebook = codebook.detach().float().clone()
        if not self.head.weight.is_meta:
            self._init_weights(std)

    def _init_weights(self, std: float) -> None:
        """VAR's own initialisation for the fresh model (from_teacher overwrites the shared parts)."""
        for t in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(t, std=std)
        for lin in (*self.layerwise_n_d_embed, self.final_layer_conti.linear):
            nn.init.trunc_normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.n_d_embed.weight, std=NEW_ROW_STD)

    @classmethod
    def from_teacher(cls, var: VAR, codebook: Tensor, extra_layers: int = 0) -> DD1VARStudent:
        """A student whose shared parts are copies of the teacher VAR's weights.

        Copied: word_embed, class_emb, pos_start, blocks, shared_ada_lin, head_nm, head; lvl_embed
        and pos_1LC with the teacher rows shifted by one. New (random): their row 1, n_d_embed, the
        layerwise projections and final_layer_conti. (The original re-initialises class_emb row 1
        where lvl_embed row 1 was meant; here lvl_embed row 1 is the one initialised.)
        `extra_layers` new blocks are placed by `layer_sources`, their attention and FFN output
        projections at zero (each adds only its noise/data projection at initialisation).
        """
        device = var.pos_1LC.device
        sources = layer_sources(var.cfg.depth, extra_layers)
        student = cls(replace(var.cfg, depth=len(sources)), codebook.to("cpu")).to(device)
        with torch.no_grad():
            for name in ("word_embed", "class_emb", "head_nm", "head"):
                getattr(student, name).load_state_dict(getattr(var, name).state_dict())
            for block, src in zip(student.blocks, sources, strict=True):
                if src is None:
                    for lin in (block.attn.proj, block.ffn.fc2):
                        nn.init.zeros_(lin.weight)
                        nn.init.zeros_(lin.bias)
                else:
                    block.load_state_dict(var.blocks[src].state_dict())
            if var.cfg.shared_aln:
                student.shared_ada_lin.load_state_dict(var.shared_ada_lin.state_dict())
            student.pos_start.copy_(var.pos_start)
            for dst, src in (
                (student.lvl_embed.weight, var.lvl_embed.weight),
                (student.pos_1LC[0], var.pos_1LC[0]),
            ):
                dst[0].copy_(src[0])
                dst[2:].copy_(src[1:])
                nn.init.trunc_normal_(dst[1], std=NEW_ROW_STD)
        return student

    # --- bookkeeping --------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    @property
    def token_dim(self) -> int:
        return self.cfg.Cvae

    @property
    def num_scales(self) -> int:
        return len(self.cfg.patch_nums)

    @property
    def transformer_blocks(self) -> nn.ModuleList:
        return self.blocks

    @property
    def num_steps(self) -> int:
        """AR steps of the teacher (scales): t ranges over 0..num_steps."""
        return self.num_scales

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attach_codebook(self, codebook: Tensor) -> None:
        """Set the codebook (a plain attribute, not in the state dict) after a meta-device load."""
        self.codebook = codebook.detach().float().cpu().clone()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        device = self.head.weight.device
        if device.type != "meta" and not self.codebook.is_meta:  # follow the weights, stay fp32
            self.codebook = self.codebook.to(device)
        return out

    def data_len(self, t: Tensor | int) -> Tensor:
        """Number of data positions for t data scales: L - sum_{s>=t} pn_s^2 (same shape as t)."""
        t = torch.as_tensor(t).long().cpu()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > self.num_scales):
            raise ValueError(f"t counts data scales, in [0, {self.num_scales}]; got {t.tolist()}")
        return self._starts[t]

    def perturb(self, data: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """X_t: the first t scales from `data`, the rest from `noise` (both (B, L, Cvae))."""
        keep = self.data_mask(t, data.shape[0], data.device)[..., None]
        return torch.where(keep, data, noise)

    # --- forward ------------------------------------------------------------------------------
    def hidden(self, x: Tensor, labels: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """(final hidden state (B, L + 1, C) fp32 with the last n/d projection added, class
        embedding (B, C), n/d embedding (B, L + 1, C)): what both heads read."""
        bsz, seq_len, _ = x.shape
        if seq_len != self.seq_len:
            raise ValueError(f"student expects {self.seq_len} positions, got {seq_len}")
        data = self.data_mask(t, bsz, x.device)
        flags = torch.cat([data.new_ones(bsz, 1), data], dim=1).long()  # sos counts as data
        cond = self.class_emb(labels.to(x.device).long())
        sos = cond[:, None] + self.pos_start
        h = torch.cat([sos, self.word_embed(x.float())], dim=1)
        h = h + self.lvl_embed(self.lvl_1L) + self.pos_1LC
        nd = self.n_d_embed(flags)
        h = h + nd
        mask = self.attn_bias_for_masking.to(h.dtype)
        bc = self.shared_ada_lin(cond) if self.cfg.shared_aln else cond
        for block, proj in zip(self.blocks, self.layerwise_n_d_embed, strict=False):
            h = block(h, bc, mask, nd=proj(nd))
        h = h.float() + self.layerwise_n_d_embed[-1](nd).float()
        return h, cond, nd

    def forward(
        self, x: Tensor, labels: Tensor, t: Tensor | int, with_cont: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, L, Cvae) = X_t, labels (B,), t (B,) data-scale counts ->
        (logits (B, L, V) fp32, continuous tokens (B, L, Cvae) fp32, or None without `with_cont`);
        output j predicts token j."""
        h, cond, _ = self.hidden(x, labels, t)
        logits = self.head(self.head_nm(h, cond.float())).float()[:, 1:]
        cont = self.final_layer_conti(h, cond.float()[:, None]).float()[:, 1:] if with_cont else None
        return logits, cont

    @torch.no_grad()
    def sample_vectors(
        self, labels: Tensor, noise: Tensor, t_list: tuple[int, ...] | list[int], split_t: int
    ) -> tuple[Tensor, Tensor]:
        """Few-step DD1 sampling in token-vector space: (vectors (B, L, Cvae), indices (B, L)).

        t_list (0, ...) as the official `--t_list`: each step keeps the first t scales of the last
        prediction, resets the rest to the *same* noise and predicts the whole pyramid again;
        split_t is `--loss_split_t`. Decode with `VQVAE.decode_vectors_pyramid`.
        """
        if not len(t_list) or t_list[0] != 0:
            raise ValueError(f"t_list must start at 0 (pure noise), got {list(t_list)}")
        x, tokens = noise, None
        for t in t_list:
            x, tokens = self.predict_vectors(self.perturb(x, noise, t), labels, t, split_t)
        return x, tokens


# derived buffers: recomputed here when a file holds parameters only (EMA weights)
_DERIVED = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")


def load_var_student_checkpoint(
    path: str | os.PathLike,
    cfg: VARConfig,
    codebook: Tensor,
    device: str | torch.device = "cpu",
    ema: bool = True,
) -> DD1VARStudent:
    """Strictly load a DD1 VAR student: a released `var-d*.pth` (EMA weights under
    ['trainer']['ema_parameters'] when `ema`, else ['trainer']['var_wo_ddp']) or a raw state dict.

    Every parameter must be present with its shape; the derived buffers (level ids, the mask,
    the zero k-bias) are filled in when the file lacks them and shape-checked when it has them.
    """
    first = ("ema_parameters", "var_wo_ddp") if ema else ("var_wo_ddp", "ema_parameters")
    sd = dict(unwrap_state_dict(load_state_dict_file(path), prefer=("trainer", *first)))
    with torch.device("meta"):
        student = DD1VARStudent(cfg, torch.empty(cfg.vocab_size, cfg.Cvae))
    fill = {"lvl_1L": student_levels(cfg.patch_nums), "attn_bias_for_masking": student_mask(cfg.patch_nums)}
    for name, buf in student.named_buffers():
        if name.split(".")[-1] in _DERIVED and name not in sd:
            sd[name] = fill.get(name, torch.zeros(buf.shape))
    load_strict(
        student,
        sd,
        drop_patterns=(),
        what=f"DD1 VAR student (depth {cfg.depth}, C {cfg.embed_dim})",
        suggest=suggest_var,
        assign=True,
    )
    student.attach_codebook(codebook)
    return student.to(device).eval()


def clone_var_student(student: DD1VARStudent) -> DD1VARStudent:
    """Deep copy (for EMA weights)."""
    return copy.deepcopy(student)

"""The DD1 LlamaGen student: the teacher's Transformer, re-wired to map a noise trajectory state
X_t to the whole final token sequence in one forward pass.

Initialised from the teacher GPT: class embedding, blocks, final RMSNorm, logits head, 2D RoPE.
New parts (N(0, 0.02), biases 0):
  * `tok_embeddings` = Linear(d -> dim): inputs are continuous vectors (codebook vectors for data
    positions, Gaussian noise for the others), not indices;
  * `n_d_embed` = Embedding(2, dim) added at the input: 1 for the class token and data positions
    (< t), 0 for noise positions; it is the only time signal the network gets;
  * `final_layer_conti`: PixArt-style final layer (LayerNorm without affine, shift/scale from a
    learned table plus the class embedding, Linear(dim -> d)) that regresses continuous tokens.
Input [cls, x_0 .. x_{L-1}] with causal attention; outputs [:, 1:], so the output at input
position i + 1 predicts token i from (cls, x_<=i): q_i depends on eps_<=i, exactly the flow map's
dependency structure.

Parameter names and shapes follow the released DD1 LlamaGen checkpoints
(`LlamaGen-DD/llamagen-{B,L}.pt`, key `ema`), so `load_student_checkpoint` loads them strictly.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import torch
from torch import Tensor, nn

from ddcore.checkpoints import load_state_dict_file, load_strict, unwrap_state_dict
from ddcore.models.compiled import compiled, default_mode
from ddcore.models.llamagen import (
    GPT,
    GPTConfig,
    LabelEmbedder,
    RMSNorm,
    TransformerBlock,
    precompute_freqs_cis_2d,
)
from ddcore.teachers.llamagen.catalogue import suggest_llamagen

__all__ = [
    "DD1Student",
    "FinalLayer",
    "StudentReadout",
    "layer_sources",
    "load_student_checkpoint",
    "student_config",
]


def layer_sources(n_teacher: int, extra: int) -> list[int | None]:
    """Where each student block comes from: teacher block i (an int) or a new block (None).

    The `extra` new blocks are spread evenly behind the teacher's blocks (the first `extra % n`
    teacher blocks take one more), so every depth of the copied network gets room to refine what
    it computes; with extra = 0 this is the teacher's (and the released students') layout."""
    if extra < 0:
        raise ValueError(f"extra_layers must be >= 0, got {extra}")
    per, rest = divmod(extra, n_teacher)
    out: list[int | None] = []
    for i in range(n_teacher):
        out += [i] + [None] * (per + (1 if i < rest else 0))
    return out


def student_config(teacher_cfg: GPTConfig) -> GPTConfig:
    """The teacher's architecture with every dropout off (the student sees no label dropout:
    guidance is baked into the trajectories and there is one forward pass per image)."""
    return replace(
        teacher_cfg,
        token_dropout_p=0.0,
        attn_dropout_p=0.0,
        resid_dropout_p=0.0,
        ffn_dropout_p=0.0,
        drop_path_rate=0.0,
    )


class FinalLayer(nn.Module):
    """LayerNorm -> x (1 + scale) + shift, (shift, scale) = table + class embedding -> Linear."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        """h (B, S, dim), cond (B, 1, dim) -> (B, S, out)."""
        shift, scale = (self.scale_shift_table[None] + cond).chunk(2, dim=1)
        return self.linear(self.norm_final(h) * (1 + scale) + shift)


class StudentReadout:
    """The DD1 read-outs shared by every student family.

    A family supplies `forward(x, labels, t, with_cont)`, `data_len(t)` (how many leading
    positions of X_t are data: t tokens for LlamaGen, the first t scales for VAR), `seq_len`,
    `num_steps` (the teacher's AR steps: t ranges over 0..num_steps) and a `codebook` attribute.
    """

    codebook: Tensor
    seq_len: int

    def data_mask(self, t: Tensor | int, bsz: int, device) -> Tensor:
        """(B, L) True at the data positions of X_t."""
        n = self.data_len(t).reshape(-1).expand(bsz).to(device)
        return torch.arange(self.seq_len, device=device)[None, :] < n[:, None]

    def nearest_indices(self, x: Tensor) -> Tensor:
        """Index of the nearest codebook entry of every vector (B, L, d) -> (B, L)."""
        cb = self.codebook.to(x.device)
        d2 = (x.float() ** 2).sum(-1, keepdim=True) - 2 * x.float() @ cb.T + (cb**2).sum(-1)
        return d2.argmin(-1)

    def final_predict(
        self, x: Tensor, labels: Tensor, t: Tensor | int, idx: Tensor | None = None, with_cont: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        """(continuous (B, L, d) or None, logits (B, L, V)): the data positions of X_t keep the
        input (continuous output = input vector, logits one-hot (0 / -inf) on `idx`, default the
        nearest codebook entry of the input); the others are the model's outputs."""
        logits, cont = self(x, labels, t, with_cont=with_cont)
        keep = self.data_mask(t, x.shape[0], x.device)
        if not bool(keep.any()):  # X_0: nothing to keep (the 1-step path)
            return cont, logits
        idx = self.nearest_indices(x) if idx is None else idx.to(x.device).long()
        onehot = torch.full_like(logits, float("-inf")).scatter_(-1, idx.unsqueeze(-1), 0.0)
        logits = torch.where(keep[..., None], onehot, logits)
        if cont is not None:
            cont = torch.where(keep[..., None], x.float(), cont)
        return cont, logits

    def with_compiled_forward(self, mode: str | None = None) -> StudentReadout:
        """A twin sharing this student's weights whose forward pass runs torch.compile'd
        (`ddcore.models.compiled`; mode None: CUDA graphs on CUDA, inductor's default elsewhere).
        The read-outs around it stay eager; the first pass at each batch size compiles."""
        twin = copy.copy(self)  # shallow: same parameters, buffers and codebook
        forward = type(self).forward

        def compiled_forward(x: Tensor, labels: Tensor, t: Tensor | int, with_cont: bool = True):
            fn = compiled(forward, mode or default_mode(x.device))
            return fn(self, x, labels, t, with_cont)

        twin.forward = compiled_forward
        return twin

    def predict_vectors(
        self, x: Tensor, labels: Tensor, t: Tensor | int, split_t: int, idx: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(vectors (B, L, d), token indices (B, L)): the positions before `data_len(split_t)` use
        codebook[argmax logits], the rest the continuous outputs (decoded without quantisation).
        The continuous head is not run when no position uses it."""
        use_tokens = self.data_mask(split_t, x.shape[0], x.device)
        need_cont = not bool(use_tokens.all())
        cont, logits = self.final_predict(x, labels, t, idx, with_cont=need_cont)
        tokens = logits.argmax(-1)
        snapped = self.codebook.to(x.device)[tokens]
        if not need_cont:
            return snapped, tokens
        return torch.where(use_tokens[..., None], snapped, cont), tokens


class DD1Student(StudentReadout, nn.Module):
    def __init__(self, cfg: GPTConfig, codebook: Tensor):
        super().__init__()
        cfg = student_config(cfg)
        self.cfg = cfg
        d = codebook.shape[1]
        if codebook.shape[0] != cfg.vocab_size:
            raise ValueError(f"codebook has {codebook.shape[0]} entries, vocab_size is {cfg.vocab_size}")
        # row count as the teacher (num_classes + 1 null row when it was trained with label dropout);
        # labels are never dropped here (forward passes train=False)
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Linear(d, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.final_layer_conti = FinalLayer(cfg.dim, d)
        self.n_d_embed = nn.Embedding(2, cfg.dim)
        # the codebook and the RoPE table are plain fp32 attributes: not parameters, not in the
        # released state dicts, and never cast to bf16 with the weights (see _apply)
        self.codebook = codebook.detach().float().clone()
        with torch.device("cpu"):
            self.freqs_cis = precompute_freqs_cis_2d(
                cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num
            )
        if not self.output.weight.is_meta:
            self._init_weights()

    def _init_weights(self) -> None:
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
        nn.init.zeros_(self.output.weight)

    @classmethod
    def from_teacher(cls, gpt: GPT, codebook: Tensor, extra_layers: int = 0) -> DD1Student:
        """A student whose shared parts are copies of the teacher GPT's weights, plus
        `extra_layers` new blocks (`layer_sources`) whose attention and FFN output projections
        start at zero, so each is the identity at initialisation."""
        sources = layer_sources(gpt.cfg.n_layer, extra_layers)
        cfg = replace(gpt.cfg, n_layer=len(sources))
        student = cls(cfg, codebook.to("cpu")).to(gpt.device)
        with torch.no_grad():
            student.cls_embedding.load_state_dict(gpt.cls_embedding.state_dict())
            for block, src in zip(student.layers, sources, strict=True):
                if src is None:
                    nn.init.zeros_(block.attention.wo.weight)
                    nn.init.zeros_(block.feed_forward.w2.weight)
                else:
                    block.load_state_dict(gpt.layers[src].state_dict())
            student.norm.load_state_dict(gpt.norm.state_dict())
            student.output.load_state_dict(gpt.output.state_dict())
        return student

    # --- bookkeeping --------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.cfg.block_size

    @property
    def token_dim(self) -> int:
        return self.codebook.shape[1]

    @property
    def num_steps(self) -> int:
        """AR steps of the teacher: t ranges over 0..num_steps (t = num_steps is all data)."""
        return self.cfg.block_size

    @property
    def transformer_blocks(self) -> nn.ModuleList:
        return self.layers

    def _freqs(self, device) -> Tensor:
        if self.freqs_cis.device != torch.device(device):
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        device = self.output.weight.device
        if device.type != "meta":  # follow the weights' device, stay fp32
            if not self.codebook.is_meta:
                self.codebook = self.codebook.to(device)
            if not self.freqs_cis.is_meta:
                self.freqs_cis = self.freqs_cis.to(device)
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attach_codebook(self, codebook: Tensor) -> None:
        """Set the plain attributes a state dict does not carry (after a meta-device load)."""
        cfg = self.cfg
        self.codebook = codebook.detach().float().cpu().clone()
        self.freqs_cis = precompute_freqs_cis_2d(
            cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num
        )

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, labels: Tensor, t: Tensor | int, with_cont: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, L, d) = X_t, labels (B,), t (B,) data-token counts ->
        (logits (B, L, V) fp32, continuous tokens (B, L, d) fp32, or None without `with_cont`);
        output i predicts token i."""
        bsz, seq_len, _ = x.shape
        if seq_len != self.cfg.block_size:
            raise ValueError(f"student expects {self.cfg.block_size} positions, got {seq_len}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(bsz)
        cond = self.cls_embedding(labels.to(x.device).long(), train=False)  # (B, 1, dim)
        h = torch.cat([cond, self.tok_embeddings(x.to(self.tok_embeddings.weight.dtype))], dim=1)
        # flag 1 for the class token (input position 0) and data tokens (input position i+1, i < t)
        flags = (torch.arange(seq_len + 1, device=x.device)[None, :] <= t[:, None]).long()
        h = h + self.n_d_embed(flags)
        freqs = self._freqs(h.device)[: seq_len + 1]
        for layer in self.layers:
            h = layer(h, freqs)
        logits = self.output(self.norm(h)).float()[:, 1:]
        cont = self.final_layer_conti(h, cond).float()[:, 1:] if with_cont else None
        return logits, cont

    def data_len(self, t: Tensor | int) -> Tensor:
        """Data positions of X_t: t itself (t counts tokens for this family)."""
        t = torch.as_tensor(t).long().cpu()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > self.seq_len):
            raise ValueError(f"t counts data tokens, in [0, {self.seq_len}]; got {t.tolist()}")
        return t


def load_student_checkpoint(
    path: str | os.PathLike,
    cfg: GPTConfig,
    codebook: Tensor,
    device: str | torch.device = "cpu",
    prefer: tuple[str, ...] = ("ema", "model", "module", "state_dict"),
) -> DD1Student:
    """Strictly load a student state dict: a released DD1 `.pt` (EMA weights under `ema`) or ours."""
    sd = unwrap_state_dict(load_state_dict_file(path), prefer=prefer)
    with torch.device("meta"):
        student = DD1Student(cfg, torch.empty_like(codebook, device="meta"))
    what = f"DD1 LlamaGen student (dim {cfg.dim}, {cfg.n_layer} layers)"
    load_strict(student, sd, what=what, suggest=suggest_llamagen, assign=True)
    student.attach_codebook(codebook)
    return student.to(device).eval()


def clone_student(student: DD1Student) -> DD1Student:
    """Deep copy (for EMA weights)."""
    return copy.deepcopy(student)

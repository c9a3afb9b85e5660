"""The AR-diffusion model (DD2 Stage 1): the continuous-input teacher's backbone with its
classification head replaced by the MLP velocity head (`head.VelocityHead`).

Position i's feature z_i is the backbone's last-layer state (after its final norm) reading the
class and the clean prefix vectors q_<i; the head maps (x_t, t, z_i) to the velocity of
x_t = (1 - t) q_i + t eps. Teacher-forced, one backbone pass gives every z_i (training); sampling
runs the backbone with its KV cache one AR step at a time (a token for LlamaGen, a scale for VAR)
and solves each token of the step from its noise with N Euler steps, snapped to the codebook.

One class per family, since reading a prefix of vectors and stepping the cache is the family's own
business: LlamaGen through the continuous teacher's `CodeVectorEmbedding` MLP, VAR through its
native per-scale input (f_hat accumulated from the vectors; `vqvae.next_input`).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ddcore.methods.dd2.head import HeadConfig, VelocityHead
from ddcore.methods.dd2.ode import euler_solve, nearest_code
from ddcore.teachers.base import Teacher


class ARDiffusion(nn.Module):
    """Backbone + velocity head. `forward(q, labels, x_t, t)`: q (B, L, d) clean vectors,
    x_t (B*m, L, d) and t (B*m, L) their m noisings (rows grouped per example) -> v (B*m, L, d)."""

    family = ""

    def __init__(self, head: VelocityHead, codebook: Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("codebook", codebook.detach().float().clone())

    def features(self, q: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, q: Tensor, labels: Tensor, x_t: Tensor, t: Tensor, head_only: bool = False) -> Tensor:
        z = self.features(q, labels)
        if head_only:
            z = z.detach()
        z = z.repeat_interleave(x_t.shape[0] // q.shape[0], dim=0)
        return self.head(x_t, t, z)

    def solve(self, z: Tensor, eps: Tensor, steps: int) -> Tensor:
        """Token indices of the positions with features z (B, n, D) from their noise eps (B, n, d)."""
        x0 = euler_solve(lambda x, t: self.head(x, t, z), eps, steps)
        return nearest_code(x0, self.codebook)


class LlamaGenARDiffusion(ARDiffusion):
    family = "llamagen"

    def __init__(self, gpt: nn.Module, head: VelocityHead, codebook: Tensor):
        super().__init__(head, codebook)
        self.gpt = gpt  # the continuous-input teacher's GPT (token embedding = CodeVectorEmbedding)

    def features(self, q: Tensor, labels: Tensor) -> Tensor:
        prefix = self.gpt.tok_embeddings.embed(q[:, :-1])
        return self.gpt.norm(self.gpt.hidden_states(prefix, labels))

    @torch.no_grad()
    def sample(self, labels: Tensor, eps: Tensor, steps: int) -> Tensor:
        gpt, (bsz, seq_len, _) = self.gpt, eps.shape
        gpt.setup_caches(bsz, seq_len + gpt.cfg.cls_token_num, dtype=torch.float32)
        out = torch.empty(bsz, seq_len, dtype=torch.long, device=eps.device)
        h = gpt.step_hidden(gpt.class_input(labels), 0)
        for i in range(seq_len):
            tok = self.solve(gpt.norm(h)[:, None], eps[:, i : i + 1], steps)[:, 0]
            out[:, i] = tok
            if i + 1 < seq_len:
                h = gpt.step_hidden(gpt.tok_embeddings(tok[:, None]), i + gpt.cfg.cls_token_num)
        return out


class VARARDiffusion(ARDiffusion):
    family = "var"

    def __init__(self, var: nn.Module, vqvae: nn.Module, head: VelocityHead, codebook: Tensor):
        super().__init__(head, codebook)
        self.var = var
        self._vqvae = [vqvae]  # frozen, shared with the teacher: not a trained submodule

    @property
    def vqvae(self) -> nn.Module:
        return self._vqvae[0]

    def features(self, q: Tensor, labels: Tensor) -> Tensor:
        x = self.vqvae.vectors_to_var_input(q.float())
        states, cond = self.var.hidden_states(labels, x)
        return self.var.head_nm(states.float(), cond.float())

    @torch.no_grad()
    def sample(self, labels: Tensor, eps: Tensor, steps: int) -> Tensor:
        var, vq = self.var, self.vqvae
        cond, cache = var.cond(labels), var.new_cache()
        f_hat = vq.new_fhat(labels.shape[0], eps.device)
        h = var.step_hidden(var.first_input(cond), cond, cache)
        out = []
        for si, (b, e) in enumerate(var.cfg.begin_ends):
            tok = self.solve(var.head_nm(h.float(), cond.float()), eps[:, b:e], steps)
            out.append(tok)
            if si + 1 < len(var.cfg.begin_ends):
                f_hat, nxt = vq.next_input(si, f_hat, vq.embed_scale(tok))
                h = var.step_hidden(var.scale_input(si + 1, nxt), cond, cache)
        return torch.cat(out, dim=1)


def feature_dim(teacher: Teacher) -> int:
    return teacher.gpt.cfg.dim if teacher.family == "llamagen" else teacher.var.cfg.embed_dim


def new_ar_diffusion(continuous: Teacher, head_cfg: HeadConfig) -> ARDiffusion:
    """The AR-diffusion model initialised from the continuous-input teacher (a copy of its backbone)."""
    head = VelocityHead(head_cfg).to(continuous.device)
    if continuous.family == "llamagen":
        return LlamaGenARDiffusion(copy.deepcopy(continuous.gpt).float(), head, continuous.codebook)
    if continuous.family == "var":
        return VARARDiffusion(
            copy.deepcopy(continuous.var).float(), continuous.vqvae, head, continuous.codebook
        )
    raise ValueError(
        f"DD2's AR-diffusion model knows the llamagen and var families, not {continuous.family!r}"
    )

"""The student's optimizer: AdamW, or Muon on the transformer blocks' matrices with AdamW elsewhere.

`train.optimizer: muon` orthogonalises the (Nesterov) momentum of every 2-D weight inside the
student's transformer blocks (attention and FFN matrices, VAR's AdaLN projections) and keeps AdamW
for everything else (input projection, class and n/d embeddings, norms, both heads), the split Muon
is designed for. Each matrix's update is scaled by 0.2 sqrt(max(rows, cols)), which matches
AdamW's typical update RMS, so both parts follow the one `train.lr` schedule.
The Newton-Schulz iteration runs in fp32, so the update does not depend on a CPU's bf16 support;
by operation count it adds about a tenth to a training step of the tiny student. Orthogonalising
amplifies a gradient's weak directions, so runs whose gradient sums differ in the last bits (DDP,
gradient accumulation) drift apart more than under AdamW (docs/dd1.md; bf16 drifts the same).
Measured on the tiny world (docs/dd1.md): the same 2000 steps reach a held-out token accuracy
AdamW needs about twice the steps for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ddcore.params import TrainParams

__all__ = ["OPTIMIZERS", "Muon", "MuonWithAdamW", "block_matrices", "build_optimizer", "orthogonalise"]

OPTIMIZERS = ("adamw", "muon")
ADAMW_BETAS = (0.9, 0.95)
# quintic Newton-Schulz coefficients tuned for a steep slope at zero (Jordan et al., Muon): five
# iterations bring every singular value of a normalised matrix into about [0.7, 1.2]
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalise(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately U V^T of g = U S V^T (singular values pushed towards 1), in fp32."""
    a, b, c = NS_COEFFS
    x = g.float()
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    x = x / x.norm().clamp_min(eps)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised per matrix (2-D parameters only)."""

    def __init__(
        self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0, ns_steps: int = 5
    ):
        super().__init__(
            params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "ns_steps": ns_steps}
        )
        for g in self.param_groups:
            bad = [tuple(p.shape) for p in g["params"] if p.ndim != 2]
            if bad:
                raise ValueError(f"Muon takes 2-D parameters only, got shapes {bad}")

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            mu = g["momentum"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                grad = p.grad.float()
                buf.mul_(mu).add_(grad)
                update = orthogonalise(grad.add(buf, alpha=mu), g["ns_steps"])
                if g["weight_decay"]:
                    p.mul_(1 - g["lr"] * g["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-g["lr"] * 0.2 * math.sqrt(max(p.shape)))


def block_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the model's transformer blocks (`model.transformer_blocks`)."""
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `transformer_blocks` ModuleList for Muon")
    return [p for p in blocks.parameters() if p.ndim == 2 and p.requires_grad]


class MuonWithAdamW:
    """Two optimizers stepped as one. `param_groups` lists both (setting "lr" on each group sets
    the schedule for both); the state dict holds both, so checkpoints resume either exactly."""

    def __init__(
        self, muon_params: Iterable[nn.Parameter], adamw_params: Iterable[nn.Parameter], tp: TrainParams
    ):
        if not hasattr(torch.optim, "Muon"):
            raise RuntimeError(
                f"train.optimizer 'muon' needs torch.optim.Muon (torch >= 2.9), found {torch.__version__}"
            )
        self.muon = torch.optim.Muon(
            list(muon_params), lr=tp.lr, weight_decay=tp.weight_decay, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = torch.optim.AdamW(
            list(adamw_params), lr=tp.lr, betas=ADAMW_BETAS, weight_decay=tp.weight_decay
        )

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError(f"optimizer state has keys {sorted(state)}, expected a Muon + AdamW state")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def build_optimizer(model: nn.Module, tp: TrainParams) -> torch.optim.Optimizer | MuonWithAdamW:
    if tp.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=tp.lr, betas=ADAMW_BETAS, weight_decay=tp.weight_decay
        )
    if tp.optimizer == "muon":
        mats = block_matrices(model)
        ids = {id(p) for p in mats}
        rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
        return MuonWithAdamW(mats, rest, tp)
    raise ValueError(f"train.optimizer {tp.optimizer!r}: allowed {', '.join(OPTIMIZERS)}")

"""The student's optimizer: AdamW, or Muon on the transformer blocks' matrices with AdamW elsewhere.

`train.optimizer: muon` hands every 2-D weight inside the student's transformer blocks (attention
and FFN matrices, VAR's AdaLN projections) to Muon (torch's algorithm, as `StackedMuon` below), which
orthogonalises their Nesterov momentum by a few Newton-Schulz iterations, and keeps AdamW for
everything else (input projection, class and n/d embeddings, norms, both heads), the split Muon is
designed for. Muon runs with
`adjust_lr_fn="match_rms_adamw"` (update scaled by 0.2 sqrt(max(rows, cols)), AdamW's typical RMS),
so both parts follow the one `train.lr` schedule. Orthogonalising amplifies a gradient's weak
directions, so runs whose gradient sums differ in the last bits (DDP, gradient accumulation) drift
apart more than under AdamW (measured in docs/dd1.md). On the tiny world the same 2000 steps reach
the held-out token accuracy and image metrics AdamW needs about twice the steps for (docs/dd1.md).

`StackedMuon` is torch's Muon with the Newton-Schulz iterations run once per matrix shape on the
stacked updates instead of once per matrix: the same algorithm, coefficients and bf16 rounding, and
the same state (a `momentum_buffer` per parameter), so either class resumes the other's checkpoints.
A student's blocks hold a few shapes many times over, and on a CPU the per-matrix iterations are small
matmuls dominated by per-call overhead (measured in docs/dd1.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import get_args

import torch
from torch import Tensor, nn

from ddcore.params import TrainParams

__all__ = ["OPTIMIZERS", "MuonWithAdamW", "StackedMuon", "block_matrices", "build_optimizer"]

OPTIMIZERS: tuple[str, ...] = get_args(TrainParams.model_fields["optimizer"].annotation)
ADAMW_BETAS = (0.9, 0.95)


def _adamw(params: Iterable[nn.Parameter], tp: TrainParams) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=tp.lr, betas=ADAMW_BETAS, weight_decay=tp.weight_decay)


def block_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the model's transformer blocks (`model.transformer_blocks`)."""
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `transformer_blocks` ModuleList for Muon")
    return [p for p in blocks.parameters() if p.ndim == 2 and p.requires_grad]


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch's Muon (Keller Jordan's quintic)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")


def _muon_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The per-shape lr of torch's Muon (its `adjust_lr_fn` options)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(rows / cols)  # "spectral_unclamped"


def orthogonalise(stack: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """Quintic Newton-Schulz on a (n, rows, cols) stack, each matrix as torch's Muon does it alone:
    bf16, transposed to wide, divided by its Frobenius norm, `steps` iterations."""
    a, b, c = coefficients
    x = stack.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class StackedMuon(torch.optim.Optimizer):
    """torch's Muon (same arguments, defaults and state), orthogonalising all same-shape updates of a
    group in one batched iteration. Needs no torch.optim.Muon, so it also runs on torch < 2.9."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
    ):
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"adjust_lr_fn {adjust_lr_fn!r}: allowed {ADJUST_LR_FNS}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got one of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim.Optimizer's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse or torch.is_complex(g) for g in grads):
                raise RuntimeError("Muon supports dense real gradients only")
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = (
                [g.lerp(m, momentum) for g, m in zip(grads, bufs, strict=True)] if group["nesterov"] else bufs
            )
            by_shape: dict[torch.Size, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(p.shape, []).append(i)
            lr, decay = group["lr"], group["weight_decay"]
            for shape, idx in by_shape.items():
                stack = torch.stack([updates[i] for i in idx])
                ortho = orthogonalise(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
                shape_lr = _muon_lr(lr, group["adjust_lr_fn"], shape)
                for k, i in enumerate(idx):
                    params[i].mul_(1 - lr * decay)
                    params[i].add_(ortho[k], alpha=-shape_lr)
        return loss


class MuonWithAdamW:
    """Two optimizers stepped as one. `param_groups` lists both (setting "lr" on each group sets
    the schedule for both); the state dict holds both, so checkpoints resume either exactly."""

    def __init__(
        self,
        muon_params: Iterable[nn.Parameter],
        adamw_params: Iterable[nn.Parameter],
        tp: TrainParams,
    ):
        self.muon = StackedMuon(
            list(muon_params),
            lr=tp.lr,
            weight_decay=tp.weight_decay,
            adjust_lr_fn="match_rms_adamw",
        )
        self.adamw = _adamw(list(adamw_params), tp)

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
        return _adamw(model.parameters(), tp)
    if tp.optimizer == "muon":
        mats = block_matrices(model)
        ids = {id(p) for p in mats}
        rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
        return MuonWithAdamW(mats, rest, tp)
    raise ValueError(f"train.optimizer {tp.optimizer!r}: allowed {', '.join(OPTIMIZERS)}")

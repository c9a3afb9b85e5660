"""The student's optimizer: AdamW, or Muon on the transformer blocks' matrices with AdamW elsewhere.

`train.optimizer: muon` hands every 2-D weight inside the student's transformer blocks (attention
and FFN matrices, VAR's AdaLN projections) to torch's Muon, which orthogonalises their Nesterov
momentum by a few Newton-Schulz iterations, and keeps AdamW for everything else (input projection,
class and n/d embeddings, norms, both heads), the split Muon is designed for. Muon runs with
`adjust_lr_fn="match_rms_adamw"` (update scaled by 0.2 sqrt(max(rows, cols)), AdamW's typical RMS),
so both parts follow the one `train.lr` schedule. Orthogonalising amplifies a gradient's weak
directions, so runs whose gradient sums differ in the last bits (DDP, gradient accumulation) drift
apart more than under AdamW (measured in docs/dd1.md). On the tiny world the same 2000 steps reach
the held-out token accuracy and image metrics AdamW needs about twice the steps for (docs/dd1.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import get_args

import torch
from torch import nn

from ddcore.params import TrainParams

__all__ = ["OPTIMIZERS", "MuonWithAdamW", "block_matrices", "build_optimizer"]

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


class MuonWithAdamW:
    """Two optimizers stepped as one. `param_groups` lists both (setting "lr" on each group sets
    the schedule for both); the state dict holds both, so checkpoints resume either exactly."""

    def __init__(
        self,
        muon_params: Iterable[nn.Parameter],
        adamw_params: Iterable[nn.Parameter],
        tp: TrainParams,
    ):
        if not hasattr(torch.optim, "Muon"):
            raise RuntimeError(
                f"train.optimizer 'muon' needs torch.optim.Muon (torch >= 2.9); torch {torch.__version__} has none"
            )
        self.muon = torch.optim.Muon(
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

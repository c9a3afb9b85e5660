"""Scaled dot-product attention shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attend(q: Tensor, k: Tensor, v: Tensor, **kw) -> Tensor:
    """F.scaled_dot_product_attention, except under bf16 autocast on a CPU, where it runs in fp32:
    there the bf16 flash-attention backward took ~7x as long as the fp32 one (docs/dd1.md,
    "bf16 on CPU"), while the projections around it keep bf16's speed."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)

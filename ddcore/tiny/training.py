"""The scaffolding every tiny-world training loop shares (judge, tokenizers, AR models).

Each loop seeds torch's global RNG (model init, label dropout) and a separate batch generator
with the same seed, warms the LR up linearly and decays it on a cosine, draws uniform random
batches, and shows a throttled progress bar. The pieces are kept small and call exactly what the
loops called before, in the same order, so that moving a loop onto them leaves its weights
bit-for-bit unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

__all__ = ["cosine_with_warmup", "optimise", "random_batch", "seeded", "step_bar", "warmup_cosine"]


def cosine_with_warmup(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    """LR multiplier: linear warmup, then cosine from 1 down to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def seeded(seed: int) -> torch.Generator:
    """Seed the global RNG and return a CPU generator with the same seed for the batches.

    Two streams so that the batch order does not depend on how many random numbers the model's
    initialisation (or the device) consumes."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, max_warmup: int) -> LambdaLR:
    """`cosine_with_warmup` over `steps`, warming up for min(max_warmup, steps // 10) steps."""
    warmup = min(max_warmup, steps // 10)
    return LambdaLR(opt, lambda s: cosine_with_warmup(s, steps, warmup))


def step_bar(steps: int, desc: str, progress: bool) -> tqdm:
    """range(steps) behind a progress bar refreshed at most every 2 s (cheap on a busy CPU)."""
    return tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0)


def random_batch(n: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """`batch_size` indices drawn uniformly (with replacement) from range(n)."""
    return torch.randint(0, n, (batch_size,), generator=generator)


def optimise(
    opt: torch.optim.Optimizer,
    sched: LambdaLR,
    loss: Tensor,
    clip: float | None = None,
    params: Iterable[nn.Parameter] | None = None,
) -> None:
    """One update: clear the gradients, backpropagate `loss`, clip `params` to norm `clip` (if
    given), step the optimiser and the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        if params is None:
            raise ValueError("optimise: clip needs the parameters to clip")
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()

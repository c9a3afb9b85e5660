"""torch.compile'd forms of the static-shape functions that sampling runs (a KV-cached decode
step, a student pass, a VQ decode), shared by teachers and students so both sides of a speed
comparison are compiled the same way.

Each function is compiled unbound, with its module as the first argument: the weights are graph
inputs, not constants, so one compiled function serves every model of the same shape and graphs
are made once per shape (batch size, model size, dtype, device), never per model instance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = ["compiled", "default_mode", "uses_cuda_graphs"]

# (function, mode) -> the callable `compiled` returns
_CACHE: dict[tuple[Callable, str], Callable] = {}


def default_mode(device: torch.device | str) -> str:
    """CUDA graphs ("reduce-overhead") on CUDA, inductor's "default" elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def uses_cuda_graphs(mode: str) -> bool:
    return bool(torch._inductor.list_mode_options(mode).get("triton.cudagraphs", False))


def compiled(fn: Callable, mode: str) -> Callable:
    """`fn` under torch.compile(fullgraph=True, dynamic=False), made once per (fn, mode).

    Under CUDA graphs the outputs live in buffers the next replay overwrites, so the returned
    callable marks a new step before each call and clones the tensors it returns.
    """
    key = (fn, mode)
    if key in _CACHE:  # called on every pass: no compile-mode lookup after the first
        return _CACHE[key]
    cfn = torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
    if not uses_cuda_graphs(mode):
        _CACHE[key] = cfn
        return cfn

    def run(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, cfn(*args, **kwargs))

    _CACHE[key] = run
    return run

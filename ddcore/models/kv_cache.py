"""The KV cache of both model families: one attention layer's keys and values, preallocated.

LlamaGen decodes one token per step and VAR one scale (pn² tokens) per step, but an attention
layer asks the same of its cache in both: store the keys and values of the positions fed now,
then attend over every position fed so far. So both use this one class, in the style of
gpt-fast: (B, H, S_max, hd) buffers for the model's whole sequence, written in place. There is
no `torch.cat` of the growing prefix at every step, and the addresses never change, which a
compiled (CUDA-graph) decode step needs.

Writing:
  * `update(start, k, v)`: positions [start, start + S); returns the filled prefix [0, start + S)
    as views (shapes grow with the position: eager decoding, LlamaGen's int positions);
  * `append(k, v)`: `update` at the end of the last write (VAR feeds its scales in order);
  * `update_at(pos, k, v)`: at the indices in a device tensor; returns the whole buffers, so every
    step has the same shapes and nothing is read back to the host (the caller masks the slots
    not written yet): LlamaGen's static / compiled decode step.
The buffers are allocated up front by `allocate` (LlamaGen's `setup_caches`, before any compile)
or else on the first write, with that write's batch size and the dtypes of its keys and values
(VAR: autocast decides them). A plain object, not a module: never in a state dict.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of one attention layer for up to `max_seq` positions."""

    def __init__(self, max_seq: int) -> None:
        self.max_seq = max_seq
        self.k: Tensor | None = None  # (B, H, max_seq, hd), allocated by `allocate`
        self.v: Tensor | None = None
        self.length = 0  # end of the last `update` / `append`

    def allocate(
        self,
        batch: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        v_dtype: torch.dtype | None = None,
    ) -> KVCache:
        """Zeroed buffers (B, H, max_seq, hd), marked as fixed-address inputs for torch.compile
        (a CUDA graph of a compiled step then writes into them in place instead of copying them
        on every replay). Returns self."""
        shape = (batch, n_heads, self.max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=v_dtype or dtype, device=device)
        torch._dynamo.mark_static_address(self.k)
        torch._dynamo.mark_static_address(self.v)
        self.length = 0
        return self

    def _rows(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The buffers' first k.shape[0] rows (allocating the buffers if this is the first write)."""
        if self.k is None or self.v is None:
            self.allocate(k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device, v_dtype=v.dtype)
        b = k.shape[0]
        if b > self.k.shape[0]:
            raise ValueError(f"KV cache overflow: batch {b} vs {tuple(self.k.shape)}")
        return self.k[:b], self.v[:b]

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, S, hd) at [start, start+S); return views of everything up to there."""
        end = start + k.shape[2]
        if end > self.max_seq:
            raise ValueError(f"KV cache overflow: positions up to {end} vs max_seq {self.max_seq}")
        k_all, v_all = self._rows(k, v)
        k_all[:, :, start:end] = k
        v_all[:, :, start:end] = v
        self.length = end
        return k_all[:, :, :end], v_all[:, :, :end]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """`update` right after the positions written so far."""
        return self.update(self.length, k, v)

    def update_at(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, S, hd) at the cache indices `pos` (S,) held in a tensor; return the
        whole (B, H, max_seq, hd) buffers. Static shapes and no host read of `pos`: the caller
        masks the positions not written yet. Indices are not range-checked (that would sync)."""
        k_all, v_all = self._rows(k, v)
        k_all[:, :, pos] = k
        v_all[:, :, pos] = v
        return k_all, v_all

"""One set of content hashes: file digests, JSON fingerprints, seeds derived from names.

Every identity the project stores (stage markers, tiny-world parts, trajectory configurations,
training runs, teachers, registered students) is built from these, so two places never hash the
same thing two ways.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_digest(obj: Any, compact: bool = False) -> str:
    """16 hex of the sha256 of `obj` as sorted-key JSON (`compact`: no spaces after separators).

    Both spellings are stored in files people already have (tiny-world parts, trajectory and run
    fingerprints use the spaced one, stage markers the compact one), so both stay."""
    separators = (",", ":") if compact else None
    blob = json.dumps(obj, sort_keys=True, default=str, separators=separators)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(*parts: Any) -> str:
    """Compact JSON digest of a tuple of parts (what a stage's output depends on)."""
    return json_digest(list(parts), compact=True)


def seed_from(*parts: Any) -> int:
    """A 63-bit seed from named parts ("perm", seed, epoch): stable across runs and machines."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def update_with_tensor(h: Any, t: Tensor) -> None:
    """Feed dtype, shape and the raw bytes of `t` into the hash object `h`."""
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    # flattened first: a size-1 dim of a channels-last weight may carry any stride
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

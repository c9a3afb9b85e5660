"""Teacher samples: DD2's training data, drawn from the teacher itself (data-free).

Sample i has class i mod num_classes and the noise of seed `seed_from("dd2-sample", seed, i)`; the
teacher draws it with its own sampler (`Teacher.sample`, the multinomial draw of its sampling
distribution), so every sample is a pure function of (teacher, sampling, seed, i). Samples are
written in shards of `shard_size` (safetensors, atomic); a shard whose stored config matches is
kept, so an interrupted stage resumes with the shards it has and never mixes configurations.
The last `val_samples` samples are held out (NLL of the continuous-input teacher, validation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ddcore.checkpoints import atomic_path, atomic_write_json
from ddcore.hashing import json_digest, seed_from
from ddcore.params import SamplesParams, SamplingParams
from ddcore.teachers.base import Teacher, teacher_fingerprint

MANIFEST = "manifest.json"


def shard_path(out: Path, k: int) -> Path:
    return out / f"shard_{k:05d}.safetensors"


def samples_config(teacher: Teacher, sampling: SamplingParams, sp: SamplesParams) -> str:
    """What one shard's content depends on (not num_samples: raising it keeps the shards made)."""
    return json_digest(
        {
            "teacher": teacher_fingerprint(teacher),
            "sampling": sampling.model_dump(mode="json"),
            "seed": sp.seed,
            "shard_size": sp.shard_size,
        }
    )


def num_shards(sp: SamplesParams) -> int:
    return math.ceil(sp.num_samples / sp.shard_size)


def _shard_config(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("config")
    except Exception:  # a truncated or foreign file is simply not a finished shard
        return None


def sample_labels(indices: Tensor, num_classes: int) -> Tensor:
    return indices % num_classes


@torch.no_grad()
def generate_samples(
    teacher: Teacher,
    sampling: SamplingParams,
    sp: SamplesParams,
    out: Path,
    shard_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> dict:
    """Write the missing shards (all, or `shard_ids`); return the manifest (written when all exist)."""
    out.mkdir(parents=True, exist_ok=True)
    config = samples_config(teacher, sampling, sp)
    todo = list(range(num_shards(sp))) if shard_ids is None else list(shard_ids)
    missing = [k for k in todo if _shard_config(shard_path(out, k)) != config]
    from tqdm.auto import tqdm

    for k in tqdm(missing, desc="teacher samples", unit="shard", disable=not progress):
        lo, hi = k * sp.shard_size, min((k + 1) * sp.shard_size, sp.num_samples)
        idx = torch.arange(lo, hi)
        tokens = []
        for b in range(lo, hi, sp.batch_size):
            sl = idx[b - lo : b - lo + sp.batch_size]
            labels = sample_labels(sl, teacher.num_classes).to(teacher.device)
            seeds = [seed_from("dd2-sample", sp.seed, int(i)) for i in sl]
            tokens.append(teacher.sample(labels, seeds, sampling).cpu().to(torch.int32))
        with atomic_path(shard_path(out, k)) as tmp:
            save_file({"tokens": torch.cat(tokens), "index": idx}, str(tmp), metadata={"config": config})
    manifest = {
        "config": config,
        "num_samples": sp.num_samples,
        "shard_size": sp.shard_size,
        "val_samples": min(sp.val_samples, sp.num_samples // 2),
        "seq_len": teacher.seq_len,
        "num_classes": teacher.num_classes,
        "teacher_fingerprint": teacher_fingerprint(teacher),
    }
    if all(_shard_config(shard_path(out, k)) == config for k in range(num_shards(sp))):
        for extra in out.glob("shard_*.safetensors"):  # of a larger num_samples: not part of this set
            if int(extra.stem.split("_")[1]) >= num_shards(sp):
                extra.unlink()
        atomic_write_json(out / MANIFEST, manifest)
    return manifest


class SampleSet:
    """All shards in memory: tokens (N, L) long, labels (N,), and the train / held-out split."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if not (d / MANIFEST).is_file():
            raise FileNotFoundError(f"{d}: no {MANIFEST}; run the samples stage first")
        self.manifest = json.loads((d / MANIFEST).read_text())
        from safetensors.torch import load_file

        parts = [load_file(str(shard_path(d, k))) for k in range(self.num_shards)]
        self.tokens = torch.cat([p["tokens"] for p in parts]).long()[: self.manifest["num_samples"]]
        index = torch.cat([p["index"] for p in parts])[: self.manifest["num_samples"]]
        self.labels = sample_labels(index, self.manifest["num_classes"])
        self.n_val = int(self.manifest["val_samples"])
        self.n_train = len(self.tokens) - self.n_val

    @property
    def num_shards(self) -> int:
        return math.ceil(self.manifest["num_samples"] / self.manifest["shard_size"])

    @property
    def config(self) -> str:
        return self.manifest["config"]

    def train_batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.tokens[idx], self.labels[idx]

    def val(self) -> tuple[Tensor, Tensor]:
        return self.tokens[self.n_train :], self.labels[self.n_train :]

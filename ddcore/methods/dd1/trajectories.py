"""DD1 training data: (noise sequence, teacher token sequence) pairs made by the flow map.

Each pair is one teacher generation in which the multinomial draw is replaced by the DD1 flow
map (`FlowChooser`): eps (L, d) ~ N(0, I) goes in, token indices q (L,) come out, and
q_i = flow(eps_i; p(. | q_<i)). Every intermediate state of the trajectory is
X_t = (codebook[q_<t], eps_>=t), so only eps and q are stored (`build_xt` rebuilds X_t).

Storage (out_dir):
  shard_00000.safetensors   noise (n, L, d) fp16, tokens (n, L) int16 (int32 if V > 32767),
                            labels (n,) int64, seeds (n,) int64
  shard_00000.json          the shard's metadata: config fingerprint, count, sha256 of the
                            .safetensors file, seconds, pairs/s (written after the tensors)
  manifest.json             rebuilt from the shard metadata under a file lock
The noise is rounded to fp16 *before* the flow runs, so the stored noise is exactly the noise
that produced the tokens.

Resumable, extensible and parallel: a shard is done when its .json exists, it holds the expected
count and the sha256 of its tensors matches; done shards are never rewritten, missing or corrupt
ones are (re)generated. Shard i's pairs do not depend on num_pairs, so raising num_pairs only
adds shards (and completes a partial last one). Processes
may work on disjoint `shard_ids` at once: each writes only its own files (atomically), and the
manifest is rebuilt under an exclusive lock. Seeds are a hash of (trajectory seed, shard id,
index in shard) and labels are drawn per shard from their own hash, so a shard's content does
not depend on which process makes it, on the batch size, or on the other shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ddcore.checkpoints import atomic_path, atomic_write_json
from ddcore.hashing import json_digest, seed_from, sha256_file
from ddcore.methods.dd1.flowmap import FlowChooser, FlowSolver
from ddcore.params import FlowParams, SamplingParams, TrajectoryParams
from ddcore.teachers.base import Teacher, teacher_fingerprint

__all__ = [
    "FORMAT_VERSION",
    "Manifest",
    "ShardInfo",
    "TrajectoryDataset",
    "TrajectoryError",
    "build_xt",
    "config_fingerprint",
    "generate_trajectories",
    "load_manifest",
    "pair_seeds",
    "shard_labels",
    "shard_ranges",
    "trajectory_batch",
    "teacher_fingerprint",
    "verify_shards",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".manifest.lock"


class TrajectoryError(RuntimeError):
    """The trajectory directory is incomplete, corrupt or made with another configuration."""


# --------------------------------------------------------------------------------------------
# identities
# --------------------------------------------------------------------------------------------
def config_fingerprint(
    teacher_fp: str, sampling: SamplingParams, flow: FlowParams, traj: TrajectoryParams
) -> str:
    """What a shard's content depends on. The batch size is a speed knob and is left out, and so
    is num_pairs: shard i holds the same pairs whatever the total, so a set can be extended."""
    return json_digest(
        {
            "version": FORMAT_VERSION,
            "teacher": teacher_fp,
            "sampling": sampling.model_dump(mode="json"),
            "flow": flow.model_dump(mode="json"),
            "shard_size": traj.shard_size,
            "seed": traj.seed,
        }
    )


def pair_seeds(seed: int, shard_id: int, count: int) -> list[int]:
    """Per-pair noise seeds: a hash of (trajectory seed, shard id, index in shard)."""
    return [seed_from("dd1-noise", seed, shard_id, j) for j in range(count)]


def shard_labels(seed: int, shard_id: int, count: int, num_classes: int) -> Tensor:
    """Class labels, uniform over classes, drawn from the shard's own generator."""
    g = torch.Generator().manual_seed(seed_from("dd1-labels", seed, shard_id))
    return torch.randint(0, num_classes, (count,), generator=g)


def shard_ranges(traj: TrajectoryParams) -> list[tuple[int, int]]:
    """(start, count) of every shard in global pair order."""
    n = math.ceil(traj.num_pairs / traj.shard_size)
    return [
        (i * traj.shard_size, min(traj.shard_size, traj.num_pairs - i * traj.shard_size)) for i in range(n)
    ]


def _index_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= 32767 else torch.int32


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------
@dataclass
class ShardInfo:
    shard_id: int
    start: int
    count: int
    file: str
    sha256: str
    bytes: int
    seconds: float
    pairs_per_s: float


@dataclass
class Manifest:
    version: int
    config: str  # config fingerprint
    teacher: dict
    sampling: dict
    flow: dict
    trajectories: dict
    seq_len: int
    token_dim: int
    vocab_size: int
    num_classes: int
    num_pairs: int
    num_shards: int
    noise_dtype: str
    index_dtype: str
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.num_shards and self.done == self.num_pairs

    @property
    def pairs_per_s(self) -> float:
        secs = sum(s.seconds for s in self.shards)
        return self.done / secs if secs > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["complete"] = self.complete
        d["pairs_done"] = self.done
        d["pairs_per_s"] = self.pairs_per_s
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = {k: v for k, v in d.items() if k not in ("complete", "pairs_done", "pairs_per_s")}
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        return cls(**d)


def load_manifest(out_dir: str | os.PathLike) -> Manifest:
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        raise TrajectoryError(f"{p}: no trajectory manifest (has the trajectories stage run?)")
    return Manifest.from_dict(json.loads(p.read_text()))


def _shard_paths(out_dir: Path, shard_id: int) -> tuple[Path, Path]:
    stem = f"shard_{shard_id:05d}"
    return out_dir / f"{stem}.safetensors", out_dir / f"{stem}.json"


def _valid_shard(
    out_dir: Path, shard_id: int, config: str, count: int, replace: bool = False
) -> ShardInfo | None:
    """The shard's info if it is finished, made with this config, holds `count` pairs (the last
    shard of a set that was later extended does not), and its tensors match their sha256.
    A shard made with another config is refused, or with `replace` treated as missing."""
    data, meta = _shard_paths(out_dir, shard_id)
    if not (data.is_file() and meta.is_file()):
        return None
    try:
        m = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None
    if m.get("config") != config:
        if replace:
            return None
        raise TrajectoryError(
            f"{meta}: made with configuration {m.get('config')}, not {config} (other teacher, sampling, "
            "flow or trajectory params); use a fresh directory"
        )
    if m["info"].get("count") != count:
        return None
    if data.stat().st_size != m.get("bytes") or sha256_file(data) != m.get("sha256"):
        return None
    return ShardInfo(**m["info"])


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    with open(out_dir / LOCK, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _rebuild_manifest(
    out_dir: Path, base: Manifest, ranges: list[tuple[int, int]], replace: bool = False
) -> Manifest:
    """Scan shard metadata (checksums verified) and write manifest.json atomically, under the lock."""
    with _locked(out_dir):
        shards = [
            s
            for i, (_, count) in enumerate(ranges)
            if (s := _valid_shard(out_dir, i, base.config, count, replace)) is not None
        ]
        man = Manifest(**{**asdict(base), "shards": shards})
        atomic_write_json(out_dir / MANIFEST, man.to_dict())
    return man


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def trajectory_batch(
    teacher: Teacher, sampling: SamplingParams, chooser: FlowChooser, seeds: Sequence[int], labels: Tensor
) -> tuple[Tensor, Tensor]:
    """(fp16 noise, token indices) of one batch of pairs. The noise is rounded to fp16 first, so
    the stored noise is exactly the noise the flow map sees."""
    noise = teacher.noise(seeds).to(torch.float16)
    return noise, teacher.generate(labels, sampling, noise.float(), chooser=chooser)


def _generate_shard(
    teacher: Teacher,
    sampling: SamplingParams,
    chooser: FlowChooser,
    traj: TrajectoryParams,
    shard_id: int,
    start: int,
    count: int,
    config: str,
    out_dir: Path,
    progress: bool,
) -> ShardInfo:
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    seeds = pair_seeds(traj.seed, shard_id, count)
    labels = shard_labels(traj.seed, shard_id, count, teacher.num_classes)
    noise_all, tokens_all = [], []
    batches = range(0, count, traj.batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"trajectories shard {shard_id}", leave=False)
    for b0 in batches:
        sl = slice(b0, min(b0 + traj.batch_size, count))
        noise, tokens = trajectory_batch(teacher, sampling, chooser, seeds[sl], labels[sl])
        noise_all.append(noise.cpu())
        tokens_all.append(tokens.cpu())
    tokens = torch.cat(tokens_all)
    if (tokens < 0).any() or (tokens >= teacher.vocab_size).any():
        raise TrajectoryError(f"shard {shard_id}: teacher returned indices outside [0, {teacher.vocab_size})")
    tensors = {
        "noise": torch.cat(noise_all).contiguous(),
        "tokens": tokens.to(_index_dtype(teacher.vocab_size)).contiguous(),
        "labels": labels.to(torch.int64).contiguous(),
        "seeds": torch.tensor(seeds, dtype=torch.int64),
    }
    data, meta = _shard_paths(out_dir, shard_id)
    with atomic_path(data) as tmp:
        # one metadata key: safetensors stores metadata in a hash map, so several keys would be
        # written in a random order and identical shards would not be byte-identical
        meta_str = json.dumps({"config": config, "shard_id": shard_id, "start": start}, sort_keys=True)
        save_file(tensors, str(tmp), metadata={"dd1": meta_str})
    seconds = time.perf_counter() - t0
    info = ShardInfo(
        shard_id=shard_id,
        start=start,
        count=count,
        file=data.name,
        sha256=sha256_file(data),
        bytes=data.stat().st_size,
        seconds=round(seconds, 3),
        pairs_per_s=round(count / seconds, 3),
    )
    atomic_write_json(
        meta, {"config": config, "sha256": info.sha256, "bytes": info.bytes, "info": asdict(info)}
    )
    return info


def generate_trajectories(
    teacher: Teacher,
    sampling_params: SamplingParams,
    flow_params: FlowParams,
    traj_params: TrajectoryParams,
    out_dir: str | os.PathLike,
    shard_ids: Sequence[int] | None = None,
    progress: bool = True,
    replace: bool = False,
) -> Manifest:
    """Generate the missing (or corrupt) shards among `shard_ids` (default: all) and return the
    manifest rebuilt from every finished shard in `out_dir`.

    A directory holding shards of another configuration is refused, unless `replace`: then such
    shards are regenerated in place (safe with parallel workers, each owning its shard ids), and
    a call for all shards also deletes shard files beyond this set's range."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(traj_params)
    ids = list(range(len(ranges))) if shard_ids is None else [int(i) for i in shard_ids]
    bad = [i for i in ids if not 0 <= i < len(ranges)]
    if bad:
        raise ValueError(f"shard ids {bad} outside [0, {len(ranges)}) for {traj_params.num_pairs} pairs")
    tfp = teacher_fingerprint(teacher)
    config = config_fingerprint(tfp, sampling_params, flow_params, traj_params)
    base = Manifest(
        version=FORMAT_VERSION,
        config=config,
        teacher={"family": teacher.family, "fingerprint": tfp},
        sampling=sampling_params.model_dump(mode="json"),
        flow=flow_params.model_dump(mode="json"),
        trajectories=traj_params.model_dump(mode="json"),
        seq_len=teacher.seq_len,
        token_dim=teacher.token_dim,
        vocab_size=teacher.vocab_size,
        num_classes=teacher.num_classes,
        num_pairs=traj_params.num_pairs,
        num_shards=len(ranges),
        noise_dtype="float16",
        index_dtype=str(_index_dtype(teacher.vocab_size)).removeprefix("torch."),
    )
    chooser = FlowChooser(teacher.codebook, FlowSolver.from_params(flow_params))
    for i in ids:
        start, count = ranges[i]
        if _valid_shard(out, i, config, count, replace) is not None:
            continue  # finished: never rewritten
        info = _generate_shard(
            teacher, sampling_params, chooser, traj_params, i, start, count, config, out, progress
        )
        if progress:
            print(
                f"[trajectories] shard {i}: {count} pairs in {info.seconds:.1f} s ({info.pairs_per_s:.1f} pairs/s)"
            )
    if replace and shard_ids is None:
        for extra in out.glob("shard_*"):
            m = re.fullmatch(r"shard_(\d+)\.(json|safetensors)", extra.name)
            if m and int(m.group(1)) >= len(ranges):
                extra.unlink()
    return _rebuild_manifest(out, base, ranges, replace)


def verify_shards(out_dir: str | os.PathLike) -> Manifest:
    """Re-check every shard against its checksum; raise unless the set is complete and intact."""
    out = Path(out_dir)
    man = load_manifest(out)
    ranges = shard_ranges(TrajectoryParams(**man.trajectories))
    bad = [
        s.shard_id
        for s in man.shards
        if _valid_shard(out, s.shard_id, man.config, ranges[s.shard_id][1]) is None
    ]
    missing = sorted(set(range(man.num_shards)) - {s.shard_id for s in man.shards})
    if bad or missing:
        raise TrajectoryError(f"{out}: corrupt shards {bad}, missing shards {missing}; rerun generation")
    if not man.complete:
        raise TrajectoryError(f"{out}: {man.done}/{man.num_pairs} pairs; rerun generation")
    return man


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def build_xt(noise: Tensor, tokens: Tensor, t: Tensor | int, codebook: Tensor) -> Tensor:
    """X_t = (codebook[tokens[:, :t]], noise[:, t:]) with a per-row t: (B, L, d) float."""
    bsz, seq_len, _ = noise.shape
    t = (
        torch.as_tensor(t, device=noise.device).expand(bsz)
        if not isinstance(t, Tensor) or t.dim() == 0
        else t
    )
    data = codebook.to(device=noise.device, dtype=torch.float32)[tokens.long()]
    is_data = torch.arange(seq_len, device=noise.device)[None, :] < t.to(noise.device)[:, None]
    return torch.where(is_data[..., None], data, noise.float())


class TrajectoryDataset:
    """All pairs of a finished trajectory directory in memory (fp16 noise, int64 tokens).

    Indexing returns (noise (L, d) fp32, tokens (L,), label); `batch(idx, t)` returns the
    model inputs X_t for a set of indices and per-row t.
    """

    def __init__(self, traj_dir: str | os.PathLike, verify: bool = True):
        from safetensors.torch import load_file

        self.dir = Path(traj_dir)
        self.manifest = verify_shards(self.dir) if verify else load_manifest(self.dir)
        parts = [
            load_file(str(self.dir / s.file)) for s in sorted(self.manifest.shards, key=lambda s: s.start)
        ]
        self.noise = torch.cat([p["noise"] for p in parts])
        self.tokens = torch.cat([p["tokens"] for p in parts]).long()
        self.labels = torch.cat([p["labels"] for p in parts]).long()
        self.seeds = torch.cat([p["seeds"] for p in parts])
        if self.noise.shape[0] != self.manifest.num_pairs:
            raise TrajectoryError(
                f"{self.dir}: {self.noise.shape[0]} pairs, manifest says {self.manifest.num_pairs}"
            )

    def __len__(self) -> int:
        return self.noise.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.noise[i].float(), self.tokens[i], int(self.labels[i])

    def batch(self, idx: Tensor, t: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(X_t (B, L, d), target tokens (B, L), labels (B,)) for pair indices `idx`."""
        noise, tokens = self.noise[idx], self.tokens[idx]
        return build_xt(noise, tokens, t, codebook), tokens, self.labels[idx]

    def marginals(self, idx: Tensor | None = None) -> Tensor:
        """(L, V) per-position token frequencies (the one-step set-prediction optimum)."""
        tok = self.tokens if idx is None else self.tokens[idx]
        V = self.manifest.vocab_size
        counts = torch.zeros(tok.shape[1], V, dtype=torch.float64)
        counts.scatter_add_(1, tok.T.contiguous(), torch.ones_like(tok.T, dtype=torch.float64))
        return counts / tok.shape[0]

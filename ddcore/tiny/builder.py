"""The resumable build every tiny world shares, whatever its tokenizer and AR model.

A world is built part by part (data -> judge -> tokenizer -> tokens -> AR model -> quality).
Each saved part carries a hash of everything it depends on (its parameters, its inputs' hashes,
a code version); a part whose files exist with the same hash is loaded instead of rebuilt, so an
interrupted preparation resumes where it stopped and a finished one is a no-op. `WorldBuilder`
runs the parts and keeps the bookkeeping a world's report carries (hashes, reused parts, wall and
CPU times, threads, machine load); the judge part, the hash helpers and the sample grids are
here too. What a family trains and measures stays in its package (`ddcore.teachers.<family>`).

Part files: `name.safetensors` + `name.json`, the JSON holding the part's metadata and `hash`.
Parts whose JSON must stay a plain model config (the loaders reject other keys) keep the
metadata in a sidecar `name.part.json`, written last. JSON-only parts are one `name.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from ddcore.checkpoints import (
    atomic_path,
    atomic_write_json,
    load_model_config,
    load_safetensors_model,
    save_model,
)
from ddcore.hashing import json_digest
from ddcore.params import TinyWorldParams
from ddcore.tiny.data import CLASS_NAMES, to_uint8
from ddcore.tiny.evaluator import (
    EvaluatorConfig,
    TinyEvaluator,
    accuracy,
    load_evaluator,
    save_evaluator,
    train_evaluator,
)

log = logging.getLogger("ddcore.tiny")

T = TypeVar("T")
M = TypeVar("M", bound=torch.nn.Module)
# metadata keys the builder adds to every saved part (not part of what the part measured)
BOOKKEEPING = ("hash", "seconds", "cpu_seconds")

__all__ = [
    "BOOKKEEPING",
    "Clock",
    "WorldBuilder",
    "default_world_dir",
    "evaluator_part",
    "finished",
    "judge_reconstructions",
    "load_config_model",
    "loadavg",
    "part_hash",
    "read_json",
    "save_grid",
    "save_reconstruction_grid",
    "save_sample_grid",
    "threads",
    "world_fields",
]


# --------------------------------------------------------------------------------------------
# hashing / bookkeeping
# --------------------------------------------------------------------------------------------
def world_fields(world: TinyWorldParams, *prefixes: str, keys: tuple[str, ...] = ()) -> dict:
    """The world parameters named `keys` or starting with one of `prefixes` (a part's inputs)."""
    return {k: v for k, v in world.model_dump().items() if k.startswith(prefixes) or k in keys}


def part_hash(version: int, fields: dict | None = None, **inputs: Any) -> str:
    """A part's dependency hash: its code `version`, the world `fields` it reads and its `inputs`
    (its input parts' hashes, other settings), as one sorted-key JSON digest."""
    return json_digest({"v": version, **inputs, **(fields or {})})


def read_json(path: Path) -> Any | None:
    """The parsed file, or None if it is missing or not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(record: Path, digest: str, files: Iterable[Path] = ()) -> dict | None:
    """The metadata in `record` if it and every file in `files` exist and it was built with
    `digest`, else None (the part must be rebuilt)."""
    if not record.is_file() or not all(Path(f).is_file() for f in files):
        return None
    meta = read_json(record)
    return meta if isinstance(meta, dict) and meta.get("hash") == digest else None


@contextlib.contextmanager
def threads() -> Iterator[int]:
    """Apply DD_NUM_THREADS (if set) for the duration of the preparation."""
    from ddcore.settings import get_settings

    wanted, before = get_settings().num_threads, torch.get_num_threads()
    if wanted > 0:
        torch.set_num_threads(wanted)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def loadavg() -> list[float] | None:
    """The machine's 1/5/15-minute load (recorded: a loaded machine explains slow builds)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def default_world_dir(preset: str) -> Path:
    """Where the pipeline keeps a preset's world: <model_root>/<preset>/teacher."""
    from ddcore.settings import get_settings

    return get_settings().model_root / preset / "teacher"


class Clock:
    """Wall and process-CPU seconds since creation (CPU time is what a busy machine cannot inflate)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def times(self) -> dict[str, float]:
        return {"seconds": time.perf_counter() - self.wall0, "cpu_seconds": time.process_time() - self.cpu0}


# --------------------------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------------------------
class WorldBuilder:
    """Runs one world's parts in `out`, in the order they are called, reusing each part whose
    stored hash is `hashes[name]`; use it as a context manager (it applies DD_NUM_THREADS).

    `metas[name]` is each part's metadata (as saved, with its build `seconds` / `cpu_seconds`),
    `timings[name]` the wall time it took in this call (0 when reused), `reused` the reused parts.
    """

    def __init__(self, out: Path | str, hashes: dict[str, str]) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.hashes = hashes
        self.metas: dict[str, dict] = {}
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self.loadavg_start = loadavg()
        self.total = Clock()
        self.torch_threads = torch.get_num_threads()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> WorldBuilder:
        self.torch_threads = self._stack.enter_context(threads())
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()

    def _record(self, name: str, clock: Clock, meta: dict, was_reused: bool) -> None:
        self.metas[name] = meta
        self.timings[name] = 0.0 if was_reused else clock.times()["seconds"]
        if was_reused:
            self.reused.append(name)
            log.info("tiny world: %s reused (hash %s)", name, meta.get("hash"))

    def step(self, name: str, run: Callable[[], T]) -> T:
        """A part that is not saved (cheap and seeded, e.g. the procedural data): run and time it."""
        clock = Clock()
        obj = run()
        self._record(name, clock, clock.times(), False)
        return obj

    def _part(
        self,
        name: str,
        record: Path,
        files: Sequence[Path],
        load: Callable[[dict], T],
        build: Callable[[], tuple[T, dict]],
        save: Callable[[T, dict], None],
    ) -> T:
        digest = self.hashes[name]
        clock = Clock()
        if meta := finished(record, digest, files):
            obj = load(meta)
            self._record(name, clock, meta, True)
            return obj
        obj, meta = build()
        meta = {**meta, "hash": digest, **clock.times()}
        save(obj, meta)
        self._record(name, clock, meta, False)
        return obj

    def part(
        self,
        name: str,
        load: Callable[[dict], T],
        build: Callable[[], tuple[T, dict]],
        save: Callable[[T, dict], None] | None = None,
        sidecar: bool = False,
    ) -> T:
        """Load the part `name` if it was built with its hash, else build and save it.

        `build` returns (object, metadata); `save(object, metadata)` writes `name.safetensors` and
        `name.json` (default: `save_model` with the metadata as the JSON). With `sidecar` the JSON
        is the save's own (a plain config) and the metadata goes to `name.part.json`, written last.
        `load(metadata)` rebuilds the object from the files.
        """
        base = self.out / name
        weights, config = base.with_name(name + ".safetensors"), base.with_name(name + ".json")
        record = base.with_name(name + ".part.json") if sidecar else config

        def write(obj: T, meta: dict) -> None:
            if save is None:
                save_model(base, obj, meta)  # type: ignore[arg-type]
            else:
                save(obj, meta)
            if sidecar:
                atomic_write_json(record, meta)

        files = (weights, config, record) if sidecar else (weights, config)
        return self._part(name, record, files, load, build, write)

    def json_part(self, name: str, build: Callable[[], dict]) -> dict:
        """A part that is one JSON file (`name.json`, e.g. the quality measurements); returns what
        `build` measured, without the builder's bookkeeping keys."""
        path = self.out / f"{name}.json"

        def save(_: None, meta: dict) -> None:
            atomic_write_json(path, meta)

        self._part(name, path, (path,), lambda meta: None, lambda: (None, build()), save)
        return {k: v for k, v in self.metas[name].items() if k not in BOOKKEEPING}

    def summary(self) -> dict:
        """The report's bookkeeping: hashes, reused parts, this call's and the builds' times, machine."""
        build_s = {k: round(float(m["seconds"]), 2) for k, m in self.metas.items()}
        build_cpu_s = {k: round(float(m["cpu_seconds"]), 2) for k, m in self.metas.items()}
        return {
            "hashes": self.hashes,
            "reused": list(self.reused),
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            "total_s": round(self.total.times()["seconds"], 2),
            "build_s": build_s,
            "build_total_s": round(sum(build_s.values()), 2),
            "build_cpu_s": build_cpu_s,
            "build_total_cpu_s": round(sum(build_cpu_s.values()), 2),
            "machine": {
                "torch_threads": self.torch_threads,
                "cpu_count": os.cpu_count(),
                "loadavg_start": self.loadavg_start,
                "loadavg_end": loadavg(),
            },
        }

    def write_report(self, filename: str, report: dict, problems: Iterable[str] = ()) -> Path:
        """Write the world's report into `out` and log its quality problems."""
        path = atomic_write_json(self.out / filename, report)
        for p in problems:
            log.warning("tiny world quality: %s", p)
        return path


def load_config_model(
    base: Path, make: Callable[[dict], M], device: str | torch.device = "cpu", **load_kw: Any
) -> M:
    """A sidecar part's model: built by `make` from `base`.json (its plain config) on the meta
    device (no init work, no global RNG draws), then given `base`.safetensors strictly; frozen."""
    config = load_model_config(base)
    with torch.device("meta"):
        model = make(config)
    load_safetensors_model(base, model, what=str(base), assign=True, **load_kw)
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# the judge
# --------------------------------------------------------------------------------------------
def evaluator_part(
    builder: WorldBuilder,
    images: np.ndarray,
    labels: np.ndarray,
    attributes: np.ndarray,
    world: TinyWorldParams,
    seed: int,
    lr: float,
    progress: bool = True,
) -> TinyEvaluator:
    """The world's judge network as the part `evaluator` (trained on uint8 `images`, on the CPU)."""
    path = builder.out / "evaluator"

    def build() -> tuple[TinyEvaluator, dict]:
        cfg = EvaluatorConfig(image_size=world.image_size, num_classes=world.num_classes)
        model = train_evaluator(
            images,
            labels,
            attributes,
            cfg,
            steps=world.evaluator_steps,
            batch_size=world.evaluator_batch_size,
            lr=lr,
            seed=seed,
            progress=progress,
        )
        return model, {"class_names": list(CLASS_NAMES[: world.num_classes])}

    return builder.part(
        "evaluator",
        lambda meta: load_evaluator(path),
        build,
        lambda model, meta: save_evaluator(path, model, meta),
    )


def judge_reconstructions(
    evaluator: TinyEvaluator, real01: Tensor, recon01: Tensor, labels: Tensor | np.ndarray
) -> dict[str, float]:
    """The judge's accuracy on real images and on their reconstructions through the tokenizer
    (both in [0, 1]), and their ratio: what the tokenizer costs the AR model at best."""
    acc_real = accuracy(evaluator, real01, labels)
    acc_recon = accuracy(evaluator, recon01, labels)
    return {
        "evaluator_accuracy_real": acc_real,
        "evaluator_accuracy_recon": acc_recon,
        "recon_accuracy_ratio": acc_recon / max(acc_real, 1e-12),
    }


# --------------------------------------------------------------------------------------------
# sample grids
# --------------------------------------------------------------------------------------------
def save_grid(
    path: Path, images: Tensor, labels: Tensor | None, num_classes: int | None, per_row: int
) -> None:
    """PNG grid: one row per class (first `per_row` of each) if labels are given, else row-major."""
    from PIL import Image

    if labels is not None and num_classes is not None:
        rows = [images[labels == c][:per_row] for c in range(num_classes)]
    else:
        rows = [images[i : i + per_row] for i in range(0, images.shape[0], per_row)]
    h, w = images.shape[2:]
    canvas = np.full((len(rows) * (h + 2), per_row * (w + 2), 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(to_uint8(row)):
            canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = img
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2), Image.NEAREST).save(
            tmp, "PNG"
        )


def save_sample_grid(out: Path, images: Tensor, labels: Tensor, num_classes: int, per_class: int) -> None:
    """`samples.png`: a row of (at most 10) teacher samples per class."""
    save_grid(out / "samples.png", images, labels, num_classes, per_row=min(per_class, 10))


def save_reconstruction_grid(
    out: Path, real01: Tensor, recon01: Tensor, labels: np.ndarray | Tensor, num_classes: int
) -> None:
    """`reconstructions.png`: real / reconstruction pairs (in [0, 1]) of the first 10 x
    num_classes reference images, sorted by class, 10 pairs a row."""
    labels = np.asarray(labels)
    n = min(len(labels), 10 * num_classes)
    order = torch.as_tensor(np.argsort(labels[:n], kind="stable"))
    pairs = torch.stack([real01[:n][order], recon01[:n][order]], dim=1).flatten(0, 1)
    save_grid(out / "reconstructions.png", pairs, None, None, per_row=20)

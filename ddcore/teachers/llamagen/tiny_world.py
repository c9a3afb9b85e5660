"""Prepare (and load) the offline tiny world: data -> evaluator -> VQ -> tokens -> GPT -> quality.

Every command of the project runs on this world by default, so it must be cheap to build, fully
offline and deterministic, and it must still be a real test bed: a 64-token class-conditional
LlamaGen teacher (same GPT and VQ code as the published models) whose CFG samples are judged by
an evaluator network that also serves as the FID feature extractor. See docs/tiny-world.md.

Each part is saved as `name.safetensors` + `name.json`; the JSON carries a hash of everything
the part depends on (its parameters, the hashes of its inputs, a code version). A part whose
files exist with the same hash is loaded instead of rebuilt, so an interrupted preparation
resumes where it stopped and a finished one is a no-op.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from ddcore.checkpoints import (
    CheckpointError,
    atomic_path,
    atomic_write_json,
    load_model_config,
    load_safetensors_model,
    load_state_dict_file,
    save_model,
)
from ddcore.models.llamagen import GPT, GPTConfig
from ddcore.models.vq import VQConfig, VQModel
from ddcore.params import SamplingParams, TinyWorldParams
from ddcore.teachers.llamagen.catalogue import suggest_llamagen
from ddcore.teachers.llamagen.tiny_gpt import gpt_config_for, mean_nll, train_gpt
from ddcore.teachers.llamagen.tiny_vq import codebook_usage, reconstruct, tokenize, train_vq, vq_config_for
from ddcore.tiny.data import (
    CLASS_NAMES,
    make_dataset,
    make_dataset_with_attributes,
    to_model_range,
    to_uint8,
    to_unit,
)
from ddcore.tiny.evaluator import (
    SAMPLE_SEED_BASE,
    EvaluatorConfig,
    TinyEvaluator,
    accuracy,
    accuracy_per_class,
    load_evaluator,
    save_evaluator,
    train_evaluator,
)

log = logging.getLogger("ddcore.tiny")

# Bump a version when the code of that part changes what it produces: the hash then changes and
# the part (and everything downstream) is rebuilt.
CODE_VERSIONS = {"data": 1, "evaluator": 1, "vq": 1, "tokens": 1, "gpt": 1, "quality": 1}
HOLDOUT_SEED_OFFSET = 7919  # held-out real images (accuracies); eval's FID reference uses another
DEFAULT_SAMPLING = SamplingParams(cfg_scale=3.0)

__all__ = [
    "DEFAULT_SAMPLING",
    "check_quality",
    "default_world_dir",
    "load_tiny_world",
    "prepare_tiny_world",
]


# --------------------------------------------------------------------------------------------
# hashing / bookkeeping
# --------------------------------------------------------------------------------------------
def _hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_hashes(world: TinyWorldParams, sampling: SamplingParams) -> dict[str, str]:
    """The dependency hash of every part (chained: a part's hash includes its inputs' hashes)."""
    w = world.model_dump()

    def pick(*prefixes: str, keys: tuple[str, ...] = ()) -> dict:
        return {k: v for k, v in w.items() if k.startswith(prefixes) or k in keys}

    data = _hash(
        {"v": CODE_VERSIONS["data"], **pick(keys=("image_size", "num_classes", "train_images", "seed"))}
    )
    evaluator = _hash({"v": CODE_VERSIONS["evaluator"], "data": data, **pick("evaluator_")})
    vq = _hash({"v": CODE_VERSIONS["vq"], "data": data, **pick("vq_")})
    tokens = _hash({"v": CODE_VERSIONS["tokens"], "vq": vq})
    gpt = _hash({"v": CODE_VERSIONS["gpt"], "tokens": tokens, **pick("gpt_", keys=("class_dropout_prob",))})
    quality = _hash(
        {
            "v": CODE_VERSIONS["quality"],
            "parts": [evaluator, vq, gpt],
            "sampling": sampling.model_dump(),
            **pick(keys=("holdout_images", "quality_samples_per_class")),
        }
    )
    return {"data": data, "evaluator": evaluator, "vq": vq, "tokens": tokens, "gpt": gpt, "quality": quality}


def _finished(base: Path, digest: str) -> dict | None:
    """The part's JSON if `base`.safetensors/.json exist and were built with `digest`, else None."""
    if not (
        base.with_name(base.name + ".safetensors").is_file() and base.with_name(base.name + ".json").is_file()
    ):
        return None
    try:
        meta = load_model_config(base)
    except CheckpointError:
        return None
    return meta if meta.get("hash") == digest else None


@contextlib.contextmanager
def _threads() -> Iterator[int]:
    """Apply DD_NUM_THREADS (if set) for the duration of the preparation."""
    from ddcore.settings import get_settings

    wanted, before = get_settings().num_threads, torch.get_num_threads()
    if wanted > 0:
        torch.set_num_threads(wanted)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def default_world_dir(preset: str) -> Path:
    from ddcore.settings import get_settings

    return get_settings().model_root / preset / "teacher"


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------
class _Clock:
    """Wall and process-CPU seconds since creation (CPU time is what a busy machine cannot inflate)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def times(self) -> dict[str, float]:
        return {"seconds": time.perf_counter() - self.wall0, "cpu_seconds": time.process_time() - self.cpu0}


T = TypeVar("T")


def _part(
    base: Path,
    digest: str,
    load: Callable[[dict], T],
    build: Callable[[], tuple[T, dict]],
    save: Callable[[T, dict], None],
) -> tuple[T, dict, bool]:
    """Load the part at `base` if it was built with `digest`, else build and save it.

    Returns (object, its metadata incl. build `seconds` / `cpu_seconds`, whether it was reused).
    """
    if meta := _finished(base, digest):
        return load(meta), meta, True
    clock = _Clock()
    obj, meta = build()
    meta = {**meta, "hash": digest, **clock.times()}
    save(obj, meta)
    return obj, meta, False


def prepare_tiny_world(
    world: TinyWorldParams,
    out_dir: Path | str,
    progress: bool = True,
    sampling: SamplingParams | None = None,
) -> dict:
    """Build (or resume) the tiny world in `out_dir`; return the report also written to world.json.

    `sampling` are the teacher's sampling parameters used for the CFG sample accuracy (pass the
    preset's `teacher.sampling`; default DEFAULT_SAMPLING). The report holds the wall time of
    each part in this call (`timings_s`, 0 for reused parts), the wall and CPU time each part took
    when it was built (`build_s`, `build_cpu_s`), accuracies, and `problems` from `check_quality`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampling = sampling or DEFAULT_SAMPLING
    hashes = stage_hashes(world, sampling)
    metas: dict[str, dict] = {}
    timings: dict[str, float] = {}
    reused: list[str] = []
    load_start = _loadavg()
    total = _Clock()

    def record(name: str, clock: _Clock, meta: dict, was_reused: bool) -> None:
        metas[name] = meta
        timings[name] = 0.0 if was_reused else clock.times()["seconds"]
        if was_reused:
            reused.append(name)

    with _threads() as threads:
        clock = _Clock()
        images, labels, attrs = make_dataset_with_attributes(
            world.train_images, world.image_size, world.num_classes, world.seed
        )
        hold_images, hold_labels = make_dataset(
            world.holdout_images, world.image_size, world.num_classes, world.seed + HOLDOUT_SEED_OFFSET
        )
        record("data", clock, clock.times(), False)
        log.info("tiny world: %d training images generated in %.1f s", len(labels), timings["data"])

        clock = _Clock()

        def build_evaluator() -> tuple[TinyEvaluator, dict]:
            cfg = EvaluatorConfig(image_size=world.image_size, num_classes=world.num_classes)
            model = train_evaluator(
                images,
                labels,
                attrs,
                cfg,
                steps=world.evaluator_steps,
                batch_size=world.evaluator_batch_size,
                lr=world.evaluator_lr,
                seed=world.seed + 1,
                progress=progress,
            )
            return model, {"class_names": list(CLASS_NAMES[: world.num_classes])}

        evaluator, meta, was = _part(
            out / "evaluator",
            hashes["evaluator"],
            lambda meta: load_evaluator(out / "evaluator"),
            build_evaluator,
            lambda model, meta: save_evaluator(out / "evaluator", model, meta),
        )
        record("evaluator", clock, meta, was)

        clock = _Clock()

        def load_vq(meta: dict) -> VQModel:
            model = VQModel(VQConfig.from_dict(meta["config"]))
            return load_safetensors_model(out / "vq", model, what="tiny VQ", suggest=suggest_llamagen).eval()

        def build_vq() -> tuple[VQModel, dict]:
            model, stats = train_vq(
                to_model_range(images),
                vq_config_for(world),
                steps=world.vq_steps,
                batch_size=world.vq_batch_size,
                lr=world.vq_lr,
                seed=world.seed + 2,
                progress=progress,
            )
            return model, {"config": model.cfg.to_dict(), "image_size": world.image_size, "stats": stats}

        vq, meta, was = _part(
            out / "vq", hashes["vq"], load_vq, build_vq, lambda m, meta: save_model(out / "vq", m, meta)
        )
        record("vq", clock, meta, was)

        clock = _Clock()

        def load_tokens(meta: dict) -> tuple[Tensor, Tensor]:
            sd = load_state_dict_file(out / "tokens.safetensors")
            return sd["tokens"].long(), sd["labels"].long()

        def build_tokens() -> tuple[tuple[Tensor, Tensor], dict]:
            toks = tokenize(vq, to_model_range(images))
            usage = codebook_usage(toks, vq.cfg.codebook_size)
            return (toks, torch.as_tensor(labels)), {"shape": list(toks.shape), "usage": usage}

        def save_tokens(data: tuple[Tensor, Tensor], meta: dict) -> None:
            save_model(out / "tokens", {"tokens": data[0].to(torch.int32), "labels": data[1]}, meta)

        (tokens, tok_labels), meta, was = _part(
            out / "tokens", hashes["tokens"], load_tokens, build_tokens, save_tokens
        )
        record("tokens", clock, meta, was)

        clock = _Clock()
        grid = world.image_size // vq.downsample

        def load_gpt(meta: dict) -> GPT:
            model = GPT(GPTConfig.from_dict(meta["config"]))
            return load_safetensors_model(
                out / "gpt", model, what="tiny GPT", suggest=suggest_llamagen
            ).eval()

        def build_gpt() -> tuple[GPT, dict]:
            model, stats = train_gpt(
                tokens,
                tok_labels,
                gpt_config_for(world, grid),
                steps=world.gpt_steps,
                batch_size=world.gpt_batch_size,
                lr=world.gpt_lr,
                seed=world.seed + 3,
                progress=progress,
            )
            meta = {
                "config": model.cfg.to_dict(),
                "num_classes": world.num_classes,
                "image_size": world.image_size,
                "stats": stats,
            }
            return model, meta

        gpt, meta, was = _part(
            out / "gpt", hashes["gpt"], load_gpt, build_gpt, lambda m, meta: save_model(out / "gpt", m, meta)
        )
        record("gpt", clock, meta, was)

        clock = _Clock()
        qpath = out / "quality.json"
        quality = _read_json(qpath)
        was = quality is not None and quality.get("hash") == hashes["quality"]
        if not was:
            from ddcore.teachers.llamagen.teacher import LlamaGenTeacher

            teacher = LlamaGenTeacher(gpt, vq, num_classes=world.num_classes, image_size=world.image_size)
            quality = measure_quality(world, teacher, evaluator, hold_images, hold_labels, sampling, out)
            quality = {**quality, "hash": hashes["quality"], **clock.times()}
            atomic_write_json(qpath, quality)
        record("quality", clock, quality, was)

    build_s = {k: round(float(m["seconds"]), 2) for k, m in metas.items()}
    build_cpu_s = {k: round(float(m["cpu_seconds"]), 2) for k, m in metas.items()}
    report = {
        "world": world.model_dump(),
        "sampling": sampling.model_dump(),
        "hashes": hashes,
        "reused": reused,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "total_s": round(total.times()["seconds"], 2),
        "build_s": build_s,
        "build_total_s": round(sum(build_s.values()), 2),
        "build_cpu_s": build_cpu_s,
        "build_total_cpu_s": round(sum(build_cpu_s.values()), 2),
        "machine": {
            "torch_threads": threads,
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
        },
        "params": {
            "evaluator": sum(p.numel() for p in evaluator.parameters()),
            "vq": vq.num_params(),
            "gpt": gpt.num_params(),
        },
        "tokens": {
            "usage": metas["tokens"]["usage"],
            "seq_len": grid * grid,
            "vocab_size": vq.cfg.codebook_size,
        },
        "vq_train": metas["vq"]["stats"],
        "gpt_train": metas["gpt"]["stats"],
        "quality": {k: v for k, v in quality.items() if k not in ("hash", "seconds", "cpu_seconds")},
    }
    report["problems"] = check_quality(report)
    atomic_write_json(out / "world.json", report)
    for p in report["problems"]:
        log.warning("tiny world quality: %s", p)
    return report


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@torch.no_grad()
def measure_quality(
    world: TinyWorldParams,
    teacher,
    evaluator: TinyEvaluator,
    hold_images: np.ndarray,
    hold_labels: np.ndarray,
    sampling: SamplingParams,
    out: Path | None = None,
) -> dict:
    """Accuracies of the evaluator on held-out real images, on their VQ reconstructions, and on
    teacher samples (with `sampling` and unguided); the teacher's held-out NLL; sample grids."""
    real = to_unit(hold_images)
    acc_real = accuracy(evaluator, real, hold_labels)
    recon = reconstruct(teacher.vq, to_model_range(hold_images))
    acc_recon = accuracy(evaluator, recon, hold_labels)
    hold_tokens = tokenize(teacher.vq, to_model_range(hold_images))
    nll = mean_nll(teacher.gpt, hold_tokens, torch.as_tensor(hold_labels))

    k = world.quality_samples_per_class
    labels = torch.arange(world.num_classes).repeat_interleave(k)
    seeds = list(range(SAMPLE_SEED_BASE, SAMPLE_SEED_BASE + labels.numel()))
    result = {
        "evaluator_accuracy_real": acc_real,
        "evaluator_accuracy_recon": acc_recon,
        "recon_accuracy_ratio": acc_recon / max(acc_real, 1e-12),
        "recon_mse": float(((recon - real) ** 2).mean()),
        "holdout_nll": nll,
        "num_samples": int(labels.numel()),
    }
    for name, params in (("cfg", sampling), ("unguided", sampling.model_copy(update={"cfg_scale": 1.0}))):
        if name == "unguided" and sampling.cfg_scale == 1.0:
            continue
        images = teacher.decode(teacher.sample(labels, seeds, params))
        acc, per_class = accuracy_per_class(evaluator, images, labels)
        result[f"{name}_sample_accuracy"] = acc
        result[f"{name}_sample_accuracy_per_class"] = per_class
        if out is not None and name == "cfg":
            _save_grid(out / "samples.png", images, labels, world.num_classes, per_row=min(k, 10))
    if out is not None:
        n = min(len(hold_labels), 10 * world.num_classes)
        order = torch.as_tensor(np.argsort(hold_labels[:n], kind="stable"))
        pairs = torch.stack([real[:n][order], recon[:n][order]], dim=1).flatten(0, 1)
        _save_grid(out / "reconstructions.png", pairs, None, None, per_row=20)
    return result


def _save_grid(
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


# --------------------------------------------------------------------------------------------
# the quality bar
# --------------------------------------------------------------------------------------------
def check_quality(report: dict, world: TinyWorldParams | None = None) -> list[str]:
    """Problems with a prepared world (empty = fine), against the thresholds of `world` (default:
    those recorded in report['world']).

    The bar: teacher CFG samples are classified as their requested class at least
    `min_sample_accuracy` of the time, and reconstructions through the tokenizer keep at least
    `min_recon_ratio` of the evaluator's accuracy on real images, which must itself reach
    `min_evaluator_accuracy`.
    """
    problems: list[str] = []
    bars_of = report.get("world", {}) if world is None else world.model_dump()
    q = report.get("quality", {})
    bars = [
        ("evaluator_accuracy_real", "min_evaluator_accuracy", "evaluator accuracy on held-out real images"),
        (
            "recon_accuracy_ratio",
            "min_recon_ratio",
            "evaluator accuracy on VQ reconstructions / on real images",
        ),
        ("cfg_sample_accuracy", "min_sample_accuracy", "evaluator accuracy on the teacher's CFG samples"),
    ]
    for key, bar_key, what in bars:
        value, bar = q.get(key), bars_of.get(bar_key)
        if bar is None:
            problems.append(f"world.{bar_key} is missing from the report")
        elif not isinstance(value, int | float) or not math.isfinite(value):
            problems.append(f"{what}: no measurement (quality.{key} = {value!r})")
        elif value < bar:
            problems.append(f"{what} is {value:.4f} < {bar} (world.{bar_key})")
    return problems


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def load_tiny_world(out_dir: Path | str, device: str | torch.device = "cpu"):
    """(LlamaGenTeacher, TinyEvaluator) from a prepared world directory, loaded strictly."""
    from ddcore.teachers.llamagen.teacher import build_llamagen_teacher_from_dir

    out = Path(out_dir)
    teacher = build_llamagen_teacher_from_dir(out, device=device)
    evaluator = load_evaluator(out / "evaluator", device=device)
    return teacher, evaluator


def main(argv: list[str] | None = None) -> None:
    """`python -m ddcore.teachers.llamagen.tiny_world --preset tiny`: prepare a preset's world and print the report."""
    from ddcore.params import load_preset

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", type=Path, default=None, help="default: <model_root>/<preset>/teacher")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    preset = load_preset(args.preset)
    if preset.teacher.world is None:
        raise SystemExit(f"preset {args.preset!r} has no teacher.world")
    report = prepare_tiny_world(
        preset.teacher.world,
        args.out or default_world_dir(args.preset),
        progress=not args.quiet,
        sampling=preset.teacher.sampling,
    )
    print(
        json.dumps(
            {k: report[k] for k in ("timings_s", "total_s", "build_total_s", "quality", "problems")}, indent=2
        )
    )


if __name__ == "__main__":
    main()

"""Prepare (and load) the offline tiny world: data -> evaluator -> VQ -> tokens -> GPT -> quality.

Every command of the project runs on this world by default, so it must be cheap to build, fully
offline and deterministic, and it must still be a real test bed: a 64-token class-conditional
LlamaGen teacher (same GPT and VQ code as the published models) whose CFG samples are judged by
an evaluator network that also serves as the FID feature extractor. See docs/tiny-world.md.

Each part is saved as `name.safetensors` + `name.json`; the JSON carries a hash of everything
the part depends on (its parameters, the hashes of its inputs, a code version). A part whose
files exist with the same hash is loaded instead of rebuilt, so an interrupted preparation
resumes where it stopped and a finished one is a no-op. The resumable build itself (parts,
hashes, timing, threads, the judge, grids) is `ddcore.tiny.builder`, shared with the VAR world;
this module holds what is LlamaGen's: its tokenizer and GPT parts, their hashes, the quality
measurements and the quality bar.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ddcore.checkpoints import load_safetensors_model, load_state_dict_file, save_model
from ddcore.models.llamagen import GPT, GPTConfig
from ddcore.models.vq import VQConfig, VQModel
from ddcore.params import SamplingParams, TinyWorldParams
from ddcore.teachers.llamagen.catalogue import suggest_llamagen
from ddcore.teachers.llamagen.tiny_gpt import gpt_config_for, mean_nll, train_gpt
from ddcore.teachers.llamagen.tiny_vq import codebook_usage, reconstruct, tokenize, train_vq, vq_config_for
from ddcore.tiny.builder import (
    WorldBuilder,
    default_world_dir,
    evaluator_part,
    judge_reconstructions,
    part_hash,
    save_reconstruction_grid,
    save_sample_grid,
    world_fields,
)
from ddcore.tiny.data import make_dataset, make_dataset_with_attributes, to_model_range, to_unit
from ddcore.tiny.evaluator import SAMPLE_SEED_BASE, TinyEvaluator, accuracy_per_class, load_evaluator

log = logging.getLogger("ddcore.tiny")

# Bump a version when the code of that part changes what it produces: the hash then changes and
# the part (and everything downstream) is rebuilt.
CODE_VERSIONS = {"data": 1, "evaluator": 1, "vq": 1, "tokens": 1, "gpt": 1, "quality": 1}
HOLDOUT_SEED_OFFSET = 7919  # held-out real images (accuracies); eval's FID reference uses another
DEFAULT_SAMPLING = SamplingParams(cfg_scale=3.0)
REPORT_FILE = "world.json"

__all__ = [
    "DEFAULT_SAMPLING",
    "check_quality",
    "default_world_dir",
    "load_tiny_world",
    "prepare_tiny_world",
]


# --------------------------------------------------------------------------------------------
# hashing
# --------------------------------------------------------------------------------------------
def stage_hashes(world: TinyWorldParams, sampling: SamplingParams) -> dict[str, str]:
    """The dependency hash of every part (chained: a part's hash includes its inputs' hashes).

    These are the hashes users' prepared worlds store: any change here rebuilds their worlds."""
    v, w = CODE_VERSIONS, world
    data = part_hash(v["data"], world_fields(w, keys=("image_size", "num_classes", "train_images", "seed")))
    evaluator = part_hash(v["evaluator"], world_fields(w, "evaluator_"), data=data)
    vq = part_hash(v["vq"], world_fields(w, "vq_"), data=data)
    tokens = part_hash(v["tokens"], vq=vq)
    gpt = part_hash(v["gpt"], world_fields(w, "gpt_", keys=("class_dropout_prob",)), tokens=tokens)
    quality = part_hash(
        v["quality"],
        world_fields(w, keys=("holdout_images", "quality_samples_per_class")),
        parts=[evaluator, vq, gpt],
        sampling=sampling.model_dump(),
    )
    return {"data": data, "evaluator": evaluator, "vq": vq, "tokens": tokens, "gpt": gpt, "quality": quality}


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------
def _data(world: TinyWorldParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training images (with their attributes) and the held-out reference images, all seeded."""
    images, labels, attrs = make_dataset_with_attributes(
        world.train_images, world.image_size, world.num_classes, world.seed
    )
    hold_images, hold_labels = make_dataset(
        world.holdout_images, world.image_size, world.num_classes, world.seed + HOLDOUT_SEED_OFFSET
    )
    return images, labels, attrs, hold_images, hold_labels


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
    sampling = sampling or DEFAULT_SAMPLING
    with WorldBuilder(out, stage_hashes(world, sampling)) as b:
        images, labels, attrs, hold_images, hold_labels = b.step("data", lambda: _data(world))
        log.info("tiny world: %d training images generated in %.1f s", len(labels), b.timings["data"])

        evaluator = evaluator_part(
            b, images, labels, attrs, world, seed=world.seed + 1, lr=world.evaluator_lr, progress=progress
        )

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

        vq = b.part("vq", load_vq, build_vq)

        def load_tokens(meta: dict) -> tuple[Tensor, Tensor]:
            sd = load_state_dict_file(out / "tokens.safetensors")
            return sd["tokens"].long(), sd["labels"].long()

        def build_tokens() -> tuple[tuple[Tensor, Tensor], dict]:
            toks = tokenize(vq, to_model_range(images))
            usage = codebook_usage(toks, vq.cfg.codebook_size)
            return (toks, torch.as_tensor(labels)), {"shape": list(toks.shape), "usage": usage}

        def save_tokens(data: tuple[Tensor, Tensor], meta: dict) -> None:
            save_model(out / "tokens", {"tokens": data[0].to(torch.int32), "labels": data[1]}, meta)

        tokens, tok_labels = b.part("tokens", load_tokens, build_tokens, save_tokens)

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

        gpt = b.part("gpt", load_gpt, build_gpt)

        def build_quality() -> dict:
            from ddcore.teachers.llamagen.teacher import LlamaGenTeacher

            teacher = LlamaGenTeacher(gpt, vq, num_classes=world.num_classes, image_size=world.image_size)
            return measure_quality(world, teacher, evaluator, hold_images, hold_labels, sampling, out)

        quality = b.json_part("quality", build_quality)

    report = {
        "world": world.model_dump(),
        "sampling": sampling.model_dump(),
        **b.summary(),
        "params": {
            "evaluator": sum(p.numel() for p in evaluator.parameters()),
            "vq": vq.num_params(),
            "gpt": gpt.num_params(),
        },
        "tokens": {
            "usage": b.metas["tokens"]["usage"],
            "seq_len": grid * grid,
            "vocab_size": vq.cfg.codebook_size,
        },
        "vq_train": b.metas["vq"]["stats"],
        "gpt_train": b.metas["gpt"]["stats"],
        "quality": quality,
    }
    report["problems"] = check_quality(report)
    b.write_report(REPORT_FILE, report, report["problems"])
    return report


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
    recon = reconstruct(teacher.vq, to_model_range(hold_images))
    judged = judge_reconstructions(evaluator, real, recon, hold_labels)
    hold_tokens = tokenize(teacher.vq, to_model_range(hold_images))
    nll = mean_nll(teacher.gpt, hold_tokens, torch.as_tensor(hold_labels))

    k = world.quality_samples_per_class
    labels = torch.arange(world.num_classes).repeat_interleave(k)
    seeds = list(range(SAMPLE_SEED_BASE, SAMPLE_SEED_BASE + labels.numel()))
    result = {
        **judged,
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
            save_sample_grid(out, images, labels, world.num_classes, per_class=k)
    if out is not None:
        save_reconstruction_grid(out, real, recon, hold_labels, world.num_classes)
    return result


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

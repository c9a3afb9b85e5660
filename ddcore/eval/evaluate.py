"""The evaluate stage: score every sampler on the same labels and seeds, write eval.json and pictures.

Protocol (docs/evaluation.md):
* labels are drawn uniformly at random with torch.randint from a fixed seed, as LlamaGen's FID
  sampler does; image i gets noise seed EVAL_SEED_BASE + seed * 2**20 + i, far above the
  seeds trajectory generation uses, so students are never scored on their training noise;
* every sampler sees exactly the same labels and seeds;
* images are rounded to uint8 before feature extraction (what a PNG/npz round trip gives);
* teacher NLL uses the first `nll_samples` sequences; the marginal TV of a sampler compares its
  first half of sequences with the teacher's second half (disjoint seeds, equal sizes), so the
  teacher's own row (first half vs second half) is the sampling-noise floor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ddcore.eval.distribution import marginal_tv, teacher_nll
from ddcore.eval.fidelity import (
    INCEPTION_NAME,
    EvaluationUnavailable,
    Reference,
    SamplerRun,
    as_extractor,
    load_reference,
    run_sampler,
    tiny_world_reference,
)
from ddcore.eval.metrics import (
    class_accuracy,
    feature_stats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from ddcore.eval.report import plot_fid_vs_steps, save_grid, write_json
from ddcore.params import EvalParams, SamplingParams, TinyWorldParams

EVAL_SEED_BASE = 1 << 40
LABEL_PROTOCOL = {
    "random": "torch.randint(num_classes) with a torch.Generator seeded by eval.seed",
    "balanced": "arange(n) % num_classes in the order of torch.randperm(n) with a torch.Generator seeded by eval.seed",
}
GRID_SEED_OFFSET = 1 << 19  # grid images use seeds past any plausible num_samples
IMAGENET_GRID_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # LlamaGen's demo classes


def eval_labels(num_classes: int, n: int, seed: int, balanced: bool = False) -> Tensor:
    """Class labels reproducible from `seed`: uniformly random (torch.randint, LlamaGen's protocol),
    or balanced (each class n // C or n // C + 1 times, in random order). Random class counts vary by
    about sqrt(n / C), which moves FID's mean term between seed sets (docs/evaluation.md)."""
    g = torch.Generator().manual_seed(int(seed))
    if not balanced:
        return torch.randint(0, num_classes, (n,), generator=g)
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]


def eval_seeds(n: int, seed: int, offset: int = 0) -> list[int]:
    base = EVAL_SEED_BASE + int(seed) * (1 << 20) + offset
    return [base + i for i in range(n)]


def grid_plan(num_classes: int, columns: int, seed: int) -> tuple[Tensor, list[int], int]:
    """Labels and seeds of the sample grid (row = class, column = seed) and the row length."""
    if num_classes <= 16:
        classes = list(range(num_classes))
    elif num_classes == 1000:
        classes = list(IMAGENET_GRID_CLASSES)
    else:
        classes = [round(i * (num_classes - 1) / 7) for i in range(8)]
    col_seeds = eval_seeds(columns, seed, offset=GRID_SEED_OFFSET)
    labels = torch.tensor([c for c in classes for _ in range(columns)])
    return labels, col_seeds * len(classes), columns


def build_reference(
    eval_params: EvalParams, extractor, world: TinyWorldParams | None = None, n: int | None = None
) -> Reference:
    """The reference named by `eval.reference`: 'world' (held-out tiny-world images) or a path
    (npz of images and/or mu/sigma, .pth statistics, or an image folder; relative to the project)."""
    if eval_params.reference == "world":
        if world is None:
            raise EvaluationUnavailable("eval.reference='world' needs the preset's teacher.world parameters")
        return tiny_world_reference(
            extractor,
            n or eval_params.num_samples,
            image_size=world.image_size,
            num_classes=world.num_classes,
            seed=world.seed,
            batch_size=eval_params.batch_size,
        )
    path = Path(eval_params.reference)
    if not path.is_absolute() and not path.exists():
        from ddcore.settings import get_settings

        path = get_settings().project_root / path  # params.yaml paths are relative to the project
    return load_reference(path, extractor, batch_size=eval_params.batch_size)


def _find_teacher_sampler(samplers: Sequence) -> object | None:
    """The teacher's own multinomial sampler: named "teacher", else an exact TeacherSampler
    (subclasses such as the flow-chooser teacher are students' targets, not the reference)."""
    from ddcore.samplers.base import TeacherSampler

    by_name = [s for s in samplers if s.name == "teacher"]
    exact = [s for s in samplers if type(s) is TeacherSampler]
    return (by_name or exact or [None])[0]


def is_splits(n: int) -> int:
    """ADM's convention: IS over chunks of 5000 samples (10 splits for 50k), at least one."""
    return max(1, n // 5000)


def _image_metrics(run: SamplerRun, ref: Reference, labels: Tensor, labels_match: bool, kid_kw: dict) -> dict:
    mu, sigma = feature_stats(run.features)
    if mu.shape != ref.mu.shape:
        raise EvaluationUnavailable(
            f"reference {ref.name} has {ref.mu.shape[0]}-d statistics, samples have {mu.shape[0]}-d features"
        )
    out = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma)}
    out["is"], out["is_std"] = inception_score(run.logits, splits=is_splits(run.n))
    if ref.features is not None:
        dev = "cuda" if torch.cuda.is_available() else None
        out["precision"], out["recall"] = precision_recall(run.features, ref.features, device=dev)
        out["kid"], out["kid_std"] = kernel_inception_distance(run.features, ref.features, **kid_kw)
    else:
        out.update(precision=None, recall=None, kid=None, kid_std=None)
    out["class_acc"] = class_accuracy(run.logits, labels) if labels_match else None
    return out


def evaluate_samplers(
    samplers: Sequence,
    teacher,
    evaluator,
    ref: Reference,
    eval_params: EvalParams,
    out_dir: str | Path,
    *,
    sampling: SamplingParams | None = None,
    teacher_name: str | None = None,
    nll_samples: int | None = None,
    nll_batch_size: int = 16,
    score_size: int | None = None,
    grid_columns: int = 8,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    progress: bool = True,
) -> dict:
    """Score `samplers` against `ref` and write `out_dir`/eval.json, grid_<name>.png, fid_vs_steps.png.

    `evaluator` is the tiny world's evaluator network or a torch-fidelity extractor (Inception).
    `sampling` is the teacher distribution used for NLL; by default the teacher sampler's.
    `score_size` resizes images before scoring (default: 256 for Inception when the teacher's
    images are larger, as LlamaGen scores 384-px models).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in samplers]
    if len(set(names)) != len(names):
        raise ValueError(f"sampler names must be unique, got {names}")
    extractor = as_extractor(evaluator).to(teacher.device)
    if score_size is None and extractor.get_name() == INCEPTION_NAME and teacher.image_size > 256:
        score_size = 256
    labels_match = bool(getattr(extractor, "labels_match", False))
    teacher_sampler = _find_teacher_sampler(samplers)
    if sampling is None:
        sampling = getattr(teacher_sampler, "params", None) or SamplingParams()
    n = eval_params.num_samples
    labels = eval_labels(teacher.num_classes, n, eval_params.seed, balanced=eval_params.labels == "balanced")
    seeds = eval_seeds(n, eval_params.seed)
    n_nll = min(n, nll_samples if nll_samples is not None else n)

    runs: dict[str, SamplerRun] = {}
    for s in samplers:
        runs[s.name] = run_sampler(
            s,
            extractor,
            labels,
            seeds,
            eval_params.batch_size,
            keep_tokens=True,
            decode=teacher.decode,
            image_size=score_size,
            progress=progress,
        )

    teacher_tokens = runs[teacher_sampler.name].tokens if teacher_sampler is not None else None
    half = n // 2
    kid_kw = {"subsets": kid_subsets, "subset_size": kid_subset_size, "seed": eval_params.seed}
    rows: dict[str, dict] = {}
    for s in samplers:
        run = runs[s.name]
        row = {"steps": int(s.steps), "n_samples": run.n, "sec_per_image": run.seconds / run.n}
        row.update(_image_metrics(run, ref, labels, labels_match, dict(kid_kw)))
        nll = teacher_nll(teacher, run.tokens[:n_nll], labels[:n_nll], sampling, batch_size=nll_batch_size)
        row.update(nll.summary())
        if teacher_tokens is not None and half >= 1:
            row["marginal_tv"] = marginal_tv(
                run.tokens[:half], teacher_tokens[half : 2 * half], teacher.vocab_size
            )
        else:
            row["marginal_tv"] = None
        rows[s.name] = row

    grid_labels, grid_seeds, ncol = grid_plan(teacher.num_classes, grid_columns, eval_params.seed)
    grids = {}
    with torch.no_grad():
        for s in samplers:
            imgs = [
                s.images(
                    grid_labels[i : i + eval_params.batch_size], grid_seeds[i : i + eval_params.batch_size]
                ).cpu()
                for i in range(0, len(grid_seeds), eval_params.batch_size)
            ]
            grids[s.name] = save_grid(torch.cat(imgs), ncol, out_dir / f"grid_{_safe(s.name)}.png").name

    name = teacher_name or getattr(teacher, "name", None) or teacher.family
    result = {
        "samplers": rows,
        "sampler_order": names,
        "reference": ref.describe(),
        "teacher_name": name,
        "protocol": {
            "n_samples": n,
            "seed": eval_params.seed,
            "labels": LABEL_PROTOCOL[eval_params.labels],
            "noise_seeds": f"{EVAL_SEED_BASE} + seed * 2**20 + i",
            "extractor": extractor.get_name(),
            "score_size": score_size,
            "nll_samples": n_nll,
            "nll_sampling": sampling.model_dump(),
            "marginal_tv": "sampler first half vs teacher second half (teacher row = noise floor)",
            "kid": {"subsets": kid_subsets, "subset_size": min(kid_subset_size, n)},
            "is_splits": is_splits(n),
        },
        "grids": grids,
    }
    plot = plot_fid_vs_steps(rows, out_dir / "fid_vs_steps.png", title=f"{name}: FID vs steps")
    result["plot"] = plot.name if plot else None
    write_json(result, out_dir / "eval.json")
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)

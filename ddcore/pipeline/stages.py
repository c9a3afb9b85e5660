"""The stages every method shares: prepare (the teacher), evaluate, bench, register.

Each receives its `StageRun` from the runner (`ddcore.pipeline.runner`), returns the recorded
result when its marker says it is complete, and otherwise does the work and writes the marker.
Heavy imports happen inside the stages so that `ddcore --help` and the orchestrators stay fast.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ddcore.checkpoints import atomic_write_json
from ddcore.hashing import sha256_file
from ddcore.params import Preset
from ddcore.pipeline.layout import Layout
from ddcore.pipeline.markers import MARKER, StageError, StageRun, jsonable, read_marker
from ddcore.results import BenchResult, EvalResult, write_fid_curve
from ddcore.retry import with_retries
from ddcore.teachers.loading import TEACHER_INFO, default_device, load_teacher
from ddcore.teachers.registry import get_family

log = logging.getLogger("ddcore.stages")


# --------------------------------------------------------------------------------------------
# prepare: the teacher
# --------------------------------------------------------------------------------------------
def prepare_stage(run: StageRun) -> dict:
    """Make the teacher available under `teacher_dir`.

    Tiny presets train the offline tiny world there (VQ, GPT, evaluator, reference data) and fail
    if its quality checks fail. Published teachers are resolved from their source (with retries)
    into the checkpoint cache; `teacher.json` records the resolved files and their sha256, which is
    what DVC versions instead of gigabytes of weights.
    """
    if m := run.complete():
        log.info("prepare[%s]: complete, skipping", run.preset_name)
        return m.result
    preset, out = run.preset, run.layout.teacher_dir
    if preset.teacher.copy_of is not None:
        return _copy_prepared(run, preset.teacher.copy_of)
    # stale marker (other params): drop it; the tiny world reuses whatever parts its own hashes allow
    run.drop_marker()
    out.mkdir(parents=True, exist_ok=True)
    family = get_family(preset.family)
    if family.is_tiny(preset.teacher.name):
        result = _prepare_tiny(run.preset_name, preset, out, run.progress)
    else:
        result = _prepare_published(preset, out)
    atomic_write_json(out / TEACHER_INFO, result)
    return run.finish(result)


def _copy_prepared(run: StageRun, source: str) -> dict:
    """`teacher.copy_of`: the teacher another preset prepared with the same teacher params (the
    same prepare fingerprint), copied whole, so two methods are compared on one teacher build."""
    src, out = run.layout.model_root / source / "teacher", run.layout.teacher_dir
    m = read_marker(src / MARKER)
    if m is None or m.fingerprint != run.fingerprint:
        why = "is not prepared" if m is None else "was prepared with other teacher params"
        raise StageError(
            f"teacher.copy_of {source!r}: the teacher at {src} {why}; "
            f"run `ddcore prepare --preset {source}` first, or give this preset the same teacher section"
        )
    tmp = out.with_name(out.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(MARKER))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return run.finish({**m.result, "copied_from": source})


def _prepare_tiny(preset_name: str, preset: Preset, out: Path, progress: bool) -> dict:
    world = preset.teacher.world
    if world is None:
        raise StageError(f"presets.{preset_name}.teacher.world is required for the tiny teacher")
    tiny = get_family(preset.family).tiny
    # the quality check samples as the teacher will (teacher.sampling is part of prepare's inputs)
    report = tiny.prepare(world, out, progress, preset.teacher.sampling, default_device())
    problems = tiny.check(report, world)
    if problems:
        raise StageError(f"tiny world for {preset_name!r} failed its quality checks: " + "; ".join(problems))
    return {
        "kind": "tiny",
        "family": preset.family,
        "teacher": preset.teacher.name,
        "report": jsonable(report),
    }


def _prepare_published(preset: Preset, out: Path) -> dict:
    """Resolve the published checkpoint and its tokenizer (download with retries into the cache)."""
    from ddcore.sources import get_checkpoint, resolve_source

    family = get_family(preset.family)
    info = get_checkpoint(preset.teacher.name)
    gpt_src = preset.teacher.source or info.source
    vq_src = preset.teacher.vq_source or get_checkpoint(info.tokenizer or family.default_tokenizer).source
    files = {}
    for part, src in (("model", gpt_src), ("tokenizer", vq_src)):
        path = Path(with_retries(lambda src=src: resolve_source(src), f"resolving {src}"))
        files[part] = {"source": src, "path": str(path), "sha256": sha256_file(path)}
    return {"kind": "published", "family": preset.family, "teacher": preset.teacher.name, **files}


# --------------------------------------------------------------------------------------------
# samplers of a preset
# --------------------------------------------------------------------------------------------
def preset_samplers(preset: Preset, teacher, layout: Layout, names=None) -> list:
    from ddcore.samplers.registry import build_samplers

    return build_samplers(list(names or preset.eval.samplers), teacher, layout.student_dir, preset)


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
def evaluate_stage(run: StageRun) -> dict:
    """FID / IS / precision / recall / KID / NLL per sampler against the reference; grids; FID vs
    steps. Writes metrics/<preset>/eval.json (+ grids/, fid_vs_steps.png, fid_vs_steps.csv)."""
    if m := run.complete():
        log.info("evaluate[%s]: complete, skipping", run.preset_name)
        return m.result
    from ddcore.eval.evaluate import build_reference, evaluate_samplers
    from ddcore.eval.fidelity import as_extractor

    preset, layout = run.preset, run.layout
    teacher, evaluator = load_teacher(preset, layout.teacher_dir)
    # the tiny world's judge, or (evaluator None: published teachers) the TF-FID Inception
    extractor = as_extractor(evaluator).to(teacher.device)
    ref = build_reference(preset.eval, extractor, world=preset.teacher.world)
    samplers = preset_samplers(preset, teacher, layout)
    layout.metrics_dir.mkdir(parents=True, exist_ok=True)
    layout.eval_json.unlink(missing_ok=True)  # never mistake a stale file for this run's
    evaluate_samplers(
        samplers,
        teacher,
        extractor,
        ref,
        preset.eval,
        layout.metrics_dir,
        sampling=preset.teacher.sampling,
        teacher_name=preset.teacher.name,
        progress=run.progress,
    )
    result = _collect_grids(layout)
    write_fid_curve(result, layout.fid_curve)
    summary = {"samplers": result.raw.get("samplers", {}), "reference": result.raw.get("reference")}
    return run.finish(jsonable(summary), [layout.eval_json, layout.fid_curve])


def _collect_grids(layout: Layout) -> EvalResult:
    """Move the per-sampler grids into metrics/<preset>/grids/ (one DVC plots folder whatever the
    sampler list) and point eval.json at them."""
    raw = json.loads(layout.eval_json.read_text())
    grids_dir = layout.metrics_dir / "grids"
    if grids_dir.exists():
        shutil.rmtree(grids_dir)
    grids_dir.mkdir(parents=True)
    moved = {}
    for name, fname in (raw.get("grids") or {}).items():
        src = layout.metrics_dir / fname
        if src.is_file():
            src.replace(grids_dir / src.name)
            moved[name] = f"grids/{src.name}"
    if moved:
        raw["grids"] = moved
        atomic_write_json(layout.eval_json, raw)
    return EvalResult.from_dict(raw)


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------
def bench_stage(run: StageRun) -> dict:
    """Latency (s/image at batch 1) and throughput (images/s) of every sampler on this machine,
    plus the method's own throughput figures (`Method.bench_extra`)."""
    if m := run.complete():
        log.info("bench[%s]: complete, skipping", run.preset_name)
        return m.result
    from ddcore.eval.bench import bench_samplers
    from ddcore.methods.registry import get_method

    preset, layout = run.preset, run.layout
    method = get_method(preset.method)
    teacher, _ = load_teacher(preset, layout.teacher_dir)
    samplers = preset_samplers(preset, teacher, layout)
    layout.metrics_dir.mkdir(parents=True, exist_ok=True)
    layout.bench_json.unlink(missing_ok=True)
    extra = method.bench_extra(preset, teacher, layout) if method.bench_extra else {}
    bench_samplers(
        samplers,
        preset.bench,
        layout.metrics_dir,
        progress=run.progress,
        extra=extra,
        student_builder=method.random_students,
    )
    result = BenchResult.from_dict(json.loads(layout.bench_json.read_text()))
    case = result.own_case(preset.bench.cases)
    summary = {"case": case, "samplers": {r["sampler"]: r for r in result.rows(case)}}
    return run.finish(jsonable(summary), [layout.bench_json])


# --------------------------------------------------------------------------------------------
# register
# --------------------------------------------------------------------------------------------
def register_stage(run: StageRun, flow_run_id: str | None = None, flow_run_url: str | None = None) -> dict:
    """Log the run to MLflow, register the student as `dd-<teacher>`, apply the promotion gate."""
    if m := run.complete():
        log.info("register[%s]: complete, skipping", run.preset_name)
        return m.result
    from ddcore.registry.register import register_student

    layout = run.layout
    result = register_student(
        run.preset_name, run.preset, layout, flow_run_id=flow_run_id, flow_run_url=flow_run_url
    )
    atomic_write_json(layout.registry_json, public_registry_record(result))
    return run.finish(result, [layout.registry_json])


def public_registry_record(result: dict) -> dict:
    """What gets committed (metrics/<preset>/registry.json): no URIs that embed local paths."""
    keep = (
        "model_name",
        "version",
        "aliases",
        "decision",
        "scores",
        "champion_scores",
        "eval_protocol",
        "run_id",
    )
    return {k: result[k] for k in keep if k in result}

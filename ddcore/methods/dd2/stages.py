"""DD2's own stages (part 1): teacher samples (sharded, resumable), the continuous-input teacher,
and the AR-diffusion model trained with GTS (the preset's student) and, for the comparison, DSM.

Every stage receives a `StageRun` from the pipeline runner (fingerprint, marker), so the CLI, the
Prefect flow and the DVC stages run the same code; training stages resume from their checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from ddcore.checkpoints import atomic_write_text
from ddcore.methods.dd2.continuous import train_continuous
from ddcore.methods.dd2.init_train import Loss, train_ar_diffusion
from ddcore.methods.dd2.samplers import CONTINUOUS_DIR, DSM_DIR
from ddcore.methods.dd2.samples import generate_samples, num_shards
from ddcore.params import Preset
from ddcore.pipeline.markers import StageRun, jsonable
from ddcore.teachers.loading import load_teacher
from ddcore.training.loop import last_log_row

log = logging.getLogger("ddcore.dd2")

SAMPLES = "samples"
CONTINUOUS_LOG, DSM_LOG = "continuous_train_log.csv", "dsm_train_log.csv"


def samples_dir(layout) -> Path:
    return layout.data_dir(SAMPLES)


def continuous_dir(layout) -> Path:
    return layout.model_dir(CONTINUOUS_DIR)


def dsm_dir(layout) -> Path:
    return layout.model_dir(DSM_DIR)


def sample_shards(preset: Preset) -> list[int]:
    return list(range(num_shards(preset.dd2.samples)))


def _skip(run: StageRun) -> dict | None:
    if m := run.complete():
        log.info("%s[%s]: complete, skipping", run.stage, run.preset_name)
        return m.result
    return None


def samples_stage(run: StageRun, shard_ids: Sequence[int] | None = None) -> dict:
    """Teacher samples; with `shard_ids` only those shards (a worker's share, no marker)."""
    if (done := _skip(run)) is not None:
        return done
    if run.stale() is not None:
        run.drop_marker()  # the shards stay: those of the same configuration are kept
    p, layout = run.preset, run.layout
    teacher, _ = load_teacher(p, layout.teacher_dir)
    ids = list(shard_ids) if shard_ids is not None else None
    manifest = generate_samples(
        teacher, p.teacher.sampling, p.dd2.samples, samples_dir(layout), ids, run.progress
    )
    return {"manifest": manifest} if ids is not None else run.finish({"manifest": manifest})


def publish_log(run: StageRun, out: Path, name: str) -> None:
    """A model folder's train_log.csv, copied to metrics/<preset>/<name> (DVC plots, MLflow)."""
    if (src := out / "train_log.csv").is_file():
        atomic_write_text(run.layout.metrics_dir / name, src.read_text())


def _fresh(run: StageRun, out: Path) -> None:
    """A stale marker means other inputs: the folder (and its checkpoint) goes."""
    if run.stale() is not None and out.exists():
        shutil.rmtree(out)


def continuous_stage(run: StageRun, log_fn: Callable[[dict], None] | None = None) -> dict:
    """Fit and fine-tune the continuous-input teacher (resumes); VAR: the native report only."""
    p, layout = run.preset, run.layout
    out = continuous_dir(layout)
    if (result := _skip(run)) is None:
        _fresh(run, out)
        teacher, _ = load_teacher(p, layout.teacher_dir)
        cp, sampling = p.dd2.continuous, p.teacher.sampling
        summary = train_continuous(
            teacher, samples_dir(layout), cp, sampling, out, log_fn=log_fn, progress=run.progress
        )
        result = run.finish({"summary": jsonable(summary)})
    publish_log(run, out, CONTINUOUS_LOG)
    return result


def _ar_diffusion(run: StageRun, loss: Loss, out: Path, log_fn) -> dict:
    from ddcore.methods.dd2.continuous import load_continuous

    if (done := _skip(run)) is not None:
        return done
    p, layout = run.preset, run.layout
    _fresh(run, out)
    teacher, _ = load_teacher(p, layout.teacher_dir)
    continuous = load_continuous(teacher, continuous_dir(layout))
    summary = train_ar_diffusion(
        teacher, continuous, samples_dir(layout), p.dd2.ar_diffusion, p.teacher.sampling, loss, out,
        log_fn=log_fn, progress=run.progress,
    )  # fmt: skip
    return run.finish({"summary": jsonable(summary), "final": last_log_row(out / "train_log.csv")})


def ar_diffusion_stage(run: StageRun, log_fn: Callable[[dict], None] | None = None) -> dict:
    """The AR-diffusion model with the GTS loss: the preset's student (its train_log is published)."""
    result = _ar_diffusion(run, "gts", run.layout.student_dir, log_fn)
    run.layout.copy_train_log()
    return result


def ar_diffusion_dsm_stage(run: StageRun, log_fn: Callable[[dict], None] | None = None) -> dict:
    """The same model and schedule with the plain diffusion loss (the comparison row)."""
    result = _ar_diffusion(run, "dsm", dsm_dir(run.layout), log_fn)
    publish_log(run, dsm_dir(run.layout), DSM_LOG)
    return result

"""Prefect flow `distill`: prepare -> trajectories (sharded) -> distill -> evaluate -> bench -> register.

Every task calls the matching function of `ddcore.stages`, the same one DVC and `ddcore pipeline`
call, so the flow adds only orchestration: retries on transient failures, parallel trajectory
shards, artifacts in the UI and the flow-run id on the MLflow run. Tasks write files, so none of
them uses Prefect's result cache (NO_CACHE): a cached return value would claim files that may
have been deleted. Skipping finished work is the stages' own job (their completion markers).

Run locally without a server (an ephemeral API starts in a subprocess):
    python -m flows.distill --preset micro
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from ddcore import stages
from ddcore.cli import resolve_preset
from ddcore.params import Preset

TRANSIENT = (OSError, TimeoutError, ConnectionError)
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotImplementedError)


def retry_transient(task, task_run, state) -> bool:
    """Retry only what a retry can fix (I/O, network, storage); bugs and bad params fail at once."""
    try:
        state.result()
    except PERMANENT:
        return False
    except TRANSIENT:
        return True
    except Exception:
        return False
    return False


def _task(**kw):
    opts: dict[str, Any] = {
        "cache_policy": NO_CACHE,
        "retries": 2,
        "retry_delay_seconds": [10, 60],
        "retry_condition_fn": retry_transient,
    }
    opts.update(kw)
    return task(**opts)


@_task(name="prepare", retries=3, retry_delay_seconds=[10, 60, 300])
def prepare(preset_name: str, preset: Preset) -> dict:
    return stages.prepare_teacher(preset_name, preset, progress=False)


@_task(name="trajectory-shard", tags=["gpu"])
def trajectory_shard(preset_name: str, preset: Preset, shard: int) -> dict:
    return stages.generate_trajectories_stage(preset_name, preset, shard_ids=[shard], progress=False)


@_task(name="trajectories")
def trajectories(preset_name: str, preset: Preset) -> dict:
    """After all shards: validates the set, writes the manifest, marks the stage complete."""
    return stages.generate_trajectories_stage(preset_name, preset, progress=False)


@_task(name="distill", tags=["gpu"])
def distill_student(preset_name: str, preset: Preset) -> dict:
    logger = get_run_logger()

    def log_fn(row: dict) -> None:
        logger.info("train %s", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})

    return stages.distill_stage(preset_name, preset, log_fn=log_fn, progress=False)


@_task(name="evaluate", tags=["gpu"])
def evaluate(preset_name: str, preset: Preset) -> dict:
    return stages.evaluate_stage(preset_name, preset, progress=False)


@_task(name="bench", tags=["gpu"])
def bench(preset_name: str, preset: Preset) -> dict:
    return stages.bench_stage(preset_name, preset, progress=False)


@_task(name="register")
def register(preset_name: str, preset: Preset, flow_run_id: str | None, flow_run_url: str | None) -> dict:
    return stages.register_stage(preset_name, preset, flow_run_id=flow_run_id, flow_run_url=flow_run_url)


def _key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def _fmt(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v


def publish_artifacts(
    preset_name: str, preset: Preset, eval_result: dict, bench_result: dict, reg: dict
) -> None:
    """Metrics table, a markdown summary with the promotion decision, and a link to the MLflow run."""
    bench_rows = {str(r.get("sampler")): r for r in stages.bench_rows(bench_result, preset)}
    table = []
    for r in stages.sampler_rows(eval_result):
        b = bench_rows.get(str(r.get("sampler")), {})
        row = {"sampler": r.get("sampler"), "steps": r.get("steps")}
        row |= {k: _fmt(v) for k, v in r.items() if isinstance(v, int | float) and k != "steps"}
        row |= {f"bench_{k}": _fmt(v) for k, v in b.items() if isinstance(v, int | float) and k != "steps"}
        table.append(row)
    if table:
        create_table_artifact(
            table=table, key=_key("metrics", preset_name), description=f"eval + bench, {preset_name}"
        )
    dec = reg.get("decision") or {}
    lines = [
        f"# distill `{preset_name}`",
        "",
        f"Registered **{reg.get('model_name')} v{reg.get('version')}** "
        f"(aliases: {', '.join(reg.get('aliases') or []) or 'none'}).",
        "",
        f"Promotion: {'champion' if dec.get('promote') else 'challenger'} - {dec.get('reason', '')}",
        "",
    ]
    if table:
        cols = list(dict.fromkeys(k for row in table for k in row))
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in table]
    create_markdown_artifact(markdown="\n".join(lines), key=_key("report", preset_name))
    if reg.get("run_url"):
        create_link_artifact(link=reg["run_url"], link_text="MLflow run", key=_key("mlflow-run", preset_name))


@flow(name="distill", log_prints=True)
def distill(preset: str = "tiny", overrides: list[str] | None = None, parallel_shards: int = 2) -> dict:
    """Distil the preset's teacher into a few-step DD1 student and register it.

    `overrides` are `key.path=value` strings (as `ddcore --set`), validated before any work.
    `parallel_shards` bounds how many trajectory shards run at once on this worker.
    """
    logger = get_run_logger()
    p = resolve_preset(preset, overrides or [], stages.layout_for(preset).params_file)
    logger.info(
        "preset %s: teacher %s, %d trajectory shard(s)",
        preset,
        p.teacher.name,
        len(stages.trajectory_shards(p)),
    )

    prepare(preset, p)
    shards = stages.trajectory_shards(p)
    wave = max(1, parallel_shards)
    for i in range(0, len(shards), wave):
        futures = [trajectory_shard.submit(preset, p, s) for s in shards[i : i + wave]]
        for f in futures:
            f.result()  # raises if a shard failed after its retries
    trajectories(preset, p)
    distill_student(preset, p)
    ev_result = evaluate(preset, p)
    be_result = bench(preset, p)  # after evaluate: timings on an otherwise idle device
    run_id = str(flow_run.id) if flow_run.id else None
    reg = register(preset, p, run_id, flow_run.ui_url if run_id else None)
    publish_artifacts(preset, p, ev_result, be_result, reg)
    return {"preset": preset, "registered": reg}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the distill flow locally (ephemeral Prefect API).")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    ap.add_argument("--parallel-shards", type=int, default=2)
    a = ap.parse_args(argv)
    distill(preset=a.preset, overrides=a.overrides, parallel_shards=a.parallel_shards)


if __name__ == "__main__":
    main()

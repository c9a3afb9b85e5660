"""Prefect flow `distill`: prepare -> the method's stages (DD1: trajectories, sharded -> distill) ->
evaluate -> bench -> register.

Every task calls `ddcore.pipeline.runner.run_stage`, the same function DVC and `ddcore pipeline`
call, so the flow adds only orchestration: retries on transient failures, parallel shards,
artifacts in the UI and the flow-run id on the MLflow run. Tasks write files, so none of
them uses Prefect's result cache (NO_CACHE): a cached return value would claim files that may
have been deleted. Skipping finished work is the stages' own job (their completion markers).

Run locally without a server (an ephemeral API starts in a subprocess):
    python -m flows.distill --preset micro
"""

from __future__ import annotations

import argparse
import inspect
import re
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from ddcore.params import Preset
from ddcore.pipeline.layout import Layout, layout_for
from ddcore.pipeline.plan import stage_names
from ddcore.pipeline.presets import resolve_preset
from ddcore.pipeline.runner import run_stage, stage_function, stage_shards
from ddcore.results import BenchResult, EvalResult
from ddcore.retry import PERMANENT_ERRORS, TRANSIENT_ERRORS


def retry_transient(task, task_run, state) -> bool:
    """Retry only what a retry can fix (I/O, network, storage); bugs and bad params fail at once."""
    try:
        state.result()
    except PERMANENT_ERRORS:
        return False
    except TRANSIENT_ERRORS:
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


@_task(name="stage")
def stage(preset_name: str, preset: Preset, stage: str, options: dict | None = None) -> dict:
    """One stage through the runner the CLI and DVC use (prepare may download: more retries);
    a training stage (one that takes `log_fn`) logs its rows to the flow run."""
    kw = dict(options or {})
    if "log_fn" in inspect.signature(stage_function(preset, stage)).parameters:
        logger = get_run_logger()

        def log_fn(row: dict) -> None:
            logger.info("train %s", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})

        kw["log_fn"] = log_fn
    return run_stage(preset_name, preset, layout_for(preset_name), stage, progress=False, **kw)


@_task(name="shard", task_run_name="{stage}-{shard}", tags=["gpu"])
def shard(preset_name: str, preset: Preset, stage: str, shard: int) -> dict:
    return run_stage(preset_name, preset, layout_for(preset_name), stage, progress=False, shard_ids=[shard])


CPU_STAGES = ("prepare", "register")  # the others want the GPU worker


def _stage_task(name: str):
    t = stage.with_options(name=name, tags=[] if name in CPU_STAGES else ["gpu"])
    if name == "prepare":  # may download checkpoints: more patience
        t = t.with_options(retries=3, retry_delay_seconds=[10, 60, 300])
    return t


def _key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def _fmt(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v


def publish_artifacts(preset_name: str, preset: Preset, layout: Layout, reg: dict) -> None:
    """Metrics table, a markdown summary with the promotion decision, and a link to the MLflow run."""
    ev, be = EvalResult.load(layout.eval_json), BenchResult.load(layout.bench_json)
    case = be.own_case(preset.bench.cases)
    table = []
    for r in ev.rows():
        b = be.row(case, r["sampler"]) or {}
        row = {"sampler": r["sampler"], "steps": r.get("steps")}
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
    """Distil the preset's teacher into a few-step student with the preset's method and register it.

    `overrides` are `key.path=value` strings (as `ddcore --set`), validated before any work.
    `parallel_shards` bounds how many shards of a sharded stage run at once on this worker.
    """
    logger = get_run_logger()
    layout = layout_for(preset)
    p = resolve_preset(preset, overrides or [], layout.params_file)
    names = stage_names(p)
    logger.info(
        "preset %s: teacher %s, method %s, stages %s", preset, p.teacher.name, p.method, ", ".join(names)
    )
    reg: dict = {}
    for name in names:
        if (shards := stage_shards(p, name)) is not None:
            wave = max(1, parallel_shards)
            for i in range(0, len(shards), wave):
                futures = [shard.submit(preset, p, name, s) for s in shards[i : i + wave]]
                for f in futures:
                    f.result()  # raises if a shard failed after its retries
        options = None
        if name == "register":
            run_id = str(flow_run.id) if flow_run.id else None
            options = {"flow_run_id": run_id, "flow_run_url": flow_run.ui_url if run_id else None}
        # bench runs after evaluate: timings on an otherwise idle device
        result = (
            stage.with_options(retries=3, retry_delay_seconds=[10, 60, 300]) if name == "prepare" else stage
        )
        out = result(preset, p, name, options)
        if name == "register":
            reg = out
    publish_artifacts(preset, p, layout, reg)
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

"""The one way a stage runs: the CLI, the Prefect flow and the DVC stages all call `run_stage`
(or `run_pipeline`, which calls it for each stage in order)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ddcore.checkpoints import sweep_folder
from ddcore.methods.registry import get_method
from ddcore.params import Preset
from ddcore.pipeline.layout import Layout
from ddcore.pipeline.plan import output_dir, stage_names, stage_run
from ddcore.pipeline.stages import bench_stage, evaluate_stage, prepare_stage, register_stage

log = logging.getLogger("ddcore.pipeline")

COMMON_STAGES: dict[str, Callable[..., dict]] = {
    "prepare": prepare_stage,
    "evaluate": evaluate_stage,
    "bench": bench_stage,
    "register": register_stage,
}


def stage_function(preset: Preset, stage: str) -> Callable[..., dict]:
    if stage in COMMON_STAGES:
        return COMMON_STAGES[stage]
    for s in get_method(preset.method).stages:
        if s.name == stage:
            return s.run
    raise ValueError(f"unknown stage {stage!r}; allowed: {', '.join(stage_names(preset))}")


def stage_shards(preset: Preset, stage: str) -> list[int] | None:
    """Shard ids a stage can be split into (run separately, e.g. in parallel), or None."""
    for s in get_method(preset.method).stages:
        if s.name == stage and s.shards is not None:
            return s.shards(preset)
    return None


def run_stage(
    preset_name: str, preset: Preset, layout: Layout, stage: str, progress: bool = True, **kw: Any
) -> dict:
    """Run one stage (it returns at once when its marker says it is complete). `kw` are the
    stage's own options: `shard_ids` (sharded stages), `log_fn` (training), `flow_run_id` /
    `flow_run_url` (register)."""
    fn = stage_function(preset, stage)
    for folder in (output_dir(layout, preset, stage), layout.metrics_dir):  # a killed run's leftovers
        if gone := sweep_folder(folder):
            log.info("%s[%s]: removed %d temporary file(s) of killed writers", stage, preset_name, len(gone))
    return fn(stage_run(layout, preset_name, preset, stage, progress), **kw)


def run_pipeline(
    preset_name: str,
    preset: Preset,
    layout: Layout,
    stages: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """The preset's stages in order (each skipping when already complete); each stage's result."""
    names = stage_names(preset)
    wanted = list(stages) if stages is not None else list(names)
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; allowed: {', '.join(names)}")
    from tqdm.auto import tqdm

    out: dict[str, dict] = {}
    bar = tqdm(
        [s for s in names if s in wanted], desc=f"pipeline {preset_name}", unit="stage", disable=not progress
    )
    for s in bar:
        bar.set_postfix_str(s)
        t0 = time.perf_counter()
        out[s] = run_stage(preset_name, preset, layout, s, progress=progress)
        log.info("%s[%s] done in %.1f s", s, preset_name, time.perf_counter() - t0)
    return out

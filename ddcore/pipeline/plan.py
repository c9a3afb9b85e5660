"""Which stages a preset runs, what each reads, and the fingerprints that chain them.

prepare -> the method's own stages (DD1: trajectories -> distill) -> evaluate -> bench -> register.
A stage's fingerprint covers the preset values it reads (defaults included) and the fingerprints of
the stages it reads from, so changing a value reruns exactly the stages downstream of it. The
per-stage JSON files DVC depends on (`metrics/<preset>/params/<stage>.json`) hold the same values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddcore.checkpoints import atomic_write_text
from ddcore.hashing import fingerprint
from ddcore.methods.base import Method
from ddcore.methods.registry import get_method
from ddcore.params import Preset
from ddcore.pipeline.layout import Layout
from ddcore.pipeline.markers import MARKER, StageRun, read_marker

PREPARE_READS = (
    "family",
    "teacher.name",
    "teacher.source",
    "teacher.vq_source",
    "teacher.world",
    "teacher.sampling",
)


@dataclass(frozen=True)
class PlannedStage:
    name: str
    reads: tuple[str, ...]
    after: tuple[str, ...]
    marker_dir: str | None  # "teacher" / "student" / a method output; None: layout.state_dir


def stages_of(preset: Preset) -> tuple[PlannedStage, ...]:
    method = get_method(preset.method)
    own = method.stages
    last = own[-1].name if own else "prepare"
    common_samplers = method.sampler_reads
    return (
        PlannedStage("prepare", PREPARE_READS, (), "teacher"),
        *(PlannedStage(s.name, s.reads, s.after, s.name) for s in own),
        PlannedStage("evaluate", ("teacher.sampling", "eval", *common_samplers), (last,), None),
        PlannedStage(
            "bench",
            ("teacher.sampling", "bench", "eval.samplers", *common_samplers, *method.bench_reads),
            (last,),
            None,
        ),
        PlannedStage(
            "register", ("promote", "method", "headline", "eval.samplers"), ("evaluate", "bench"), None
        ),
    )


def stage_names(preset: Preset) -> tuple[str, ...]:
    return tuple(s.name for s in stages_of(preset))


def planned(preset: Preset, stage: str) -> PlannedStage:
    for s in stages_of(preset):
        if s.name == stage:
            return s
    raise ValueError(f"unknown stage {stage!r}; allowed: {', '.join(stage_names(preset))}")


def method_of(preset: Preset) -> Method:
    return get_method(preset.method)


def output_dir(layout: Layout, preset: Preset, stage: str) -> Path:
    """Where a stage writes (and keeps its marker); committed-metrics stages use the state dir."""
    if stage == "prepare":
        return layout.teacher_dir
    for s in method_of(preset).stages:
        if s.name == stage:
            return Path(s.output(layout))
    return layout.state_dir


def marker_path(layout: Layout, preset: Preset, stage: str) -> Path:
    if planned(preset, stage).marker_dir is None:
        return layout.state_dir / f"{stage}.json"
    return output_dir(layout, preset, stage) / MARKER


def stage_params(preset: Preset, stage: str) -> dict[str, Any]:
    """The resolved preset values a stage reads (defaults included), keyed by their dotted path."""
    data = preset.model_dump(mode="json")
    out = {}
    for key in planned(preset, stage).reads:
        node: Any = data
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def write_stage_params(preset: Preset, out_dir: Path) -> list[Path]:
    """One JSON per stage with exactly what it reads. DVC stages depend on these files, so a
    change anywhere in a preset (or in a default in params.py) reruns exactly the stages whose
    inputs changed; files whose content is unchanged are not rewritten."""
    paths = []
    for stage in stage_names(preset):
        path = out_dir / f"{stage}.json"
        text = json.dumps(stage_params(preset, stage), indent=2, sort_keys=True) + "\n"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
        paths.append(path)
    return paths


def upstream_fingerprint(layout: Layout, preset: Preset, stage: str) -> str:
    m = read_marker(marker_path(layout, preset, stage))
    if m is None:
        raise FileNotFoundError(
            f"stage {stage!r} of preset {layout.preset!r} has not completed "
            f"(no marker at {marker_path(layout, preset, stage)}); run it first"
        )
    return m.fingerprint


def stage_fingerprint(layout: Layout, preset: Preset, stage: str) -> str:
    """What a stage's output depends on: its params and its upstream stages' outputs."""
    params = stage_params(preset, stage)
    upstream = [upstream_fingerprint(layout, preset, s) for s in planned(preset, stage).after]
    extra = [layout.tracking_uri] if stage == "register" else []  # another store = another registration
    return fingerprint(stage, *upstream, params, *extra)


def stage_run(
    layout: Layout, preset_name: str, preset: Preset, stage: str, progress: bool = True
) -> StageRun:
    """The `StageRun` a stage function receives (its fingerprint needs its upstream markers)."""
    fp = stage_fingerprint(layout, preset, stage)
    return StageRun(stage, preset_name, preset, layout, fp, marker_path(layout, preset, stage), progress)

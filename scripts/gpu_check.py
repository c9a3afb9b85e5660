"""gpu-check: ddcore on one CUDA machine, in one bounded run (`make gpu-check`).

The CPU suite cannot reach the CUDA-only paths (bf16 autocast, nccl, CUDA graphs, device placement)
nor the speed claim DD1 exists for, so on a CUDA device this measures, each part in its own process
under its own time budget and all under a hard deadline:

1. pipeline: the `micro` preset end to end (prepare .. register) through `ddcore.pipeline.runner`,
   training in bf16 autocast through torch.compile, checked as the CPU tests check it;
2. ddp: the micro student trained under torchrun (1 process; 2 on >= 2 GPUs, nccl) against the
   one-process run: equal weights within a stated tolerance that a half-batch run must exceed;
3. bench: random-weight LlamaGen-B/-L and VAR-d16, teacher eager and compiled against dd1-1step and
   dd1-2step at batch 1 and 64 (`ddcore.eval.bench.bench_case`, timed in turns, CUDA synchronised;
   CUDA-event times beside the wall clock), with the peak CUDA memory of every run.

Headline: LlamaGen-L at batch 1, dd1-1step against the eager teacher (target >= 150x) and the
compiled teacher (both compiled, >= 40x). Writes metrics/gpu/bench.json and README.md; exit code 1
when a part or a target fails. Without a CUDA device: one line, exit 0, nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = "gpu-check: no CUDA device; nothing to measure"
PRESET = "micro"
TARGETS = {"vs_eager": 150.0, "vs_compiled": 40.0}
COMPILED = "+compile"  # ddcore.samplers.base.COMPILED_SUFFIX
SMOKE_CASE = "llamagen-smoke-random"  # the CPU smoke run's case: the micro architecture, random weights
DDP_ATOL = {"adamw": 1e-4, "muon": 1e-3}  # by train.optimizer
TOLERANCE_NOTE = (  # the reasoning of tests/methods/dd1/test_dd1_ddp.py, for the micro preset's 30 steps (docs/gpu.md)
    "fp32, no compile: runs differ only in the order of gradient sums (and CUDA atomics); 1e-4 for AdamW "
    "(1e-5 for 6 steps on CPU), 1e-3 for Muon; a half-batch run must differ by > 10x max(worst, atol/10)"
)

# the CPU smoke run: a tiny world, a few pairs and steps, a small eval and bench; one override per word
SMOKE_OVERRIDES = (  # noqa: SIM905
    "teacher.world.train_images=200 teacher.world.holdout_images=50 teacher.world.vq_steps=4 "
    "teacher.world.gpt_steps=4 teacher.world.evaluator_steps=4 teacher.world.quality_samples_per_class=1 "
    "dd1.trajectories.num_pairs=64 dd1.trajectories.shard_size=32 dd1.trajectories.batch_size=32 "
    "dd1.train.steps=12 dd1.train.val_every=4 dd1.train.val_pairs=16 eval.num_samples=32 eval.batch_size=32 "
    "bench.throughput_batch=2 bench.repeats=1"
).split()


@dataclass(frozen=True)
class Plan:
    device: str  # "cuda"; "cpu" is the smoke run
    deadline_s: float
    budgets: dict[str, float]  # pipeline, ddp; the bench gets what is left
    bench_tasks: tuple[tuple[str, tuple[int, ...]], ...]  # (case, batches), most important first
    headline: tuple[str, int]
    repeats: int
    warmup: int
    max_tokens: int | None


_L, _B, _V = "llamagen-l-random", "llamagen-b-random", "var-d16-random"
_TASKS = ((_L, (1,)), (_B, (1,)), (_V, (1, 64)), (_L, (64,)), (_B, (64,)))
CUDA_PLAN = Plan("cuda", 470.0, {"pipeline": 200.0, "ddp": 75.0}, _TASKS, (_L, 1), 3, 2, None)
_SMOKE = ((SMOKE_CASE, (1, 2)),)
SMOKE_PLAN = Plan("cpu", 2400.0, {"pipeline": 1300.0, "ddp": 600.0}, _SMOKE, (SMOKE_CASE, 1), 1, 1, 16)


# --- pure parts (unit-tested in tests/test_gpu_check.py)
def finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats -> None, tuples -> lists, other unknown types -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj if obj is None or isinstance(obj, str | int | bool) else str(obj)


def headline_ratios(rows: Mapping[str, Mapping], targets: Mapping[str, float] = TARGETS) -> dict:
    """dd1-1step against the eager teacher and against the compiled one (both compiled, the bench's
    rule; the eager student if no compiled one was timed), from {sampler: {"sec_per_image": s}}."""
    spi = {n: (rows.get(n) or {}).get("sec_per_image") for n in ("teacher", "dd1-1step")}
    spi |= {f"{n}{COMPILED}": (rows.get(f"{n}{COMPILED}") or {}).get("sec_per_image") for n in list(spi)}
    t, s, tc, sc = (v if finite(v) and v > 0 else None for v in spi.values())
    vs_eager, vs_eager_tc = (t / s if t and s else None), (tc / s if tc and s else None)
    vs_comp, basis = (tc / sc, "both compiled") if tc and sc else (vs_eager_tc, "eager student")
    out = {"compiled_basis": basis if vs_comp else None, "eager_student_vs_compiled_teacher": vs_eager_tc}
    for k, v in (("eager", vs_eager), ("compiled", vs_comp)):
        out |= {f"speedup_vs_{k}_teacher": v, f"target_vs_{k}": targets[f"vs_{k}"]}
        out[f"meets_vs_{k}"] = finite(v) and v >= targets[f"vs_{k}"]
    return out | {"ok": out["meets_vs_eager"] and out["meets_vs_compiled"]}


def event_rows(case: Mapping, medians: Mapping[str, float], batch: int) -> dict[str, dict]:
    """Per-sampler s/img from CUDA-event medians, composed as bench_case composes wall times:
    a teacher is its generation (scaled when extrapolated) plus its own VQ-decode job."""
    rows, seq_len = case.get("samplers") or {}, (case.get("teacher") or {}).get("seq_len")
    out: dict[str, dict] = {}
    for name, row in rows.items():
        run, t = (row.get("runs") or {}).get(str(batch)) or {}, medians.get(name)
        if t is not None and "generate_seconds" in run:
            stop = run.get("extrapolated_from_tokens")
            dec = medians.get("VQ decode (compiled)" if name.endswith(COMPILED) else "VQ decode")
            t = None if dec is None else (t * seq_len / stop if stop and seq_len else t) + dec
        if t is not None:
            out[name] = {"sec_per_image": t / batch}
    for name, r in out.items():
        ref = out.get(rows[name].get("speedup_reference") or "")
        r["speedup"] = ref["sec_per_image"] / r["sec_per_image"] if ref else None
    return out


def compare_state_dicts(ref: Mapping[str, Any], other: Mapping[str, Any]) -> dict:
    """The largest absolute elementwise difference over all tensors, and which tensor has it."""
    if set(ref) != set(other) or any(tuple(ref[k].shape) != tuple(other[k].shape) for k in ref):
        return {"keys_match": False, "max_abs_diff": None, "worst_tensor": None}
    worst, where = 0.0, None
    for k in sorted(ref):
        d = (ref[k].double() - other[k].double()).abs().max().item() if ref[k].numel() else 0.0
        d = d if math.isfinite(d) else math.inf
        if where is None or d > worst:
            worst, where = d, k
    return {"keys_match": True, "max_abs_diff": worst, "worst_tensor": where}


def ddp_verdict(diffs: Mapping[str, dict], control: Mapping, atol: float) -> dict:
    """Every run equal to the one-process run within `atol`, and the half-batch control further
    from it than 10x max(worst, atol/10): the tolerance still tells other training apart."""
    vals = [d.get("max_abs_diff") if d.get("keys_match") else None for d in diffs.values()]
    equal = bool(vals) and all(finite(v) and v <= atol for v in vals)
    worst = max((v for v in vals if finite(v)), default=None)
    floor, c = 10 * max(worst or 0.0, atol / 10), control.get("max_abs_diff")
    separates = finite(c) and c > floor
    out = {"atol": atol, "worst": worst, "equal_within_atol": equal, "control_diff": c}
    return out | {"control_must_exceed": floor, "control_separates": separates, "ok": equal and separates}


def pipeline_checks(log: list, fids: Mapping, wanted: Sequence[str], timed: Mapping, reg: Mapping) -> dict:
    """What the CPU tests assert of a micro run, from its train log and its evaluate, bench and
    register results."""

    def num(r: Mapping, k: str) -> float:
        try:
            return float(r.get(k))
        except (TypeError, ValueError):
            return math.nan

    loss, terms = [num(r, "loss") for r in log], [num(r, k) for r in log for k in ("loss", "ce", "mse")]
    out = {"losses_finite": bool(log) and all(map(math.isfinite, terms))}
    out["loss_decreases"] = len(loss) >= 2 and loss[-1] < loss[0]
    fid = [(fids.get(s) or {}).get("fid") for s in wanted]
    spi = [(timed.get(s) or {}).get("sec_per_image") for s in wanted]
    out["fid_finite_every_sampler"] = bool(fid) and all(map(finite, fid))
    out["bench_every_sampler"] = bool(spi) and all(map(finite, spi))
    return out | {"registered_version": bool(reg.get("version"))}


def _x(v: Any, fmt: str = ".1f", unit: str = "") -> str:
    return f"{v:{fmt}}{unit}" if finite(v) else "–"


def render_readme(report: Mapping) -> str:
    """metrics/gpu/README.md: the report as compact markdown tables."""
    dev, parts, h = report.get("device") or {}, report.get("parts") or {}, report.get("headline")
    head = f"Device: **{dev.get('name', '?')}** ({dev.get('count', '?')} visible), torch {dev.get('torch', '?')}, "
    head += f"CUDA {dev.get('cuda', '?')}; mode `{report.get('mode')}`, {report.get('started', '?')}, "
    head += f"{_x(report.get('elapsed_s'), '.0f')} s. Overall: **{'PASS' if report.get('ok') else 'FAIL'}**."
    out = ["# GPU check", "", head, "", "Rendered from `bench.json` by `scripts/gpu_check.py`.", ""]
    out += ["| part | result | seconds | note |", "|---|---|---|---|"]
    for name, p in parts.items():
        note = " ".join(str(p.get("note") or p.get("error") or "").split())[:200].replace("|", "\\|")
        res = "pass" if p.get("ok") else "FAIL"
        out.append(f"| {name} | {res} | {_x(p.get('seconds'), '.0f')} | {note} |")
    if h:
        out += ["", f"Headline: `{h.get('case')}` at batch {h.get('batch')} (medians). {h.get('note', '')}"]
        out += ["", "| dd1-1step vs | wall clock | CUDA events | target | result |", "|---|---|---|---|---|"]
        for k in ("eager", "compiled"):
            v, e = (d.get(f"speedup_vs_{k}_teacher") for d in (h, h.get("cuda_events") or {}))
            what = "eager teacher" if k == "eager" else f"compiled teacher ({h.get('compiled_basis')})"
            cells = f"{_x(v, '.1f', '×')} | {_x(e, '.1f', '×')} | ≥ {h.get(f'target_vs_{k}')}×"
            out.append(f"| {what} | {cells} | {'pass' if h.get(f'meets_vs_{k}') else 'FAIL'} |")
    runs = (parts.get("bench") or {}).get("runs") or {}
    batches = sorted({int(b) for r in runs.values() for b in r.get("runs") or {}})
    lo, hi = (batches[0], batches[-1]) if batches else (1, 1)
    cols = f"s/img (bs {lo}) | speedup (bs {lo}) | img/s (bs {hi}) | speedup (bs {hi}) | peak MB (bs {lo} / {hi})"
    out += ["", f"| case | sampler | {cols} |", "|---|---|---|---|---|---|---|"] if batches else []
    for case, r in runs.items():
        by_b = r.get("runs") or {}
        for n in dict.fromkeys(n for one in by_b.values() for n in one.get("samplers") or {}):
            a, z = ((by_b.get(str(b)) or {}).get("samplers", {}).get(n) or {} for b in (lo, hi))
            cells = [_x(a.get("sec_per_image"), ".4f"), _x(a.get("speedup"), ".1f", "×")]
            cells += [_x(z.get("images_per_s"), ".1f"), _x(z.get("speedup"), ".1f", "×")]
            cells.append(f"{_x(a.get('peak_mem_mb'), '.0f')} / {_x(z.get('peak_mem_mb'), '.0f')}")
            out.append(f"| {case} | {n} | {' | '.join(cells)} |")
    return "\n".join(out) + "\n"


# --- children: one process per part (and per bench task), each saving its state as it goes
@dataclass
class Child:
    work: Path
    result: Path
    plan: Plan
    state: dict = dataclasses.field(default_factory=lambda: {"ok": False})
    smoke = property(lambda self: self.plan.device == "cpu")

    def save(self) -> None:
        (tmp := self.result.with_suffix(".tmp")).write_text(json.dumps(clean(self.state), indent=1))
        tmp.replace(self.result)


def pipeline_overrides(smoke: bool) -> list[str]:
    train = ["dd1.train.compile=true", "dd1.train.precision=auto"]  # auto = bf16 autocast on CUDA
    return [*train, *(SMOKE_OVERRIDES if smoke else ["eval.num_samples=500", "eval.batch_size=250"])]


def _peak() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _preset(overrides: Sequence[str]) -> Any:
    from ddcore.params import PARAMS_FILE
    from ddcore.pipeline.presets import resolve_preset

    return resolve_preset(PRESET, list(overrides), PARAMS_FILE)


def child_pipeline(ctx: Child) -> None:
    from ddcore.pipeline.layout import Layout
    from ddcore.pipeline.plan import stage_names
    from ddcore.pipeline.runner import run_pipeline
    from ddcore.training.loop import setup_processes, trains_in_bf16

    preset, st, cuda = _preset(pipeline_overrides(ctx.smoke)), ctx.state, ctx.plan.device == "cuda"
    layout, tp = Layout.create(PRESET, root=ctx.work / "pipeline"), preset.dd1.train
    st.update(overrides=pipeline_overrides(ctx.smoke), bf16=trains_in_bf16(tp, ctx.plan.device))
    st["compile"] = tp.compile
    if cuda:  # "cuda" is what DD_DEVICE=auto resolves to; the children train on cuda:0 (child_env)
        try:
            setup_processes("cuda")
            st["default_device_probe"] = "ok"
        except Exception as e:
            st["default_device_probe"] = f"training.loop.setup_processes('cuda'): {type(e).__name__}: {e}"
    outs, st["stage_seconds"] = {}, {}
    for stage in stage_names(preset):
        t0 = time.perf_counter()
        outs[stage] = run_pipeline(PRESET, preset, layout, stages=[stage], progress=False)[stage]
        st["stage_seconds"][stage] = time.perf_counter() - t0
        ctx.save()
    ev, reg, benched = outs["evaluate"].get("samplers") or {}, outs["register"], outs["bench"].get("samplers")
    st.update(fid={k: v.get("fid") for k, v in ev.items()}, final_train_row=outs["distill"].get("final"))
    st["register"] = {k: reg.get(k) for k in ("model_name", "version", "aliases")}
    st["bench_training"] = json.loads(layout.bench_json.read_text()).get("extra", {}).get("training")
    with open(layout.train_log, newline="") as f:
        checks = pipeline_checks(list(csv.DictReader(f)), ev, preset.eval.samplers, benched or {}, reg)
    checks["one_process"] = outs["distill"].get("processes") == 1
    if cuda:
        checks["trains_in_bf16_with_compile"] = bool(st["bf16"] and st["compile"])
        checks["default_device_trains"] = st["default_device_probe"] == "ok"
    failed = [k for k, v in checks.items() if not v]
    note = f"FID {', '.join(f'{k} {_x(v)}' for k, v in st['fid'].items())}; dd-micro v{reg.get('version')}"
    note += f"; failed: {', '.join(failed)}" if failed else ""
    st.update(checks=checks, cuda_peak_mb=_peak(), ok=not failed, note=note)


def _copy_inputs(src: Any, dst: Any) -> None:
    """The prepared teacher and the trajectories (with their markers) of another root."""
    from ddcore.methods.dd1.stages import traj_dir

    for a, b in ((src.teacher_dir, dst.teacher_dir), (traj_dir(src), traj_dir(dst))):
        if a.is_dir() and not b.exists():
            shutil.copytree(a, b)


def child_ddp(ctx: Child) -> None:
    import torch
    from safetensors.torch import load_file

    from ddcore.pipeline.layout import Layout
    from ddcore.pipeline.runner import run_pipeline, run_stage
    from ddcore.training.launch import torchrun_stage

    ov = [*pipeline_overrides(ctx.smoke), "dd1.train.precision=fp32", "dd1.train.compile=false"]
    preset = _preset(ov)
    half = _preset([*ov, f"dd1.train.batch_size={preset.dd1.train.batch_size // 2}"])
    st, atol = ctx.state, DDP_ATOL[preset.dd1.train.optimizer]
    st.update(atol=atol, tolerance=TOLERANCE_NOTE, runs={})
    base = Layout.create(PRESET, root=ctx.work / "ddp" / "base")
    _copy_inputs(Layout.create(PRESET, root=ctx.work / "pipeline"), base)  # part 1's, when it got that far
    run_pipeline(PRESET, preset, base, stages=["prepare", "trajectories"], progress=False)

    def train(name: str, fn: Callable[[Any], Any]) -> tuple[dict, list[float]]:
        lay = Layout.create(PRESET, root=ctx.work / "ddp" / name)
        _copy_inputs(base, lay)
        t0 = time.perf_counter()
        fn(lay)
        st["runs"][name] = {"seconds": time.perf_counter() - t0}
        ctx.save()
        with open(lay.student_dir / "train_log.csv", newline="") as f:
            losses = [float(r["loss"]) for r in csv.DictReader(f)]
        return load_file(str(lay.student_dir / "student.safetensors")), losses

    def distill(p: Any) -> Callable[[Any], Any]:
        return lambda lay: run_stage(PRESET, p, lay, "distill", progress=False)

    def torchrun_1(lay: Any) -> None:  # the stage itself starts torchrun only for > 1 process
        roots = {k: getattr(lay, f"{k}_root") for k in ("data", "model", "metrics", "project")}
        torchrun_stage("distill", PRESET, preset.model_dump(mode="json"), roots, lay.state_dir, 1)

    os.environ["DD_NPROC_PER_NODE"] = "1"
    (ref, ref_loss), (ctl, _) = train("one-process", distill(preset)), train("half-batch", distill(half))
    others = {"torchrun-1": train("torchrun-1", torchrun_1)}
    st["two_process_run"] = two = ctx.plan.device == "cpu" or torch.cuda.device_count() >= 2  # gloo / nccl
    if two:
        os.environ["DD_NPROC_PER_NODE"] = "2"
        if ctx.plan.device == "cuda":  # ranks map "cuda" to cuda:LOCAL_RANK; "cuda:0" would collide
            os.environ["DD_DEVICE"] = "cuda"
        others["ddp-2"] = train("ddp-2", distill(preset))
    diffs = {k: compare_state_dicts(ref, w) for k, (w, _) in others.items()}
    for k, (_, loss) in others.items():
        gaps = [abs(a - b) for a, b in zip(loss, ref_loss, strict=True)] if len(loss) == len(ref_loss) else []
        diffs[k]["log_loss_max_diff"] = max(gaps, default=None)
        st["runs"][k].update(diffs[k])
    verdict = ddp_verdict(diffs, compare_state_dicts(ref, ctl), atol)
    logs_ok = all(finite(d["log_loss_max_diff"]) and d["log_loss_max_diff"] <= atol for d in diffs.values())
    per = ", ".join(f"{k} {_x(d['max_abs_diff'], '.1e')}" for k, d in diffs.items())
    note = f"max abs weight diff vs one process: {per} (atol {atol:g}); half-batch control "
    st.update(verdict=verdict, log_losses_equal=logs_ok, cuda_peak_mb=_peak(), ok=verdict["ok"] and logs_ok)
    st["note"] = note + _x(verdict["control_diff"], ".1e") + ("" if two else "; 1 GPU: no 2-process run")


class EventRecorder:
    """CUDA-event times of the calls `time_in_turns` makes (bench_case calls it through its module
    global), for the timed rounds: each job's calls warmup .. warmup+repeats (then one memory call)."""

    def __init__(self, bench_module: Any):
        self.mod, self.orig, self.calls, self.window = bench_module, bench_module.time_in_turns, {}, (0, 0)

    def __enter__(self) -> EventRecorder:
        self.mod.time_in_turns = self.timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.mod.time_in_turns = self.orig

    def timed(self, jobs: Mapping[str, Any], repeats: int, warmup: int, progress: str | None = None) -> None:
        import torch

        self.calls, self.window = {n: [] for n in jobs}, (warmup, warmup + max(1, repeats))
        for name, job in jobs.items():

            def run(fn: Callable[[], Any] = job.fn, pairs: list = self.calls[name]) -> Any:
                pairs.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                pairs[-1][0].record()
                out = fn()
                pairs[-1][1].record()
                return out

            job.fn = run
        self.orig(jobs, repeats, warmup, progress)

    def medians(self) -> dict[str, float]:
        import torch

        torch.cuda.synchronize()
        (lo, hi), sec = self.window, lambda p: [s.elapsed_time(e) / 1e3 for s, e in p]
        return {n: statistics.median(sec(p[lo:hi])) for n, p in self.calls.items() if p[lo:hi]}


def _register_smoke_case() -> None:
    """The smoke run's case: the micro architecture, random weights, registered as families do theirs."""
    import torch

    from ddcore.models import llamagen, vq
    from ddcore.teachers.llamagen import teacher, tiny_gpt, tiny_vq
    from ddcore.teachers.llamagen.family import LLAMAGEN
    from ddcore.teachers.registry import register_family

    def build(device: str) -> Any:
        torch.manual_seed(0)
        w = _preset([]).teacher.world
        dec = vq.VQModel(tiny_vq.vq_config_for(w)).eval()
        gpt = llamagen.GPT(tiny_gpt.gpt_config_for(w, w.image_size // dec.downsample)).eval()
        return teacher.LlamaGenTeacher(gpt, dec, w.num_classes, w.image_size).to(device)

    cases = {**LLAMAGEN.random_cases, SMOKE_CASE: build}
    register_family(dataclasses.replace(LLAMAGEN, random_cases=cases), replace=True)


def child_bench(ctx: Child, case: str, batches: Sequence[int]) -> None:
    import torch
    import torch._dynamo.config as dynamo

    from ddcore.eval import bench
    from ddcore.methods.dd1.samplers import random_students

    dynamo.recompile_limit = 64  # and never fall back to eager silently: "+compile" rows are compiled
    dynamo.fail_on_recompile_limit_hit = True
    if case == SMOKE_CASE:
        _register_smoke_case()
    p, st, t0 = ctx.plan, ctx.state, time.perf_counter()
    samplers = bench.random_case_samplers(case, p.device, student_builder=random_students)
    st.update(case=case, build_seconds=time.perf_counter() - t0, runs={})
    with EventRecorder(bench) if p.device == "cuda" else contextlib.nullcontext() as rec:
        for b in batches:
            t0 = time.perf_counter()
            out = bench.bench_case(samplers, case, (b,), p.repeats, p.warmup, p.max_tokens, False, True)
            out["seconds"] = time.perf_counter() - t0
            if rec is not None:
                out["cuda_events"] = event_rows(out, rec.medians(), b)
                torch.cuda.empty_cache()
            st["runs"][str(b)] = out
            ctx.save()
    rows = [r.get("sec_per_image") for run in st["runs"].values() for r in run["samplers"].values()]
    st["ok"] = bool(rows) and all(finite(v) and v > 0 for v in rows)


# --- the parent: budgets, the deadline, the report
def child_env(plan: Plan) -> dict[str, str]:
    """A local MLflow store (no server, no S3), one process per stage, training on cuda:0: DD_DEVICE=cuda
    trips training.loop.setup_processes (the pipeline part's default_device_probe)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DD_MLFLOW_", "DD_S3_"))}
    device = "cuda:0" if plan.device == "cuda" else "cpu"
    return env | {"PYTHONUNBUFFERED": "1", "DD_NPROC_PER_NODE": "1", "DD_DEVICE": device}


def run_child(tag: str, args: list[str], timeout: float, work: Path, plan: Plan) -> dict:
    """One part in its own process group, killed (torchrun workers too) when `timeout` runs out."""
    if timeout < 10:
        return {"ok": False, "seconds": 0.0, "error": "skipped: no time left before the deadline"}
    result, log = work / f"{tag}.json", work / f"{tag}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args, "--work", str(work)]
    cmd += ["--result", str(result), "--device", plan.device] + (["--smoke"] if plan.device == "cpu" else [])
    t0, rc, timed_out = time.monotonic(), None, False
    with open(log, "w") as f:
        kw: dict[str, Any] = dict(cwd=ROOT, env=child_env(plan), stdout=f, stderr=subprocess.STDOUT)
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # its own process group: torchrun's workers too
            p.wait()
    state = json.loads(result.read_text()) if result.is_file() else {}
    out = {**state, "ok": rc == 0 and bool(state.get("ok")), "seconds": time.monotonic() - t0}
    out["exit_code"] = rc
    if not out["ok"]:
        late = f"timed out after its {timeout:.0f} s budget" if timed_out else None
        out["error"] = state.get("error") or late or f"exit code {rc}" + ("" if state else ", no result file")
        out["log_tail"] = log.read_text(errors="replace")[-3000:]
    return out


def device_info(plan: Plan) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if plan.device != "cuda":
        return info | {"name": f"CPU {platform.machine()} (smoke run, no GPU)", "count": 0}
    p, cudnn = torch.cuda.get_device_properties(0), torch.backends.cudnn
    info |= {"name": p.name, "count": torch.cuda.device_count(), "capability": f"{p.major}.{p.minor}"}
    info |= {"memory_gib": p.total_memory / 2**30, "cudnn": cudnn.version(), "tf32_cudnn": cudnn.allow_tf32}
    return info | {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def finish_bench(report: dict, plan: Plan) -> None:
    """The headline ratios and the memory table, from the bench runs."""
    runs, (case, b) = report["parts"]["bench"].get("runs") or {}, plan.headline
    if run := (runs.get(case) or {}).get("runs", {}).get(str(b)):
        h = {"case": case, "batch": b, **headline_ratios(run["samplers"])}
        if run.get("cuda_events"):
            h["cuda_events"] = headline_ratios(run["cuda_events"])
        if plan.device != "cuda":
            h["note"] = "smoke run on the CPU with a tiny model: the targets apply to CUDA runs only"
        report["headline"] = h
    keys, mem = ("peak_mem_mb", "peak_total_mb", "peak_mem_kind"), []
    for c, r in runs.items():
        for bb, one in (r.get("runs") or {}).items():
            mem += [{"case": c, "batch": int(bb), "sampler": n, **{k: row.get(k) for k in keys}}
                    for n, row in one["samplers"].items()]  # fmt: skip
    parts = [{"part": p, "cuda_peak_mb": report["parts"][p].get("cuda_peak_mb")} for p in ("pipeline", "ddp")]
    report["memory"] = mem + parts


def save_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(clean(report), indent=1) + "\n")
    (out_dir / "README.md").write_text(render_readme(clean(report)))


def parent_main(args: argparse.Namespace) -> int:
    plan = CUDA_PLAN if args.device == "cuda" else SMOKE_PLAN
    plan = dataclasses.replace(plan, deadline_s=float(args.deadline or plan.deadline_s))
    t0, work = time.monotonic(), Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out_dir = Path(args.out or (ROOT / "metrics" / "gpu" if plan.device == "cuda" else work / "out"))
    report: dict = {"schema": 1, "mode": "cuda" if plan.device == "cuda" else "cpu-smoke"}
    report["started"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    report |= {"device": device_info(plan), "plan": dataclasses.asdict(plan), "targets": TARGETS, "parts": {}}

    def left() -> float:
        return plan.deadline_s - (time.monotonic() - t0) - 8  # kept back for writing the report

    def done(name: str, part: dict) -> None:
        report["parts"][name], report["elapsed_s"] = part, time.monotonic() - t0
        save_report(report, out_dir)
        res, note = "pass" if part.get("ok") else "FAIL", part.get("note") or part.get("error") or ""
        print(f"gpu-check: {name}: {res} ({part.get('seconds', 0):.0f} s) {note}", flush=True)

    try:
        for name in ("pipeline", "ddp"):
            done(name, run_child(name, [name], min(plan.budgets[name], left()), work, plan))
        bench: dict = {"budget_s": left(), "tasks": [], "runs": {}}
        report["parts"]["bench"], tb = bench, time.monotonic()
        for case, batches in plan.bench_tasks:
            bs = ",".join(map(str, batches))
            argv = ["bench", "--case", case, "--batches", bs]
            r = run_child(f"bench-{case}-{bs}", argv, left(), work, plan)
            bench["runs"].setdefault(case, {"runs": {}})["runs"].update(r.pop("runs", None) or {})
            task = {k: r.get(k) for k in ("ok", "seconds", "error", "log_tail")}
            bench["tasks"].append({"case": case, "batches": list(batches), **task})
            save_report(report, out_dir)
        failed = [f"{t['case']}@{t['batches']}: {t['error']}" for t in bench["tasks"] if not t["ok"]]
        note = "; ".join([f"{len(bench['tasks']) - len(failed)}/{len(bench['tasks'])} runs", *failed])
        bench.update(ok=not failed, seconds=time.monotonic() - tb, note=note)
        finish_bench(report, plan)
        head_ok = plan.device != "cuda" or bool((report.get("headline") or {}).get("ok"))
        report["ok"] = all(p.get("ok") for p in report["parts"].values()) and head_ok
        if h := report.get("headline"):
            vs_e, vs_c = _x(h["speedup_vs_eager_teacher"]), _x(h["speedup_vs_compiled_teacher"])
            bench["note"] += f"; headline: dd1-1step {vs_e}x the eager teacher, {vs_c}x the compiled one"
        done("bench", bench)
    finally:
        report["elapsed_s"] = time.monotonic() - t0
        save_report(report, out_dir)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res = "PASS" if report.get("ok") else "FAIL"
    print(f"gpu-check: {res} in {report['elapsed_s']:.0f} s; wrote {out_dir}/bench.json and README.md")
    return 0 if report.get("ok") else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ddcore's GPU check (the module docstring; docs/gpu.md)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    for flag in ("--smoke", "--keep"):  # --device cpu --smoke: tiny parts on the CPU; --keep: the work dir
        ap.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in ("--out", "--child", "--work", "--result", "--case", "--batches", "--deadline"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)  # --device cpu is the smoke run (--smoke says so)
    if args.device == "cuda" and not __import__("torch").cuda.is_available():
        print(NO_GPU)
        return 0
    if not args.child:
        return parent_main(args)
    ctx = Child(Path(args.work), Path(args.result), CUDA_PLAN if args.device == "cuda" else SMOKE_PLAN)
    try:
        if args.child == "bench":
            child_bench(ctx, args.case, [int(b) for b in args.batches.split(",")])
        else:
            {"pipeline": child_pipeline, "ddp": child_ddp}[args.child](ctx)
    except BaseException as e:  # the parent reads the state file: say what broke, and where
        ctx.state.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        ctx.save()
        raise
    ctx.save()
    return 0 if ctx.state.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

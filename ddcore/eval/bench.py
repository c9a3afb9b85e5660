"""Speed benchmarks: every sampler of a case measured side by side in one process, warm.

Numbers are only comparable within one run on one machine, so one call measures the teacher
and all students under the same conditions and reports ratios (speedup = teacher batch-1
latency / sampler batch-1 latency). Each figure is the median of `repeats` timed runs after
`warmup` untimed ones, with CUDA synchronised around every run, all under `torch.inference_mode`
(no autograd bookkeeping for any sampler). The samplers of a case are timed in turns (one call
each per round), so a slow spell of a shared machine hits all of them alike. Peak memory comes
from one more call after the timed ones, so its watcher never runs during a timed run.

Cases: the samplers a preset builds (e.g. the tiny world), and the published architectures with
random weights (`llamagen-b-random`, `llamagen-l-random`, `var-d16-random`): latency does not
depend on weight values. On CPU a full 256-token LlamaGen image takes minutes, so `max_tokens` can
time only the first tokens and extrapolate linearly to the full sequence; such figures carry
`"extrapolated_from_tokens"` (attention over a longer prefix makes later tokens slower, so an
extrapolated time is a lower bound). VAR is never extrapolated: its 10 steps differ in size
(1 to 256 tokens), so a per-token rate from the first scales would say nothing about the last.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ddcore.eval.report import render_results_table, write_json  # noqa: F401  (re-exported)
from ddcore.eval.timing import Timed, machine_info, peak_memory, time_in_turns  # noqa: F401
from ddcore.params import BenchParams, SamplingParams
from ddcore.samplers.base import COMPILED_SUFFIX
from ddcore.teachers.registry import random_case_family, random_case_names


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def _inputs(num_classes: int, batch: int) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, num_classes, (batch,), generator=g), [9_000_000 + i for i in range(batch)]


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
def with_compiled(samplers: Sequence, enabled: bool) -> list:
    """Add each sampler's torch.compile'd variant, for samplers that offer one via `compiled()`.

    Only the sampler knows which of its modules and call paths compile cleanly (a KV-cached
    decode step needs static shapes), so the variant is the sampler's job; it must carry its
    own name (e.g. "dd1-1step+compile").
    """
    out = list(samplers)
    if enabled:
        out += [s.compiled() for s in samplers if callable(getattr(s, "compiled", None))]
    return out


def _teacher_of(samplers: Sequence) -> tuple[object | None, object | None]:
    """(the plain teacher sampler, its Teacher) if the case has one.

    Only an exact TeacherSampler counts: subclasses such as the flow-chooser teacher draw their
    tokens differently and are timed as black boxes like any other sampler.
    """
    from ddcore.samplers.base import TeacherSampler

    for s in samplers:
        if type(s) is TeacherSampler:
            return s, s.teacher
    for s in samplers:
        if getattr(s, "teacher", None) is not None:
            return None, s.teacher
    return None, None


def _decode_job(teacher, batch: int) -> Timed:
    """VQ decode of one batch (the cost does not depend on which tokens are decoded)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, teacher.vocab_size, (batch, teacher.seq_len), generator=g)
    return Timed(lambda: teacher.decode(tokens), teacher.device)


def _max_mem(*mems: dict) -> dict:
    out: dict = {"peak_mem_kind": mems[0].get("peak_mem_kind")}
    for key in ("peak_mem_mb", "peak_total_mb"):
        vals = [m[key] for m in mems if m.get(key) is not None]
        out[key] = max(vals) if vals else None
    return out


def _teacher_stop(teacher, max_tokens: int | None) -> int:
    """Where a truncated teacher generation stops: the first step boundary at or past max_tokens."""
    if not max_tokens or max_tokens >= teacher.seq_len:
        return teacher.seq_len
    return next(s for s in [*teacher.step_starts[1:], teacher.seq_len] if s >= max_tokens)


def _teacher_job(ts, batch: int, stop: int) -> Timed:
    """Generation timed on its own; images = decode(generate), so decode is added from its job."""
    teacher, params = ts.teacher, ts.params
    labels, seeds = _inputs(teacher.num_classes, batch)
    return Timed(lambda: teacher.generate(labels, params, teacher.noise(seeds), stop=stop), teacher.device)


def _teacher_result(job: Timed, teacher, batch: int, stop: int, decode: Timed) -> dict:
    gen_full = job.median * teacher.seq_len / stop
    dec = decode.median
    out = {
        "batch": batch,
        "seconds": gen_full + dec,
        "generate_seconds": gen_full,
        "decode_seconds": dec,
        "decode_share": dec / (gen_full + dec),
        "generate_times": job.times,
        **_max_mem(job.mem, decode.mem),
    }
    if stop < teacher.seq_len:
        out["extrapolated_from_tokens"] = stop
    return out


def _sampler_job(s, teacher, batch: int) -> Timed:
    """Whole images() calls."""
    labels, seeds = _inputs(teacher.num_classes if teacher is not None else 1, batch)
    return Timed(lambda: s.images(labels, seeds), teacher.device if teacher is not None else "cpu")


def _sampler_result(job: Timed, batch: int, decode: Timed | None) -> dict:
    total = job.median
    out = {"batch": batch, "seconds": total, "times": job.times, **job.mem}
    if decode is not None:
        # every sampler ends in the teacher's VQ decoder (students decode continuous vectors
        # with the same network), so the teacher's decode time is the decode part of `total`
        out["decode_seconds"] = decode.median
        out["decode_share"] = min(1.0, decode.median / total)
    return out


def bench_case(
    samplers: Sequence,
    case_name: str,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 5,
    warmup: int = 1,
    max_tokens: int | None = None,
    progress: bool = True,
    compile: bool = False,
) -> dict:
    """Latency (batch_sizes[0], normally 1) and throughput (batch_sizes[-1]) of each sampler.

    Per sampler: sec_per_image at the latency batch, images_per_s at the throughput batch,
    speedup (teacher latency / sampler latency) and throughput_speedup, decode_share, peak memory.
    A "+compile" variant's speedup is taken against "teacher+compile" (`speedup_reference` names
    the teacher row used; `speedup_vs_eager_teacher` is kept too), so compiling one side only
    never shows up as a distillation speedup.
    Teacher facts: ms/token at batch 1 and tokens/s at the throughput batch.
    """
    lat_b, thr_b = int(batch_sizes[0]), int(batch_sizes[-1])
    teacher_sampler, teacher = _teacher_of(samplers)
    samplers = with_compiled(samplers, compile)
    stop = _teacher_stop(teacher, max_tokens) if teacher_sampler is not None else None

    # each sampler's VQ decode job: its teacher's, eager or compiled ("+compile" variants)
    decoder_of = {s.name: getattr(s, "teacher", None) or teacher for s in samplers}
    decode_key = {
        n: None if t is None else "VQ decode (compiled)" if getattr(t, "is_compiled", False) else "VQ decode"
        for n, t in decoder_of.items()
    }

    per_sampler: dict[str, dict[int, dict]] = {s.name: {} for s in samplers}
    for b in dict.fromkeys((lat_b, thr_b)):
        jobs: dict[str, Timed] = {}
        for s in samplers:
            key = decode_key[s.name]
            if key is not None and key not in jobs:
                jobs[key] = _decode_job(decoder_of[s.name], b)
        for s in samplers:
            jobs[s.name] = _teacher_job(s, b, stop) if s is teacher_sampler else _sampler_job(s, teacher, b)
        time_in_turns(jobs, repeats, warmup, f"{case_name} batch {b}" if progress else None)
        for s in samplers:
            dec = jobs.get(decode_key[s.name] or "")
            if s is teacher_sampler:
                per_sampler[s.name][b] = _teacher_result(jobs[s.name], teacher, b, stop, dec)
            else:
                per_sampler[s.name][b] = _sampler_result(jobs[s.name], b, dec)

    rows: dict[str, dict] = {}
    for s in samplers:
        per_batch = per_sampler[s.name]
        lat, thr = per_batch[lat_b], per_batch[thr_b]
        rows[s.name] = {
            "steps": int(s.steps),
            "sec_per_image": lat["seconds"] / lat_b,
            "images_per_s": thr_b / thr["seconds"],
            "latency_batch": lat_b,
            "throughput_batch": thr_b,
            "decode_share": lat.get("decode_share"),
            "decode_share_throughput": thr.get("decode_share"),
            "peak_mem_mb": lat.get("peak_mem_mb"),
            "peak_mem_mb_throughput": thr.get("peak_mem_mb"),
            "peak_total_mb": lat.get("peak_total_mb"),
            "peak_total_mb_throughput": thr.get("peak_total_mb"),
            "peak_mem_kind": lat.get("peak_mem_kind"),
            "extrapolated_from_tokens": lat.get("extrapolated_from_tokens"),
            "runs": {str(b): m for b, m in per_batch.items()},
        }
    case: dict = {
        "samplers": rows,
        "settings": {"batch_sizes": [lat_b, thr_b], "repeats": repeats, "warmup": warmup},
    }
    if teacher_sampler is not None:
        t = rows[teacher_sampler.name]
        t_compiled = rows.get(f"{teacher_sampler.name}{COMPILED_SUFFIX}")
        for name, r in rows.items():
            # a compiled sampler races the compiled teacher: same compiler, same machine
            ref_name = teacher_sampler.name
            if name.endswith(COMPILED_SUFFIX) and t_compiled is not None:
                ref_name = f"{teacher_sampler.name}{COMPILED_SUFFIX}"
                r["speedup_vs_eager_teacher"] = t["sec_per_image"] / r["sec_per_image"]
            ref = rows[ref_name]
            r["speedup"] = ref["sec_per_image"] / r["sec_per_image"]
            r["throughput_speedup"] = r["images_per_s"] / ref["images_per_s"]
            r["speedup_reference"] = ref_name
        tl, tt = t["runs"][str(lat_b)], t["runs"][str(thr_b)]
        case["teacher"] = {
            "name": teacher_sampler.name,
            "seq_len": teacher.seq_len,
            "ar_steps": len(teacher.step_sizes),
            "ms_per_token_b1": 1000 * tl["generate_seconds"] / lat_b / teacher.seq_len
            if lat_b == 1
            else None,
            "ms_per_step_b1": 1000 * tl["generate_seconds"] / len(teacher.step_sizes) if lat_b == 1 else None,
            "tokens_per_s": thr_b * teacher.seq_len / tt["generate_seconds"],
            "tokens_per_s_batch": thr_b,
            "extrapolated_from_tokens": tl.get("extrapolated_from_tokens"),
        }
    else:
        for r in rows.values():
            r["speedup"] = r["throughput_speedup"] = None
    return case


# --------------------------------------------------------------------------------------------
# random-weight published architectures (each family registers its cases)
# --------------------------------------------------------------------------------------------
def random_teacher(case: str, device: str | torch.device = "cpu"):
    """A published architecture (and its tokenizer) with random weights, as a `Teacher`."""
    family = random_case_family(case)
    if family is None:
        raise ValueError(f"unknown random case {case!r}; allowed: {', '.join(random_case_names())}")
    return family.random_cases[case](str(device))


def random_case_samplers(
    case: str,
    device: str | torch.device = "cpu",
    sampling: SamplingParams | None = None,
    student_builder: Callable[[object], Sequence] | None = None,
) -> list:
    """The teacher (and, given `student_builder(teacher)`, students) of a random-weight case,
    sampled as the family's published teachers are distilled (`Family.bench_sampling`)."""
    from ddcore.samplers.base import TeacherSampler

    teacher = random_teacher(case, device)
    samplers = [TeacherSampler(teacher, sampling or random_case_family(case).bench_sampling)]
    if student_builder is not None:
        samplers += list(student_builder(teacher))
    return samplers


# --------------------------------------------------------------------------------------------
# the stage entry point
# --------------------------------------------------------------------------------------------
def bench_samplers(
    samplers: Sequence,
    params: BenchParams | str = "world",
    out_dir: str | Path | None = None,
    *,
    batch_sizes: Sequence[int] | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    max_tokens: int | None = None,
    random_case_batch_sizes: Sequence[int] | None = None,
    random_case_max_tokens: int | None = None,
    student_builder: Callable[[object], Sequence] | None = None,
    extra: Mapping[str, Any] | None = None,
    compile: bool | None = None,
    progress: bool = True,
) -> dict:
    """Benchmark `samplers` (and any random-architecture cases) and write `out_dir`/bench.json.

    `params` is the preset's BenchParams, or just a case name for `samplers`. In `params.cases`,
    the families' random-case names build random-weight teachers, with the students that
    `student_builder(teacher)` returns (the pipeline passes the method's); the first other name labels
    `samplers` (default "world"). On CPU the random cases default to batch sizes (1, 2) and, for
    LlamaGen, timing 16 tokens (extrapolated, labelled); on CUDA to the full (1, throughput_batch) run.
    `compile` (default: `params.compile`, else on when CUDA is available) adds the `compiled()`
    variants of samplers (teacher and students alike: each "+compile" student races "teacher+compile").
    `extra` values (numbers, dicts, or callables returning them, e.g. trajectory-generation or
    training throughput) are stored under bench["extra"].
    """
    if isinstance(params, str):
        params = BenchParams(cases=[params])
    on_cuda = torch.cuda.is_available()
    compile = params.compile if compile is None else compile
    compile = on_cuda if compile is None else compile
    bs = tuple(batch_sizes or (1, params.throughput_batch))
    reps = params.repeats if repeats is None else repeats
    warm = params.warmup if warmup is None else warmup
    own = [c for c in params.cases if random_case_family(c) is None]
    if len(own) > 1:
        raise ValueError(f"only one case can label the given samplers, got {own}")
    cases: dict[str, dict] = {}
    if samplers:
        cases[own[0] if own else "preset"] = bench_case(
            samplers, own[0] if own else "preset", bs, reps, warm, max_tokens, progress, compile
        )
    for name in params.cases:
        if random_case_family(name) is None:
            continue
        device = "cuda" if on_cuda else "cpu"
        rbs = tuple(random_case_batch_sizes or ((1, params.throughput_batch) if on_cuda else (1, 2)))
        rtok = random_case_max_tokens if random_case_max_tokens is not None else (None if on_cuda else 16)
        rs = random_case_samplers(name, device, student_builder=student_builder)
        if len(set(rs[0].teacher.step_sizes)) > 1:
            rtok = (
                None  # steps differ in size (VAR's scales): a per-token rate says nothing, never extrapolated
            )
        cases[name] = bench_case(
            rs, name, rbs, reps if on_cuda else min(reps, 2), warm, rtok, progress, compile
        )
        cases[name]["weights"] = "random (timing does not depend on weight values)"
        del rs
    result = {
        "machine": machine_info(),
        "settings": {
            "repeats": reps,
            "warmup": warm,
            "batch_sizes": list(bs),
            "compile": compile,
            "timing": "median wall time, warm",
        },
        "cases": cases,
        "extra": {k: (v() if callable(v) else v) for k, v in (extra or {}).items()},
    }
    if out_dir is not None:
        write_json(result, Path(out_dir) / "bench.json")
    return result

"""Benchmark bookkeeping against known answers: samplers advance a fake clock by fixed costs, so
latency, throughput, speedup, decode share and token extrapolation have exact expected values.
(These are not timed tests; speed itself is measured by `bench_samplers` runs, not asserted.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ddcore.eval import timing as timing_mod
from ddcore.eval.bench import bench_case, bench_samplers, random_teacher
from ddcore.eval.report import render_results_table
from ddcore.eval.timing import Timed, machine_info, peak_memory, time_in_turns
from ddcore.methods.dd1.samplers import random_students as dd1_random_students
from ddcore.params import BenchParams, SamplingParams
from ddcore.samplers.base import TeacherSampler
from ddcore.teachers.registry import random_case_family, random_case_names

L = 8  # tokens per image
GEN_PER_TOKEN = 0.01  # fake seconds per generated token per batch (batch-parallel)
DECODE = 0.5  # fake seconds per decode call


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(timing_mod.time, "perf_counter", c)
    return c


class FakeTeacher:
    num_classes, seq_len, vocab_size = 10, L, 16
    step_sizes = [1] * L
    step_starts = list(range(L))
    device = torch.device("cpu")

    def __init__(self, clock):
        self.clock = clock

    def noise(self, seeds):
        return torch.zeros(len(seeds), L, 2)

    def generate(self, labels, params, noise, chooser=None, prefix=None, stop=None):
        stop = L if stop is None else stop
        self.clock.now += GEN_PER_TOKEN * stop
        return torch.zeros(labels.shape[0], L, dtype=torch.long)

    def sample(self, labels, seeds, params, chooser=None):
        return self.generate(labels, params, self.noise(seeds))

    def decode(self, tokens):
        self.clock.now += DECODE
        return torch.zeros(tokens.shape[0], 3, 4, 4)


class FakeStudent:
    """One step costing `cost` per call regardless of batch, plus the shared decode."""

    def __init__(self, name, teacher, cost, steps=1):
        self.name, self.teacher, self.cost, self.steps = name, teacher, cost, steps

    def tokens(self, labels, seeds):
        self.teacher.clock.now += self.cost
        return torch.zeros(len(seeds), L, dtype=torch.long)

    def images(self, labels, seeds):
        return self.teacher.decode(self.tokens(labels, seeds))


def test_timing_is_median_after_warmup(clock):
    # the first (warm-up) call is not timed, nor the last (the memory trace)
    costs = iter([50.0, 3.0, 1.0, 2.0, 70.0])

    def fn():
        clock.now += next(costs)

    job = Timed(fn, "cpu")
    time_in_turns({"fn": job}, repeats=3, warmup=1)
    assert job.median == 2.0
    assert job.times == [3.0, 1.0, 2.0]


def test_bench_case_known_answers(clock):
    teacher = FakeTeacher(clock)
    samplers = [TeacherSampler(teacher, SamplingParams()), FakeStudent("one", teacher, 0.02)]
    case = bench_case(samplers, "fake", batch_sizes=(1, 4), repeats=3, warmup=1, progress=False)
    t, s = case["samplers"]["teacher"], case["samplers"]["one"]
    t_b1 = GEN_PER_TOKEN * L + DECODE
    assert t["sec_per_image"] == pytest.approx(t_b1)
    assert t["images_per_s"] == pytest.approx(4 / t_b1)  # the fake teacher is batch-parallel
    assert t["decode_share"] == pytest.approx(DECODE / t_b1)
    assert s["sec_per_image"] == pytest.approx(0.02 + DECODE)
    assert s["speedup"] == pytest.approx(t_b1 / (0.02 + DECODE))
    assert s["decode_share"] == pytest.approx(DECODE / (0.02 + DECODE))
    assert t["speedup"] == pytest.approx(1.0)
    assert case["teacher"]["ms_per_token_b1"] == pytest.approx(1000 * GEN_PER_TOKEN)
    assert case["teacher"]["tokens_per_s"] == pytest.approx(4 * L / (GEN_PER_TOKEN * L))
    assert t["extrapolated_from_tokens"] is None


def test_truncated_teacher_timing_is_extrapolated_and_labelled(clock):
    teacher = FakeTeacher(clock)
    case = bench_case(
        [TeacherSampler(teacher, SamplingParams())], "fake", (1, 2), 1, 0, max_tokens=3, progress=False
    )
    t = case["samplers"]["teacher"]
    assert t["extrapolated_from_tokens"] == 3
    assert case["teacher"]["extrapolated_from_tokens"] == 3
    # linear cost per token: extrapolating 3 -> 8 tokens recovers the full cost exactly
    assert t["sec_per_image"] == pytest.approx(GEN_PER_TOKEN * L + DECODE)


def test_compiled_variants_are_added_only_when_enabled(clock):
    teacher = FakeTeacher(clock)

    class Compilable(FakeStudent):
        def compiled(self):
            return FakeStudent(self.name + "+compile", self.teacher, self.cost / 2)

    samplers = [TeacherSampler(teacher, SamplingParams()), Compilable("dd", teacher, 0.2)]
    off = bench_case(samplers, "c", (1, 1), 1, 0, progress=False)
    on = bench_case(samplers, "c", (1, 1), 1, 0, progress=False, compile=True)
    assert set(off["samplers"]) == {"teacher", "dd"}
    assert on["samplers"]["dd+compile"]["sec_per_image"] == pytest.approx(0.1 + DECODE)


class CompilableFakeTeacher(FakeTeacher):
    """Its compiled twin generates and decodes at half the cost."""

    is_compiled, factor = False, 1.0

    def generate(self, labels, params, noise, chooser=None, prefix=None, stop=None):
        self.clock.now += GEN_PER_TOKEN * (L if stop is None else stop) * self.factor
        return torch.zeros(labels.shape[0], L, dtype=torch.long)

    def decode(self, tokens):
        self.clock.now += DECODE * self.factor
        return torch.zeros(tokens.shape[0], 3, 4, 4)

    def compile(self):
        twin = copy.copy(self)
        twin.is_compiled, twin.factor = True, 0.5
        return twin


def test_compiled_students_race_the_compiled_teacher(clock):
    teacher = CompilableFakeTeacher(clock)

    class Compilable(FakeStudent):
        def compiled(self):
            return FakeStudent(self.name + "+compile", self.teacher.compile(), self.cost / 2)

    samplers = [TeacherSampler(teacher, SamplingParams()), Compilable("dd", teacher, 0.2)]
    rows = bench_case(samplers, "c", (1, 1), 1, 0, progress=False, compile=True)["samplers"]
    eager_t, fast_t = GEN_PER_TOKEN * L + DECODE, (GEN_PER_TOKEN * L + DECODE) / 2
    fast_s = 0.1 + DECODE / 2
    assert rows["teacher+compile"]["sec_per_image"] == pytest.approx(fast_t)
    assert rows["dd+compile"]["sec_per_image"] == pytest.approx(fast_s)
    assert rows["dd+compile"]["speedup"] == pytest.approx(fast_t / fast_s)
    assert rows["dd+compile"]["speedup_reference"] == "teacher+compile"
    assert rows["dd+compile"]["speedup_vs_eager_teacher"] == pytest.approx(eager_t / fast_s)
    assert rows["dd+compile"]["decode_share"] == pytest.approx(DECODE / 2 / fast_s)  # the compiled decode
    assert rows["dd"]["speedup"] == pytest.approx(eager_t / (0.2 + DECODE))
    assert rows["dd"]["speedup_reference"] == "teacher" and "speedup_vs_eager_teacher" not in rows["dd"]
    assert rows["teacher+compile"]["speedup"] == pytest.approx(1.0)
    assert rows["teacher+compile"]["speedup_vs_eager_teacher"] == pytest.approx(2.0)
    ev = {"samplers": {"teacher": {"steps": L}, "dd": {"steps": 1}}, "sampler_order": ["teacher", "dd"]}
    table = render_results_table(ev, {"cases": {"c": {"samplers": rows}}})
    assert "speedup, both compiled |" in table.splitlines()[0]
    dd_row = next(ln for ln in table.splitlines() if ln.startswith("| dd |"))
    assert dd_row.endswith(f"| {eager_t / (0.2 + DECODE):.1f}× | {fast_t / fast_s:.1f}× |")


def test_bench_samplers_writes_json_with_machine_and_extra(clock, tmp_path):
    teacher = FakeTeacher(clock)
    samplers = [TeacherSampler(teacher, SamplingParams()), FakeStudent("dd1-1step", teacher, 0.02)]
    calls = []
    res = bench_samplers(
        samplers,
        BenchParams(throughput_batch=4, repeats=2, warmup=0, cases=["world"]),
        tmp_path,
        extra={"train_steps_per_s": lambda: calls.append(1) or 12.5, "trajectories_per_s": 3.0},
        progress=False,
    )
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert on_disk["cases"]["world"]["samplers"]["dd1-1step"]["speedup"] == pytest.approx(
        res["cases"]["world"]["samplers"]["dd1-1step"]["speedup"]
    )
    assert on_disk["extra"] == {"train_steps_per_s": 12.5, "trajectories_per_s": 3.0} and calls == [1]
    for k in ("cpu_model", "cpu_cores", "torch", "cuda_device"):
        assert k in on_disk["machine"]
    ev = {"samplers": {"teacher": {"steps": L, "fid": 5.0}, "dd1-1step": {"steps": 1, "fid": 9.0}}}
    table = render_results_table(ev, tmp_path / "bench.json")
    speed = on_disk["cases"]["world"]["samplers"]["dd1-1step"]["speedup"]
    assert f"{speed:.1f}×" in table


def test_peak_memory_sees_a_large_cpu_allocation():
    with peak_memory("cpu") as mem:
        x = torch.ones(64 * 2**20 // 4 * 4)  # 256 MB, touched
        del x
    assert mem["peak_mem_kind"] == "cpu_rss_sampled"
    assert mem["peak_mem_mb"] > 128
    assert mem["peak_total_mb"] > mem["peak_mem_mb"]  # the process itself (python, torch) is in the total


def test_machine_info_describes_this_machine():
    info = machine_info()
    assert info["torch"] == torch.__version__ and info["cpu_cores"] >= 1


def test_real_small_llamagen_teacher_runs_through_bench():
    from llamagen_helpers import three_class_teacher

    teacher = three_class_teacher(std=None)
    samplers = [TeacherSampler(teacher, SamplingParams(cfg_scale=2.0)), *dd1_random_students(teacher)]
    case = bench_case(samplers, "small", (1, 2), 1, 1, progress=False)
    t = case["samplers"]["teacher"]
    assert t["sec_per_image"] > 0 and 0 < t["decode_share"] < 1 and t["speedup"] == 1.0
    assert case["teacher"]["ms_per_token_b1"] > 0 and case["teacher"]["seq_len"] == 16
    s1, s2 = case["samplers"]["dd1-1step"], case["samplers"]["dd1-2step"]
    assert (s1["steps"], s2["steps"]) == (1, 2)
    for r in (s1, s2):
        assert r["sec_per_image"] > 0
        assert r["speedup"] == pytest.approx(t["sec_per_image"] / r["sec_per_image"])


def test_real_small_var_teacher_runs_through_bench():
    """The VAR family in the same bench: per-step (scale) timing, DD1 VAR students, no extrapolation."""
    from var_helpers import small_var, small_vqvae

    from ddcore.teachers.var.teacher import VARTeacher

    teacher = VARTeacher(small_var(), small_vqvae())
    samplers = [TeacherSampler(teacher, SamplingParams(cfg_scale=2.0)), *dd1_random_students(teacher)]
    assert [s.name for s in samplers] == ["teacher", "dd1-1step", "dd1-2step"]
    assert samplers[2].t2 == 2 and samplers[1].split_t == 4  # half the scales; every scale from logits
    case = bench_case(samplers, "small-var", (1, 2), 1, 1, progress=False)
    assert case["teacher"]["ar_steps"] == 4 and case["teacher"]["seq_len"] == 30
    assert case["teacher"]["extrapolated_from_tokens"] is None
    t = case["samplers"]["teacher"]
    for name in ("dd1-1step", "dd1-2step"):
        r = case["samplers"][name]
        assert r["speedup"] == pytest.approx(t["sec_per_image"] / r["sec_per_image"])


def test_random_cases_name_their_family():
    assert random_case_family("var-d16-random").name == "var"
    assert random_case_family("llamagen-b-random").name == "llamagen" and random_case_family("world") is None
    assert random_case_names() == ("llamagen-b-random", "llamagen-l-random", "var-d16-random")
    with pytest.raises(ValueError, match="allowed: llamagen-b-random, llamagen-l-random, var-d16-random"):
        random_teacher("var-d99-random")


def test_samplers_are_timed_in_turns(clock):
    """One call per sampler per round, after every warm-up: a slow spell of the machine lands on
    all samplers of a round, not on whichever sampler happened to be timed during it."""
    teacher = FakeTeacher(clock)
    calls: list[str] = []

    class Logged(FakeStudent):
        def images(self, labels, seeds):
            calls.append(self.name)
            # rounds 3 and 4 (timed calls 5..8, after the 2 warm-ups) run on a machine 10x slower
            slow = 10.0 if 5 <= len(calls) - 2 <= 8 else 1.0
            self.teacher.clock.now += self.cost * slow
            return torch.zeros(len(seeds), 3, 4, 4)

    samplers = [
        TeacherSampler(teacher, SamplingParams()),
        Logged("a", teacher, 0.01),
        Logged("b", teacher, 0.02),
    ]
    rows = bench_case(samplers, "turns", (1, 1), repeats=5, warmup=1, progress=False)["samplers"]
    assert calls == ["a", "b"] + ["a", "b"] * 5 + ["a", "b"]  # warm-up, 5 rounds, memory trace
    assert rows["a"]["runs"]["1"]["times"] == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.01])
    assert rows["b"]["runs"]["1"]["times"] == pytest.approx([0.02, 0.02, 0.2, 0.2, 0.02])
    assert rows["a"]["sec_per_image"] == pytest.approx(0.01) and rows["b"]["sec_per_image"] == pytest.approx(
        0.02
    )


def test_results_table_reads_the_preset_own_case_by_default():
    """bench.json keys are sorted: a random-weight case can come first, but the table's speed
    columns must come from the case that timed the eval.json samplers."""
    ev = {"samplers": {"teacher": {"steps": L}, "dd1-1step": {"steps": 1}, "onestep-baseline": {"steps": 1}}}
    bench = {
        "cases": {
            "llamagen-b-random": {"samplers": {"teacher": {"speedup": 1.0}, "dd1-1step": {"speedup": 99.0}}},
            "world": {
                "samplers": {
                    "teacher": {"speedup": 1.0},
                    "dd1-1step": {"speedup": 11.0},
                    "onestep-baseline": {"speedup": 20.0},
                }
            },
        }
    }
    table = render_results_table(ev, bench)
    assert "bench case `world`" in table and "| 11.0× |" in table and "99.0×" not in table
    assert "99.0×" in render_results_table(ev, bench, case="llamagen-b-random")

"""scripts/gpu_check.py without a GPU: its no-device mode as `make gpu-check` runs it, and its pure
parts (the README table, the headline ratios, the DDP comparison, CUDA-event rows) on synthetic input."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


check = _load()


def _tree(path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in path.rglob("*")} if path.exists() else {}


def test_without_cuda_it_prints_one_line_exits_0_and_writes_nothing(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp)}
    default_out = ROOT / "metrics" / "gpu"
    before = _tree(default_out)
    for args in ([], ["--out", str(tmp_path / "out")]):
        p = subprocess.run(
            [sys.executable, str(SCRIPT), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines() == ["gpu-check: no CUDA device; nothing to measure"]
        assert "Traceback" not in p.stderr
    assert _tree(default_out) == before
    assert not (tmp_path / "out").exists() and not any(tmp.iterdir())  # no report, no work dir


def _rows(**spi):
    return {name.replace("_c", "+compile").replace("_", "-"): {"sec_per_image": v} for name, v in spi.items()}


def test_headline_ratios_race_compiled_against_compiled():
    rows = _rows(teacher=3.0, teacher_c=0.6, dd1_1step=0.015, dd1_1step_c=0.01)
    h = check.headline_ratios(rows)
    assert h["speedup_vs_eager_teacher"] == pytest.approx(200.0) and h["meets_vs_eager"]
    assert h["speedup_vs_compiled_teacher"] == pytest.approx(60.0) and h["compiled_basis"] == "both compiled"
    assert h["eager_student_vs_compiled_teacher"] == pytest.approx(40.0)
    assert h["meets_vs_compiled"] and h["ok"]
    assert (h["target_vs_eager"], h["target_vs_compiled"]) == (150.0, 40.0)


def test_headline_ratios_fall_back_and_miss_targets():
    # no compiled student: the eager one against the compiled teacher, and said so
    h = check.headline_ratios(_rows(teacher=1.0, teacher_c=0.3, dd1_1step=0.01))
    assert h["speedup_vs_compiled_teacher"] == pytest.approx(30.0) and h["compiled_basis"] == "eager student"
    assert h["meets_vs_eager"] is False and h["meets_vs_compiled"] is False and h["ok"] is False
    # no compiled teacher, a non-finite or zero time: no ratio, no pass
    for rows in (_rows(teacher=1.0, dd1_1step=0.001), _rows(teacher=math.nan, dd1_1step=0.0), {}):
        h = check.headline_ratios(rows)
        assert h["speedup_vs_compiled_teacher"] is None and h["compiled_basis"] is None and not h["ok"]
    assert check.headline_ratios(_rows(teacher=1.0, dd1_1step=0.001))["speedup_vs_eager_teacher"] == 1000.0
    assert check.headline_ratios({})["speedup_vs_eager_teacher"] is None


def test_event_rows_compose_teachers_as_the_bench_does():
    case = {
        "teacher": {"seq_len": 256},
        "samplers": {
            "teacher": {"runs": {"2": {"generate_seconds": 1.0}}, "speedup_reference": "teacher"},
            "teacher+compile": {
                "runs": {"2": {"generate_seconds": 1.0}},
                "speedup_reference": "teacher+compile",
            },
            "dd1-1step": {"runs": {"2": {}}, "speedup_reference": "teacher"},
            "dd1-1step+compile": {"runs": {"2": {}}, "speedup_reference": "teacher+compile"},
            "untimed": {"runs": {"2": {}}, "speedup_reference": "teacher"},
        },
    }
    med = {"teacher": 3.0, "teacher+compile": 0.5, "VQ decode": 0.2, "VQ decode (compiled)": 0.1}
    med |= {"dd1-1step": 0.04, "dd1-1step+compile": 0.015}
    rows = check.event_rows(case, med, 2)
    assert rows["teacher"]["sec_per_image"] == pytest.approx(1.6)  # (generation + decode) / batch
    assert rows["teacher+compile"]["sec_per_image"] == pytest.approx(0.3)
    assert rows["dd1-1step"]["speedup"] == pytest.approx(1.6 / 0.02)
    assert rows["dd1-1step+compile"]["speedup"] == pytest.approx(0.3 / 0.0075)
    assert "untimed" not in rows
    # a generation timed on its first 64 tokens counts for all 256
    case["samplers"]["teacher"]["runs"]["2"]["extrapolated_from_tokens"] = 64
    assert check.event_rows(case, med, 2)["teacher"]["sec_per_image"] == pytest.approx((12.0 + 0.2) / 2)
    del med["VQ decode"]  # a teacher without its decode job has no event time
    assert "teacher" not in check.event_rows(case, med, 2)


def test_event_recorder_keeps_the_timed_rounds(monkeypatch):
    class FakeEvent:
        clock = 0.0

        def __init__(self, enable_timing: bool):
            self.t = None

        def record(self):
            FakeEvent.clock += 1.0
            self.t = FakeEvent.clock

        def elapsed_time(self, end):  # ms
            return 1000.0 * (end.t - self.t)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []

    def time_in_turns(jobs, repeats, warmup, progress=None):
        for job in jobs.values():  # warm-up, rounds, one memory call: as ddcore.eval.timing does
            for _ in range(warmup + repeats + 1):
                job.fn()

    bench = types.SimpleNamespace(time_in_turns=time_in_turns)
    job = types.SimpleNamespace(fn=lambda: calls.append(1))
    with check.EventRecorder(bench) as rec:
        assert bench.time_in_turns == rec.timed
        bench.time_in_turns({"a": job}, 3, 2)
    assert bench.time_in_turns is time_in_turns and len(calls) == 6
    assert len(rec.calls["a"]) == 6 and rec.window == (2, 5)
    assert rec.medians() == {"a": pytest.approx(1.0)}


def test_state_dict_comparison_and_the_ddp_verdict():
    a = {"w": torch.zeros(3, 2), "b": torch.ones(2), "empty": torch.zeros(0)}
    b = {"w": torch.zeros(3, 2), "b": torch.tensor([1.0, 1.0 + 3e-5]), "empty": torch.zeros(0)}
    d = check.compare_state_dicts(a, b)
    assert d["keys_match"] and d["worst_tensor"] == "b" and d["max_abs_diff"] == pytest.approx(3e-5, rel=1e-2)
    assert check.compare_state_dicts(a, a)["max_abs_diff"] == 0.0
    assert not check.compare_state_dicts(a, {"w": a["w"]})["keys_match"]
    assert not check.compare_state_dicts(a, {**a, "w": torch.zeros(2, 3)})["keys_match"]
    nan = check.compare_state_dicts(a, {**a, "b": torch.tensor([1.0, math.nan])})
    assert nan["max_abs_diff"] == math.inf

    control = {"keys_match": True, "max_abs_diff": 1e-2}
    v = check.ddp_verdict({"torchrun-1": d}, control, atol=1e-4)
    assert v["equal_within_atol"] and v["control_separates"] and v["ok"]
    assert v["control_must_exceed"] == pytest.approx(10 * 3e-5, rel=1e-2)
    # over the tolerance; a control too close to tell training apart; nothing compared; a mismatch
    assert not check.ddp_verdict({"x": {"keys_match": True, "max_abs_diff": 2e-4}}, control, 1e-4)["ok"]
    close = check.ddp_verdict({"x": d}, {"max_abs_diff": 2e-4}, 1e-4)
    assert close["equal_within_atol"] and not close["control_separates"] and not close["ok"]
    assert not check.ddp_verdict({}, control, 1e-4)["ok"]
    assert not check.ddp_verdict({"x": {"keys_match": False, "max_abs_diff": None}}, control, 1e-4)["ok"]
    assert not check.ddp_verdict({"x": nan}, control, 1e-4)["ok"]
    assert check.DDP_ATOL == {"adamw": 1e-4, "muon": 1e-3}


def test_pipeline_checks_follow_the_cpu_tests():
    log = [{"loss": "3.0", "ce": "2.5", "mse": "0.5"}, {"loss": "2.0", "ce": "1.7", "mse": "0.3"}]
    fids = {"teacher": {"fid": 30.0}, "dd1-1step": {"fid": 80.0}}
    timed = {"teacher": {"sec_per_image": 0.1}, "dd1-1step": {"sec_per_image": 0.001}}
    ok = check.pipeline_checks(log, fids, ["teacher", "dd1-1step"], timed, {"version": "1"})
    assert all(ok.values()) and set(ok) >= {"losses_finite", "loss_decreases", "registered_version"}
    bad = check.pipeline_checks(
        [log[1], {"loss": "nan", "ce": "", "mse": "0.1"}],
        {"teacher": {"fid": None}},
        ["teacher", "dd1-1step"],
        {"teacher": {"sec_per_image": 0.1}},
        {},
    )
    assert not any(bad.values())
    assert not check.pipeline_checks([log[0]], fids, ["teacher"], timed, {"version": "1"})["loss_decreases"]


def _report():
    run = {
        "samplers": {
            "teacher": {"sec_per_image": 3.0, "speedup": 1.0, "images_per_s": 20.0, "peak_mem_mb": 900.0},
            "dd1-1step": {
                "sec_per_image": 0.015,
                "speedup": 200.0,
                "images_per_s": 4000.0,
                "peak_mem_mb": 50.0,
            },
        }
    }
    thr = {"samplers": {"teacher": {"images_per_s": 21.5, "speedup": 1.0, "peak_mem_mb": 2000.0}}}
    h = check.headline_ratios(_rows(teacher=3.0, teacher_c=0.6, dd1_1step=0.015))
    return {
        "mode": "cuda",
        "started": "2026-01-01T00:00:00+00:00",
        "elapsed_s": 401.2,
        "ok": False,
        "device": {"name": "NVIDIA H200", "count": 1, "torch": "2.14.1", "cuda": "13.0"},
        "parts": {
            "pipeline": {"ok": True, "seconds": 150.0, "note": "FID teacher 30.0 | dd1-1step 80.0"},
            "ddp": {"ok": False, "seconds": 60.0, "error": "timed out\nafter 75 s"},
            "bench": {
                "ok": True,
                "seconds": 190.0,
                "runs": {"llamagen-l-random": {"runs": {"1": run, "64": thr}}},
            },
        },
        "headline": {
            "case": "llamagen-l-random",
            "batch": 1,
            **h,
            "cuda_events": {"speedup_vs_eager_teacher": 210.0},
        },
    }


def test_readme_renders_the_report_as_tables():
    text = check.render_readme(_report())
    lines = text.splitlines()
    assert lines[0] == "# GPU check" and "**NVIDIA H200**" in text and "Overall: **FAIL**" in text
    assert (
        "| pipeline | pass | 150 | FID teacher 30.0 \\| dd1-1step 80.0 |" in lines
    )  # escaped, no stray column
    assert "| ddp | FAIL | 60 | timed out after 75 s |" in lines
    assert "| eager teacher | 200.0× | 210.0× | ≥ 150.0× | pass |" in lines
    assert "| compiled teacher (eager student) | 40.0× | – | ≥ 40.0× | pass |" in lines
    header = next(ln for ln in lines if ln.startswith("| case |"))
    assert "s/img (bs 1)" in header and "img/s (bs 64)" in header
    assert "| llamagen-l-random | teacher | 3.0000 | 1.0× | 21.5 | 1.0× | 900 / 2000 |" in lines
    assert "| llamagen-l-random | dd1-1step | 0.0150 | 200.0× | – | – | 50 / – |" in lines
    # every table row has as many cells as its header
    for block in text.split("\n\n"):
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        assert len({ln.replace("\\|", "").count("|") for ln in rows}) <= 1, rows
    # an empty report still renders
    assert check.render_readme({}).startswith("# GPU check")


def test_clean_makes_reports_json_safe():
    out = check.clean({"a": math.nan, "b": (1, math.inf), "c": Path("/x"), 3: [None, True, 2.5]})
    assert out == {"a": None, "b": [1, None], "c": "/x", "3": [None, True, 2.5]}


def test_device_info_reads_the_cuda_device(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=141 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    info = check.device_info(check.CUDA_PLAN)
    assert info["name"] == "NVIDIA H200" and info["count"] == 2 and info["capability"] == "9.0"
    assert info["memory_gib"] == pytest.approx(141.0) and info["torch"] == torch.__version__
    assert "smoke" in check.device_info(check.SMOKE_PLAN)["name"]


def test_a_failing_part_and_a_part_over_budget_are_reported(tmp_path):
    """The child's error comes back with its log; a child over its budget is killed, and says so."""
    bad = check.run_child(
        "bad", ["bench", "--case", "no-such-case", "--batches", "1"], 120, tmp_path, check.SMOKE_PLAN
    )
    assert not bad["ok"] and bad["exit_code"] != 0 and "no-such-case" in bad["error"] and bad["log_tail"]
    t0 = time.monotonic()
    slow = check.run_child(
        "slow", ["bench", "--case", "llamagen-b-random", "--batches", "1"], 10, tmp_path, check.SMOKE_PLAN
    )
    assert time.monotonic() - t0 < 30 and not slow["ok"] and "timed out" in slow["error"]
    assert check.run_child("none", ["bench"], 5, tmp_path, check.SMOKE_PLAN)["error"].startswith("skipped")

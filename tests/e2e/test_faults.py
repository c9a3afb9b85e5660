"""The fault-injection harness itself (scripts/faults.py), on the first micro stages with one kill
each: every killed run, run again, leaves the project an uninterrupted run leaves. The committed
report (metrics/faults/report.json) is the same harness at 10 kills per stage over every stage."""

from __future__ import annotations

import sys

import pytest
from servers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import faults  # noqa: E402

pytestmark = pytest.mark.slow


def test_killed_stages_rerun_to_the_uninterrupted_result(tmp_path):
    report = faults.inject(tmp_path / "work", kills=1, seed=5, stages=faults.STAGES[:3], log=lambda *_: None)
    assert set(report["stages"]) == {"prepare@micro", "trajectories@micro", "distill@micro"}
    for name, r in report["stages"].items():
        assert r["kills"] == 1 and r["identical"] == 1 and not r["lost"] and not r["duplicated"], (
            name,
            r["problems"],
        )


def test_the_comparison_catches_a_lost_and_an_extra_file(tmp_path):
    """The check can fail: a changed weight file is lost, an orphan temporary is extra."""
    root = tmp_path / "p"
    (root / "models" / "m").mkdir(parents=True)
    (root / "models" / "m" / "w.safetensors").write_bytes(b"weights")
    (root / "models" / "m" / "log.csv").write_text("step,loss,elapsed_s\n1,0.5,3.0\n")
    want = faults.project_state(root)
    (root / "models" / "m" / "log.csv").write_text("step,loss,elapsed_s\n1,0.5,9.0\n")  # timing only: same
    assert faults.compare(want, faults.project_state(root)) == ([], [])
    (root / "models" / "m" / "w.safetensors").write_bytes(b"weightz")
    (root / "models" / "m" / ".w.safetensors.123.abc.tmp").write_bytes(b"half")
    lost, extra = faults.compare(want, faults.project_state(root))
    assert lost == ["models/m/w.safetensors"] and extra == ["models/m/.w.safetensors.123.abc.tmp"]

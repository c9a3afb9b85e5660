"""Fault injection: SIGKILL each stage of the micro presets at seeded random moments, run it again,
and compare the project with the one an uninterrupted run leaves.

    python scripts/faults.py --kills 10 --out metrics/faults/report.json

A reference project runs every stage once, in order, keeping a copy of the project before each
stage. Each trial copies that snapshot to the same path (the reference steps aside meanwhile), starts the stage as its own process group (`ddcore --root`
as a user runs it), kills the group after a delay drawn uniformly from [0, the stage's reference
time), runs the stage again to completion and compares:
  * every file under data/, models/ and metrics/ (weights and shards by sha256; JSON and CSV with
    timing fields and the project path taken out, since those differ between any two runs) against
    the reference: a file missing or different is `lost`, a file the reference does not have
    (an orphan temporary, a second shard or checkpoint) is `duplicated`;
  * the registry (SQLite store): the same number of model versions and the same aliases.
A trial with neither is `identical`. `mid_write` counts kills that landed after the stage had
written something (a kill during start-up tests less). Seeded: the same --seed gives the same kills.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# the test scale of the micro preset (params.yaml leaves eval and bench at their real-run defaults)
MICRO_SCALE = (
    "eval.num_samples=64",
    "eval.batch_size=64",
    "bench.throughput_batch=8",
    "bench.repeats=2",
    "bench.warmup=1",
)
STAGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    *(
        ("micro", s, MICRO_SCALE)
        for s in ("prepare", "trajectories", "distill", "evaluate", "bench", "register")
    ),
    *(
        ("micro-dd2", s, ())
        for s in (
            "prepare",
            "samples",
            "continuous",
            "ar-diffusion-dsm",
            "ar-diffusion",
            "evaluate",
            "bench",
            "register",
        )
    ),
)
COMPARED = ("data", "models", "metrics")
TIMING = (
    "second",
    "elapsed",
    "sec_per",
    "per_s",
    "speedup",
    "throughput",
    "latency",
    "time",
    "wall",
    "machine",
    "date",
)
# differ between any two registrations, or record that a resumed run reused finished parts
VOLATILE = ("run_id", "run_url", "flow_run", "artifact", "git_commit", "reused", "resumed")


@dataclass
class StageReport:
    kills: int = 0
    identical: int = 0
    lost: int = 0
    duplicated: int = 0
    mid_write: int = 0
    reference_s: float = 0.0
    problems: list[str] = field(default_factory=list)


def env_for(root: Path) -> dict:
    """A child environment confined to the project: CPU, one thread, no services, no network."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("DD_", "MLFLOW_", "PREFECT_", "AWS_"))}
    return keep | {
        "DD_DEVICE": "cpu",
        "DD_CACHE_DIR": str(root / ".cache-dd"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HOME": str(root / ".home"),
        "PYTHONUNBUFFERED": "1",
    }


def stage_command(root: Path, preset: str, stage: str, scale: tuple[str, ...]) -> list[str]:
    sets = [a for s in scale for a in ("--set", s)]
    return [str(BIN / "ddcore"), "--root", str(root), "--quiet", stage, "--preset", preset, *sets]


def run(cmd: list[str], root: Path, timeout: float = 1800) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} -> {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def _clean_json(obj, root: str, measured: bool = False):
    """The JSON without timing fields and the project path; `measured` (bench results): every
    number becomes a placeholder, since a benchmark measures, and only its structure must repeat."""
    if isinstance(obj, dict):
        return {
            k: _clean_json(v, root, measured)
            for k, v in obj.items()
            if not (any(t in k.lower() for t in TIMING + VOLATILE) or k.endswith("_s"))
        }
    if isinstance(obj, list):
        return [_clean_json(v, root, measured) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<root>")
    if measured and isinstance(obj, int | float) and not isinstance(obj, bool):
        return "<measured>"
    return obj


def _clean_csv(text: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return text
    keep = [i for i, h in enumerate(rows[0]) if not (any(t in h.lower() for t in TIMING) or h.endswith("_s"))]
    return "\n".join(",".join(r[i] for i in keep if i < len(r)) for r in rows)


def file_digest(path: Path, root: Path) -> str:
    """sha256 of the file, with timing fields and the project path taken out of JSON and CSV."""
    data = path.read_bytes()
    if path.suffix == ".json":
        with contextlib.suppress(ValueError):  # a half-written JSON file stays as it is, and differs
            obj = json.loads(data)
            marker = path.name == "_stage.json" or path.parent.name == ".stages"
            if marker and isinstance(obj, dict):
                obj.pop(
                    "files", None
                )  # sha256 of outputs that hold timings; the outputs are compared themselves
            measured = path.name == "bench.json" or (marker and path.stem == "bench")
            data = json.dumps(_clean_json(obj, str(root), measured), sort_keys=True).encode()
    elif path.suffix == ".csv":
        data = _clean_csv(data.decode(errors="replace")).encode()
    return hashlib.sha256(data).hexdigest()


def project_state(root: Path) -> dict[str, str]:
    out = {}
    for top in COMPARED:
        for p in sorted((root / top).rglob("*")) if (root / top).is_dir() else []:
            if p.is_file():
                out[str(p.relative_to(root))] = file_digest(p, root)
    return out


def registry_state(root: Path) -> dict:
    db = root / "mlflow.db"
    if not db.is_file():
        return {}
    with sqlite3.connect(db) as con:
        versions = con.execute("select name, count(*) from model_versions group by name").fetchall()
        aliases = con.execute("select name, alias, version from registered_model_aliases").fetchall()
    return {"versions": sorted(versions), "aliases": sorted(aliases)}


def written_since(root: Path, t0: float) -> bool:
    return any(
        p.is_file() and p.stat().st_mtime >= t0
        for top in COMPARED
        if (root / top).is_dir()
        for p in (root / top).rglob("*")
    )


def kill_trial(snapshot: Path, trial: Path, cmd_of, delay: float, timeout: float) -> tuple[bool, float]:
    """Copy the snapshot to `trial`, start the stage, SIGKILL its process group after `delay` s, run
    it again. Returns (whether the kill landed after the stage wrote something, the rerun's seconds)."""
    shutil.rmtree(trial, ignore_errors=True)
    shutil.copytree(snapshot, trial, symlinks=True)
    cmd = cmd_of(trial)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=trial, env=env_for(trial), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    mid = written_since(trial, t0)
    return mid, run(cmd, trial, timeout)


def cmd_of(root: Path, preset: str, stage: str, scale: tuple[str, ...]) -> list[str]:
    return stage_command(root, preset, stage, scale)


def compare(ref: dict[str, str], got: dict[str, str]) -> tuple[list[str], list[str]]:
    lost = [f for f, h in ref.items() if got.get(f) != h]
    extra = [f for f in got if f not in ref]
    return lost, extra


def inject(
    work: Path, kills: int, seed: int, stages=STAGES, params: Path = REPO / "params.yaml", log=print
) -> dict:
    """Run the whole campaign in `work` (created empty) and return the report."""
    rng = random.Random(seed)
    shutil.rmtree(work, ignore_errors=True)
    project = work / "project"  # every run happens at this path: content naming the project (its
    project.mkdir(parents=True)  # store URI, in the register marker's fingerprint) then compares
    shutil.copy(params, project / "params.yaml")
    report: dict[str, StageReport] = {}
    for i, (preset, stage, scale) in enumerate(stages):
        snapshot = work / f"before-{i:02d}"
        shutil.copytree(project, snapshot, symlinks=True)
        seconds = run(stage_command(project, preset, stage, scale), project)
        want_files, want_registry = project_state(project), registry_state(project)
        reference = work / "reference"
        project.rename(reference)
        rep = report.setdefault(f"{stage}@{preset}", StageReport(reference_s=round(seconds, 2)))
        for k in range(kills):
            delay = rng.uniform(0.0, seconds)
            mid, _ = kill_trial(
                snapshot, project, partial(cmd_of, preset=preset, stage=stage, scale=scale), delay, 1800
            )
            lost, extra = compare(want_files, project_state(project))
            if (got := registry_state(project)) != want_registry:
                extra.append(f"registry {got} != {want_registry}")
            rep.kills += 1
            rep.mid_write += int(mid)
            rep.lost += int(bool(lost))
            rep.duplicated += int(bool(extra))
            rep.identical += int(not lost and not extra)
            if lost or extra:
                rep.problems.append(f"kill {k} at {delay:.2f} s: lost {lost[:3]} extra {extra[:3]}")
                shutil.copytree(project, work / f"differs-{stage}@{preset}-{k}", symlinks=True)  # for a look
            log(
                f"{stage}@{preset} kill {k + 1}/{kills} at {delay:.2f} s: {'identical' if not lost and not extra else 'DIFFERS'}"
            )
            shutil.rmtree(project)
        reference.rename(project)
        shutil.rmtree(snapshot)
    return {
        "stages": {name: asdict(r) for name, r in report.items()},
        "kills_per_stage": kills,
        "seed": seed,
        "compared": "files under data/, models/, metrics/ (sha256; JSON/CSV without timing fields and the project path); registry version counts and aliases",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=10, help="kills per stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ddcore-faults"), help="scratch folder (emptied)")
    ap.add_argument("--out", type=Path, default=REPO / "metrics" / "faults" / "report.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    report = inject(args.work, args.kills, args.seed)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    bad = {k: v for k, v in report["stages"].items() if v["lost"] or v["duplicated"]}
    print(
        f"{sum(v['kills'] for v in report['stages'].values())} kills, {len(bad)} stage(s) with lost or duplicated outputs -> {args.out}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compare the outputs of two pipeline runs of one preset, ignoring what measures time.

    python scripts/compare_runs.py ROOT_A ROOT_B --preset micro

Weights and tensors (*.safetensors) must be byte-identical; JSON and CSV files must be equal
once timing fields (seconds, rates, timestamps) are dropped; bench.json is compared by structure
only. Prints one line per difference and exits 1 if there is any. Used to show that a change of
code structure leaves every computed number unchanged.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

TIMING_KEYS = {
    "seconds",
    "times",
    "created",
    "run_url",
    "run_id",
    "model_uri",
    "loadavg",
    "threads",
    "machine",
}
TIMING_SUFFIXES = ("_s", "_seconds", "_times", "per_s", "per_image", "_mb", "mem_kind")


def is_timing(key: str) -> bool:
    return key in TIMING_KEYS or key.endswith(TIMING_SUFFIXES)


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if not is_timing(str(k))}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def _delta(a, b, path: str = "") -> str:
    """The first few leaf paths where two JSON values differ, with both values."""
    out: list[str] = []

    def walk(x, y, p):
        if len(out) >= 4:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                walk(x.get(k), y.get(k), f"{p}.{k}" if p else str(k))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{p}[{i}]")
        elif x != y:
            out.append(f"{p}: {x!r} vs {y!r}")

    walk(a, b, path)
    return "; ".join(out)


def shape(obj):
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(v) for v in obj[:1]]
    return type(obj).__name__


def read(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {
                k: hashlib.sha256(
                    f.get_tensor(k)
                    .contiguous()
                    .view(-1)
                    .view(dtype=__import__("torch").uint8)
                    .numpy()
                    .tobytes()
                ).hexdigest()
                for k in f.keys()  # noqa: SIM118 - safe_open is no dict
            }
        return {"tensors": tensors, "metadata": strip({k: _maybe_json(v) for k, v in meta.items()})}
    if path.suffix == ".json":
        return strip(json.loads(path.read_text()))
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return [strip(r) for r in csv.DictReader(f)]
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _maybe_json(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--preset", required=True)
    ap.add_argument(
        "--skip",
        action="append",
        default=["_stage.json", ".stages", "png", "registry.json", "params/"],
        help="path fragments not compared",
    )
    args = ap.parse_args()
    diffs, n = [], 0
    for top in ("models", "data", "metrics"):
        base_a, base_b = args.a / top / args.preset, args.b / top / args.preset
        files = sorted(
            {p.relative_to(base_a) for p in base_a.rglob("*") if p.is_file()}
            | {p.relative_to(base_b) for p in base_b.rglob("*") if p.is_file()}
        )
        for rel in files:
            if any(s in str(rel) for s in args.skip):
                continue
            pa, pb = base_a / rel, base_b / rel
            where = f"{top}/{args.preset}/{rel}"
            if not pa.is_file() or not pb.is_file():
                diffs.append(f"{where}: only in {'B' if not pa.is_file() else 'A'}")
                continue
            n += 1
            if rel.name == "bench.json":
                same = shape(json.loads(pa.read_text())) == shape(json.loads(pb.read_text()))
            else:
                ra, rb = read(pa), read(pb)
                same = ra == rb
                if not same and rel.suffix == ".safetensors" and ra["tensors"] == rb["tensors"]:
                    diffs.append(
                        f"{where}: tensors identical, metadata differs: {_delta(ra['metadata'], rb['metadata'])}"
                    )
                    continue
                if not same and rel.suffix == ".json":
                    diffs.append(f"{where}: differs: {_delta(ra, rb)}")
                    continue
            if not same:
                diffs.append(f"{where}: differs")
    for d in diffs:
        print(d)
    print(f"{n} files compared, {len(diffs)} differences")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())

"""Typed readers of the two result files every stage after the method writes or reads.

eval.json: {"samplers": {name: {"steps", "fid", "is", ...}}, "reference", "protocol", "grids", ...}
bench.json: {"cases": {case: {"samplers": {name: {"sec_per_image", "speedup", ...}}, ...}}, "extra", ...}
Both are written once by their stage (`ddcore.eval.evaluate`, `ddcore.eval.bench`); everything else
reads them through these classes, so a key is spelled in one place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

from ddcore.checkpoints import atomic_write_text


def _rows(samplers: dict) -> list[dict]:
    return [{"sampler": name, **row} for name, row in samplers.items()]


@dataclass(frozen=True)
class _ResultFile:
    raw: dict
    FILE: ClassVar[str] = ""
    KEY: ClassVar[str] = ""  # the mapping the file must have
    STAGE: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, raw: dict) -> Self:
        if not isinstance(raw.get(cls.KEY), dict):
            raise ValueError(f"{cls.FILE} has no '{cls.KEY}' mapping; re-run the {cls.STAGE} stage")
        return cls(raw)

    @classmethod
    def load(cls, path: Path) -> Self:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class EvalResult(_ResultFile):
    FILE, KEY, STAGE = "eval.json", "samplers", "evaluate"

    def rows(self) -> list[dict]:
        """One dict per sampler, in the file's order: {"sampler": name, "steps": ..., "fid": ...}."""
        return _rows(self.raw["samplers"])

    def row(self, sampler: str) -> dict | None:
        r = self.raw["samplers"].get(sampler)
        return {"sampler": sampler, **r} if r is not None else None

    @property
    def protocol(self) -> dict:
        return self.raw.get("protocol") or {}

    @property
    def reference_name(self) -> str | None:
        return (self.raw.get("reference") or {}).get("name")


@dataclass(frozen=True)
class BenchResult(_ResultFile):
    FILE, KEY, STAGE = "bench.json", "cases", "bench"

    def own_case(self, cases: Sequence[str]) -> str:
        """The case that times the preset's own samplers: the one in the file not among the families'
        random-weight cases (those are listed in `cases` too)."""
        from ddcore.teachers.registry import random_case_family

        own = [c for c in cases if random_case_family(c) is None]
        return own[0] if own else "preset"

    def rows(self, case: str) -> list[dict]:
        return _rows((self.raw["cases"].get(case) or {}).get("samplers", {}))

    def row(self, case: str, sampler: str) -> dict | None:
        return next((r for r in self.rows(case) if r["sampler"] == sampler), None)

    @property
    def cases(self) -> dict[str, list[dict]]:
        return {case: self.rows(case) for case in self.raw["cases"]}


def write_fid_curve(result: EvalResult, path: Path) -> None:
    """fid_vs_steps.csv: sampler, steps, fid, sorted by steps (what DVC plots)."""
    rows = [r for r in result.rows() if "fid" in r and "steps" in r]
    rows.sort(key=lambda r: (r["steps"], str(r["sampler"])))
    lines = ["sampler,steps,fid"] + [f"{r['sampler']},{int(r['steps'])},{float(r['fid']):.6g}" for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")

"""The promotion gate: which version of a student is champion, from numbers only (no MLflow here).

A new version gets the alias ``challenger``; it becomes ``champion`` only if its FID is <=
max_fid_ratio x the champion's and its seconds per image are <= max_latency_ratio x the champion's
(`PromoteParams`), both scored under the same evaluation protocol; a champion scored under another
protocol keeps its place, since neither FID says anything about the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from ddcore.params import Preset, PromoteParams
from ddcore.results import BenchResult, EvalResult

CHALLENGER, CHAMPION = "challenger", "champion"


@dataclass(frozen=True)
class Scores:
    fid: float
    sec_per_image: float


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    champion_version: str | None = None
    fid_limit: float | None = None
    latency_limit: float | None = None


def promotion_decision(challenger: Scores, champion: Scores | None, gate: PromoteParams) -> Decision:
    """The gate: better (or equal within the ratio) FID at no worse (within the ratio) speed."""
    if champion is None:
        return Decision(True, "no champion yet")
    fid_limit = gate.max_fid_ratio * champion.fid
    lat_limit = gate.max_latency_ratio * champion.sec_per_image
    fails = []
    if not challenger.fid <= fid_limit:
        fails.append(f"FID {challenger.fid:.4g} > {gate.max_fid_ratio:g} x champion FID {champion.fid:.4g}")
    if not challenger.sec_per_image <= lat_limit:
        fails.append(
            f"{challenger.sec_per_image:.4g} s/img > {gate.max_latency_ratio:g} x champion "
            f"{champion.sec_per_image:.4g} s/img"
        )
    if fails:
        return Decision(False, "; ".join(fails), fid_limit=fid_limit, latency_limit=lat_limit)
    return Decision(
        True,
        f"FID {challenger.fid:.4g} <= {fid_limit:.4g} and {challenger.sec_per_image:.4g} s/img <= {lat_limit:.4g}",
        fid_limit=fid_limit,
        latency_limit=lat_limit,
    )


@dataclass(frozen=True)
class Champion:
    version: str
    scores: Scores
    protocol: str | None  # None: registered before versions carried the tag


def gate_decision(
    challenger: Scores, protocol: str, champion: Champion | None, gate: PromoteParams
) -> Decision:
    """`promotion_decision` against a champion scored under the same protocol; a champion scored under
    another one keeps its place, since neither FID says anything about the other."""
    if champion is not None and champion.protocol != protocol:
        return Decision(
            False,
            f"champion v{champion.version} was scored under another evaluation protocol "
            f"({champion.protocol or 'not recorded'}; this version: {protocol}), so the FIDs are not "
            "comparable and the champion stays",
            champion.version,
        )
    decision = promotion_decision(challenger, champion.scores if champion else None, gate)
    return replace(decision, champion_version=champion.version) if champion else decision


def number(row: dict, key: str) -> float | None:
    """row[key] when it is a finite number, else None."""
    v = row.get(key)
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def headline_sampler(preset: Preset) -> str:
    """The sampler the registered model stands for: `headline`, else the method's first in eval.samplers."""
    from ddcore.methods.registry import get_method

    return get_method(preset.method).headline(preset.eval.samplers, preset.headline)


def headline_scores(preset: Preset, ev: EvalResult, be: BenchResult) -> tuple[str, Scores, dict]:
    name = headline_sampler(preset)
    ev_row = ev.row(name)
    be_row = be.row(be.own_case(preset.bench.cases), name)
    if ev_row is None or be_row is None:
        raise KeyError(f"sampler {name!r} is missing from {'eval.json' if ev_row is None else 'bench.json'}")
    fid, spi = number(ev_row, "fid"), number(be_row, "sec_per_image")
    if fid is None or spi is None:
        raise KeyError(f"sampler {name!r}: need 'fid' in eval.json and 'sec_per_image' in bench.json")
    return name, Scores(fid, spi), {"eval": ev_row, "bench": be_row}


def eval_protocol(preset: Preset) -> str:
    """What makes two FIDs comparable: sample count, label scheme, seed and reference (not the sampler
    list or the batch size). Stored as each version's `eval_protocol` tag; the gate compares FIDs of
    one protocol only."""
    e = preset.eval
    return f"n={e.num_samples} labels={e.labels} seed={e.seed} reference={e.reference}"


def check_scored_protocol(preset: Preset, ev: EvalResult, where: Path | str) -> None:
    """Refuse an eval.json scored under other eval params than the preset's: its FID would be
    registered under the wrong protocol."""
    from ddcore.eval.evaluate import LABEL_PROTOCOL

    e, got = preset.eval, ev.protocol
    want = {"n_samples": e.num_samples, "seed": e.seed, "labels": LABEL_PROTOCOL[e.labels]}
    differ = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    scored_ref = ev.reference_name
    if not _same_reference(e.reference, scored_ref):
        differ["reference"] = (scored_ref, e.reference)
    if differ:
        parts = ", ".join(f"{k} {a!r} (preset: {b!r})" for k, (a, b) in differ.items())
        raise ValueError(f"{where} was scored with {parts}; re-run the evaluate stage")


def _same_reference(param: str, scored_name: str | None) -> bool:
    """eval.json names its reference 'world' or by the path it was read from, which is the
    `eval.reference` path, made absolute against the project when it was relative."""
    if scored_name is None:
        return False
    if param == "world" or scored_name == "world":
        return param == scored_name
    want, got = Path(param).parts, Path(scored_name).parts
    return got == want or (not Path(param).is_absolute() and got[-len(want) :] == want)

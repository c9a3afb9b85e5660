"""What evaluation leaves on disk: eval.json, sample grids, the FID-vs-steps plot, the README table.

JSON is written atomically (temp file + rename) so DVC never reads a half-written metrics file,
and non-finite numbers become null because JSON has no NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddcore.checkpoints import atomic_path, atomic_write_json
from ddcore.samplers.base import COMPILED_SUFFIX


def json_clean(obj: Any) -> Any:
    """Recursively turn numpy/torch scalars into Python numbers and NaN/inf into None."""
    if isinstance(obj, Mapping):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_clean(v) for v in obj]
    if isinstance(obj, Tensor):
        return json_clean(obj.tolist())
    if isinstance(obj, np.ndarray | np.generic):
        return json_clean(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(obj: Mapping, path: str | Path) -> Path:
    return atomic_write_json(path, json_clean(obj))


def read_json(obj_or_path: Mapping | str | Path) -> dict:
    if isinstance(obj_or_path, Mapping):
        return dict(obj_or_path)
    return json.loads(Path(obj_or_path).read_text())


def save_grid(images: Tensor, nrow: int, path: str | Path, padding: int = 2, min_cell: int = 64) -> Path:
    """Save float [0, 1] images (B, 3, H, W) as one PNG with `nrow` images per row.

    Cells smaller than `min_cell` pixels are enlarged by an integer factor (nearest neighbour,
    so pixels stay pixels): 32-px tiny-world images are unreadable at their own size.
    """
    from PIL import Image
    from torchvision.utils import make_grid

    x = images.detach().float().clamp(0, 1).cpu()
    factor = -(-min_cell // x.shape[-1]) if x.shape[-1] < min_cell else 1
    if factor > 1:
        x = x.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
    grid = make_grid(x, nrow=nrow, padding=padding, pad_value=1.0)
    arr = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return Path(path)


def plot_fid_vs_steps(rows: Mapping[str, Mapping], path: str | Path, title: str = "") -> Path | None:
    """FID against sequential network evaluations (log x), one labelled point per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [
        (name, r["steps"], r["fid"])
        for name, r in rows.items()
        if r.get("fid") is not None and r.get("steps")
    ]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    for name, steps, fid in pts:
        ax.scatter([steps], [fid], s=36)
        ax.annotate(name, (steps, fid), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("sequential network evaluations per image")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title or "FID vs steps")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) < 1e-9:  # round-off around an exact zero (e.g. FID of a set with itself)
            return "0"
        if v != 0 and abs(v) < 10 ** (-digits):
            return f"{v:.1e}"
        return f"{v:.{digits}f}"
    return str(v)


def _times(x: float | None) -> str:
    return "–" if x is None else _fmt(x, 1) + "×"


def render_results_table(
    eval_json: Mapping | str | Path, bench_json: Mapping | str | Path | None = None, case: str | None = None
) -> str:
    """Markdown table for the README: quality from eval.json next to speed from bench.json.

    Speed columns come from the bench `case` (default: the case sharing the most sampler names
    with eval.json, i.e. the preset's own) and are matched to eval rows by sampler name. Rows
    follow eval.json's `sampler_order` (JSON files are written with sorted keys), else most
    steps first.
    """
    ev = read_json(eval_json)
    speed: dict = {}
    case_info = ""
    if bench_json is not None:
        bj = read_json(bench_json)
        cases = bj.get("cases", {})
        if cases:
            # default: the case that timed these very samplers (bench.json keys are sorted, so
            # the first case is often a random-weight architecture)
            case = case or max(
                cases, key=lambda c: len(set(cases[c].get("samplers", {})) & set(ev.get("samplers", {})))
            )
            speed = cases.get(case, {}).get("samplers", {})
            dev = bj.get("machine", {}).get("cuda_device") or bj.get("machine", {}).get("cpu_model", "")
            case_info = f"Speed: bench case `{case}` on {dev}."
    # a "+compile" row's speedup is against the compiled teacher (see ddcore.eval.bench)
    compiled = any(n.endswith(COMPILED_SUFFIX) for n in speed)
    header = (
        "| sampler | steps | FID | IS | precision | recall | class acc | teacher NLL (nats/tok) | "
        "off-support | s/img (bs 1) | img/s | speedup |" + (" speedup, both compiled |" if compiled else "")
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    rows = ev.get("samplers", {})
    order = [n for n in ev.get("sampler_order", []) if n in rows]
    order += sorted((n for n in rows if n not in order), key=lambda n: (-(rows[n].get("steps") or 0), n))
    for name in order:
        r, s = rows[name], speed.get(name, {})
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    _fmt(r.get("steps")),
                    _fmt(r.get("fid")),
                    _fmt(r.get("is")),
                    _fmt(r.get("precision")),
                    _fmt(r.get("recall")),
                    _fmt(r.get("class_acc")),
                    _fmt(r.get("teacher_nll_unfiltered")),
                    _fmt(r.get("teacher_support_miss"), 3),
                    _fmt(s.get("sec_per_image"), 4),
                    _fmt(s.get("images_per_s"), 1),
                    _times(s.get("speedup")),
                    *([_times(speed.get(f"{name}{COMPILED_SUFFIX}", {}).get("speedup"))] if compiled else []),
                ]
            )
            + " |"
        )
    ref = ev.get("reference", {})
    notes = [
        f"Teacher `{ev.get('teacher_name', '?')}`; {ev.get('protocol', {}).get('n_samples', '?')} samples per row; "
        f"reference `{ref.get('name', '?')}` ({ref.get('kind', '?')}, {ref.get('extractor', '?')} features).",
    ]
    if case_info:
        notes.append(case_info)
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"

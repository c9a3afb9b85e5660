"""Measurements behind the DD1 choices in docs/dd1.md (reproducible from the command line).

    python -m ddcore.dd1.measure flow --teacher-dir models/tiny/teacher [--n 4000]

`flow`: agreement of cheaper flow-map solvers with a 1024-step Heun reference on the teacher's
own next-token distributions (teacher-forced on teacher samples), plus their speed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from ddcore.dd1.flowmap import FlowSolver
from ddcore.params import SamplingParams
from ddcore.teachers.base import Teacher

__all__ = ["flow_agreement_table", "teacher_token_distributions"]


@torch.no_grad()
def teacher_token_distributions(
    teacher: Teacher, params: SamplingParams, n: int, seed: int = 0, batch: int = 100
) -> Tensor:
    """(n, V) sampling distributions of random positions of teacher samples (given their prefix)."""
    g = torch.Generator().manual_seed(seed)
    n_seq = max(1, -(-n // teacher.seq_len))
    out = []
    for i in range(0, n_seq, batch):
        b = min(batch, n_seq - i)
        labels = torch.randint(0, teacher.num_classes, (b,), generator=g)
        tokens = teacher.sample(labels, range(10_000 + i, 10_000 + i + b), params)
        out.append(teacher.teacher_forced_probs(tokens, labels, params).reshape(-1, teacher.vocab_size).cpu())
    probs = torch.cat(out)
    return probs[torch.randperm(probs.shape[0], generator=g)[:n]]


def flow_agreement_table(
    probs: Tensor,
    codebook: Tensor,
    noise: Tensor,
    configs: Sequence[FlowSolver],
    reference: FlowSolver | None = None,
) -> list[dict]:
    """Fraction of draws where each solver picks the reference's token, and its time per token."""
    reference = reference or FlowSolver(steps=1024, solver="heun")
    ref = reference.tokens(noise, probs, codebook)
    rows = []
    for s in configs:
        t0 = time.perf_counter()
        tok = s.tokens(noise, probs, codebook)
        sec = time.perf_counter() - t0
        rows.append(
            {
                "solver": s.solver,
                "steps": s.steps,
                "nfe": s.steps * (2 if s.solver == "heun" else 1),
                "r_min": s.r_min,
                "r_max": s.r_max,
                "dtype": str(s.dtype).removeprefix("torch."),
                "agreement": (tok == ref).double().mean().item(),
                "us_per_token": 1e6 * sec / probs.shape[0],
            }
        )
    return rows


def _main() -> None:
    ap = argparse.ArgumentParser(prog="python -m ddcore.dd1.measure")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flow", help="flow-map solver accuracy vs a 1024-step reference")
    f.add_argument("--teacher-dir", required=True)
    f.add_argument("--n", type=int, default=4000)
    f.add_argument("--sampling", default="{}", help="SamplingParams as JSON")
    f.add_argument("--steps", default="4,8,16,32,64,128")
    args = ap.parse_args()
    from ddcore.teachers.llamagen import build_llamagen_teacher_from_dir

    teacher = build_llamagen_teacher_from_dir(args.teacher_dir)
    params = SamplingParams(**json.loads(args.sampling))
    probs = teacher_token_distributions(teacher, params, args.n).double()
    noise = torch.randn(probs.shape[0], teacher.token_dim, generator=torch.Generator().manual_seed(1))
    steps = [int(s) for s in args.steps.split(",")]
    configs = [FlowSolver(steps=s, solver=k) for k in ("euler", "heun") for s in steps]
    configs += [FlowSolver(steps=s, solver="heun", r_min=0.1, r_max=100.0) for s in steps]
    configs += [FlowSolver(steps=s, solver="heun", dtype=torch.float32) for s in steps]
    for row in flow_agreement_table(probs, teacher.codebook, noise, configs):
        print(json.dumps(row))


if __name__ == "__main__":
    _main()

"""Measurements behind the DD1 choices in docs/dd1.md (reproducible from the command line).

    python -m ddcore.methods.dd1.measure flow --teacher-dir models/tiny/teacher [--n 4000]
    python -m ddcore.methods.dd1.measure jacobi --teacher-dir models/tiny/teacher \
        --traj-dir data/tiny/trajectories [--student-dir models/tiny/student] [--pairs 500]

`flow`: agreement of cheaper flow-map solvers with a 1024-step Heun reference on the teacher's
own next-token distributions (teacher-forced on teacher samples), plus their speed.
`jacobi`: how far exact parallel refinement with the teacher gets per round on stored trajectories,
the yardstick for what one student pass recovers (docs/dd1.md, section 6).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from ddcore.methods.dd1.flowmap import FlowChooser, FlowSolver
from ddcore.params import FlowParams, SamplingParams
from ddcore.teachers.base import Teacher

__all__ = ["flow_agreement_table", "jacobi_refinement", "prefix_accuracy", "teacher_token_distributions"]


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


def prefix_accuracy(pred: Tensor, target: Tensor) -> dict:
    """Token accuracy and the median index of the first wrong position (seq_len if none)."""
    right = pred == target
    first_wrong = torch.where(right.all(1), right.shape[1], (~right).float().argmax(1))
    return {"accuracy": right.double().mean().item(), "median_first_wrong": float(first_wrong.median())}


@torch.no_grad()
def jacobi_refinement(
    teacher: Teacher,
    noise: Tensor,
    labels: Tensor,
    target: Tensor,
    prior: Tensor,
    sampling: SamplingParams,
    flow: FlowParams,
    rounds: int,
) -> list[dict]:
    """Every trajectory token is q_i = F(eps_i, p_i(q_<i)), a fixed point: start from the flow map of
    `prior` (L, V) at every position, then re-run the teacher teacher-forced on the current guess and
    the flow map on its p, all positions at once. After k rounds the first k AR steps are exact; the
    rows give `prefix_accuracy` against `target` after each round (round 0: the prior's tokens)."""
    chooser = FlowChooser(teacher.codebook, FlowSolver.from_params(flow))
    noise, labels = noise.to(teacher.device).float(), labels.to(teacher.device)
    guess = chooser(prior.to(teacher.device)[None].expand(noise.shape[0], -1, -1).contiguous(), noise)
    rows = [{"round": 0, **prefix_accuracy(guess.cpu(), target)}]
    for k in range(1, rounds + 1):
        guess = chooser(teacher.teacher_forced_probs(guess, labels, sampling), noise)
        rows.append({"round": k, **prefix_accuracy(guess.cpu(), target)})
    return rows


@torch.no_grad()
def _jacobi(args: argparse.Namespace) -> None:
    from ddcore.methods.dd1.students import load_student
    from ddcore.methods.dd1.trajectories import TrajectoryDataset
    from ddcore.teachers.llamagen.teacher import build_llamagen_teacher_from_dir

    teacher = build_llamagen_teacher_from_dir(args.teacher_dir)
    ds = TrajectoryDataset(args.traj_dir)
    n = len(ds)
    held = torch.arange(n - args.pairs, n)  # the last pairs: training holds them out for validation
    noise, target, labels = ds.noise[held].float(), ds.tokens[held].long(), ds.labels[held]
    prior = ds.marginals(torch.arange(n - args.pairs))
    sampling, flow = SamplingParams(**ds.manifest.sampling), FlowParams(**ds.manifest.flow)
    for row in jacobi_refinement(teacher, noise, labels, target, prior, sampling, flow, args.rounds):
        print(json.dumps(row))
    if args.student_dir:
        student, _ = load_student(args.student_dir, teacher, device="cpu")
        t0 = torch.zeros(len(held), dtype=torch.long)
        logits, _ = student(noise, labels, t0, with_cont=False)
        print(json.dumps({"student": args.student_dir, **prefix_accuracy(logits.argmax(-1), target)}))


def _main() -> None:
    ap = argparse.ArgumentParser(prog="python -m ddcore.methods.dd1.measure")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flow", help="flow-map solver accuracy vs a 1024-step reference")
    f.add_argument("--teacher-dir", required=True)
    f.add_argument("--n", type=int, default=4000)
    f.add_argument("--sampling", default="{}", help="SamplingParams as JSON")
    f.add_argument("--steps", default="4,8,16,32,64,128")
    j = sub.add_parser("jacobi", help="exact parallel refinement with the teacher vs one student pass")
    j.add_argument("--teacher-dir", required=True)
    j.add_argument("--traj-dir", required=True)
    j.add_argument("--student-dir", default=None)
    j.add_argument("--pairs", type=int, default=500)
    j.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    if args.cmd == "jacobi":
        return _jacobi(args)
    from ddcore.teachers.llamagen.teacher import build_llamagen_teacher_from_dir

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

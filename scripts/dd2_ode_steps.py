"""How many Euler steps per token the analytic AR-diffusion sampler needs (docs/dd2.md).

    python scripts/dd2_ode_steps.py [--n 20000] [--steps 10 20] [--powers 1 2 3]

On the exact-marginal Markov teacher of the tests (6 codes, 4 positions, cfg 2.0 + top-k 5), every
token is solved from its noise by the ODE of the teacher's own distribution (`AnalyticODEChooser`,
Euler steps on t_k = (k / N)^power) and the joint of the first two tokens is compared with the exact one:
total variation and the chi-square p-value, beside the teacher's own multinomial draw.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
from dd1_toy import MarkovTeacher, chi2_pvalue  # noqa: E402

from ddcore.methods.dd2.ode import AnalyticODEChooser  # noqa: E402
from ddcore.params import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--steps", type=int, nargs="+", default=[2, 5, 10, 20, 32, 64])
    ap.add_argument("--powers", type=float, nargs="+", default=[1.0], help="time-grid powers (1: uniform)")
    args = ap.parse_args()
    teacher = MarkovTeacher(seq_len=4, vocab=6, dim=4, num_classes=2, seed=3)
    params, label, n, V = SamplingParams(cfg_scale=2.0, top_k=5), 1, args.n, 6
    exact = teacher.exact_pair(label, 1, params).reshape(-1)
    labels = torch.full((n,), label)

    def row(name: str, chooser) -> None:
        tok = teacher.sample(labels, list(range(n)), params, chooser=chooser)
        pair = torch.bincount(tok[:, 0] * V + tok[:, 1], minlength=V * V).double()
        tv = 0.5 * (pair / n - exact).abs().sum().item()
        print(f"| {name} | {tv:.4f} | {chi2_pvalue(pair, exact):.3g} |")

    print("| chooser | TV of the (q0, q1) joint | chi-square p |\n|---|---|---|")
    for power in args.powers:
        for steps in args.steps:
            chooser = AnalyticODEChooser(teacher.codebook, steps=steps, power=power)
            row(f"analytic ODE, {steps} Euler steps, grid power {power:g}", chooser)
    row("multinomial (the teacher's draw)", None)


if __name__ == "__main__":
    main()

# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # How distilled decoding works
#
# An AR teacher samples token i from a distribution p(. | q_<i) over a codebook of vectors. Read p as a
# mixture of Dirac masses at the code vectors and add Gaussian noise: everything about the noised mixture
# is closed form (`ddcore/dirac.py`), and both methods stand on it.
#
# * **DD1** integrates the probability-flow ODE of that mixture from Gaussian noise to a code: a
#   deterministic map noise -> token whose output is distributed exactly as p. Chaining it over positions
#   turns the teacher into a deterministic map noise sequence -> token sequence, which a student learns.
# * **DD2** reads the same mixture as a conditional score model: the score of the noised mixture given the
#   prefix is the teacher's "ground-truth score", which the AR-diffusion model regresses and the one-step
#   generator is distilled against.
#
# Everything below runs on a 2-D codebook you can plot, then on the prepared teacher of a preset.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.stats import chisquare

from ddcore.dirac import dd1_velocity, dd2_score, safe_log
from ddcore.methods.dd1.flowmap import FlowSolver

codebook = torch.tensor([[-2.0, -1.0], [2.0, -1.5], [0.0, 2.0], [1.5, 1.0]], dtype=torch.float64)
p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]

# %% [markdown]
# ## DD1: the flow map from noise to codes
# The ODE dx/dt = (D(x, t) - x) / (1 - t) with x_0 = eps ~ N(0, I) and x_t = t c + (1 - t) eps, where
# D is the posterior mean of the code given x. Each trajectory ends on one code; the production solver
# (`FlowSolver`, Heun in the variables y = x / (1 - t), r = t / (1 - t)) gives the token.

# %%
gen = torch.Generator().manual_seed(0)
noise = torch.randn(4000, 2, generator=gen, dtype=torch.float64)
tokens = FlowSolver(steps=64).tokens(noise, p.expand(len(noise), -1), codebook)
counts = torch.bincount(tokens, minlength=len(p)).numpy()
test = chisquare(counts, f_exp=p.numpy() * len(noise))
print(
    f"token frequencies {np.round(counts / len(noise), 3)} vs p {p.numpy()}; chi-square p-value {test.pvalue:.3f}"
)
assert test.pvalue > 1e-3, "the flow map's tokens must be distributed as p"

# %%
ts = torch.linspace(0, 0.995, 400, dtype=torch.float64)
x = noise[:150].clone()
path = [x]
log_p = safe_log(p).expand(len(x), -1)
for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
    x = x + (t1 - t0) * dd1_velocity(x, log_p, codebook, t0)
    path.append(x)
path = torch.stack(path).numpy()  # (time, sample, 2)

fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.8))
for j in range(path.shape[1]):
    ax.plot(path[:, j, 0], path[:, j, 1], color=colors[int(tokens[j])], lw=0.6, alpha=0.6)
ax.scatter(noise[:150, 0], noise[:150, 1], s=4, c="k", label="noise x_0")
ax.scatter(codebook[:, 0], codebook[:, 1], s=120, marker="*", c=colors, edgecolor="k", label="codes")
ax.set_title("DD1 flow trajectories, coloured by the token\nthe production solver assigns")
ax.set_xlabel("dimension 1")
ax.set_ylabel("dimension 2")
ax.legend(fontsize=7, loc="lower right")
idx = np.arange(len(p))
bx.bar(idx - 0.2, counts / len(noise), width=0.4, color=colors, label="flow-map tokens (4000 noises)")
bx.bar(idx + 0.2, p.numpy(), width=0.4, color="lightgray", edgecolor="k", label="teacher p")
bx.set_xticks(idx, [f"code {j}" for j in idx])
bx.set_ylabel("probability")
bx.set_title(f"histogram of the flow map = p (chi-square p = {test.pvalue:.2f})")
bx.legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# ## DD2: the score field of the noised mixture
# DD2 uses the opposite time direction, x_t = (1 - t) c + t eps. The score grad log p_t(x) points towards
# the codes, weighted by p and by how close each code is; as t -> 0 it sharpens around each code.

# %%
g = torch.linspace(-3.5, 3.5, 21, dtype=torch.float64)
gx, gy = torch.meshgrid(g, g, indexing="xy")
grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)
fig, axes = plt.subplots(1, 3, figsize=(11, 3.7))
for ax, t in zip(axes, (0.8, 0.5, 0.25), strict=True):
    s = dd2_score(grid, safe_log(p).expand(len(grid), -1), codebook, t)
    norm = s.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    u = (s / norm).numpy()
    ax.quiver(
        grid[:, 0], grid[:, 1], u[:, 0], u[:, 1], norm.squeeze(-1).log().numpy(), cmap="viridis", scale=30
    )
    ax.scatter(
        (1 - t) * codebook[:, 0],
        (1 - t) * codebook[:, 1],
        s=30 + 300 * p.numpy(),
        marker="*",
        c=colors,
        edgecolor="k",
    )
    ax.set_title(
        f"score direction at t = {t} (colour: log |score|)\nstars: (1 - t) x code, size ~ p", fontsize=8
    )
    ax.set_xlabel("dimension 1")
    ax.set_ylabel("dimension 2")
fig.tight_layout()

# %% [markdown]
# ## One teacher sample, its DD1 trajectory, and what the student makes of each state
# On a prepared teacher: the noise sequence eps goes through the flow map position by position (the
# `teacher-flow` sampler), giving tokens q. The trajectory's states are X_t = (code(q_<t), eps_>=t): the
# first t positions are data, the rest still noise. Row 1 decodes X_t itself; row 2 decodes the student's
# one-pass prediction of the whole sequence from X_t (it was trained at t in `dd1.student.t_list`).

# %%
from ddcore.methods.dd1.samplers import FlowTeacherSampler
from ddcore.methods.dd1.trajectories import build_xt
from ddcore.params import load_preset
from ddcore.pipeline.layout import Layout
from ddcore.samplers.registry import build_samplers
from ddcore.teachers.loading import load_teacher

ROOT = Path(os.environ.get("DD_ROOT", "..")).resolve()
PRESET = os.environ.get("DD_PRESET", "micro")
preset = load_preset(PRESET, ROOT / "params.yaml")
layout = Layout.create(PRESET, root=ROOT)
teacher, _ = load_teacher(preset, layout.teacher_dir, device="cpu")
(student,) = build_samplers(["dd1-1step"], teacher, layout.student_dir, preset)
label, seed = torch.tensor([3]), [2024]
eps = teacher.noise(seed).half().float()  # the samplers round the noise to fp16, as the trajectory data
q = FlowTeacherSampler(teacher, preset.teacher.sampling, preset.dd1.flow).tokens(label, seed)
L = teacher.seq_len
ts_shown = sorted({0, *preset.dd1.student.t_list, L // 4, L // 2, 3 * L // 4, L})
with torch.no_grad():
    rows = {"X_t decoded": [], "student from X_t": []}
    for t in ts_shown:
        xt = build_xt(eps, q, torch.tensor([t]), teacher.codebook)
        rows["X_t decoded"].append(teacher.decode_vectors(xt))
        vec, _ = student.student.predict_vectors(xt, label, torch.tensor([t]), student.split_t)
        rows["student from X_t"].append(teacher.decode_vectors(vec))
fig, axes = plt.subplots(2, len(ts_shown), figsize=(1.7 * len(ts_shown), 3.8), squeeze=False)
for r, (what, imgs) in enumerate(rows.items()):
    for c, (t, img) in enumerate(zip(ts_shown, imgs, strict=True)):
        axes[r][c].imshow(img[0].permute(1, 2, 0).clamp(0, 1).numpy())  # decoded images are in [0, 1]
        axes[r][c].set_xticks([])
        axes[r][c].set_yticks([])
        axes[r][c].set_title(
            f"t = {t} of {L}" + (" (trained)" if t in preset.dd1.student.t_list else ""), fontsize=7
        )
    axes[r][0].set_ylabel(what, fontsize=8)
fig.suptitle(f"{PRESET}: class {int(label)}, seed {seed[0]}; X_{L} is the teacher's sample", fontsize=9)
fig.tight_layout()

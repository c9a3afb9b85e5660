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
# # Experiments: compare the runs of one teacher, queue a new variant
#
# Every registered student has an MLflow run carrying the full resolved preset as params, the evaluation
# and benchmark tables as metrics, and the training curve. Comparing variants is therefore a query
# (`mlflow.search_runs`) plus pandas; a new variant is a DVC experiment (`dvc exp run -S ...`) whose
# register stage adds its run here.

# %%
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow

from ddcore.params import load_preset
from ddcore.pipeline.layout import Layout
from ddcore.registry.store import configure
from ddcore.settings import get_settings

ROOT = Path(os.environ.get("DD_ROOT", "..")).resolve()
PRESET = os.environ.get("DD_PRESET", "micro")
preset = load_preset(PRESET, ROOT / "params.yaml")
client = configure(Layout.create(PRESET, root=ROOT).tracking_uri)

# %% [markdown]
# ## The runs of this teacher (every method, every preset that uses it)

# %%
runs = mlflow.search_runs(
    experiment_names=[get_settings().mlflow_experiment],
    filter_string=f"tags.teacher = '{preset.teacher.name}'",
    order_by=["attributes.start_time ASC"],
)
runs = runs.set_index("run_id")
overview = runs[
    ["tags.preset", "tags.method", "tags.sampler", "tags.promotion", "metrics.fid", "metrics.sec_per_image"]
]
overview

# %% [markdown]
# ## Parameters that differ between them
# All other parameters (teacher, world, sampling, evaluation protocol) are equal, which is what makes the
# metrics comparable.

# %%
params = runs.filter(like="params.")
differ = params.loc[:, params.astype(str).nunique() > 1]
differ.T

# %% [markdown]
# ## Metrics of every sampler of every run

# %%
fid = runs.filter(regex=r"^metrics\.eval/.*/fid$").rename(columns=lambda c: c.split("/")[1])
fid.T.round(2)

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
for run_id, row in runs.iterrows():
    history = client.get_metric_history(run_id, "train/loss")
    label = f"{row['tags.preset']} {row['tags.method']} ({run_id[:6]})"
    ax.plot([m.step for m in history], [m.value for m in history], "o-", label=label)
ax.set_xlabel("optimizer step")
ax.set_ylabel("training loss")
ax.set_title(f"training curves of the {preset.teacher.name} runs")
ax.legend(fontsize=7)
fig.tight_layout()
assert len(runs) >= 1 and not fid.empty

# %% [markdown]
# ## Queue a new variant
# A variant is a change of params.yaml applied by DVC in an isolated experiment: `dvc exp run --queue`
# records it, `dvc queue start` runs the queue (here: nothing is run; the entry is removed again so the
# notebook leaves the project as it found it), `dvc exp show` lists finished experiments beside the
# workspace, and the variant's register stage puts its run into the table above.


# %%
def dvc(*args: str) -> str:
    exe = Path(sys.executable).parent / "dvc"  # the environment's own DVC, whatever PATH says
    done = subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


name = "notebook-variant"
variant = f"presets.{PRESET}.dd1.train.steps={2 * preset.dd1.train.steps}"  # twice the training
print(dvc("exp", "run", "--queue", "--name", name, "--set-param", variant, f"register@{PRESET}"))
print(dvc("queue", "status"))
print(dvc("queue", "remove", name))
assert name not in dvc("queue", "status")

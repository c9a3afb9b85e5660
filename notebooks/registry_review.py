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
# # Registry review: champion against challenger
#
# Everything a reviewer decides from, read from the MLflow registry and the runs behind its versions:
# the versions with their method and gate decision, the metrics side by side, FID against sampling steps,
# samples of the same seeds, the training curves, and the gate's decision recomputed from the recorded
# numbers. Promotion and roll-back are alias moves; the last section makes them on a scratch copy of
# the store, so running this notebook never changes the registry it reviews.

# %%
import os
import shutil
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from mlflow import MlflowClient

from ddcore.params import PromoteParams, load_preset
from ddcore.pipeline.layout import Layout
from ddcore.registry.gate import Champion, Scores, gate_decision
from ddcore.registry.store import configure, load_model, model_name

ROOT = Path(os.environ.get("DD_ROOT", "..")).resolve()
PRESET = os.environ.get("DD_PRESET", "micro")
tracking_uri = Layout.create(PRESET, root=ROOT).tracking_uri
name = model_name(load_preset(PRESET, ROOT / "params.yaml"))
client = configure(tracking_uri)

# %% [markdown]
# ## The versions
# One row per registered version: what it is (method, preset, headline sampler), how it scored (FID and
# seconds per image of that sampler), and what the gate decided when it was registered.

# %%
versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version))
aliases = {str(v): a for a, v in client.get_registered_model(name).aliases.items()}
table = pd.DataFrame(
    [
        {
            "version": int(mv.version),
            "alias": aliases.get(str(mv.version), ""),
            "method": mv.tags.get("method"),
            "preset": mv.tags.get("preset"),
            "sampler": mv.tags.get("sampler"),
            "fid": float(mv.tags["fid"]),
            "sec_per_image": float(mv.tags["sec_per_image"]),
            "decision": mv.tags.get("decision"),
            "reason": mv.tags.get("decision_reason"),
            "run_id": mv.run_id,
        }
        for mv in versions
    ]
).set_index("version")
table

# %%
champion = client.get_model_version_by_alias(name, "champion")
challenger = client.get_model_version_by_alias(name, "challenger")
pair = {"champion": champion, "challenger": challenger}
print(
    f"champion v{champion.version} ({champion.tags['method']}), challenger v{challenger.version} ({challenger.tags['method']})"
)
print(champion.description)

# %% [markdown]
# ## Metrics side by side
# The evaluation stage's table as the register stage logged it: metric `eval/<sampler>/<field>` of each run.


# %%
def eval_table(run_id: str) -> pd.DataFrame:
    rows = {}
    for key, value in client.get_run(run_id).data.metrics.items():
        parts = key.split("/")
        if parts[0] == "eval" and len(parts) == 3:
            rows.setdefault(parts[1], {})[parts[2]] = value
    return pd.DataFrame(rows).T


fields = ["steps", "fid", "kid", "class_acc", "precision", "recall", "sec_per_image"]
side = pd.concat({role: eval_table(mv.run_id)[fields] for role, mv in pair.items()}, axis=1)
side

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
for role, mv in pair.items():
    ev = eval_table(mv.run_id).sort_values("steps")
    protocol = mv.tags["eval_protocol"].split(" ")[0]  # FIDs compare only under one protocol (n samples)
    ax.plot(ev["steps"], ev["fid"], "o-", label=f"{role} v{mv.version} ({mv.tags['method']}, {protocol})")
    for sampler, row in ev.iterrows():
        ax.annotate(
            sampler, (row["steps"], row["fid"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
ax.set_xscale("log")
ax.set_xlabel("sampling steps (sequential network passes)")
ax.set_ylabel("FID (lower is better)")
ax.set_title("FID against sampling steps")
ax.legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# ## Samples of the same seeds
# Each version served through its own registered pyfunc model, headline sampler, the same (class, seed) pairs.

# %%
request = pd.DataFrame({"label": list(range(8)), "seed": [7 + i for i in range(8)]})
grids = {role: load_model(name, mv.version, tracking_uri).predict(request) for role, mv in pair.items()}
fig, axes = plt.subplots(2, len(request), figsize=(1.3 * len(request), 3.0), squeeze=False)
for r, (role, imgs) in enumerate(grids.items()):
    for c in range(len(request)):
        axes[r][c].imshow(imgs[c])
        axes[r][c].set_xticks([])
        axes[r][c].set_yticks([])
        if r == 0:
            axes[r][c].set_title(f"class {request.label[c]}", fontsize=8)
    axes[r][0].set_ylabel(f"{role}\nv{pair[role].version} {pair[role].tags['sampler']}", fontsize=7)
fig.suptitle("the same seeds through champion and challenger", fontsize=9)
fig.tight_layout()

# %% [markdown]
# ## Training curves
# `train/<column>` of the run: every row of the method's train_log.csv at its optimizer step.

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
for role, mv in pair.items():
    history = client.get_metric_history(mv.run_id, "train/loss")
    ax.plot(
        [m.step for m in history],
        [m.value for m in history],
        "o-",
        label=f"{role} v{mv.version} ({mv.tags['method']})",
    )
ax.set_xlabel("optimizer step")
ax.set_ylabel("training loss (each method its own loss)")
ax.set_title("training curves")
ax.legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# ## The gate's decision, recomputed
# The register stage compared the newest version with the champion of that moment: a challenger becomes
# champion only when both were scored under the same evaluation protocol, with FID <= max_fid_ratio x the
# champion's and s/img <= max_latency_ratio x the champion's. Recomputing it from the numbers recorded on
# the version must give the decision and the reason recorded there.

# %%
newest = versions[-1]
tags = newest.tags
limits = PromoteParams(
    max_fid_ratio=float(tags["max_fid_ratio"]), max_latency_ratio=float(tags["max_latency_ratio"])
)
before = (
    Champion(
        tags["compared_to_version"],
        Scores(float(tags["champion_fid"]), float(tags["champion_sec_per_image"])),
        None if tags["champion_eval_protocol"] == "not recorded" else tags["champion_eval_protocol"],
    )
    if "compared_to_version" in tags
    else None
)
scores = Scores(float(tags["fid"]), float(tags["sec_per_image"]))
recomputed = gate_decision(scores, tags["eval_protocol"], before, limits)
print(f"v{newest.version}: recorded {tags['decision']!r} ({tags['decision_reason']})")
print(f"recomputed: {'champion' if recomputed.promote else 'challenger'!r} ({recomputed.reason})")
assert ("champion" if recomputed.promote else "challenger") == tags["decision"]
assert recomputed.reason == tags["decision_reason"]
if recomputed.promote:  # a promoted version holds the alias until a reviewer moves it
    assert aliases.get(str(newest.version)) == "champion" or str(newest.version) != str(challenger.version)

# %% [markdown]
# ## Promote or roll back (on a scratch copy of the store)
# The calls a reviewer makes on the real store are these two, nothing else: move the `champion` alias to
# the version to serve, or back to the previous one. Consumers that load `models:/<name>@champion` pick up
# the change on their next load.

# %%
assert tracking_uri.startswith("sqlite:///"), (
    "the scratch demo copies a SQLite store; on a server, make the same calls there"
)
scratch = Path(tempfile.mkdtemp()) / "mlflow.db"
shutil.copy(tracking_uri.removeprefix("sqlite:///"), scratch)
review = MlflowClient(tracking_uri=f"sqlite:///{scratch}", registry_uri=f"sqlite:///{scratch}")
review.set_registered_model_alias(name, "champion", challenger.version)  # promote the challenger
print("after promote:", review.get_model_version_by_alias(name, "champion").version)
review.set_registered_model_alias(name, "champion", champion.version)  # roll back
print("after roll-back:", review.get_model_version_by_alias(name, "champion").version)
assert (
    client.get_model_version_by_alias(name, "champion").version == champion.version
)  # the real store is untouched

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
# # Quickstart: images from the registered champion
#
# The registry holds every distilled student of a teacher as a version of `dd-<teacher>`; the alias
# `champion` points at the one that passed the promotion gate. Loading it needs MLflow and this
# package only: the model is an `mlflow.pyfunc` model that turns (class label, seed) pairs into images,
# and its `sampler` parameter picks another sampler of the same preset (the teacher itself, the
# 2-step student) for comparison.
#
# Runs on the project's own store (`DD_MLFLOW_TRACKING_URI`, default: `mlflow.db` in the project);
# `DD_ROOT` and `DD_PRESET` say which project and preset (defaults: this checkout, `micro`).

# %%
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from ddcore.params import load_preset
from ddcore.pipeline.layout import Layout
from ddcore.registry.store import load_model, model_name

ROOT = Path(os.environ.get("DD_ROOT", "..")).resolve()
PRESET = os.environ.get("DD_PRESET", "micro")
preset = load_preset(PRESET, ROOT / "params.yaml")
tracking_uri = Layout.create(PRESET, root=ROOT).tracking_uri
name = model_name(preset)
model = load_model(name, "champion", tracking_uri)
served = model.unwrap_python_model()  # the DDImageModel behind the pyfunc interface
print(f"{name}@champion: method {served.preset.method}, default sampler {served.default_sampler}")

# %% [markdown]
# ## Generate: the same classes and seeds through every sampler
# The input is a table with one row per image; the output is uint8 images (N, H, W, 3). The same seed gives
# the same noise to every sampler, so a column compares the samplers on one draw.

# %%
classes = list(range(min(8, served.preset.teacher.world.num_classes)))
request = pd.DataFrame({"label": classes, "seed": [100 + c for c in classes]})
samplers = [s for s in served.preset.eval.samplers if s != "onestep-baseline"]
images, timing = {}, []
for sampler in samplers:
    model.predict(request.iloc[:1], params={"sampler": sampler})  # warm-up: builds the sampler once
    t0 = time.perf_counter()
    images[sampler] = model.predict(request, params={"sampler": sampler})
    seconds = time.perf_counter() - t0
    timing.append({"sampler": sampler, "images": len(request), "sec_per_image": seconds / len(request)})
timing = pd.DataFrame(timing).set_index("sampler")
timing["speed-up vs teacher"] = timing.loc["teacher", "sec_per_image"] / timing["sec_per_image"]
timing

# %% [markdown]
# One call each, on this machine's CPU, batch of 8: the benchmark stage (`metrics/<preset>/bench.json`)
# is where speed is measured properly (warm-up, repeats, throughput batch).

# %%
fig, axes = plt.subplots(
    len(samplers), len(classes), figsize=(1.3 * len(classes), 1.4 * len(samplers)), squeeze=False
)
for r, sampler in enumerate(samplers):
    for c, label in enumerate(classes):
        ax = axes[r][c]
        ax.imshow(images[sampler][c])
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_title(f"class {label}", fontsize=8)
        if c == 0:
            ax.set_ylabel(sampler, fontsize=8)
fig.suptitle(f"{name}@champion: rows are samplers, columns are (class, seed)", fontsize=9)
fig.tight_layout()

# %%
assert all(img.shape == images["teacher"].shape for img in images.values())
assert str(images["teacher"].dtype) == "uint8"

"""The registered model: an `mlflow.pyfunc` model that turns class labels + seeds into images.

Its artifacts are the prepared teacher folder, the student folder and the resolved preset; its
`predict` builds the preset's samplers through the sampler factory, so a consumer needs MLflow
and this package but no knowledge of how DD sampling works (and nothing of the pipeline).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from ddcore.methods.registry import get_method
from ddcore.params import Preset


class DDImageModel(mlflow.pyfunc.PythonModel):
    """Class labels + seeds -> uint8 images (N, H, W, 3) from the distilled student.

    Artifacts: ``teacher`` (prepared teacher dir), ``student`` (student checkpoint dir), ``preset``
    (resolved preset JSON), and the method's `served` folders (DD2: the continuous-input teacher and
    the DSM model), which MLflow places beside ``student`` as the samplers expect. `params={"sampler": ...}` picks another sampler of the preset (e.g. the
    2-step one or the teacher itself, for comparison).
    """

    def load_context(self, context) -> None:
        from ddcore.samplers.registry import build_samplers
        from ddcore.teachers.loading import load_teacher

        meta = json.loads(Path(context.artifacts["preset"]).read_text())
        self.preset = Preset.model_validate(meta["preset"])
        self.default_sampler = meta["sampler"]
        self.teacher, _ = load_teacher(self.preset, Path(context.artifacts["teacher"]))
        self._student_dir = Path(context.artifacts["student"])
        self._samplers: dict[str, Any] = {}
        self._build = build_samplers

    def _sampler(self, name: str):
        if name not in self._samplers:
            (s,) = self._build([name], self.teacher, self._student_dir, self.preset)
            self._samplers[name] = s
        return self._samplers[name]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        import torch

        rows = model_input.to_dict("list") if hasattr(model_input, "to_dict") else dict(model_input)
        labels = [int(x) for x in rows["label"]]
        seeds = [int(x) for x in rows["seed"]]
        sampler = self._sampler((params or {}).get("sampler") or self.default_sampler)
        with torch.no_grad():
            img = sampler.images(torch.tensor(labels, dtype=torch.long), seeds)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def signature(image_size: int, default_sampler: str) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("long", "label"), ColSpec("long", "seed")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))]),
        params=ParamSchema([ParamSpec("sampler", "string", default_sampler)]),
    )


def requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ("torch", "numpy", "safetensors", "pydantic", "pydantic-settings", "pyyaml", "pandas", "ddcore")
    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={version(p)}")
        except Exception:
            out.append(p)
    return out


@contextlib.contextmanager
def model_artifacts(preset_name: str, preset: Preset, layout, sampler: str) -> Iterator[dict[str, str]]:
    """A staging folder with exactly what the model needs (checkpoints, configs, the preset)."""
    with tempfile.TemporaryDirectory(prefix="dd-model-") as tmp:
        t = Path(tmp)
        teacher = t / "teacher"
        info_file = layout.teacher_dir / "teacher.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        if info.get("kind") == "published":
            teacher.mkdir()
            for part in ("model", "tokenizer"):
                src = Path(info[part]["path"])
                _link_or_copy(src, teacher / src.name)
                info[part] = {**info[part], "path": src.name}  # relative: resolved against the folder
            (teacher / "teacher.json").write_text(json.dumps(info, indent=2))
        else:
            shutil.copytree(
                layout.teacher_dir, teacher, ignore=shutil.ignore_patterns("_stage.json", "*.tmp")
            )
        folders = {"student": layout.student_dir}
        for name in get_method(preset.method).served:  # what the method's other samplers read
            if (layout.student_dir.parent / name).is_dir():
                folders[name] = layout.student_dir.parent / name
        for name, src in folders.items():
            (t / name).mkdir()
            for f in sorted(src.iterdir()):  # weights + configs; no training state, no logs
                if f.is_file() and f.suffix in (".safetensors", ".json") and f.name != "_stage.json":
                    _link_or_copy(f, t / name / f.name)
        meta = t / "preset.json"
        meta.write_text(
            json.dumps(
                {"preset_name": preset_name, "sampler": sampler, "preset": preset.model_dump(mode="json")}
            )
        )
        yield {"teacher": str(teacher), "preset": str(meta)} | {name: str(t / name) for name in folders}


def model_code(folder: Path) -> str:
    """MLflow "models from code": the logged model is this 3-line file naming `DDImageModel`, so
    loading it imports our class instead of unpickling an object."""
    code = folder / "dd_image_model.py"
    code.write_text(
        '"""Distilled Decoding image model: labels + seeds -> uint8 images (see ddcore.registry)."""\n'
        "from mlflow.models import set_model\n\n"
        "from ddcore.registry.serving import DDImageModel\n\n"
        "set_model(DDImageModel())\n"
    )
    return str(code)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def image_size(preset: Preset) -> int:
    if preset.teacher.world is not None:
        return preset.teacher.world.image_size
    from ddcore.sources import get_checkpoint
    from ddcore.teachers.registry import get_family

    get_family(preset.family)  # its package registered the family's checkpoints
    return int(get_checkpoint(preset.teacher.name).image_size or 256)

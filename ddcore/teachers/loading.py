"""A prepared teacher folder -> a `Teacher`, for any registered family.

`prepare` (the pipeline) writes `teacher.json` into the folder: for a tiny world the world's own
files sit beside it, for a published teacher it records the resolved checkpoint files and their
sha256. The pipeline, the pyfunc model served from the MLflow registry and the CLI all load
through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ddcore.hashing import sha256_file
from ddcore.params import Preset
from ddcore.retry import with_retries
from ddcore.settings import get_settings
from ddcore.sources import SourceError, resolve_source
from ddcore.teachers.base import Teacher
from ddcore.teachers.registry import get_family

TEACHER_INFO = "teacher.json"


def default_device() -> str:
    """The settings' device; under torchrun, each process's own GPU."""
    dev = get_settings().resolve_device()
    if dev == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return dev


def load_teacher(preset: Preset, teacher_dir: Path, device: str | None = None) -> tuple[Teacher, Any]:
    """The prepared teacher (plus the tiny world's evaluator network, else None)."""
    device = device or default_device()
    family = get_family(preset.family)
    if family.is_tiny(preset.teacher.name):
        teacher, evaluator = family.tiny.load(teacher_dir, device)
        return _to(teacher, device), _to(evaluator, device)
    info = json.loads((teacher_dir / TEACHER_INFO).read_text())

    def path(part: str) -> str:
        """Relative paths (a registered model's copy) live next to teacher.json; an absolute path
        from another machine's cache is re-resolved from the source and re-verified."""
        p = Path(info[part]["path"])
        p = p if p.is_absolute() else teacher_dir / p
        if not p.is_file():
            p = Path(with_retries(lambda: resolve_source(info[part]["source"]), f"resolving {part}"))
            if sha256_file(p) != info[part]["sha256"]:
                raise SourceError(
                    f"{p}: sha256 differs from the one recorded in {teacher_dir}/{TEACHER_INFO}"
                )
        return str(p)

    return family.load_published(preset.teacher.name, path("model"), path("tokenizer"), device), None


def _to(obj, device: str):
    return obj.to(device) if obj is not None and hasattr(obj, "to") else obj

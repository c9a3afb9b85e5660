"""Which DD1 student a teacher family gets: built from the teacher, or re-loaded from disk.

Training, sampling and evaluation only see the family-agnostic student interface
(`StudentReadout`: `forward(x, labels, t, with_cont)`, `data_len(t)`, `num_steps`, the read-outs),
so adding a family means one entry here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ddcore.checkpoints import load_model_config, load_safetensors_model
from ddcore.dd1.student import DD1Student
from ddcore.dd1.trajectories import teacher_fingerprint
from ddcore.dd1.var_student import DD1VARStudent
from ddcore.models.llamagen import GPTConfig
from ddcore.models.var import VARConfig
from ddcore.teachers.base import Teacher

__all__ = ["STUDENT", "load_student", "new_student", "student_families"]

STUDENT = "student"

# family -> (student class, its config class, the teacher attribute holding the network)
_FAMILIES: dict[str, tuple[type[nn.Module], type, str]] = {
    "llamagen": (DD1Student, GPTConfig, "gpt"),
    "var": (DD1VARStudent, VARConfig, "var"),
}


def student_families() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def _family(name: str) -> tuple[type[nn.Module], type, str]:
    if name not in _FAMILIES:
        raise NotImplementedError(
            f"no DD1 student for teacher family {name!r}; implemented: {', '.join(_FAMILIES)}"
        )
    return _FAMILIES[name]


def new_student(teacher: Teacher, extra_layers: int = 0) -> nn.Module:
    """A student initialised from the teacher's network, with `extra_layers` more blocks than it
    (identity-initialised; 0 = the released layout). New layers are drawn from the global RNG."""
    cls, _, attr = _family(teacher.family)
    codebook = teacher.codebook.detach().float().cpu()
    return cls.from_teacher(getattr(teacher, attr), codebook, extra_layers)


def load_student(student_dir: str | os.PathLike, teacher: Teacher, device=None) -> tuple[nn.Module, dict]:
    """The saved (EMA) student of `student_dir` and its student.json, checked against `teacher`."""
    d = Path(student_dir)
    meta = load_model_config(d / STUDENT)
    family = meta.get("teacher_family", "llamagen")
    if family != teacher.family:
        raise ValueError(f"{d}: the student belongs to a {family} teacher, not to a {teacher.family} one")
    fp = meta.get("teacher_fingerprint")
    if fp is not None and fp != teacher_fingerprint(teacher):
        raise ValueError(f"{d}: student was distilled from teacher {fp}, not from the one given")
    cls, cfg_cls, _ = _family(family)
    cfg = cfg_cls.from_dict(meta["config"])
    with torch.device("meta"):
        student = cls(cfg, torch.empty(cfg.vocab_size, teacher.token_dim))
    load_safetensors_model(d / STUDENT, student, what=f"DD1 {family} student in {d}", assign=True)
    student.attach_codebook(teacher.codebook)
    return student.to(device or teacher.device).eval(), meta

"""Which DD1 student a teacher family gets: built from the teacher, or re-loaded from disk.

Training, sampling and evaluation only see the family-agnostic student interface
(`StudentReadout`: `forward(x, labels, t, with_cont)`, `data_len(t)`, `num_steps`, the read-outs),
so a family needs one `StudentSpec` here (`register_student_family` adds one from outside).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ddcore.checkpoints import load_model_config, load_safetensors_model
from ddcore.methods.dd1.student import DD1Student
from ddcore.methods.dd1.var_student import DD1VARStudent
from ddcore.models.llamagen import GPTConfig
from ddcore.models.var import VARConfig
from ddcore.teachers.base import Teacher, teacher_fingerprint
from ddcore.teachers.llamagen.catalogue import suggest_llamagen
from ddcore.teachers.var.catalogue import suggest_var

__all__ = [
    "STUDENT",
    "StudentSpec",
    "load_student",
    "new_student",
    "register_student_family",
    "student_spec",
    "unregister_student_family",
]

STUDENT = "student"


@dataclass(frozen=True)
class StudentSpec:
    """A family's DD1 student: its class (`from_teacher(net, codebook, extra_layers)`, `(cfg,
    codebook)`), its config class, the teacher attribute holding the network, checkpoint hints,
    and DD1's released (t2, split_t) for a published architecture (the benchmark's random cases)."""

    cls: type[nn.Module]
    config_cls: type
    network: str
    released: Callable[[Teacher, int], tuple[int, int]]
    suggest: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], list[str]] | None = None


# DD1's released settings: LlamaGen split_t by model width (B 80, L 130), t2 = 80 tokens;
# VAR (t2, split_t) in scales by depth (d16: 5, 5; d20 / d24: 4, 4)
_LLAMAGEN_SPLIT = {768: 80, 1024: 130}
_VAR_T2_SPLIT = {16: (5, 5), 20: (4, 4), 24: (4, 4)}

_SPECS: dict[str, StudentSpec] = {
    "llamagen": StudentSpec(
        DD1Student,
        GPTConfig,
        "gpt",
        lambda teacher, steps: (min(80, steps - 1), _LLAMAGEN_SPLIT.get(teacher.gpt.cfg.dim, steps)),
        suggest_llamagen,
    ),
    "var": StudentSpec(
        DD1VARStudent,
        VARConfig,
        "var",
        lambda teacher, steps: _VAR_T2_SPLIT.get(teacher.var.cfg.depth, (steps // 2, steps)),
        suggest_var,
    ),
}


def register_student_family(family: str, spec: StudentSpec, replace: bool = False) -> None:
    if family in _SPECS and not replace and _SPECS[family] != spec:
        raise ValueError(f"a DD1 student for family {family!r} is already registered")
    _SPECS[family] = spec


def unregister_student_family(family: str) -> None:
    if family in ("llamagen", "var"):
        raise ValueError(f"{family!r} is a built-in family")
    _SPECS.pop(family, None)


def student_spec(family: str) -> StudentSpec:
    if family not in _SPECS:
        raise NotImplementedError(
            f"no DD1 student for teacher family {family!r}; implemented: {', '.join(_SPECS)}"
        )
    return _SPECS[family]


def new_student(teacher: Teacher, extra_layers: int = 0) -> nn.Module:
    """A student initialised from the teacher's network, with `extra_layers` more blocks than it
    (identity-initialised; 0 = the released layout). New layers are drawn from the global RNG."""
    spec = student_spec(teacher.family)
    codebook = teacher.codebook.detach().float().cpu()
    return spec.cls.from_teacher(getattr(teacher, spec.network), codebook, extra_layers)


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
    spec = student_spec(family)
    cfg = spec.config_cls.from_dict(meta["config"])
    with torch.device("meta"):
        student = spec.cls(cfg, torch.empty(cfg.vocab_size, teacher.token_dim))
    what = f"DD1 {family} student in {d}"
    load_safetensors_model(d / STUDENT, student, what=what, suggest=spec.suggest, assign=True)
    student.attach_codebook(teacher.codebook)
    return student.to(device or teacher.device).eval(), meta

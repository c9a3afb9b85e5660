"""A preset resolved for work: params.yaml + `--set` overrides, validated, then checked against
the registered families (family and teacher name) and methods, so a bad value fails before any
work starts with the key path and what is allowed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ddcore.params import ParamsError, Preset, deep_merge, load_preset, parse_override
from ddcore.teachers.registry import UnknownFamily, family_names, get_family


def check_registered(name: str, preset: Preset) -> Preset:
    """The family exists, knows the teacher name, and accepts the sampling."""
    where = f"params.yaml: preset {name!r} is invalid:\n"
    try:
        family = get_family(preset.family)
    except UnknownFamily:
        raise ParamsError(
            f"{where}  presets.{name}.family: unknown family {preset.family!r}; allowed: {', '.join(family_names())}"
        ) from None
    if preset.teacher.name not in family.teachers:
        raise ParamsError(
            f"{where}  presets.{name}.teacher.name: unknown {family.name} teacher {preset.teacher.name!r}; "
            f"allowed: {', '.join(family.teachers)}"
        )
    if family.check_sampling is not None:
        try:
            family.check_sampling(preset.teacher.sampling)
        except ValueError as e:
            raise ParamsError(f"{where}  presets.{name}.teacher.sampling: {e}") from None
    return preset


def resolve_preset(name: str, overrides: Sequence[str], params_file: Path) -> Preset:
    """Validate preset + overrides before any work starts (ParamsError names the key path)."""
    merged: dict = {}
    for o in overrides:
        merged = deep_merge(merged, parse_override(o))
    return check_registered(name, load_preset(name, params_file, overrides=merged or None))

"""The teacher families ddcore knows: one registration line per family.

Adding a family is one package under `ddcore/teachers/` plus one line in `_BUILTIN` (or a
`register_family` call from outside the package, as the tests do with a toy family).
"""

from __future__ import annotations

from ddcore.teachers.family import Family
from ddcore.teachers.llamagen.family import LLAMAGEN
from ddcore.teachers.var.family import VAR

_BUILTIN = (LLAMAGEN, VAR)
_FAMILIES: dict[str, Family] = {f.name: f for f in _BUILTIN}


class UnknownFamily(ValueError):
    """A family name no registration provides."""


def register_family(family: Family, replace: bool = False) -> Family:
    """Make `family` available by name to presets, the pipeline, the registry and the benchmark."""
    if family.name in _FAMILIES and not replace and _FAMILIES[family.name] is not family:
        raise ValueError(f"teacher family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    if any(f.name == name for f in _BUILTIN):
        raise ValueError(f"{name!r} is a built-in family")
    _FAMILIES.pop(name, None)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise UnknownFamily(f"unknown teacher family {name!r}; registered: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def family_names() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def random_case_family(case: str) -> Family | None:
    """The family whose random-weight bench case is `case`, or None."""
    return next((f for f in _FAMILIES.values() if case in f.random_cases), None)


def random_case_names() -> tuple[str, ...]:
    return tuple(c for f in _FAMILIES.values() for c in f.random_cases)

"""The distillation methods ddcore knows: one registration line per method."""

from __future__ import annotations

from ddcore.methods.base import Method
from ddcore.methods.dd1.method import DD1
from ddcore.methods.dd2.method import DD2

_METHODS: dict[str, Method] = {m.name: m for m in (DD1, DD2)}


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def all_methods() -> tuple[Method, ...]:
    return tuple(_METHODS.values())

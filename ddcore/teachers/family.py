"""What a teacher family provides, as one record: the pipeline, the registry and the benchmark
ask a `Family` instead of branching on family names.

A family is one package under `ddcore/teachers/` (its teacher, checkpoint catalogue and tiny world)
whose `family` module builds a `Family`; `ddcore.teachers.registry` registers it. Methods keep
their own per-family parts (a DD1 student per family: `ddcore.methods.dd1.students`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddcore.params import SamplingParams, TinyWorldParams
from ddcore.teachers.base import Teacher


@dataclass(frozen=True)
class TinyWorld:
    """The family's offline world: built here, judged by its own evaluator network."""

    teachers: tuple[str, ...]  # teacher names that are tiny worlds of this family
    # (world params, out dir, progress, the teacher's sampling, device) -> report
    prepare: Callable[[TinyWorldParams, Path, bool, SamplingParams, str], dict]
    check: Callable[[dict, TinyWorldParams], list[str]]  # report -> problems (empty: it passes)
    load: Callable[[Path, str], tuple[Teacher, Any]]  # (teacher, evaluator network)


@dataclass(frozen=True)
class Family:
    name: str
    published: tuple[str, ...]  # catalogue names of the published teachers
    # (teacher name, model file, tokenizer file, device) -> Teacher
    load_published: Callable[[str, str, str, str], Teacher] | None = None
    default_tokenizer: str | None = None  # catalogue name, when a teacher's entry names none
    tiny: TinyWorld | None = None
    # bench case -> (device -> a published architecture with random weights)
    random_cases: Mapping[str, Callable[[str], Teacher]] = field(default_factory=dict)
    bench_sampling: SamplingParams = SamplingParams()  # the sampling random cases are timed with
    check_sampling: Callable[[SamplingParams], None] | None = None  # raises ValueError when unsupported

    @property
    def teachers(self) -> tuple[str, ...]:
        return self.published + (self.tiny.teachers if self.tiny else ())

    def is_tiny(self, teacher_name: str) -> bool:
        return self.tiny is not None and teacher_name in self.tiny.teachers

"""What a distillation method provides, as one record: its stages, its samplers, its headline.

The pipeline runs `prepare`, then the method's own stages in order, then the method-agnostic
`evaluate`, `bench` and `register`; the sampler factory adds the method's samplers to the
common ones. A method is one package under `ddcore/methods/` whose `method` module builds its
`Method`; `ddcore.methods.registry` registers it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ddcore.samplers.base import ImageSampler, SamplerSpec


@dataclass(frozen=True)
class StageSpec:
    """One stage of a method: `run(preset_name, preset, layout, progress=..., **kw) -> result`.

    `reads` are the preset keys (dotted) its output depends on, `after` the stages whose outputs
    it reads, `output(layout)` the folder it writes (its completion marker lives there)."""

    name: str
    run: Callable[..., dict]
    reads: tuple[str, ...]
    after: tuple[str, ...]
    output: Callable[[Any], Any]
    help: str = ""
    # the shard ids a worker may make separately (the flow runs them in parallel), or None
    shards: Callable[[Any], list[int]] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    title: str  # how the registry describes a version: "DD1 student"
    stages: tuple[StageSpec, ...]  # between prepare and evaluate, in order; the last writes the student
    samplers: tuple[SamplerSpec, ...]
    headline_prefix: str  # default headline: the first evaluated sampler named with this prefix
    # bench.json `extra`: (preset, teacher, layout) -> {name: callable returning a dict}
    bench_extra: Callable[[Any, Any, Any], Mapping[str, Callable[[], dict]]] | None = None
    bench_reads: tuple[str, ...] = ()  # preset keys `bench_extra` reads
    # students for the benchmark's random-weight cases: teacher -> samplers
    random_students: Callable[[Any], Sequence[ImageSampler]] | None = None
    # model folders beside the student (models/<preset>/<name>) that its samplers read: they are
    # registered with the model, as siblings of its student folder
    served: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    def headline(self, samplers: Sequence[str], explicit: str | None = None) -> str:
        """The sampler a registered model stands for: `eval.headline`, else the first of the
        method's samplers in `eval.samplers`."""
        if explicit is not None:
            return explicit
        for name in samplers:
            if name.startswith(self.headline_prefix):
                return name
        raise ValueError(f"eval.samplers {list(samplers)} has no {self.name} sampler to register")

    @property
    def sampler_reads(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for s in self.samplers for k in s.reads))

"""DD1 few-step samplers (ImageSampler implementations) and their names (`SAMPLERS`, the specs the
sampler factory `ddcore.samplers.registry` matches).

All samplers draw each image's noise eps (L, d) from its seed (rounded to fp16, as in the
trajectory data), so a DD1 sample and the flow-map teacher sample with the same seed are the
two ends of the same trajectory.

* `dd1-1step`: X_0 = eps -> one student pass.
* `dd1-2step`: one pass, keep the first t2 predicted tokens, put the *same* eps back into the
  other positions (X_t2), second pass.
* `dd1-teacher-<n>-<m>` (DD1's "pre-trained-(n+1)-(m+1)"): one student pass; snap its first n
  tokens to the codebook; the teacher regenerates AR steps n..m-1 from that prefix with the
  same noise through the flow chooser; a student pass from X_m. n = 0 skips the first pass.
t2, n, m and split_t count the teacher's AR steps: tokens for LlamaGen, whole scales for VAR
(the student's `data_len` turns them into positions), so the same names work for both families.
* `teacher-flow`: the teacher with the flow chooser (the distillation target itself).
The student runs one forward pass per step, without a CFG pass (guidance is in the data).
`steps` counts sequential network evaluations; for the teacher-assisted sampler the prefix is
counted as one (parallel) evaluation, as in DD1's step counts.

Decoding: positions before split_t decode codebook[argmax logits]; the later ones decode the
continuous outputs directly (VQ decoder without quantisation). `tokens()` returns argmax
indices before split_t and the nearest codebook entry of the continuous output after it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from ddcore.methods.dd1.flowmap import FlowChooser, FlowSolver
from ddcore.methods.dd1.student import StudentReadout
from ddcore.methods.dd1.students import load_student, new_student, student_spec
from ddcore.methods.dd1.trajectories import build_xt
from ddcore.params import FlowParams, SamplingParams
from ddcore.samplers.base import SamplerContext, SamplerSpec, TeacherSampler, compiled_variant
from ddcore.teachers.base import Teacher

__all__ = ["DD1Sampler", "DD1TeacherAssistedSampler", "FlowTeacherSampler", "SAMPLERS", "random_students"]


def _noise(teacher: Teacher, seeds: Sequence[int]) -> Tensor:
    return teacher.noise(seeds).half().float()


class _StudentSteps:
    """Shared student read-out: one DD step from X_t and the final decode."""

    student: StudentReadout
    teacher: Teacher
    split_t: int

    def _dd_step(self, x: Tensor, labels: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """(vectors (B, L, d), tokens (B, L)) of one student pass from X_t."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return self.student.predict_vectors(x, labels.to(x.device), tt, self.split_t)

    def _tokens_of(self, vec: Tensor, tok: Tensor) -> Tensor:
        use_tok = self.student.data_mask(self.split_t, vec.shape[0], vec.device)
        if bool(use_tok.all()):
            return tok
        return torch.where(use_tok, tok, self.student.nearest_indices(vec))

    def _run(self, labels: Tensor, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def tokens(self, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        vec, tok = self._run(labels, seeds)
        return self._tokens_of(vec, tok)

    @torch.no_grad()
    def images(self, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        vec, _ = self._run(labels, seeds)
        return self.teacher.decode_vectors(vec)

    @torch.no_grad()
    def tokens_and_images(self, labels: Tensor, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Both from one sampling run (evaluation asks for both)."""
        vec, tok = self._run(labels, seeds)
        return self._tokens_of(vec, tok), self.teacher.decode_vectors(vec)

    @property
    def compiled(self):
        """`sampler.compiled()`: this sampler over the compiled teacher (its decode steps and VQ
        decoder) with the student's forward pass compiled; see `compiled_variant`."""
        return compiled_variant(
            self, lambda twin: setattr(twin, "student", self.student.with_compiled_forward())
        )


class DD1Sampler(_StudentSteps):
    """1-step (X_0 -> X_L) or 2-step (X_0 -> keep the first t2 steps' tokens -> X_t2 with the same
    noise -> X_L). t2 and split_t count the teacher's AR steps (tokens for LlamaGen, scales for VAR)."""

    def __init__(
        self,
        student: StudentReadout,
        teacher: Teacher,
        mode: str = "1step",
        t2: int | None = None,
        split_t: int | None = None,
        name: str | None = None,
    ):
        if mode not in ("1step", "2step"):
            raise ValueError(f"mode {mode!r}: allowed '1step', '2step'")
        if mode == "2step" and (t2 is None or not 0 < t2 < student.num_steps):
            raise ValueError(f"2-step sampling needs 0 < t2 < {student.num_steps}, got {t2}")
        self.student = student.to(teacher.device).eval()
        self.teacher, self.mode, self.t2 = teacher, mode, t2
        self.split_t = student.num_steps if split_t is None else int(split_t)
        self.name = name or f"dd1-{mode}"
        self.steps = 1 if mode == "1step" else 2

    def _run(self, labels: Tensor, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        eps = _noise(self.teacher, seeds)
        vec, tok = self._dd_step(eps, labels, 0)
        if self.mode == "2step":
            is_data = self.student.data_mask(self.t2, eps.shape[0], eps.device)[..., None]
            vec, tok = self._dd_step(torch.where(is_data, vec, eps), labels, self.t2)
        return vec, tok


class DD1TeacherAssistedSampler(_StudentSteps):
    """DD step -> snap the first n steps' tokens -> the teacher (flow chooser, same noise) runs AR
    steps n..m-1 -> DD step from X_m. n and m count AR steps (tokens for LlamaGen, scales for VAR)."""

    def __init__(
        self,
        student: StudentReadout,
        teacher: Teacher,
        teacher_start_t: int,
        t2: int,
        sampling_params: SamplingParams,
        flow_params: FlowParams | None = None,
        split_t: int | None = None,
        name: str | None = None,
    ):
        S = student.num_steps
        if not 0 <= teacher_start_t < t2 <= S:
            raise ValueError(f"need 0 <= teacher_start_t < t2 <= {S}, got {teacher_start_t}, {t2}")
        self.student = student.to(teacher.device).eval()
        self.teacher, self.n, self.m, self.params = teacher, int(teacher_start_t), int(t2), sampling_params
        # the same boundaries in positions (VAR: whole scales)
        self.n_pos, self.m_pos = int(student.data_len(self.n)), int(student.data_len(self.m))
        self.chooser = FlowChooser(teacher.codebook, FlowSolver.from_params(flow_params or FlowParams()))
        self.split_t = S if split_t is None else int(split_t)
        self.name = name or f"dd1-teacher-{self.n}-{self.m}"
        self.steps = int(self.n > 0) + (self.m - self.n) + int(self.m < S)

    def _run(self, labels: Tensor, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        eps = _noise(self.teacher, seeds)
        prefix = None
        if self.n > 0:
            vec, tok = self._dd_step(eps, labels, 0)
            prefix = self._tokens_of(vec, tok)[:, : self.n_pos]  # snap to the codebook
        gen = self.teacher.generate(
            labels, self.params, eps, chooser=self.chooser, prefix=prefix, stop=self.m_pos
        )
        if self.m_pos == eps.shape[1]:
            return self.teacher.codebook[gen], gen
        x = build_xt(eps, gen.clamp_min(0), self.m_pos, self.teacher.codebook)
        return self._dd_step(x, labels, self.m)


class FlowTeacherSampler(TeacherSampler):
    """The teacher with the DD1 flow chooser: what the student is trained to reproduce."""

    def __init__(self, teacher: Teacher, params: SamplingParams, flow_params: FlowParams | None = None):
        super().__init__(teacher, params, name="teacher-flow")
        self.chooser = FlowChooser(teacher.codebook, FlowSolver.from_params(flow_params or FlowParams()))

    @torch.no_grad()
    def tokens(self, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        return self.teacher.generate(labels, self.params, _noise(self.teacher, seeds), chooser=self.chooser)

    @torch.no_grad()
    def tokens_and_images(self, labels: Tensor, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        tok = self.tokens(labels, seeds)
        return tok, self.teacher.decode(tok)


def _student(ctx: SamplerContext) -> tuple[StudentReadout, dict]:
    """The preset's trained student, loaded once per context."""
    if "dd1-student" not in ctx.cache:
        ctx.cache["dd1-student"] = load_student(ctx.student_dir, ctx.teacher, device=ctx.teacher.device)
    return ctx.cache["dd1-student"]


def _few_step(m: re.Match, ctx: SamplerContext) -> DD1Sampler:
    s, meta = _student(ctx)
    t_list, mode = meta["t_list"], m.group(1)
    if mode == "2step" and len(t_list) < 2:
        raise ValueError(
            f"{m.group(0)}: the student was trained with t_list {t_list}; 2-step needs a second t"
        )
    return DD1Sampler(
        s, ctx.teacher, mode, t2=t_list[1] if mode == "2step" else None, split_t=meta["split_t"]
    )


def _teacher_assisted(m: re.Match, ctx: SamplerContext) -> DD1TeacherAssistedSampler:
    s, meta = _student(ctx)
    p = ctx.preset
    return DD1TeacherAssistedSampler(
        s, ctx.teacher, int(m.group(1)), int(m.group(2)), p.teacher.sampling, p.dd1.flow, meta["split_t"]
    )


SAMPLERS = (
    SamplerSpec(
        "teacher-flow",
        "teacher-flow",
        lambda m, c: FlowTeacherSampler(c.teacher, c.preset.teacher.sampling, c.preset.dd1.flow),
        reads=("dd1.flow",),
    ),
    SamplerSpec("dd1-(1step)", "dd1-1step", _few_step),
    SamplerSpec("dd1-(2step)", "dd1-2step", _few_step),
    SamplerSpec(r"dd1-teacher-(\d+)-(\d+)", "dd1-teacher-<n>-<m>", _teacher_assisted, reads=("dd1.flow",)),
)


def random_students(teacher: Teacher) -> list:
    """DD1 1-step and 2-step samplers with a student initialised from a (random-weight) published
    architecture, at DD1's released (t2, split_t) for it: what the benchmark times."""
    student = new_student(teacher)
    t2, split = student_spec(teacher.family).released(teacher, student.num_steps)
    return [
        DD1Sampler(student, teacher, "1step", split_t=split),
        DD1Sampler(student, teacher, "2step", t2=t2, split_t=split),
    ]

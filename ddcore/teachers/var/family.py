"""The VAR family (next-scale, 10 steps for the published c2i models) as one `Family` record."""

from __future__ import annotations

from pathlib import Path

import torch

from ddcore.params import SamplingParams, TinyWorldParams
from ddcore.teachers.base import Teacher
from ddcore.teachers.family import Family, TinyWorld
from ddcore.teachers.var.catalogue import PUBLISHED_TEACHERS, VAR_VQVAE_NAME
from ddcore.teachers.var.teacher import VARTeacher, check_var_sampling, load_var_teacher
from ddcore.teachers.var.tiny_world import check_var_quality, load_tiny_var_world, prepare_tiny_var_world


def _load_published(name: str, model_file: str, tokenizer_file: str, device: str) -> Teacher:
    return load_var_teacher(name, source=model_file, vq_source=tokenizer_file, device=device)


def _prepare_tiny(
    world: TinyWorldParams, out: Path, progress: bool, sampling: SamplingParams, device: str
) -> dict:
    return prepare_tiny_var_world(world, out, progress=progress, device=device, sampling=sampling)


def _random(arch: str):
    def build(device: str) -> Teacher:
        from ddcore.models.var import VAR, var_config
        from ddcore.models.var_vqvae import VQVAE, VQVAEConfig

        torch.manual_seed(0)
        return VARTeacher(VAR(var_config(arch)).eval(), VQVAE(VQVAEConfig()).eval()).to(device)

    return build


VAR = Family(
    name="var",
    published=PUBLISHED_TEACHERS,
    load_published=_load_published,
    default_tokenizer=VAR_VQVAE_NAME,
    tiny=TinyWorld(
        teachers=("tiny-var", "micro-var"),
        prepare=_prepare_tiny,
        check=check_var_quality,
        load=load_tiny_var_world,
    ),
    random_cases={"var-d16-random": _random("var-d16")},
    # what DD1 distils: VAR's cfg 2.0 (w 3.0) ramped over scales, top-k 900, top-p 0.95
    bench_sampling=SamplingParams(cfg_scale=3.0, top_k=900, top_p=0.95),
    check_sampling=check_var_sampling,
)

"""The LlamaGen family (next-token, 256 steps for the published c2i models) as one `Family` record."""

from __future__ import annotations

from pathlib import Path

import torch

from ddcore.params import SamplingParams, TinyWorldParams
from ddcore.teachers.base import Teacher
from ddcore.teachers.family import Family, TinyWorld
from ddcore.teachers.llamagen.catalogue import DEFAULT_TOKENIZER, PUBLISHED_TEACHERS
from ddcore.teachers.llamagen.teacher import LlamaGenTeacher, load_llamagen_teacher
from ddcore.teachers.llamagen.tiny_world import check_quality, load_tiny_world, prepare_tiny_world


def _load_published(name: str, model_file: str, tokenizer_file: str, device: str) -> Teacher:
    return load_llamagen_teacher(name, vq_path=tokenizer_file, source=model_file, device=device)


def _prepare_tiny(
    world: TinyWorldParams, out: Path, progress: bool, sampling: SamplingParams, device: str
) -> dict:
    return prepare_tiny_world(world, out, progress=progress, sampling=sampling)  # builds on the CPU


def _random(arch: str):
    def build(device: str) -> Teacher:
        from ddcore.models.llamagen import GPT, gpt_config
        from ddcore.models.vq import VQ_CONFIGS, VQModel

        torch.manual_seed(0)
        gpt = GPT(gpt_config(arch)).eval()
        vq = VQModel(VQ_CONFIGS["VQ-16"]).eval()
        return LlamaGenTeacher(gpt, vq, num_classes=1000, image_size=256).to(device)

    return build


LLAMAGEN = Family(
    name="llamagen",
    published=PUBLISHED_TEACHERS,
    load_published=_load_published,
    default_tokenizer=DEFAULT_TOKENIZER,
    tiny=TinyWorld(
        teachers=("tiny", "micro"), prepare=_prepare_tiny, check=check_quality, load=load_tiny_world
    ),
    random_cases={"llamagen-b-random": _random("GPT-B"), "llamagen-l-random": _random("GPT-L")},
    bench_sampling=SamplingParams(cfg_scale=2.0, top_k=8000),  # what DD1 distils: cfg 2.0, top-k 8000
)

"""A third teacher family that lives outside `ddcore/`: the exact-marginal Markov teacher as a
"tiny world", registered with one call (`register`). It proves that a family is one folder plus
one registration: the pipeline, the samplers and the DD1 method run it without any edit to ddcore.

The world: a Markov chain over 16 positions and 8 codes (`dd1_toy.MarkovTeacher`), whose
"images" are the decoded 2 x 16 strips; a fixed random evaluator network judges them; the FID
reference is 256 exact teacher samples written at prepare time. The DD1 student is the LlamaGen
DD1 student architecture, initialised from a small GPT the teacher carries for that purpose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from dd1_toy import MarkovTeacher
from torch import Tensor, nn

from ddcore.checkpoints import atomic_path, load_safetensors_model, save_model
from ddcore.methods.dd1.student import DD1Student
from ddcore.methods.dd1.students import StudentSpec, register_student_family, unregister_student_family
from ddcore.models.llamagen import GPT, GPTConfig
from ddcore.params import SamplingParams, TinyWorldParams
from ddcore.teachers.family import Family, TinyWorld
from ddcore.teachers.registry import register_family, unregister_family

FAMILY = "toy"
SEQ_LEN, VOCAB, DIM, CLASSES = 16, 8, 4, 3
REFERENCE = "reference.npz"


class ToyTeacher(MarkovTeacher):
    family = FAMILY

    def __init__(self, seed: int = 0):
        super().__init__(seq_len=SEQ_LEN, vocab=VOCAB, dim=DIM, num_classes=CLASSES, seed=seed)
        torch.manual_seed(seed)
        cfg = GPTConfig(
            dim=32, n_layer=1, n_head=2, multiple_of=16, vocab_size=VOCAB, num_classes=CLASSES,
            block_size=SEQ_LEN, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
        )  # fmt: skip
        self.gpt = GPT(cfg).eval()  # the network the DD1 student starts from

    def tensors(self) -> dict[str, Tensor]:
        return {"A": self.A, "T": self.T, "B": self.B, "codebook": self._codebook}


class ToyEvaluator(nn.Module):
    """Fixed random features of the strips and a linear head over the classes."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed + 1)
        self.register_buffer("proj", torch.randn(2 * SEQ_LEN, 8, generator=g))
        self.head = nn.Linear(8, CLASSES)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(CLASSES, 8, generator=g))
            self.head.bias.zero_()

    def features(self, images: Tensor) -> Tensor:
        return images.float().mean(1).flatten(1) @ self.proj

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def prepare(world: TinyWorldParams, out: Path, progress: bool, sampling: SamplingParams, device: str) -> dict:
    teacher = ToyTeacher(world.seed)
    save_model(out / "markov", teacher.tensors(), {"seed": world.seed})
    save_model(out / "gpt", teacher.gpt, {"seed": world.seed})
    n = 256
    labels = torch.arange(n) % CLASSES
    tokens = teacher.sample(labels, [10_000 + i for i in range(n)], sampling)
    images = (teacher.decode(tokens).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with atomic_path(out / REFERENCE) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images)
    return {"kind": FAMILY, "reference_images": n, "sampling": sampling.model_dump()}


def load(out: Path, device: str) -> tuple[ToyTeacher, ToyEvaluator]:
    from ddcore.checkpoints import load_state_dict_file

    seed = int(__import__("json").loads((out / "markov.json").read_text())["seed"])
    teacher = ToyTeacher(seed)
    saved = load_state_dict_file(out / "markov.safetensors")
    teacher.A, teacher.T, teacher.B, teacher._codebook = saved["A"], saved["T"], saved["B"], saved["codebook"]
    load_safetensors_model(out / "gpt", teacher.gpt, what="toy GPT")
    return teacher, ToyEvaluator(seed).eval()


TOY = Family(
    name=FAMILY,
    published=(),
    tiny=TinyWorld(teachers=("toy",), prepare=prepare, check=lambda report, world: [], load=load),
)
TOY_STUDENT = StudentSpec(DD1Student, GPTConfig, "gpt", released=lambda teacher, steps: (steps // 2, steps))


def register() -> None:
    """The one registration: the family, and the DD1 student it distils into."""
    register_family(TOY)
    register_student_family(FAMILY, TOY_STUDENT)


def unregister() -> None:
    unregister_family(FAMILY)
    unregister_student_family(FAMILY)

"""The family-agnostic teacher interface.

An image AR teacher is, for distillation purposes, two things:
  1. given a class label and a data prefix, the probability vectors of the next position(s);
  2. a decoder from token indices (or continuous token vectors) to images.
LlamaGen produces one position per step (256 steps); VAR produces a whole scale per step
(1, 4, 9, ... positions). `step_sizes` says how many positions each AR step emits, and every
method below speaks in flattened positions 0..seq_len-1, so DD code never needs to know which
family it distils.

Sampling is written once, here: `generate` walks the AR steps and asks a TokenChooser to turn
each step's probability vectors plus that step's noise into indices. The multinomial chooser is
the teacher's own sampler; the DD1 flow chooser replaces only that draw.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from ddcore.hashing import update_with_tensor
from ddcore.params import SamplingParams
from ddcore.sampling import MultinomialChooser, TokenChooser, sample_noise


class StepState:
    """Family-specific incremental decoding state (e.g. a KV cache). Opaque to shared code."""


class Teacher(ABC):
    family: str
    num_classes: int
    image_size: int

    # --- structure -------------------------------------------------------------------------
    @property
    @abstractmethod
    def step_sizes(self) -> list[int]:
        """Positions emitted by each AR step (sum = seq_len)."""

    @property
    def seq_len(self) -> int:
        return sum(self.step_sizes)

    @property
    def step_starts(self) -> list[int]:
        out, acc = [], 0
        for n in self.step_sizes:
            out.append(acc)
            acc += n
        return out

    @property
    @abstractmethod
    def codebook(self) -> Tensor:
        """(V, d) token embeddings in the space the flow map works in."""

    @property
    def vocab_size(self) -> int:
        return self.codebook.shape[0]

    @property
    def token_dim(self) -> int:
        return self.codebook.shape[1]

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    # --- AR stepping ------------------------------------------------------------------------
    @abstractmethod
    def start(self, labels: Tensor, params: SamplingParams) -> tuple[StepState, Tensor]:
        """Begin generation; return the state and the probs (B, step_sizes[0], V) of step 0."""

    @abstractmethod
    def advance(self, state: StepState, step: int, tokens: Tensor, params: SamplingParams) -> Tensor:
        """Feed the tokens chosen at `step` (B, step_sizes[step]); return probs of step+1."""

    forced_chunk = 16  # rows per teacher-forced forward: bounds the (2B, seq_len, V) guided logits

    def teacher_forced_logits(self, tokens: Tensor, labels: Tensor, params: SamplingParams) -> Tensor:
        """(B, seq_len, V) fp32 guided logits for every position given the true prefix."""
        raise NotImplementedError(f"{type(self).__name__} has no teacher-forced logits")

    def sampling_probs(self, logits: Tensor, params: SamplingParams) -> Tensor:
        """The family's logits processing (temperature, top-k, top-p, softmax) of guided logits."""
        raise NotImplementedError(f"{type(self).__name__} has no logits processing")

    def vector_forced_logits(self, vectors: Tensor, labels: Tensor, params: SamplingParams) -> Tensor:
        """(B, seq_len, V) fp32 guided logits for every position given a continuous prefix: position
        i reads vectors[:, :i] (B, seq_len, d), token vectors in codebook space. DD2's continuous-input
        teacher; on codebook vectors it equals `teacher_forced_logits` of their indices."""
        raise NotImplementedError(f"{type(self).__name__} reads token indices only")

    @torch.no_grad()
    def teacher_forced_probs(self, tokens: Tensor, labels: Tensor, params: SamplingParams) -> Tensor:
        """(B, seq_len, V): for every position, the sampling distribution given the true prefix,
        computed `forced_chunk` rows at a time."""
        return self._forced_probs(self.teacher_forced_logits, tokens, labels, params)

    @torch.no_grad()
    def vector_forced_probs(self, vectors: Tensor, labels: Tensor, params: SamplingParams) -> Tensor:
        """`teacher_forced_probs` given a continuous prefix (`vector_forced_logits`)."""
        return self._forced_probs(self.vector_forced_logits, vectors, labels, params)

    def _forced_probs(self, logits_of, prefix: Tensor, labels: Tensor, params: SamplingParams) -> Tensor:
        out = []
        for i in range(0, prefix.shape[0], self.forced_chunk):
            sl = slice(i, i + self.forced_chunk)
            out.append(self.sampling_probs(logits_of(prefix[sl], labels[sl], params), params))
        return torch.cat(out)

    # --- decoding ---------------------------------------------------------------------------
    @abstractmethod
    def decode(self, tokens: Tensor) -> Tensor:
        """Token indices (B, seq_len) -> images in [0, 1], (B, 3, H, W), float32."""

    @abstractmethod
    def decode_vectors(self, vectors: Tensor) -> Tensor:
        """Continuous token vectors (B, seq_len, d) in codebook space -> images in [0, 1]."""

    # --- shared sampling --------------------------------------------------------------------
    def _labels(self, labels: Tensor) -> Tensor:
        """Class labels as a flat long tensor on the teacher's device, range-checked."""
        labels = labels.to(self.device).long().reshape(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}); got {labels.tolist()[:8]}")
        return labels

    def noise(self, seeds: Sequence[int]) -> Tensor:
        return sample_noise(seeds, self.seq_len, self.token_dim, self.device)

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        params: SamplingParams,
        noise: Tensor,
        chooser: TokenChooser | None = None,
        prefix: Tensor | None = None,
        stop: int | None = None,
    ) -> Tensor:
        """Sample token indices (B, seq_len).

        `prefix` (B, P) forces the first P positions (P must end on a step boundary) — used by
        teacher-assisted DD sampling; generation runs until position `stop` (default: seq_len)
        and positions after `stop` are returned as -1.
        """
        chooser = chooser or MultinomialChooser()
        labels = labels.to(self.device)
        noise = noise.to(self.device)
        bsz = labels.shape[0]
        stop = self.seq_len if stop is None else stop
        out = torch.full((bsz, self.seq_len), -1, dtype=torch.long, device=self.device)
        n_prefix = 0 if prefix is None else prefix.shape[1]
        starts = self.step_starts
        if n_prefix and n_prefix not in [*starts, self.seq_len]:
            raise ValueError(f"prefix length {n_prefix} is not on a step boundary {starts}")
        state, probs = self.start(labels, params)
        for step, (s0, n) in enumerate(zip(starts, self.step_sizes, strict=True)):
            if s0 >= stop:
                break
            if s0 < n_prefix:
                tok = prefix[:, s0 : s0 + n].to(self.device).long()
            else:
                tok = chooser(probs, noise[:, s0 : s0 + n])
            out[:, s0 : s0 + n] = tok
            if step + 1 < len(self.step_sizes) and starts[step + 1] < stop:
                probs = self.advance(state, step, tok, params)
        return out

    def sample(self, labels: Tensor, seeds: Sequence[int], params: SamplingParams, chooser=None) -> Tensor:
        return self.generate(labels, params, self.noise(seeds), chooser)


def teacher_fingerprint(teacher: Teacher) -> str:
    """sha256 (16 hex) of what defines the teacher: family, structure, codebook and all weights.

    Weights are every nn.Module / Tensor attribute of the teacher object (LlamaGen: gpt, vq),
    in a fixed order, so the same checkpoint always gives the same fingerprint.
    """
    h = hashlib.sha256()
    h.update(f"{teacher.family}|{teacher.step_sizes}|{teacher.num_classes}".encode())
    update_with_tensor(h, teacher.codebook.float())
    for name in sorted(vars(teacher)):
        obj = vars(teacher)[name]
        if isinstance(obj, torch.nn.Module):
            for k, v in sorted(obj.state_dict().items()):
                h.update(f"{name}.{k}".encode())
                update_with_tensor(h, v)
        elif isinstance(obj, Tensor) and not name.startswith("_codebook"):
            h.update(name.encode())
            update_with_tensor(h, obj)
    return h.hexdigest()[:16]

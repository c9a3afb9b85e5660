"""Where the eager dd1-1step's batch-1 time goes on a CUDA device (LlamaGen-L, random weights).

    python scripts/gpu_eager_probe.py   # writes $OUT/probe.json (or /tmp/probe.json)

The GPU check's eager headline (dd1-1step against the eager teacher) is a ratio of two eager
runs at batch 1; this times the VQ decode and the student's pass with CUDA events under the
backend flags that could move them (cudnn autotuning, TF32 matmuls, bf16 decode) and prints a
profiler table, whose GPU total against the wall time says whether the pass is host-bound.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable

import torch

from ddcore.eval.bench import random_teacher
from ddcore.methods.dd1.samplers import random_students


def cuda_ms(fn: Callable[[], object], n: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e))
    return statistics.median(out)


def main() -> None:
    if not torch.cuda.is_available():
        print("gpu-eager-probe: no CUDA device; nothing to measure")
        return
    teacher = random_teacher("llamagen-l-random", "cuda")
    one = random_students(teacher)[0]
    labels = torch.tensor([3], device="cuda")
    tokens = one.tokens(labels, [0])
    res: dict[str, dict[str, float]] = {}
    for benchmark in (False, True):
        for tf32 in (False, True):
            torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = benchmark, tf32
            key = f"cudnn_benchmark={benchmark},tf32_matmul={tf32}"
            with torch.inference_mode():
                res[key] = {
                    "decode_ms": cuda_ms(lambda: teacher.decode(tokens)),
                    "student_tokens_ms": cuda_ms(lambda: one.tokens(labels, [0])),
                    "student_images_ms": cuda_ms(lambda: one.images(labels, [0])),
                }
                with torch.autocast("cuda", torch.bfloat16):
                    res[key]["decode_bf16_ms"] = cuda_ms(lambda: teacher.decode(tokens))
            print(key, res[key], flush=True)
    torch.backends.cudnn.benchmark = False
    acts = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.inference_mode(), torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            one.images(labels, [0])
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

"""Timing and memory primitives shared by the benchmark and the throughput measurements.

`time_in_turns` times several jobs in rounds (each round calls every job once, each figure is the
median of its rounds), so a slow spell of a shared machine falls on all of them alike;
`peak_memory` measures a block's peak memory (CUDA allocator, or sampled RSS on a CPU).
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_device": None,
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device | str):
    """Yield a dict that receives the peak extra memory of the block, in MB, and how it was measured,
    plus the absolute peak (`peak_total_mb`): memory an allocator already holds from earlier work
    is reused and does not show in the extra, but is part of what the block needs.

    CUDA: `torch.cuda.max_memory_allocated` above the allocation at entry (tensors only, exact).
    CPU: resident set size sampled every 2 ms from /proc/self/statm, peak above the RSS at entry
    (includes allocator caching and can miss spikes shorter than the interval).
    """
    out: dict = {}
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        yield out
        torch.cuda.synchronize(dev)
        out["peak_mem_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        out["peak_total_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        out["peak_mem_kind"] = "cuda_max_memory_allocated"
        return
    if not os.path.exists("/proc/self/statm"):
        yield out
        out["peak_mem_mb"], out["peak_mem_kind"] = None, "unavailable"
        return
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.002)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        yield out
    finally:
        stop.set()
        th.join()
        peak[0] = max(peak[0], _rss_bytes())
        out["peak_mem_mb"] = (peak[0] - base) / 2**20
        out["peak_total_mb"] = peak[0] / 2**20
        out["peak_mem_kind"] = "cpu_rss_sampled"


@dataclass
class Timed:
    """One thing to time (a sampler's images(), the teacher's generation, a VQ decode)."""

    fn: Callable[[], Any]
    device: Any
    times: list[float] = field(default_factory=list)
    mem: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def time_in_turns(jobs: Mapping[str, Timed], repeats: int, warmup: int, progress: str | None = None) -> None:
    """Warm every job up, then time them in turns: each round calls every job once, and each
    job's figure is the median of its rounds. A slow spell of a shared machine then falls on
    every sampler of the round alike instead of on whichever one was being timed, so the
    ratios stay comparable. Peak memory is traced afterwards on one more call per job: on CPU
    the memory watcher is a thread waking every 2 ms, and inside the timed runs it would take
    a core from the 2 intra-op threads and the GIL from the caller."""
    with torch.inference_mode():
        for name, job in jobs.items():
            if progress:
                print(f"[bench {progress}] warm-up: {name}", flush=True)
            for _ in range(warmup):
                job.fn()
        for _ in range(max(1, repeats)):
            for job in jobs.values():
                _sync()
                t0 = time.perf_counter()
                job.fn()
                _sync()
                job.times.append(time.perf_counter() - t0)
        for job in jobs.values():
            with peak_memory(job.device) as mem:
                job.fn()
            job.mem = mem

"""Several training processes on one machine: `torchrun --standalone`, one process per device.

The launching process keeps the bookkeeping (markers, logs); the workers it starts carry
`DD_TORCHRUN_WORKER=1` (not inferred from LOCAL_RANK, which any launcher or leftover environment
may carry) and only train.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from ddcore.checkpoints import atomic_write_text

log = logging.getLogger("ddcore.launch")

TORCHRUN_WORKER = "DD_TORCHRUN_WORKER"


def is_torchrun_worker() -> bool:
    return os.environ.get(TORCHRUN_WORKER) == "1"


def nproc_per_node() -> int:
    """Training processes on this machine: DD_NPROC_PER_NODE (an integer, or 'auto' = one per
    visible GPU); 1 when unset."""
    v = os.environ.get("DD_NPROC_PER_NODE", "1").strip().lower()
    if v == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"DD_NPROC_PER_NODE={v!r}: allowed are a positive integer or 'auto'") from None
    if n < 1:
        raise ValueError(f"DD_NPROC_PER_NODE={n}: must be >= 1")
    return n


def torchrun_stage(
    stage: str, preset_name: str, preset_json: dict, roots: Mapping[str, Path], state_dir: Path, nproc: int
) -> None:
    """Run `ddcore <stage>` for this exact preset (overrides included) under torchrun.

    `roots` are the layout's folders (data, model, metrics, project), passed to the workers as
    DD_*_ROOT settings so they write where this process would."""
    state_dir.mkdir(parents=True, exist_ok=True)
    params = state_dir / f"{stage}-params.yaml"
    atomic_write_text(params, yaml.safe_dump({"presets": {preset_name: preset_json}}))
    env = os.environ | {f"DD_{k.upper()}_ROOT": str(v) for k, v in roots.items()}
    env |= {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), TORCHRUN_WORKER: "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "ddcore.cli", "--params", str(params), "--quiet", stage, "--preset", preset_name,
    ]  # fmt: skip
    log.info("%s[%s]: %s", stage, preset_name, " ".join(cmd))
    subprocess.run(cmd, env=env, check=True, stdout=sys.stderr)  # keep this process's stdout for its result

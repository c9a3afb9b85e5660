"""One real `micro` pipeline per test session, produced by DVC on a copy of the repository.

`dvc repro evaluate@micro bench@micro` in a fresh git + DVC copy runs the `ddcore` console command for every
stage up to bench (prepare -> trajectories -> distill -> evaluate -> bench). The DVC tests check
that run; the CLI and registry tests reuse its outputs (`--root <copy>`) instead of training
again. Memoised per process so that importing the fixture into several test modules still runs
the pipeline once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from servers import BIN, ROOT, base_env

PRESET = "micro"
TARGETS = (f"evaluate@{PRESET}", f"bench@{PRESET}")  # everything but register (tests register themselves)
_CACHE: dict[str, MicroProject] = {}

# Test scale for the DD1 sections of `micro`, used only where params.yaml leaves a section out
# (the defaults are sized for real runs: 20k trajectory pairs, 3k training steps).
MICRO_TEST_SCALE = {
    "dd1": {
        "flow": {"steps": 16},
        "trajectories": {"num_pairs": 128, "shard_size": 64, "batch_size": 64},
        "train": {
            "steps": 40,
            "batch_size": 16,
            "val_pairs": 16,
            "val_every": 10,
            "ckpt_every": 20,
            "warmup_steps": 5,
        },
    },
    "eval": {"num_samples": 64, "batch_size": 64},
    "bench": {"throughput_batch": 8, "repeats": 2, "warmup": 1},
}


def missing_micro_scale(params_file: Path = ROOT / "params.yaml") -> dict:
    """The MICRO_TEST_SCALE sections that params.yaml does not set for `micro`."""
    preset = yaml.safe_load(params_file.read_text())["presets"][PRESET]
    return {k: v for k, v in MICRO_TEST_SCALE.items() if k not in preset}


def micro_overrides(params_file: Path = ROOT / "params.yaml") -> list[str]:
    """The same, as `key.path=value` overrides (for the flow's `overrides` parameter)."""
    return [
        f"{sec}.{k}={json.dumps(v)}"
        for sec, d in missing_micro_scale(params_file).items()
        for k, v in d.items()
    ]


def apply_micro_scale(params_file: Path) -> None:
    data = yaml.safe_load(params_file.read_text())
    data["presets"][PRESET].update(missing_micro_scale(params_file))
    params_file.write_text(yaml.safe_dump(data, sort_keys=False))


@dataclass
class MicroProject:
    root: Path
    env: dict
    repro_seconds: float
    repro_log: str

    def dvc(self, *args: str, timeout: float = 900, check: bool = True, cwd: Path | None = None):
        return run([str(BIN / "dvc"), *args], self.env, cwd or self.root, timeout, check)

    def ddcore(self, *args: str, timeout: float = 900, check: bool = True):
        return run(
            [str(BIN / "ddcore"), "--root", str(self.root), *args], self.env, self.root, timeout, check
        )


def run(
    cmd: list[str], env: dict, cwd: Path, timeout: float, check: bool = True
) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} -> {p.returncode}\n--- stdout\n{p.stdout[-6000:]}\n--- stderr\n{p.stderr[-6000:]}"
        )
    return p


def project_files() -> list[str]:
    """Files of the repository as a fresh clone has them (tracked, plus not-yet-committed new
    files that are not ignored, so the test sees the working tree it runs in)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return [f for f in out if f and (ROOT / f).is_file()]


def copy_repo(dst: Path) -> Path:
    for rel in project_files():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    apply_micro_scale(dst / "params.yaml")
    env = git_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, env=env, check=True, capture_output=True)
    return dst


def git_env() -> dict:
    return base_env(
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@localhost",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@localhost",
    )


def project_env(root: Path) -> dict:
    """Everything local to the copy: DVC's site/global config, caches, the MLflow store."""
    return git_env() | {
        "DD_DEVICE": "cpu",
        "DD_CACHE_DIR": str(root / ".cache-dd"),
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(root / ".cache-dvc-site"),
        "XDG_CONFIG_HOME": str(root / ".config"),
        "HOME": str(root / ".home"),
        "PATH": f"{BIN}:{base_env()['PATH']}",
    }


def micro_project(tmp_path_factory) -> MicroProject:
    if "p" not in _CACHE:
        root = copy_repo(tmp_path_factory.mktemp("repo"))
        env = project_env(root)
        t0 = time.monotonic()
        p = run([str(BIN / "dvc"), "repro", *TARGETS], env, root, timeout=1500)
        _CACHE["p"] = MicroProject(root, env, time.monotonic() - t0, p.stdout + p.stderr)
    return _CACHE["p"]

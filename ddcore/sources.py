"""Checkpoint sources and the registry of published teacher checkpoints.

A source string is one of
  * a local path (``/x/c2i_B_256.pt``, ``file:///x/c2i_B_256.pt``),
  * ``s3://bucket/key`` — downloaded with boto3 (endpoint ``DD_S3_ENDPOINT_URL``) into the cache,
    atomically and with retries; a cached copy of the right size is reused,
  * ``hf://owner/repo[@revision]/path/in/repo`` — ``huggingface_hub.hf_hub_download``; offline
    (``HF_HUB_OFFLINE=1`` or no network) it only looks in the local cache and fails with a clear
    message otherwise.

`KNOWN_CHECKPOINTS` maps published teacher names (``llamagen-b``, ``var-d16``, ...) and tokenizer
names (``vq-ds16-c2i``) to what is needed to build and load them. Each teacher family registers
its own entries (its `catalogue` module) with `register_checkpoint()`.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddcore.checkpoints import CheckpointError, atomic_path
from ddcore.settings import Settings, get_settings

__all__ = [
    "CheckpointInfo",
    "KNOWN_CHECKPOINTS",
    "SourceError",
    "find_checkpoint",
    "get_checkpoint",
    "parse_hf_source",
    "register_checkpoint",
    "resolve_source",
]


class SourceError(CheckpointError):
    """A checkpoint source cannot be resolved to a local file; the message says what to do."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One published checkpoint: where it lives and how to build the model that loads it."""

    name: str  # registry key, e.g. "llamagen-b" or "vq-ds16-c2i"
    family: str  # "llamagen", "var", ...
    kind: str  # "gpt" | "vq" (LlamaGen); other families choose their own
    source: str  # default source string (hf://..., s3://..., path)
    config: str | None = None  # architecture config name ("GPT-B", "VQ-16", ...)
    image_size: int | None = None
    block_size: int | None = None  # tokens per image (LlamaGen: (image_size / 16)^2)
    layout: str = "model"  # "model" ({"model": sd}, falling back to module/state_dict) or "raw"
    tokenizer: str | None = None  # registry key of the matching tokenizer
    num_classes: int = 1000
    sampling: dict[str, Any] = field(default_factory=dict)  # cfg_scale, top_k, top_p, temperature
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return self.source.rstrip("/").rsplit("/", 1)[-1]


KNOWN_CHECKPOINTS: dict[str, CheckpointInfo] = {}


def register_checkpoint(info: CheckpointInfo, overwrite: bool = False) -> CheckpointInfo:
    if info.name in KNOWN_CHECKPOINTS and not overwrite and KNOWN_CHECKPOINTS[info.name] != info:
        raise ValueError(f"checkpoint {info.name!r} is already registered")
    KNOWN_CHECKPOINTS[info.name] = info
    return info


def get_checkpoint(name: str) -> CheckpointInfo:
    if name not in KNOWN_CHECKPOINTS:
        raise KeyError(f"unknown checkpoint {name!r}; known: {', '.join(sorted(KNOWN_CHECKPOINTS))}")
    return KNOWN_CHECKPOINTS[name]


def find_checkpoint(name_or_source: str) -> CheckpointInfo | None:
    """Registry entry by key, or by the file name at the end of a source string."""
    if name_or_source in KNOWN_CHECKPOINTS:
        return KNOWN_CHECKPOINTS[name_or_source]
    fname = name_or_source.rstrip("/").rsplit("/", 1)[-1]
    for info in KNOWN_CHECKPOINTS.values():
        if info.filename == fname:
            return info
    return None


# --------------------------------------------------------------------------------------------
# resolving sources
# --------------------------------------------------------------------------------------------
def resolve_source(
    source: str | os.PathLike,
    settings: Settings | None = None,
    cache_dir: str | os.PathLike | None = None,
    retries: int = 3,
) -> Path:
    """Return a local file for `source` (downloading into the cache when remote)."""
    source = str(source)
    if source.startswith("s3://"):
        settings = settings or get_settings()
        return _resolve_s3(source, settings, Path(cache_dir or settings.cache_dir), retries)
    if source.startswith("hf://"):
        settings = settings or get_settings()
        return _resolve_hf(source, settings, Path(cache_dir or settings.cache_dir))
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source) and not source.startswith("file://"):
        raise SourceError(
            f"unsupported checkpoint source {source!r}: use a local path, s3://bucket/key or hf://repo/file"
        )
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise SourceError(f"checkpoint {source!r} not found: {path} is not a file")
    return path


def _resolve_s3(source: str, settings: Settings, cache_dir: Path, retries: int) -> Path:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    rest = source[len("s3://") :]
    if "/" not in rest or not rest.split("/", 1)[1]:
        raise SourceError(f"{source!r}: expected s3://bucket/key")
    bucket, key = rest.split("/", 1)
    dest = cache_dir / "s3" / bucket / key
    kw: dict[str, Any] = {
        "endpoint_url": settings.s3_endpoint_url or None,
        "config": Config(
            retries={"max_attempts": retries, "mode": "standard"}, connect_timeout=10, read_timeout=120
        ),
    }
    if settings.aws_access_key_id and settings.aws_secret_access_key:
        kw["aws_access_key_id"] = settings.aws_access_key_id.get_secret_value()
        kw["aws_secret_access_key"] = settings.aws_secret_access_key.get_secret_value()
    if not (os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")):
        kw["region_name"] = "us-east-1"
    client = boto3.client("s3", **kw)
    where = f" (endpoint {settings.s3_endpoint_url})" if settings.s3_endpoint_url else ""
    try:
        size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise SourceError(f"{source}: no such object{where}") from err
        if dest.is_file():  # offline or forbidden, but we have a copy
            return dest
        raise SourceError(f"{source}: cannot access{where}: {err}") from err
    except BotoCoreError as err:
        if dest.is_file():
            return dest
        raise SourceError(f"{source}: cannot reach S3{where}: {err}") from err
    if dest.is_file() and dest.stat().st_size == size:
        return dest
    last: Exception | None = None
    for attempt in range(retries):
        try:
            with atomic_path(dest) as tmp:
                client.download_file(bucket, key, str(tmp))
                got = tmp.stat().st_size
                if got != size:
                    raise OSError(f"downloaded {got} bytes, expected {size}")
            return dest
        except (BotoCoreError, ClientError, OSError) as err:
            last = err
            time.sleep(min(2.0**attempt, 10.0) * 0.5)
    raise SourceError(f"{source}: download failed after {retries} attempts{where}: {last}")


def parse_hf_source(source: str) -> tuple[str, str, str | None]:
    """hf://owner/repo[@rev]/path/file -> (repo_id, filename, revision)."""
    rest = source[len("hf://") :] if source.startswith("hf://") else source
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise SourceError(f"{source!r}: expected hf://owner/repo/filename")
    repo, revision = parts[1], None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    return f"{parts[0]}/{repo}", "/".join(parts[2:]), revision


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _resolve_hf(source: str, settings: Settings, cache_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download

    repo_id, filename, revision = parse_hf_source(source)
    offline = _hf_offline()
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    hint = (
        "download it where the Hub is reachable and pass a local path or an s3:// copy as the source "
        "(params.yaml teacher.source / teacher.vq_source)"
    )
    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=str(cache_dir / "hf"),
                token=token,
                local_files_only=offline,
            )
        )
    except Exception as err:  # LocalEntryNotFoundError, OfflineModeIsEnabled, HTTP/connection errors
        if offline:
            raise SourceError(
                f"{source}: HF_HUB_OFFLINE is set and {filename} is not in the cache {cache_dir / 'hf'}; {hint}"
            ) from err
        raise SourceError(
            f"{source}: cannot download from the Hugging Face Hub ({type(err).__name__}: {err}); {hint}"
        ) from err

"""Safe checkpoint I/O: published `.pt` files, our own safetensors + JSON, atomic writes.

* Reading never unpickles arbitrary code: `.pt` files go through `torch.load(weights_only=True)`;
  a file that pickles an `argparse.Namespace` (LlamaGen's train script saves `args`) is retried
  with exactly that one class allow-listed.
* Official dict layouts (`{"model": sd}`, `{"module": sd}`, `{"state_dict": sd}`, `{"ema": sd}`,
  raw FSDP-consolidated) are unwrapped; non-parameter keys (`freqs_cis`, KV caches) are dropped;
  then the state dict is loaded strictly, and a mismatch raises `CheckpointError` naming the
  missing / unexpected / mis-shaped keys and, where it can tell, the config the file looks like.
* Writes go to a temporary file in the target directory, are fsynced, then renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_path",
    "load_model_config",
    "load_safetensors_model",
    "load_state_dict_file",
    "load_strict",
    "save_model",
    "unwrap_state_dict",
]

DEFAULT_DROP = (r"freqs_cis", r"\.kv_cache\.")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message says why."""


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success fsync it and rename it onto `path`.

    The temporary name carries the writer's pid (`.<name>.<pid>.<random>.tmp`): a writer that was
    killed leaves its file behind, and the next write of the same target removes the ones whose
    process is gone (never a live writer's, so concurrent writers of one target stay safe)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and _out_of_space(err, path.parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full:
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise CheckpointError(
                f"{path}: no space left on the device while writing it; {kept}. Free space and re-run"
            ) from err
        raise


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _out_of_space(err: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: an ENOSPC-like OSError anywhere in the chain, the
    same said by a library (safetensors: "os error 28"), or a device left with no free bytes (torch's
    zip writer only says "unexpected pos")."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        said = re.search(r"os error (\d+)", str(seen))  # a Rust library's io::Error (safetensors)
        if "No space left on device" in str(seen) or (said and int(said.group(1)) in _FULL_ERRNOS):
            return True
        seen = seen.__cause__ or seen.__context__
    with contextlib.suppress(OSError):
        return shutil.disk_usage(folder).free < 64 * 1024
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _writer_pid(tmp: Path) -> int | None:
    """The pid in an `atomic_path` temporary's name `.<target>.<pid>.<random>.tmp`, else None."""
    parts = tmp.name[: -len(".tmp")].rsplit(".", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() and tmp.name.startswith(".") else None


def _sweep(candidates) -> list[Path]:
    gone = []
    for tmp in candidates:
        pid = _writer_pid(tmp)
        if pid is not None and not _alive(pid):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                gone.append(tmp)
    return gone


def sweep_dead_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files of target `path` (from `atomic_path`) whose writer has exited."""
    return _sweep(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def sweep_folder(folder: Path) -> list[Path]:
    """The same for every target under `folder` (a stage clears its output folder before it runs)."""
    return _sweep(Path(folder).rglob(".*.tmp")) if Path(folder).is_dir() else []


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(
        path, json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n"
    )


def _json_default(o: Any):
    if isinstance(o, tuple | set):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _corrupt(path: Path, err: BaseException | str) -> CheckpointError:
    size = path.stat().st_size if path.exists() else 0
    why = (
        err
        if isinstance(err, str)
        else f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    )
    return CheckpointError(
        f"{path}: corrupt or truncated checkpoint ({size} bytes; {why}). Delete it and download it again."
    )


def load_state_dict_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a `.safetensors` file or a torch `.pt`/`.pth`/`.bin` file (weights_only) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as err:  # SafetensorError, OSError, ...
            raise _corrupt(path, err) from err
    return _torch_load(path, map_location)


def _torch_file_header(path: Path) -> bool:
    """Whether the file starts as torch.save writes: a zip archive, or (legacy) a pickle (protocol >= 2)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _torch_load(path: Path, map_location) -> dict:
    def load(**kw):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True, **kw)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # legacy (non-zip) serialisation cannot be memory-mapped
            return torch.load(path, map_location=map_location, weights_only=True, **kw)

    try:
        try:
            return load()
        except pickle.UnpicklingError as first:
            if not _torch_file_header(path):
                raise _corrupt(path, "neither a zip archive nor a pickle") from first
            if "argparse.Namespace" not in str(first) and "Namespace" not in str(first):
                raise CheckpointError(
                    f"{path}: refused by torch.load(weights_only=True) (it pickles something other than "
                    f"tensors and plain containers): {first}"
                ) from first
            # LlamaGen's training script stores `args` as an argparse.Namespace; allow exactly that.
            with torch.serialization.safe_globals([argparse.Namespace]):
                return load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {err}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise _corrupt(path, err) from err


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and any(isinstance(v, Tensor) for v in obj.values())


def _strip_common_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def unwrap_state_dict(
    obj: Any, prefer: Iterable[str] = ("model", "module", "state_dict", "ema")
) -> dict[str, Tensor]:
    """Find the parameter dict inside an official checkpoint layout (or a raw state dict).

    Checks the `prefer` keys in order (recursively, e.g. {"state_dict": {"model": ...}}), then a
    raw dict of tensors. Non-tensor entries are dropped; a `module.` / `_orig_mod.` prefix shared
    by every key (DDP / torch.compile) is removed.
    """
    prefer = tuple(prefer)
    if isinstance(obj, Mapping):
        for key in prefer:
            if key in obj and isinstance(obj[key], Mapping):
                return unwrap_state_dict(obj[key], prefer)
        if _is_tensor_dict(obj):
            sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
            return _strip_common_prefix(sd)
        raise CheckpointError(
            f"no state dict found: top-level keys {sorted(map(str, obj))[:20]}, expected one of {list(prefer)} "
            "or a raw mapping of parameter names to tensors"
        )
    raise CheckpointError(f"no state dict found: checkpoint holds a {type(obj).__name__}, not a mapping")


def _drop(sd: Mapping[str, Tensor], patterns: Iterable[str]) -> tuple[dict[str, Tensor], list[str]]:
    regs = [re.compile(p) for p in patterns]
    kept, dropped = {}, []
    for k, v in sd.items():
        if any(r.search(k) for r in regs):
            dropped.append(k)
        else:
            kept[k] = v
    return kept, dropped


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    drop_patterns: Iterable[str] = DEFAULT_DROP,
    what: str = "model",
    suggest: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], list[str]] | None = None,
    assign: bool = False,
) -> nn.Module:
    """Load `state_dict` into `module` strictly (after dropping `drop_patterns` keys).

    Raises CheckpointError listing missing, unexpected and shape-mismatched keys plus config
    hints. `assign=True` adopts the checkpoint tensors (use with a model built on the meta device).
    """
    sd, _ = _drop(state_dict, drop_patterns)
    model_sd = module.state_dict()
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [
        f"{k}: checkpoint {_shape(sd[k])} vs model {_shape(model_sd[k])}"
        for k in model_sd
        if k in sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not fit {what}:"]

        def listing(title: str, items: list[str]) -> None:
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")

        listing("missing keys", missing)
        listing("unexpected keys", unexpected)
        listing("shape mismatches", mismatched)
        hints = suggest(sd, model_sd) if suggest is not None else []
        lines += [f"  hint: {h}" for h in hints]
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(sd, strict=True, assign=assign)
    return module


# --------------------------------------------------------------------------------------------
# our own checkpoints: name.safetensors + name.json
# --------------------------------------------------------------------------------------------
def _base(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def save_model(path: str | os.PathLike, module: nn.Module | Mapping[str, Tensor], config: dict) -> Path:
    """Write `path.safetensors` (weights, fp as stored) and `path.json` (config), each atomically.

    The JSON is written last, so a directory with a JSON always has its weights.
    """
    from safetensors.torch import save_file

    base = _base(path)
    sd = module.state_dict() if isinstance(module, nn.Module) else dict(module)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items() if isinstance(v, Tensor)}
    # safetensors refuses shared storage; clone any tensor whose storage was already seen
    seen: set[int] = set()
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            tensors[k] = v.clone()
        seen.add(ptr)
    with atomic_path(base.with_name(base.name + ".safetensors")) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(base.with_name(base.name + ".json"), config)
    return base.with_name(base.name + ".safetensors")


def load_model_config(path: str | os.PathLike) -> dict:
    base = _base(path)
    jpath = base.with_name(base.name + ".json")
    if not jpath.is_file():
        raise CheckpointError(f"{jpath}: config JSON missing (expected next to the .safetensors file)")
    try:
        return json.loads(jpath.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{jpath}: corrupt config JSON ({err})") from err


def load_safetensors_model(
    path: str | os.PathLike, module: nn.Module, what: str = "model", **kw
) -> nn.Module:
    base = _base(path)
    sd = load_state_dict_file(base.with_name(base.name + ".safetensors"))
    return load_strict(module, sd, what=what, **kw)

"""Checkpoint I/O: official layouts loaded strictly, clear errors for mismatches and corrupt files."""

import argparse
import datetime
import json
import os

import pytest
import torch
from llamagen_helpers import small_gpt, small_gpt_config

from ddcore.checkpoints import (
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    load_model_config,
    load_state_dict_file,
    load_strict,
    save_model,
    unwrap_state_dict,
)
from ddcore.models.llamagen import GPT, gpt_config
from ddcore.teachers.llamagen.catalogue import suggest_llamagen
from ddcore.teachers.llamagen.teacher import load_llamagen_gpt


def _logits(gpt):
    tokens = torch.arange(32).view(2, 16) % 48
    with torch.no_grad():
        return gpt.forward_teacher(tokens, torch.tensor([1, 2]))


@pytest.mark.parametrize("layout", ["model", "module", "state_dict", "raw"])
def test_official_layouts_roundtrip_strict(tmp_path, layout):
    src = small_gpt(seed=3)
    sd = dict(src.state_dict())
    sd["freqs_cis"] = torch.zeros(17, 8, 2)  # some exporters keep it; it must be tolerated
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(1, 4, 24, 16)
    sd["layers.0.attention.kv_cache.v_cache"] = torch.zeros(1, 4, 24, 16)
    obj = sd if layout == "raw" else {layout: sd, "steps": 1000}
    path = tmp_path / "c2i_tiny.pt"
    torch.save(obj, path)
    gpt = load_llamagen_gpt(path, small_gpt_config())
    assert torch.equal(_logits(gpt), _logits(src))
    assert all(
        torch.equal(a, b) for a, b in zip(gpt.state_dict().values(), src.state_dict().values(), strict=True)
    )


def test_namespace_args_are_allowed_but_nothing_else(tmp_path):
    sd = small_gpt().state_dict()
    ok = tmp_path / "with_args.pt"
    torch.save({"model": sd, "args": argparse.Namespace(gpt_model="GPT-B", image_size=256)}, ok)
    obj = load_state_dict_file(ok)
    assert obj["args"].gpt_model == "GPT-B"
    assert set(unwrap_state_dict(obj)) == set(sd)
    bad = tmp_path / "with_datetime.pt"
    torch.save({"model": sd, "when": datetime.datetime(2024, 6, 1)}, bad)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict_file(bad)


def test_unwrap_prefers_model_and_strips_prefixes():
    a, b = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert unwrap_state_dict({"model": a, "ema": b})["w"].item() == 0
    assert unwrap_state_dict({"ema": b})["w"].item() == 1
    assert set(unwrap_state_dict({"module.x": torch.zeros(1), "module.y": torch.zeros(1)})) == {"x", "y"}
    assert set(unwrap_state_dict({"state_dict": {"_orig_mod.x": torch.zeros(1)}})) == {"x"}
    with pytest.raises(CheckpointError, match="no state dict found"):
        unwrap_state_dict({"optimizer": 3, "steps": 10})


def test_gpt_l_weights_into_gpt_b_config_name_the_config():
    with torch.device("meta"):
        gpt_b = GPT(gpt_config("GPT-B"))
        sd_l = GPT(gpt_config("GPT-L")).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_strict(
            gpt_b, sd_l, what="LlamaGen GPT-B", suggest=suggest_llamagen
        )  # as the family's loaders do
    msg = str(err.value)
    assert "LlamaGen GPT-B" in msg
    assert "checkpoint dim 1024" in msg and "looks like GPT-L" in msg
    assert "unexpected keys (84)" in msg  # layers 12..23
    assert "tok_embeddings.weight: checkpoint [16384, 1024] vs model [16384, 768]" in msg


def test_wrong_vocab_is_named(tmp_path):
    path = tmp_path / "vocab64.pt"
    torch.save({"model": small_gpt(vocab_size=64).state_dict()}, path)
    with pytest.raises(
        CheckpointError, match="wrong vocab_size: checkpoint has 64 token embeddings, model 48"
    ):
        load_llamagen_gpt(path, small_gpt_config())


def test_missing_keys_are_listed():
    sd = dict(small_gpt().state_dict())
    del sd["norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): norm.weight"):
        load_strict(small_gpt(), sd)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_rejected(tmp_path, suffix):
    gpt = small_gpt()
    if suffix == ".pt":
        path = tmp_path / "c2i.pt"
        torch.save({"model": gpt.state_dict()}, path)
    else:
        path = save_model(tmp_path / "gpt", gpt, {"dim": 64})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_state_dict_file(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_state_dict_file(tmp_path / "missing.pt")


def test_save_model_writes_safetensors_and_json(tmp_path):
    gpt = small_gpt(seed=5)
    cfg = {**gpt.cfg.to_dict(), "num_classes": 10, "image_size": 8}
    out = save_model(tmp_path / "sub" / "gpt", gpt, cfg)
    assert out == tmp_path / "sub" / "gpt.safetensors"
    assert sorted(os.listdir(tmp_path / "sub")) == ["gpt.json", "gpt.safetensors"]  # no temp files left
    assert load_model_config(tmp_path / "sub" / "gpt") == cfg
    assert load_model_config(out) == cfg
    loaded = load_strict(small_gpt(seed=9), load_state_dict_file(out))
    assert torch.equal(_logits(loaded), _logits(gpt))
    with pytest.raises(CheckpointError, match="config JSON missing"):
        load_model_config(tmp_path / "nothing")


def test_atomic_writes_replace_whole_files(tmp_path):
    p = tmp_path / "a" / "x.json"
    atomic_write_json(p, {"b": (1, 2)})
    assert json.loads(p.read_text()) == {"b": [1, 2]}
    atomic_write_text(p, "new")
    assert p.read_text() == "new"

    class Boom:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(p, {"x": Boom()})
    assert p.read_text() == "new"  # a failed write leaves the old file untouched
    assert os.listdir(p.parent) == ["x.json"]


def test_a_killed_writers_temporary_is_swept_by_the_next_write(tmp_path):
    """atomic_path tags its temporary with the writer's pid: the next write of the same target
    removes those of exited writers (a SIGKILL leaves them behind) and never a live writer's."""
    import subprocess
    import sys

    from ddcore.checkpoints import atomic_write_bytes

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".x.bin.{dead.pid}.a.tmp").write_bytes(b"half a file")
    (tmp_path / f".x.bin.{os.getpid()}.b.tmp").write_bytes(b"someone writing now")
    (tmp_path / f".y.bin.{dead.pid}.c.tmp").write_bytes(b"another target's")
    atomic_write_bytes(tmp_path / "x.bin", b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".x.bin.{os.getpid()}.b.tmp",
        f".y.bin.{dead.pid}.c.tmp",
        "x.bin",
    ]
    assert (tmp_path / "x.bin").read_bytes() == b"done"


_FULL_DISK_SCRIPT = r"""
import json, os, resource, signal, sys, torch
from pathlib import Path
from ddcore.checkpoints import CheckpointError, save_model
from ddcore.training.loop import save_checkpoint
folder, limit = Path(sys.argv[1]), int(sys.argv[2])
save_checkpoint(folder / "checkpoint.pt", {"w": torch.ones(1000)})  # the last good checkpoint
save_model(folder / "student", {"w": torch.ones(1000)}, {"kind": "good"})
if limit:  # no small filesystem here: a file-size limit makes the same write fail in the kernel
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
out = {}
for name, write in (("checkpoint", lambda: save_checkpoint(folder / "checkpoint.pt", {"w": torch.zeros(400_000)})),
                    ("model", lambda: save_model(folder / "student", {"w": torch.zeros(400_000)}, {"kind": "new"}))):
    try:
        write()
        out[name] = "written"
    except CheckpointError as e:
        out[name] = str(e)
out["checkpoint_kept"] = float(torch.load(folder / "checkpoint.pt", weights_only=True)["w"].sum())
out["files"] = sorted(p.name for p in folder.iterdir())
print(json.dumps(out))
"""


@pytest.mark.parametrize("device", ["tmpfs", "file-size-limit"])
def test_a_full_disk_keeps_the_previous_file_and_says_so(tmp_path, device):
    """A checkpoint and a model written onto a full device (a 512 KiB tmpfs, where this machine lets
    the tests mount one; and the kernel's file-size limit, which fails the same writes with EFBIG
    everywhere): each write fails with a sentence, the previous file stays loadable, no temporary is left."""
    import json
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = False
    if device == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)]
        mounted = subprocess.run(cmd, capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("no permission to mount a tmpfs here (the file-size-limit case still runs)")
    try:
        limit = "0" if mounted else str(256 * 1024)
        p = subprocess.run(
            [sys.executable, "-c", _FULL_DISK_SCRIPT, str(disk), limit],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        out = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)
    for name, kept in (
        ("checkpoint", "the previous checkpoint.pt is intact"),
        ("model", "the previous student.safetensors is intact"),
    ):
        assert "no space left on the device" in out[name] and kept in out[name], out[name]
    assert out["checkpoint_kept"] == 1000.0
    assert out["files"] == ["checkpoint.pt", "student.json", "student.safetensors"]

"""DD1 training under DDP (2 CPU processes, gloo over loopback) trains the same model as one
process on the same global batch; gradient accumulation likewise."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp
from dd1_toy import ddp_train_worker, make_small_trajectories, small_llamagen_teacher
from safetensors.torch import load_file

TRAIN = dict(
    steps=6, batch_size=8, lr=2e-3, warmup_steps=1, val_pairs=16, val_every=3, ckpt_every=100, ema_decay=0.5
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst
    return worst


def test_two_process_ddp_with_muon_matches_single_process(tmp_path):
    """Muon orthogonalises the all-reduced gradient's momentum: every rank takes the single-process
    step. Orthogonalising (in bf16, in torch's Muon) amplifies the gradient's weak directions, so the
    last-bit differences of a differently ordered gradient sum grow to ~2e-4 here (gradient
    accumulation shows the same); the tolerance still separates a run on another batch by more than
    an order of magnitude."""
    traj = tmp_path / "traj"
    make_small_trajectories(traj)
    cfg = {**TRAIN, "optimizer": "muon"}
    runs = {name: tmp_path / name for name in ("single", "ddp", "half")}
    ddp_train_worker(0, 1, _free_port(), str(traj), str(runs["single"]), cfg)
    mp.spawn(ddp_train_worker, args=(2, _free_port(), str(traj), str(runs["ddp"]), cfg), nprocs=2, join=True)
    ddp_train_worker(0, 1, _free_port(), str(traj), str(runs["half"]), {**cfg, "batch_size": 4})
    w = {name: load_file(str(d / "student.safetensors")) for name, d in runs.items()}
    worst = _close(w["single"], w["ddp"], atol=1e-3)
    off = max((w["single"][k] - w["half"][k]).abs().max().item() for k in w["single"])
    assert off > 10 * max(worst, 1e-4), (off, worst)


def test_two_process_ddp_matches_single_process(tmp_path):
    traj = tmp_path / "traj"
    make_small_trajectories(traj)
    single = tmp_path / "single"
    ddp_train_worker(0, 1, _free_port(), str(traj), str(single), TRAIN)
    ddp = tmp_path / "ddp"
    mp.spawn(ddp_train_worker, args=(2, _free_port(), str(traj), str(ddp), TRAIN), nprocs=2, join=True)
    accum = tmp_path / "accum"
    ddp_train_worker(0, 1, _free_port(), str(traj), str(accum), {**TRAIN, "grad_accum": 2})
    a = load_file(str(single / "student.safetensors"))
    _close(a, load_file(str(ddp / "student.safetensors")), atol=1e-5)
    _close(a, load_file(str(accum / "student.safetensors")), atol=1e-5)
    # and training moved the weights far more than the tolerance (not untouched copies)
    moved = (a["output.weight"] - small_llamagen_teacher(0).gpt.output.weight).abs().max().item()
    assert moved > 1e-3
    # the logged losses are averaged over ranks: the same numbers as one process
    rows = [ln.split(",") for ln in (ddp / "train_log.csv").read_text().splitlines()]
    ref = [ln.split(",") for ln in (single / "train_log.csv").read_text().splitlines()]
    assert rows[0] == ref[0] and len(rows) == len(ref) == 3  # header + steps 3, 6 (rank 0 writes)
    for r, q in zip(rows[1:], ref[1:], strict=True):
        for k in (1, 2, 3, 5, 6, 7):  # loss, ce, mse, val_acc_t0, val_acc_t2, lr
            assert abs(float(r[k]) - float(q[k])) < 1e-5, (rows[0][k], r[k], q[k])

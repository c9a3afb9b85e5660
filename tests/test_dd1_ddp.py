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

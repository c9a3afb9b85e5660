"""DD1 student training: loss, data order, logging/outputs, exact resume, LPIPS availability."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from dd1_toy import make_small_trajectories, small_llamagen_teacher, small_train_params
from safetensors.torch import load_file

from ddcore.methods.dd1.measure import jacobi_refinement, prefix_accuracy
from ddcore.methods.dd1.student import DD1Student, layer_sources
from ddcore.methods.dd1.students import load_student
from ddcore.methods.dd1.train import (
    LOG_COLUMNS,
    LPIPSUnavailable,
    dd1_loss,
    initial_student,
    step_batch,
    train_student,
)
from ddcore.methods.dd1.trajectories import TrajectoryDataset
from ddcore.params import FlowParams, SamplingParams, StudentParams
from ddcore.training.loop import lr_at

SP = StudentParams(t_list=[0, 6], split_t=10)


_tp = small_train_params


@pytest.fixture(scope="module")
def traj(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("traj")
    make_small_trajectories(d)
    return d


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dd1_loss_masks_given_positions_and_splits_exactly():
    torch.manual_seed(0)
    B, L, V, d = 4, 5, 7, 3
    logits, cont = torch.randn(B, L, V), torch.randn(B, L, d)
    targets, cb = torch.randint(0, V, (B, L)), torch.randn(V, d)
    t = torch.tensor([0, 2, 4, 1])
    loss, parts = dd1_loss(logits, cont, targets, t, cb, ce_weight=1.0, mse_weight=0.5)
    ce = mse = 0.0
    for b in range(B):
        for i in range(int(t[b]), L):
            ce += -torch.log_softmax(logits[b, i], -1)[targets[b, i]]
            mse += ((cont[b, i] - cb[targets[b, i]]) ** 2).mean()
    torch.testing.assert_close(parts["ce"], ce / (B * L))
    torch.testing.assert_close(parts["mse"], mse / (B * L))
    torch.testing.assert_close(loss, (ce + 0.5 * mse) / (B * L))
    # the normalisation makes the full-batch loss the mean of equal-size shards' losses (DDP)
    a, _ = dd1_loss(logits[:2], cont[:2], targets[:2], t[:2], cb, 1.0, 0.5)
    b, _ = dd1_loss(logits[2:], cont[2:], targets[2:], t[2:], cb, 1.0, 0.5)
    torch.testing.assert_close(loss, (a + b) / 2)
    # positions before t carry no gradient
    logits.requires_grad_(True)
    dd1_loss(logits, cont, targets, t, cb, 1.0, 0.5)[0].backward()
    assert (logits.grad[2, :4] == 0).all() and (logits.grad[2, 4] != 0).any()


def test_step_batch_is_a_pure_function_covering_each_epoch():
    n, bs = 20, 8
    a = step_batch(3, bs, n, [0, 6], seed=1)
    assert torch.equal(a.idx, step_batch(3, bs, n, [0, 6], seed=1).idx)
    assert torch.equal(a.t, step_batch(3, bs, n, [0, 6], seed=1).t)
    first_epoch = torch.cat([step_batch(s, bs, n, [0], 1).idx for s in range(5)])[:n]
    assert sorted(first_epoch.tolist()) == list(range(n))
    assert set(torch.cat([step_batch(s, bs, n, [0, 6], 1).t for s in range(10)]).tolist()) == {0, 6}
    assert not torch.equal(step_batch(0, bs, n, [0], 1).idx, step_batch(0, bs, n, [0], 2).idx)


def test_lr_schedule():
    p = _tp(steps=100, warmup_steps=10, lr=1.0)
    assert lr_at(0, p) == pytest.approx(0.1) and lr_at(9, p) == pytest.approx(1.0)
    assert lr_at(10, p) == pytest.approx(1.0) and lr_at(100, p) == pytest.approx(0.1)
    assert lr_at(40, p) > lr_at(80, p)
    to_zero = _tp(steps=100, warmup_steps=10, lr=1.0, lr_end_ratio=0.0)
    assert lr_at(100, to_zero) == 0.0 and lr_at(9, to_zero) == pytest.approx(1.0)
    assert lr_at(55, to_zero) == pytest.approx(0.5) and lr_at(55, p) == pytest.approx(0.55)


def test_training_learns_logs_and_saves(traj, tmp_path):
    teacher = small_llamagen_teacher(0)
    seen = []
    out = tmp_path / "student"
    summary = train_student(
        teacher, traj, SP, _tp(steps=40, val_every=10), out, device="cpu", progress=False, log_fn=seen.append
    )
    rows = _rows(out / "train_log.csv")
    assert list(rows[0]) == list(LOG_COLUMNS)
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40] and len(seen) == 4
    assert seen[-1]["step"] == 40 and set(LOG_COLUMNS) <= set(seen[-1])
    assert float(rows[-1]["ce"]) < 0.8 * float(rows[0]["ce"])
    assert float(rows[-1]["mse"]) < float(rows[0]["mse"])
    for r in rows:
        assert 0.0 <= float(r["val_acc_t0"]) <= 1.0 and 0.0 <= float(r["val_acc_t2"]) <= 1.0
    meta = json.loads((out / "student.json").read_text())
    assert meta["t_list"] == [0, 6] and meta["split_t"] == 10 and meta["weights"] == "ema"
    assert (
        meta["teacher_fingerprint"]
        == json.loads((traj / "manifest.json").read_text())["teacher"]["fingerprint"]
    )
    assert summary["steps"] == 40 and not (out / "checkpoint.pt").exists()
    marg = load_file(str(out / "baseline.safetensors"))["marginals"]
    ds = TrajectoryDataset(traj)
    torch.testing.assert_close(marg, ds.marginals(torch.arange(len(ds) - 16)).float())
    # the saved student is the EMA model and reloads exactly; its val accuracy is what was logged
    student, _ = load_student(out, teacher, device="cpu")
    assert isinstance(student, DD1Student)
    sd = load_file(str(out / "student.safetensors"))
    assert all(torch.equal(v, sd[k]) for k, v in student.state_dict().items())
    idx = torch.arange(len(ds) - 16, len(ds))
    x, tok, lab = ds.batch(idx, torch.zeros(16, dtype=torch.long), teacher.codebook)
    with torch.no_grad():
        logits, _ = student(x, lab, torch.zeros(16, dtype=torch.long))
    acc = (logits.argmax(-1) == tok).float().mean().item()
    assert acc == pytest.approx(float(rows[-1]["val_acc_t0"]), abs=1e-6)
    # finished: a second call returns the recorded summary without training
    mtime = (out / "student.safetensors").stat().st_mtime_ns
    assert (
        train_student(teacher, traj, SP, _tp(steps=40, val_every=10), out, device="cpu", progress=False)
        == summary
    )
    assert (out / "student.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_kill_and_resume_equals_straight_run(traj, tmp_path, optimizer):
    teacher = small_llamagen_teacher(0)
    tp = _tp(ckpt_every=3, optimizer=optimizer)
    straight = tmp_path / "straight"
    train_student(teacher, traj, SP, tp, straight, device="cpu", progress=False)
    resumed = tmp_path / "resumed"
    # killed after step 5; the last checkpoint is step 3, rows were logged at steps 2 and 4
    assert train_student(teacher, traj, SP, tp, resumed, device="cpu", progress=False, stop_at=5) == {
        "stopped_at": 5
    }
    state = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and [int(r["step"]) for r in _rows(resumed / "train_log.csv")] == [2, 4]
    train_student(teacher, traj, SP, tp, resumed, device="cpu", progress=False)
    a, b = load_file(str(straight / "student.safetensors")), load_file(str(resumed / "student.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    ra, rb = _rows(straight / "train_log.csv"), _rows(resumed / "train_log.csv")
    assert [int(r["step"]) for r in rb] == [2, 4, 6, 8, 10]
    for x, y in zip(ra, rb, strict=True):
        for k in ("loss", "ce", "mse", "val_acc_t0", "val_acc_t2", "lr"):
            assert float(x[k]) == pytest.approx(float(y[k]), rel=1e-6, abs=1e-9), (k, x, y)


def test_jacobi_refinement_reaches_the_stored_trajectories_exactly(traj):
    """After k rounds of exact parallel refinement the first k tokens are right; after seq_len rounds
    all of them: the stored tokens are the fixed point of teacher + flow map on the stored noise."""
    teacher = small_llamagen_teacher(0)
    ds = TrajectoryDataset(traj)
    idx, L = torch.arange(len(ds) - 16, len(ds)), teacher.seq_len
    man = ds.manifest
    rows = jacobi_refinement(
        teacher,
        ds.noise[idx].float(),
        ds.labels[idx],
        ds.tokens[idx].long(),
        ds.marginals(torch.arange(len(ds) - 16)),
        SamplingParams(**man.sampling),
        FlowParams(**man.flow),
        rounds=L,
    )
    assert [r["round"] for r in rows] == list(range(L + 1))
    assert all(r["median_first_wrong"] >= r["round"] for r in rows)
    assert rows[0]["accuracy"] < 0.9 and rows[-1] == {"round": L, "accuracy": 1.0, "median_first_wrong": L}
    target = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert prefix_accuracy(torch.tensor([[1, 2, 3], [1, 0, 0]]), target) == {
        "accuracy": pytest.approx(4 / 6),
        "median_first_wrong": 1.0,  # the lower of the two middle values: 1 (second row) and 3 (none)
    }


def test_changed_params_do_not_resume_a_foreign_checkpoint(traj, tmp_path):
    teacher = small_llamagen_teacher(0)
    out = tmp_path / "s"
    train_student(teacher, traj, SP, _tp(ckpt_every=2), out, device="cpu", progress=False, stop_at=3)
    with pytest.raises(ValueError, match="another run"):
        train_student(teacher, traj, SP, _tp(ckpt_every=2, lr=1e-4), out, device="cpu", progress=False)


def test_wrong_teacher_is_refused(traj, tmp_path):
    with pytest.raises(ValueError, match="trajectories come from teacher"):
        train_student(
            small_llamagen_teacher(1), traj, SP, _tp(), tmp_path / "s", device="cpu", progress=False
        )


def _lpips_backbone_cached() -> bool:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return any(hub.glob("alexnet-*.pth"))


def test_lpips_weight_needs_lpips(traj, tmp_path):
    teacher = small_llamagen_teacher(0)
    tp = _tp(steps=2, lpips_weight=0.5)
    if _lpips_backbone_cached():
        train_student(teacher, traj, SP, tp, tmp_path / "s", device="cpu", progress=False)
        assert float(_rows(tmp_path / "s" / "train_log.csv")[-1]["lpips"]) > 0
    else:
        with pytest.raises(LPIPSUnavailable, match="^LPIPS unavailable: "):
            train_student(teacher, traj, SP, tp, tmp_path / "s", device="cpu", progress=False)


def test_throughput_runs_the_stage_code_and_reports_consistent_figures(traj, tmp_path):
    from ddcore.methods.dd1.throughput import training_throughput, trajectory_throughput
    from ddcore.params import FlowParams, SamplingParams, TrajectoryParams

    teacher = small_llamagen_teacher(0)
    tr = trajectory_throughput(
        teacher, SamplingParams(), FlowParams(steps=16), TrajectoryParams(batch_size=24)
    )
    assert tr["batch"] == 24 and len(tr["times"]) == 2
    assert tr["pairs_per_s"] == pytest.approx(24 / tr["seconds_per_batch"]) and tr["pairs_per_s"] > 0
    tp = small_train_params(steps=12, val_every=100)
    res = training_throughput(teacher, traj, StudentParams(t_list=[0, 4], split_t=16), tp, steps=(2, 8))
    assert res["timed_steps"] == [2, 8] and res["batch_size"] == tp.batch_size
    if res["steps_per_s"] is not None:
        assert res["samples_per_s"] == pytest.approx(tp.batch_size * res["steps_per_s"])
    assert res["peak_mem_kind"] == "cpu_rss_sampled"
    assert "fp32" not in res and "speedup_vs_fp32" not in res  # fp32 on a CPU already
    # a bf16 preset is timed against the same runs in fp32, in turns
    res16 = training_throughput(
        teacher,
        traj,
        StudentParams(t_list=[0, 4], split_t=16),
        tp.model_copy(update={"precision": "bf16"}),
        steps=(2, 8),
    )
    assert res16["timed_steps"] == res16["fp32"]["timed_steps"] == [2, 8]
    if res16["steps_per_s"] is not None and res16["fp32"]["steps_per_s"] is not None:
        assert res16["speedup_vs_fp32"] == pytest.approx(res16["steps_per_s"] / res16["fp32"]["steps_per_s"])
    # stop_at runs save nothing in the trajectory folder or elsewhere
    assert not any(p.name.startswith("student") for p in Path(traj).rglob("*"))


def test_deeper_student_trains_saves_and_reloads(traj, tmp_path):
    teacher = small_llamagen_teacher(0)
    out = tmp_path / "deep"
    sp = SP.model_copy(update={"extra_layers": 2})
    train_student(teacher, traj, sp, _tp(steps=6, val_every=3), out, device="cpu", progress=False)
    student, meta = load_student(out, teacher, device="cpu")
    assert meta["config"]["n_layer"] == teacher.gpt.cfg.n_layer + 2 == len(student.layers)
    sd = load_file(str(out / "student.safetensors"))
    assert all(torch.equal(v, sd[k]) for k, v in student.state_dict().items())
    # trained: the new blocks are no longer the identity
    new = [
        b for b, s in zip(student.layers, layer_sources(teacher.gpt.cfg.n_layer, 2), strict=True) if s is None
    ]
    assert all(b.attention.wo.weight.abs().sum() > 0 for b in new)


def test_compiled_training_matches_eager(traj, tmp_path):
    """train.compile changes the kernels, not the training: same steps, same weights to rounding."""
    teacher = small_llamagen_teacher(0)
    init = initial_student(teacher, SP.extra_layers, _tp().seed).state_dict()
    saved, rows = {}, {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        train_student(teacher, traj, SP, _tp(steps=4, compile=compiled), out, device="cpu", progress=False)
        saved[compiled] = load_file(str(out / "student.safetensors"))
        rows[compiled] = _rows(out / "train_log.csv")
        assert [int(r["step"]) for r in rows[compiled]] == [2, 4]
    eager, comp = saved[False], saved[True]
    assert eager.keys() == comp.keys()
    moved = max(float((eager[k] - init[k]).abs().max()) for k in init)
    gap = max(float((eager[k] - comp[k]).abs().max()) for k in eager)
    # AdamW's first steps are about +-lr per weight, so kernel rounding can flip a few near-zero
    # gradients' steps: the runs agree to a small fraction of how far training moved the weights
    assert gap < moved / 20, (gap, moved)
    for x, y in zip(rows[False], rows[True], strict=True):
        for k in ("loss", "ce", "mse"):
            assert float(x[k]) == pytest.approx(float(y[k]), rel=1e-4), (k, x, y)


def test_bf16_training_on_cpu_tracks_fp32(traj, tmp_path):
    """train.precision bf16 on a CPU: the same steps in bf16 matmuls, visibly not fp32, close to it."""
    teacher = small_llamagen_teacher(0)
    init = initial_student(teacher, SP.extra_layers, _tp().seed).state_dict()
    runs = {"fp32": {}, "bf16": {"precision": "bf16"}, "other data order": {"seed": 1}}
    saved, rows = {}, {}
    for name, kw in runs.items():
        out = tmp_path / name.replace(" ", "_")
        train_student(teacher, traj, SP, _tp(steps=4, **kw), out, device="cpu", progress=False)
        saved[name] = load_file(str(out / "student.safetensors"))
        rows[name] = _rows(out / "train_log.csv")

    def dist(a: dict, b: dict) -> float:  # whole-model L2: AdamW's first steps are sign-like per weight
        return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5

    moved, gap = dist(saved["fp32"], init), dist(saved["fp32"], saved["bf16"])
    other = dist(saved["fp32"], saved["other data order"])
    # the default on a CPU is fp32, so a zero gap would mean bf16 never took effect
    # measured: gap 0.20, moved 1.09, another data order 2.74 away
    assert 0 < gap < moved / 3 and gap < other / 5, (gap, moved, other)
    for x, y in zip(rows["fp32"], rows["bf16"], strict=True):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=2e-2), (x, y)

"""Trajectory storage: exact content, determinism, resume after a kill, corruption, parallel shards."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch
from dd1_toy import MarkovTeacher, generate_toy_shards
from safetensors.torch import load_file

from ddcore.methods.dd1.flowmap import FlowChooser, FlowSolver
from ddcore.methods.dd1.trajectories import (
    TrajectoryDataset,
    TrajectoryError,
    build_xt,
    generate_trajectories,
    load_manifest,
    pair_seeds,
    verify_shards,
)
from ddcore.params import FlowParams, SamplingParams, TrajectoryParams

FLOW = FlowParams(steps=16)
N, SHARD = 50, 20  # 3 shards: 20, 20, 10


def _traj(**kw) -> TrajectoryParams:
    return TrajectoryParams(**{"num_pairs": N, "shard_size": SHARD, "batch_size": 16, "seed": 3, **kw})


def _gen(out, shard_ids=None, teacher=None, flow=FLOW, replace=False, **kw):
    return generate_trajectories(
        teacher or MarkovTeacher(),
        SamplingParams(),
        flow,
        _traj(**kw),
        out,
        shard_ids=shard_ids,
        progress=False,
        replace=replace,
    )


def _digests(out) -> dict[int, str]:
    return {s.shard_id: s.sha256 for s in load_manifest(out).shards}


def test_pairs_are_exactly_what_the_flow_map_makes(tmp_path):
    teacher = MarkovTeacher()
    man = _gen(tmp_path, teacher=teacher)
    assert man.complete and man.num_shards == 3 and [s.count for s in man.shards] == [20, 20, 10]
    assert man.teacher["family"] == "toy" and len(man.teacher["fingerprint"]) == 16
    assert man.pairs_per_s > 0
    sh = load_file(str(tmp_path / "shard_00001.safetensors"))
    assert sh["noise"].dtype == torch.float16 and sh["tokens"].dtype == torch.int16
    assert sh["seeds"].tolist() == pair_seeds(3, 1, 20)
    # regenerate from the stored (fp16) noise: identical tokens
    again = teacher.generate(
        sh["labels"],
        SamplingParams(),
        sh["noise"].float(),
        chooser=FlowChooser(teacher.codebook, FlowSolver(16)),
    )
    assert torch.equal(again, sh["tokens"].long())
    # the stored noise is the fp16 rounding of the seeds' noise
    assert torch.equal(sh["noise"], teacher.noise(sh["seeds"].tolist()).half())
    ds = TrajectoryDataset(tmp_path)
    assert len(ds) == N and set(ds.labels.tolist()) <= set(range(teacher.num_classes))
    assert len(set(ds.seeds.tolist())) == N
    t = torch.tensor([0, 2, 6, 3])
    x, tok, _ = ds.batch(torch.tensor([0, 1, 2, 3]), t, teacher.codebook)
    for b in range(4):
        tb = int(t[b])
        assert torch.equal(x[b, :tb], teacher.codebook[tok[b, :tb]])
        assert torch.equal(x[b, tb:], ds.noise[b, tb:].float())
    marg = ds.marginals()
    torch.testing.assert_close(marg.sum(-1), torch.ones(teacher.seq_len, dtype=torch.float64))


def test_build_xt_scalar_t():
    noise = torch.randn(2, 5, 3)
    tokens = torch.randint(0, 4, (2, 5))
    cb = torch.randn(4, 3)
    x = build_xt(noise, tokens, 2, cb)
    assert torch.equal(x[:, :2], cb[tokens[:, :2]]) and torch.equal(x[:, 2:], noise[:, 2:])


def test_deterministic_and_batch_size_independent(tmp_path):
    _gen(tmp_path / "a")
    _gen(tmp_path / "b", batch_size=7)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_resume_after_kill_finishes_only_missing_shards(tmp_path):
    out = tmp_path / "run"
    man = _gen(out, shard_ids=[0, 1])
    assert not man.complete and man.done == 40
    s0 = out / "shard_00000.safetensors"
    before = (s0.stat().st_mtime_ns, s0.read_bytes())
    # a kill during shard 2: its tensors were written but not its metadata, plus a stray temp file
    (out / "shard_00002.safetensors").write_bytes(b"half-written")
    (out / ".shard_00002.safetensors.xyz.tmp").write_bytes(b"junk")
    man = _gen(out)
    assert man.complete
    assert (s0.stat().st_mtime_ns, s0.read_bytes()) == before
    _gen(tmp_path / "straight")
    assert _digests(out) == _digests(tmp_path / "straight")
    verify_shards(out)


def test_corrupt_shard_is_detected_and_regenerated(tmp_path):
    _gen(tmp_path)
    good = _digests(tmp_path)
    s0 = tmp_path / "shard_00000.safetensors"
    t0 = s0.stat().st_mtime_ns
    s1 = tmp_path / "shard_00001.safetensors"
    data = bytearray(s1.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor payload
    s1.write_bytes(bytes(data))
    with pytest.raises(TrajectoryError, match="corrupt shards \\[1\\]"):
        verify_shards(tmp_path)
    with pytest.raises(TrajectoryError):
        TrajectoryDataset(tmp_path)
    man = _gen(tmp_path)
    assert man.complete and _digests(tmp_path) == good
    assert s0.stat().st_mtime_ns == t0


def test_extending_the_set_keeps_finished_shards(tmp_path):
    _gen(tmp_path / "grow")  # 50 pairs: shards of 20, 20, 10
    s1 = tmp_path / "grow" / "shard_00001.safetensors"
    before = (s1.stat().st_mtime_ns, s1.read_bytes())
    man = _gen(tmp_path / "grow", num_pairs=70)  # 20, 20, 20, 10: shard 2 completed, shard 3 added
    assert man.complete and [s.count for s in man.shards] == [20, 20, 20, 10]
    assert (s1.stat().st_mtime_ns, s1.read_bytes()) == before
    _gen(tmp_path / "fresh", num_pairs=70)
    assert _digests(tmp_path / "grow") == _digests(tmp_path / "fresh")
    assert len(TrajectoryDataset(tmp_path / "grow")) == 70


def test_other_configuration_is_refused(tmp_path):
    _gen(tmp_path, shard_ids=[0])
    with pytest.raises(TrajectoryError, match="configuration"):
        _gen(tmp_path, flow=FlowParams(steps=8))


def test_replace_regenerates_other_configuration_in_place(tmp_path):
    _gen(tmp_path / "old", num_pairs=70)  # 4 shards of the old flow
    other = FlowParams(steps=8)
    _gen(tmp_path / "old", flow=other, replace=True, shard_ids=[1])  # one parallel worker's share
    assert [s.shard_id for s in load_manifest(tmp_path / "old").shards] == [1]
    man = _gen(tmp_path / "old", flow=other, replace=True)  # the all-shards call
    assert man.complete and man.num_shards == 3
    assert not (tmp_path / "old" / "shard_00003.safetensors").exists()  # beyond the new range
    assert not (tmp_path / "old" / "shard_00003.json").exists()
    _gen(tmp_path / "fresh", flow=other)
    assert _digests(tmp_path / "old") == _digests(tmp_path / "fresh")


def test_parallel_processes_on_disjoint_shards(tmp_path):
    out = str(tmp_path / "par")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=generate_toy_shards, args=(out, ids, N, SHARD)) for ids in ([0, 2], [1])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    man = load_manifest(out)
    assert man.complete, [s.shard_id for s in man.shards]
    _gen(tmp_path / "serial")
    assert _digests(out) == _digests(tmp_path / "serial")
    assert not any(f.endswith(".tmp") for f in os.listdir(out))

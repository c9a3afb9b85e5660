"""The tiny world end to end at micro scale: evaluator, preparation, strict reload, resumability."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ddcore.checkpoints import CheckpointError, load_model_config, load_state_dict_file, save_model
from ddcore.hashing import json_digest
from ddcore.params import SamplingParams, TinyWorldParams, load_preset
from ddcore.teachers.llamagen.teacher import LlamaGenTeacher
from ddcore.teachers.llamagen.tiny_world import (
    check_quality,
    load_tiny_world,
    prepare_tiny_world,
    stage_hashes,
)
from ddcore.tiny.builder import WorldBuilder, part_hash
from ddcore.tiny.data import make_dataset, make_dataset_with_attributes, to_model_range, to_unit
from ddcore.tiny.evaluator import (
    EvaluatorConfig,
    TinyEvaluator,
    accuracy,
    augment,
    load_evaluator,
    save_evaluator,
    train_evaluator,
)

PARTS = ("evaluator", "vq", "tokens", "gpt", "quality")
FILES = [f"{p}.{ext}" for p in ("evaluator", "vq", "tokens", "gpt") for ext in ("safetensors", "json")]


@pytest.fixture(scope="module")
def micro() -> TinyWorldParams:
    world = load_preset("micro").teacher.world
    assert world is not None
    return world


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, micro):
    out = tmp_path_factory.mktemp("micro_world")
    torch.set_num_threads(2)
    report = prepare_tiny_world(micro, out, progress=False, sampling=SamplingParams(cfg_scale=3.0))
    return out, report


# --------------------------------------------------------------------------------------------
# evaluator
# --------------------------------------------------------------------------------------------
def test_evaluator_learns_and_round_trips(tmp_path):
    images, labels, attrs = make_dataset_with_attributes(1000, 32, 10, seed=0)
    cfg = EvaluatorConfig(image_size=32, num_classes=10)
    model = train_evaluator(images, labels, attrs, cfg, steps=60, batch_size=32, seed=0, progress=False)
    held, held_labels = make_dataset(300, 32, 10, seed=123)
    x = to_unit(held)
    acc = accuracy(model, x, held_labels)
    assert acc > 0.5, f"60 steps should be far above chance (0.1), got {acc}"
    feats = model.features(x[:7])
    assert feats.shape == (7, cfg.feature_dim)
    assert model(x[:7]).shape == (7, 10)

    save_evaluator(tmp_path / "ev", model, {"hash": "abc"})
    meta = json.loads((tmp_path / "ev.json").read_text())
    assert meta["hash"] == "abc" and meta["config"]["feature_dim"] == cfg.feature_dim
    again = load_evaluator(tmp_path / "ev")
    torch.testing.assert_close(again.features(x[:7]), feats, rtol=0, atol=0)


def test_evaluator_load_is_strict(tmp_path):
    model = TinyEvaluator(EvaluatorConfig(width=16))
    save_evaluator(tmp_path / "ev", model)
    meta = json.loads((tmp_path / "ev.json").read_text())
    meta["config"]["width"] = 32  # the weights no longer fit the config
    (tmp_path / "ev.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_evaluator(tmp_path / "ev")


def test_augment_keeps_range_and_changes_pixels_slightly():
    images, _ = make_dataset(64, 32, 10, seed=0)
    x = to_unit(images)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0.0 and y.max() <= 1.0
    diff = (y - x).abs().mean().item()
    assert 0.005 < diff < 0.1, diff


# --------------------------------------------------------------------------------------------
# quality bar
# --------------------------------------------------------------------------------------------
def _report(**quality) -> dict:
    world = TinyWorldParams().model_dump()
    base = {"evaluator_accuracy_real": 0.995, "recon_accuracy_ratio": 0.97, "cfg_sample_accuracy": 0.93}
    return {"world": world, "quality": {**base, **quality}}


def test_check_quality_passes_and_names_each_failure():
    assert check_quality(_report()) == []
    problems = check_quality(_report(cfg_sample_accuracy=0.85))
    assert len(problems) == 1 and "CFG samples" in problems[0] and "0.85" in problems[0]
    problems = check_quality(_report(recon_accuracy_ratio=0.9, evaluator_accuracy_real=0.5))
    assert len(problems) == 2
    assert any("reconstructions" in p for p in problems) and any("real images" in p for p in problems)
    problems = check_quality(_report(cfg_sample_accuracy=float("nan")))
    assert problems and "no measurement" in problems[0]
    report = _report()
    del report["quality"]["recon_accuracy_ratio"]
    assert "no measurement" in check_quality(report)[0]


def test_check_quality_takes_the_bars_of_the_given_world():
    """The prepare stage gates with the preset's world, not with the bars a report recorded."""
    report = _report(cfg_sample_accuracy=0.93)
    stricter = TinyWorldParams(min_sample_accuracy=0.95)
    problems = check_quality(report, stricter)
    assert len(problems) == 1 and "0.95" in problems[0]
    assert check_quality(report, TinyWorldParams(min_sample_accuracy=0.9)) == []


# --------------------------------------------------------------------------------------------
# the micro world end to end
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_micro_world_prepares_and_reports(prepared, micro):
    out, report = prepared
    for name in [*FILES, "world.json", "quality.json", "samples.png", "reconstructions.png"]:
        assert (out / name).is_file(), name
    assert json.loads((out / "world.json").read_text()) == json.loads(json.dumps(report))
    assert report["reused"] == []
    assert set(report["timings_s"]) == {"data", *PARTS}
    assert all(report["timings_s"][p] > 0 for p in PARTS)
    q = report["quality"]
    for key in ("evaluator_accuracy_real", "evaluator_accuracy_recon", "cfg_sample_accuracy"):
        assert 0.0 <= q[key] <= 1.0
    assert q["num_samples"] == micro.num_classes * micro.quality_samples_per_class
    assert math.isfinite(q["holdout_nll"]) and q["holdout_nll"] > 0
    assert report["problems"] == check_quality(report) == []  # micro's bars are off by design
    assert report["tokens"]["seq_len"] == 64
    assert report["hashes"] == stage_hashes(micro, SamplingParams(cfg_scale=3.0))


@pytest.mark.slow
def test_micro_world_loads_back_strictly(prepared, micro):
    out, _ = prepared
    teacher, evaluator = load_tiny_world(out)
    assert isinstance(teacher, LlamaGenTeacher)
    assert teacher.seq_len == 64 and teacher.vocab_size == micro.vq_codebook_size
    assert teacher.image_size == micro.image_size and teacher.num_classes == micro.num_classes
    labels = torch.tensor([0, 3, 7])
    params = SamplingParams(cfg_scale=3.0)
    tokens = teacher.sample(labels, [1, 2, 3], params)
    assert tokens.shape == (3, 64) and int(tokens.min()) >= 0 and int(tokens.max()) < micro.vq_codebook_size
    assert torch.equal(tokens, teacher.sample(labels, [1, 2, 3], params)), "sampling is seeded per image"
    images = teacher.decode(tokens)
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0.0 and images.max() <= 1.0
    assert evaluator(images).shape == (3, micro.num_classes)
    # the saved GPT reproduces the training run's held-out NLL exactly (weights loaded, not re-initialised)
    report = json.loads((out / "world.json").read_text())
    from ddcore.teachers.llamagen.tiny_gpt import mean_nll
    from ddcore.teachers.llamagen.tiny_vq import tokenize
    from ddcore.teachers.llamagen.tiny_world import HOLDOUT_SEED_OFFSET

    held, held_labels = make_dataset(
        micro.holdout_images, micro.image_size, micro.num_classes, micro.seed + HOLDOUT_SEED_OFFSET
    )
    toks = tokenize(teacher.vq, to_model_range(held))
    nll = mean_nll(teacher.gpt, toks, torch.as_tensor(held_labels))
    assert nll == pytest.approx(report["quality"]["holdout_nll"], rel=1e-5)


@pytest.mark.slow
def test_second_call_reuses_everything(prepared, micro):
    out, first = prepared
    mtimes = {f: (out / f).stat().st_mtime_ns for f in FILES}
    again = prepare_tiny_world(micro, out, progress=False, sampling=SamplingParams(cfg_scale=3.0))
    assert again["reused"] == list(PARTS)
    assert all(again["timings_s"][p] == 0.0 for p in PARTS)
    # the procedural data is regenerated (cheap, seeded) on every call, so only its timing may differ
    trained = [k for k in first["build_s"] if k != "data"]
    assert {k: again["build_s"][k] for k in trained} == {k: first["build_s"][k] for k in trained}
    assert again["quality"] == first["quality"]
    assert {f: (out / f).stat().st_mtime_ns for f in FILES} == mtimes


@pytest.mark.slow
def test_changed_gpt_params_rebuild_only_the_gpt(tmp_path, prepared, micro):
    src, _ = prepared
    out = tmp_path / "copy"
    out.mkdir()
    for f in [*FILES, "quality.json"]:
        (out / f).write_bytes((src / f).read_bytes())
    changed = micro.model_copy(update={"gpt_steps": micro.gpt_steps + 5})
    report = prepare_tiny_world(changed, out, progress=False, sampling=SamplingParams(cfg_scale=3.0))
    assert report["reused"] == ["evaluator", "vq", "tokens"]
    assert json.loads((out / "gpt.json").read_text())["hash"] == report["hashes"]["gpt"]
    # other sampling parameters only redo the quality measurement
    report = prepare_tiny_world(changed, out, progress=False, sampling=SamplingParams(cfg_scale=2.0))
    assert report["reused"] == ["evaluator", "vq", "tokens", "gpt"]
    assert report["sampling"]["cfg_scale"] == 2.0


def test_hashes_chain_through_dependencies(micro):
    s = SamplingParams(cfg_scale=3.0)
    base = stage_hashes(micro, s)
    vq = stage_hashes(micro.model_copy(update={"vq_steps": micro.vq_steps + 1}), s)
    assert vq["evaluator"] == base["evaluator"]
    assert all(vq[p] != base[p] for p in ("vq", "tokens", "gpt", "quality"))
    data = stage_hashes(micro.model_copy(update={"seed": micro.seed + 1}), s)
    assert all(data[p] != base[p] for p in PARTS)
    bars = stage_hashes(micro.model_copy(update={"min_sample_accuracy": 0.5}), s)
    assert bars == base, "quality thresholds do not change any artefact"


def test_tiny_preset_is_the_quality_configuration():
    """The tiny preset keeps the documented gates (micro relaxes them, tiny must not), the
    CFG-sample accuracy target of 0.90 included (docs/tiny-world.md)."""
    tiny = load_preset("tiny").teacher.world
    assert tiny is not None
    assert tiny.min_sample_accuracy >= 0.90 and tiny.min_recon_ratio >= 0.95
    assert tiny.min_evaluator_accuracy >= 0.98
    assert tiny.image_size // 2 ** (len(tiny.vq_ch_mult) - 1) == 8, "64 tokens per image"
    assert np.isclose(tiny.class_dropout_prob, 0.1)


def test_stage_hashes_are_the_ones_prepared_worlds_store():
    """Pinned: the hashes the code before ddcore.tiny.builder wrote into users' worlds (computed by
    that code). A change rebuilds every prepared world; bump CODE_VERSIONS deliberately instead."""
    assert stage_hashes(TinyWorldParams(), SamplingParams(cfg_scale=3.0)) == {
        "data": "92381e677ef0bdd9",
        "evaluator": "ce33fb4e50d5826c",
        "vq": "f49dbf7b4cfec538",
        "tokens": "8451bf8783c9e930",
        "gpt": "efbda2bf7d965123",
        "quality": "f5af36f46b8ad645",
    }
    assert part_hash(2, {"vq_steps": 5}, data="abc") == json_digest({"v": 2, "data": "abc", "vq_steps": 5})


# --------------------------------------------------------------------------------------------
# the shared builder (ddcore.tiny.builder), without training
# --------------------------------------------------------------------------------------------
def _build(out, hashes: dict, built: list[str]) -> tuple[WorldBuilder, dict]:
    """Three parts: plain (metadata in the JSON), sidecar (plain config JSON), JSON-only."""

    def make(name: str, value: float):
        def build():
            built.append(name)
            return {"x": torch.full((2,), value)}, {"stats": {"value": value}}

        return build

    def load(name: str):
        return lambda meta: load_state_dict_file(out / f"{name}.safetensors")

    def save_plain_config(sd: dict, meta: dict) -> None:
        save_model(out / "side", sd, {"c": 1})

    def measure() -> dict:
        built.append("q")
        return {"acc": 0.5}

    with WorldBuilder(out, hashes) as b:
        got = {"data": b.step("data", lambda: 1)}
        got["plain"] = b.part("plain", load("plain"), make("plain", 1.0))
        got["side"] = b.part("side", load("side"), make("side", 2.0), save_plain_config, sidecar=True)
        got["q"] = b.json_part("q", measure)
    return b, got


def test_builder_reuses_parts_whose_hash_matches(tmp_path):
    hashes = {"data": "d", "plain": "p1", "side": "s1", "q": "q1"}
    built: list[str] = []
    b, got = _build(tmp_path, hashes, built)
    assert built == ["plain", "side", "q"] and b.reused == []
    assert got["q"] == {"acc": 0.5} and torch.equal(got["side"]["x"], torch.full((2,), 2.0))
    assert load_model_config(tmp_path / "plain")["hash"] == "p1"
    assert load_model_config(tmp_path / "side") == {"c": 1}, "a sidecar part's JSON stays a plain config"
    assert json.loads((tmp_path / "side.part.json").read_text())["stats"] == {"value": 2.0}
    assert json.loads((tmp_path / "q.json").read_text())["hash"] == "q1"
    s = b.summary()
    assert s["hashes"] == hashes and set(s["build_s"]) == set(s["timings_s"]) == {
        "data",
        "plain",
        "side",
        "q",
    }
    assert s["machine"]["torch_threads"] >= 1

    built.clear()
    b, again = _build(tmp_path, hashes, built)
    assert built == [] and b.reused == ["plain", "side", "q"]
    assert b.metas["side"]["stats"] == {"value": 2.0} and again["q"] == {"acc": 0.5}
    assert all(b.timings[p] == 0.0 for p in b.reused)

    # another hash rebuilds that part only; an interrupted sidecar save (no record) is rebuilt
    (tmp_path / "side.part.json").unlink()
    b, _ = _build(tmp_path, {**hashes, "plain": "p2"}, built)
    assert built == ["plain", "side"] and b.reused == ["q"]

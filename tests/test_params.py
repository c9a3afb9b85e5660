"""params.yaml validation: every preset loads, and bad values fail naming the key path and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ddcore.params import (
    PARAMS_FILE,
    ParamsError,
    Preset,
    deep_merge,
    load_preset,
    load_presets,
    parse_override,
)
from ddcore.pipeline.presets import check_registered, resolve_preset
from ddcore.teachers.registry import get_family

VALID = {
    "family": "llamagen",
    "teacher": {"name": "micro", "sampling": {"top_p": 1.0, "top_k": 0}},
    "dd1": {
        "trajectories": {"num_pairs": 64, "shard_size": 32, "batch_size": 32},
        "train": {"steps": 10, "batch_size": 8},
    },
}


def write_params(tmp_path: Path, preset: dict, name: str = "p") -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"presets": {name: preset}}))
    return path


def broken(**changes) -> dict:
    """VALID with nested changes; a value of ... deletes the key."""
    out = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        keys = dotted.split("__")
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is ...:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return out


def error_of(tmp_path: Path, preset: dict) -> str:
    """The message of resolving the preset for work (schema, then the registered families)."""
    with pytest.raises(ParamsError) as e:
        resolve_preset("p", [], write_params(tmp_path, preset))
    return str(e.value)


def test_every_preset_in_the_project_validates():
    presets = load_presets(PARAMS_FILE)
    assert {"micro", "tiny"} <= set(presets), "the offline presets must exist"
    for name in presets:
        p = check_registered(name, load_preset(name))
        assert isinstance(p, Preset)
        assert p.teacher.name in get_family(p.family).teachers


def test_valid_minimal_preset_gets_defaults(tmp_path):
    p = load_preset("p", write_params(tmp_path, VALID))
    assert p.dd1.train.steps == 10 and p.dd1.trajectories.shard_size == 32
    assert p.dd1.flow.solver in ("euler", "heun")  # untouched sections take their defaults
    assert p.method == "dd1" and p.headline is None
    assert p.promote.max_fid_ratio == 1.0


def test_unknown_teacher_names_key_and_allowed_values(tmp_path):
    msg = error_of(tmp_path, broken(teacher__name="llamagen-z"))
    assert "presets.p.teacher.name" in msg
    assert "llamagen-z" in msg
    for allowed in ("tiny", "micro", "llamagen-b"):
        assert allowed in msg
    msg = error_of(tmp_path, broken(teacher__name="var-d16"))  # a VAR teacher in a LlamaGen preset
    assert "unknown llamagen teacher 'var-d16'" in msg


def test_negative_steps(tmp_path):
    msg = error_of(tmp_path, broken(dd1__train__steps=-5))
    assert "presets.p.dd1.train.steps" in msg
    assert "greater than or equal to 1" in msg and "-5" in msg


@pytest.mark.parametrize(
    "top_p, bound", [(0.0, "greater than 0"), (1.5, "less than or equal to 1"), (-0.1, "greater than 0")]
)
def test_top_p_outside_unit_interval(tmp_path, top_p, bound):
    msg = error_of(tmp_path, broken(teacher__sampling__top_p=top_p))
    assert "presets.p.teacher.sampling.top_p" in msg
    assert bound in msg


def test_top_p_one_is_allowed(tmp_path):
    assert (
        load_preset("p", write_params(tmp_path, broken(teacher__sampling__top_p=1.0))).teacher.sampling.top_p
        == 1.0
    )


def test_missing_key(tmp_path):
    msg = error_of(tmp_path, broken(family=...))
    assert "presets.p.family: required key is missing" in msg
    msg = error_of(tmp_path, broken(teacher__name=...))
    assert "presets.p.teacher.name: required key is missing" in msg


def test_unknown_key_is_a_typo_not_ignored(tmp_path):
    msg = error_of(tmp_path, broken(dd1__train__lrr=1e-3))
    assert "presets.p.dd1.train.lrr" in msg and "unknown key" in msg
    msg = error_of(tmp_path, broken(train={"steps": 3}))  # DD1's sections live under dd1:
    assert "presets.p.train" in msg and "unknown key" in msg


def test_wrong_literal_lists_allowed_values(tmp_path):
    msg = error_of(tmp_path, broken(dd1__flow__solver="rk4"))
    assert "presets.p.dd1.flow.solver" in msg and "'euler'" in msg and "'heun'" in msg
    msg = error_of(tmp_path, broken(family="diffusion"))
    assert "presets.p.family: unknown family 'diffusion'; allowed: llamagen, var" in msg
    msg = error_of(tmp_path, broken(method="dd9"))
    assert "presets.p.method" in msg and "'dd1'" in msg


def test_guidance_has_one_meaning_and_a_clear_error(tmp_path):
    """cfg_scale is the weight w of uncond + w (cond - uncond) in every family: 1 is off."""
    msg = error_of(tmp_path, broken(teacher__sampling__cfg_scale=-1.0))
    assert "presets.p.teacher.sampling.cfg_scale" in msg and "greater than or equal to 0" in msg
    var = broken(family="var", teacher__name="micro-var", teacher__sampling__temperature=0.5)
    msg = error_of(tmp_path, var)
    assert "presets.p.teacher.sampling: VAR samples without temperature" in msg


def test_headline_must_be_an_evaluated_sampler(tmp_path):
    msg = error_of(tmp_path, broken(headline="dd1-7step"))
    assert "headline 'dd1-7step' is not in eval.samplers" in msg
    p = resolve_preset("p", [], write_params(tmp_path, broken(headline="dd1-2step")))
    assert p.headline == "dd1-2step"


def test_all_problems_reported_at_once(tmp_path):
    msg = error_of(tmp_path, broken(dd1__train__steps=0, teacher__sampling__top_p=2.0, eval__num_samplez=3))
    assert "dd1.train.steps" in msg and "top_p" in msg and "num_samplez" in msg


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(ParamsError, match=r"unknown preset 'nope'; allowed: p"):
        load_preset("nope", write_params(tmp_path, VALID))


def test_missing_presets_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {steps: 3}\n")
    with pytest.raises(ParamsError, match="top-level key 'presets'"):
        load_presets(path)


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write_params(tmp_path, VALID)
    p = load_preset("p", path, overrides=parse_override("dd1.train.lr=1e-4"))
    assert p.dd1.train.lr == pytest.approx(1e-4) and p.dd1.train.steps == 10  # siblings survive the merge
    with pytest.raises(ParamsError, match=r"presets\.p\.dd1\.trajectories\.num_pairs"):
        load_preset("p", path, overrides=parse_override("dd1.trajectories.num_pairs=-1"))


def test_parse_override_and_deep_merge():
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}
    assert parse_override("eval.samplers=[teacher, dd1-1step]") == {
        "eval": {"samplers": ["teacher", "dd1-1step"]}
    }
    assert parse_override("teacher.source=s3://b/k=v.pt") == {"teacher": {"source": "s3://b/k=v.pt"}}
    with pytest.raises(ParamsError, match="key.path=value"):
        parse_override("train.lr")
    assert deep_merge({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}}) == {"a": {"x": 1, "y": 3}}


def test_presets_are_frozen():
    p = Preset.model_validate(VALID)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError for frozen instances
        p.dd1 = None  # type: ignore[misc]

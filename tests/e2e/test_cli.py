"""The `ddcore` console command: help everywhere, params validated before any work, real stages.

Fast tests call `main()` in-process on a copy of params.yaml in a temp root; the stage tests reuse
the session's micro pipeline (tests/fixtures/micro_project.py) through the installed console script.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml
from micro_project import PRESET, MicroProject, micro_project
from PIL import Image
from servers import BIN, ROOT, base_env

from ddcore import cli
from ddcore.params import load_preset

SUBCOMMANDS = (
    "prepare",
    "trajectories",
    "distill",
    "evaluate",
    "bench",
    "register",
    "pipeline",
    "sample",
    "params",
)


@pytest.fixture
def root(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_help_on_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for sub in SUBCOMMANDS:
        assert sub in top
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: ddcore {sub}" in text and "--preset" in text and "--set" in text


def test_console_script_is_installed():
    p = subprocess.run([str(BIN / "ddcore"), "sample", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--sampler" in p.stdout and "--out" in p.stdout


def test_params_prints_the_resolved_preset(root, capsys):
    assert (
        cli.main(["--root", str(root), "params", "--preset", PRESET, "--set", "dd1.train.steps=7", "--json"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["dd1"]["train"]["steps"] == 7
    over = {"dd1": {"train": {"steps": 7}}}
    assert data == load_preset(PRESET, root / "params.yaml", overrides=over).model_dump(mode="json")
    assert cli.main(["--root", str(root), "--preset", PRESET, "params"]) == 0  # global --preset, YAML
    assert yaml.safe_load(capsys.readouterr().out)[PRESET]["teacher"]["name"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("dd1.train.steps=-5", "presets.micro.dd1.train.steps"),
        ("teacher.sampling.top_p=1.5", "presets.micro.teacher.sampling.top_p"),
        ("teacher.name=llamagen-z", "unknown llamagen teacher 'llamagen-z'; allowed: llamagen-b,"),
        ("dd1.train.lrr=0.1", "presets.micro.dd1.train.lrr: unknown key"),
        ("family=nosuch", "presets.micro.family: unknown family 'nosuch'"),
        ("trainsteps", "must look like key.path=value"),
    ],
)
def test_invalid_overrides_fail_before_any_work(root, capsys, override, expected):
    code = cli.main(["--root", str(root), "distill", "--preset", PRESET, "--set", override])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"], "nothing may be created"


def test_unknown_preset_lists_the_presets(root, capsys):
    assert cli.main(["--root", str(root), "prepare", "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "micro" in err and "tiny" in err


def test_stage_without_its_input_says_what_to_run_first(root, capsys):
    assert cli.main(["--root", str(root), "--quiet", "distill", "--preset", PRESET]) == 1
    assert "stage 'trajectories'" in capsys.readouterr().err


def test_bad_cli_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["trajectories", "--shards", "a,b"])
    assert e.value.code == 2 and "comma-separated integers" in capsys.readouterr().err


def _console(root, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The installed `ddcore` command as a user runs it (its own process, no network)."""
    full = {**base_env(), "HF_HUB_OFFLINE": "1", "DD_CACHE_DIR": str(root / ".cache"), **env}
    return subprocess.run(
        [str(BIN / "ddcore"), "--root", str(root), "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=full,
        cwd=root,
    )


def _sentence(p: subprocess.CompletedProcess) -> str:
    """The error's line: stderr's last line; no traceback anywhere."""
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    return p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args, code, expected",
    [
        (
            ("sample", "--preset", PRESET, "--sampler", "nosuch", "--out", "x.png"),
            1,
            "run `ddcore prepare --preset micro` first",
        ),
        (("prepare", "--preset", "llamagen-b"), 1, "download it where the Hub is reachable"),
        (("distill", "--preset", PRESET, "--set", "dd1.train.lr=abc"), 2, "presets.micro.dd1.train.lr"),
        (("distill", "--preset", "nope"), 2, "unknown preset 'nope'"),
        (("evaluate", "--preset", PRESET), 1, "has not completed"),
    ],
)
def test_bad_input_ends_in_one_sentence_and_a_status(root, args, code, expected):
    p = _console(root, *args)
    assert p.returncode == code, p.stderr
    line = _sentence(p)
    assert line.startswith("ddcore") and expected in line, line


def test_debug_shows_the_traceback(root):
    p = _console(root, "--debug", "evaluate", "--preset", PRESET)
    assert p.returncode != 0 and "Traceback" in p.stderr and "has not completed" in p.stderr.splitlines()[-1]


def test_a_garbage_checkpoint_is_named_corrupt(root):
    """Published-teacher files that are random bytes: prepare records them, the first command that
    loads them says in one sentence which file is corrupt."""
    for name in ("g1.pt", "g2.pt"):
        (root / name).write_bytes(np.random.default_rng(0).bytes(4096))
    sources = ("--set", f"teacher.source={root / 'g1.pt'}", "--set", f"teacher.vq_source={root / 'g2.pt'}")
    assert _console(root, "prepare", "--preset", "llamagen-b", *sources).returncode == 0
    p = _console(root, "sample", "--preset", "llamagen-b", *sources, "--out", "x.png")
    line = _sentence(p)
    assert (
        p.returncode == 1 and "g1.pt: corrupt or truncated checkpoint" in line and "neither a zip" in line
    ), line


# --------------------------------------------------------------------------------------------
# on the session's micro pipeline
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> MicroProject:
    return micro_project(tmp_path_factory)


def test_stages_are_idempotent(project):
    """Every finished stage returns at once when called again with the same params."""
    t0 = time.monotonic()
    p = project.ddcore(
        "-v", "pipeline", "--preset", PRESET, "--stages", "prepare,trajectories,distill,evaluate,bench"
    )
    seconds = time.monotonic() - t0
    for s in ("prepare", "trajectories", "distill", "evaluate", "bench"):
        assert f"{s}[{PRESET}]: complete, skipping" in p.stderr, p.stderr[-3000:]
    assert seconds < 120, f"skipping five finished stages took {seconds:.0f} s"
    summary = json.loads(p.stdout)
    assert set(summary) == {"prepare", "trajectories", "distill", "evaluate", "bench"}


def test_sample_teacher_and_student_to_png_and_npz(project, tmp_path):
    preset = load_preset(PRESET, project.root / "params.yaml")
    size = preset.teacher.world.image_size
    png = tmp_path / "grid.png"
    project.ddcore(
        "--quiet",
        "sample",
        "--preset",
        PRESET,
        "--sampler",
        "teacher",
        "-n",
        "6",
        "--nrow",
        "3",
        "--out",
        str(png),
    )
    w, h = Image.open(png).size
    assert (w, h) == (3 * size + 4 * 2, 2 * size + 3 * 2)  # make_grid: 2-px padding around every tile

    name = next(s for s in preset.eval.samplers if s.startswith("dd1"))
    npz1, npz2 = tmp_path / "a.npz", tmp_path / "b.npz"
    args = ["--quiet", "sample", "--preset", PRESET, "--sampler", name, "--labels", "0,1,1", "--seed", "40"]
    out = json.loads(project.ddcore(*args, "--out", str(npz1)).stdout)
    assert out["sampler"] == name and out["images"] == 3
    project.ddcore(*args, "--out", str(npz2))
    a, b = np.load(npz1), np.load(npz2)
    assert a["images"].shape == (3, size, size, 3) and a["images"].dtype == np.uint8
    assert list(a["labels"]) == [0, 1, 1] and list(a["seeds"]) == [40, 41, 42]
    assert np.array_equal(a["images"], b["images"])  # seeded: reproducible


def test_sample_rejects_labels_outside_the_classes(project, tmp_path):
    p = project.ddcore(
        "--quiet",
        "sample",
        "--preset",
        PRESET,
        "--labels",
        "999",
        "--out",
        str(tmp_path / "x.png"),
        check=False,
    )
    assert p.returncode != 0 and "outside [0," in p.stderr


def test_distill_under_torchrun_matches_one_process(project, tmp_path):
    """DD_NPROC_PER_NODE=2: the stage runs the trainer under torchrun (gloo on CPU); DDP computes
    the single-process gradient, so the student equals the one the pipeline trained."""
    from safetensors.torch import load_file

    clone = tmp_path / "clone"
    shutil.copytree(project.root, clone, symlinks=True)
    shutil.rmtree(clone / "models" / PRESET / "student")
    p = MicroProject(clone, project.env | {"DD_NPROC_PER_NODE": "2"}, 0, "")
    out = json.loads(p.ddcore("--quiet", "distill", "--preset", PRESET).stdout)
    assert out["processes"] == 2 and out["summary"]["world_size"] == 2
    one = load_file(project.root / "models" / PRESET / "student" / "student.safetensors")
    two = load_file(clone / "models" / PRESET / "student" / "student.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-5), k
    assert (clone / "metrics" / PRESET / "train_log.csv").read_text().startswith("step")


def test_bench_json_holds_trajectory_and_training_throughput(project):
    """bench.json's `extra` carries pairs/s and samples/s measured by the bench run itself."""
    bench = json.loads((project.root / "metrics" / PRESET / "bench.json").read_text())
    traj, train = bench["extra"]["trajectories"], bench["extra"]["training"]
    preset = load_preset(PRESET, project.root / "params.yaml")
    assert traj["batch"] == preset.dd1.trajectories.batch_size and len(traj["times"]) == 2
    assert traj["pairs_per_s"] == pytest.approx(traj["batch"] / traj["seconds_per_batch"])
    assert (
        traj["pairs_per_s"] > 0 and traj["peak_mem_kind"] == "cpu_rss_sampled" and traj["peak_total_mb"] > 0
    )
    k1, k2 = train["timed_steps"]
    assert 0 < k1 < k2 < preset.dd1.train.steps
    if train["steps_per_s"] is not None:  # None only when the longer run measured quicker
        per_step = (train["run_seconds"][1] - train["run_seconds"][0]) / (k2 - k1)
        assert train["steps_per_s"] == pytest.approx(1 / per_step)
        assert train["samples_per_s"] == pytest.approx(preset.dd1.train.batch_size / per_step)

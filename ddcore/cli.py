"""The `ddcore` console command: one subcommand per pipeline stage, plus sampling and params.

DVC stages call these subcommands, so each takes `--preset` and `--set key.path=value`; the preset
(with overrides) is validated through `ddcore.params` before any work starts, and a bad value
fails with the key path and what is allowed. `--root DIR` makes params.yaml, data/, models/,
metrics/ and the default MLflow store relative to a checkout (what `dvc.yaml` uses).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ddcore.methods.registry import all_methods
from ddcore.params import ParamsError, Preset, deep_merge, load_preset, parse_override


def _method_stages() -> dict:
    """Every registered method's own stages, by name (first registration wins a shared name)."""
    out: dict = {}
    for m in all_methods():
        for s in m.stages:
            out.setdefault(s.name, s)
    return out


STAGE_COMMANDS = ("prepare", *_method_stages(), "evaluate", "bench", "register")


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand (`ddcore --preset x distill` or
    `ddcore distill --preset x`)."""
    d = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("experiment")
    g.add_argument(
        "--preset", default=d if suppress else "tiny", help="preset name in params.yaml (default: tiny)"
    )
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KEY.PATH=VALUE",
        default=d if suppress else [],
        help="override a preset value, e.g. --set dd1.train.lr=1e-4 (repeatable; value parsed as YAML)",
    )
    g.add_argument(
        "--root",
        type=Path,
        default=d,
        help="project directory holding params.yaml, data/, models/, metrics/ (default: the installed project)",
    )
    g.add_argument(
        "--params",
        type=Path,
        default=d,
        metavar="FILE",
        help="params file to read presets from (default: params.yaml of the project / --root)",
    )
    g.add_argument("--quiet", action="store_true", default=d if suppress else False, help="no progress bars")
    g.add_argument(
        "--debug",
        action="store_true",
        default=d if suppress else False,
        help="show the traceback of an error",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddcore",
        description="Distilled Decoding for image AR models: prepare a teacher, generate DD1 trajectories, "
        "distil a few-step student, evaluate, benchmark, register.",
        parents=[_common(suppress=False)],
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common(suppress=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[common])

    add("prepare", "prepare the teacher: train the offline tiny world, or fetch a published checkpoint")
    for stage in _method_stages().values():
        p = add(stage.name, stage.help)
        if stage.shards is not None:
            p.add_argument(
                "--shards", type=_int_list, default=None, metavar="I,J,...", help="only these shard ids"
            )
    add("evaluate", "FID / IS / precision / recall of every sampler; grids; FID vs steps")
    add("bench", "latency and throughput of every sampler on this machine")
    p = add("register", "log to MLflow, register dd-<teacher>, apply the champion/challenger gate")
    p.add_argument("--flow-run-id", default=None, help="Prefect flow-run id to tag the run with")
    p = add("pipeline", "all stages of the preset's method in order (each skips when already complete)")
    p.add_argument(
        "--stages",
        type=lambda s: [x for x in s.split(",") if x],
        default=None,
        metavar="S1,S2,...",
        help=f"a subset of the preset's stages (default: all; any of {','.join(STAGE_COMMANDS)})",
    )
    p = add("sample", "draw images from the teacher or a student sampler into a PNG grid or an .npz")
    p.add_argument(
        "--sampler", default="teacher", help="'teacher' or a name from eval.samplers (e.g. dd1-1step)"
    )
    p.add_argument(
        "--labels", type=_int_list, default=None, metavar="L1,L2,...", help="class labels (default: cycle)"
    )
    p.add_argument("-n", "--num", type=int, default=16, help="number of images when --labels is not given")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    p.add_argument(
        "--out", type=Path, required=True, help="output .png (grid) or .npz (uint8 images, labels, seeds)"
    )
    p.add_argument("--nrow", type=int, default=8, help="images per grid row")
    p = add("params", "print the resolved preset (after --set overrides)")
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")
    p.add_argument(
        "--stage-files",
        type=Path,
        default=None,
        metavar="DIR",
        help="write DIR/<stage>.json with exactly the values each stage reads (what dvc.yaml depends on)",
    )
    return parser


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def resolve_preset(name: str, overrides: Sequence[str], params_file: Path) -> Preset:
    """Validate preset + overrides before any work starts (ParamsError names the key path)."""
    merged: dict = {}
    for o in overrides:
        merged = deep_merge(merged, parse_override(o))
    return load_preset(name, params_file, overrides=merged or None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; an error ends it with one line on stderr naming what is wrong and a non-zero
    status (2: bad params or preset, 3: not available here, 1: anything else, 130: interrupted);
    `--debug` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from ddcore.pipeline.layout import Layout
    from ddcore.pipeline.presets import resolve_preset

    layout = Layout.create(args.preset, root=args.root)
    if args.params is not None:
        layout = dataclasses.replace(layout, params_file=args.params.resolve())
    try:
        preset = resolve_preset(args.preset, args.overrides, layout.params_file)
    except FileNotFoundError as e:
        print(f"ddcore: params file not found: {e.filename}", file=sys.stderr)
        return 2
    except (ParamsError, ValueError) as e:
        if args.debug:
            raise
        print(f"ddcore: {one_line(e)}", file=sys.stderr)
        return 2
    try:
        result = _dispatch(args, preset, layout, not args.quiet)
    except KeyboardInterrupt:
        print(
            f"ddcore {args.command}: interrupted; finished parts are kept and a re-run resumes",
            file=sys.stderr,
        )
        return 130
    except Exception as e:  # noqa: BLE001 - the user gets the sentence, --debug the traceback
        if args.debug:
            raise
        status = 3 if isinstance(e, NotImplementedError) else 1
        what = "not available: " if status == 3 else ""
        print(f"ddcore {args.command}: {what}{one_line(e)}{_hint(e)}", file=sys.stderr)
        return status
    if result is not None:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


def one_line(e: BaseException) -> str:
    """The error's message on one line (its lines joined), or its class name when it has none."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return text or type(e).__name__


def _hint(e: BaseException) -> str:
    """What to do, where the error class says it (the messages of ddcore's own errors say it already)."""
    from ddcore.checkpoints import CheckpointError
    from ddcore.pipeline.markers import StageError

    if isinstance(e, CheckpointError | StageError | ValueError | FileNotFoundError):
        return ""
    return f" ({type(e).__name__}; --debug shows the traceback)"


def _dispatch(args: argparse.Namespace, preset: Preset, layout, progress: bool):
    from ddcore.pipeline import plan, runner

    name = args.preset
    cmd = args.command
    if cmd == "params":
        if args.stage_files is not None:
            d = args.stage_files if args.stage_files.is_absolute() else Path.cwd() / args.stage_files
            return {"stage_files": [str(p) for p in plan.write_stage_params(preset, d)]}
        data = preset.model_dump(mode="json")
        if args.json:
            return data
        import yaml

        print(yaml.safe_dump({name: data}, sort_keys=False), end="")
        return None
    if cmd == "pipeline":
        out = runner.run_pipeline(name, preset, layout, args.stages, progress)
        return {s: _short(s, r) for s, r in out.items()}
    if cmd == "sample":
        return _sample(args, preset, layout)
    if cmd not in plan.stage_names(preset):
        raise SystemExit(f"ddcore {cmd}: preset {name!r} ({preset.method}) has no {cmd!r} stage")
    kw = {}
    if getattr(args, "shards", None) is not None:
        kw["shard_ids"] = args.shards
    if cmd == "register":
        kw["flow_run_id"] = args.flow_run_id
    return runner.run_stage(name, preset, layout, cmd, progress=progress, **kw)


def _short(stage: str, result) -> object:
    """Stage results can be large (tiny-world reports, manifests); the pipeline prints headlines."""
    if not isinstance(result, dict):
        return result
    if stage in ("evaluate", "bench"):
        key = "fid" if stage == "evaluate" else "sec_per_image"
        return {
            name: row.get(key)
            for name, row in (result.get("samplers") or {}).items()
            if isinstance(row, dict)
        }
    if stage == "trajectories":
        m = result.get("manifest") or {}
        return {k: m.get(k) for k in ("num_pairs", "num_shards", "config") if k in m}
    if stage == "distill":
        return {"processes": result.get("processes"), "final": result.get("final")}
    return {k: v for k, v in result.items() if not isinstance(v, dict | list) or k in ("decision", "scores")}


def _sample(args: argparse.Namespace, preset: Preset, layout) -> dict:
    import numpy as np
    import torch

    from ddcore.checkpoints import atomic_path
    from ddcore.pipeline.markers import StageError
    from ddcore.samplers.registry import build_samplers
    from ddcore.teachers.loading import TEACHER_INFO, load_teacher

    if not (layout.teacher_dir / TEACHER_INFO).is_file():
        raise StageError(
            f"no prepared teacher in {layout.teacher_dir}: run `ddcore prepare --preset {args.preset}` first"
        )
    teacher, _ = load_teacher(preset, layout.teacher_dir)
    (sampler,) = build_samplers([args.sampler], teacher, layout.student_dir, preset)
    labels = args.labels or [i % teacher.num_classes for i in range(args.num)]
    bad = [x for x in labels if not 0 <= x < teacher.num_classes]
    if bad:
        raise SystemExit(f"ddcore sample: labels {bad} outside [0, {teacher.num_classes})")
    seeds = [args.seed + i for i in range(len(labels))]
    from tqdm.auto import tqdm

    chunks = []
    step = 64
    for i in tqdm(range(0, len(labels), step), desc=f"sample {args.sampler}", disable=args.quiet):
        chunks.append(sampler.images(torch.tensor(labels[i : i + step]), seeds[i : i + step]).cpu())
    images = torch.cat(chunks).clamp(0, 1)
    out: Path = args.out
    if out.suffix == ".npz":
        u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, images=u8, labels=np.array(labels), seeds=np.array(seeds))
    elif out.suffix.lower() == ".png":
        from PIL import Image
        from torchvision.utils import make_grid

        grid = make_grid(images, nrow=args.nrow, padding=2, pad_value=1.0)
        arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        with atomic_path(out) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
    else:
        raise SystemExit(f"ddcore sample: --out must end in .png or .npz, got {out.name!r}")
    return {"out": str(out), "sampler": sampler.name, "steps": sampler.steps, "images": len(labels)}


if __name__ == "__main__":
    raise SystemExit(main())

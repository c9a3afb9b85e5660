"""The pipeline stages: prepare -> trajectories -> distill -> evaluate -> bench -> register.

One function per stage. The Prefect flow (`flows/distill.py`), the DVC stages (`dvc.yaml`, via the
`ddcore` console command) and `ddcore pipeline` all call these, so there is exactly one definition
of what a stage does and where its files go.

Every stage is idempotent: when it finishes it writes a marker holding a fingerprint of the
parameters it depends on (chained with the fingerprints of the stages it reads from) and of the
files it wrote. A later call with the same fingerprint and intact outputs returns the recorded
result without doing the work again; DVC deleting an output before a rerun invalidates the marker
because the output is gone. Heavy imports happen inside the stages so that `ddcore --help` and the
orchestrators stay fast.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddcore.checkpoints import atomic_write_json, atomic_write_text
from ddcore.params import PARAMS_FILE, Preset, load_preset
from ddcore.settings import Settings, get_settings

log = logging.getLogger("ddcore.stages")

STAGES = ("prepare", "trajectories", "distill", "evaluate", "bench", "register")


class StageError(RuntimeError):
    """A stage ran but its result is unusable (e.g. a teacher failing its quality checks)."""


TINY_TEACHERS = frozenset({"tiny", "micro", "tiny-var", "micro-var"})
MARKER = "_stage.json"
# set only in the workers `_torchrun_distill` starts (not inferred from LOCAL_RANK, which any
# launcher or leftover environment may carry): they train; the parent keeps the bookkeeping
TORCHRUN_WORKER = "DD_TORCHRUN_WORKER"


# --------------------------------------------------------------------------------------------
# where a preset's files live
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """All paths of one preset, derived from the settings roots (or from one project root)."""

    preset: str
    data_root: Path
    model_root: Path
    metrics_root: Path
    project_root: Path
    tracking_uri: str
    params_file: Path = PARAMS_FILE

    @classmethod
    def create(cls, preset: str, settings: Settings | None = None, root: Path | str | None = None) -> Layout:
        """`root` (used by DVC on a checkout) puts params.yaml, data/, models/, metrics/ and the
        default MLflow store under that directory; otherwise the settings roots are used."""
        s = settings or get_settings()
        if root is not None:
            r = Path(root).resolve()
            uri = s.mlflow_tracking_uri or f"sqlite:///{r / 'mlflow.db'}"
            return cls(preset, r / "data", r / "models", r / "metrics", r, uri, r / "params.yaml")
        return cls(
            preset,
            Path(s.data_root),
            Path(s.model_root),
            Path(s.metrics_root),
            Path(s.project_root),
            s.tracking_uri,
            PARAMS_FILE,
        )

    @property
    def teacher_dir(self) -> Path:
        return self.model_root / self.preset / "teacher"

    @property
    def traj_dir(self) -> Path:
        return self.data_root / self.preset / "trajectories"

    @property
    def student_dir(self) -> Path:
        return self.model_root / self.preset / "student"

    @property
    def metrics_dir(self) -> Path:
        return self.metrics_root / self.preset

    @property
    def eval_json(self) -> Path:
        return self.metrics_dir / "eval.json"

    @property
    def bench_json(self) -> Path:
        return self.metrics_dir / "bench.json"

    @property
    def train_log(self) -> Path:
        """Copy of the student's train_log.csv where DVC can plot it (outside the model dir)."""
        return self.metrics_dir / "train_log.csv"

    @property
    def fid_curve(self) -> Path:
        return self.metrics_dir / "fid_vs_steps.csv"

    @property
    def registry_json(self) -> Path:
        return self.metrics_dir / "registry.json"

    @property
    def state_dir(self) -> Path:
        """Markers of file-output stages (kept out of the committed metrics folder)."""
        return self.data_root / self.preset / ".stages"


def layout_for(preset_name: str, root: Path | str | None = None) -> Layout:
    return Layout.create(preset_name, root=root)


# --------------------------------------------------------------------------------------------
# idempotency markers
# --------------------------------------------------------------------------------------------
def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Marker:
    stage: str
    fingerprint: str
    result: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 (file outputs only)


def _marker_path(layout: Layout, stage: str) -> Path:
    dirs = {"prepare": layout.teacher_dir, "trajectories": layout.traj_dir, "distill": layout.student_dir}
    return dirs[stage] / MARKER if stage in dirs else layout.state_dir / f"{stage}.json"


def read_marker(layout: Layout, stage: str) -> Marker | None:
    p = _marker_path(layout, stage)
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
        return Marker(d["stage"], d["fingerprint"], d.get("result", {}), d.get("files", {}))
    except (ValueError, KeyError):
        return None


def _complete(layout: Layout, stage: str, fp: str) -> Marker | None:
    """The marker when the stage already ran with this fingerprint and its files are intact."""
    m = read_marker(layout, stage)
    if m is None or m.fingerprint != fp:
        return None
    for path, digest in m.files.items():
        p = Path(path)
        if not p.is_file() or sha256_file(p) != digest:
            return None
    return m


def _finish(layout: Layout, stage: str, fp: str, result: dict, files: Sequence[Path] = ()) -> dict:
    m = {
        "stage": stage,
        "fingerprint": fp,
        "result": result,
        "files": {str(p): sha256_file(p) for p in files},
    }
    atomic_write_json(_marker_path(layout, stage), m)
    return result


def _upstream(layout: Layout, stage: str) -> str:
    m = read_marker(layout, stage)
    if m is None:
        raise FileNotFoundError(
            f"stage {stage!r} of preset {layout.preset!r} has not completed "
            f"(no marker at {_marker_path(layout, stage)}); run it first"
        )
    return m.fingerprint


# which parts of a preset each stage reads, and which stages' outputs it reads
STAGE_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("family", "teacher.name", "teacher.source", "teacher.vq_source", "teacher.world"), ()),
    "trajectories": (("teacher.sampling", "flow", "trajectories"), ("prepare",)),
    "distill": (("student", "train"), ("trajectories",)),
    "evaluate": (("teacher.sampling", "flow", "eval"), ("distill",)),
    "bench": (("teacher.sampling", "bench", "eval.samplers"), ("distill",)),
    "register": (("promote",), ("evaluate", "bench")),
}


def stage_params(preset: Preset, stage: str) -> dict[str, Any]:
    """The resolved preset values a stage reads (defaults included), keyed by their dotted path."""
    if stage not in STAGE_INPUTS:
        raise ValueError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    data = preset.model_dump(mode="json")
    out = {}
    for key in STAGE_INPUTS[stage][0]:
        node: Any = data
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def write_stage_params(preset: Preset, out_dir: Path) -> list[Path]:
    """One JSON per stage with exactly what it reads. DVC stages depend on these files, so a
    change anywhere in a preset (or in a default in params.py) reruns exactly the stages whose
    inputs changed; files whose content is unchanged are not rewritten."""
    paths = []
    for stage in STAGES:
        path = out_dir / f"{stage}.json"
        text = json.dumps(stage_params(preset, stage), indent=2, sort_keys=True) + "\n"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
        paths.append(path)
    return paths


def stage_fingerprint(layout: Layout, preset: Preset, stage: str) -> str:
    """What a stage's output depends on: its params and its upstream stages' outputs."""
    params = stage_params(preset, stage)
    upstream = [_upstream(layout, s) for s in STAGE_INPUTS[stage][1]]
    extra = [layout.tracking_uri] if stage == "register" else []  # another store = another registration
    return fingerprint(stage, *upstream, params, *extra)


# --------------------------------------------------------------------------------------------
# pieces owned by other modules, imported when a stage needs them
# --------------------------------------------------------------------------------------------
def _piece(module: str, attr: str | None, what: str) -> Any:
    """`module.attr` (or the module itself), or NotImplementedError naming what is missing."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise NotImplementedError(f"{what} needs {module}.{attr}, which does not exist yet") from e
        raise
    if attr is None:
        return mod
    if not hasattr(mod, attr):
        raise NotImplementedError(f"{what} needs {module}.{attr}, which does not exist yet")
    return getattr(mod, attr)


def is_tiny(preset: Preset) -> bool:
    return preset.teacher.name in TINY_TEACHERS


def _device() -> str:
    """The settings' device; under torchrun, each process's own GPU."""
    dev = get_settings().resolve_device()
    if dev == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return dev


# --------------------------------------------------------------------------------------------
# stage 1: the teacher
# --------------------------------------------------------------------------------------------
def with_retries(fn: Callable[[], Any], what: str, attempts: int = 4, delay_s: float = 2.0) -> Any:
    """Retry transient failures (network, storage) with exponential backoff; others fail at once."""
    transient = (OSError, TimeoutError, ConnectionError)
    for i in range(attempts):
        try:
            return fn()
        except transient as e:
            if i == attempts - 1 or isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
                raise
            wait = delay_s * 2**i
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.0f s",
                what,
                type(e).__name__,
                e,
                i + 1,
                attempts - 1,
                wait,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def prepare_teacher(
    preset_name: str, preset: Preset, layout: Layout | None = None, progress: bool = True
) -> dict:
    """Make the teacher available under `teacher_dir`.

    Tiny presets train the offline tiny world there (VQ, GPT, evaluator, reference data) and fail
    if its quality checks fail. Published teachers are resolved from their source (with retries)
    into the checkpoint cache; `teacher.json` records the resolved files and their sha256, which is
    what DVC versions instead of gigabytes of weights.
    """
    layout = layout or layout_for(preset_name)
    fp = stage_fingerprint(layout, preset, "prepare")
    if m := _complete(layout, "prepare", fp):
        log.info("prepare[%s]: complete, skipping", preset_name)
        return m.result
    out = layout.teacher_dir
    # stale marker (other params): drop it; the tiny world reuses whatever parts its own hashes allow
    _marker_path(layout, "prepare").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if is_tiny(preset):
        result = _prepare_tiny(preset_name, preset, out, progress)
    else:
        result = _prepare_published(preset, out)
    atomic_write_json(out / "teacher.json", result)
    return _finish(layout, "prepare", fp, result)


# the offline worlds: (module, prepare, quality check, load) per family
_TINY_WORLDS = {
    "llamagen": ("ddcore.tiny.world", "prepare_tiny_world", "check_quality", "load_tiny_world"),
    "var": ("ddcore.tiny.var_world", "prepare_tiny_var_world", "check_var_quality", "load_tiny_var_world"),
}
# published teachers: the module whose import registers their checkpoints, and the loader
_PUBLISHED = {
    "llamagen": ("ddcore.teachers.llamagen", "load_llamagen_teacher"),
    "var": ("ddcore.teachers.var", "load_var_teacher"),
}


def _prepare_tiny(preset_name: str, preset: Preset, out: Path, progress: bool) -> dict:
    if preset.teacher.world is None:
        raise ValueError(f"presets.{preset_name}.teacher.world is required for the tiny teacher")
    mod, prep, check, _ = _TINY_WORLDS[preset.family]
    what = f"the {preset.family} tiny-world teacher"
    prepare_world, check_quality = _piece(mod, prep, what), _piece(mod, check, what)
    accepted = inspect.signature(prepare_world).parameters
    kw = {
        "device": _device(),
        "sampling": preset.teacher.sampling,
    }  # the quality check samples like the teacher
    kw = {k: v for k, v in kw.items() if k in accepted}
    report = prepare_world(preset.teacher.world, out, progress=progress, **kw)
    problems = check_quality(report, preset.teacher.world)
    if problems:
        raise StageError(f"tiny world for {preset_name!r} failed its quality checks: " + "; ".join(problems))
    return {
        "kind": "tiny",
        "family": preset.family,
        "teacher": preset.teacher.name,
        "report": _jsonable(report),
    }


def _prepare_published(preset: Preset, out: Path) -> dict:
    """Resolve the published checkpoint and its tokenizer (download with retries into the cache)."""
    mod, _ = _PUBLISHED[preset.family]
    _piece(mod, None, f"the {preset.family} teacher")  # importing it registers the checkpoints
    resolve_source = _piece("ddcore.sources", "resolve_source", "published teachers")
    get_checkpoint = _piece("ddcore.sources", "get_checkpoint", "published teachers")
    info = get_checkpoint(preset.teacher.name)
    gpt_src = preset.teacher.source or info.source
    vq_src = preset.teacher.vq_source or get_checkpoint(info.tokenizer or "vq-ds16-c2i").source
    files = {}
    for part, src in (("model", gpt_src), ("tokenizer", vq_src)):
        path = Path(with_retries(lambda src=src: resolve_source(src), f"resolving {src}"))
        files[part] = {"source": src, "path": str(path), "sha256": sha256_file(path)}
    return {"kind": "published", "family": preset.family, "teacher": preset.teacher.name, **files}


def load_teacher(preset: Preset, teacher_dir: Path, device: str | None = None):
    """The prepared teacher as a `Teacher` (plus the tiny world's evaluator, else None)."""
    device = device or _device()
    if is_tiny(preset):
        mod, _, _, load = _TINY_WORLDS[preset.family]
        load_world = _piece(mod, load, f"loading the {preset.family} tiny-world teacher")
        teacher, evaluator = load_world(teacher_dir)
        return _to(teacher, device), _to(evaluator, device)
    info = json.loads((teacher_dir / "teacher.json").read_text())

    def path(part: str) -> str:
        """Relative paths (a registered model's copy) live next to teacher.json; an absolute path
        from another machine's cache is re-resolved from the source and re-verified."""
        p = Path(info[part]["path"])
        p = p if p.is_absolute() else teacher_dir / p
        if not p.is_file():
            resolve_source = _piece("ddcore.sources", "resolve_source", "published teachers")
            p = Path(with_retries(lambda: resolve_source(info[part]["source"]), f"resolving {part}"))
            if sha256_file(p) != info[part]["sha256"]:
                raise StageError(f"{p}: sha256 differs from the one recorded in {teacher_dir}/teacher.json")
        return str(p)

    mod, loader = _PUBLISHED[preset.family]
    load = _piece(mod, loader, f"loading the {preset.family} teacher")
    if preset.family == "llamagen":
        teacher = load(preset.teacher.name, vq_path=path("tokenizer"), source=path("model"), device=device)
    else:
        teacher = load(preset.teacher.name, source=path("model"), vq_source=path("tokenizer"), device=device)
    return teacher, None


def _to(obj, device: str):
    return obj.to(device) if obj is not None and hasattr(obj, "to") else obj


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# --------------------------------------------------------------------------------------------
# stage 2: DD1 trajectories (sharded)
# --------------------------------------------------------------------------------------------
def trajectory_shards(preset: Preset) -> list[int]:
    """Shard ids of the trajectory set; each can be generated independently (and in parallel)."""
    t = preset.trajectories
    return list(range(math.ceil(t.num_pairs / t.shard_size)))


def generate_trajectories_stage(
    preset_name: str,
    preset: Preset,
    shard_ids: Sequence[int] | None = None,
    layout: Layout | None = None,
    progress: bool = True,
) -> dict:
    """Generate the (noise, teacher tokens) pairs. With `shard_ids`, only those shards (a worker's
    share); without, all missing shards, and the stage is marked complete."""
    layout = layout or layout_for(preset_name)
    fp = stage_fingerprint(layout, preset, "trajectories")
    if m := _complete(layout, "trajectories", fp):
        log.info("trajectories[%s]: complete, skipping", preset_name)
        return m.result
    # a stale claim goes; the shards stay: the generator keeps those this configuration would
    # write again (e.g. after num_pairs was raised) and regenerates the others in place
    old = read_marker(layout, "trajectories")
    if old is not None and old.fingerprint != fp:
        _marker_path(layout, "trajectories").unlink(missing_ok=True)
    generate = _piece("ddcore.dd1.trajectories", "generate_trajectories", "the trajectories stage")
    teacher, _ = load_teacher(preset, layout.teacher_dir)
    manifest = generate(
        teacher,
        preset.teacher.sampling,
        preset.flow,
        preset.trajectories,
        layout.traj_dir,
        shard_ids=list(shard_ids) if shard_ids is not None else None,
        progress=progress,
        replace=True,
    )
    result = {"manifest": _manifest_summary(manifest)}  # no absolute paths: this lands in a DVC output
    if shard_ids is not None:
        return result  # partial work; the all-shards call marks the stage complete
    return _finish(layout, "trajectories", fp, result)


def _manifest_summary(manifest: Any) -> Any:
    if manifest is None:
        return None
    if hasattr(manifest, "model_dump"):
        return _jsonable(manifest.model_dump(mode="json"))
    if hasattr(manifest, "to_dict"):
        return _jsonable(manifest.to_dict())
    if hasattr(manifest, "__dataclass_fields__"):
        from dataclasses import asdict

        return _jsonable(asdict(manifest))
    return _jsonable(manifest)


# --------------------------------------------------------------------------------------------
# stage 3: distil the student
# --------------------------------------------------------------------------------------------
def distill_stage(
    preset_name: str,
    preset: Preset,
    layout: Layout | None = None,
    log_fn: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> dict:
    """Train the DD1 student on the trajectories (resumes from its last checkpoint).

    With DD_NPROC_PER_NODE > 1 (or 'auto' on a machine with several GPUs) the training runs under
    `torchrun --standalone` with one process per device; the trainer is DDP-aware and computes the
    single-process gradient, and this process keeps the bookkeeping.
    """
    layout = layout or layout_for(preset_name)
    fp = stage_fingerprint(layout, preset, "distill")
    if m := _complete(layout, "distill", fp):
        log.info("distill[%s]: complete, skipping", preset_name)
        _copy_train_log(layout)
        return m.result
    if os.environ.get(TORCHRUN_WORKER) == "1":  # a worker of _torchrun_distill: train, nothing else
        return _train_student(preset, layout, log_fn, progress)
    old = read_marker(layout, "distill")
    if old is not None and old.fingerprint != fp and layout.student_dir.exists():
        shutil.rmtree(layout.student_dir)
    nproc = nproc_per_node()
    out = (
        _torchrun_distill(preset_name, preset, layout, nproc)
        if nproc > 1
        else _train_student(preset, layout, log_fn, progress)
    )
    _copy_train_log(layout)
    result = {"summary": _jsonable(out) if isinstance(out, dict) else None, "processes": nproc}
    result["final"] = last_train_row(layout.train_log)
    return _finish(layout, "distill", fp, result)


def _train_student(preset: Preset, layout: Layout, log_fn, progress: bool) -> dict:
    train = _piece("ddcore.dd1.train", "train_student", "the distill stage")
    teacher, _ = load_teacher(preset, layout.teacher_dir)
    return train(
        teacher,
        layout.traj_dir,
        preset.student,
        preset.train,
        layout.student_dir,
        resume=True,
        log_fn=log_fn,
        progress=progress,
    )


def nproc_per_node() -> int:
    """Training processes on this machine: DD_NPROC_PER_NODE (an integer, or 'auto' = one per
    visible GPU); 1 when unset."""
    v = os.environ.get("DD_NPROC_PER_NODE", "1").strip().lower()
    if v == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"DD_NPROC_PER_NODE={v!r}: allowed are a positive integer or 'auto'") from None
    if n < 1:
        raise ValueError(f"DD_NPROC_PER_NODE={n}: must be >= 1")
    return n


def _torchrun_distill(preset_name: str, preset: Preset, layout: Layout, nproc: int) -> dict:
    """Run `ddcore distill` for this exact preset (overrides included) under torchrun."""
    import subprocess
    import sys

    import yaml

    layout.state_dir.mkdir(parents=True, exist_ok=True)
    params = layout.state_dir / "distill-params.yaml"
    atomic_write_text(params, yaml.safe_dump({"presets": {preset_name: preset.model_dump(mode="json")}}))
    env = os.environ | {
        "DD_DATA_ROOT": str(layout.data_root),
        "DD_MODEL_ROOT": str(layout.model_root),
        "DD_METRICS_ROOT": str(layout.metrics_root),
        "DD_PROJECT_ROOT": str(layout.project_root),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        TORCHRUN_WORKER: "1",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "ddcore.cli", "--params", str(params), "--quiet", "distill", "--preset", preset_name,
    ]  # fmt: skip
    log.info("distill[%s]: %s", preset_name, " ".join(cmd))
    subprocess.run(
        cmd, env=env, check=True, stdout=sys.stderr
    )  # keep this process's stdout for its own result
    meta = json.loads((layout.student_dir / "student.json").read_text())
    return meta.get("summary", {})


def _copy_train_log(layout: Layout) -> None:
    src = layout.student_dir / "train_log.csv"
    if src.is_file():
        atomic_write_text(layout.train_log, src.read_text())


def last_train_row(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    out = {}
    for k, v in rows[-1].items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


# --------------------------------------------------------------------------------------------
# samplers of a preset: the teacher, the DD1 students, baselines
# --------------------------------------------------------------------------------------------
def build_samplers(preset: Preset, teacher, student_dir: Path, names: Sequence[str] | None = None) -> list:
    """`ImageSampler`s for the names in eval.samplers, built from the prepared teacher and student."""
    build = _piece("ddcore.dd1.samplers", "build_samplers", "building the evaluation samplers")
    return list(build(list(names or preset.eval.samplers), teacher, student_dir, preset))


# --------------------------------------------------------------------------------------------
# stage 4: evaluate
# --------------------------------------------------------------------------------------------
def evaluate_stage(
    preset_name: str, preset: Preset, layout: Layout | None = None, progress: bool = True
) -> dict:
    """FID / IS / precision / recall / KID / NLL per sampler against the reference; grids; FID vs
    steps. Writes metrics/<preset>/eval.json (+ grid_*.png, fid_vs_steps.png, fid_vs_steps.csv)."""
    layout = layout or layout_for(preset_name)
    fp = stage_fingerprint(layout, preset, "evaluate")
    if m := _complete(layout, "evaluate", fp):
        log.info("evaluate[%s]: complete, skipping", preset_name)
        return m.result
    evaluate = _piece("ddcore.eval.evaluate", "evaluate_samplers", "the evaluate stage")
    build_reference = _piece("ddcore.eval.evaluate", "build_reference", "the evaluate stage")
    teacher, evaluator = load_teacher(preset, layout.teacher_dir)
    # the tiny world's judge, or (evaluator None: published teachers) the TF-FID Inception
    as_extractor = _piece("ddcore.eval.fidelity", "as_extractor", "the evaluate stage")
    extractor = as_extractor(evaluator).to(teacher.device)
    ref = build_reference(preset.eval, extractor, world=preset.teacher.world)
    samplers = build_samplers(preset, teacher, layout.student_dir)
    layout.metrics_dir.mkdir(parents=True, exist_ok=True)
    layout.eval_json.unlink(missing_ok=True)  # never mistake a stale file for this run's
    evaluate(
        samplers,
        teacher,
        extractor,
        ref,
        preset.eval,
        layout.metrics_dir,
        sampling=preset.teacher.sampling,
        teacher_name=preset.teacher.name,
        progress=progress,
    )
    result = _collect_grids(layout)
    write_fid_curve(result, layout.fid_curve)
    summary = {"samplers": result.get("samplers", {}), "reference": result.get("reference")}
    return _finish(layout, "evaluate", fp, _jsonable(summary), [layout.eval_json, layout.fid_curve])


def _collect_grids(layout: Layout) -> dict:
    """Move the per-sampler grids into metrics/<preset>/grids/ (one DVC plots folder whatever the
    sampler list) and point eval.json at them."""
    result = json.loads(layout.eval_json.read_text())
    grids_dir = layout.metrics_dir / "grids"
    if grids_dir.exists():
        shutil.rmtree(grids_dir)
    grids_dir.mkdir(parents=True)
    moved = {}
    for name, fname in (result.get("grids") or {}).items():
        src = layout.metrics_dir / fname
        if src.is_file():
            src.replace(grids_dir / src.name)
            moved[name] = f"grids/{src.name}"
    if moved:
        result["grids"] = moved
        atomic_write_json(layout.eval_json, result)
    return result


def sampler_rows(eval_result: dict) -> list[dict]:
    """eval.json -> one flat dict per sampler (name, steps, fid, ...), whatever nesting it uses."""
    samplers = eval_result.get("samplers", eval_result)
    rows = []
    if isinstance(samplers, dict):
        for name, v in samplers.items():
            if isinstance(v, dict):
                rows.append({"sampler": name, **v})
    elif isinstance(samplers, list):
        rows = [dict(r) for r in samplers if isinstance(r, dict)]
        for r in rows:
            r.setdefault("sampler", r.get("name"))
    return rows


def write_fid_curve(eval_result: dict, path: Path) -> None:
    rows = [r for r in sampler_rows(eval_result) if "fid" in r and "steps" in r]
    rows.sort(key=lambda r: (r["steps"], str(r["sampler"])))
    lines = ["sampler,steps,fid"] + [f"{r['sampler']},{int(r['steps'])},{float(r['fid']):.6g}" for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# stage 5: benchmark
# --------------------------------------------------------------------------------------------
def bench_stage(
    preset_name: str, preset: Preset, layout: Layout | None = None, progress: bool = True
) -> dict:
    """Latency (s/image at batch 1) and throughput (images/s) of every sampler on this machine."""
    layout = layout or layout_for(preset_name)
    fp = stage_fingerprint(layout, preset, "bench")
    if m := _complete(layout, "bench", fp):
        log.info("bench[%s]: complete, skipping", preset_name)
        return m.result
    bench = _piece("ddcore.eval.bench", "bench_samplers", "the bench stage")
    teacher, _ = load_teacher(preset, layout.teacher_dir)
    samplers = build_samplers(preset, teacher, layout.student_dir)
    layout.metrics_dir.mkdir(parents=True, exist_ok=True)
    layout.bench_json.unlink(missing_ok=True)
    bench(
        samplers,
        preset.bench,
        layout.metrics_dir,
        progress=progress,
        extra=_stage_throughput(preset, teacher, layout),
    )
    result = json.loads(layout.bench_json.read_text())
    summary = {
        "case": own_bench_case(preset),
        "samplers": {r["sampler"]: r for r in bench_rows(result, preset)},
    }
    return _finish(layout, "bench", fp, _jsonable(summary), [layout.bench_json])


def _stage_throughput(preset: Preset, teacher, layout: Layout) -> dict:
    """bench.json `extra`: trajectory-generation and training throughput (and peak memory),
    measured in the bench run through the stages' own code."""
    tp = _piece("ddcore.dd1.throughput", None, "the bench stage")
    return {
        "trajectories": lambda: tp.trajectory_throughput(
            teacher, preset.teacher.sampling, preset.flow, preset.trajectories
        ),
        "training": lambda: tp.training_throughput(teacher, layout.traj_dir, preset.student, preset.train),
    }


def own_bench_case(preset: Preset) -> str:
    """The bench.json case that times this preset's own samplers (others are random-weight cases)."""
    random_cases = _piece("ddcore.eval.bench", "RANDOM_CASES", "the bench stage")
    own = [c for c in preset.bench.cases if c not in random_cases]
    return own[0] if own else "preset"


def bench_rows(bench_result: dict, preset: Preset) -> list[dict]:
    """The per-sampler rows of this preset's own case in bench.json."""
    if "cases" in bench_result:
        return sampler_rows(bench_result["cases"].get(own_bench_case(preset), {}))
    return sampler_rows(bench_result)


# --------------------------------------------------------------------------------------------
# stage 6: register
# --------------------------------------------------------------------------------------------
def register_stage(
    preset_name: str,
    preset: Preset,
    layout: Layout | None = None,
    flow_run_id: str | None = None,
    flow_run_url: str | None = None,
) -> dict:
    """Log the run to MLflow, register the student as `dd-<teacher>`, apply the promotion gate."""
    layout = layout or layout_for(preset_name)
    fp = stage_fingerprint(layout, preset, "register")
    if m := _complete(layout, "register", fp):
        log.info("register[%s]: complete, skipping", preset_name)
        return m.result
    from ddcore import registry

    result = registry.register_student(
        preset_name, preset, layout, flow_run_id=flow_run_id, flow_run_url=flow_run_url
    )
    atomic_write_json(layout.registry_json, _public_registry_record(result))
    return _finish(layout, "register", fp, result, [layout.registry_json])


def _public_registry_record(result: dict) -> dict:
    """What gets committed (metrics/<preset>/registry.json): no URIs that embed local paths."""
    keep = (
        "model_name",
        "version",
        "aliases",
        "decision",
        "scores",
        "champion_scores",
        "eval_protocol",
        "run_id",
    )
    return {k: result[k] for k in keep if k in result}


# --------------------------------------------------------------------------------------------
# everything
# --------------------------------------------------------------------------------------------
def run_pipeline(
    preset_name: str,
    preset: Preset | None = None,
    layout: Layout | None = None,
    stages: Sequence[str] = STAGES,
    progress: bool = True,
) -> dict:
    """All stages in order (each skipping when already complete); returns each stage's result."""
    preset = preset or load_preset(preset_name, layout.params_file if layout else PARAMS_FILE)
    layout = layout or layout_for(preset_name)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; allowed: {', '.join(STAGES)}")
    out: dict[str, Any] = {}
    for s in STAGES:
        if s not in stages:
            continue
        t0 = time.perf_counter()
        if s == "prepare":
            out[s] = prepare_teacher(preset_name, preset, layout, progress=progress)
        elif s == "trajectories":
            out[s] = generate_trajectories_stage(preset_name, preset, layout=layout, progress=progress)
        elif s == "distill":
            out[s] = distill_stage(preset_name, preset, layout, progress=progress)
        elif s == "evaluate":
            out[s] = evaluate_stage(preset_name, preset, layout, progress=progress)
        elif s == "bench":
            out[s] = bench_stage(preset_name, preset, layout, progress=progress)
        elif s == "register":
            out[s] = register_stage(preset_name, preset, layout)
        log.info("%s[%s] done in %.1f s", s, preset_name, time.perf_counter() - t0)
    return out

"""MLflow tracking and model registry: one run per registration, one model per teacher.

The register stage logs the resolved preset (params), the training curve (per-step metrics), the
evaluation and benchmark numbers, the grids and plots, and tags that tie the run to its inputs
(teacher, method, steps, git commit, DVC data hash, Prefect flow run). The student is registered
as ``dd-<teacher>``: an `mlflow.pyfunc` model whose artifacts are the student and teacher
checkpoints and whose `predict` turns class labels + seeds into uint8 images, so a consumer needs
MLflow and this package but no knowledge of how DD sampling works.

Promotion is explicit and recorded: a new version gets the alias ``challenger``; it becomes
``champion`` only if its FID is <= max_fid_ratio x the champion's and its seconds per image are
<= max_latency_ratio x the champion's (`PromoteParams`). The decision and the numbers it compared
are written on the version as tags and in its description.

Default store: SQLite inside the project (`Settings.tracking_uri`), artifacts next to it in
``mlartifacts/``. `DD_MLFLOW_TRACKING_URI` points at a tracking server instead; `DD_S3_BUCKET`
(+ `DD_S3_ENDPOINT_URL`, AWS credentials) puts artifacts of a local store into S3.
This is the only module that imports mlflow.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from ddcore.params import Preset, PromoteParams
from ddcore.settings import get_settings

if TYPE_CHECKING:
    from ddcore.stages import Layout

log = logging.getLogger("ddcore.registry")

METHOD = "dd1"
CHALLENGER, CHAMPION = "challenger", "champion"


# --------------------------------------------------------------------------------------------
# store
# --------------------------------------------------------------------------------------------
def configure(tracking_uri: str | None = None) -> MlflowClient:
    """Point MLflow at the store (default: the settings' URI); export S3 settings for boto3."""
    s = get_settings()
    uri = tracking_uri or s.tracking_uri
    env = {
        "MLFLOW_S3_ENDPOINT_URL": s.s3_endpoint_url,
        "AWS_ACCESS_KEY_ID": s.aws_access_key_id.get_secret_value() if s.aws_access_key_id else "",
        "AWS_SECRET_ACCESS_KEY": s.aws_secret_access_key.get_secret_value()
        if s.aws_secret_access_key
        else "",
    }
    for k, v in env.items():
        if v and not os.environ.get(k):
            os.environ[k] = v
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts; None lets a tracking server decide."""
    s = get_settings()
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    if s.s3_bucket:
        return f"s3://{s.s3_bucket}/mlflow"
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(client: MlflowClient, name: str | None = None) -> str:
    name = name or get_settings().mlflow_experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri))
    except MlflowException:  # created concurrently
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def model_name(preset: Preset) -> str:
    return f"dd-{preset.teacher.name}"


# --------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------
def git_commit(root: Path) -> str | None:
    """HEAD of the checkout (suffix '-dirty' when tracked files differ), None outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def dvc_data_hash(root: Path, out_path: Path) -> str | None:
    """The md5 DVC recorded in dvc.lock for an output (e.g. the trajectory directory)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    try:
        rel = str(Path(out_path).resolve().relative_to(root.resolve()))
    except ValueError:
        return None
    data = yaml.safe_load(lock.read_text()) or {}
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path", "").rstrip("/") == rel:
                return out.get("md5")
    return None


# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    fid: float
    sec_per_image: float


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    champion_version: str | None = None
    fid_limit: float | None = None
    latency_limit: float | None = None


def promotion_decision(challenger: Scores, champion: Scores | None, gate: PromoteParams) -> Decision:
    """The gate: better (or equal within the ratio) FID at no worse (within the ratio) speed."""
    if champion is None:
        return Decision(True, "no champion yet")
    fid_limit = gate.max_fid_ratio * champion.fid
    lat_limit = gate.max_latency_ratio * champion.sec_per_image
    fails = []
    if not challenger.fid <= fid_limit:
        fails.append(f"FID {challenger.fid:.4g} > {gate.max_fid_ratio:g} x champion FID {champion.fid:.4g}")
    if not challenger.sec_per_image <= lat_limit:
        fails.append(
            f"{challenger.sec_per_image:.4g} s/img > {gate.max_latency_ratio:g} x champion "
            f"{champion.sec_per_image:.4g} s/img"
        )
    if fails:
        return Decision(False, "; ".join(fails), fid_limit=fid_limit, latency_limit=lat_limit)
    return Decision(
        True,
        f"FID {challenger.fid:.4g} <= {fid_limit:.4g} and {challenger.sec_per_image:.4g} s/img <= {lat_limit:.4g}",
        fid_limit=fid_limit,
        latency_limit=lat_limit,
    )


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d
    return out


def _rows(result: dict) -> dict[str, dict]:
    """eval.json / bench.json -> {sampler name: {metric: value}}, whatever nesting they use."""
    from ddcore.stages import sampler_rows

    return {str(r["sampler"]): r for r in sampler_rows(result) if r.get("sampler")}


def _number(row: dict, *keys: str) -> float | None:
    for k in keys:
        v = row.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


SEC_PER_IMAGE_KEYS = ("sec_per_image", "latency_s_per_image", "latency_s", "s_per_image")


def headline_sampler(preset: Preset) -> str:
    """The sampler the registered model stands for: the first DD1 sampler of eval.samplers."""
    for name in preset.eval.samplers:
        if name.startswith("dd1"):
            return name
    raise ValueError(f"eval.samplers {preset.eval.samplers} has no DD1 sampler to register")


def headline_scores(preset: Preset, eval_result: dict, bench_result: dict) -> tuple[str, Scores, dict]:
    from ddcore.stages import bench_rows

    name = headline_sampler(preset)
    ev = _rows(eval_result).get(name)
    be = {str(r["sampler"]): r for r in bench_rows(bench_result, preset)}.get(name)
    if ev is None or be is None:
        raise KeyError(f"sampler {name!r} is missing from {'eval.json' if ev is None else 'bench.json'}")
    fid, spi = _number(ev, "fid"), _number(be, *SEC_PER_IMAGE_KEYS)
    if fid is None or spi is None:
        raise KeyError(
            f"sampler {name!r}: need 'fid' in eval.json and one of {SEC_PER_IMAGE_KEYS} in bench.json"
        )
    return name, Scores(fid, spi), {"eval": ev, "bench": be}


# --------------------------------------------------------------------------------------------
# the pyfunc model
# --------------------------------------------------------------------------------------------
class DDImageModel(mlflow.pyfunc.PythonModel):
    """Class labels + seeds -> uint8 images (N, H, W, 3) from the distilled student.

    Artifacts: ``teacher`` (prepared teacher dir), ``student`` (student checkpoint dir), ``preset``
    (resolved preset JSON). `params={"sampler": ...}` picks another sampler of the preset (e.g. the
    2-step one or the teacher itself, for comparison).
    """

    def load_context(self, context) -> None:
        from ddcore.params import Preset
        from ddcore.stages import build_samplers, load_teacher

        meta = json.loads(Path(context.artifacts["preset"]).read_text())
        self.preset = Preset.model_validate(meta["preset"])
        self.default_sampler = meta["sampler"]
        self.teacher, _ = load_teacher(self.preset, Path(context.artifacts["teacher"]))
        self._student_dir = Path(context.artifacts["student"])
        self._samplers: dict[str, Any] = {}
        self._build = build_samplers

    def _sampler(self, name: str):
        if name not in self._samplers:
            (s,) = self._build(self.preset, self.teacher, self._student_dir, [name])
            self._samplers[name] = s
        return self._samplers[name]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        import torch

        rows = model_input.to_dict("list") if hasattr(model_input, "to_dict") else dict(model_input)
        labels = [int(x) for x in rows["label"]]
        seeds = [int(x) for x in rows["seed"]]
        sampler = self._sampler((params or {}).get("sampler") or self.default_sampler)
        with torch.no_grad():
            img = sampler.images(torch.tensor(labels, dtype=torch.long), seeds)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _signature(image_size: int, default_sampler: str) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("long", "label"), ColSpec("long", "seed")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))]),
        params=ParamSchema([ParamSpec("sampler", "string", default_sampler)]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ("torch", "numpy", "safetensors", "pydantic", "pydantic-settings", "pyyaml", "pandas", "ddcore")
    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={version(p)}")
        except Exception:
            out.append(p)
    return out


@contextlib.contextmanager
def _model_artifacts(
    preset_name: str, preset: Preset, layout: Layout, sampler: str
) -> Iterator[dict[str, str]]:
    """A staging folder with exactly what the model needs (checkpoints, configs, the preset)."""
    with tempfile.TemporaryDirectory(prefix="dd-model-") as tmp:
        t = Path(tmp)
        teacher = t / "teacher"
        info_file = layout.teacher_dir / "teacher.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        if info.get("kind") == "published":
            teacher.mkdir()
            for part in ("model", "tokenizer"):
                src = Path(info[part]["path"])
                _link_or_copy(src, teacher / src.name)
                info[part] = {**info[part], "path": src.name}  # relative: resolved against the folder
            (teacher / "teacher.json").write_text(json.dumps(info, indent=2))
        else:
            shutil.copytree(
                layout.teacher_dir, teacher, ignore=shutil.ignore_patterns("_stage.json", "*.tmp")
            )
        student = t / "student"
        student.mkdir()
        for f in sorted(layout.student_dir.iterdir()):  # weights + configs; no training state, no logs
            if f.is_file() and f.suffix in (".safetensors", ".json") and f.name != "_stage.json":
                _link_or_copy(f, student / f.name)
        meta = t / "preset.json"
        meta.write_text(
            json.dumps(
                {"preset_name": preset_name, "sampler": sampler, "preset": preset.model_dump(mode="json")}
            )
        )
        yield {"teacher": str(teacher), "student": str(student), "preset": str(meta)}


def _model_code(folder: Path) -> str:
    """MLflow "models from code": the logged model is this 3-line file naming `DDImageModel`, so
    loading it imports our class instead of unpickling an object."""
    code = folder / "dd_image_model.py"
    code.write_text(
        '"""Distilled Decoding image model: labels + seeds -> uint8 images (see ddcore.registry)."""\n'
        "from mlflow.models import set_model\n\n"
        "from ddcore.registry import DDImageModel\n\n"
        "set_model(DDImageModel())\n"
    )
    return str(code)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------
def _log_train_curve(client: MlflowClient, run_id: str, csv_path: Path) -> int:
    """Every numeric column of train_log.csv as a metric `train/<col>` at its `step`."""
    if not csv_path.is_file():
        return 0
    now = int(time.time() * 1000)
    metrics: list[Metric] = []
    with open(csv_path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step = int(float(row.get("step") or i))
            for k, v in row.items():
                if k == "step" or v in (None, ""):
                    continue
                try:
                    x = float(v)
                except ValueError:
                    continue
                if math.isfinite(x):
                    metrics.append(Metric(f"train/{k}", x, now, step))
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000], synchronous=True)
    return len(metrics)


def metric_name(name: str) -> str:
    """MLflow accepts only alphanumerics, _ - . space : / in metric names; others (the "+" of
    "dd1-1step+compile") become "_"."""
    return _METRIC_UNSAFE.sub("_", name)


_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")


def _log_table_metrics(client: MlflowClient, run_id: str, prefix: str, rows: dict[str, dict]) -> None:
    now = int(time.time() * 1000)
    metrics = []
    for name, row in rows.items():
        for k, v in row.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                metrics.append(Metric(metric_name(f"{prefix}/{name}/{k}"), float(v), now, 0))
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000], synchronous=True)


def _metric_files(metrics_dir: Path) -> list[Path]:
    keep = {".json", ".csv", ".png", ".jpg", ".npz"}
    return sorted(
        p
        for p in metrics_dir.rglob("*")
        if p.is_file() and p.suffix in keep and p.name != "registry.json" and not p.name.startswith(".")
    )


def eval_protocol(preset: Preset) -> str:
    """What makes two FIDs comparable: sample count, label scheme, seed and reference (not the sampler
    list or the batch size). Stored as each version's `eval_protocol` tag; the gate compares FIDs of
    one protocol only."""
    e = preset.eval
    return f"n={e.num_samples} labels={e.labels} seed={e.seed} reference={e.reference}"


def check_scored_protocol(preset: Preset, eval_result: dict, where: Path | str) -> None:
    """Refuse an eval.json scored under other eval params than the preset's: its FID would be
    registered under the wrong protocol."""
    from ddcore.eval.evaluate import LABEL_PROTOCOL

    e, got = preset.eval, eval_result.get("protocol") or {}
    want = {"n_samples": e.num_samples, "seed": e.seed, "labels": LABEL_PROTOCOL[e.labels]}
    differ = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    scored_ref = (eval_result.get("reference") or {}).get("name")
    if not _same_reference(e.reference, scored_ref):
        differ["reference"] = (scored_ref, e.reference)
    if differ:
        parts = ", ".join(f"{k} {a!r} (preset: {b!r})" for k, (a, b) in differ.items())
        raise ValueError(f"{where} was scored with {parts}; re-run the evaluate stage")


def _same_reference(param: str, scored_name: str | None) -> bool:
    """eval.json names its reference 'world' or by the path it was read from, which is the
    `eval.reference` path, made absolute against the project when it was relative."""
    if scored_name is None:
        return False
    if param == "world" or scored_name == "world":
        return param == scored_name
    want, got = Path(param).parts, Path(scored_name).parts
    return got == want or (not Path(param).is_absolute() and got[-len(want) :] == want)


@dataclass(frozen=True)
class Champion:
    version: str
    scores: Scores
    protocol: str | None  # None: registered before versions carried the tag


def _champion(client: MlflowClient, name: str) -> Champion | None:
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    try:
        scores = Scores(float(mv.tags["fid"]), float(mv.tags["sec_per_image"]))
    except (KeyError, ValueError):
        log.warning("champion %s v%s has no fid/sec_per_image tags; treating as absent", name, mv.version)
        return None
    return Champion(str(mv.version), scores, mv.tags.get("eval_protocol"))


def gate_decision(
    challenger: Scores, protocol: str, champion: Champion | None, gate: PromoteParams
) -> Decision:
    """`promotion_decision` against a champion scored under the same protocol; a champion scored under
    another one keeps its place, since neither FID says anything about the other."""
    if champion is not None and champion.protocol != protocol:
        return Decision(
            False,
            f"champion v{champion.version} was scored under another evaluation protocol "
            f"({champion.protocol or 'not recorded'}; this version: {protocol}), so the FIDs are not "
            "comparable and the champion stays",
            champion.version,
        )
    decision = promotion_decision(challenger, champion.scores if champion else None, gate)
    return replace(decision, champion_version=champion.version) if champion else decision


def _existing_version(client: MlflowClient, name: str, student_sha: str, protocol: str):
    """The version holding this student scored under this protocol (a re-scored student under a new
    protocol is a new version: its FID must not overwrite the one the old gate decision used)."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for mv in versions:
        if mv.tags.get("student_sha256") == student_sha and mv.tags.get("eval_protocol") == protocol:
            return mv
    return None


def _student_sha(student_dir: Path) -> str:
    from ddcore.stages import sha256_file

    files = sorted(p for p in student_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {student_dir}: has the distill stage run?")
    return "-".join(sha256_file(p)[:16] for p in files)


def _description(
    name: str,
    version: str,
    preset_name: str,
    preset: Preset,
    sampler: str,
    scores: Scores,
    steps: Any,
    decision: Decision,
    champion: Champion | None,
    tags: dict[str, str],
    teacher_row: dict | None,
) -> str:
    lines = [
        f"**{name} v{version}** - DD1 student of teacher `{preset.teacher.name}` (preset `{preset_name}`), "
        f"sampler `{sampler}` ({steps} step(s)).",
        "",
        f"- FID {scores.fid:.4g}, {scores.sec_per_image * 1000:.4g} ms/image",
    ]
    lines.append(f"- evaluation protocol: {tags['eval_protocol']}")
    if teacher_row and _number(teacher_row, "fid") is not None:
        lines.append(f"- teacher FID {_number(teacher_row, 'fid'):.4g} on the same protocol")
    if champion:
        c = champion.scores
        other = "" if champion.protocol == tags["eval_protocol"] else " (another evaluation protocol)"
        lines.append(
            f"- champion v{champion.version}: FID {c.fid:.4g}{other}, {c.sec_per_image * 1000:.4g} ms/image"
        )
    verdict = "promoted to **champion**" if decision.promote else "stays **challenger**"
    lines += ["", f"Gate ({verdict}): {decision.reason}.", ""]
    lines.append(
        "Provenance: git "
        + tags.get("git_commit", "n/a")
        + ", data "
        + tags.get("dvc_data_hash", "n/a")
        + (", Prefect flow run " + tags["prefect_flow_run_id"] if "prefect_flow_run_id" in tags else "")
        + "."
    )
    uri = f"models:/{name}/{version}"
    lines.append(f"Load: `mlflow.pyfunc.load_model('{uri}').predict({{'label': [0], 'seed': [0]}})`")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the register stage
# --------------------------------------------------------------------------------------------
def register_student(
    preset_name: str,
    preset: Preset,
    layout: Layout,
    flow_run_id: str | None = None,
    flow_run_url: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Log the run, register the student, apply the promotion gate. Idempotent per student file."""
    client = configure(tracking_uri or layout.tracking_uri)
    exp_id = ensure_experiment(client)
    name = model_name(preset)
    eval_result = json.loads(layout.eval_json.read_text())
    check_scored_protocol(preset, eval_result, layout.eval_json)
    bench_result = json.loads(layout.bench_json.read_text())
    sampler, scores, rows = headline_scores(preset, eval_result, bench_result)
    student_sha = _student_sha(layout.student_dir)

    protocol = eval_protocol(preset)
    existing = _existing_version(client, name, student_sha, protocol)
    if existing is not None:
        log.info(
            "%s v%s already holds this student under this protocol; not registering again",
            name,
            existing.version,
        )
        # the scores and decision recorded then (a re-run bench may time the same student differently)
        return {**_version_record(client, name, str(existing.version)), "reused": True}

    steps = rows["eval"].get("steps", rows["bench"].get("steps", ""))
    tags = {
        "teacher": preset.teacher.name,
        "family": preset.family,
        "method": METHOD,
        "preset": preset_name,
        "sampler": sampler,
        "steps": str(steps),
        "student_sha256": student_sha,
        "eval_protocol": protocol,
    }
    if commit := git_commit(layout.project_root):
        tags["git_commit"] = commit
    if data_hash := dvc_data_hash(layout.project_root, layout.traj_dir):
        tags["dvc_data_hash"] = data_hash
    if flow_run_id:
        tags["prefect_flow_run_id"] = str(flow_run_id)
    if flow_run_url:
        tags["prefect_flow_run_url"] = str(flow_run_url)

    teacher_row = _rows(eval_result).get("teacher")
    image_size = _image_size(preset, layout)
    with mlflow.start_run(
        experiment_id=exp_id, run_name=f"{preset_name}-{METHOD}-{sampler}", tags=tags
    ) as run:
        run_id = run.info.run_id
        mlflow.log_params(
            {
                k: json.dumps(v) if isinstance(v, list | dict | None) else v
                for k, v in flatten(preset.model_dump(mode="json")).items()
            }
        )
        mlflow.log_dict(preset.model_dump(mode="json"), "config/preset.json")
        n_train = _log_train_curve(client, run_id, layout.train_log)
        _log_table_metrics(client, run_id, "eval", _rows(eval_result))
        for case, data in (bench_result.get("cases") or {"": bench_result}).items():
            _log_table_metrics(client, run_id, f"bench/{case}".rstrip("/"), _rows(data))
        mlflow.log_metrics({"fid": scores.fid, "sec_per_image": scores.sec_per_image})
        for p in _metric_files(layout.metrics_dir):
            rel = p.parent.relative_to(layout.metrics_dir)
            mlflow.log_artifact(str(p), str(Path("metrics") / rel) if str(rel) != "." else "metrics")
        with _model_artifacts(preset_name, preset, layout, sampler) as artifacts:
            info = mlflow.pyfunc.log_model(
                name="student",
                python_model=_model_code(Path(artifacts["preset"]).parent),
                artifacts=artifacts,
                signature=_signature(image_size, sampler),
                pip_requirements=_requirements(),
            )
        log.info("logged run %s (%d training points)", run_id, n_train)

    mv = mlflow.register_model(
        info.model_uri,
        name,
        tags={**tags, "fid": repr(scores.fid), "sec_per_image": repr(scores.sec_per_image)},
    )
    version = str(mv.version)
    champion = _champion(client, name)
    decision = gate_decision(scores, protocol, champion, preset.promote)
    client.set_registered_model_alias(name, CHALLENGER, version)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    gate_tags = {
        "decision": CHAMPION if decision.promote else CHALLENGER,
        "decision_reason": decision.reason,
        "max_fid_ratio": str(preset.promote.max_fid_ratio),
        "max_latency_ratio": str(preset.promote.max_latency_ratio),
    }
    if champion:
        gate_tags |= {
            "compared_to_version": champion.version,
            "champion_fid": repr(champion.scores.fid),
            "champion_sec_per_image": repr(champion.scores.sec_per_image),
            "champion_eval_protocol": champion.protocol or "not recorded",
        }
    for key in ("fid_limit", "latency_limit"):
        if (limit := getattr(decision, key)) is not None:
            gate_tags[key] = repr(limit)
    for k, v in gate_tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_tag(run_id, "registered_model", f"{name}/{version}")
    client.set_tag(run_id, "promotion", gate_tags["decision"])
    desc = _description(
        name, version, preset_name, preset, sampler, scores, steps, decision, champion, tags, teacher_row
    )
    client.update_model_version(name, version, description=desc)
    if not client.get_registered_model(name).description:
        client.update_registered_model(
            name,
            description=f"Distilled Decoding students of the {preset.teacher.name} teacher (labels + seeds -> images).",
        )
    return {**_version_record(client, name, version), "reused": False}


def _version_record(client: MlflowClient, name: str, version: str) -> dict:
    """What registry.json says about a version, read back from its tags: the same record whether the
    version was registered just now or found again by a later run."""
    mv = client.get_model_version(name, version)
    tags = mv.tags

    def num(key: str) -> float | None:
        return float(tags[key]) if key in tags else None

    champion_version = tags.get("compared_to_version")
    return {
        "model_name": name,
        "version": str(mv.version),
        "run_id": mv.run_id,
        "model_uri": f"models:/{name}/{mv.version}",
        "aliases": list(mv.aliases),
        "decision": asdict(
            Decision(
                tags.get("decision") == CHAMPION,
                tags.get("decision_reason", ""),
                champion_version,
                num("fid_limit"),
                num("latency_limit"),
            )
        ),
        "scores": {"fid": num("fid"), "sec_per_image": num("sec_per_image")},
        "champion_scores": (
            {"fid": num("champion_fid"), "sec_per_image": num("champion_sec_per_image")}
            if champion_version
            else None
        ),
        "eval_protocol": tags.get("eval_protocol"),
        "run_url": run_url(client, client.get_run(mv.run_id).info.experiment_id, mv.run_id),
    }


def _image_size(preset: Preset, layout: Layout) -> int:
    if preset.teacher.world is not None:
        return preset.teacher.world.image_size
    import importlib

    from ddcore.sources import get_checkpoint
    from ddcore.stages import _PUBLISHED

    importlib.import_module(_PUBLISHED[preset.family][0])  # registers the family's checkpoints
    return int(get_checkpoint(preset.teacher.name).image_size or 256)


def run_url(client: MlflowClient, experiment_id: str, run_id: str) -> str:
    """A browsable link for a server URI, else the local URI of the run."""
    uri = client.tracking_uri
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{uri}#experiments/{experiment_id}/runs/{run_id}"


def load_model(name: str, alias_or_version: str = CHAMPION, tracking_uri: str | None = None):
    """`mlflow.pyfunc.load_model` of `dd-<teacher>` by alias ('champion') or version number."""
    configure(tracking_uri)
    ref = (
        f"models:/{name}/{alias_or_version}"
        if alias_or_version.isdigit()
        else f"models:/{name}@{alias_or_version}"
    )
    return mlflow.pyfunc.load_model(ref)

"""The MLflow store: where runs and models go, provenance tags, and logging tables and curves.

Default store: SQLite inside the project (`Settings.tracking_uri`), artifacts next to it in
``mlartifacts/``. `DD_MLFLOW_TRACKING_URI` points at a tracking server instead; `DD_S3_BUCKET`
(+ `DD_S3_ENDPOINT_URL`, AWS credentials) puts artifacts of a local store into S3.
"""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from ddcore.params import Preset
from ddcore.registry.gate import CHAMPION
from ddcore.settings import get_settings


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


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d
    return out


def log_train_curve(client: MlflowClient, run_id: str, csv_path: Path) -> int:
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


def log_table_metrics(client: MlflowClient, run_id: str, prefix: str, rows: list[dict]) -> None:
    """Every numeric field of every sampler row as a metric `<prefix>/<sampler>/<field>`."""
    now = int(time.time() * 1000)
    metrics = []
    for row in rows:
        name = row["sampler"]
        for k, v in row.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                metrics.append(Metric(metric_name(f"{prefix}/{name}/{k}"), float(v), now, 0))
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000], synchronous=True)


def metric_files(metrics_dir: Path) -> list[Path]:
    keep = {".json", ".csv", ".png", ".jpg", ".npz"}
    return sorted(
        p
        for p in metrics_dir.rglob("*")
        if p.is_file() and p.suffix in keep and p.name != "registry.json" and not p.name.startswith(".")
    )


def run_url(client: MlflowClient, experiment_id: str, run_id: str) -> str:
    """A browsable link for a server URI, else the local URI of the run."""
    uri = client.tracking_uri
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{uri}#experiments/{experiment_id}/runs/{run_id}"


def load_model(name: str, alias_or_version: str | int = CHAMPION, tracking_uri: str | None = None):
    """`mlflow.pyfunc.load_model` of `dd-<teacher>` by alias ('champion') or version number."""
    configure(tracking_uri)
    alias_or_version = str(alias_or_version)
    ref = (
        f"models:/{name}/{alias_or_version}"
        if alias_or_version.isdigit()
        else f"models:/{name}@{alias_or_version}"
    )
    return mlflow.pyfunc.load_model(ref)

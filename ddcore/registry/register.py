"""The register stage's work: log the run to MLflow, register the student as ``dd-<teacher>``,
apply the promotion gate, and write the decision on the version (tags and description).

The run carries the resolved preset (params), the training curve, the evaluation and benchmark
numbers, the grids and plots, and tags that tie it to its inputs (teacher, method, headline sampler,
git commit, DVC data hash, Prefect flow run). Idempotent per student file and evaluation protocol.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ddcore.hashing import sha256_file
from ddcore.params import Preset
from ddcore.registry.gate import (
    CHALLENGER,
    CHAMPION,
    Champion,
    Decision,
    Scores,
    check_scored_protocol,
    eval_protocol,
    gate_decision,
    headline_scores,
    number,
)
from ddcore.registry.serving import image_size, model_artifacts, model_code, requirements, signature
from ddcore.registry.store import (
    configure,
    dvc_data_hash,
    ensure_experiment,
    flatten,
    git_commit,
    log_table_metrics,
    log_train_curve,
    metric_files,
    model_name,
    run_url,
)
from ddcore.results import BenchResult, EvalResult

log = logging.getLogger("ddcore.registry")


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


def _training_data_hash(preset: Preset, layout) -> str | None:
    """The md5 DVC recorded for the data the student was trained on (the outputs of the method's
    stages before the last, e.g. DD1's trajectories)."""
    from ddcore.methods.registry import get_method

    for spec in get_method(preset.method).stages[:-1]:
        if h := dvc_data_hash(layout.project_root, Path(spec.output(layout))):
            return h
    return None


def _student_sha(student_dir: Path) -> str:
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
    from ddcore.methods.registry import get_method

    lines = [
        f"**{name} v{version}** - {get_method(preset.method).title} of teacher `{preset.teacher.name}` (preset `{preset_name}`), "
        f"sampler `{sampler}` ({steps} step(s)).",
        "",
        f"- FID {scores.fid:.4g}, {scores.sec_per_image * 1000:.4g} ms/image",
    ]
    lines.append(f"- evaluation protocol: {tags['eval_protocol']}")
    if teacher_row and number(teacher_row, "fid") is not None:
        lines.append(f"- teacher FID {number(teacher_row, 'fid'):.4g} on the same protocol")
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


def register_student(
    preset_name: str,
    preset: Preset,
    layout,
    flow_run_id: str | None = None,
    flow_run_url: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Log the run, register the student, apply the promotion gate. Idempotent per student file, and
    safe to run twice at once (a lock per store) or again after a kill (a version registered without
    its gate decision gets it)."""
    uri = tracking_uri or layout.tracking_uri
    with store_lock(uri, layout):
        return _register(preset_name, preset, layout, flow_run_id, flow_run_url, uri)


@contextlib.contextmanager
def store_lock(uri: str, layout):
    """An exclusive lock for registering into one store from this machine: next to a SQLite store's
    file, else in the preset's state folder."""
    path = (
        Path(uri.removeprefix("sqlite:///") + ".lock")
        if uri.startswith("sqlite:///")
        else layout.state_dir / "register.lock"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _register(preset_name, preset, layout, flow_run_id, flow_run_url, uri) -> dict:
    client = configure(uri)
    exp_id = ensure_experiment(client)
    name = model_name(preset)
    eval_result = EvalResult.load(layout.eval_json)
    check_scored_protocol(preset, eval_result, layout.eval_json)
    bench_result = BenchResult.load(layout.bench_json)
    sampler, scores, rows = headline_scores(preset, eval_result, bench_result)
    student_sha = _student_sha(layout.student_dir)
    protocol = eval_protocol(preset)
    steps = rows["eval"].get("steps", rows["bench"].get("steps", ""))
    tags = {
        "teacher": preset.teacher.name,
        "family": preset.family,
        "method": preset.method,
        "preset": preset_name,
        "sampler": sampler,
        "steps": str(steps),
        "student_sha256": student_sha,
        "eval_protocol": protocol,
    }
    if commit := git_commit(layout.project_root):
        tags["git_commit"] = commit
    if data_hash := _training_data_hash(preset, layout):
        tags["dvc_data_hash"] = data_hash
    if flow_run_id:
        tags["prefect_flow_run_id"] = str(flow_run_id)
    if flow_run_url:
        tags["prefect_flow_run_url"] = str(flow_run_url)

    existing = _existing_version(client, name, student_sha, protocol)
    if existing is not None:
        version = str(existing.version)
        if "decision" not in existing.tags:  # registered, then killed before the gate ran
            log.info("%s v%s holds this student without a gate decision; applying the gate", name, version)
            _apply_gate(client, name, version, existing.run_id, preset_name, preset, sampler, scores, steps,
                        protocol, tags, eval_result.row("teacher"))  # fmt: skip
            return {**_version_record(client, name, version), "reused": True}
        log.info(
            "%s v%s already holds this student under this protocol; not registering again", name, version
        )
        # the scores and decision recorded then (a re-run bench may time the same student differently)
        return {**_version_record(client, name, version), "reused": True}

    teacher_row = eval_result.row("teacher")
    size = image_size(preset)
    with mlflow.start_run(
        experiment_id=exp_id, run_name=f"{preset_name}-{preset.method}-{sampler}", tags=tags
    ) as run:
        run_id = run.info.run_id
        mlflow.log_params(
            {
                k: json.dumps(v) if isinstance(v, list | dict | None) else v
                for k, v in flatten(preset.model_dump(mode="json")).items()
            }
        )
        mlflow.log_dict(preset.model_dump(mode="json"), "config/preset.json")
        n_train = log_train_curve(client, run_id, layout.train_log)
        log_table_metrics(client, run_id, "eval", eval_result.rows())
        for case, case_rows in bench_result.cases.items():
            log_table_metrics(client, run_id, f"bench/{case}", case_rows)
        mlflow.log_metrics({"fid": scores.fid, "sec_per_image": scores.sec_per_image})
        for p in metric_files(layout.metrics_dir):
            rel = p.parent.relative_to(layout.metrics_dir)
            mlflow.log_artifact(str(p), str(Path("metrics") / rel) if str(rel) != "." else "metrics")
        with model_artifacts(preset_name, preset, layout, sampler) as artifacts:
            info = mlflow.pyfunc.log_model(
                name="student",
                python_model=model_code(Path(artifacts["preset"]).parent),
                artifacts=artifacts,
                signature=signature(size, sampler),
                pip_requirements=requirements(),
            )
        log.info("logged run %s (%d training points)", run_id, n_train)

    mv = mlflow.register_model(
        info.model_uri,
        name,
        tags={**tags, "fid": repr(scores.fid), "sec_per_image": repr(scores.sec_per_image)},
    )
    version = str(mv.version)
    _apply_gate(
        client,
        name,
        version,
        mv.run_id,
        preset_name,
        preset,
        sampler,
        scores,
        steps,
        protocol,
        tags,
        teacher_row,
    )
    return {**_version_record(client, name, version), "reused": False}


def _apply_gate(
    client, name, version, run_id, preset_name, preset, sampler, scores, steps, protocol, tags, teacher_row
) -> None:
    """The champion/challenger decision for `version`, its aliases, gate tags and description."""
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

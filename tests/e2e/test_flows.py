"""The Prefect flow end to end on a real Prefect server (loopback), a process work pool and a worker.

One server per session. The deployment `distill/tiny` from prefect.yaml is deployed as it would be
in production and run with the `micro` preset; the flow run must complete, publish its artifacts
and register a model version that carries the flow-run id. The local entry point
(`python -m flows.distill`, ephemeral API, no server) is run against the same data: its stages are
already complete, so only the registration into a fresh tracking store does work.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from micro_project import micro_overrides
from servers import BIN, ROOT, base_env, prefect_env, prefect_server, stop_process, tail

pytestmark = pytest.mark.slow
PRESET = "micro"
POOL = "cpu-local"
SECRET = "flow-secret-7d1e90"  # set as credentials in the flow's environment: must never surface


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home) as srv:
        yield {"url": srv.url, "home": home}


def dd_env(root: Path, tracking: str) -> dict:
    return {
        "DD_DATA_ROOT": str(root / "data"),
        "DD_MODEL_ROOT": str(root / "models"),
        "DD_METRICS_ROOT": str(root / "metrics"),
        "DD_CACHE_DIR": str(root / "cache"),
        "DD_MLFLOW_TRACKING_URI": tracking,
        "DD_DEVICE": "cpu",
        "DD_AWS_ACCESS_KEY_ID": f"AKIA{SECRET}",
        "DD_AWS_SECRET_ACCESS_KEY": SECRET,
        "DD_HF_TOKEN": SECRET,
    }


def run(cmd: list[str], env: dict, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (
        f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    )
    return p


def prefect_client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Ctx:
        def __enter__(self):
            self._s = temporary_settings({PREFECT_API_URL: api_url})
            self._s.__enter__()
            self.client = get_client(sync_client=True)
            return self.client.__enter__()

        def __exit__(self, *exc):
            self.client.__exit__(*exc)
            self._s.__exit__(*exc)

    return _Ctx()


def registered_versions(tracking: str, name: str) -> list:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    # search results carry no aliases; read each version in full
    return [c.get_model_version(name, v.version) for v in c.search_model_versions(f"name='{name}'")]


@pytest.fixture(scope="session")
def deployed_run(prefect_api, tmp_path_factory):
    """Deploy distill/tiny, start a worker, run the deployment with the micro preset."""
    work = tmp_path_factory.mktemp("flow-run")
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    env = base_env(**prefect_env(prefect_api["home"], prefect_api["url"]), **dd_env(work, tracking))
    prefect = str(BIN / "prefect")
    run([prefect, "work-pool", "create", POOL, "--type", "process"], env, 120)
    out = run([prefect, "--no-prompt", "deploy", "--name", "tiny"], env, 180).stdout
    assert "distill/tiny" in out

    log = work / "worker.log"
    with open(log, "wb") as fh:
        worker = subprocess.Popen(
            [prefect, "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1"],
            env=env,
            cwd=ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        t0 = time.monotonic()
        p = subprocess.run(
            [prefect, "deployment", "run", "distill/tiny", "--param", f"preset={PRESET}",
             "--param", f"overrides={json.dumps(micro_overrides())}", "--watch",
             "--watch-interval", "5", "--watch-timeout", "1500"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=1600,
        )  # fmt: skip
        seconds = time.monotonic() - t0
    finally:
        stop_process(worker, grace=20)
    flow_run_id = None
    for line in p.stdout.splitlines():
        if "UUID:" in line:
            flow_run_id = line.split("UUID:")[1].strip()
    assert flow_run_id, f"no flow run id in:\n{p.stdout}\n{p.stderr}\nworker log:\n{tail(log, 200)}"
    return {
        "id": flow_run_id,
        "cli": p,
        "seconds": seconds,
        "work": work,
        "tracking": tracking,
        "env": env,
        "worker_log": log,
    }


def test_deployment_run_completes_and_registers(deployed_run, prefect_api):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    r = deployed_run
    with prefect_client(prefect_api["url"]) as client:
        fr = client.read_flow_run(r["id"])
        assert fr.state.is_completed(), (
            f"flow run ended {fr.state.type}: {fr.state.message}\n{r['cli'].stdout[-3000:]}\n"
            f"worker log:\n{tail(r['worker_log'], 200)}"
        )
        assert fr.parameters["preset"] == PRESET
        dep = client.read_deployment(fr.deployment_id)
        assert dep.name == "tiny" and dep.work_pool_name == POOL
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id]))
        )
    by_key = {a.key: a for a in arts}
    assert by_key[f"metrics-{PRESET}"].type == "table"
    table = json.loads(by_key[f"metrics-{PRESET}"].data)
    assert {row["sampler"] for row in table} >= {"teacher", "dd1-1step"} and all(
        "fid" in row for row in table
    )
    report = by_key[f"report-{PRESET}"].data
    assert "dd-micro v1" in report and "champion" in report
    link = by_key[f"mlflow-run-{PRESET}"].data  # Prefect stores links as markdown "[text](url)"
    assert "MLflow run" in link and "#experiments/" in link and "/runs/" in link

    versions = registered_versions(r["tracking"], "dd-micro")
    assert len(versions) == 1
    v = versions[0]
    assert v.tags["prefect_flow_run_id"] == r["id"]
    assert v.tags["teacher"] == "micro" and v.tags["method"] == "dd1"
    assert "champion" in v.aliases and "challenger" in v.aliases  # first version: no champion to beat
    metrics = json.loads((r["work"] / "metrics" / PRESET / "eval.json").read_text())
    assert "teacher" in metrics["samplers"]
    print(f"deployment run of the micro preset: {r['seconds']:.0f} s")


def test_credentials_never_reach_logs_artifacts_or_the_registry(deployed_run, prefect_api):
    """The flow ran with AWS keys and an HF token in its environment: none of them is in the flow
    run's logs, its artifacts, the worker's output, or the MLflow run and version it registered."""
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    r = deployed_run
    with prefect_client(prefect_api["url"]) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r["id"]])))
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[r["id"]]))
        )
    assert logs and arts
    blob = "\n".join(m.message for m in logs) + json.dumps([a.data for a in arts], default=str)
    blob += r["worker_log"].read_text(errors="replace") + r["cli"].stdout + r["cli"].stderr
    (v,) = registered_versions(r["tracking"], "dd-micro")
    run = MlflowClient(tracking_uri=r["tracking"]).get_run(v.run_id)
    blob += json.dumps([run.data.params, run.data.tags, v.tags, v.description])
    assert SECRET not in blob


def test_local_entry_point_runs_without_a_server(deployed_run, tmp_path):
    """`python -m flows.distill --preset micro` with no API URL: an ephemeral API in a subprocess.
    The data of the deployment run is reused (every stage skips), the registration goes to a new
    store, so the run proves the flow executes locally and registers, in seconds not minutes."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = base_env(**dd_env(deployed_run["work"], tracking))
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    }
    t0 = time.monotonic()
    sets = [a for o in micro_overrides() for a in ("--set", o)]
    p = run([str(BIN / "python"), "-m", "flows.distill", "--preset", PRESET, *sets], env, 600)
    seconds = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert "Finished in state Completed" in out, out[-3000:]
    assert "complete, skipping" in out or "Completed" in out
    (v,) = registered_versions(tracking, "dd-micro")
    assert "prefect_flow_run_id" in v.tags
    print(f"local flow run on completed stages: {seconds:.0f} s")


def test_bad_params_fail_the_flow_before_any_work(prefect_api, tmp_path):
    env = base_env(**dd_env(tmp_path, f"sqlite:///{tmp_path / 'm.db'}"))
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": prefect_api["url"],
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    p = subprocess.run(
        [str(BIN / "python"), "-m", "flows.distill", "--preset", PRESET, "--set", "dd1.trajectories.num_pairs=-3"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode != 0
    assert "presets.micro.dd1.trajectories.num_pairs" in p.stderr + p.stdout
    assert not (tmp_path / "models" / PRESET).exists(), "no stage may start with invalid params"


def test_gpu_deployments_deploy_to_a_kubernetes_pool(prefect_api):
    """The GPU deployments as `prefect deploy` makes them: the kubernetes pool is created with our
    base job template (validated by the server), the image comes from DD_WORKER_IMAGE at deploy
    time, the weekly schedules and the baked-in code path are kept."""
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((ROOT / "infra" / "k8s" / "base-job-template.json").read_text())
    with prefect_client(prefect_api["url"]) as client:
        client.create_work_pool(WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=template))
    env = base_env(
        **prefect_env(prefect_api["home"], prefect_api["url"]), DD_WORKER_IMAGE="ddcore-gpu:lock-0123abcd"
    )
    run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "llamagen", "--name", "var"], env, 300)
    with prefect_client(prefect_api["url"]) as client:
        for name, preset, cron in (("llamagen", "llamagen-b", "0 3 * * 1"), ("var", "var-d16", "0 3 * * 4")):
            dep = client.read_deployment_by_name(f"distill/{name}")
            assert dep.work_pool_name == "gpu-k8s"
            assert dep.job_variables == {"image": "ddcore-gpu:lock-0123abcd", "gpus": 1}
            assert dep.parameters == {"preset": preset, "parallel_shards": 1}
            (sched,) = dep.schedules
            assert sched.schedule.cron == cron and sched.active
            assert dep.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/ddcore"}}
            ]
            assert dep.global_concurrency_limit.limit == 1

"""Infrastructure files parse and say what the deployment relies on.

The Kubernetes job template is checked with Prefect's own work-pool validation and rendered with
Prefect's own templating, the way a kubernetes worker does; prefect.yaml deployments are checked
against the flow's real parameter schema and params.yaml.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from ddcore.params import load_preset, load_presets

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
TEMPLATE = INFRA / "k8s" / "base-job-template.json"


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_builds_from_a_cuda_runtime_and_installs_exactly_the_lock():
    ins = dockerfile_instructions()
    args = dict(r.split("=", 1) for op, r in ins if op == "ARG" and "=" in r)
    froms = [r for op, r in ins if op == "FROM"]
    assert len(froms) == 1
    base = froms[0]
    base = args.get(base.strip("${}"), base) if base.startswith("${") else base
    assert re.fullmatch(r"nvidia/cuda:[0-9.]+-(cudnn-)?runtime-ubuntu[0-9.]+", base), base
    runs = " && ".join(r for op, r in ins if op == "RUN")
    assert "pip install --no-deps -r requirements.lock" in runs
    assert "pip check" in runs
    assert "python3.11" in runs  # the lock is compiled for 3.11
    copies = [r for op, r in ins if op == "COPY"]
    assert any(c.startswith("requirements.lock") for c in copies)
    # dependencies are installed before the project is copied (layer caching), project with --no-deps
    first_lock = next(i for i, (op, r) in enumerate(ins) if op == "RUN" and "requirements.lock" in r)
    first_code = next(i for i, (op, r) in enumerate(ins) if op == "COPY" and r.startswith("ddcore"))
    assert first_lock < first_code
    assert any(op == "USER" and r != "root" for op, r in ins), "do not run workers as root"


def test_dockerignore_sends_the_lock_and_the_code():
    lines = [
        x for x in (INFRA / "Dockerfile.dockerignore").read_text().splitlines() if x and not x.startswith("#")
    ]
    assert lines[0] == "*" and "!requirements.lock" in lines and "!ddcore/**" in lines


# --------------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_has_the_stack():
    services = compose()["services"]
    for name in ("postgres", "prefect-server", "mlflow", "s3", "worker"):
        assert name in services, name
    prefect_env = services["prefect-server"]["environment"]
    assert prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert str(prefect_env["PREFECT_SERVER_ANALYTICS_ENABLED"]).lower() == "false"
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--artifacts-destination=s3://" in mlflow_cmd
    worker = services["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["DD_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_compose_python_services_run_the_locked_image():
    services = compose()["services"]
    locked = [s for s in ("prefect-server", "mlflow", "worker", "create-buckets")]
    images = {services[s]["image"] for s in locked}
    assert len(images) == 1, images
    (image,) = images
    assert image.startswith("${DD_WORKER_IMAGE:?"), "the image must be the lock-tagged build, never a default"
    for s in locked:
        assert services[s]["build"] == {"context": "..", "dockerfile": "infra/Dockerfile"}
    script = (INFRA / "build-image.sh").read_text()
    assert "sha256sum requirements.lock" in script and "lock-" in script


def test_compose_holds_no_literal_secrets():
    def walk(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{path}[{i}]")
        else:
            yield path, node

    secretish = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY|TOKEN)", re.I)
    for path, value in walk(compose()):
        key = path.rsplit(".", 1)[-1]
        if secretish.search(key):
            assert isinstance(value, str) and value.startswith("${"), f"{path} must come from the env file"


# --------------------------------------------------------------------------------------------
# Kubernetes base job template
# --------------------------------------------------------------------------------------------
def template() -> dict:
    return json.loads(TEMPLATE.read_text())


def render(values: dict) -> dict:
    """What a worker does: variable defaults + deployment job_variables -> job configuration."""
    from prefect.utilities.templating import apply_values

    t = template()
    props = t["variables"]["properties"]
    merged = {k: v["default"] for k, v in props.items() if v.get("default") is not None} | values
    return apply_values(t["job_configuration"], merged)


def test_template_passes_prefects_work_pool_validation():
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools.validation import is_valid_schema

    t = template()
    assert validate_base_job_template(t) == t
    pool = WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=t)
    assert pool.base_job_template["variables"]["properties"]["gpus"]["default"] == 1
    is_valid_schema(t["variables"])  # the variables section is a valid JSON schema


def test_template_rejects_an_undeclared_placeholder():
    from prefect.server.schemas.actions import validate_base_job_template

    t = template()
    t["job_configuration"]["job_manifest"]["metadata"]["annotations"] = {"x": "{{ not_declared }}"}
    with pytest.raises(ValueError, match="not_declared"):
        validate_base_job_template(t)


def test_job_variables_are_validated_by_the_schema():
    from prefect.utilities.schema_tools.validation import validate

    schema = template()["variables"]
    assert validate({"image": "ddcore-gpu:lock-abc", "gpus": 4}, schema) == []
    assert validate({"image": "x", "gpus": 0}, schema), "0 GPUs must be rejected"
    assert validate({"gpus": 1}, schema), "the image is required"


def test_rendered_job_requests_gpus_and_runs_the_flow_with_torchrun_settings():
    cfg = render({"image": "ddcore-gpu:lock-0123", "gpus": 4, "name": "distill-run"})
    job = cfg["job_manifest"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "ddcore-gpu:lock-0123"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]  # NCCL needs shared memory
    env = cfg["env"]
    assert env["DD_NPROC_PER_NODE"] == "auto" and env["DD_DEVICE"] == "cuda"
    assert job["metadata"]["generateName"] == "distill-run-"


# --------------------------------------------------------------------------------------------
# prefect.yaml
# --------------------------------------------------------------------------------------------
def deployments() -> dict[str, dict]:
    data = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in data["deployments"]}


def test_prefect_yaml_deployments():
    from prefect.utilities.callables import parameter_schema_from_entrypoint
    from prefect.utilities.schema_tools.validation import validate

    deps = deployments()
    assert set(deps) >= {"tiny", "tiny-var", "llamagen", "var"}
    presets = load_presets()
    for name, d in deps.items():
        schema = parameter_schema_from_entrypoint(d["entrypoint"]).model_dump_for_openapi()
        assert validate(d["parameters"], schema) == [], name
        assert d["parameters"]["preset"] in presets, name
        load_preset(d["parameters"]["preset"])
    assert deps["tiny"]["work_pool"]["name"] == "cpu-local"
    assert "schedules" not in deps["tiny"]
    for gpu in ("llamagen", "var"):
        assert deps[gpu]["work_pool"]["name"] == "gpu-k8s"
        assert deps[gpu]["work_pool"]["job_variables"]["gpus"] >= 1
        (sched,) = deps[gpu]["schedules"]
        assert len(sched["cron"].split()) == 5 and sched["timezone"] == "UTC"
        assert deps[gpu]["concurrency_limit"] == 1


def test_flow_entrypoint_names_the_distill_flow():
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(str(ROOT / deployments()["tiny"]["entrypoint"]))
    assert flow.name == "distill"

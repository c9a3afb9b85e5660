"""Storage faults: an S3 API (moto on loopback) behind a proxy that injects 5xx answers, throttling,
connection resets and slow answers. DVC push / pull, checkpoint sources and MLflow artifacts retry
and succeed; where every request fails they fail with an error naming the object, and nothing
partial is taken for complete."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from fault_proxy import fault_proxy
from servers import BIN, base_env, moto_s3, s3_keys

from ddcore.settings import Settings
from ddcore.sources import SourceError, resolve_source

pytestmark = pytest.mark.slow
FLAKY = {"error": 0.1, "throttle": 0.1, "reset": 0.1, "slow": 0.1}  # 40% of requests go wrong
DEAD = {"error": 0.5, "reset": 0.5}  # every request


@pytest.fixture
def s3(monkeypatch):
    with moto_s3(("store",)) as s:
        for k, v in s["env"].items():
            if k.startswith("AWS_") and k != "AWS_ENDPOINT_URL":
                monkeypatch.setenv(k, v)
        yield s


def test_a_checkpoint_source_survives_a_flaky_store(s3, tmp_path):
    payload = os.urandom(3 << 20)  # 3 MiB: several requests per download
    s3["client"].put_object(Bucket="store", Key="teachers/c2i_B_256.pt", Body=payload)
    with fault_proxy(s3["url"], FLAKY, seed=1) as proxy:
        settings = Settings(s3_endpoint_url=proxy.url, cache_dir=tmp_path / "cache")
        path = resolve_source("s3://store/teachers/c2i_B_256.pt", settings=settings, retries=8)
    assert path.read_bytes() == payload
    assert sum(proxy.counts[k] for k in FLAKY) > 0, proxy.counts  # faults were injected and survived
    assert [p.name for p in path.parent.iterdir()] == ["c2i_B_256.pt"]


def test_a_dead_store_fails_naming_the_object_and_keeps_nothing(s3, tmp_path):
    s3["client"].put_object(Bucket="store", Key="teachers/c2i_B_256.pt", Body=b"x" * 1000)
    with fault_proxy(s3["url"], DEAD) as proxy:
        settings = Settings(s3_endpoint_url=proxy.url, cache_dir=tmp_path / "cache")
        with pytest.raises(SourceError, match=r"s3://store/teachers/c2i_B_256\.pt"):
            resolve_source("s3://store/teachers/c2i_B_256.pt", settings=settings, retries=2)
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def _dvc(repo, env, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, f"dvc {' '.join(args)}: {p.stderr[-3000:]}"
    return p


def test_dvc_push_and_pull_survive_a_flaky_store(s3, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = base_env(**{k: v for k, v in s3["env"].items() if k.startswith("AWS_") and k != "AWS_ENDPOINT_URL"})
    env |= {"DVC_NO_ANALYTICS": "1", "HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@localhost"}  # fmt: skip
    subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
    data = repo / "data"
    data.mkdir()
    files = {f"part{i}.bin": os.urandom(200_000 + i) for i in range(6)}
    for name, blob in files.items():
        (data / name).write_bytes(blob)
    with fault_proxy(s3["url"], FLAKY, seed=2) as proxy:
        _dvc(repo, env, "init", "-q")
        _dvc(repo, env, "remote", "add", "-d", "store", "s3://store/dvc")
        _dvc(repo, env, "remote", "modify", "store", "endpointurl", proxy.url)
        _dvc(repo, env, "add", "data")
        _dvc(repo, env, "push")
        shutil.rmtree(data)
        shutil.rmtree(repo / ".dvc" / "cache")
        _dvc(repo, env, "pull")
    assert {p.name: p.read_bytes() for p in data.iterdir()} == files
    assert sum(proxy.counts[k] for k in FLAKY) > 0, proxy.counts
    assert (
        len([k for k in s3_keys(s3["client"], "store") if k.startswith("dvc/")]) == len(files) + 1
    )  # + the .dir


def test_mlflow_artifacts_survive_a_flaky_store_and_name_the_object_when_it_is_dead(
    s3, tmp_path, monkeypatch
):
    import mlflow
    from mlflow import MlflowClient

    art = tmp_path / "artifact.bin"
    art.write_bytes(os.urandom(1 << 20))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with fault_proxy(s3["url"], FLAKY, seed=3) as proxy:
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", proxy.url)
        client = MlflowClient(tracking_uri=tracking)
        exp = client.create_experiment("faults", artifact_location="s3://store/mlflow")
        run = client.create_run(exp)
        client.log_artifact(run.info.run_id, str(art))
        back = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id,
            artifact_path="artifact.bin",
            dst_path=str(tmp_path / "back"),
            tracking_uri=tracking,
        )
    with open(back, "rb") as f:
        assert f.read() == art.read_bytes()
    assert sum(proxy.counts[k] for k in FLAKY) > 0, proxy.counts
    with fault_proxy(s3["url"], DEAD) as proxy:
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        run = client.create_run(exp)
        with pytest.raises(Exception, match="artifact.bin"):
            client.log_artifact(run.info.run_id, str(art))
    assert not [k for k in s3_keys(s3["client"], "store") if run.info.run_id in k]  # nothing partial stored

"""Real servers for the orchestration tests, on loopback, with bounded start and stop.

Every server binds 127.0.0.1 on a free port, logs to a file in the test's tmp dir (shown when it
fails to start) and is stopped by the fixture that started it: SIGTERM, then SIGKILL after a grace
period, always on the process group so that children (uvicorn, gunicorn workers) go too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll `url` until it answers 2xx; fail early if the process died, with its log."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if 200 <= r.status < 300:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s ({last}):\n{tail(log)}")


def tail(path: Path | None, n: int = 60) -> str:
    if path is None or not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self, grace: float = 15.0) -> None:
        stop_process(self.proc, grace)


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def start(
    cmd: list[str], env: dict, log: Path, health: str, timeout: float, cwd: Path | None = None
) -> Server:
    """Start `cmd` in its own process group and wait until `health` answers."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
    )
    try:
        wait_http(health, timeout, proc, log)
    except BaseException:
        stop_process(proc)
        raise
    return Server(proc, health, log)


def base_env(**extra: str) -> dict:
    """The caller's environment minus anything that would point a child at a real service."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "DD_"))
        and k not in ("HF_TOKEN", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update({"PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# S3 (moto server mode: DVC's s3fs/aiobotocore is not covered by in-process mocks)
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def moto_s3(buckets: tuple[str, ...] = ()) -> Iterator[dict]:
    """A moto S3 server thread on loopback; yields the env a client needs to reach it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        url = f"http://{host}:{port}"
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": url,
            "AWS_ENDPOINT_URL": url,
        }
        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        for b in buckets:
            s3.create_bucket(Bucket=b)
        yield {"url": url, "env": env, "client": s3}
    finally:
        srv.stop()


def s3_keys(client, bucket: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


# --------------------------------------------------------------------------------------------
# MLflow tracking server
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def mlflow_server(tmp: Path, artifacts_destination: str, env: dict, timeout: float = 120) -> Iterator[Server]:
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp / 'mlflow-server.db'}",
        "--artifacts-destination",
        artifacts_destination,
    ]
    srv = start(cmd, base_env(**env), tmp / "mlflow-server.log", f"http://127.0.0.1:{port}/health", timeout)
    srv.url = f"http://127.0.0.1:{port}"
    try:
        yield srv
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------
# Prefect server
# --------------------------------------------------------------------------------------------
def prefect_env(home: Path, api_url: str | None = None) -> dict:
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_CLI_PROMPT": "false",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextlib.contextmanager
def prefect_server(home: Path, timeout: float = 180) -> Iterator[Server]:
    port = free_port()
    env = base_env(**prefect_env(home))
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    srv = start(cmd, env, home / "server.log", f"http://127.0.0.1:{port}/api/health", timeout)
    srv.url = f"http://127.0.0.1:{port}/api"
    try:
        yield srv
    finally:
        srv.stop()

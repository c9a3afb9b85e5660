"""Environment settings: DD_* variables and .env files, validated; secrets never printed."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ddcore.settings import PROJECT_ROOT, Settings


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No DD_* from the caller's shell and no stray .env: each test sets what it needs."""
    import os

    for k in list(os.environ):
        if k.startswith("DD_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_defaults_live_inside_the_project(clean_env):
    s = Settings()
    assert s.data_root == PROJECT_ROOT / "data"
    assert s.model_root == PROJECT_ROOT / "models"
    assert s.metrics_root == PROJECT_ROOT / "metrics"
    assert s.device == "auto"
    assert s.tracking_uri == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def test_env_overrides(clean_env, tmp_path):
    clean_env.setenv("DD_DATA_ROOT", str(tmp_path / "d"))
    clean_env.setenv("DD_DEVICE", "cuda:1")
    clean_env.setenv("DD_MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    clean_env.setenv("DD_NUM_THREADS", "3")
    s = Settings()
    assert s.data_root == tmp_path / "d"
    assert s.device == "cuda:1" and s.resolve_device() == "cuda:1"
    assert s.tracking_uri == "http://127.0.0.1:5000"
    assert s.num_threads == 3


def test_dotenv_file_is_read(clean_env, tmp_path):
    (tmp_path / ".env").write_text("DD_S3_BUCKET=my-bucket\nDD_DTYPE=bfloat16\n")
    s = Settings()
    assert s.s3_bucket == "my-bucket" and s.dtype == "bfloat16"


@pytest.mark.parametrize("bad", ["gpu", "cuda1", "tpu"])
def test_bad_device_names_the_variable_and_allowed_values(clean_env, bad):
    clean_env.setenv("DD_DEVICE", bad)
    with pytest.raises(ValidationError) as e:
        Settings()
    msg = str(e.value)
    assert "DD_DEVICE" in msg and "'cuda:N'" in msg and "'cpu'" in msg


def test_bad_dtype_and_threads(clean_env):
    clean_env.setenv("DD_DTYPE", "float8")
    with pytest.raises(ValidationError, match="dtype"):
        Settings()
    clean_env.delenv("DD_DTYPE")
    clean_env.setenv("DD_NUM_THREADS", "-1")
    with pytest.raises(ValidationError, match="num_threads"):
        Settings()


def test_secrets_do_not_leak_into_repr_or_dumps(clean_env):
    clean_env.setenv("DD_AWS_SECRET_ACCESS_KEY", "super-secret-value")
    clean_env.setenv("DD_HF_TOKEN", "hf_secret_token")
    s = Settings()
    assert s.aws_secret_access_key.get_secret_value() == "super-secret-value"
    for text in (repr(s), str(s), s.model_dump_json()):
        assert "super-secret-value" not in text and "hf_secret_token" not in text


def test_auto_device_resolves_to_an_available_one(clean_env):
    import torch

    dev = Settings().resolve_device()
    assert dev == ("cuda" if torch.cuda.is_available() else "cpu")
    assert isinstance(Path(Settings().cache_dir), Path)

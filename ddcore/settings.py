"""Environment settings (prefix ``DD_``, ``.env`` supported).

Everything that depends on *where* the project runs lives here; everything that defines *what*
experiment runs lives in ``params.yaml`` (see :mod:`ddcore.params`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DD_", env_file=".env", extra="ignore")

    project_root: Path = PROJECT_ROOT
    data_root: Path = Field(default=PROJECT_ROOT / "data", description="datasets, trajectories")
    model_root: Path = Field(default=PROJECT_ROOT / "models", description="teachers, students")
    metrics_root: Path = Field(default=PROJECT_ROOT / "metrics", description="DVC metrics files")
    cache_dir: Path = Field(default=Path.home() / ".cache" / "ddcore", description="downloaded checkpoints")
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda', 'cuda:N'")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    num_threads: int = Field(default=0, ge=0, description="torch CPU threads; 0 = torch default")

    mlflow_tracking_uri: str = Field(default="", description="empty = SQLite store inside the project")
    mlflow_experiment: str = "ddcore"

    s3_endpoint_url: str = ""
    s3_bucket: str = ""
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    hf_token: SecretStr | None = None

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or v.startswith("cuda:"):
            return v
        raise ValueError(f"DD_DEVICE={v!r}: allowed are 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.project_root / 'mlflow.db'}"

    def resolve_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

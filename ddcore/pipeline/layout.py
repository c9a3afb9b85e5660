"""Where a preset's files live, derived from the settings roots (or from one project root)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddcore.checkpoints import atomic_write_text
from ddcore.params import PARAMS_FILE
from ddcore.settings import Settings, get_settings


@dataclass(frozen=True)
class Layout:
    """All paths of one preset."""

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

    def data_dir(self, name: str) -> Path:
        """A data output of the preset (e.g. DD1's trajectories): data/<preset>/<name>."""
        return self.data_root / self.preset / name

    def model_dir(self, name: str) -> Path:
        return self.model_root / self.preset / name

    @property
    def teacher_dir(self) -> Path:
        return self.model_dir("teacher")

    @property
    def student_dir(self) -> Path:
        """What the method's last stage writes and evaluate, bench, register and serving read."""
        return self.model_dir("student")

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

    def copy_train_log(self) -> None:
        """Publish the student's train_log.csv as `train_log` (what DVC plots, MLflow logs)."""
        src = self.student_dir / "train_log.csv"
        if src.is_file():
            atomic_write_text(self.train_log, src.read_text())

    @property
    def fid_curve(self) -> Path:
        return self.metrics_dir / "fid_vs_steps.csv"

    @property
    def registry_json(self) -> Path:
        return self.metrics_dir / "registry.json"

    @property
    def state_dir(self) -> Path:
        """Markers of stages whose outputs are committed metrics (kept out of the metrics folder)."""
        return self.data_root / self.preset / ".stages"


def layout_for(preset_name: str, root: Path | str | None = None) -> Layout:
    return Layout.create(preset_name, root=root)

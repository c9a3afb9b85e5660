"""Completion markers: what makes every stage idempotent and resumable.

When a stage finishes it writes a marker holding the fingerprint of what its output depends on
(the preset values it reads, chained with the fingerprints of the stages it reads from) and the
sha256 of the files it wrote. A later call with the same fingerprint and intact files returns the
recorded result without doing the work again; DVC deleting an output before a rerun invalidates
the marker because the output is gone. A stage receives its `StageRun`, which knows its marker.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddcore.checkpoints import atomic_write_json
from ddcore.hashing import sha256_file
from ddcore.params import Preset

MARKER = "_stage.json"


class StageError(RuntimeError):
    """A stage ran but its result is unusable (e.g. a teacher failing its quality checks)."""


@dataclass
class Marker:
    stage: str
    fingerprint: str
    result: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 (file outputs only)


def read_marker(path: Path) -> Marker | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        return Marker(d["stage"], d["fingerprint"], d.get("result", {}), d.get("files", {}))
    except (ValueError, KeyError):
        return None


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


@dataclass(frozen=True)
class StageRun:
    """One call of a stage: which preset, where its files go, and its marker."""

    stage: str
    preset_name: str
    preset: Preset
    layout: Any  # ddcore.pipeline.layout.Layout
    fingerprint: str
    marker_path: Path
    progress: bool = True

    def complete(self) -> Marker | None:
        """The marker when the stage already ran with this fingerprint and its files are intact."""
        m = read_marker(self.marker_path)
        if m is None or m.fingerprint != self.fingerprint:
            return None
        for path, digest in m.files.items():
            p = Path(path)
            if not p.is_file() or sha256_file(p) != digest:
                return None
        return m

    def stale(self) -> Marker | None:
        """A marker left by a run with other inputs (None when absent or current)."""
        m = read_marker(self.marker_path)
        return m if m is not None and m.fingerprint != self.fingerprint else None

    def drop_marker(self) -> None:
        self.marker_path.unlink(missing_ok=True)

    def finish(self, result: dict, files: Sequence[Path] = ()) -> dict:
        atomic_write_json(
            self.marker_path,
            {
                "stage": self.stage,
                "fingerprint": self.fingerprint,
                "result": result,
                "files": {str(p): sha256_file(p) for p in files},
            },
        )
        return result

"""Run layout: every path the project writes derives from ``$SFTFLOW_HOME``.

``$SFTFLOW_HOME`` defaults to ``./.sftflow`` (resolved to an absolute path once, when asked).
Nothing here creates a directory at import time; callers ask for a path and ``ensure`` it.

Layout::

    $SFTFLOW_HOME/
      runs/<pipeline>/<run-id>/<stage>/...   one folder per flow run and stage
      models/<name>/                        provisioned models (safetensors + tokenizer)
      mlflow/mlflow.db, mlflow/artifacts/   default MLflow store (SQLite + local artifacts)
      prefect/                              PREFECT_HOME (SQLite db, persisted task results)
      cache/                                misc caches (tokenizer counts, embeddings...)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# A stage's completion marker, written last with the digests of its outputs (``sftflow.markers``).
STAGE_DONE_MARKER = "_SUCCESS"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def sftflow_home() -> Path:
    """Return the absolute project home (``$SFTFLOW_HOME`` or ``./.sftflow``)."""
    return Path(os.environ.get("SFTFLOW_HOME") or ".sftflow").expanduser().resolve()


def ensure(path: Path) -> Path:
    """Create ``path`` (a directory) with parents and return it."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def safe_name(name: str) -> str:
    """Make ``name`` usable as one path component (no slashes, no spaces)."""
    cleaned = _SAFE.sub("-", name).strip("-.")
    return cleaned or "unnamed"


def models_dir() -> Path:
    """Folder of provisioned models."""
    return sftflow_home() / "models"


def runs_dir() -> Path:
    """Folder of all pipeline runs."""
    return sftflow_home() / "runs"


def mlflow_dir() -> Path:
    """Folder of the default MLflow store (SQLite db + artifacts)."""
    return sftflow_home() / "mlflow"


def prefect_home() -> Path:
    """PREFECT_HOME used by the embedded (ephemeral) Prefect server."""
    return sftflow_home() / "prefect"


def cache_dir() -> Path:
    """Folder for caches that are safe to delete."""
    return sftflow_home() / "cache"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one flow run: ``runs/<pipeline>/<run_id>/``.

    Args:
        pipeline: pipeline name from pipelines.yaml.
        run_id: unique id of this flow run (the Prefect flow-run id when there is one).
        root: the run folder; derived from ``$SFTFLOW_HOME`` when omitted.
    """

    pipeline: str
    run_id: str
    root: Path

    @classmethod
    def create(cls, *, pipeline: str, run_id: str) -> "RunLayout":
        """Layout for ``pipeline``/``run_id`` under the current ``$SFTFLOW_HOME``."""
        root = runs_dir() / safe_name(pipeline) / safe_name(run_id)
        return cls(pipeline=pipeline, run_id=run_id, root=root)

    def stage_dir(self, stage: str) -> Path:
        """Folder of one stage of this run (created)."""
        return ensure(self.root / safe_name(stage))


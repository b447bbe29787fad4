"""MLflow glue: one experiment per pipeline, one parent run per flow run, one nested run per stage.

MLflow's active run is thread-local and Prefect runs tasks in worker threads, so run ids are passed
explicitly in a ``StageContext`` and every stage opens its own nested run with ``stage_run``.
Nothing here touches MLflow at import time.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from sftflow import layout
from sftflow.refs import DatasetRef

# Tag names shared by every run we create (lineage reads them back).
TAG_PIPELINE = "sftflow.pipeline"
TAG_STAGE = "sftflow.stage"
TAG_FLOW_RUN = "sftflow.prefect_flow_run_id"
TAG_CONFIG_HASH = "sftflow.config_hash"
TAG_GIT = "sftflow.git_commit"
TAG_RUN_DIR = "sftflow.run_dir"


def default_tracking_uri() -> str:
    """SQLite store under ``$SFTFLOW_HOME/mlflow``."""
    return f"sqlite:///{layout.mlflow_dir() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite default."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def is_local_store(uri: str) -> bool:
    """True for stores that live in files (sqlite / file), where we choose the artifact root."""
    return urlparse(uri).scheme in ("sqlite", "file", "")


def check_tracking_server(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when an HTTP tracking server does not answer."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:  # noqa: S310 (user-configured URI)
            r.read()
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
            f"MLflow tracking server {uri} is unreachable ({e}). Start one with `infra/local/start.sh` "
            f"(or `sftflow ui`), or unset MLFLOW_TRACKING_URI / tracking.tracking_uri to use the embedded SQLite store."
        ) from None


def configure(uri: str) -> None:
    """Point the mlflow client at ``uri`` (creating the local store folder when needed)."""
    import mlflow

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    # The registry follows the tracking store unless the user configured one.
    if not os.environ.get("MLFLOW_REGISTRY_URI"):
        mlflow.set_registry_uri(uri)


def ensure_experiment(name: str, *, uri: str) -> str:
    """Return the id of experiment ``name``, creating it (artifacts under $SFTFLOW_HOME for local stores)."""
    import mlflow

    configure(uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if is_local_store(uri):
        artifact_location = (layout.ensure(layout.mlflow_dir() / "artifacts") / layout.safe_name(name)).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # a concurrent run created it first
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    """The code version: git commit of the checkout (``+dirty`` when modified), or the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from sftflow import __version__

        return f"sftflow-{__version__}"


@dataclass(frozen=True)
class StageContext:
    """What every stage needs to know about the flow run it belongs to.

    Excluded from Prefect cache keys (it changes every run); stages read their inputs from refs.

    Attributes:
        pipeline: pipeline name.
        run_id: flow-run id (Prefect's when available).
        run_dir: ``$SFTFLOW_HOME/runs/<pipeline>/<run_id>``.
        tracking_uri: MLflow tracking URI.
        experiment_id: MLflow experiment of the pipeline.
        parent_run_id: MLflow parent run of this flow run ("" when tracking is off).
        config_hash: sha256 of the resolved config.
    """

    pipeline: str
    run_id: str
    run_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    config_hash: str = ""

    @property
    def layout(self) -> layout.RunLayout:
        """The run's folder layout."""
        return layout.RunLayout(pipeline=self.pipeline, run_id=self.run_id, root=Path(self.run_dir))

    def stage_dir(self, stage: str) -> Path:
        """Folder of ``stage`` in this run (created)."""
        return self.layout.stage_dir(stage)


@contextlib.contextmanager
def stage_run(ctx: StageContext, stage: str, *, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """Open the nested MLflow run of one stage (in the calling thread) and yield it.

    Inside the block the fluent API (``mlflow.log_metric`` ...) logs to the stage run.
    """
    import mlflow

    configure(ctx.tracking_uri)
    all_tags = {
        TAG_PIPELINE: ctx.pipeline,
        TAG_STAGE: stage,
        TAG_FLOW_RUN: ctx.run_id,
        TAG_CONFIG_HASH: ctx.config_hash,
        TAG_RUN_DIR: ctx.run_dir,
        **(tags or {}),
    }
    # Close a run leaked by an earlier failure in this thread, so nesting stays correct.
    while mlflow.active_run() is not None:
        mlflow.end_run("FAILED")
    with mlflow.start_run(
        experiment_id=ctx.experiment_id,
        run_name=stage,
        parent_run_id=ctx.parent_run_id or None,
        nested=bool(ctx.parent_run_id),
        tags=all_tags,
    ) as run:
        yield run


def log_dataset(ref: DatasetRef, *, context: str, source: str | None = None, df: Any = None) -> None:
    """Log a dataset as an input of the active run, with our sha256 as digest and its source file.

    Args:
        ref: the dataset.
        context: its role, e.g. ``ingest.output``, ``training``, ``eval``.
        source: where it came from (default: the Parquet file itself).
        df: the DataFrame if already loaded (avoids re-reading).
    """
    import mlflow
    import pandas as pd

    frame = df if df is not None else pd.read_parquet(ref.path)
    # MLflow's schema inference chokes on nested lists of structs; log a flat, string view of it
    # (same rows, so MLflow's profile shows the real row count).
    flat = frame.copy()
    for col in flat.columns:
        if flat[col].dtype == object:
            flat[col] = flat[col].map(_flat_value)
    ds = mlflow.data.from_pandas(flat, source=source or ref.path, name=ref.name, digest=ref.sha256[:36])
    mlflow.log_input(ds, context=context, tags={"sftflow.sha256": ref.sha256, "sftflow.rows": str(ref.num_rows),
                                                 "sftflow.path": ref.path})


def _flat_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o), ensure_ascii=False)


def log_json(obj: Any, artifact_file: str) -> None:
    """Log a JSON-able object as an artifact of the active run."""
    import mlflow

    mlflow.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)

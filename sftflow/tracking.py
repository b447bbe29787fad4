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
TAG_SOURCES = "sftflow.sources_digest"
TAG_KIND = "sftflow.kind"  # "pipeline" on parent runs


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


_registry_set_by_us: str | None = None


def configure(uri: str) -> None:
    """Point the mlflow client at ``uri`` (creating the local store folder when needed)."""
    import mlflow

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    # The registry follows the tracking store unless the user configured one. mlflow.set_registry_uri
    # itself exports MLFLOW_REGISTRY_URI, so a value we set earlier is not "the user's" choice.
    global _registry_set_by_us
    env = os.environ.get("MLFLOW_REGISTRY_URI")
    if not env or env == _registry_set_by_us:
        mlflow.set_registry_uri(uri)
        _registry_set_by_us = uri


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
    # A stage opened inside another stage's run (e.g. backtranslation training its backward model)
    # becomes a child of that run; otherwise it hangs under the flow's parent run. The parent run
    # itself is never "active" in any thread (the flow drives it through MlflowClient).
    active = mlflow.active_run()
    parent = active.info.run_id if active is not None else (ctx.parent_run_id or None)
    with mlflow.start_run(
        experiment_id=ctx.experiment_id,
        run_name=stage,
        parent_run_id=parent,
        nested=parent is not None,
        tags=all_tags,
    ) as run:
        try:
            yield run
        finally:
            # A stage's models are garbage once it returns: give their memory back before the next.
            from sftflow.models import release_memory

            release_memory()


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
    import warnings

    with warnings.catch_warnings():
        # MLflow registers LocalArtifactDatasetSource twice and warns about the ambiguity on every
        # local path; the source it picks is the right one.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        ds = mlflow.data.from_pandas(flat, source=source or ref.path, name=ref.name, digest=ref.sha256[:36])
    mlflow.log_input(ds, context=context, tags={"sftflow.sha256": ref.sha256, "sftflow.rows": str(ref.num_rows),
                                                 "sftflow.path": ref.path})


def _flat_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o), ensure_ascii=False)


def sources_digest(cfg: Any) -> str:
    """One sha256 over every input a pipeline reads (source files, hub ids, the unlabeled corpus).

    A scheduled run compares it with the last successful run's ``sftflow.sources_digest`` tag to
    skip retraining when nothing changed.
    """
    import glob
    import hashlib

    from sftflow.refs import sha256_dir, sha256_file

    h = hashlib.sha256()
    locations = [(s.name, s.path, s.hub) for s in cfg.sources]
    if cfg.augmentation.enabled and cfg.augmentation.corpus is not None:
        locations.append((cfg.augmentation.corpus.name, cfg.augmentation.corpus.path, None))
    for name, path, hub in locations:
        h.update(name.encode())
        if hub:
            h.update(f"hub:{hub}".encode())
            continue
        for p in sorted(glob.glob(path)) or [path]:
            pp = Path(p)
            h.update(pp.name.encode())
            h.update((sha256_dir(pp) if pp.is_dir() else sha256_file(pp)).encode())
    return h.hexdigest()


def log_json(obj: Any, artifact_file: str) -> None:
    """Log a JSON-able object as an artifact of the active run."""
    import mlflow

    mlflow.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)


def start_pipeline_run(
    cfg: Any,
    *,
    pipeline: str,
    run_id: str,
    run_dir: Path,
    extra_tags: dict[str, str] | None = None,
) -> StageContext:
    """Create the parent MLflow run of one flow run and return the context stages receive.

    The parent run is created through ``MlflowClient`` (not the thread-local fluent API) so that
    no thread's "active run" state can end it by accident; stages nest under it by id.
    """
    from mlflow.tracking import MlflowClient

    from sftflow.config import config_hash

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_tracking_server(uri)
    experiment_id = ensure_experiment(cfg.tracking.experiment or f"sftflow-{pipeline}", uri=uri)
    chash = config_hash(cfg)
    tags = {
        TAG_PIPELINE: pipeline,
        TAG_KIND: "pipeline",
        TAG_FLOW_RUN: run_id,
        TAG_CONFIG_HASH: chash,
        TAG_GIT: git_commit(),
        TAG_RUN_DIR: str(run_dir),
        TAG_SOURCES: sources_digest(cfg),
        "mlflow.runName": f"{pipeline}-{run_id[:8]}",
        "mlflow.source.name": "flows/pipeline.py",
        **(extra_tags or {}),
    }
    client = MlflowClient(uri)
    run = client.create_run(experiment_id, tags=tags, run_name=tags["mlflow.runName"])
    ctx = StageContext(
        pipeline=pipeline,
        run_id=run_id,
        run_dir=str(run_dir),
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=run.info.run_id,
        config_hash=chash,
    )
    resolved = cfg.model_dump(mode="json")
    client.log_text(run.info.run_id, yaml_dump(resolved), "config/resolved.yaml")
    client.log_text(run.info.run_id, json.dumps(resolved, indent=2, sort_keys=True), "config/resolved.json")
    return ctx


def end_pipeline_run(ctx: StageContext, *, status: str = "FINISHED", summary: dict[str, Any] | None = None) -> None:
    """Close the parent run (``FINISHED`` / ``FAILED`` / ``KILLED``), logging the run summary."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    if summary is not None:
        client.log_text(ctx.parent_run_id, json.dumps(summary, indent=2, sort_keys=True, default=str), "summary.json")
    client.set_terminated(ctx.parent_run_id, status=status)


def run_url(ctx: StageContext) -> str:
    """Where to look at a run: the MLflow UI address for HTTP stores, else the store URI + run id."""
    if urlparse(ctx.tracking_uri).scheme in ("http", "https"):
        return f"{ctx.tracking_uri.rstrip('/')}/#/experiments/{ctx.experiment_id}/runs/{ctx.parent_run_id}"
    return f"{ctx.tracking_uri} (run {ctx.parent_run_id}; browse with `sftflow ui`)"


def yaml_dump(obj: Any) -> str:
    """YAML text of a JSON-able object (key order kept)."""
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)

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
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse, urlsplit, urlunsplit

from sftflow import layout
from sftflow.data.refs import DatasetRef
# One masking function for the whole product (re-exported: callers import them from here too).
from sftflow.masking import mask_text as mask_secrets_in, mask_uri, mask_value  # noqa: F401

# Tag names shared by every run we create (defined once in sftflow.tagnames; re-exported for callers).
from sftflow.tagnames import (  # noqa: F401
    TAG_CACHE_KEY, TAG_CODE_DIGEST, TAG_CONFIG_HASH, TAG_FLOW_RUN, TAG_GIT, TAG_KIND, TAG_PIPELINE, TAG_RUN_DIR,
    TAG_SOURCES, TAG_STAGE,
)


def default_tracking_uri() -> str:
    """SQLite store under ``$SFTFLOW_HOME/mlflow``."""
    return f"sqlite:///{layout.mlflow_dir() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite default."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def is_local_store(uri: str) -> bool:
    """True for stores that live in files (sqlite / file), where we choose the artifact root."""
    return urlparse(uri).scheme in ("sqlite", "file", "")


def _split_credentials(uri: str) -> tuple[str, str | None]:
    """(``uri`` without ``user:password@``, the ``Authorization: Basic`` value or None)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None
    import base64
    from urllib.parse import unquote

    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), f"Basic {token}"


def check_tracking_server(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when an HTTP tracking server does not answer.

    A URI with credentials (``http://user:password@host:5000``) is checked with HTTP basic auth,
    as MLflow's client sends them; the message never shows the password.
    """
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import urllib.error
    import urllib.request

    bare, auth = _split_credentials(uri)
    req = urllib.request.Request(bare.rstrip("/") + "/health", headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (user-configured URI)
            r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        from sftflow.errors import ServiceUnavailable

        raise ServiceUnavailable(
            f"MLflow tracking server {mask_uri(uri)} is unreachable ({mask_secrets_in(str(e))}). Start one with "
            f"`infra/local/start.sh` (or `sftflow ui`), or unset MLFLOW_TRACKING_URI / tracking.tracking_uri to use "
            f"the embedded SQLite store."
        ) from None


_registry_set_by_us: str | None = None
_initialised: set[str] = set()
_init_lock = threading.Lock()


def _store_lock_path(uri: str) -> Path | None:
    """The file lock that serialises creating/migrating the database store ``uri`` (None: no database)."""
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme == "sqlite":
        db = uri.split(":///", 1)[1] if ":///" in uri else ""
        if not db or db.startswith(":memory:"):
            return None
        return Path(db).expanduser().resolve().with_name(Path(db).name + ".init.lock")
    if scheme in ("postgresql", "mysql", "mssql"):
        import hashlib

        key = hashlib.sha256(_split_credentials(uri)[0].encode()).hexdigest()[:16]
        return layout.sftflow_home() / "locks" / f"mlflow-store-{key}.init.lock"
    return None  # HTTP servers and file stores migrate nothing on the client side


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None: in memory, or not SQLite)."""
    if urlparse(uri).scheme.split("+")[0] != "sqlite" or ":///" not in uri:
        return None
    db = uri.split(":///", 1)[1].split("?", 1)[0]
    return None if not db or db.startswith(":memory:") else Path(db).expanduser()


def check_sqlite_store(uri: str) -> None:
    """Raise ``StoreDamaged`` (exit 3, naming the file and what to do) when the existing SQLite file of
    ``uri`` is not a readable database; a store that does not exist yet, or another scheme, passes.

    Opened read-only: checking creates nothing and changes nothing.
    """
    import sqlite3

    from sftflow.errors import store_damaged

    db = _sqlite_file(uri)
    if db is None or not db.is_file():
        return
    try:
        con = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        text = str(e)
        if "locked" in text or "unable to open" in text:
            return  # busy or unreadable: the real open reports it
        raise store_damaged(db, text) from None


def _read_only_store(uri: str, lock_path: Path) -> bool:
    """True when the lock next to an existing store cannot be created (a read-only folder: reading
    lineage from someone else's home): there is nothing to create then, so a reader goes on unlocked."""
    db = _sqlite_file(uri)
    if db is None or not db.is_file():
        return False
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644))
    except PermissionError:
        return True
    except OSError as e:
        import errno

        return e.errno == errno.EROFS
    return False


def init_store(uri: str, *, timeout: float = 900.0) -> None:
    """Create/migrate the MLflow database store ``uri`` once per process, under a file lock.

    Two processes opening a fresh store at once (two first ``sftflow run`` in one new
    ``$SFTFLOW_HOME``) would both run MLflow's schema migrations and one would fail; the lock
    (next to the SQLite file, or under ``$SFTFLOW_HOME/locks`` for other databases) lets one
    create the tables while the other waits, then finds them. HTTP and file stores need nothing.
    """
    with _init_lock:
        if uri in _initialised:
            return
        lock_path = _store_lock_path(uri)
        if lock_path is not None:
            from filelock import FileLock
            from mlflow.tracking import MlflowClient

            check_sqlite_store(uri)  # a damaged file: one line naming it, not a migration traceback
            if _read_only_store(uri, lock_path):
                _initialised.add(uri)  # an outdated schema still fails at the first read, as it should
                return
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(lock_path), timeout=timeout):
                from sftflow.tracking.store import repair_interrupted_migration

                repair_interrupted_migration(uri)  # a migration a full disk interrupted: redo it, not fail for good
                client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                client.search_experiments(max_results=1)  # tracking tables (+ migrations)
                client.search_registered_models(max_results=1)  # model registry tables
        _initialised.add(uri)


def configure(uri: str) -> None:
    """Point the mlflow client at ``uri`` (creating/migrating a local store once, under a lock)."""
    import mlflow

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    init_store(uri)
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
    root = Path(__file__).resolve().parents[2]
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
    from sftflow.keys import current_stage_key

    key = current_stage_key()
    if key is not None and active is None:  # the stage's own task run, not a helper run nested in it
        all_tags.setdefault(TAG_CACHE_KEY, key[0])
        all_tags.setdefault(TAG_CODE_DIGEST, key[1]["code"]["digest"])
    with mlflow.start_run(
        experiment_id=ctx.experiment_id,
        run_name=stage,
        parent_run_id=parent,
        nested=parent is not None,
        tags=mask_value(all_tags, env=False),  # a run dir or a caller's tag may hold a URI with a password
    ) as run:
        # The stage's own peak RSS (a helper run nested in a stage leaves the stage's mark alone).
        from sftflow.tracking.peak_rss import METRIC, peak_rss_mb, reset_peak_rss

        if active is None:
            reset_peak_rss()
        try:
            yield run
        finally:
            peak = peak_rss_mb() if active is None else None
            if peak is not None:
                mlflow.log_metric(METRIC, round(peak, 1))
            # A stage's models are garbage once it returns: give their memory back before the next.
            from sftflow.inference.models import release_memory

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
        elif pd.api.types.is_integer_dtype(flat[col]):
            # MLflow's schema hint warns on every integer column (e.g. ``source_row``); a browsing view
            # loses nothing as float64 (row numbers stay exact far below 2**53).
            flat[col] = flat[col].astype("float64")
    import warnings

    with warnings.catch_warnings():
        # MLflow registers LocalArtifactDatasetSource twice and warns about the ambiguity on every
        # local path; the source it picks is the right one.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        # Integer columns (e.g. ``source_row``) are fine here: the view is for browsing, not serving.
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
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

    from sftflow.digests import dir_sha256, file_sha256

    h = hashlib.sha256()
    locations = [(s.name, s.path, s.hub) for s in cfg.sources]
    if cfg.augmentation.enabled and cfg.augmentation.corpus is not None:
        locations.append((cfg.augmentation.corpus.name, cfg.augmentation.corpus.path, None))
    for name, path, hub in locations:
        h.update(name.encode())
        if hub:
            h.update(f"hub:{hub}".encode())
            continue
        for p in sorted(glob.glob(path, recursive=True)) or [path]:
            pp = Path(p)
            h.update(pp.name.encode())
            h.update((dir_sha256(pp) if pp.is_dir() else file_sha256(pp)).encode())
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
    no thread's "active run" state can end it by accident; stages nest under it by id. Runs left
    RUNNING by a killed earlier run are closed by the flow before it calls this
    (``sftflow.ops.recovery.reap_orphans``), and the flow records the returned parent run in its
    active-run record (``register_active_run``) so a killed run is closed the same way.
    """
    from mlflow.tracking import MlflowClient

    from sftflow.config import config_hash
    from sftflow.masking import install_masking

    # A flow run started outside the CLI (a served deployment's subprocess, the UI) masks too:
    # MLflow prints "View run <tracking URI>" for every stage run from here on.
    install_masking()
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
    tags = mask_value(tags, env=False)  # stored for anyone who can read the store: no credentials
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
    # The resolved config is an artifact anyone with the store can read: a tracking URI (or any
    # other value) with a password in it is stored masked.
    resolved = mask_value(cfg.model_dump(mode="json"))
    client.log_text(run.info.run_id, yaml_dump(resolved), "config/resolved.yaml")
    client.log_text(run.info.run_id, json.dumps(resolved, indent=2, sort_keys=True), "config/resolved.json")
    return ctx


def end_pipeline_run(ctx: StageContext, *, status: str = "FINISHED", summary: dict[str, Any] | None = None) -> None:
    """Close the parent run (``FINISHED`` / ``FAILED`` / ``KILLED``), logging the run summary."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    if summary is not None:
        text = json.dumps(summary, indent=2, sort_keys=True, default=str)
        client.log_text(ctx.parent_run_id, mask_secrets_in(text), "summary.json")
    client.set_terminated(ctx.parent_run_id, status=status)


def run_url(ctx: StageContext) -> str:
    """Where to look at a run: the MLflow UI address for HTTP stores, else the store URI + run id
    (credentials masked: this is printed and logged)."""
    uri = mask_uri(ctx.tracking_uri)
    if urlparse(ctx.tracking_uri).scheme in ("http", "https"):
        return f"{uri.rstrip('/')}/#/experiments/{ctx.experiment_id}/runs/{ctx.parent_run_id}"
    return f"{uri} (run {ctx.parent_run_id}; browse with `sftflow ui`)"


def yaml_dump(obj: Any) -> str:
    """YAML text of a JSON-able object (key order kept)."""
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)

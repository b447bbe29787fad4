"""Pipeline guards: skip a scheduled run whose inputs did not change, serialize what two runs must not interleave.

``sources_unchanged`` is what ``skip_if_unchanged`` (scheduled retraining) asks at the start of a
flow; ``pipeline_lock`` guards the promotion gate's read-compare-move of the registry alias.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from sftflow import layout
from sftflow.tracking.runs import mask_uri

if TYPE_CHECKING:
    from sftflow.config import PipelineConfig


# --------------------------------------------------------------------------- skip if unchanged
def last_successful_run(*, pipeline: str, tracking_uri: str) -> Any | None:
    """The newest FINISHED parent run of ``pipeline`` (tag ``sftflow.kind=pipeline``), or None.

    Searches every active experiment, so a pipeline whose ``tracking.experiment`` was renamed
    still finds its history.
    """
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from sftflow.tracking.runs import TAG_KIND, TAG_PIPELINE, check_tracking_server

    check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not exp_ids:
        return None
    quoted = pipeline.replace("'", "\\'")  # MLflow's filter grammar escapes quotes with a backslash
    runs = client.search_runs(
        experiment_ids=exp_ids,
        filter_string=(f"tags.`{TAG_PIPELINE}` = '{quoted}' "
                       f"and tags.`{TAG_KIND}` = 'pipeline' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def sources_unchanged(cfg: "PipelineConfig", *, pipeline: str, tracking_uri: str | None = None) -> tuple[bool, str]:
    """Whether the last successful run of ``pipeline`` saw the same sources and the same config.

    The flow calls this at start of a scheduled run (``skip_if_unchanged``); every parent run is
    tagged by ``tracking.start_pipeline_run`` with ``sftflow.sources_digest``
    (``tracking.sources_digest(cfg)``) and ``sftflow.config_hash``, which is what is compared. A
    changed config (e.g. new hyper-parameters) retrains even on the same data.

    Args:
        cfg: the resolved pipeline config.
        pipeline: pipeline name (the ``sftflow.pipeline`` tag of its runs).
        tracking_uri: MLflow tracking URI (default: the pipeline's, else ``$MLFLOW_TRACKING_URI``,
            else the embedded store). An unreachable server raises, naming the URI.

    Returns:
        ``(True, why)`` to skip retraining; ``(False, why)`` when something changed or there is no
        earlier successful run. ``why`` is one sentence for the log.
    """
    from sftflow.config import config_hash
    from sftflow.tracking.runs import TAG_CONFIG_HASH, TAG_SOURCES, resolve_tracking_uri, sources_digest

    uri = tracking_uri or resolve_tracking_uri(cfg.tracking.tracking_uri)
    digest = sources_digest(cfg)
    last = last_successful_run(pipeline=pipeline, tracking_uri=uri)
    if last is None:
        return False, f"no earlier successful run of pipeline {pipeline!r} in {mask_uri(uri)}"
    run = last.info.run_id
    if last.data.tags.get(TAG_SOURCES) != digest:
        return False, f"source data changed since run {run} (sources digest {digest[:12]} != {last.data.tags.get(TAG_SOURCES, '')[:12]})"
    if last.data.tags.get(TAG_CONFIG_HASH) != config_hash(cfg):
        return False, f"sources unchanged but the config changed since run {run}"
    return True, f"sources (digest {digest[:12]}) and config unchanged since successful run {run}"


# --------------------------------------------------------------------------- concurrency
@contextlib.contextmanager
def pipeline_lock(pipeline: str, *, timeout: float = 600.0, what: str = "registry") -> Iterator[Path]:
    """Hold an exclusive per-pipeline file lock (``$SFTFLOW_HOME/locks/<pipeline>.<what>.lock``).

    Wrap read-compare-write steps that two concurrent runs of one pipeline must not interleave,
    e.g. the promotion gate reading the champion's metric and moving the alias. Works across
    processes on one machine (the served deployments also carry a concurrency limit of 1 for
    the whole flow, which holds across machines).

    Raises:
        TimeoutError: the lock was not free within ``timeout`` seconds (names the lock file).
    """
    from filelock import FileLock, Timeout

    path = layout.ensure(layout.sftflow_home() / "locks") / f"{layout.safe_name(pipeline)}.{layout.safe_name(what)}.lock"
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise TimeoutError(f"{path}: another run of pipeline {pipeline!r} held the {what} lock for over "
                           f"{timeout:.0f}s") from None
    try:
        yield path
    finally:
        lock.release()

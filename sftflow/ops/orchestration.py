"""Prefect glue shared by every stage's thin ``@task`` wrapper.

Cache keys (``sftflow.ops.cachekeys``): the *content* of everything a stage reads (the bytes of its
input files, model folders and the files its config names), the code it runs (the stage module's
import closure within ``sftflow/``, ``tasks/``, ``flows/``) and the versions of the libraries that
shape its output; never the ``ctx`` (run ids change every run). Results are persisted under
``$SFTFLOW_HOME/prefect`` so a second run with nothing changed is served from cache, once the
cached result's output files still match the digests their completion markers recorded
(``cachekeys.verify_cached_result``, ``sftflow.markers``): a damaged output is recomputed, saying so
in one line. Retries are for I/O stages only; training never retries (it resumes from its last
checkpoint when the flow runs again).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from sftflow import layout


def stage_cache_policy() -> Any:
    """The cache policy of every stage: ``sftflow.ops.cachekeys.StageCachePolicy`` (``ctx`` excluded).

    Imported lazily: importing prefect must wait for ``configure_environment``.
    """
    from sftflow.ops.cachekeys import stage_policy

    return stage_policy(exclude=["ctx"])


# Options for stages whose failures are I/O (files, stores) and safe to retry.
IO_RETRIES = {"retries": 2, "retry_delay_seconds": 2}


def deterministic_failure(exc: BaseException) -> bool:
    """True for a failure that a retry would only repeat: a user error (bad data, bad config ...),
    or an environment problem that waiting seconds does not fix (a full disk, permission denied,
    a damaged database: ``sftflow.errors.find_user_error`` knows them)."""
    from sftflow.errors import find_user_error

    return isinstance(exc, PermissionError) or find_user_error(exc) is not None


def retry_unless(*errors: type[BaseException]) -> Callable[[Any, Any, Any], bool]:
    """A Prefect ``retry_condition_fn``: retry (I/O hiccups) unless the failure is one of ``errors``
    or deterministic (``deterministic_failure``: user errors, a full disk, permission denied ...).

    Bad data (too many quarantined rows, a failed GX suite) fails the same way every time, so
    retrying it only delays the clear error (and repeats it in the log).
    """

    def should_retry(task: Any, task_run: Any, state: Any) -> bool:
        exc = getattr(state, "data", None)
        if not isinstance(exc, BaseException):
            try:
                exc = state.result(raise_on_failure=False)
            except Exception:
                return True
        if not isinstance(exc, BaseException):
            return True
        return not (isinstance(exc, errors) or deterministic_failure(exc))

    return should_retry


def configure_environment() -> None:
    """Point Prefect at ``$SFTFLOW_HOME/prefect`` and turn telemetry off (call before importing prefect).

    Values the user set explicitly are kept.
    """
    home = layout.prefect_home()
    defaults = {
        "PREFECT_HOME": str(home),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        # The embedded server starts slowly on a busy 2-core machine; the default (20 s) is too tight.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
        # Quieter, faster local runs.
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "INFO"),
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    # Prefect's SQLite database cannot be created in a folder that does not exist yet.
    layout.ensure(layout.Path(os.environ["PREFECT_HOME"]).expanduser())


def markdown_artifact(key: str, markdown: str, *, description: str = "") -> None:
    """Create a Prefect markdown artifact when running inside a flow (no-op outside one)."""
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:
        return
    create_markdown_artifact(key=_artifact_key(key), markdown=markdown, description=description or None)


def markdown_with_image(key: str, markdown: str, png: str | Path, *, alt: str, description: str = "") -> None:
    """A markdown artifact with ``png`` appended inline as a data URI (Prefect artifacts hold no files;
    a histogram PNG is ~20 KB). No-op outside a flow, like ``markdown_artifact``."""
    import base64

    b64 = base64.b64encode(Path(png).read_bytes()).decode()
    markdown_artifact(key, f"{markdown}\n\n![{alt}](data:image/png;base64,{b64})", description=description)


def table_artifact(key: str, rows: list[dict[str, Any]], *, description: str = "") -> None:
    """Create a Prefect table artifact when running inside a flow (no-op outside one)."""
    try:
        from prefect.artifacts import create_table_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:
        return
    create_table_artifact(key=_artifact_key(key), table=rows, description=description or None)


def _artifact_key(key: str) -> str:
    # Prefect artifact keys: lowercase letters, numbers and dashes only.
    return "".join(c if c.isalnum() else "-" for c in key.lower()).strip("-")[:100] or "artifact"


# run_logger lives in sftflow.progress (the library below ops writes to it); re-exported for the stages.
from sftflow.progress import run_logger  # noqa: E402,F401

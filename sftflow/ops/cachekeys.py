"""The Prefect 3 cache policy of the stages, on the pure keys of ``sftflow.keys``.

What a key covers (input bytes, the stage module's code closure, library versions) and how it is
computed is ``sftflow/keys.py`` (no Prefect, no I/O beyond digests); the digests are
``sftflow/digests.py``; the tag names are ``sftflow/tagnames.py``. This module adds the Prefect
side: ``StageCachePolicy`` (records each task run's key for ``current_stage_key``, and before a
cache hit checks the cached result's outputs against their completion markers:
``verify_cached_result``), ``stage_policy`` and ``refresh_cache_requested``. The names of ``sftflow.keys`` and the tags are re-exported here
for the stages and tests that import them from ``sftflow.ops.cachekeys``. Prefect is imported only
when the policy class is first used (Prefect reads its settings at import).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from sftflow.keys import (  # noqa: F401  (re-exported)
    KEY_VERSION, LIBRARIES, PROJECT_PACKAGES, PROJECT_ROOT, code_closure, code_digest, current_stage_key,
    describe_input, dir_digest, file_digest, imported_modules, input_digests, key_of, library_versions,
    path_digest, record_stage_key, resolve_location, stage_key, stage_key_components,
)
from sftflow.tagnames import (  # noqa: F401  (re-exported)
    TAG_BASE_SHA256, TAG_CACHE_KEY, TAG_CODE_DIGEST, TAG_HELDOUT_SHA256, TAG_MODEL_SHA256, TAG_TRAIN_KEY,
    TAG_TRAIN_SHA256,
)


def _build_policy_class() -> type:
    """Define ``StageCachePolicy`` on first use: importing prefect must wait for
    ``sftflow.ops.orchestration.configure_environment`` (Prefect reads its settings at import)."""
    from prefect.cache_policies import CachePolicy

    @dataclass
    class StageCachePolicy(CachePolicy):
        """Prefect 3 cache policy: content of the inputs + the stage's code closure + library versions.

        Attributes:
            exclude: argument names left out of the key (``ctx`` by default).
        """

        exclude: list[str] = field(default_factory=lambda: ["ctx"])

        def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                        **kwargs: Any) -> Optional[str]:
            """Key of one task run; Prefect runs the task uncached (and logs why) if this raises."""
            if task_ctx is None:
                return None
            comps = stage_key_components(inputs or {}, fn=task_ctx.task.fn, exclude=self.exclude)
            key = key_of(comps)
            record_stage_key(str(task_ctx.task_run.id), key, comps)
            verify_cached_result(task_ctx, inputs or {}, key)
            return key

        def __sub__(self, other: str) -> "StageCachePolicy":
            """``policy - "arg"`` leaves one more argument out of the key (like ``INPUTS - "x"``)."""
            if not isinstance(other, str):
                raise TypeError("Can only subtract strings from key policies.")
            return dataclasses.replace(self, exclude=sorted({*self.exclude, other}))

    # Picklable by reference as sftflow.ops.cachekeys.StageCachePolicy (see __getattr__ below).
    StageCachePolicy.__module__ = __name__
    StageCachePolicy.__qualname__ = "StageCachePolicy"
    return StageCachePolicy


def __getattr__(name: str) -> Any:
    # ``sftflow.ops.cachekeys.StageCachePolicy``: built on first access, then a plain module attribute.
    if name == "StageCachePolicy":
        cls = _build_policy_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def stage_policy(*, exclude: Iterable[str] = ("ctx",)) -> Any:
    """A ``StageCachePolicy`` (Prefect ``CachePolicy``) leaving ``exclude`` out of the key."""
    from sftflow.ops import cachekeys
    return cachekeys.StageCachePolicy(exclude=list(exclude))


def verify_cached_result(task_ctx: Any, inputs: dict[str, Any], key: str) -> list[str]:
    """Before Prefect serves ``key`` from its cache: do the cached result's outputs still check out?

    Prefect looks up the record of ``key`` right after ``compute_key`` returns and serves an
    unexpired one without running the task. Here the record's result (its ``DatasetRef``/
    ``ModelRef`` files) is checked against the completion markers (``sftflow.markers``); when a
    file is gone, truncated, replaced, or its marker is missing, the record is overwritten by an
    expired one (Prefect 3's ``ResultStore.exists`` is False for an expired record), so the stage
    runs again and its new result replaces the record under the same key. One warning line says
    which output and why. Nothing is checked under ``--no-cache`` (the stage runs anyway).

    Returns:
        The problems found ([] for no record, an intact one, or a refresh).
    """
    from prefect.results import get_result_store

    from sftflow import markers

    if getattr(task_ctx.task, "refresh_cache", None) or refresh_cache_requested():
        return []
    store = get_result_store()
    if not store.exists(key):
        return []
    try:
        problems = markers.check_outputs(store.read(key).result)
    except Exception as e:  # noqa: BLE001 - an unreadable record is recomputed, never a failed run
        problems = [f"result record unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"]
    if not problems:
        return []
    from datetime import datetime, timedelta, timezone

    store.write(obj=None, key=key, expiration=datetime.now(timezone.utc) - timedelta(seconds=1))
    from sftflow.ops.orchestration import run_logger

    # The task run's logger: the console prefixes the stage ("warning dedup: cached output ...").
    markers.report(run_logger("sftflow.cache"), f"cached output {markers.describe(problems)}; recomputing",
                   problems=problems)
    return problems


def refresh_cache_requested() -> bool:
    """True under ``--no-cache``: ``PREFECT_TASKS_REFRESH_CACHE`` set in the environment or in Prefect's settings."""
    env = os.environ.get("PREFECT_TASKS_REFRESH_CACHE", "")
    if env.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from prefect.settings import PREFECT_TASKS_REFRESH_CACHE

        return bool(PREFECT_TASKS_REFRESH_CACHE.value())
    except Exception:  # settings unreadable: the environment said no
        return False

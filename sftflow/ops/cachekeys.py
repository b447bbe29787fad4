"""The Prefect 3 cache policy of the stages, on the pure keys of ``sftflow.keys``.

What a key covers (input bytes, the stage module's code closure, library versions) and how it is
computed is ``sftflow/keys.py`` (no Prefect, no I/O beyond digests); the digests are
``sftflow/digests.py``; the tag names are ``sftflow/tagnames.py``. This module adds the Prefect
side: ``StageCachePolicy`` (records each task run's key for ``current_stage_key``), ``stage_policy``
and ``refresh_cache_requested``. The names of ``sftflow.keys`` and the tags are re-exported here
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

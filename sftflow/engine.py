"""The execution engine of the data stages: this process (``local``) or Ray tasks (``ray``).

A stage splits its work into pure per-shard functions plus a merge (see ``tasks/ingest.py``,
``tasks/validate.py``, ``tasks/dedup.py``, ``sftflow/data/minhash.py``) and runs the per-shard part
with ``Engine.map``. ``LocalEngine.map`` is a loop here; ``RayEngine.map`` runs one Ray task per
shard and returns the results in order, so both engines give the same results by construction.

The flow activates one engine per run (``activate(cfg.execution)`` / ``release()``); a stage asks
for it with ``current_engine()`` (the local engine when none is active, e.g. a stage called alone).
``engine: ray`` with no ``address`` starts a local Ray cluster bound to 127.0.0.1 (and shuts it
down again on ``release``); ``address: auto`` or ``ray://host:10001`` joins an existing one.
Nothing happens at import time: Ray is imported only when a Ray engine starts.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from contextlib import contextmanager

from sftflow.config_sections import ConfigError, ExecutionConfig

_REPO_ROOT = str(Path(__file__).resolve().parents[2])


class Engine:
    """Runs a function over shards; ``map`` keeps the order of ``items``.

    Attributes:
        kind: ``local`` or ``ray``.
        shard_rows: rows per shard the data stages use (``execution.shard_rows``).
        generation_backend: ``execution.generation_backend`` (``auto``/``hf``/``vllm``), read by
            ``sftflow.inference.batch`` when a stage generates.
    """

    kind = "local"
    generation_backend = "auto"

    def __init__(self, *, shard_rows: int = 100_000) -> None:
        self.shard_rows = shard_rows

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(x) for x in items]``, in order."""
        return [fn(x) for x in items]

    @property
    def workers(self) -> int:
        """How many shards run at once."""
        return 1

    def describe(self) -> str:
        """One line for the run's log: which engine, and with what."""
        return f"local (this process; shards of {self.shard_rows:,} rows)"


class LocalEngine(Engine):
    """Every shard in this process, one after the other."""


class RayEngine(Engine):
    """One Ray task per shard (1 CPU each) on the connected cluster.

    Args:
        shard_rows: rows per shard.
        started: this engine started the cluster (``release`` shuts it down) rather than joining one.
    """

    kind = "ray"

    def __init__(self, *, shard_rows: int = 100_000, started: bool = False) -> None:
        super().__init__(shard_rows=shard_rows)
        self.started = started
        self._remote: dict[Callable, Any] = {}

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """Run ``fn`` on each item as a Ray task; results in order (a task's error is raised here)."""
        import ray

        items = list(items)
        if len(items) <= 1:  # no parallelism to gain: skip the object-store round trip
            return [fn(x) for x in items]
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = ray.remote(num_cpus=1, max_retries=0)(fn)
        return ray.get([remote.remote(x) for x in items])

    @property
    def workers(self) -> int:
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def describe(self) -> str:
        import ray

        res = ray.cluster_resources()
        where = "a private local cluster on 127.0.0.1" if self.started else "the cluster it joined"
        return (f"ray ({where}: {int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs; "
                f"shards of {self.shard_rows:,} rows)")


def start_engine(cfg: ExecutionConfig | None = None) -> Engine:
    """The engine ``cfg`` asks for; starts (or joins) a Ray cluster for ``engine: ray``.

    Args:
        cfg: the pipeline's ``execution`` section (None: local).

    Raises:
        ConfigError: ``engine: ray`` without the ``ray`` extra installed.
    """
    cfg = cfg or ExecutionConfig()
    if cfg.engine == "local":
        return LocalEngine(shard_rows=cfg.shard_rows)
    try:
        import ray
    except ImportError:
        raise ConfigError("execution.engine: ray needs the `ray` extra (pip install -e '.[ray]'), not installed "
                          "in this environment; or set execution.engine=local") from None
    if ray.is_initialized():  # joined by the caller (e.g. a test, or a notebook): leave it running
        return RayEngine(shard_rows=cfg.shard_rows, started=False)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    if cfg.address is None:
        # A private local cluster on loopback; workers import this repo like the driver does.
        kwargs.update(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, _node_ip_address="127.0.0.1",
                      runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                          x for x in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if x)}})
    else:
        kwargs["address"] = cfg.address
    ray.init(**kwargs)
    return RayEngine(shard_rows=cfg.shard_rows, started=True)


_lock = threading.Lock()
_active: Engine | None = None


def activate(cfg: ExecutionConfig | None = None) -> Engine:
    """Start the engine of ``cfg`` and make it the one ``current_engine()`` returns (once per flow run)."""
    global _active
    with _lock:
        if _active is not None and _active.kind == (cfg or ExecutionConfig()).engine:
            _active.shard_rows = (cfg or ExecutionConfig()).shard_rows
            _active.generation_backend = (cfg or ExecutionConfig()).generation_backend
            return _active
        _release_locked()
        _active = start_engine(cfg)
        _active.generation_backend = (cfg or ExecutionConfig()).generation_backend
        return _active


def release() -> None:
    """Forget the active engine; shut Ray down when this process started the cluster."""
    with _lock:
        _release_locked()


def _release_locked() -> None:
    global _active
    engine, _active = _active, None
    if isinstance(engine, RayEngine) and engine.started:
        import ray

        ray.shutdown()


def current_engine() -> Engine:
    """The active engine, or a local one when none is active."""
    return _active or LocalEngine()


@contextmanager
def engine_session(cfg: ExecutionConfig | None = None) -> Iterator[Engine]:
    """``activate(cfg)`` for the duration of a ``with`` block, then ``release()``."""
    engine = activate(cfg)
    try:
        yield engine
    finally:
        release()


def shard_bounds(num_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(num_rows)`` in shards of ``shard_rows`` (one empty shard for 0 rows)."""
    if num_rows <= 0:
        return [(0, 0)]
    return [(lo, min(num_rows, lo + shard_rows)) for lo in range(0, num_rows, shard_rows)]


__all__ = ["Engine", "LocalEngine", "RayEngine", "activate", "current_engine", "engine_session", "release",
           "shard_bounds", "start_engine"]

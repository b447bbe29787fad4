"""Runs whose process died (or whose own closing failed) are closed by the next run.

A flow run writes a small *active-run record* while it lives,
``$SFTFLOW_HOME/runs/.active/<flow-run-id>.json`` (mode 0600): pid and process start time (a
reused pid is not mistaken for it), host, boot id, MLflow tracking URI + parent run id, Prefect
flow-run id and API URL; and holds an exclusive ``flock`` on ``.<flow-run-id>.lock`` beside it,
which the kernel releases however the process ends (a free lock: the run is over). A successful
end removes the record. After ``kill -9`` (an OOM kill, a power cut), or an end by exception (its
own closing may have failed too, e.g. on a full disk), it stays, and ``reap_orphans()`` -- called
when the next pipeline run starts, and by any command that wants to -- for every run that is over:

* sets every MLflow run still ``RUNNING`` under its parent run (stage runs, nested runs), then the
  parent, to ``KILLED`` with an end time and the tag ``sftflow.terminated_reason``;
* sets the Prefect flow run and its unfinished task runs to ``Crashed`` (forced), through the
  run's Prefect API or a temporary server on the same database.

Runs already finished are left alone, so a failed run that closed everything changes nothing. A
record stays until both parts are done (a tracking server that is down is retried next time).
Records are written to a temporary file in the same folder, fsync'ed and renamed (a full disk
leaves the previous record whole). An empty or garbled record is logged and reaped from what is
left: its file name (the flow-run id), this home's Prefect database, and the MLflow parent run
found by its flow-run tag. Training is not affected: it resumes from its last checkpoint.
``guard_ephemeral_server`` (``sftflow.ops.prefect_server``) is re-exported here. Nothing here
runs at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from sftflow import layout
from sftflow.tagnames import TAG_FLOW_RUN, TAG_KIND
from sftflow.ops.prefect_server import TEMPORARY_API_ENV, guard_ephemeral_server  # noqa: F401  (re-exported)
from sftflow.ops.processes import boot_id, is_alive, start_ticks

TAG_TERMINATED_REASON = "sftflow.terminated_reason"
ACTIVE_DIR_NAME = ".active"
_log = logging.getLogger("sftflow.ops.recovery")


def active_dir() -> Path:
    """``$SFTFLOW_HOME/runs/.active``: one record per live flow run."""
    return layout.runs_dir() / ACTIVE_DIR_NAME


@dataclass
class ActiveRun:
    """The record of one live flow run (see the module docstring).

    Attributes:
        flow_run_id: Prefect's flow-run id (``local-...`` outside Prefect).
        pipeline: pipeline name.
        pid: the process that runs the flow.
        start_ticks: that process's start time (``/proc/<pid>/stat`` field 22).
        boot_id: the kernel boot the pid belongs to.
        host: host name.
        started_at: Unix time the record was written.
        tracking_uri: MLflow tracking URI ("" until the parent run exists).
        parent_run_id: MLflow parent run id ("" until it exists).
        prefect_api_url: the Prefect API the run reported to; "" for Prefect's temporary server.
        prefect_db: digest of the temporary server's database location (which database to open).
        mlflow_done / prefect_done: parts already cleaned up by an earlier reap.
    """

    flow_run_id: str
    pipeline: str
    pid: int
    start_ticks: int | None
    boot_id: str
    host: str
    started_at: float
    tracking_uri: str = ""
    parent_run_id: str = ""
    prefect_api_url: str = ""
    prefect_db: str = ""
    mlflow_done: bool = False
    prefect_done: bool = False
    garbled: bool = False  # rebuilt from an unreadable record: pid/ids unknown

    def process_alive(self) -> bool | None:
        """True/False for a process on this host; None when it ran on another host (unknown).

        The run's lock decides when there is one (free = the flow ended or its process died);
        otherwise the pid and its start time do (records written before locks existed).
        """
        if self.host != socket.gethostname():
            return None
        held = lock_held(self.flow_run_id)
        if held is not None:
            return held
        if self.garbled:
            return None
        if self.boot_id and self.boot_id != boot_id():
            return False  # the machine rebooted since
        return is_alive(self.pid, start_ticks_=self.start_ticks)


@dataclass(frozen=True)
class Reaped:
    """What ``reap_orphans`` did for one dead run.

    Attributes:
        flow_run_id: the flow run.
        pipeline: its pipeline.
        mlflow_runs: MLflow runs set to KILLED (stage runs first, the parent last).
        prefect_runs: Prefect flow/task runs set to Crashed.
        pending: why part of the cleanup must wait for a later call ("" when complete).
    """

    flow_run_id: str
    pipeline: str
    mlflow_runs: tuple[str, ...] = ()
    prefect_runs: tuple[str, ...] = ()
    pending: str = ""

    def summary(self) -> str:
        """One line for logs."""
        line = (f"closed run {self.flow_run_id} of pipeline {self.pipeline!r} left by a dead process: "
                f"{len(self.mlflow_runs)} MLflow run(s) KILLED, {len(self.prefect_runs)} Prefect run(s) Crashed")
        return line + (f"; still pending: {self.pending}" if self.pending else "")


# --------------------------------------------------------------------------- records
def _record_path(flow_run_id: str) -> Path:
    return active_dir() / f"{layout.safe_name(flow_run_id)}.json"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically to ``path``, readable by the owner only from the first byte.

    A temporary file in the same folder, flushed and fsync'ed, then renamed over ``path`` (and the
    folder fsync'ed): a full disk or a crash leaves the previous record whole, never an empty one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself durable (not supported everywhere)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# --------------------------------------------------------------------------- run locks
_held_locks: dict[str, int] = {}


def _lock_path(flow_run_id: str) -> Path:
    return active_dir() / f".{layout.safe_name(flow_run_id)}.lock"


def _hold_lock(flow_run_id: str) -> None:
    """Take the run's lock for the life of this flow run (released by the kernel if we die)."""
    import fcntl

    if flow_run_id in _held_locks:
        return
    try:
        _lock_path(flow_run_id).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(_lock_path(flow_run_id), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:  # e.g. no space for the file: liveness falls back to the pid
        _log.debug("no lock for run %s: %s", flow_run_id, e)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return
    _held_locks[flow_run_id] = fd


def _release_lock(flow_run_id: str, *, remove: bool) -> None:
    fd = _held_locks.pop(flow_run_id, None)
    if remove:
        _lock_path(flow_run_id).unlink(missing_ok=True)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def lock_held(flow_run_id: str) -> bool | None:
    """True while a process holds the run's lock, False once it is free, None when there is no lock file."""
    import fcntl

    if flow_run_id in _held_locks:
        return True
    try:
        fd = os.open(_lock_path(flow_run_id), os.O_RDWR)
    except OSError:  # no lock file (a record from before run locks), or unreadable
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)
    return False


def _current_prefect() -> tuple[str, str]:
    """(API URL or "" for the temporary server, digest of the temporary server's database)."""
    try:
        from prefect.settings import get_current_settings

        s = get_current_settings()
    except Exception:  # noqa: BLE001 - Prefect not importable/configured: nothing to record
        return os.environ.get("PREFECT_API_URL", ""), ""
    url = str(s.api.url or "")
    if url and url != os.environ.get(TEMPORARY_API_ENV):  # this process's own temporary server: below
        return url, ""
    return "", _prefect_db_digest(s)


def _prefect_db_digest(settings: Any) -> str:
    conn = settings.server.database.connection_url
    conn = conn.get_secret_value() if hasattr(conn, "get_secret_value") else (conn or "")
    home = str(Path(settings.home).expanduser().resolve())
    return hashlib.sha256(f"{home}\n{conn}".encode()).hexdigest()[:16]


def register_active_run(*, flow_run_id: str, pipeline: str, tracking_uri: str | None = None,
                        parent_run_id: str | None = None) -> Path:
    """Write (or update) the active-run record of ``flow_run_id`` for this process.

    Called at flow start, and again by the flow once ``tracking.start_pipeline_run`` made the parent run
    exists. Returns the record's path.
    """
    path = _record_path(flow_run_id)
    old = read_record(path)
    me = os.getpid()
    if old is not None and old.pid == me:
        rec = old
    else:
        api, db = _current_prefect()
        rec = ActiveRun(flow_run_id=flow_run_id, pipeline=pipeline, pid=me, start_ticks=start_ticks(me),
                        boot_id=boot_id(), host=socket.gethostname(), started_at=time.time(),
                        prefect_api_url=api, prefect_db=db)
    if tracking_uri is not None:
        rec.tracking_uri = tracking_uri
    if parent_run_id is not None:
        rec.parent_run_id = parent_run_id
    _hold_lock(flow_run_id)
    _write_private(path, json.dumps(asdict(rec), indent=1))
    return path


def clear_active_run(flow_run_id: str, *, keep_record: bool = False) -> None:
    """Remove this process's record of ``flow_run_id`` and release its lock.

    Args:
        keep_record: release the lock but keep the record, for the next reap to close what this
            run could not (a run that failed, perhaps because the disk was full).
    """
    path = _record_path(flow_run_id)
    rec = read_record(path)
    mine = rec is None or rec.pid == os.getpid()
    if mine and not keep_record:
        path.unlink(missing_ok=True)
    _release_lock(flow_run_id, remove=mine and not keep_record)


@contextlib.contextmanager
def active_run(*, flow_run_id: str, pipeline: str) -> Iterator[Path]:
    """Hold the active-run record of ``flow_run_id`` for the duration of the block.

    A block that raises keeps the record (with its lock released): the flow's own closing of its
    MLflow/Prefect runs may have failed with it, and the next reap closes what is still open.
    """
    path = register_active_run(flow_run_id=flow_run_id, pipeline=pipeline)
    ok = False
    try:
        yield path
        ok = True
    finally:
        clear_active_run(flow_run_id, keep_record=not ok)


def read_record(path: Path) -> ActiveRun | None:
    """The record in ``path``, or None when absent or unreadable (a half-written one is ignored)."""
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(ActiveRun)}
        return ActiveRun(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError):
        return None


def active_runs() -> list[tuple[Path, ActiveRun]]:
    """Every record under ``active_dir()``; an unreadable one (empty, garbled) as a ``garbled``
    record rebuilt from its file name, this home's Prefect database and the file's time."""
    d = active_dir()
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        rec = read_record(p)
        if rec is None:
            try:
                mtime = p.stat().st_mtime
            except OSError:
                continue  # removed meanwhile
            rec = ActiveRun(flow_run_id=p.stem, pipeline="?", pid=0, start_ticks=None, boot_id="",
                            host=socket.gethostname(), started_at=mtime, prefect_db=_current_prefect()[1],
                            garbled=True)
        out.append((p, rec))
    return out


def _booted_at() -> float | None:
    try:
        return next(float(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime "))
    except (OSError, StopIteration):
        return None


# --------------------------------------------------------------------------- reaping
def _reason(rec: ActiveRun) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return (f"process {rec.pid} on {rec.host} running this flow run ended without closing it (killed, e.g. "
            f"kill -9 / out of memory, or crashed); closed by sftflow (pid {os.getpid()}) at {when}")


def reap_orphans(*, prefect: bool = True, logger: Any = None) -> list[Reaped]:
    """Close the MLflow and Prefect runs of flow runs whose process died (see the module docstring).

    Safe to call from any command, any number of times, and from several processes at once (a
    file lock lets one of them work; the others return at once). Failures are logged and leave
    the record for a later call; they never raise.

    Args:
        prefect: also set the Prefect runs Crashed. Runs that used Prefect's temporary server
            need one started on the same database (seconds); a command that must stay quick can
            pass False and leave that part to the next pipeline run.
        logger: where to log (default: the ``sftflow.ops.recovery`` logger).

    Returns:
        One entry per dead run handled.
    """
    log = logger or _log
    records = active_runs()
    if not records:
        return []
    from filelock import FileLock, Timeout

    lock = FileLock(str(active_dir() / ".reap.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return []  # another process is reaping right now
    done: list[Reaped] = []
    try:
        for path, rec in active_runs():
            alive = rec.process_alive()
            if rec.garbled and alive is None:
                booted = _booted_at()  # no lock to ask: a record older than this boot is dead
                alive = False if booted is not None and rec.started_at < booted else None
            if rec.garbled:  # logged, never skipped silently
                log.warning("active-run record %s is unreadable (empty or garbled, e.g. on a full disk); %s", path,
                            f"closing run {rec.flow_run_id}" if alive is False else "its run may be alive: left")
            if alive is not False:
                continue
            try:
                result = _reap_one(path, rec, prefect=prefect)
            except Exception as e:  # noqa: BLE001 - never break the command that called us
                log.warning("could not close run %s of a dead process (will retry next time): %s",
                            rec.flow_run_id, _masked(str(e)))
                continue
            done.append(result)
            # A failed run that closed its own runs leaves nothing to change: no line for that.
            log.log(logging.WARNING if result.mlflow_runs or result.prefect_runs else logging.DEBUG,
                    "%s", result.summary())
    finally:
        lock.release()
    return done


def _masked(text: str) -> str:
    from sftflow.tracking.runs import mask_secrets_in

    return mask_secrets_in(text)


def _reap_one(path: Path, rec: ActiveRun, *, prefect: bool) -> Reaped:
    reason = _reason(rec)
    pending = []
    mlflow_runs: list[str] = []
    prefect_runs: list[str] = []
    if not rec.mlflow_done:
        try:
            if rec.parent_run_id and rec.tracking_uri:
                parents = [(rec.tracking_uri, rec.parent_run_id)]
            else:  # the record never got (or lost) its parent run: find it by its flow-run tag
                parents = find_parent_runs(flow_run_id=rec.flow_run_id, tracking_uri=rec.tracking_uri or None)
            for uri, parent in parents:
                mlflow_runs += kill_mlflow_runs(tracking_uri=uri, parent_run_id=parent, reason=reason)
            rec.mlflow_done = True  # (no parent at all: killed before its MLflow parent run existed)
        except Exception as e:  # noqa: BLE001
            pending.append(f"MLflow ({_masked(str(e)).splitlines()[0][:200]})")
    if not rec.prefect_done:
        if not _is_uuid(rec.flow_run_id):
            rec.prefect_done = True  # ran outside Prefect
        elif not prefect:
            pending.append("Prefect (not requested by this command)")
        else:
            try:
                prefect_runs = crash_prefect_runs(rec, reason=reason)
                rec.prefect_done = True
            except _NotReachable as e:
                pending.append(f"Prefect ({e})")
            except Exception as e:  # noqa: BLE001
                pending.append(f"Prefect ({_masked(str(e)).splitlines()[0][:200]})")
    if rec.mlflow_done and rec.prefect_done:
        path.unlink(missing_ok=True)
        _lock_path(rec.flow_run_id).unlink(missing_ok=True)
    else:
        _write_private(path, json.dumps(asdict(rec), indent=1))
    return Reaped(flow_run_id=rec.flow_run_id, pipeline=rec.pipeline, mlflow_runs=tuple(mlflow_runs),
                  prefect_runs=tuple(prefect_runs), pending="; ".join(pending))


def _is_uuid(s: str) -> bool:
    import uuid

    try:
        uuid.UUID(s)
    except ValueError:
        return False
    return True


def find_parent_runs(*, flow_run_id: str, tracking_uri: str | None = None) -> list[tuple[str, str]]:
    """``(tracking URI, run id)`` of the MLflow parent run(s) tagged with ``flow_run_id``.

    For records that never got their parent run id (its update failed, e.g. on a full disk) or
    lost it (garbled): searched in ``tracking_uri``, else the store this home resolves to. A local
    store that does not exist yet has no runs (it is not created here).
    """
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from sftflow.tracking.runs import init_store, is_local_store, resolve_tracking_uri

    uri = tracking_uri or resolve_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.split(":///", 1)[1]).exists():
        return []
    if not is_local_store(uri):
        from sftflow.tracking.runs import check_tracking_server

        check_tracking_server(uri, timeout=5)
    init_store(uri)
    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not exps:
        return []
    runs = client.search_runs(exps, filter_string=f"tags.`{TAG_FLOW_RUN}` = '{flow_run_id}' and "
                                                 f"tags.`{TAG_KIND}` = 'pipeline'", run_view_type=ViewType.ALL)
    return [(uri, r.info.run_id) for r in runs]


def kill_mlflow_runs(*, tracking_uri: str, parent_run_id: str, reason: str, status: str = "KILLED") -> list[str]:
    """Set every unfinished run under ``parent_run_id`` (any depth), then the parent, to ``status``.

    Each gets an end time (now) and the tag ``sftflow.terminated_reason``. Runs already finished
    are left alone, so calling it twice changes nothing.

    Returns:
        The run ids changed, children before parents.
    """
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from sftflow.tracking.runs import check_tracking_server, init_store

    # A tracking server that is down must cost seconds, not MLflow's minutes of HTTP retries.
    check_tracking_server(tracking_uri, timeout=5)
    init_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) or "not found" in str(e).lower():
            return []  # deleted meanwhile: nothing to close
        raise
    exp = parent.info.experiment_id
    order: list[Any] = []
    frontier = [parent_run_id]
    seen = {parent_run_id}
    while frontier:
        nxt = []
        for pid in frontier:
            token = None
            while True:
                page = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{pid}'",
                                          run_view_type=ViewType.ALL, max_results=1000, page_token=token)
                for r in page:
                    if r.info.run_id not in seen:
                        seen.add(r.info.run_id)
                        order.append(r)
                        nxt.append(r.info.run_id)
                token = page.token
                if not token:
                    break
        frontier = nxt
    changed = []
    for run in [*reversed(order), parent]:  # deepest first, the parent last
        if run.info.status in ("RUNNING", "SCHEDULED"):
            client.set_tag(run.info.run_id, TAG_TERMINATED_REASON, reason)
            client.set_terminated(run.info.run_id, status=status)
            changed.append(run.info.run_id)
    return changed


class _NotReachable(RuntimeError):
    """The Prefect API that holds the run cannot be reached from this process (retry later)."""


def crash_prefect_runs(rec: ActiveRun, *, reason: str) -> list[str]:
    """Set the flow run of ``rec`` and its unfinished task runs to ``Crashed`` (forced).

    Uses the API the run reported to; for runs on Prefect's temporary server, the current
    process's Prefect (temporary server on the same database, or a server at ``PREFECT_API_URL``
    that holds the run, e.g. ``sftflow ui``'s, which serves the same SQLite file).

    Returns:
        Ids of the runs changed (flow run first).

    Raises:
        _NotReachable: the run's API is down, or this process's Prefect is another database.
    """
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
    from prefect.states import Crashed

    current_api, current_db = _current_prefect()
    if rec.prefect_api_url:
        from sftflow.ops.servers import http_ok

        if not http_ok(rec.prefect_api_url.rstrip("/") + "/health", timeout=5):
            from sftflow.tracking.runs import mask_uri

            raise _NotReachable(f"Prefect API {mask_uri(rec.prefect_api_url)} is unreachable")
        settings_cm: Any = temporary_settings(updates={PREFECT_API_URL: rec.prefect_api_url})
    elif current_api:
        settings_cm = contextlib.nullcontext()  # perhaps a server on the same database: try it
    elif current_db == rec.prefect_db:
        guard_ephemeral_server()
        settings_cm = contextlib.nullcontext()
    else:
        raise _NotReachable("the run used Prefect's temporary server on another Prefect home/database "
                            f"(this process: {get_current_settings().home})")
    fr_id = UUID(rec.flow_run_id)
    changed: list[str] = []
    with settings_cm, get_client(sync_client=True) as client:
        try:
            fr = client.read_flow_run(fr_id)
        except ObjectNotFound:
            if not rec.prefect_api_url and current_api:
                raise _NotReachable(f"flow run not found at {current_api} (another database)") from None
            return []
        state = Crashed(message=reason)
        if fr.state is None or not fr.state.is_final():
            client.set_flow_run_state(fr_id, state=state, force=True)
            changed.append(str(fr_id))
        offset = 0
        while True:
            page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr_id])),
                                         limit=200, offset=offset)
            for tr in page:
                if tr.state is None or not tr.state.is_final():
                    client.set_task_run_state(tr.id, state=Crashed(message=reason), force=True)
                    changed.append(str(tr.id))
            if len(page) < 200:
                break
            offset += len(page)
    return changed

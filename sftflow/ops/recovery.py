"""Runs whose process died are closed, and Prefect's temporary server dies with its process.

A flow run writes a small *active-run record* while it lives,
``$SFTFLOW_HOME/runs/.active/<flow-run-id>.json`` (mode 0600): its pid and process start time
(so a reused pid is not mistaken for it), host, boot id, MLflow tracking URI + parent run id,
Prefect flow-run id and API URL. A normal end (success or exception) removes it. After
``kill -9`` (or an OOM kill, a power cut) it stays, and ``reap_orphans()`` -- called when the
next pipeline run starts, and by any command that wants to -- finds records whose process is
gone and:

* sets every MLflow run still ``RUNNING`` under that parent run (stage runs and their nested
  runs), then the parent itself, to ``KILLED`` with an end time and the tag
  ``sftflow.terminated_reason`` saying what happened;
* sets the Prefect flow run and its unfinished task runs to ``Crashed`` (forced: the dead
  process can no longer report), through the run's Prefect API, or -- for runs that used
  Prefect's temporary server -- through a temporary server on the same database.

A record stays until both parts are done (e.g. a tracking server that is down is retried next
time). Training is not affected: it resumes from its last checkpoint on the next run.

``guard_ephemeral_server()`` makes the temporary Prefect server that ``sftflow run`` starts
(no ``PREFECT_API_URL``) a child that gets SIGKILL when its parent dies, in its own session
(Ctrl-C in the terminal reaches the flow, which can still report its final state), and
serialises its start (database creation and migrations) across processes with a file lock.

Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from sftflow import layout
from sftflow.ops.processes import boot_id, call_in_lifetime_thread, die_with_parent, is_alive, start_ticks

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

    def process_alive(self) -> bool | None:
        """True/False for a process on this host; None when it ran on another host (unknown)."""
        if self.host != socket.gethostname():
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
    """Write ``text`` atomically to ``path``, readable by the owner only from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _current_prefect() -> tuple[str, str]:
    """(API URL or "" for the temporary server, digest of the temporary server's database)."""
    try:
        from prefect.settings import get_current_settings

        s = get_current_settings()
    except Exception:  # noqa: BLE001 - Prefect not importable/configured: nothing to record
        return os.environ.get("PREFECT_API_URL", ""), ""
    url = str(s.api.url or "")
    if url:
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
    _write_private(path, json.dumps(asdict(rec), indent=1))
    return path


def clear_active_run(flow_run_id: str) -> None:
    """Remove this process's record of ``flow_run_id`` (the run ended in a way it could report)."""
    path = _record_path(flow_run_id)
    rec = read_record(path)
    if rec is None or rec.pid == os.getpid():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def active_run(*, flow_run_id: str, pipeline: str) -> Iterator[Path]:
    """Hold the active-run record of ``flow_run_id`` for the duration of the block."""
    path = register_active_run(flow_run_id=flow_run_id, pipeline=pipeline)
    try:
        yield path
    finally:
        clear_active_run(flow_run_id)


def read_record(path: Path) -> ActiveRun | None:
    """The record in ``path``, or None when absent or unreadable (a half-written one is ignored)."""
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(ActiveRun)}
        return ActiveRun(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError):
        return None


def active_runs() -> list[tuple[Path, ActiveRun]]:
    """Every readable record under ``active_dir()``."""
    d = active_dir()
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        rec = read_record(p)
        if rec is not None:
            out.append((p, rec))
    return out


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
            if rec.process_alive() is not False:
                continue
            try:
                result = _reap_one(path, rec, prefect=prefect)
            except Exception as e:  # noqa: BLE001 - never break the command that called us
                log.warning("could not close run %s of a dead process (will retry next time): %s",
                            rec.flow_run_id, _masked(str(e)))
                continue
            done.append(result)
            log.warning("%s", result.summary())
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
        if rec.parent_run_id and rec.tracking_uri:
            try:
                mlflow_runs = kill_mlflow_runs(tracking_uri=rec.tracking_uri, parent_run_id=rec.parent_run_id,
                                               reason=reason)
                rec.mlflow_done = True
            except Exception as e:  # noqa: BLE001
                pending.append(f"MLflow ({_masked(str(e)).splitlines()[0][:200]})")
        else:
            rec.mlflow_done = True  # killed before its MLflow parent run existed
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
        from sftflow.ops.services import _http_ok

        if not _http_ok(rec.prefect_api_url.rstrip("/") + "/health", timeout=5):
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


# --------------------------------------------------------------------------- Prefect's temporary server
_guard_class: Any = None


def _prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def _guarded_server_class() -> Any:
    """A ``SubprocessASGIServer`` whose process dies with ours and whose start is serialised."""
    global _guard_class
    if _guard_class is not None:
        return _guard_class
    from prefect.server.api.server import SubprocessASGIServer

    class GuardedASGIServer(SubprocessASGIServer):  # type: ignore[misc, valid-type]
        """Prefect's temporary server, supervised: see ``guard_ephemeral_server``."""

        def start(self, timeout: int | None = None) -> None:
            if self.running:
                return
            from filelock import FileLock

            home = _prefect_home()
            home.mkdir(parents=True, exist_ok=True)
            # Creating/migrating the database happens in the server's startup, before /health
            # answers: two first runs at once would migrate one SQLite file concurrently.
            with FileLock(str(home / ".server-start.lock"), timeout=900):
                super().start(timeout=timeout)

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Same command and environment as Prefect's own (prefect 3.x SubprocessASGIServer),
            # but (1) SIGKILL when this process dies, even by kill -9, (2) its own session, so a
            # Ctrl-C in the terminal reaches the flow (which still reports its final state to the
            # server) and not the server first; Prefect's atexit stop() ends it on a normal exit.
            import prefect
            from prefect.settings import get_current_settings

            argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                    "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                    "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1",
                   **get_current_settings().to_environment_variables(exclude_unset=True)}
            return call_in_lifetime_thread(
                lambda: subprocess.Popen(die_with_parent(argv), env=env, start_new_session=True))

    _guard_class = GuardedASGIServer
    return _guard_class


def guard_ephemeral_server() -> bool:
    """Supervise the temporary Prefect server this process may start (no ``PREFECT_API_URL``).

    Call before the first flow run or Prefect client of the process (``sftflow run`` does).
    Afterwards the server Prefect starts on demand dies with this process (parent-death signal)
    and its database initialisation is serialised with other processes on the same Prefect home.

    Returns:
        True when the guard is in place; False when a Prefect API URL is configured (nothing to
        guard) or Prefect's default temporary server already runs in this process (too late).
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return False
    from prefect.server.api.server import SubprocessASGIServer

    cls = _guarded_server_class()
    existing = SubprocessASGIServer._instances.get(None)
    if isinstance(existing, cls):
        return True
    if existing is not None and existing.running:
        return False
    SubprocessASGIServer._instances.pop(None, None)
    cls()  # registers itself as the default (port None) instance that Prefect's clients use
    return True

"""Server processes we start on loopback, and the checks that a server answers.

The process side of ``sftflow.ops.services`` (the Prefect + MLflow stack) and of
``sftflow.ops.postgres`` (its PostgreSQL backend). What is here:

* names and errors: ``LOOPBACK``, ``PREFECT_NAME`` / ``MLFLOW_NAME``, ``START_HINT``, ``ServiceError``;
* ports and HTTP: ``free_port``, ``port_in_use``, ``http_ok``, ``wait_http``;
* managed processes: ``spawn_service`` starts a server in its own session, records its pid and
  URL in ``$SFTFLOW_HOME/services/<name>.json`` (``services_dir``) and its log in ``<name>.log``,
  and waits for its health URL; ``read_service`` / ``stop_service`` / ``stop_services`` end exactly
  those processes and everything below them, in bounded time; ``server_env`` (a server's
  environment: no client URLs, no telemetry) and ``console_script`` (the venv's executable);
* fail-fast checks: ``check_prefect_server`` (one clear message when the Prefect API is down;
  MLflow's equivalent is ``sftflow.tracking.runs.check_tracking_server``) and ``watch_server``
  (a daemon thread that notices a server going away).

Nothing here runs at import time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sftflow import layout
from sftflow.errors import ServiceUnavailable
from sftflow.ops.processes import call_in_lifetime_thread, die_with_parent, is_alive, terminate_tree

LOOPBACK = "127.0.0.1"
PREFECT_NAME = "prefect-server"
MLFLOW_NAME = "mlflow-server"
START_HINT = "start one with `infra/local/start.sh` (SQLite), `infra/postgres/start.sh` or `sftflow ui`"


class ServiceError(ServiceUnavailable):
    """A server did not start, is unreachable, or its state files are inconsistent."""

    label = "service error"


# --------------------------------------------------------------------------- small helpers
def services_dir() -> Path:
    """``$SFTFLOW_HOME/services``: pid files, logs and ``env.sh`` of the servers we start."""
    return layout.sftflow_home() / "services"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """True when something already listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_ok(url: str, *, timeout: float = 3.0) -> bool:
    """True when ``url`` answers 2xx within ``timeout`` seconds (any error: False)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback URL we built)
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_http(url: str, *, timeout: float = 120.0, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    """Poll ``url`` until it answers 2xx; fail early (with the log's tail) if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(url):
            return
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{url}: server exited with code {proc.returncode} before answering; "
                               f"last log lines ({log}):\n{_tail(log) if log else ''}")
        time.sleep(0.5)
    raise ServiceError(f"{url}: no answer after {timeout:.0f}s; last log lines ({log}):\n{_tail(log) if log else ''}")


# --------------------------------------------------------------------------- managed processes
@dataclass(frozen=True)
class Service:
    """One server process we started.

    Attributes:
        name: e.g. ``prefect-server``; names the pid and log files.
        url: what clients use (Prefect: the ``/api`` URL; MLflow: the tracking URI).
        pid: process id (also its process-group id: it runs in its own session).
        log: its combined stdout/stderr.
    """

    name: str
    url: str
    pid: int
    log: str


def _pid_file(state: Path, name: str) -> Path:
    return state / f"{name}.json"


def spawn_service(name: str, argv: list[str], *, env: dict[str, str], url: str, health: str, state: Path,
           timeout: float, tie_to_parent: bool = False) -> Service:
    """Start ``argv`` detached (own session), record its pid, wait until ``health`` answers.

    With ``tie_to_parent`` the server gets SIGTERM when this process dies, even by ``kill -9``
    (``sftflow ui``); without it, it outlives us (``infra/*/start.sh`` background servers).
    """
    state.mkdir(parents=True, exist_ok=True)
    existing = read_service(name, state=state)
    if existing is not None and is_alive(existing.pid):
        raise ServiceError(f"{name} already runs (pid {existing.pid}, {_mask(existing.url)}); "
                           f"stop it first: python -m sftflow.ops.services stop")
    log = state / f"{name}.log"
    if tie_to_parent:
        # SIGTERM, not SIGKILL: both servers forward it to their uvicorn child and exit with it.
        argv = die_with_parent(argv, sig=signal.SIGTERM)
    with open(log, "ab") as out:
        # start_new_session: its own process group, so stop() ends the server and the workers it
        # forks (uvicorn) by this one id, and Ctrl-C in a terminal reaches only us, not it.
        def popen() -> subprocess.Popen:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True, cwd=str(state))

        # The parent-death signal fires when the forking *thread* ends: fork from one that lives
        # as long as this process.
        proc = call_in_lifetime_thread(popen) if tie_to_parent else popen()
    svc = Service(name=name, url=url, pid=proc.pid, log=str(log))
    _pid_file(state, name).write_text(json.dumps(asdict(svc)))
    try:
        wait_http(health, timeout=timeout, proc=proc, log=log)
    except BaseException:
        stop_service(svc, state=state)
        raise
    return svc


def read_service(name: str, *, state: Path | None = None) -> Service | None:
    """The recorded service ``name`` (whether or not it still runs), or None."""
    p = _pid_file(state or services_dir(), name)
    if not p.exists():
        return None
    try:
        return Service(**json.loads(p.read_text()))
    except (ValueError, TypeError) as e:
        raise ServiceError(f"{p}: corrupt service record ({e}); delete it") from None


def stop_service(svc: Service, *, state: Path | None = None, timeout: float = 20.0) -> None:
    """End the service and every process below it (SIGTERM, SIGKILL after ``timeout``); remove its pid file."""
    stop_services([svc], state=state, grace=timeout)


def stop_services(svcs: list[Service], *, state: Path | None = None, grace: float = 10.0,
                  hurry: threading.Event | None = None) -> list[int]:
    """End several services at once, each with its whole process tree, in bounded time.

    Every process below each service (its process group, and children that left it, such as
    MLflow's job-runner consumers) gets SIGTERM; what still runs after ``grace`` seconds (or as
    soon as ``hurry`` is set) gets SIGKILL. The services stop in parallel, so the worst case is
    ``grace`` + a few seconds whatever their number. Pid files are removed.

    Returns:
        Pids still alive at the end (empty unless a process cannot be killed).
    """
    left = terminate_tree([s.pid for s in svcs], grace=grace, hurry=hurry)
    for s in svcs:
        _pid_file(state or services_dir(), s.name).unlink(missing_ok=True)
    return [p.pid for p in left]


def server_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a server we start: ours, minus client URLs and telemetry, plus ``extra``."""
    env = dict(os.environ)
    # A client-side API URL in our own environment must not leak into a server's settings.
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    env.update({
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
        # MLflow's GenAI job runner (a watcher + one huey consumer process per job type) is not
        # used by sftflow; without it the server is 2 processes instead of 9 on a small machine.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
    })
    env.update(extra)
    return env


def _mask(uri: str) -> str:
    from sftflow.tracking.runs import mask_uri  # lazily: tracking pulls in pandas

    return mask_uri(uri)


def console_script(name: str) -> str:
    """The console script next to this interpreter (the venv's), else on PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` not found next to {sys.executable} or on PATH; install the project (pip install -e .)")
    return found


# --------------------------------------------------------------------------- fail-fast checks
def check_prefect_server(api_url: str | None = None, *, timeout: float = 5.0) -> None:
    """Raise one clear error when the configured Prefect API does not answer.

    No ``PREFECT_API_URL`` means Prefect's embedded (ephemeral) server, which needs no check.

    Args:
        api_url: the API URL; default ``$PREFECT_API_URL``.
        timeout: seconds per attempt.
    """
    url = api_url or os.environ.get("PREFECT_API_URL")
    if not url:
        return
    if urlparse(url).scheme not in ("http", "https"):
        raise ServiceError(f"PREFECT_API_URL={_mask(url)!r} is not an http(s) URL "
                           "(expected e.g. http://127.0.0.1:4200/api)")
    if not http_ok(url.rstrip("/") + "/health", timeout=timeout):
        raise ServiceError(f"Prefect server {_mask(url)} is unreachable. Start it ({START_HINT}), "
                           "or unset PREFECT_API_URL to run with Prefect's embedded server.")


def watch_server(url: str, *, on_lost: Any, interval: float = 1.0, failures: int = 3,
                 timeout: float = 2.0) -> threading.Event:
    """Poll ``url`` in a daemon thread; call ``on_lost(first_failure_monotonic)`` once it failed
    ``failures`` times in a row (a server that is gone refuses at once: ~``failures x interval`` s).

    ``on_lost`` runs in the watcher thread. Returns an event that stops the watcher when set.
    """
    stop = threading.Event()

    def loop() -> None:
        misses, first = 0, 0.0
        while not stop.wait(interval):
            if http_ok(url, timeout=timeout):
                misses = 0
                continue
            misses += 1
            first = first if misses > 1 else time.monotonic()
            if misses >= failures:
                on_lost(first)
                return

    threading.Thread(target=loop, name="sftflow-server-watch", daemon=True).start()
    return stop

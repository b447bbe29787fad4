"""Prefect's temporary server, supervised: it dies with the process that started it.

``guard_ephemeral_server()`` makes the temporary Prefect server that ``sftflow run`` starts (no
``PREFECT_API_URL``) a child that gets SIGKILL when its parent dies, in its own session (Ctrl-C in
the terminal reaches the flow, which can still report its final state), writing to
``$PREFECT_HOME/server.log`` instead of the terminal, and serialises its start
(database creation and migrations) across processes with a file lock. ``sftflow.ops.recovery``
re-exports it (the flows import it from there). ``start_temporary_server()`` starts that same
server early, in the background, for ``sftflow run`` (its start overlaps the CLI's imports and
checks). Nothing here runs at import time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sftflow.ops.processes import call_in_lifetime_thread, die_with_parent

_guard_class: Any = None


def _prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


# Set in the environment of a process whose PREFECT_API_URL is the temporary server it started
# itself (``start_temporary_server``): recovery records such a run as "temporary server on this
# database", not as a reachable API URL.
TEMPORARY_API_ENV = "SFTFLOW_TEMPORARY_PREFECT_API"


def _spawn_server(port: int, settings_env: dict[str, str]) -> subprocess.Popen[Any]:
    """Prefect's server command (prefect 3.x ``SubprocessASGIServer``'s) on ``port``, but (1) SIGKILL
    when this process dies, even by kill -9, (2) in its own session, so a Ctrl-C in the terminal
    reaches the flow (which still reports its final state to the server) and not the server first,
    (3) its output to ``$PREFECT_HOME/server.log`` (0600), not the user's terminal: a server error
    (e.g. its SQLite on a full disk) is a traceback per request, while the flow already says what
    went wrong in one line. If the log cannot be opened, the output is inherited."""
    import importlib.util

    spec = importlib.util.find_spec("prefect")  # the package's location without importing it
    assert spec is not None and spec.submodule_search_locations
    app_dir = str(Path(list(spec.submodule_search_locations)[0]).parent)
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", app_dir,
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1", **settings_env}
    env.pop(TEMPORARY_API_ENV, None)
    if os.environ.get(TEMPORARY_API_ENV) and env.get("PREFECT_API_URL") == os.environ[TEMPORARY_API_ENV]:
        env.pop("PREFECT_API_URL")  # the server is not a client of itself
    try:
        log = open(_prefect_home_from_env() / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        os.chmod(log.name, 0o600)
    except OSError:
        log = None
    out = {"stdout": log, "stderr": subprocess.STDOUT} if log is not None else {}
    try:
        return call_in_lifetime_thread(
            lambda: subprocess.Popen(die_with_parent(argv), env=env, start_new_session=True, **out))
    finally:
        if log is not None:
            log.close()  # the child has its own descriptor


def _prefect_home_from_env() -> Path:
    # PREFECT_HOME as ``configure_environment`` set it; no prefect import (that costs seconds).
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


class TemporaryServer:
    """Prefect's temporary server started by ``start_temporary_server``: starting in the background
    while the CLI does its other start-up work; ``wait()`` before the first flow run, ``stop()`` after."""

    def __init__(self, port: int) -> None:
        import threading

        self.port = port
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.proc: subprocess.Popen[Any] | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._start, name="prefect-temporary-server", daemon=True)

    def _start(self) -> None:
        import time

        from filelock import FileLock

        from sftflow.ops.servers import http_ok

        home = _prefect_home_from_env()
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 180)
        try:
            home.mkdir(parents=True, exist_ok=True)
            # Creating/migrating the database happens in the server's startup, before /health answers:
            # two first runs at once would migrate one SQLite file concurrently.
            with FileLock(str(home / ".server-start.lock"), timeout=900):
                self.proc = _spawn_server(self.port, {})
                deadline = time.monotonic() + timeout
                while not http_ok(self.api_url + "/health", timeout=2):
                    if self.proc.poll() is not None:
                        self.error = (f"Prefect's temporary server exited ({self.proc.returncode}) before it "
                                      f"answered; its log: {home / 'server.log'}")
                        return
                    if time.monotonic() > deadline:
                        self.error = (f"Prefect's temporary server did not answer within {timeout:.0f} s "
                                      f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); its log: "
                                      f"{home / 'server.log'}")
                        return
                    time.sleep(0.1)
        except Exception as e:  # noqa: BLE001 - reported by wait() in the main thread
            self.error = f"Prefect's temporary server could not start: {e}"

    def wait(self) -> None:
        """Block until the server answers; ``RuntimeError`` naming its log when it cannot."""
        self._thread.join()
        if self.error:
            self.stop()
            raise RuntimeError(self.error)

    def stop(self) -> None:
        """End the server (SIGTERM, then SIGKILL after 10 s), once this process's queued Prefect log records
        are sent; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        _detach_api_logs()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _detach_api_logs() -> None:
    """Send Prefect's queued API log records now, then stop sending any: the server is about to stop.

    Prefect's log worker otherwise drains at interpreter exit, after the server is gone, and prints
    '--- Error logging to API --- All connection attempts failed' on stderr (the records are in the run's log file).
    """
    import logging
    import sys

    if "prefect.logging.handlers" not in sys.modules:  # nothing of Prefect's logging was set up: nothing queued
        return
    from prefect.logging.handlers import APILogHandler, APILogWorker

    APILogWorker.drain_all(timeout=5)  # blocks (5 s at most) until the worker has sent what is queued
    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for lg in loggers:
        for handler in [h for h in lg.handlers if isinstance(h, APILogHandler)]:
            lg.removeHandler(handler)


def start_temporary_server() -> TemporaryServer:
    """Start Prefect's temporary server now, in the background, for this process's flow runs.

    The same server Prefect starts on demand (its command, database and settings; supervised as
    ``guard_ephemeral_server`` describes), but started before anything imports Prefect, so its
    ~10 s start overlaps the CLI's own imports and checks instead of following them. Sets
    ``PREFECT_API_URL`` (and ``SFTFLOW_TEMPORARY_PREFECT_API``) in this process's environment:
    call after ``configure_environment`` and before the first ``import prefect``.
    """
    from sftflow.ops.servers import free_port

    server = TemporaryServer(free_port())
    os.environ["PREFECT_API_URL"] = server.api_url
    os.environ[TEMPORARY_API_ENV] = server.api_url
    server._thread.start()
    return server


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
            # with the supervision of ``_spawn_server``.
            from prefect.settings import get_current_settings

            return _spawn_server(self.port, get_current_settings().to_environment_variables(exclude_unset=True))

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

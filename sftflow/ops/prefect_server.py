"""Prefect's temporary server, supervised: it dies with the process that started it.

``guard_ephemeral_server()`` makes the temporary Prefect server that ``sftflow run`` starts (no
``PREFECT_API_URL``) a child that gets SIGKILL when its parent dies, in its own session (Ctrl-C in
the terminal reaches the flow, which can still report its final state), writing to
``$PREFECT_HOME/server.log`` instead of the terminal, and serialises its start
(database creation and migrations) across processes with a file lock. ``sftflow.ops.recovery``
re-exports it (the flows import it from there). Nothing here runs at import time.
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
            # (3) its output to a log file beside its database, not the user's terminal: a server
            # error (e.g. its SQLite on a full disk) is a traceback per request, while the flow
            # already says what went wrong in one line. If the file cannot be opened, inherit.
            try:
                log = open(_prefect_home() / "server.log", "ab")  # noqa: SIM115 - the child keeps it
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

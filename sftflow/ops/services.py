"""Real Prefect and MLflow servers on loopback: the stack, ``sftflow ui`` and the infra command line.

What this module gives:

* ``start_stack(backend="sqlite"|"postgres")`` / ``stop_stack()``: a Prefect server and an MLflow
  tracking server bound to 127.0.0.1, with SQLite files or a PostgreSQL cluster under
  ``$SFTFLOW_HOME`` as their backend store. Every process is started in its own session, its pid
  and URL written to ``$SFTFLOW_HOME/services/<name>.json`` and its log to ``<name>.log``; ``stop_stack``
  ends exactly those processes and everything below them (SIGTERM, SIGKILL after a grace period,
  bounded in time), nothing else. ``infra/local`` and ``infra/postgres`` are thin shell wrappers
  over ``python -m sftflow.ops.services``. The PostgreSQL password reaches the servers as
  ``PGPASSWORD`` in their environment, never in a command line.
* ``run_ui()``: ``sftflow ui`` -- both servers in the foreground, URLs printed, stopped on Ctrl-C
  (also when started with SIGINT ignored), and killed with it if it is killed.
* ``start_prefect_server`` / ``start_mlflow_server``: one server each.

The process side (pid files, logs, stopping process trees, ``check_prefect_server``,
``watch_server``) lives in ``sftflow.ops.servers``; the PostgreSQL cluster in ``sftflow.ops.postgres``.

The run-time guards (``sources_unchanged``: skip if unchanged; ``pipeline_lock``) live in
``sftflow.ops.guards``.

Command line (also what the infra scripts run)::

    python -m sftflow.ops.services start --backend sqlite      # or: --backend postgres
    python -m sftflow.ops.services status
    python -m sftflow.ops.services stop

Nothing here runs at import time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sftflow import layout
from sftflow.ops.postgres import PostgresCluster, split_db_password, start_postgres, stop_postgres
from sftflow.ops.processes import is_alive
from sftflow.ops.servers import (LOOPBACK, MLFLOW_NAME, PREFECT_NAME, Service, ServiceError, console_script, http_ok,
                                 port_in_use, read_service, server_env, services_dir, spawn_service, stop_services)

POSTGRES_NAME = "postgres"


def start_prefect_server(*, host: str = LOOPBACK, port: int = 4200, database_url: str | None = None,
                         prefect_home: Path | None = None, state: Path | None = None,
                         timeout: float = 180.0, tie_to_parent: bool = False) -> Service:
    """Start ``prefect server start`` and wait for ``/api/health``.

    Args:
        host: bind address (loopback by default; a server reachable from elsewhere is a choice).
        port: TCP port.
        database_url: ``PREFECT_API_DATABASE_CONNECTION_URL`` (``sqlite+aiosqlite:///...`` or
            ``postgresql+asyncpg://...``); default: SQLite in ``prefect_home``.
        prefect_home: ``PREFECT_HOME`` of the server (default ``$SFTFLOW_HOME/prefect``, so the UI
            also shows runs made earlier with the embedded server).
        state: folder of pid/log files (default ``$SFTFLOW_HOME/services``).
        timeout: seconds to wait for the health check.
        tie_to_parent: stop the server when this process dies (``sftflow ui``).

    Returns:
        The service; ``url`` is the API URL clients put in ``PREFECT_API_URL``.
    """
    home = prefect_home or layout.prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    db, db_env = split_db_password(database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    env = server_env({
        **db_env,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": db,
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_LOGGING_LEVEL": os.environ.get("PREFECT_SERVER_LOGGING_LEVEL", "WARNING"),
        "PREFECT_UI_ENABLED": "true",
    })
    base = f"http://{host}:{port}"
    argv = [console_script("prefect"), "server", "start", "--host", host, "--port", str(port), "--analytics-off"]
    return spawn_service(PREFECT_NAME, argv, env=env, url=f"{base}/api", health=f"{base}/api/health",
                  state=state or services_dir(), timeout=timeout, tie_to_parent=tie_to_parent)


def start_mlflow_server(*, host: str = LOOPBACK, port: int = 5000, backend_store_uri: str | None = None,
                        artifacts_destination: str | None = None, workers: int = 1,
                        state: Path | None = None, timeout: float = 180.0,
                        tie_to_parent: bool = False) -> Service:
    """Start ``mlflow server`` (tracking + registry + artifact proxy) and wait for ``/health``.

    Args:
        host: bind address.
        port: TCP port.
        backend_store_uri: ``sqlite:///...`` or ``postgresql://...`` (default: the SQLite store
            under ``$SFTFLOW_HOME/mlflow``, the same one runs without a server write to).
        artifacts_destination: where the server stores artifacts it proxies: a local folder
            (default ``$SFTFLOW_HOME/mlflow/artifacts``) or ``s3://bucket/prefix`` (with
            ``MLFLOW_S3_ENDPOINT_URL`` / AWS credentials in the environment).
        workers: server worker processes (one is plenty on loopback and spares a small machine).
        state: folder of pid/log files.
        timeout: seconds to wait for the health check.
        tie_to_parent: stop the server when this process dies (``sftflow ui``).

    A password in ``backend_store_uri`` never reaches the command line (``/proc/<pid>/cmdline``
    is world-readable): it is passed as ``PGPASSWORD`` in the server's environment.
    """
    mdir = layout.ensure(layout.mlflow_dir())
    backend, db_env = split_db_password(backend_store_uri or f"sqlite:///{mdir / 'mlflow.db'}")
    dest = artifacts_destination or str(layout.ensure(mdir / "artifacts"))
    if "://" not in dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
    argv = [console_script("mlflow"), "server", "--host", host, "--port", str(port),
            "--backend-store-uri", backend, "--serve-artifacts", "--artifacts-destination", dest,
            "--workers", str(workers)]
    url = f"http://{host}:{port}"
    return spawn_service(MLFLOW_NAME, argv, env=server_env(db_env), url=url, health=f"{url}/health",
                  state=state or services_dir(), timeout=timeout, tie_to_parent=tie_to_parent)


# --------------------------------------------------------------------------- the whole stack
@dataclass(frozen=True)
class Stack:
    """The servers of one ``start_stack`` call.

    Attributes:
        backend: ``sqlite`` or ``postgres``.
        prefect_api_url: value for ``PREFECT_API_URL``.
        prefect_ui_url: the Prefect UI.
        mlflow_uri: value for ``MLFLOW_TRACKING_URI`` (also the MLflow UI).
        services: the processes started.
        postgres: the cluster, for the postgres backend.
    """

    backend: str
    prefect_api_url: str
    prefect_ui_url: str
    mlflow_uri: str
    services: tuple[Service, ...] = field(default_factory=tuple)
    postgres: PostgresCluster | None = None

    def client_env(self) -> dict[str, str]:
        """Environment a client (flow run, CLI, test) needs to use these servers."""
        return {"PREFECT_API_URL": self.prefect_api_url, "MLFLOW_TRACKING_URI": self.mlflow_uri}


def start_stack(*, backend: Literal["sqlite", "postgres"] = "sqlite", host: str = LOOPBACK,
                prefect_port: int = 4200, mlflow_port: int = 5000, pg_port: int = 5432,
                artifacts_destination: str | None = None, state: Path | None = None,
                tie_to_parent: bool = False) -> Stack:
    """Start Prefect server + MLflow server (and PostgreSQL for ``backend="postgres"``).

    Writes ``<state>/env.sh`` exporting ``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI`` so a shell
    can ``source`` it. On a failure, whatever already started is stopped again.

    Args:
        backend: ``sqlite`` (files under ``$SFTFLOW_HOME``) or ``postgres`` (a cluster under
            ``$SFTFLOW_HOME/postgres`` with databases ``prefect`` and ``mlflow``).
        host: bind address of every server.
        prefect_port: Prefect API + UI port.
        mlflow_port: MLflow tracking server + UI port.
        pg_port: PostgreSQL port (postgres backend only).
        artifacts_destination: MLflow artifact store (local folder or ``s3://...``);
            default ``$SFTFLOW_MLFLOW_ARTIFACTS`` or ``$SFTFLOW_HOME/mlflow/artifacts``.
        state: folder of pid/log files (default ``$SFTFLOW_HOME/services``).
        tie_to_parent: the servers stop when this process dies, even by ``kill -9`` (``sftflow ui``).
    """
    if backend not in ("sqlite", "postgres"):
        raise ServiceError(f"backend: must be one of 'sqlite', 'postgres' (got {backend!r})")
    state = state or services_dir()
    for port, what in ((prefect_port, "--prefect-port"), (mlflow_port, "--mlflow-port")):
        if port_in_use(port, host):
            raise ServiceError(f"{host}:{port} is already in use; stop what runs there or pick another {what}")
    artifacts = artifacts_destination or os.environ.get("SFTFLOW_MLFLOW_ARTIFACTS") or None
    started: list[Service] = []
    cluster = None
    try:
        if backend == "postgres":
            cluster = start_postgres(host=host, port=pg_port)
            # start_*_server move the password out of these URLs into the servers' PGPASSWORD.
            prefect_db = cluster.url("prefect", driver="asyncpg", with_password=True)
            # Explicit driver: SQLAlchemy 2.1 defaults postgresql:// to psycopg 3, which we do not ship.
            mlflow_db = cluster.url("mlflow", driver="psycopg2", with_password=True)
        else:
            prefect_db = mlflow_db = None
        # MLflow first: it is the quicker one and a bad store URI should fail before the slow one.
        started.append(start_mlflow_server(host=host, port=mlflow_port, backend_store_uri=mlflow_db,
                                           artifacts_destination=artifacts, state=state, tie_to_parent=tie_to_parent))
        started.append(start_prefect_server(host=host, port=prefect_port, database_url=prefect_db, state=state,
                                            tie_to_parent=tie_to_parent))
    except BaseException:
        stop_services(started, state=state)
        if cluster is not None:
            stop_postgres()
        raise
    stack = Stack(backend=backend, prefect_api_url=started[1].url, prefect_ui_url=started[1].url.removesuffix("/api"),
                  mlflow_uri=started[0].url, services=tuple(started), postgres=cluster)
    (state / "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in stack.client_env().items()))
    (state / "stack.json").write_text(json.dumps({"backend": backend, **stack.client_env(),
                                                  "prefect_ui_url": stack.prefect_ui_url}))
    return stack


def stop_stack(*, state: Path | None = None, postgres: bool = True, grace: float = 10.0,
               hurry: threading.Event | None = None) -> list[str]:
    """Stop every server recorded under ``state`` (and our PostgreSQL cluster); returns what stopped.

    The servers stop together, each with its whole process tree: SIGTERM, then SIGKILL after
    ``grace`` seconds (at once when ``hurry`` is set), so it ends in bounded time.
    """
    state = state or services_dir()
    svcs = [svc for name in (PREFECT_NAME, MLFLOW_NAME) if (svc := read_service(name, state=state)) is not None]
    left = stop_services(svcs, state=state, grace=grace, hurry=hurry)
    stopped = [f"{s.name} (pid {s.pid})" for s in svcs]
    if left:
        print(f"services: processes {left} did not end even after SIGKILL", file=sys.stderr)
    if postgres and stop_postgres():
        stopped.append(POSTGRES_NAME)
    for f in ("env.sh", "stack.json"):
        (state / f).unlink(missing_ok=True)
    return stopped


def stack_status(*, state: Path | None = None) -> dict[str, Any]:
    """What runs, per recorded service: pid, URL, alive, healthy."""
    state = state or services_dir()
    out: dict[str, Any] = {}
    for name, health in ((PREFECT_NAME, "/health"), (MLFLOW_NAME, "/health")):
        svc = read_service(name, state=state)
        if svc is not None:
            out[name] = {"pid": svc.pid, "url": svc.url, "alive": is_alive(svc.pid),
                         "healthy": http_ok(svc.url.rstrip("/") + health), "log": svc.log}
    return out


# --------------------------------------------------------------------------- `sftflow ui`
def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_ui(*, host: str = LOOPBACK, prefect_port: int = 4200, mlflow_port: int = 5000, grace: float = 10.0) -> None:
    """Start a local Prefect server and MLflow UI (SQLite under ``$SFTFLOW_HOME``) until Ctrl-C.

    Prints both URLs and the two ``export`` lines that point flows at them. Stops both servers on
    Ctrl-C/SIGTERM, or when one of them dies (naming it and its log). Stopping is bounded: every
    process of both servers gets SIGTERM, what runs after ``grace`` seconds (or right away on a
    second Ctrl-C) gets SIGKILL. The servers also die if this process is killed (``kill -9``).
    """
    prev_term, prev_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    # Ctrl-C and SIGTERM take the same clean path, from the start (a Ctrl-C while the servers are
    # still starting stops what started). Installed explicitly: a process started from a
    # non-interactive shell's background job (`make test &`, CI) inherits SIGINT *ignored*, and
    # Python then never raises KeyboardInterrupt, so Ctrl-C / kill -INT did nothing.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    state = services_dir()
    # Servers already recorded (e.g. infra/local/start.sh's) are not ours to stop on the way out.
    before = {n: svc.pid for n in (PREFECT_NAME, MLFLOW_NAME) if (svc := read_service(n, state=state)) is not None}
    try:
        stack = start_stack(backend="sqlite", host=host, prefect_port=prefect_port, mlflow_port=mlflow_port,
                            tie_to_parent=True)
        print(f"Prefect UI : {stack.prefect_ui_url}\nMLflow UI  : {stack.mlflow_uri}")
        print("Point runs at them (or `source " + str(services_dir() / "env.sh") + "`):")
        for k, v in stack.client_env().items():
            print(f"  export {k}={v}")
        print("Ctrl-C stops both.", flush=True)
        while True:
            dead = [s for s in stack.services if not is_alive(s.pid)]
            if dead:
                print(f"{dead[0].name} stopped unexpectedly; see {dead[0].log}", file=sys.stderr)
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        # From here on a signal must not interrupt the shutdown (a KeyboardInterrupt inside it
        # would leave servers behind): a second Ctrl-C/SIGTERM only cuts the grace period short.
        hurry = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: hurry.set())
        signal.signal(signal.SIGTERM, lambda *_: hurry.set())
        try:
            # What this call started (also a half-started stack): the recorded services that were
            # not recorded before.
            ours = [svc for n in (PREFECT_NAME, MLFLOW_NAME)
                    if (svc := read_service(n, state=state)) is not None and before.get(n) != svc.pid]
            left = stop_services(ours, state=state, grace=grace, hurry=hurry)
            if ours:
                for f in ("env.sh", "stack.json"):
                    (state / f).unlink(missing_ok=True)
            if left:
                print(f"services: processes {left} did not end even after SIGKILL", file=sys.stderr)
            if ours:
                print("stopping: " + ", ".join(f"{s.name} (pid {s.pid})" for s in ours), flush=True)
        finally:
            signal.signal(signal.SIGINT, prev_int)
            signal.signal(signal.SIGTERM, prev_term)


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m sftflow.ops.services start|stop|status`` (what infra/local and infra/postgres run)."""
    ap = argparse.ArgumentParser(prog="python -m sftflow.ops.services", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start Prefect + MLflow servers in the background")
    st.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    st.add_argument("--host", default=os.environ.get("SFTFLOW_HOST", LOOPBACK))
    st.add_argument("--prefect-port", type=int, default=int(os.environ.get("SFTFLOW_PREFECT_PORT", 4200)))
    st.add_argument("--mlflow-port", type=int, default=int(os.environ.get("SFTFLOW_MLFLOW_PORT", 5000)))
    st.add_argument("--pg-port", type=int, default=int(os.environ.get("SFTFLOW_PG_PORT", 5432)))
    st.add_argument("--artifacts", default=None, help="MLflow artifact store: folder or s3://bucket/prefix")
    sp = sub.add_parser("stop", help="stop what `start` started (by recorded pid)")
    sp.add_argument("--keep-postgres", action="store_true")
    sub.add_parser("status", help="show recorded servers")
    args = ap.parse_args(argv)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        if args.cmd == "start":
            stack = start_stack(backend=args.backend, host=args.host, prefect_port=args.prefect_port,
                                mlflow_port=args.mlflow_port, pg_port=args.pg_port,
                                artifacts_destination=args.artifacts)
            print(f"Prefect UI : {stack.prefect_ui_url}\nMLflow UI  : {stack.mlflow_uri}")
            if stack.postgres:
                print(f"PostgreSQL : {stack.postgres.host}:{stack.postgres.port} (data {stack.postgres.data_dir})")
            print(f"logs + pids: {services_dir()}\nuse them   : source {services_dir() / 'env.sh'}")
        elif args.cmd == "stop":
            stopped = stop_stack(postgres=not args.keep_postgres)
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        else:
            print(json.dumps(stack_status(), indent=2))
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

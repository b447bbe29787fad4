"""Real Prefect and MLflow servers on loopback, their PostgreSQL backend, and run-time guards.

What this module gives:

* ``start_stack(backend="sqlite"|"postgres")`` / ``stop_stack()``: a Prefect server and an MLflow
  tracking server bound to 127.0.0.1, with SQLite files or a PostgreSQL cluster under
  ``$SFTFLOW_HOME`` as their backend store. Every process is started in its own session, its pid
  and URL written to ``$SFTFLOW_HOME/services/<name>.json`` and its log to ``<name>.log``; ``stop_stack``
  ends exactly those processes (by pid), nothing else. ``infra/local`` and ``infra/postgres``
  are thin shell wrappers over ``python -m sftflow.services``.
* ``run_ui()``: ``sftflow ui`` -- both servers in the foreground, URLs printed, stopped on Ctrl-C.
* ``check_prefect_server(url)``: fail fast with one clear message when the Prefect API is down
  (MLflow's equivalent is ``sftflow.tracking.check_tracking_server``).
* ``sources_unchanged(cfg, pipeline=)``: "skip if unchanged" for scheduled runs (compares the
  ``sftflow.sources_digest`` and ``sftflow.config_hash`` tags of the last successful run).
* ``pipeline_lock(pipeline)``: a per-pipeline file lock for the few steps two concurrent runs of
  one pipeline must not interleave (moving registry aliases).

Command line (also what the infra scripts run)::

    python -m sftflow.services start --backend sqlite      # or: --backend postgres
    python -m sftflow.services status
    python -m sftflow.services stop

Nothing here runs at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal
from urllib.parse import urlparse

from sftflow import layout

if TYPE_CHECKING:  # keep imports light: the CLI's `--help` must not pull in MLflow or Prefect
    from sftflow.config import PipelineConfig

LOOPBACK = "127.0.0.1"
PREFECT_NAME = "prefect-server"
MLFLOW_NAME = "mlflow-server"
POSTGRES_NAME = "postgres"
START_HINT = "start one with `infra/local/start.sh` (SQLite), `infra/postgres/start.sh` or `sftflow ui`"


class ServiceError(RuntimeError):
    """A server did not start, is unreachable, or its state files are inconsistent."""


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


def _http_ok(url: str, *, timeout: float = 3.0) -> bool:
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
        if _http_ok(url):
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _spawn(name: str, argv: list[str], *, env: dict[str, str], url: str, health: str, state: Path,
           timeout: float) -> Service:
    """Start ``argv`` detached (own session), record its pid, wait until ``health`` answers."""
    state.mkdir(parents=True, exist_ok=True)
    existing = read_service(name, state=state)
    if existing is not None and _alive(existing.pid):
        raise ServiceError(f"{name} already runs (pid {existing.pid}, {existing.url}); "
                           f"stop it first: python -m sftflow.services stop")
    log = state / f"{name}.log"
    with open(log, "ab") as out:
        # start_new_session: its own process group, so stop() ends the server and the workers it
        # forks (uvicorn) by this one id, and Ctrl-C in a terminal reaches only us, not it.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, cwd=str(state))
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
    """SIGTERM the service's process group, SIGKILL after ``timeout``; remove its pid file."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(svc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(svc.pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(svc.pid, os.WNOHANG)  # reap when it is our child
        time.sleep(0.2)
    if _alive(svc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(svc.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(svc.pid, os.WNOHANG)
    _pid_file(state or services_dir(), svc.name).unlink(missing_ok=True)


def _quiet_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # A client-side API URL in our own environment must not leak into a server's settings.
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    env.update({
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def start_prefect_server(*, host: str = LOOPBACK, port: int = 4200, database_url: str | None = None,
                         prefect_home: Path | None = None, state: Path | None = None,
                         timeout: float = 180.0) -> Service:
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

    Returns:
        The service; ``url`` is the API URL clients put in ``PREFECT_API_URL``.
    """
    home = prefect_home or layout.prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    db = database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    env = _quiet_env({
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": db,
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_LOGGING_LEVEL": os.environ.get("PREFECT_SERVER_LOGGING_LEVEL", "WARNING"),
        "PREFECT_UI_ENABLED": "true",
    })
    base = f"http://{host}:{port}"
    argv = [_exe("prefect"), "server", "start", "--host", host, "--port", str(port), "--analytics-off"]
    return _spawn(PREFECT_NAME, argv, env=env, url=f"{base}/api", health=f"{base}/api/health",
                  state=state or services_dir(), timeout=timeout)


def start_mlflow_server(*, host: str = LOOPBACK, port: int = 5000, backend_store_uri: str | None = None,
                        artifacts_destination: str | None = None, workers: int = 1,
                        state: Path | None = None, timeout: float = 180.0) -> Service:
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
    """
    mdir = layout.ensure(layout.mlflow_dir())
    backend = backend_store_uri or f"sqlite:///{mdir / 'mlflow.db'}"
    dest = artifacts_destination or str(layout.ensure(mdir / "artifacts"))
    if "://" not in dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
    argv = [_exe("mlflow"), "server", "--host", host, "--port", str(port),
            "--backend-store-uri", backend, "--serve-artifacts", "--artifacts-destination", dest,
            "--workers", str(workers)]
    url = f"http://{host}:{port}"
    return _spawn(MLFLOW_NAME, argv, env=_quiet_env({}), url=url, health=f"{url}/health",
                  state=state or services_dir(), timeout=timeout)


def _exe(name: str) -> str:
    """The console script next to this interpreter (the venv's), else on PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` not found next to {sys.executable} or on PATH; install the project (pip install -e .)")
    return found


# --------------------------------------------------------------------------- PostgreSQL
def pg_bindir() -> Path:
    """Folder of the PostgreSQL server binaries (``$PG_BINDIR`` or Debian's newest /usr/lib/postgresql/*/bin)."""
    env = os.environ.get("PG_BINDIR")
    cands = [Path(env)] if env else sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                                           key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if env is None and shutil.which("initdb"):
        cands.append(Path(shutil.which("initdb")).parent)  # type: ignore[arg-type]
    for c in reversed(cands):
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    raise ServiceError("PostgreSQL server binaries (initdb, pg_ctl) not found; install them with "
                       "`.ci/setup_services.sh` (Debian package postgresql) or set PG_BINDIR")


@dataclass(frozen=True)
class PostgresCluster:
    """A PostgreSQL cluster we own under ``$SFTFLOW_HOME/postgres``.

    Attributes:
        data_dir: the cluster folder (``PGDATA``).
        host: listen address.
        port: TCP port.
        user: superuser name.
        password: its password (also in ``credentials.json``, mode 0600).
        os_user: the OS account the server runs as ("" when it runs as the caller).
    """

    data_dir: str
    host: str
    port: int
    user: str
    password: str
    os_user: str = ""

    def url(self, database: str, *, driver: str = "") -> str:
        """SQLAlchemy URL of ``database``; ``driver`` e.g. ``asyncpg`` (Prefect) or ``psycopg2`` (MLflow)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"


def _pg_os_user() -> str:
    """initdb/postgres refuse to run as root: use the `postgres` account then (Debian creates it)."""
    if os.geteuid() != 0:
        return ""
    import pwd

    name = os.environ.get("SFTFLOW_PG_OS_USER", "postgres")
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(f"running as root, PostgreSQL must run as another OS user, and `{name}` does not "
                           f"exist; install the postgresql package or create the user "
                           f"(useradd --system {name}) or set SFTFLOW_PG_OS_USER") from None
    return name


def _as_user(os_user: str, argv: list[str]) -> list[str]:
    return ["runuser", "-u", os_user, "--", *argv] if os_user else argv


def _make_traversable(path: Path) -> None:
    """Let the server's OS user reach ``path``: add o+x (search, not read) where an ancestor lacks it.

    Needed when root runs tests in e.g. ``/tmp/pytest-of-root`` (mode 0700).
    """
    for anc in reversed(path.resolve().parents):
        try:
            mode = anc.stat().st_mode
        except OSError:
            continue
        if not mode & stat.S_IXOTH:
            anc.chmod(mode | stat.S_IXOTH)
            print(f"services: added o+x to {anc} so the PostgreSQL user can reach {path}", file=sys.stderr)


def _run(argv: list[str], *, what: str, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/", timeout=300)
    if res.returncode != 0:
        raise ServiceError(f"{what} failed (exit {res.returncode}): {' '.join(argv)}\n{res.stdout}{res.stderr}")
    return res.stdout


def start_postgres(*, host: str = LOOPBACK, port: int = 5432, root: Path | None = None,
                   databases: tuple[str, ...] = ("prefect", "mlflow")) -> PostgresCluster:
    """Create (first time) and start a PostgreSQL cluster under ``root`` and create ``databases``.

    Args:
        host: listen address (TCP only; the Unix socket is off so nothing lands in /var/run).
        port: TCP port.
        root: folder holding ``data/``, ``postgres.log`` and ``credentials.json``
            (default ``$SFTFLOW_HOME/postgres``).
        databases: databases to create when missing.

    Returns:
        The running cluster.
    """
    root = (root or layout.sftflow_home() / "postgres").resolve()
    data, log = root / "data", root / "postgres.log"
    creds_file = root / "credentials.json"
    bindir = pg_bindir()
    os_user = _pg_os_user()
    root.mkdir(parents=True, exist_ok=True)
    if os_user:
        _make_traversable(root)
        shutil.chown(root, user=os_user)
    if not (data / "PG_VERSION").exists():
        if data.exists() and any(data.iterdir()):
            raise ServiceError(f"{data}: exists, is not empty and holds no cluster (no PG_VERSION); move it away")
        password = secrets.token_urlsafe(18)
        creds_file.write_text(json.dumps({"user": "sftflow", "password": password}))
        creds_file.chmod(0o600)
        pwfile = root / ".pwfile"
        pwfile.write_text(password + "\n")
        try:
            if os_user:
                shutil.chown(pwfile, user=os_user)
            pwfile.chmod(0o600)
            _run(_as_user(os_user, [str(bindir / "initdb"), "-D", str(data), "-U", "sftflow", "--pwfile", str(pwfile),
                                    "--auth-host=scram-sha-256", "--auth-local=peer", "-E", "UTF8",
                                    "--locale=C", "--no-instructions"]), what="initdb")
        finally:
            pwfile.unlink(missing_ok=True)
    creds = json.loads(creds_file.read_text())
    cluster = PostgresCluster(data_dir=str(data), host=host, port=port, user=creds["user"],
                              password=creds["password"], os_user=os_user)
    if not _pg_running(cluster):
        if port_in_use(port, host):
            raise ServiceError(f"PostgreSQL: port {host}:{port} is already in use; choose another (--pg-port)")
        opts = f"-c listen_addresses={host} -p {port} -c unix_socket_directories=''"
        if os_user:
            log.touch()
            shutil.chown(log, user=os_user)
        _run(_as_user(os_user, [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts,
                                "-w", "-t", "120", "start"]), what=f"pg_ctl start (log: {log})")
    (root / "cluster.json").write_text(json.dumps({"host": host, "port": port}))
    for db in databases:
        _create_database(cluster, db)
    return cluster


def _pg_running(cluster: PostgresCluster) -> bool:
    return (Path(cluster.data_dir) / "postmaster.pid").exists() and port_in_use(cluster.port, cluster.host)


def _create_database(cluster: PostgresCluster, name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host=cluster.host, port=cluster.port, user=cluster.user, password=cluster.password,
                            dbname="postgres", connect_timeout=10)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def stop_postgres(*, root: Path | None = None) -> bool:
    """Stop the cluster under ``root`` (fast shutdown). Returns False when it was not running."""
    root = (root or layout.sftflow_home() / "postgres").resolve()
    data = root / "data"
    if not (data / "postmaster.pid").exists():
        return False
    _run(_as_user(_pg_os_user(), [str(pg_bindir() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
         what="pg_ctl stop")
    return True


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
                artifacts_destination: str | None = None, state: Path | None = None) -> Stack:
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
            prefect_db = cluster.url("prefect", driver="asyncpg")
            # Explicit driver: SQLAlchemy 2.1 defaults postgresql:// to psycopg 3, which we do not ship.
            mlflow_db = cluster.url("mlflow", driver="psycopg2")
        else:
            prefect_db = mlflow_db = None
        # MLflow first: it is the quicker one and a bad store URI should fail before the slow one.
        started.append(start_mlflow_server(host=host, port=mlflow_port, backend_store_uri=mlflow_db,
                                           artifacts_destination=artifacts, state=state))
        started.append(start_prefect_server(host=host, port=prefect_port, database_url=prefect_db, state=state))
    except BaseException:
        for svc in reversed(started):
            stop_service(svc, state=state)
        if cluster is not None:
            stop_postgres()
        raise
    stack = Stack(backend=backend, prefect_api_url=started[1].url, prefect_ui_url=started[1].url.removesuffix("/api"),
                  mlflow_uri=started[0].url, services=tuple(started), postgres=cluster)
    (state / "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in stack.client_env().items()))
    (state / "stack.json").write_text(json.dumps({"backend": backend, **stack.client_env(),
                                                  "prefect_ui_url": stack.prefect_ui_url}))
    return stack


def stop_stack(*, state: Path | None = None, postgres: bool = True) -> list[str]:
    """Stop every server recorded under ``state`` (and our PostgreSQL cluster); returns what stopped."""
    state = state or services_dir()
    stopped = []
    for name in (PREFECT_NAME, MLFLOW_NAME):
        svc = read_service(name, state=state)
        if svc is not None:
            stop_service(svc, state=state)
            stopped.append(f"{name} (pid {svc.pid})")
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
            out[name] = {"pid": svc.pid, "url": svc.url, "alive": _alive(svc.pid),
                         "healthy": _http_ok(svc.url.rstrip("/") + health), "log": svc.log}
    return out


# --------------------------------------------------------------------------- `sftflow ui`
def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_ui(*, host: str = LOOPBACK, prefect_port: int = 4200, mlflow_port: int = 5000) -> None:
    """Start a local Prefect server and MLflow UI (SQLite under ``$SFTFLOW_HOME``) until Ctrl-C.

    Prints both URLs and the two ``export`` lines that point flows at them. Stops both servers on
    Ctrl-C/SIGTERM, or when one of them dies (naming it and its log).
    """
    stack = start_stack(backend="sqlite", host=host, prefect_port=prefect_port, mlflow_port=mlflow_port)
    print(f"Prefect UI : {stack.prefect_ui_url}\nMLflow UI  : {stack.mlflow_uri}")
    print("Point runs at them (or `source " + str(services_dir() / "env.sh") + "`):")
    for k, v in stack.client_env().items():
        print(f"  export {k}={v}")
    print("Ctrl-C stops both.", flush=True)
    # Turn SIGTERM into the same clean path as Ctrl-C.
    prev = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while True:
            dead = [s for s in stack.services if not _alive(s.pid)]
            if dead:
                print(f"{dead[0].name} stopped unexpectedly; see {dead[0].log}", file=sys.stderr)
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, prev)
        print("stopping: " + ", ".join(stop_stack(postgres=False)), flush=True)


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
        raise ServiceError(f"PREFECT_API_URL={url!r} is not an http(s) URL (expected e.g. http://127.0.0.1:4200/api)")
    if not _http_ok(url.rstrip("/") + "/health", timeout=timeout):
        raise ServiceError(f"Prefect server {url} is unreachable. Start it ({START_HINT}), "
                           "or unset PREFECT_API_URL to run with Prefect's embedded server.")


# --------------------------------------------------------------------------- skip if unchanged
def last_successful_run(*, pipeline: str, tracking_uri: str) -> Any | None:
    """The newest FINISHED parent run of ``pipeline`` (tag ``sftflow.kind=pipeline``), or None.

    Searches every active experiment, so a pipeline whose ``tracking.experiment`` was renamed
    still finds its history.
    """
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from sftflow.tracking import TAG_KIND, TAG_PIPELINE, check_tracking_server

    check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not exp_ids:
        return None
    quoted = pipeline.replace("'", "\\'")  # MLflow's filter grammar escapes quotes with a backslash
    runs = client.search_runs(
        experiment_ids=exp_ids,
        filter_string=(f"tags.`{TAG_PIPELINE}` = '{quoted}' "
                       f"and tags.`{TAG_KIND}` = 'pipeline' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def sources_unchanged(cfg: "PipelineConfig", *, pipeline: str, tracking_uri: str | None = None) -> tuple[bool, str]:
    """Whether the last successful run of ``pipeline`` saw the same sources and the same config.

    The flow calls this at start of a scheduled run (``skip_if_unchanged``); every parent run is
    tagged by ``tracking.start_pipeline_run`` with ``sftflow.sources_digest``
    (``tracking.sources_digest(cfg)``) and ``sftflow.config_hash``, which is what is compared. A
    changed config (e.g. new hyper-parameters) retrains even on the same data.

    Args:
        cfg: the resolved pipeline config.
        pipeline: pipeline name (the ``sftflow.pipeline`` tag of its runs).
        tracking_uri: MLflow tracking URI (default: the pipeline's, else ``$MLFLOW_TRACKING_URI``,
            else the embedded store). An unreachable server raises, naming the URI.

    Returns:
        ``(True, why)`` to skip retraining; ``(False, why)`` when something changed or there is no
        earlier successful run. ``why`` is one sentence for the log.
    """
    from sftflow.config import config_hash
    from sftflow.tracking import TAG_CONFIG_HASH, TAG_SOURCES, resolve_tracking_uri, sources_digest

    uri = tracking_uri or resolve_tracking_uri(cfg.tracking.tracking_uri)
    digest = sources_digest(cfg)
    last = last_successful_run(pipeline=pipeline, tracking_uri=uri)
    if last is None:
        return False, f"no earlier successful run of pipeline {pipeline!r} in {uri}"
    run = last.info.run_id
    if last.data.tags.get(TAG_SOURCES) != digest:
        return False, f"source data changed since run {run} (sources digest {digest[:12]} != {last.data.tags.get(TAG_SOURCES, '')[:12]})"
    if last.data.tags.get(TAG_CONFIG_HASH) != config_hash(cfg):
        return False, f"sources unchanged but the config changed since run {run}"
    return True, f"sources (digest {digest[:12]}) and config unchanged since successful run {run}"


# --------------------------------------------------------------------------- concurrency
@contextlib.contextmanager
def pipeline_lock(pipeline: str, *, timeout: float = 600.0, what: str = "registry") -> Iterator[Path]:
    """Hold an exclusive per-pipeline file lock (``$SFTFLOW_HOME/locks/<pipeline>.<what>.lock``).

    Wrap read-compare-write steps that two concurrent runs of one pipeline must not interleave,
    e.g. the promotion gate reading the champion's metric and moving the alias. Works across
    processes on one machine (the served deployments also carry a concurrency limit of 1 for
    the whole flow, which holds across machines).

    Raises:
        TimeoutError: the lock was not free within ``timeout`` seconds (names the lock file).
    """
    from filelock import FileLock, Timeout

    path = layout.ensure(layout.sftflow_home() / "locks") / f"{layout.safe_name(pipeline)}.{layout.safe_name(what)}.lock"
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise TimeoutError(f"{path}: another run of pipeline {pipeline!r} held the {what} lock for over "
                           f"{timeout:.0f}s") from None
    try:
        yield path
    finally:
        lock.release()


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m sftflow.services start|stop|status`` (what infra/local and infra/postgres run)."""
    ap = argparse.ArgumentParser(prog="python -m sftflow.services", description=__doc__.split("\n\n")[0])
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

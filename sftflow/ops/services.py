"""Real Prefect and MLflow servers on loopback, their PostgreSQL backend, and the Prefect health check.

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
* ``check_prefect_server(url)``: fail fast with one clear message when the Prefect API is down
  (MLflow's equivalent is ``sftflow.tracking.runs.check_tracking_server``).

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
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlparse, urlsplit, urlunsplit

from sftflow import layout
from sftflow.errors import ServiceUnavailable
from sftflow.ops.processes import call_in_lifetime_thread, die_with_parent, is_alive, terminate_tree


LOOPBACK = "127.0.0.1"
PREFECT_NAME = "prefect-server"
MLFLOW_NAME = "mlflow-server"
POSTGRES_NAME = "postgres"
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


def _spawn(name: str, argv: list[str], *, env: dict[str, str], url: str, health: str, state: Path,
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
        # MLflow's GenAI job runner (a watcher + one huey consumer process per job type) is not
        # used by sftflow; without it the server is 2 processes instead of 9 on a small machine.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
    })
    env.update(extra)
    return env


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
    env = _quiet_env({
        **db_env,
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
    argv = [_exe("mlflow"), "server", "--host", host, "--port", str(port),
            "--backend-store-uri", backend, "--serve-artifacts", "--artifacts-destination", dest,
            "--workers", str(workers)]
    url = f"http://{host}:{port}"
    return _spawn(MLFLOW_NAME, argv, env=_quiet_env(db_env), url=url, health=f"{url}/health",
                  state=state or services_dir(), timeout=timeout, tie_to_parent=tie_to_parent)


def split_db_password(url: str) -> tuple[str, dict[str, str]]:
    """``(url without its password, {"PGPASSWORD": password})`` for a PostgreSQL URL; others unchanged.

    libpq (psycopg2, MLflow) and asyncpg (Prefect) both read ``PGPASSWORD`` when the URL has none,
    so the secret travels in the (owner-only) environment, not in a command line or a log line.
    """
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgres") or "@" not in parts.netloc:
        return url, {}
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, sep, password = userinfo.partition(":")
    if not sep:
        return url, {}
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, parts.fragment)), {
        "PGPASSWORD": unquote(password)}


def write_secret_file(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 from the first byte (never a window where others can read it).

    An existing file is replaced (removed first, so its old mode and owner cannot carry over).
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _mask(uri: str) -> str:
    from sftflow.tracking.runs import mask_uri  # lazily: tracking pulls in pandas

    return mask_uri(uri)


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
    password: str = field(repr=False)  # never in a repr, hence in no log line or error message
    os_user: str = ""

    def url(self, database: str, *, driver: str = "", with_password: bool = False) -> str:
        """SQLAlchemy URL of ``database``; ``driver`` e.g. ``asyncpg`` (Prefect) or ``psycopg2`` (MLflow).

        Without the password unless asked; servers get it as ``PGPASSWORD`` (``env()``).
        """
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        secret = f":{quote(self.password, safe='')}" if with_password else ""
        return f"{scheme}://{quote(self.user, safe='')}{secret}@{self.host}:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        """Environment that lets libpq / asyncpg clients of this cluster authenticate."""
        return {"PGPASSWORD": self.password}


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
        write_secret_file(creds_file, json.dumps({"user": "sftflow", "password": password}))
        pwfile = root / ".pwfile"
        write_secret_file(pwfile, password + "\n")
        try:
            if os_user:
                shutil.chown(pwfile, user=os_user)  # still 0600: readable by the server's account only
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
                         "healthy": _http_ok(svc.url.rstrip("/") + health), "log": svc.log}
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
    if not _http_ok(url.rstrip("/") + "/health", timeout=timeout):
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
            if _http_ok(url, timeout=timeout):
                misses = 0
                continue
            misses += 1
            first = first if misses > 1 else time.monotonic()
            if misses >= failures:
                on_lost(first)
                return

    threading.Thread(target=loop, name="sftflow-server-watch", daemon=True).start()
    return stop


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

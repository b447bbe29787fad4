"""The PostgreSQL backend of the stack: a cluster we own under ``$SFTFLOW_HOME/postgres``.

``start_postgres`` creates it the first time (``initdb`` as the ``postgres`` OS account when run as
root, a random superuser password in ``credentials.json``, mode 0600), starts it on loopback (TCP
only) and creates the ``prefect`` and ``mlflow`` databases; ``stop_postgres`` stops it. A password
never reaches a command line (``/proc/<pid>/cmdline`` is world-readable): ``split_db_password``
moves it from a URL into ``PGPASSWORD``, which libpq and asyncpg read, and ``write_secret_file``
writes owner-only files from the first byte. ``sftflow.ops.services.start_stack(backend="postgres")``
puts the servers on it.

Nothing here runs at import time.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from sftflow import layout
from sftflow.ops.servers import LOOPBACK, ServiceError, port_in_use

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

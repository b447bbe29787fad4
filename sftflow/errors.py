"""Errors a user can cause, and the exit codes of the ``sftflow`` command (defined once, here).

A user error (a bad config, a bad data file, a server that does not answer...) ends a command
with one or two lines on stderr that name the file / key / row and what was expected, never with
a traceback; ``--debug`` (or ``SFTFLOW_DEBUG=1``) shows the traceback instead. Any other
exception is a bug: one line saying so, exit code 1, and the traceback with ``--debug``.

Stages raise a subclass of ``UserError`` for problems in their input; the class says which exit
code the command ends with. Errors raised inside a Prefect task reach the CLI unchanged (or as
the ``__cause__`` of a wrapper), and :func:`find_user_error` digs them out.

Exit codes (also in ``sftflow --help``):

====  =====================  ================================================================
code  name                   meaning
====  =====================  ================================================================
0     ``EXIT_OK``            success (also: skipped because nothing changed)
1     ``EXIT_FAILURE``       the pipeline failed for another reason (a bug, a crash in a stage)
2     ``EXIT_CONFIG``        bad pipelines.yaml / override / command-line argument, unknown
                             pipeline or model, a size the data cannot satisfy (found before work)
3     ``EXIT_SERVICE``       a tracking / Prefect server does not answer or cannot start, or a
                             store's database file is damaged (``file is not a database``)
4     ``EXIT_DATA``          bad input data: a source file cannot be ingested or read (permission
                             denied), the validation suite failed, too few rows left for the split
5     ``EXIT_HOME``          ``$SFTFLOW_HOME`` cannot be used (not a folder, not writable, a file
                             in it that this user may not read or write), or a filesystem has
                             not enough free space: before the run (the preflight's estimate) or
                             during it (ENOSPC / quota; the line names the mount point and what
                             is free)
130   ``EXIT_INTERRUPTED``   interrupted (Ctrl-C)
====  =====================  ================================================================
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Iterator

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_SERVICE = 3
EXIT_DATA = 4
EXIT_HOME = 5
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success (or skipped: nothing changed)",
    EXIT_FAILURE: "the pipeline failed for another reason (a bug, a crash in a stage)",
    EXIT_CONFIG: "bad pipelines.yaml / override / argument, unknown pipeline or model, impossible size",
    EXIT_SERVICE: "a tracking / Prefect server does not answer, or a store's database file is damaged",
    EXIT_DATA: "bad input data (a file that cannot be ingested or read, a failed validation suite, too few rows)",
    EXIT_HOME: "$SFTFLOW_HOME is not a writable folder (or a file in it cannot be used), or a disk is full",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class UserError(Exception):
    """An error the user can fix; the message names the file / key / row and what was expected.

    Attributes:
        exit_code: what the ``sftflow`` command exits with.
        label: the short prefix of the printed line (``sftflow: <label>: <message>``).
    """

    exit_code: int = EXIT_CONFIG
    label: str = "error"


# ``sftflow.config_sections.ConfigError`` (a bad pipelines.yaml, override or size) is the UserError with
# exit code EXIT_CONFIG; it lives beside the schema it checks.


class DataError(UserError, ValueError):
    """Input data cannot be used (a file that cannot be read, too few rows...)."""

    exit_code = EXIT_DATA
    label = "bad input data"


class ServiceUnavailable(UserError, RuntimeError):
    """A server the command needs does not answer."""

    exit_code = EXIT_SERVICE
    label = "service unavailable"


class NotFoundError(UserError, LookupError):
    """Something the command was asked about does not exist (a model version, a store)."""

    exit_code = EXIT_CONFIG
    label = "not found"


class HomeError(UserError, OSError):
    """``$SFTFLOW_HOME`` is not a folder this process can write."""

    exit_code = EXIT_HOME
    label = "unusable $SFTFLOW_HOME"


class DiskFullError(HomeError):
    """A filesystem ran out of space (or quota) while the command wrote to it (exit 5, like the
    preflight's ``sftflow.ops.diskspace.DiskSpaceError`` found before the run)."""

    label = "disk full"


class StoreDamaged(UserError, RuntimeError):
    """A store's database file cannot be read as a database (truncated, overwritten, not SQLite)."""

    exit_code = EXIT_SERVICE
    label = "damaged store"


class AccessDenied(UserError, PermissionError):
    """A file or folder this user may not read / write (exit 5 inside ``$SFTFLOW_HOME``, else 4)."""

    exit_code = EXIT_DATA
    label = "permission denied"


# SQLite's words for a file that is not (or no longer) a database, and for a full disk.
_SQLITE_DAMAGED = ("file is not a database", "database disk image is malformed", "file is encrypted or is not a database")
_SQLITE_FULL = ("database or disk is full", "no space left on device")


def _home() -> Path:
    from sftflow import layout  # lazily: layout is as low as this module, and imports nothing of ours

    return layout.sftflow_home()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem that holds ``path`` (its nearest existing ancestor's)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _fs_type(mount: Path) -> str:
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            types = {fields[1]: fields[2] for fields in (line.split() for line in f) if len(fields) > 2}
        return types.get(str(mount), "")
    except OSError:
        return ""


def disk_full(path: str | Path | None = None, *, cause: BaseException | None = None) -> DiskFullError:
    """The one-line error for a full filesystem: which filesystem (mount point, type), how much is
    free of its size, the file being written, and what to do.

    Args:
        path: the file being written (default: ``$SFTFLOW_HOME``, where everything is written).
        cause: the original error (its errno tells a quota from a full disk).
    """
    target = Path(path) if path else _home()
    mount = mount_point(target)
    try:
        st = os.statvfs(mount)
        space = f"{_size(st.f_bavail * st.f_frsize)} free of {_size(st.f_blocks * st.f_frsize)}"
    except OSError:
        space = "free space unknown"
    kind = _fs_type(mount)
    what = "disk quota exceeded" if getattr(cause, "errno", None) == errno.EDQUOT else "no space left"
    return DiskFullError(
        f"{what} on the filesystem mounted at {mount}{f' ({kind})' if kind else ''}: {space}, while writing "
        f"{target}. Free some space there (old runs live in {_home() / 'runs'}), or set SFTFLOW_HOME to a folder "
        f"on a filesystem with more room (a run needs room for its models, outputs and stores); then run the "
        f"command again (finished stages are reused)")


def access_denied(path: str | Path, *, writing: bool = False) -> AccessDenied:
    """The one-line error for a file or folder this user may not read (or write)."""
    p = Path(path).expanduser().absolute()
    err = AccessDenied(
        f"{p}: permission denied: this user (uid {os.geteuid()}) may not {'write' if writing else 'read'} it; "
        f"fix its permissions or owner (chmod / chown), or run as its owner")
    try:
        inside_home = p.is_relative_to(_home())
    except (OSError, ValueError):
        inside_home = False
    if inside_home:
        err.exit_code = EXIT_HOME
    return err


def store_damaged(path: str | Path | None, detail: str) -> StoreDamaged:
    """The one-line error for a database file that SQLite cannot read (``path`` None: not known)."""
    if path is None:
        return StoreDamaged(
            f"an SQLite store is damaged ({detail}): check $SFTFLOW_HOME/mlflow/mlflow.db and "
            f"$SFTFLOW_HOME/prefect/prefect.db ({_home()}); restore the damaged file from a backup or move it aside")
    return StoreDamaged(
        f"{path}: the store's database is damaged ({detail}). Restore it from a backup, or move it aside "
        f"(mv {path} {path}.damaged) to start a new, empty store here (runs and registered models recorded "
        f"in it are then no longer listed)")


def _sqlite_message(exc: BaseException) -> str:
    """The SQLite error text of ``exc`` (sqlite3 / SQLAlchemy / MLflow wrappers) in lower case, else ""."""
    text = str(exc).lower()
    name = type(exc).__name__
    if name in ("DatabaseError", "OperationalError", "MlflowException") or "sqlite" in text:
        return text
    return ""


def environment_error(exc: BaseException) -> UserError | None:
    """``exc`` as the user error it really is, when it is an environment problem, not a bug: a full
    disk (ENOSPC / EDQUOT, SQLite's "database or disk is full"), permission denied on a named file,
    a damaged SQLite file. None otherwise."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full(exc.filename, cause=exc)
    if isinstance(exc, PermissionError) and exc.filename:
        return access_denied(exc.filename)
    sqlite = _sqlite_message(exc)
    if sqlite:
        if any(s in sqlite for s in _SQLITE_FULL):
            return disk_full(None, cause=exc)
        for s in _SQLITE_DAMAGED:
            if s in sqlite:
                return store_damaged(None, s)
    return None


def classify(exc: BaseException) -> tuple[int, str] | None:
    """``(exit code, label)`` when ``exc`` itself is a user error, else None."""
    if isinstance(exc, UserError):
        return exc.exit_code, exc.label
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it wraps: explicit causes, exception groups, and the context of Prefect's wrappers."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
        elif type(e).__module__.startswith("prefect") and e.__context__ is not None:
            todo.append(e.__context__)


def find_user_error(exc: BaseException) -> tuple[BaseException, int, str] | None:
    """The user error ``exc`` is or wraps, as ``(error, exit code, label)``; None for a bug.

    A user error raised on purpose wins; else an environment problem anywhere in the chain (a
    full disk, permission denied on a file, a damaged database: ``environment_error``) is one.
    """
    chain = list(_chain(exc))
    for e in chain:
        hit = classify(e)
        if hit:
            return e, hit[0], hit[1]
    for e in chain:
        env = environment_error(e)
        if env is not None:
            return env, env.exit_code, env.label
    return None


def one_line(text: str, *, limit: int = 600) -> str:
    """``text`` on one line (newlines become ``; ``), shortened to ``limit`` characters."""
    flat = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def debug_enabled() -> bool:
    """True when ``SFTFLOW_DEBUG`` is set to something other than empty/0/false/no."""
    return os.environ.get("SFTFLOW_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


class _DropUserErrorTracebacks(logging.Filter):
    """Keep a log record's one-line message but drop the traceback of a user error.

    Prefect logs every failed task / flow run with its traceback; for a user error that is
    dozens of lines around the one line that matters (which the CLI prints at the end).
    """

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 (logging's API)
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and find_user_error(exc) is not None:
            record.exc_info = None
            record.exc_text = None
        return True


_FILTER = _DropUserErrorTracebacks()
# Prefect's engines log failed runs on these loggers (records reach the console handler by propagation).
_PREFECT_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine", "prefect")


def quiet_user_error_tracebacks() -> None:
    """Drop tracebacks of user errors from Prefect's run logs (the message line stays). Idempotent."""
    for name in _PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)

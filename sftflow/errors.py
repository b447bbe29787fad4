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
3     ``EXIT_SERVICE``       a tracking / Prefect server does not answer or cannot start
4     ``EXIT_DATA``          bad input data: a source file cannot be ingested, the validation
                             suite failed, too few rows left for the split
5     ``EXIT_HOME``          ``$SFTFLOW_HOME`` cannot be used (not a folder, not writable)
130   ``EXIT_INTERRUPTED``   interrupted (Ctrl-C)
====  =====================  ================================================================
"""

from __future__ import annotations

import logging
import os
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
    EXIT_SERVICE: "a tracking / Prefect server does not answer",
    EXIT_DATA: "bad input data (a file that cannot be ingested, a failed validation suite, too few rows)",
    EXIT_HOME: "$SFTFLOW_HOME is not a writable folder",
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


# ``sftflow.config.ConfigError`` (a bad pipelines.yaml, override or size) is the UserError with
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
    """The user error ``exc`` is or wraps, as ``(error, exit code, label)``; None for a bug."""
    for e in _chain(exc):
        hit = classify(e)
        if hit:
            return e, hit[0], hit[1]
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

"""Credentials never reach a log line, the console, or a stored text: one masking function.

``mask_text`` replaces, inside any text:

- the password of a URI's ``user:password@`` (any scheme: ``http://``, ``postgresql://`` ...), a
  bare ``https://token@`` (no user name), and secret-looking query parameters (``password=``,
  ``token=`` ...) of a URI (``mask_uri`` does one URI);
- ``password=...`` pairs of libpq-style connection strings and ``Authorization: Basic|Bearer``
  values;
- the value of every environment variable whose name says it holds a secret
  (``*PASSWORD*``, ``*PASSWD*``, ``*_TOKEN``, ``*SECRET*``, ``*_KEY``, ``*CREDENTIAL*`` ... as a
  ``_``-separated part of the name), wherever that value appears.

The hooks apply it to everything the product writes, whichever library produced the text:
:class:`MaskingFilter` on logging handlers (message, arguments and traceback text),
:class:`MaskingStream` around ``sys.stdout``/``sys.stderr`` (MLflow prints its "View run ... at:
<tracking URI>" lines with ``sys.stdout.write``, not logging), and :func:`install_masking`, which
puts both in place for a whole command. This module imports nothing from ``sftflow``: every layer
may use it.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from typing import Any, TextIO

MASK = "***"

# Query parameters whose values are secrets in database / storage URIs.
_SECRET_PARAMS = ("password", "passwd", "pwd", "secret", "token", "key", "credential", "signature", "sig")
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# libpq keyword/value connection strings ("host=db user=x password=secret") and HTTP auth headers.
_KV_SECRET = re.compile(r"(?i)\b(password|passwd)(\s*=\s*)('[^']*'|\"[^\"]*\"|[^\s,;&]+)")
_AUTH_HEADER = re.compile(r"(?i)\b(authorization['\"]?\s*[:=]\s*['\"]?(?:basic|bearer|token)\s+)([A-Za-z0-9+/=._~-]+)")
# An environment variable holds a secret when a "_"-separated part of its name says so
# (PGPASSWORD, MLFLOW_TRACKING_PASSWORD, HF_TOKEN, AWS_SECRET_ACCESS_KEY, PREFECT_API_KEY ...);
# TOKENIZERS_PARALLELISM or PWD (the working folder) do not.
_SECRET_NAME_PART = re.compile(r"(PASSWORD|PASSWD|PASSPHRASE|SECRET|CREDENTIALS?)$|^(TOKEN|KEY|APIKEY)$")
# Values too common to be a secret (switches, numbers): masking them would mangle ordinary text.
_NOT_SECRET_VALUES = frozenset({"true", "false", "yes", "no", "on", "off", "none", "null", "0", "1"})
_MIN_SECRET_LEN = 6  # shorter values would hit ordinary words and numbers


def mask_uri(uri: str) -> str:
    """``uri`` with its secrets replaced by ``***``: the password of ``user:password@``, a bare
    ``https://token@`` (no user name), and secret-looking query parameters (``password=``,
    ``token=`` ...).

    Text that is not a URI (a path, "") is returned unchanged. Use it wherever a URI is printed,
    logged or stored as a tag.
    """
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    # Rebuilt by hand, not with urlunsplit: that would also "normalise" the rest (sqlite:////x).
    scheme, _, rest = uri.partition("://")
    netloc = re.match(r"[^/?#]*", rest).group(0)  # type: ignore[union-attr]
    tail = rest[len(netloc):]
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _pw = userinfo.partition(":")
        if sep:
            netloc = f"{user}:{MASK}@{host}"
        elif scheme.lower() in ("http", "https"):
            netloc = f"{MASK}@{host}"  # https://<token>@host: the lone userinfo is a token
        # else: a database URI's lone userinfo is the user name, kept
    path, qsep, query = tail.partition("?")
    query, hsep, fragment = query.partition("#")
    if query:
        pairs = []
        for item in query.split("&"):
            k, eq, v = item.partition("=")
            secret = eq and v and any(s in k.lower() for s in _SECRET_PARAMS)
            pairs.append(f"{k}={MASK}" if secret else item)
        query = "&".join(pairs)
    return f"{scheme}://{netloc}{path}{qsep}{query}{hsep}{fragment}"


def secret_env_values(environ: Any = None) -> list[str]:
    """The values of environment variables whose names say they hold a secret (longest first)."""
    env = os.environ if environ is None else environ
    found = set()
    for name, value in env.items():
        if (len(value) >= _MIN_SECRET_LEN and value.strip().lower() not in _NOT_SECRET_VALUES
                and any(_SECRET_NAME_PART.search(part) for part in name.upper().split("_"))):
            found.add(value)
    return sorted(found, key=len, reverse=True)


def mask_text(text: str, *, env: bool = True) -> str:
    """``text`` (a log line, an error message, a config dump) with every credential replaced by ``***``.

    Every URI inside it goes through :func:`mask_uri`; ``password=...`` pairs, ``Authorization``
    header values and (``env=True``) the values of secret-named environment variables are masked
    too. Not a string: returned unchanged.
    """
    if not isinstance(text, str) or not text:
        return text
    if "://" in text:
        text = _URI_IN_TEXT.sub(lambda m: mask_uri(m.group(0)), text)
    if "=" in text:
        text = _KV_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    if ":" in text or "=" in text:
        text = _AUTH_HEADER.sub(lambda m: f"{m.group(1)}{MASK}", text)
    for value in secret_env_values() if env else ():
        if value in text:
            text = text.replace(value, MASK)
    return text


def mask_value(value: Any, *, env: bool = True) -> Any:
    """``value`` masked when it is text; dicts and lists are masked item by item (keys kept).

    ``env=False`` for identifiers (run tags: digests, run ids) that a short environment value
    could match by chance: URIs and ``password=`` pairs are masked, nothing else.
    """
    if isinstance(value, str):
        return mask_text(value, env=env)
    if isinstance(value, dict):
        return {k: mask_value(v, env=env) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_value(v, env=env) for v in value)
    return value


class MaskingFilter(logging.Filter):
    """A handler filter that masks credentials in a record's message, arguments and traceback.

    The record is rewritten in place (``msg`` = the masked, formatted message, no ``args``;
    ``exc_text`` = the masked traceback), so every handler that sees the record afterwards writes
    the masked text, whatever its formatter.
    """

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 (logging's API)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: let the handler report it as usual
            return True
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_text(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_text(record.stack_info)
        return True


class MaskingStream(io.TextIOBase):
    """A text stream that masks credentials, then writes to ``target`` (``sys.stdout`` / ``sys.stderr``).

    Text is masked up to its last whitespace; the word after it is held until more text (or
    ``flush``) comes, so a URI or a secret written in two pieces is still masked (they hold no
    whitespace), while lines and progress bars still show as they are written.
    """

    def __init__(self, target: TextIO) -> None:
        self._target = target
        self._pending = ""

    @property
    def target(self) -> TextIO:
        """The stream written to."""
        return self._target

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not s:
            return 0
        text = self._pending + s
        cut = max(text.rfind(c) for c in " \t\r\n\f\v") + 1
        if cut > 0:
            self._target.write(mask_text(text[:cut]))
        self._pending = text[cut:]
        if len(self._pending) > 65536:  # one enormous word: do not hold it forever
            self.flush()
        return len(s)

    def flush(self) -> None:
        if self._pending:
            self._target.write(mask_text(self._pending))
            self._pending = ""
        self._target.flush()

    def isatty(self) -> bool:
        return bool(getattr(self._target, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self._target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._target, "errors", None)


_FILTER = MaskingFilter()


def mask_handlers() -> None:
    """Add the masking filter to every handler installed so far (root's and every named logger's). Idempotent."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in list(lg.handlers):
            add_masking(h)


def add_masking(handler: logging.Handler) -> logging.Handler:
    """Add the masking filter to ``handler`` (once) and return it."""
    if not any(isinstance(f, MaskingFilter) for f in handler.filters):
        handler.addFilter(_FILTER)
    return handler


_factory_installed: list[Any] = []


def install_masking() -> None:
    """Mask credentials in everything this process writes from now on (idempotent).

    - ``sys.stdout``/``sys.stderr`` become :class:`MaskingStream` s (stray ``print`` s and MLflow's
      "View run" lines);
    - every handler installed so far gets :class:`MaskingFilter`;
    - every log record created from now on has its message masked (the log-record factory), so
      handlers a library installs later (MLflow configures its loggers when first imported) write
      masked messages too.
    """
    if sys.stdout is not None and not isinstance(sys.stdout, MaskingStream):
        sys.stdout = MaskingStream(sys.stdout)  # type: ignore[assignment]
    if sys.stderr is not None and not isinstance(sys.stderr, MaskingStream):
        sys.stderr = MaskingStream(sys.stderr)  # type: ignore[assignment]
    mask_handlers()
    if not _factory_installed:
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _FILTER.filter(record)
            return record

        logging.setLogRecordFactory(factory)
        _factory_installed.append(previous)

"""Ingestion: raw instruction files → one canonical Parquet dataset + a quarantine Parquet.

Reads every source of a pipeline (local file, glob, ``datasets.save_to_disk`` folder or hub id),
converts each row of a known format into the canonical record (see ``sftflow.data.records``), and
mixes the sources by weight / cap. Nothing disappears silently:

* a bad row (malformed JSON line, missing field, wrong type, duplicate key, JSON nested absurdly
  deep, blank or invisible-only instruction or response, invalid UTF-8, absurdly long) goes to the
  quarantine file with its source file, row number, a readable reason and its raw text
  (truncated); the good rows go on. Each record keeps ``source_row`` so later stages can point
  back to the same line;
* a whole file that is unreadable, empty, not valid JSON as a document (with line and column),
  not UTF-8 (with the byte offset), a table without a column its format needs, or of an unknown
  format raises ``IngestError`` naming the file and what was expected;
* per source: ``read = kept + quarantined`` and ``kept = mixed + not_sampled`` (mixing only ever
  takes a subset; rows left out by a weight or cap are counted, not hidden).

Reading rules: each file is read once; the sha256 of those bytes is what lineage logs
(``IngestResult.files``). A byte-order mark (UTF-8/16/32) is honoured and dropped. JSONL lines end
at ``\n`` only (a trailing ``\r`` is dropped; U+2028, U+0085, form feeds... are text), blank lines
are separators, and ``row`` is the line number. In a JSON list or a Parquet file ``row`` is the
1-based record index; in a CSV file the line where the row starts.

Formats (``SourceConfig.format``; ``auto`` detects per file and logs the choice):

=================  ==========================================================================
alpaca             ``{instruction, input?, output, system?}`` (also AlpacaEval ``{instruction, output}``)
dolly              ``{instruction, context?, response, category?}``
human_assistant    ``{text: "### Human: … ### Assistant: …"}`` (several turns allowed)
messages           ``{messages|conversations: [{role|from, content|value}]}``; content may be a
                   string or a list of parts ``[{type: text, value|text}]`` (ShareGPT / LLaMA-Factory)
self_instruct      ``{instruction, instances: [{input, output}]}`` → one record per instance
=================  ==========================================================================

Run it inside the flow (``flows/``) or directly::

    from tasks.ingest import ingest
    result = ingest(sources=cfg.sources, cfg=cfg.ingest, out_dir=Path(...))
"""

from __future__ import annotations

import codecs
import csv
import glob as globlib
import hashlib
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from prefect import task

from sftflow.errors import DataError
from sftflow.config import IngestConfig, SourceConfig
from sftflow.ops.orchestration import IO_RETRIES, markdown_artifact, stage_cache_policy, table_artifact
from sftflow.data.records import is_blank, make_record, records_to_frame
from sftflow.data.refs import DatasetRef, write_parquet
from sftflow.tracking.runs import StageContext, log_dataset, log_json, stage_run
from sftflow.results import SourceCounts, SourceFile, IngestResult

log = logging.getLogger(__name__)


def _logger() -> Any:
    """Prefect's run logger inside a flow/task (so messages show in the UI), else this module's."""
    from sftflow.ops.orchestration import run_logger

    return run_logger(__name__)

FORMATS: tuple[str, ...] = ("alpaca", "dolly", "human_assistant", "messages", "self_instruct")
FILE_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".ndjson", ".csv", ".parquet")
# One quarantine schema for every stage that quarantines rows (ingest, validate).
# ``source``/``source_row`` locate the row in its source file (JSONL/CSV line, or record index in a
# JSON list / Parquet file); ``file``/``row`` locate it in what the quarantining stage read.
QUARANTINE_COLUMNS: tuple[str, ...] = ("stage", "source", "source_row", "file", "row", "reason", "raw")
RAW_PREVIEW_CHARS = 2000

_ROLE_ALIASES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bard": "assistant",
    "system": "system",
}
_HA_SPLIT = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)
# Lone surrogates: what `surrogateescape` leaves for bytes that were not valid UTF-8, or a JSON
# "\ud800" escape that pairs with nothing. Neither is text, and Parquet cannot store them.
_SURROGATE = re.compile("[\ud800-\udfff]")


class IngestError(DataError):
    """A whole file or source cannot be ingested; the message names it and says what was expected."""


class RowError(ValueError):
    """One row is bad; its message is the quarantine reason."""


def retry_unless(*errors: type[BaseException]) -> Callable[[Any, Any, Any], bool]:
    """A Prefect ``retry_condition_fn``: retry (I/O hiccups) unless the failure is one of ``errors``.

    Bad data (too many quarantined rows, a failed GX suite) fails the same way every time, so
    retrying it only delays the clear error.
    """

    def should_retry(task: Any, task_run: Any, state: Any) -> bool:
        exc = getattr(state, "data", None)
        if not isinstance(exc, BaseException):
            try:
                exc = state.result(raise_on_failure=False)
            except Exception:
                return True
        return not isinstance(exc, errors)

    return should_retry


# --------------------------------------------------------------------------- results
@dataclass
class _Parsed:
    """One raw row of a file: either an object or a parse error, with its position and text."""

    row: int
    obj: Any = None
    error: str | None = None
    raw: str = ""


@dataclass
class _FileRead:
    rows: list[_Parsed]
    sha256: str
    tabular: bool  # every row has the same keys (CSV, Parquet, saved dataset): a missing column is a file error


# JSON nesting deeper than this is not a record; the check is iterative so it can never recurse.
MAX_JSON_DEPTH = 100
_JSON_BLANK = " \t\r"  # JSON's own whitespace (besides \n, the line separator)


# --------------------------------------------------------------------------- file reading
def resolve_files(src: SourceConfig) -> list[Path]:
    """Files (or one save_to_disk folder) named by ``src.path``; raises IngestError when none."""
    assert src.path is not None
    p = Path(src.path).expanduser()
    if any(ch in src.path for ch in "*?["):
        hits = sorted(Path(x) for x in globlib.glob(str(p), recursive=True))
        files = [h for h in hits if h.is_file() or _is_saved_dataset(h)]
        if not files:
            raise IngestError(f"source {src.name!r}: glob {src.path} matches no file "
                              f"(expected files ending in {'/'.join(FILE_SUFFIXES)})")
        return files
    if not p.exists():
        raise IngestError(f"source {src.name!r}: file not found: {p}")
    if p.is_dir():
        if _is_saved_dataset(p):
            return [p]
        inside = sorted(x.name for x in p.iterdir())[:5]
        raise IngestError(
            f"source {src.name!r}: {p} is a folder but not a `datasets.save_to_disk` folder "
            f"(expected a file {'/'.join(FILE_SUFFIXES)}, a glob such as {p}/*.jsonl, or a folder with "
            f"dataset_info.json/dataset_dict.json; it holds {inside or 'nothing'})"
        )
    return [p]


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and any((p / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_rows(path: Path, *, max_line_chars: int, split: str = "train") -> list[_Parsed]:
    """Parse one file into raw rows (objects or per-row errors).

    Raises:
        IngestError: the file is empty, unreadable, not of a known container, or not parseable as a whole.
    """
    return read_file(path, max_line_chars=max_line_chars, split=split).rows


def read_file(path: Path, *, max_line_chars: int, split: str = "train") -> _FileRead:
    """Read one file ONCE, hash the bytes read and parse those same bytes.

    The digest is what lineage records, so it must describe the data that was parsed, not a
    second read of a file that may have changed in between.

    Args:
        path: a .json/.jsonl/.ndjson/.csv/.parquet file, or a ``datasets.save_to_disk`` folder.
        max_line_chars: longer JSONL lines / CSV rows are quarantined unparsed.
        split: the split to read from a saved ``DatasetDict``.

    Returns:
        The parsed rows, the sha256 (a folder: ``sha256_dir`` just before loading it) and whether
        the container is a table (all rows share the same columns).

    Raises:
        IngestError: the file is empty, unreadable, not of a known container, or not parseable as a whole.
    """
    if path.is_dir():
        from sftflow.data.refs import sha256_dir

        digest = sha256_dir(path)
        return _FileRead(_read_saved_dataset(path, split=split), digest, tabular=True)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise IngestError(f"{path}: unknown file type {suffix or '(none)'!r}; expected one of {', '.join(FILE_SUFFIXES)}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IngestError(f"{path}: cannot read file: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if suffix == ".parquet":
        if not data:
            raise IngestError(f"{path}: file is empty (expected PARQUET records)")
        return _FileRead(_read_parquet(path, data), digest, tabular=True)
    body, encoding = _strip_bom(path, data)
    kind = suffix.lstrip(".").upper()
    if not body.strip(b" \t\r\n"):
        raise IngestError(f"{path}: file is empty (expected {kind} records)"
                          + (" (only blank lines)" if body else ""))
    if encoding != "utf-8":
        try:
            body = body.decode(encoding).encode("utf-8")  # UTF-16/32 with a BOM: re-encode, then one code path
        except UnicodeDecodeError as e:
            raise IngestError(f"{path}: invalid {encoding.upper()} at byte {e.start}; expected text in the "
                              f"encoding its byte-order mark announces (or UTF-8)") from None
    if suffix == ".csv":
        return _FileRead(_read_csv(path, body, max_line_chars=max_line_chars), digest, tabular=True)
    if suffix in (".jsonl", ".ndjson"):
        return _FileRead(_read_jsonl(path, body, max_line_chars=max_line_chars), digest, tabular=False)
    return _FileRead(_read_json(path, body, max_line_chars=max_line_chars), digest, tabular=False)


def _strip_bom(path: Path, data: bytes) -> tuple[bytes, str]:
    """Remove a byte-order mark; return the bytes and the encoding it announces (UTF-8 without one)."""
    for bom, enc in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
                     (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            return data[len(bom):], enc
    return data, "utf-8"


def _utf8_error(data: bytes, e: UnicodeDecodeError) -> str:
    """'invalid UTF-8 at byte N of the file (line L, byte C of the line)' for a decode error in ``data``."""
    line = data.count(b"\n", 0, e.start) + 1
    col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return f"invalid UTF-8 at byte {e.start} of the file (line {line}, byte {col} of the line)"


class _Obj(dict):
    """A JSON object that remembers the keys it saw more than once (``json`` keeps the last silently)."""

    dupes: tuple[str, ...] = ()


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict:
    obj = _Obj(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.dupes = tuple(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _loads(text: str) -> Any:
    # strict=False: raw control characters (tab, form feed, \x1c...) inside a string are kept as text
    # rather than failing the row; validation's non-printable bound judges them afterwards.
    return json.loads(text, object_pairs_hook=_pairs_hook, strict=False)


def _json_problem(obj: Any) -> str | None:
    """Why a parsed JSON value is not a trustworthy record (too deep, duplicate keys), or None."""
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"JSON nested more than {MAX_JSON_DEPTH} levels deep (expected a flat record)"
        if isinstance(o, dict):
            if getattr(o, "dupes", ()):
                return (f"duplicate key(s) {list(o.dupes)} in one JSON object "
                        "(which value is meant is ambiguous; keep each key once)")
            stack.extend((v, depth + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, depth + 1) for v in o)
    return None


def _parse_line(line: str) -> tuple[Any, str | None]:
    """One JSON text → (object, None) or (None, reason)."""
    try:
        obj = _loads(line)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} at column {e.colno}"
    except ValueError as e:  # e.g. an integer literal longer than Python's 4300-digit conversion limit
        return None, f"malformed JSON: {str(e)[:120]}"
    except RecursionError:
        return None, f"JSON nested too deeply to parse (more than {MAX_JSON_DEPTH} levels expected at most)"
    problem = _json_problem(obj)
    return (None, problem) if problem else (obj, None)


def _read_jsonl(path: Path, data: bytes, *, max_line_chars: int) -> list[_Parsed]:
    """One JSON object per line. Lines end at b"\\n" only (a trailing "\\r" is dropped): U+2028,
    U+0085, form feeds and the like are ordinary characters inside a JSON string, never line breaks.
    Each line is decoded on its own, so invalid UTF-8 quarantines that line, not the file."""
    rows: list[_Parsed] = []
    offset = 0
    for i, raw_line in enumerate(data.split(b"\n"), start=1):
        start, offset = offset, offset + len(raw_line) + 1
        if raw_line.endswith(b"\r"):
            raw_line = raw_line[:-1]
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append(_Parsed(i, error=f"invalid UTF-8 at byte {start + e.start} of the file (line {i}, byte "
                                         f"{e.start + 1} of the line); expected UTF-8 text",
                                raw=raw_line.decode("utf-8", "replace")))
            continue
        if not line.strip(_JSON_BLANK):
            continue  # blank lines are separators, not records
        if len(line) > max_line_chars:
            rows.append(_Parsed(i, error=f"record too long: line has {len(line)} chars (> {max_line_chars})", raw=line))
            continue
        obj, err = _parse_line(line)
        rows.append(_Parsed(i, obj=obj, error=err, raw=line))
    return rows


def _first_line_is_object(text: str) -> bool:
    """True when the first non-blank line is a JSON object on its own: the file is JSONL (named .json)."""
    for line in text.split("\n"):
        if line.strip(_JSON_BLANK):
            try:
                return isinstance(json.loads(line, strict=False), dict)
            except (ValueError, RecursionError):
                return False
    return False


def _read_json(path: Path, data: bytes, *, max_line_chars: int) -> list[_Parsed]:
    # Lone surrogates stand for undecodable bytes until we know whether this is JSONL (per-line
    # quarantine) or one JSON document (a file error naming the byte).
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        doc = _loads(text)
    except RecursionError:
        raise IngestError(f"{path}: JSON nested too deeply to parse (a record is expected to nest at most "
                          f"{MAX_JSON_DEPTH} levels); expected a JSON list of records") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _first_line_is_object(text):  # a JSONL file named .json
            return _read_jsonl(path, data, max_line_chars=max_line_chars)
        _check_utf8(path, data)
        what = "unexpected data after the end of the JSON value" if e.msg == "Extra data" else e.msg
        raise IngestError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {what}; "
                          "expected a JSON list of records (or JSONL, one object per line)") from None
    except ValueError as e:  # e.g. an integer literal longer than Python's 4300-digit conversion limit
        raise IngestError(f"{path}: not valid JSON ({str(e)[:120]}); expected a JSON list of records") from None
    _check_utf8(path, data)
    if isinstance(doc, dict):
        if doc.dupes:
            raise IngestError(f"{path}: duplicate key(s) {list(doc.dupes)} in the top-level JSON object; "
                              "expected each key once")
        lists = [k for k in ("data", "rows", "records", "examples", "train") if isinstance(doc.get(k), list)]
        if lists:
            doc = doc[lists[0]]
        elif _format_of(doc):
            doc = [doc]  # a single record
        elif doc and all(isinstance(v, dict) for v in doc.values()):
            doc = list(doc.values())  # {key: record} layout
        else:
            raise IngestError(f"{path}: expected a JSON list of records, got an object with keys {sorted(doc)[:8]}")
    if not isinstance(doc, list):
        raise IngestError(f"{path}: expected a JSON list of records, got {_type_name(doc)}")
    if not doc:
        raise IngestError(f"{path}: the JSON list is empty (expected records)")
    rows = []
    for i, o in enumerate(doc, start=1):
        problem = _json_problem(o)
        rows.append(_Parsed(i, obj=None if problem else o, error=problem, raw=_raw_of(o)))
    return rows


def _check_utf8(path: Path, data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: {_utf8_error(data, e)}; expected UTF-8 text") from None


def _read_csv(path: Path, data: bytes, *, max_line_chars: int) -> list[_Parsed]:
    # Undecodable bytes become lone surrogates, so the affected rows (not the file) are quarantined.
    text = data.decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    old_limit = csv.field_size_limit()
    # A long field is quarantined by the length check below with a clear reason; csv's own limit
    # (128 KiB) would instead raise mid-row. The limit is process-wide, hence restored after.
    csv.field_size_limit(2**31 - 1)
    try:
        try:
            header = next(reader)
        except (StopIteration, csv.Error) as e:
            raise IngestError(f"{path}: cannot read a CSV header ({e}); expected a header row of column names") from None
        header = [h.strip() for h in header]
        dupes = sorted({h for h in header if h and header.count(h) > 1})
        if dupes:
            raise IngestError(f"{path}: duplicate column(s) {dupes} in the CSV header; expected each column once")
        rows: list[_Parsed] = []
        while True:
            line_no = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                rows.append(_Parsed(line_no, error=f"malformed CSV: {e}"))
                continue
            if not any(f.strip() for f in fields):
                continue
            raw = ",".join(fields)
            if _SURROGATE.search(raw):
                bad = next(i for i, f in enumerate(fields) if _SURROGATE.search(f))
                rows.append(_Parsed(line_no, error=f"invalid UTF-8 in column {header[bad] if bad < len(header) else bad!r} "
                                                   f"(CSV line {line_no}); expected UTF-8 text", raw=raw))
                continue
            if len(raw) > max_line_chars:
                rows.append(_Parsed(line_no, error=f"record too long: row has {len(raw)} chars (> {max_line_chars})",
                                    raw=raw))
                continue
            if len(fields) != len(header):
                span = (f" (the row runs from line {line_no} to {reader.line_num}: an unclosed quote swallows the "
                        "lines after it)" if reader.line_num > line_no else "")
                rows.append(_Parsed(line_no, error=f"malformed CSV: expected {len(header)} fields, got {len(fields)}"
                                                   + span, raw=raw))
                continue
            rows.append(_Parsed(line_no, obj=dict(zip(header, fields)), raw=raw))
    finally:
        csv.field_size_limit(old_limit)
    if not rows:
        raise IngestError(f"{path}: CSV has a header but no rows")
    return rows


def _read_parquet(path: Path, data: bytes) -> list[_Parsed]:
    try:
        df = pd.read_parquet(io.BytesIO(data))
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise IngestError(f"{path}: not a readable Parquet file ({e})") from None
    if not len(df):
        raise IngestError(f"{path}: Parquet file has no rows")
    recs = [_plain(r) for r in df.to_dict(orient="records")]
    return [_Parsed(i, obj=o, raw=_raw_of(o)) for i, o in enumerate(recs, start=1)]


def _read_saved_dataset(path: Path, *, split: str) -> list[_Parsed]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise IngestError(f"{path}: not a readable `datasets.save_to_disk` folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise IngestError(f"{path}: DatasetDict has no split {split!r} (has {sorted(ds)}); set `hub_split`")
        ds = ds[split]
    if len(ds) == 0:
        raise IngestError(f"{path}: saved dataset has no rows")
    return [_Parsed(i, obj=_plain(o), raw=_raw_of(o)) for i, o in enumerate(ds, start=1)]


def _read_hub(src: SourceConfig) -> list[_Parsed]:
    """Load a hub dataset with ``datasets.load_dataset`` (needs a reachable hub)."""
    import datasets

    try:
        ds = datasets.load_dataset(src.hub, split=src.hub_split)
    except Exception as e:
        raise IngestError(
            f"source {src.name!r}: cannot load hub dataset {src.hub!r} split {src.hub_split!r}: "
            f"{type(e).__name__}: {str(e)[:300]}. Without a reachable hub, download it elsewhere "
            f"(`datasets.load_dataset(...).save_to_disk(dir)`) and set `path` to that folder."
        ) from None
    return [_Parsed(i, obj=_plain(o), raw=_raw_of(o)) for i, o in enumerate(ds, start=1)]


def _plain(obj: Any) -> Any:
    """numpy arrays / scalars (from Parquet, Arrow) → plain Python, recursively."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _raw_of(obj: Any) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(obj)


# --------------------------------------------------------------------------- format detection
def detect_format(objs: list[Any]) -> str | None:
    """Guess the format from the keys of the first records (majority vote); None when unknown."""
    votes: dict[str, int] = {}
    for o in objs[:50]:
        f = _format_of(o)
        if f:
            votes[f] = votes.get(f, 0) + 1
    return max(votes, key=lambda k: votes[k]) if votes else None


def _format_of(o: Any) -> str | None:
    if not isinstance(o, dict):
        return None
    keys = set(o)
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if "instruction" in keys and "instances" in keys:
        return "self_instruct"
    if "instruction" in keys and "response" in keys:
        return "dolly"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys and isinstance(o["text"], str) and _HA_SPLIT.search(o["text"]):
        return "human_assistant"
    return None


_EXPECTED = (
    "alpaca {instruction, input?, output}; dolly {instruction, context?, response}; "
    "human_assistant {text: '### Human: … ### Assistant: …'}; messages {messages|conversations: [...]}; "
    "self_instruct {instruction, instances: [{input, output}]}"
)


# --------------------------------------------------------------------------- converters
def _req_str(o: dict, key: str, *, optional: bool = False) -> str:
    if key not in o or o[key] is None:
        if optional:
            return ""
        if key in o:
            raise RowError(f"field {key!r} is null (expected a string)")
        raise RowError(f"missing required field {key!r}")
    v = o[key]
    if not isinstance(v, str):
        raise RowError(f"field {key!r} must be a string, got {_type_name(v)}")
    return v


def _type_name(v: Any) -> str:
    # Python names for what users wrote (int, list, ...), with NaN/Infinity literals spelled out.
    if v is None:
        return "null"
    if isinstance(v, float) and not math.isfinite(v):
        return f"float {v!r} (a NaN/Infinity literal)"
    return "dict" if isinstance(v, dict) else type(v).__name__


def _user_content(instruction: str, extra: str) -> str:
    return f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()


def _conv_alpaca(o: dict) -> list[tuple[list[dict], str]]:
    instruction, inp, out = _req_str(o, "instruction"), _req_str(o, "input", optional=True), _req_str(o, "output")
    system = _req_str(o, "system", optional=True)
    msgs = ([{"role": "system", "content": system.strip()}] if system.strip() else [])
    msgs += [{"role": "user", "content": _user_content(instruction, inp)}, {"role": "assistant", "content": out.strip()}]
    return [(msgs, "")]


def _conv_dolly(o: dict) -> list[tuple[list[dict], str]]:
    instruction, ctx, resp = _req_str(o, "instruction"), _req_str(o, "context", optional=True), _req_str(o, "response")
    cat = o.get("category") if isinstance(o.get("category"), str) else ""
    return [([{"role": "user", "content": _user_content(instruction, ctx)},
              {"role": "assistant", "content": resp.strip()}], cat)]


def _conv_human_assistant(o: dict) -> list[tuple[list[dict], str]]:
    text = _req_str(o, "text")
    parts = _HA_SPLIT.split(text)
    if len(parts) < 3:
        raise RowError("no '### Human:' / '### Assistant:' markers in `text`")
    if parts[0].strip():
        raise RowError("text before the first '### Human:' marker")
    msgs = [{"role": "user" if who.lower() == "human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]
    return [(msgs, "")]


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{type: text, value|text: ...}]
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                val = part.get("value", part.get("text"))
                if not isinstance(val, str):
                    raise RowError(f"{where}: text part without a string `value`/`text`")
                out.append(val)
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowError(f"{where}: unsupported content part of type {kind!r} (only text is supported)")
        return "".join(out)
    raise RowError(f"{where}: content must be a string or a list of text parts, got {_type_name(content)}")


def _conv_messages(o: dict) -> list[tuple[list[dict], str]]:
    turns = o.get("messages", o.get("conversations"))
    if not isinstance(turns, list):
        raise RowError(f"`messages` must be a list of turns, got {_type_name(turns)}")
    msgs = []
    system = o.get("system")
    if isinstance(system, str) and system.strip():
        msgs.append({"role": "system", "content": system.strip()})
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError(f"turn {i}: expected an object, got {_type_name(t)}")
        role_raw = t.get("role", t.get("from"))
        if not isinstance(role_raw, str):
            raise RowError(f"turn {i}: missing `role`/`from`")
        role = _ROLE_ALIASES.get(role_raw.strip().lower())
        if role is None:
            raise RowError(f"turn {i}: unsupported role {role_raw!r} (expected user/assistant/system or human/gpt)")
        content = t["content"] if "content" in t else t.get("value")
        if content is None:
            raise RowError(f"turn {i}: missing `content`/`value`")
        msgs.append({"role": role, "content": _content_text(content, f"turn {i}").strip()})
    return [(msgs, "")]


def _conv_self_instruct(o: dict) -> list[Any]:
    instruction = _req_str(o, "instruction")
    inst = o.get("instances")
    if not isinstance(inst, list) or not inst:
        raise RowError("`instances` must be a non-empty list of {input, output}")
    out: list[Any] = []
    for i, x in enumerate(inst):
        if not isinstance(x, dict):
            raise RowError(f"instance {i}: expected an object, got {_type_name(x)}")
        try:
            inp, res = _req_str(x, "input", optional=True), _req_str(x, "output")
        except RowError as e:
            # One bad instance is quarantined alone; the task's other instances go on.
            out.append(e)
            continue
        out.append(([{"role": "user", "content": _user_content(instruction, inp)},
                     {"role": "assistant", "content": res.strip()}], ""))
    return out


# A converter returns one item per record the row yields: (messages, category) or a RowError.
CONVERTERS: dict[str, Callable[[dict], list[Any]]] = {
    "alpaca": _conv_alpaca,
    "dolly": _conv_dolly,
    "human_assistant": _conv_human_assistant,
    "messages": _conv_messages,
    "self_instruct": _conv_self_instruct,
}


def check_messages(msgs: list[dict], *, max_chars: int) -> None:
    """Raise RowError when a conversation is not trainable (blank turn, bad order, too long, bad UTF-8)."""
    roles = [m["role"] for m in msgs]
    body = [r for r in roles if r != "system"]
    if "system" in roles[1:]:
        raise RowError("a system turn is only allowed first")
    if not body or body[0] != "user":
        raise RowError("conversation must start with a user turn")
    if body[-1] != "assistant":
        raise RowError("conversation must end with an assistant turn")
    if any(a == b for a, b in zip(body, body[1:])):
        raise RowError("user and assistant turns must alternate")
    for m in msgs:
        if is_blank(m["content"]):
            what = "instruction" if m["role"] == "user" else ("response" if m["role"] == "assistant" else "system prompt")
            raise RowError(f"empty {what} (blank, whitespace-only or invisible-characters-only {m['role']} turn)")
        if _SURROGATE.search(m["content"]):
            raise RowError(f"invalid text in the {m['role']} turn: a lone UTF-16 surrogate (from invalid UTF-8 "
                           "or an unpaired \\ud800-\\udfff escape)")
    total = sum(len(m["content"]) for m in msgs)
    if total > max_chars:
        raise RowError(f"record too long: {total} chars > max_record_chars={max_chars}")


# --------------------------------------------------------------------------- one source
@dataclass
class _SourceOut:
    records: list[dict]
    quarantine: list[dict]
    formats: list[str]
    files: list[SourceFile]
    read: int


def _rename(obj: Any, columns: dict[str, str]) -> Any:
    if not columns or not isinstance(obj, dict):
        return obj
    return {columns.get(k, k): v for k, v in obj.items()}


# The keys a row of each format cannot do without (one of each tuple).
_REQUIRED_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "alpaca": (("instruction",), ("output",)),
    "dolly": (("instruction",), ("response",)),
    "human_assistant": (("text",),),
    "messages": (("messages", "conversations"),),
    "self_instruct": (("instruction",), ("instances",)),
}


def _check_columns(label: str, fmt: str, objs: list[Any], src: SourceConfig) -> None:
    """A table (CSV, Parquet, saved dataset) without a column the format needs is a file error,
    not thousands of identical quarantined rows."""
    cols = next((set(o) for o in objs if isinstance(o, dict)), None)
    if cols is None:
        return
    missing = [" or ".join(alts) for alts in _REQUIRED_KEYS[fmt] if not any(a in cols for a in alts)]
    if missing:
        raise IngestError(f"{label}: no column {', '.join(repr(m) for m in missing)} for format {fmt!r} "
                          f"(columns: {sorted(cols)[:20]}); expected {fmt} columns, or map yours with `columns:` "
                          f"in the source {src.name!r}")


def ingest_source(src: SourceConfig, cfg: IngestConfig) -> _SourceOut:
    """Read and convert one source (all its files); bad rows become quarantine rows.

    Accounting per file: every non-blank line/row becomes exactly one record or one quarantine
    row (a Self-Instruct task: one per instance), so ``read = kept + quarantined`` always holds.
    """
    if src.hub:
        paths: list[Path | None] = [None]
    else:
        paths = list(resolve_files(src))
    records: list[dict] = []
    quarantine: list[dict] = []
    formats: list[str] = []
    files: list[SourceFile] = []
    read = 0
    for path in paths:
        label = src.hub if path is None else str(path)
        fname = src.hub if path is None else path.name
        source = _SURROGATE.sub("\ufffd", f"{src.name}:{fname}")  # an undecodable file name still fits Parquet
        if path is None:
            rows, digest, tabular = _read_hub(src), "", True
        else:
            got = read_file(path, max_line_chars=cfg.max_record_chars * 4 + 1024, split=src.hub_split)
            rows, digest, tabular = got.rows, got.sha256, got.tabular
        objs = [_rename(r.obj, src.columns) for r in rows]
        parsed = [o for r, o in zip(rows, objs) if r.error is None]
        fmt = src.format
        if fmt == "auto" and parsed:
            fmt = detect_format(parsed)
            if fmt is None:
                keys = sorted({k for o in parsed[:50] if isinstance(o, dict) for k in o})[:20]
                kinds = sorted({_type_name(o) for o in parsed[:50] if not isinstance(o, dict)})
                got_what = f"keys {keys}" if keys else f"rows that are not objects: {kinds}"
                raise IngestError(f"{label}: unknown format ({got_what}); expected one of {_EXPECTED}. "
                                  f"Set `format:` or map columns with `columns:` in the source {src.name!r}.")
            _logger().info("source %s: %s detected as format %r", src.name, label, fmt)
        if fmt != "auto":
            formats.append(fmt)
            if tabular:
                _check_columns(label, fmt, parsed, src)
        # fmt stays "auto" only when no row parsed at all: every row is quarantined with its own error.
        convert = CONVERTERS.get(fmt)
        read_before = read
        for r, o in zip(rows, objs):
            # A row yields one record (several for self_instruct instances); each counts as read.
            try:
                if r.error is not None:
                    raise RowError(r.error)
                if not isinstance(o, dict):
                    raise RowError(f"expected a JSON object, got {_type_name(o)}")
                assert convert is not None
                items = convert(o)
                per_instance = fmt == "self_instruct"
            except RowError as e:
                items, per_instance = [e], False
            for k, item in enumerate(items):
                read += 1
                try:
                    if isinstance(item, RowError):
                        raise item
                    msgs, cat = item
                    check_messages(msgs, max_chars=cfg.max_record_chars)
                except RowError as e:
                    reason = f"instance {k}: {e}" if per_instance else str(e)
                    quarantine.append(_qrow(stage="ingest", source=source, file=label, row=r.row,
                                            reason=reason, raw=r.raw))
                    continue
                category = _SURROGATE.sub("\ufffd", cat or src.category or "")  # Parquet needs valid UTF-8
                records.append(make_record(msgs, source=source, category=category, source_row=r.row))
        if read == read_before:
            raise IngestError(f"{label}: no records (only blank lines); expected {fname.rsplit('.', 1)[-1].upper()} records")
        files.append(SourceFile(source=src.name, path=label, sha256=digest, rows=read - read_before))
    return _SourceOut(records=records, quarantine=quarantine, formats=formats, files=files, read=read)


def _qrow(*, stage: str, source: str, file: str, row: int, reason: str, raw: str, source_row: int | None = None) -> dict:
    """One quarantine row. ``source``/``source_row``: where the row came from in its source file;
    ``file``/``row``: where this stage read it (the same file and row at ingestion)."""
    # Surrogates (from invalid UTF-8) cannot be written to Parquet; show them as U+FFFD.
    preview = _SURROGATE.sub("\ufffd", raw[:RAW_PREVIEW_CHARS])
    return {"stage": stage, "source": source, "source_row": int(row if source_row is None else source_row),
            "file": file, "row": int(row), "reason": reason, "raw": preview}


def quarantine_frame(rows: list[dict]) -> pd.DataFrame:
    """The quarantine rows as a DataFrame with the shared quarantine columns (also when empty)."""
    df = pd.DataFrame(rows, columns=list(QUARANTINE_COLUMNS))
    return df.astype({"stage": str, "source": str, "source_row": "int64", "file": str, "row": "int64",
                      "reason": str, "raw": str})


# --------------------------------------------------------------------------- mixing
def mixture_counts(available: list[int], weights: list[float | None]) -> list[int]:
    """How many rows to take from each source.

    No weights: every row (caps were applied before). Weights: the largest mixture whose
    per-source shares equal ``w_i / sum(w)`` without repeating rows (so the scarcest source,
    relative to its weight, is taken whole and the others are downsampled).
    """
    if all(w is None for w in weights):
        return list(available)
    total_w = sum(weights)  # type: ignore[arg-type]
    shares = [w / total_w for w in weights]  # type: ignore[operator]
    size = min(a / s for a, s in zip(available, shares))
    return [min(a, int(math.floor(s * size + 1e-9))) for a, s in zip(available, shares)]


# --------------------------------------------------------------------------- the stage
def ingest(*, sources: list[SourceConfig], cfg: IngestConfig, out_dir: Path) -> IngestResult:
    """Ingest every source into ``out_dir/dataset.parquet`` (+ ``quarantine.parquet``, ``report.json``).

    Args:
        sources: the pipeline's sources (read in order).
        cfg: limits (``max_quarantine_fraction``, ``max_record_chars``, ``mixture_seed``).
        out_dir: the stage folder.

    Returns:
        IngestResult with both dataset refs and per-source counts.

    Raises:
        IngestError: a file/source cannot be read at all, the weights are inconsistent, or a
            source's quarantined fraction exceeds ``max_quarantine_fraction`` (the quarantine
            file is written first so the bad rows can be inspected).
    """
    if not sources:
        raise IngestError("no sources given (pipelines.<name>.sources is empty)")
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        missing = [s.name for s in sources if s.weight is None]
        raise IngestError(f"sources {missing}: give every source a `weight`, or none (weights are relative shares)")
    out_dir = Path(out_dir)
    outs = [ingest_source(s, cfg) for s in sources]

    # Caps first (seeded, so a capped source is a random, reproducible subset, not its first rows).
    rng = np.random.default_rng(cfg.mixture_seed)
    pools: list[list[dict]] = []
    for s, o in zip(sources, outs):
        recs = o.records
        if s.max_rows is not None and len(recs) > s.max_rows:
            idx = np.sort(rng.choice(len(recs), size=s.max_rows, replace=False))
            recs = [recs[i] for i in idx]
        pools.append(recs)
    take = mixture_counts([len(p) for p in pools], [s.weight for s in sources])
    mixed: list[dict] = []
    counts: list[SourceCounts] = []
    for s, o, pool, n in zip(sources, outs, pools, take):
        if n < len(pool):
            idx = np.sort(rng.choice(len(pool), size=n, replace=False))
            pool = [pool[i] for i in idx]
        mixed.extend(pool)
        counts.append(SourceCounts(
            source=s.name, formats=",".join(sorted(set(o.formats))), files=len(o.files), read=o.read,
            kept=len(o.records), quarantined=len(o.quarantine), mixed=len(pool),
            not_sampled=len(o.records) - len(pool),
        ))

    q_rows = [q for o in outs for q in o.quarantine]
    quarantine = write_parquet(quarantine_frame(q_rows), out_dir / "quarantine.parquet", name="ingest_quarantine")
    dataset = write_parquet(records_to_frame(mixed), out_dir / "dataset.parquet", name="ingested")
    result = IngestResult(dataset=dataset, quarantine=quarantine, counts=tuple(counts),
                          files=tuple(f for o in outs for f in o.files))
    for c in counts:
        _logger().info("source %s (%s): read %d = kept %d + quarantined %d; mixed %d (%.1f%%)", c.source, c.formats,
                       c.read, c.kept, c.quarantined, c.mixed, 100 * result.mixture()[c.source])
    (out_dir / "report.json").write_text(json.dumps(report(result), indent=2, sort_keys=True))

    too_bad = [c for c in counts if c.read and c.quarantined / c.read > cfg.max_quarantine_fraction]
    if too_bad:
        lines = [f"{c.source}: {c.quarantined}/{c.read} rows quarantined ({c.quarantined / c.read:.1%})" for c in too_bad]
        reasons = {k: int(v) for k, v in pd.Series([q["reason"] for q in q_rows]).value_counts().head(5).items()}
        bad_names = {c.source for c in too_bad}
        first = [f"{q['file']} row {q['row']}: {q['reason']}" for q in q_rows
                 if q["source"].split(":", 1)[0] in bad_names][:3]
        raise IngestError(
            f"too many bad rows (ingest.max_quarantine_fraction={cfg.max_quarantine_fraction}): " + "; ".join(lines)
            + f". Top reasons: {reasons}. First bad rows: " + "; ".join(first)
            + f". Bad rows are in {quarantine.path}"
        )
    return result


def report(result: IngestResult) -> dict[str, Any]:
    """JSON-able summary: per-source accounting and the realised mixture."""
    mix = result.mixture()
    return {
        "dataset": result.dataset.to_dict(),
        "quarantine": result.quarantine.to_dict(),
        "sources": [{**c.__dict__, "share": round(mix[c.source], 6)} for c in result.counts],
        "files": [f.__dict__ for f in result.files],
        "totals": {k: sum(getattr(c, k) for c in result.counts)
                   for k in ("read", "kept", "quarantined", "mixed", "not_sampled")},
    }


@task(name="ingest", cache_policy=stage_cache_policy(), persist_result=True, **IO_RETRIES,
      retry_condition_fn=retry_unless(IngestError))
def ingest_task(sources: list[SourceConfig], cfg: IngestConfig, *, ctx: StageContext) -> IngestResult:
    """Prefect task: run ``ingest`` in its own nested MLflow run and publish the accounting."""
    import mlflow

    with stage_run(ctx, "ingest"):
        out_dir = ctx.stage_dir("ingest")
        mlflow.log_params({f"source.{s.name}": s.path or s.hub for s in sources})
        try:
            result = ingest(sources=sources, cfg=cfg, out_dir=out_dir)
        except IngestError:
            # The failed stage run still carries the bad rows and the accounting, for the post-mortem.
            for name in ("quarantine.parquet", "report.json"):
                if (out_dir / name).exists():
                    mlflow.log_artifact(str(out_dir / name), "ingest")
            raise
        for c in result.counts:
            for k in ("read", "kept", "quarantined", "mixed", "not_sampled"):
                mlflow.log_metric(f"{c.source}.{k}", getattr(c, k))
        rep = report(result)
        for k, v in rep["totals"].items():
            mlflow.log_metric(f"rows_{k}", v)
        df = result.dataset.read()
        log_dataset(result.dataset, context="ingest.output", df=df)
        if result.quarantine.num_rows:
            log_dataset(result.quarantine, context="ingest.quarantine")
        # Each source file as its own input, with the sha256 of the bytes this run parsed as digest.
        for f in result.files:
            if f.sha256:
                _log_source_file(f)
        log_json(rep, "ingest/report.json")
        mlflow.log_artifact(result.quarantine.path, "ingest")
        rows = [{**{k: v for k, v in c.__dict__.items()}, "share": f"{result.mixture()[c.source]:.1%}"} for c in result.counts]
        table_artifact("ingest-accounting", rows, description="rows read = kept + quarantined; kept = mixed + not_sampled")
        markdown_artifact("ingest-summary", _markdown(result), description="ingestion summary")
        ctx.layout.mark_done("ingest")
        return result


def _log_source_file(f: SourceFile) -> None:
    """Log one raw source file as an MLflow input; its digest is the sha256 of the bytes ingestion parsed."""
    import mlflow

    path = Path(f.path)
    ds = mlflow.data.from_pandas(pd.DataFrame({"file": [f.path]}), source=f.path, name=f"{f.source}:{path.name}",
                                 digest=f.sha256[:36])
    mlflow.log_input(ds, context="ingest.source", tags={"sftflow.sha256": f.sha256, "sftflow.rows": str(f.rows)})


def _markdown(result: IngestResult) -> str:
    lines = ["# Ingestion", "", "| source | formats | read | kept | quarantined | mixed | share |", "|---|---|---|---|---|---|---|"]
    mix = result.mixture()
    for c in result.counts:
        lines.append(f"| {c.source} | {c.formats} | {c.read} | {c.kept} | {c.quarantined} | {c.mixed} | {mix[c.source]:.1%} |")
    lines += ["", f"Dataset: `{result.dataset.path}` ({result.dataset.num_rows} rows, sha256 `{result.dataset.sha256[:12]}`)",
              f"Quarantine: `{result.quarantine.path}` ({result.quarantine.num_rows} rows)"]
    return "\n".join(lines)

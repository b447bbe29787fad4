"""Reading instruction files: bytes -> raw rows (parsed objects or per-row errors), hashed once.

The container layer under ``sftflow.data.formats``: it knows JSON, JSONL, CSV, Parquet and
``datasets`` folders, and nothing of what a record means. A bad *row* (malformed JSON line,
invalid UTF-8, duplicate keys, absurd nesting, an over-long line) comes back as a ``RawRow`` with an
``error``; a bad *file* (unreadable, empty, not JSON as a whole, not UTF-8) raises ``IngestError``
naming the file, the position and what was expected.

Reading rules: each file is read once; the sha256 of those bytes is what lineage logs. A
byte-order mark (UTF-8/16/32) is honoured and dropped. JSONL lines end at ``\n`` only (a trailing
``\r`` is dropped; U+2028, U+0085, form feeds... are text), blank lines are separators, and ``row``
is the line number. In a JSON list or a Parquet file ``row`` is the 1-based record index; in a CSV
file the line where the row starts.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from sftflow.data.records import has_lone_surrogate
from sftflow.errors import DataError

FILE_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".ndjson", ".csv", ".parquet")


class IngestError(DataError):
    """A whole file or source cannot be read as records; the message names it and says what was expected."""


@dataclass
class RawRow:
    """One raw row of a file: either an object or a parse error, with its position and text."""

    row: int
    obj: Any = None
    error: str | None = None
    raw: str = ""


@dataclass
class FileRows:
    """Every raw row of one file, the sha256 of the bytes they were parsed from, and the container kind."""

    rows: list[RawRow]
    sha256: str
    tabular: bool  # every row has the same keys (CSV, Parquet, saved dataset): a missing column is a file error


# JSON nesting deeper than this is not a record; the check is iterative so it can never recurse.
MAX_JSON_DEPTH = 100
_JSON_BLANK = " \t\r"  # JSON's own whitespace (besides \n, the line separator)


def is_saved_dataset(p: Path) -> bool:
    """True for a folder written by ``datasets.save_to_disk`` (a Dataset or a DatasetDict)."""
    return p.is_dir() and any((p / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_file(path: Path, *, max_line_chars: int, split: str = "train",
              is_record: Callable[[Any], bool] = lambda obj: False) -> FileRows:
    """Read one file ONCE, hash the bytes read and parse those same bytes.

    The digest is what lineage records, so it must describe the data that was parsed, not a
    second read of a file that may have changed in between.

    Args:
        path: a .json/.jsonl/.ndjson/.csv/.parquet file, or a ``datasets.save_to_disk`` folder.
        max_line_chars: longer JSONL lines / CSV rows are quarantined unparsed.
        split: the split to read from a saved ``DatasetDict``.
        is_record: tells a single record from a container when a .json file holds one object
            (the formats layer knows what a record looks like; this one does not).

    Returns:
        The parsed rows, the sha256 (a folder: ``sha256_dir`` just before loading it) and whether
        the container is a table (all rows share the same columns).

    Raises:
        IngestError: the file is empty, unreadable, not of a known container, or not parseable as a whole.
    """
    if path.is_dir():
        from sftflow.data.refs import sha256_dir

        digest = sha256_dir(path)
        return FileRows(_read_saved_dataset(path, split=split), digest, tabular=True)
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
        return FileRows(_read_parquet(path, data), digest, tabular=True)
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
        return FileRows(_read_csv(path, body, max_line_chars=max_line_chars), digest, tabular=True)
    if suffix in (".jsonl", ".ndjson"):
        return FileRows(_read_jsonl(path, body, max_line_chars=max_line_chars), digest, tabular=False)
    return FileRows(_read_json(path, body, max_line_chars=max_line_chars, is_record=is_record), digest, tabular=False)


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


def _read_jsonl(path: Path, data: bytes, *, max_line_chars: int) -> list[RawRow]:
    """One JSON object per line. Lines end at b"\\n" only (a trailing "\\r" is dropped): U+2028,
    U+0085, form feeds and the like are ordinary characters inside a JSON string, never line breaks.
    Each line is decoded on its own, so invalid UTF-8 quarantines that line, not the file."""
    rows: list[RawRow] = []
    offset = 0
    for i, raw_line in enumerate(data.split(b"\n"), start=1):
        start, offset = offset, offset + len(raw_line) + 1
        if raw_line.endswith(b"\r"):
            raw_line = raw_line[:-1]
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append(RawRow(i, error=f"invalid UTF-8 at byte {start + e.start} of the file (line {i}, byte "
                                         f"{e.start + 1} of the line); expected UTF-8 text",
                                raw=raw_line.decode("utf-8", "replace")))
            continue
        if not line.strip(_JSON_BLANK):
            continue  # blank lines are separators, not records
        if len(line) > max_line_chars:
            rows.append(RawRow(i, error=f"record too long: line has {len(line)} chars (> {max_line_chars})", raw=line))
            continue
        obj, err = _parse_line(line)
        rows.append(RawRow(i, obj=obj, error=err, raw=line))
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


def _read_json(path: Path, data: bytes, *, max_line_chars: int, is_record: Callable[[Any], bool]) -> list[RawRow]:
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
        elif is_record(doc):
            doc = [doc]  # a single record
        elif doc and all(isinstance(v, dict) for v in doc.values()):
            doc = list(doc.values())  # {key: record} layout
        else:
            raise IngestError(f"{path}: expected a JSON list of records, got an object with keys {sorted(doc)[:8]}")
    if not isinstance(doc, list):
        raise IngestError(f"{path}: expected a JSON list of records, got {type_name(doc)}")
    if not doc:
        raise IngestError(f"{path}: the JSON list is empty (expected records)")
    rows = []
    for i, o in enumerate(doc, start=1):
        problem = _json_problem(o)
        rows.append(RawRow(i, obj=None if problem else o, error=problem, raw=raw_text(o)))
    return rows


def _check_utf8(path: Path, data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: {_utf8_error(data, e)}; expected UTF-8 text") from None


def _read_csv(path: Path, data: bytes, *, max_line_chars: int) -> list[RawRow]:
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
        rows: list[RawRow] = []
        while True:
            line_no = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                rows.append(RawRow(line_no, error=f"malformed CSV: {e}"))
                continue
            if not any(f.strip() for f in fields):
                continue
            raw = ",".join(fields)
            if has_lone_surrogate(raw):
                bad = next(i for i, f in enumerate(fields) if has_lone_surrogate(f))
                rows.append(RawRow(line_no, error=f"invalid UTF-8 in column {header[bad] if bad < len(header) else bad!r} "
                                                   f"(CSV line {line_no}); expected UTF-8 text", raw=raw))
                continue
            if len(raw) > max_line_chars:
                rows.append(RawRow(line_no, error=f"record too long: row has {len(raw)} chars (> {max_line_chars})",
                                    raw=raw))
                continue
            if len(fields) != len(header):
                span = (f" (the row runs from line {line_no} to {reader.line_num}: an unclosed quote swallows the "
                        "lines after it)" if reader.line_num > line_no else "")
                rows.append(RawRow(line_no, error=f"malformed CSV: expected {len(header)} fields, got {len(fields)}"
                                                   + span, raw=raw))
                continue
            rows.append(RawRow(line_no, obj=dict(zip(header, fields)), raw=raw))
    finally:
        csv.field_size_limit(old_limit)
    if not rows:
        raise IngestError(f"{path}: CSV has a header but no rows")
    return rows


def _read_parquet(path: Path, data: bytes) -> list[RawRow]:
    try:
        df = pd.read_parquet(io.BytesIO(data))
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise IngestError(f"{path}: not a readable Parquet file ({e})") from None
    if not len(df):
        raise IngestError(f"{path}: Parquet file has no rows")
    recs = [plain(r) for r in df.to_dict(orient="records")]
    return [RawRow(i, obj=o, raw=raw_text(o)) for i, o in enumerate(recs, start=1)]


def _read_saved_dataset(path: Path, *, split: str) -> list[RawRow]:
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
    return [RawRow(i, obj=plain(o), raw=raw_text(o)) for i, o in enumerate(ds, start=1)]


def read_hub(hub: str, *, split: str, what: str) -> list[RawRow]:
    """Load a hub dataset with ``datasets.load_dataset`` (needs a reachable hub).

    Args:
        hub: the dataset id.
        split: the split to load.
        what: how the error names the config entry, e.g. ``source 'dolly'``.
    """
    import datasets

    try:
        ds = datasets.load_dataset(hub, split=split)
    except Exception as e:
        raise IngestError(
            f"{what}: cannot load hub dataset {hub!r} split {split!r}: "
            f"{type(e).__name__}: {str(e)[:300]}. Without a reachable hub, download it elsewhere "
            f"(`datasets.load_dataset(...).save_to_disk(dir)`) and set `path` to that folder."
        ) from None
    return [RawRow(i, obj=plain(o), raw=raw_text(o)) for i, o in enumerate(ds, start=1)]


def plain(obj: Any) -> Any:
    """numpy arrays / scalars (from Parquet, Arrow) → plain Python, recursively."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def raw_text(obj: Any) -> str:
    """A parsed row as JSON text (what a quarantine row shows when no source line exists)."""
    try:
        return json.dumps(obj, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(obj)



def type_name(v: Any) -> str:
    """Python's name for a JSON value's type (``int``, ``list``, ``null``...), NaN/Infinity spelled out."""
    if v is None:
        return "null"
    if isinstance(v, float) and not math.isfinite(v):
        return f"float {v!r} (a NaN/Infinity literal)"
    return "dict" if isinstance(v, dict) else type(v).__name__

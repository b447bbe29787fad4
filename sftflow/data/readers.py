"""Reading instruction files: bytes -> raw rows (parsed objects or per-row errors), hashed once.

The container layer under ``sftflow.data.formats``: it knows JSON, JSONL, CSV, Parquet and
``datasets`` folders, and nothing of what a record means. A bad *row* (malformed JSON line,
invalid UTF-8, duplicate keys, absurd nesting, an over-long line) comes back as a ``RawRow`` with an
``error``; a bad *file* (unreadable, empty, not JSON as a whole, not UTF-8) raises ``IngestError``
naming the file, the position and what was expected.

Reading rules: each file is read once; the sha256 of those bytes is what lineage logs. A
byte-order mark (UTF-8/16/32) is honoured and dropped; UTF-16/32 without one (LE or BE) is
recognised by its NUL-byte pattern and decoded (``FileRows.encoding`` says which). Anything else
must be UTF-8: an undecodable byte quarantines the JSONL line, CSV row or JSON-list record that
holds it (its byte offset named, with a Latin-1/Windows-1252 hint), never the other rows. JSONL lines end at ``\n`` only (a trailing
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
import re
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
    encoding: str = "utf-8"  # the text encoding decoded ("utf-16-le (no BOM)"...; "" for Parquet/datasets)


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
        The parsed rows, the sha256 (a folder: ``dir_sha256`` just before loading it) and whether
        the container is a table (all rows share the same columns).

    Raises:
        IngestError: the file is empty, unreadable, not of a known container, or not parseable as a whole.
    """
    if path.is_dir():
        from sftflow.digests import dir_sha256

        digest = dir_sha256(path)
        return FileRows(_read_saved_dataset(path, split=split), digest, tabular=True, encoding="")
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
        return FileRows(_read_parquet(path, data), digest, tabular=True, encoding="")
    body, encoding = _strip_bom(path, data)
    how = encoding if encoding == "utf-8" else f"{encoding} (byte-order mark)"
    if encoding == "utf-8" and not data.startswith(codecs.BOM_UTF8):
        sniffed = sniff_utf16_32(body, partial=True)  # partial: a file cut mid-character is still recognised
        if sniffed:
            encoding, how = sniffed, f"{sniffed} (no byte-order mark)"
    kind = suffix.lstrip(".").upper()
    if encoding != "utf-8":
        try:
            # UTF-16/32: re-encode, then one code path. A file cut mid-character keeps its whole
            # characters (its last row then reads as truncated) rather than failing as a whole.
            dec = codecs.getincrementaldecoder(encoding)()
            body = dec.decode(body, final=False).encode("utf-8")
        except UnicodeDecodeError as e:
            said = ("its byte-order mark announces" if "mark)" in how and "no byte" not in how
                    else "its NUL-byte pattern suggests")
            raise IngestError(f"{path}: invalid {encoding.upper()} at byte {e.start}; expected text in the "
                              f"encoding {said} ({encoding.upper()}), or UTF-8") from None
    if not body.strip(b" \t\r\n"):
        raise IngestError(f"{path}: file is empty (expected {kind} records)"
                          + (" (only blank lines)" if body else ""))
    try:
        if suffix == ".csv":
            return FileRows(_read_csv(path, body, max_line_chars=max_line_chars), digest, tabular=True, encoding=how)
        if suffix in (".jsonl", ".ndjson"):
            return FileRows(_read_jsonl(path, body, max_line_chars=max_line_chars), digest, tabular=False,
                            encoding=how)
        return FileRows(_read_json(path, body, max_line_chars=max_line_chars, is_record=is_record), digest,
                        tabular=False, encoding=how)
    except IngestError as e:
        if encoding == "utf-8":
            raise
        # Positions in the message count characters of the decoded text; say which decoding that was.
        raise IngestError(f"{e} (the file was decoded as {encoding.upper()}{how[len(encoding):]})") from None


def _strip_bom(path: Path, data: bytes) -> tuple[bytes, str]:
    """Remove a byte-order mark; return the bytes and the encoding it announces (UTF-8 without one)."""
    for bom, enc in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
                     (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            return data[len(bom):], enc
    return data, "utf-8"


def sniff_utf16_32(data: bytes, *, partial: bool = False) -> str | None:
    """The UTF-16/32 codec (``utf-16-le``...) a BOM-less file is in, judged by where its NUL bytes fall; else None.

    JSON, JSONL and CSV are mostly ASCII (keys, punctuation, digits), so in UTF-16-LE nearly every
    second byte is NUL and in UTF-32-LE three of four; UTF-8 text has no NUL byte at all (a NUL is
    U+0000, which JSON must escape). The guess is confirmed by decoding ``data`` with it (``partial``:
    ``data`` is the head of a longer file, so it may end mid-character).
    """
    sample = data[:8192]
    if b"\x00" not in sample:
        return None
    n4 = len(sample) // 4 * 4
    q = n4 // 4
    if q:
        zeros = [sum(1 for k in range(j, n4, 4) if sample[k] == 0) for j in range(4)]
        if zeros[3] == q and zeros[2] >= 0.9 * q and zeros[0] < q:
            guess: str | None = "utf-32-le"
        elif zeros[0] == q and zeros[1] >= 0.9 * q and zeros[3] < q:
            guess = "utf-32-be"
        else:
            guess = None
        if guess and _decodes(data, guess, partial=partial):
            return guess
    n2 = len(sample) // 2 * 2
    h = n2 // 2
    even = sum(1 for k in range(0, n2, 2) if sample[k] == 0)
    odd = sum(1 for k in range(1, n2, 2) if sample[k] == 0)
    for guess, many, few in (("utf-16-le", odd, even), ("utf-16-be", even, odd)):
        if h and many >= 0.1 * h and few * 4 <= many and _decodes(data, guess, partial=partial):
            return guess
    return None


def _decodes(data: bytes, codec: str, *, partial: bool = False) -> bool:
    """True when ``data`` is valid ``codec`` text (``partial``: a prefix of it, cut anywhere)."""
    if not partial and len(data) % (4 if "32" in codec else 2):
        return False
    try:
        codecs.getincrementaldecoder(codec)().decode(data, final=not partial)
    except UnicodeDecodeError:
        return False
    return True


def text_encoding(path: Path, *, sample_bytes: int = 1 << 16) -> str:
    """The codec to open a plain text file with: ``utf-8-sig``, ``utf-16``/``utf-32`` (a BOM), a BOM-less
    UTF-16/32 codec recognised by ``sniff_utf16_32`` on the first ``sample_bytes``, else ``utf-8``."""
    with open(path, "rb") as f:
        head = f.read(sample_bytes)
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return sniff_utf16_32(head, partial=len(head) == sample_bytes) or "utf-8"


def _latin1_hint(byte: int) -> str:
    """A hint naming what an undecodable byte would be in Windows-1252/Latin-1 (the usual non-UTF-8 text)."""
    if byte < 0x80 or byte in (0xFE, 0xFF):  # 0xFE/0xFF: UTF-16 byte-order-mark bytes, rarely Latin-1 text
        return ""
    try:
        ch = bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        ch = bytes([byte]).decode("latin-1")
    if not ch.isprintable():
        return ""
    return (f" (byte 0x{byte:02x} is {ch!r} in Windows-1252/Latin-1: if the file is in that encoding, "
            "re-encode it as UTF-8, e.g. iconv -f cp1252 -t utf-8)")


def utf8_error_at(data: bytes, offset: int) -> str:
    """'invalid UTF-8 at byte N of the file (line L, byte C of the line); expected UTF-8 text[ (hint)]'."""
    line = data.count(b"\n", 0, offset) + 1
    col = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return (f"invalid UTF-8 at byte {offset} of the file (line {line}, byte {col} of the line); "
            f"expected UTF-8 text{_latin1_hint(data[offset])}")


def _utf8_error(data: bytes, e: UnicodeDecodeError) -> str:
    """``utf8_error_at`` for a decode error in ``data``."""
    return utf8_error_at(data, e.start)


def _bad_byte_offsets(text: str) -> list[tuple[int, int]]:
    """(char index, byte offset) of every undecodable byte in ``text`` (decoded with ``surrogateescape``).

    Valid UTF-8 never decodes to a surrogate, so each lone surrogate in such a text is one bad byte.
    """
    out: list[tuple[int, int]] = []
    byte, last = 0, 0
    for m in _ESCAPED_BYTE.finditer(text):
        byte += len(text[last:m.start()].encode("utf-8", "surrogateescape"))
        out.append((m.start(), byte))
        last = m.start()
    return out


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


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
    except json.JSONDecodeError as e:  # ("Unterminated string starting at" + " at column": one "at")
        return None, f"malformed JSON: {e.msg.removesuffix(' at')} at column {e.colno}"
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
            rows.append(RawRow(i, error=utf8_error_at(data, start + e.start),
                                raw=raw_line.decode("utf-8", "replace")))
            continue
        if not line.strip(_JSON_BLANK):
            continue  # blank lines are separators, not records
        if len(line) > max_line_chars:
            rows.append(RawRow(i, error=f"record too long: line has {len(line)} chars (> {max_line_chars})", raw=line))
            continue
        obj, err = _parse_line(line)
        if err and err.startswith("malformed JSON") and offset >= len(data) and not data.endswith(b"\n"):
            # The last line, cut off mid-record: say so (an interrupted download or copy).
            err += " (the last line has no line end: the file looks truncated)"
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
    bad_bytes = _bad_byte_offsets(text)
    spans = _list_spans(text) if bad_bytes and isinstance(doc, list) else None
    if spans is None:
        _check_utf8(path, data)  # undecodable bytes outside a top-level list's records: a file error
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
        if spans is not None:
            lo, hi = spans[i - 1]
            at = next((b for c, b in bad_bytes if lo <= c < hi), None)
            if at is not None:  # this record holds an undecodable byte; the others are fine
                problem = utf8_error_at(data, at)
        rows.append(RawRow(i, obj=None if problem else o, error=problem, raw=raw_text(o)))
    return rows


def _list_spans(text: str) -> list[tuple[int, int]] | None:
    """Char spans of the elements of the top-level JSON list in ``text`` (None when it is not one, or
    an undecodable byte sits outside every element): which record holds a bad byte."""
    dec = json.JSONDecoder(strict=False)
    ws = " \t\r\n"
    i = len(text) - len(text.lstrip(ws))
    if not text.startswith("[", i):
        return None
    i += 1
    spans: list[tuple[int, int]] = []
    while True:
        while i < len(text) and text[i] in ws:
            i += 1
        if text.startswith("]", i) and not spans:
            break
        try:
            _, end = dec.raw_decode(text, i)
        except ValueError:
            return None
        spans.append((i, end))
        i = end
        while i < len(text) and text[i] in ws:
            i += 1
        if text.startswith(",", i):
            i += 1
            continue
        if text.startswith("]", i):
            break
        return None
    inside = sum(1 for c in _ESCAPED_BYTE.finditer(text) if any(lo <= c.start() < hi for lo, hi in spans))
    return spans if inside == len(_ESCAPED_BYTE.findall(text)) else None


def _check_utf8(path: Path, data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: {_utf8_error(data, e)}") from None


def _read_csv(path: Path, data: bytes, *, max_line_chars: int) -> list[RawRow]:
    # Undecodable bytes become lone surrogates, so the affected rows (not the file) are quarantined.
    text = data.decode("utf-8", errors="surrogateescape")
    # (line, byte offset) of each undecodable byte, to name it in the row's reason.
    bad_at = [(text.count("\n", 0, c) + 1, b) for c, b in _bad_byte_offsets(text)]
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
                at = next((b for ln, b in bad_at if line_no <= ln <= reader.line_num), None)
                what = utf8_error_at(data, at) if at is not None else "invalid UTF-8; expected UTF-8 text"
                col = header[bad] if bad < len(header) else bad
                rows.append(RawRow(line_no, error=f"{what} (CSV line {line_no}, column {col!r})", raw=raw))
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

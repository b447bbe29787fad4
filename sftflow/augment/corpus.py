"""The unlabeled corpus of backtranslation: files -> documents -> segments (future responses).

Files come from ``augmentation.corpus.path`` through the one path resolver
(``sftflow.config.resolve_paths``: ``~``, recursive globs), the same one ingest, the config
checks and the cache keys use. JSON and JSONL files are read by the shared reader
(``sftflow.data.readers.read_file``: read once, BOMs, per-line errors naming the row). The corpus
formats (``augmentation.corpus.format``):

* ``wikipedia_leads``: one JSON object, title -> ``{"extract": text, ...}`` (or title -> text);
* ``jsonl_text``: one JSON object per line (or a JSON list of objects) with a text field
  (``augmentation.corpus.text_field``);
* ``text_lines``: one document per non-blank line of a text file.

``auto`` picks by the file's suffix (``corpus_format``). Documents are cut into segments of at most
``max_words`` words (``split_into_segments``); filtering them is ``sftflow.augment.filters``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sftflow.config import resolve_paths
from sftflow.config_sections import CorpusConfig
from sftflow.errors import DataError

# A corpus document longer than this (characters on one JSONL line) is an error naming its row.
MAX_DOCUMENT_CHARS = 10_000_000


@dataclass(frozen=True)
class Segment:
    """One unlabeled text segment: a future response."""

    id: str
    text: str
    source: str

    @property
    def num_words(self) -> int:
        return len(self.text.split())


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_PARAGRAPHS = re.compile(r"\n\s*\n|\n")


def corpus_format(path: Path) -> str:
    """The corpus format ``auto`` means for a file: ``wikipedia_leads`` for ``.json``,
    ``jsonl_text`` for ``.jsonl``/``.ndjson``, else ``text_lines``."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "wikipedia_leads"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl_text"
    return "text_lines"


def corpus_files(path: str) -> list[Path]:
    """The files ``augmentation.corpus.path`` names (a file or a glob).

    Raises:
        FileNotFoundError: no file there (naming the key and the path).
    """
    files = resolve_paths(path)
    missing = [str(p) for p in files if not p.is_file()]
    if not files or missing:
        raise FileNotFoundError(f"augmentation.corpus.path: file not found: {missing[0] if missing else path}")
    return files


def _rows(path: Path, *, whole_object: bool = False) -> Iterable[tuple[int, Any]]:
    """(row, parsed object) of a JSON/JSONL file through the shared reader; a bad row is an error
    naming the file and the row."""
    from sftflow.data.readers import read_file

    got = read_file(path, max_line_chars=MAX_DOCUMENT_CHARS, is_record=(lambda obj: True) if whole_object else
                    (lambda obj: False))
    for r in got.rows:
        if r.error is not None:
            what = f"not valid JSON ({r.error})" if r.error.startswith("malformed JSON") else r.error
            raise DataError(f"{path}:{r.row}: {what}")
        yield r.row, r.obj


def documents(path: Path, fmt: str, text_field: str) -> Iterable[tuple[str, str]]:
    """(document id, text) pairs of one corpus file, in file order.

    Raises:
        DataError: a malformed file or row (the message names the file and the row, and what was expected).
    """
    if fmt == "wikipedia_leads":
        if path.suffix.lower() != ".json":
            raise DataError(f"{path}: format wikipedia_leads expects a .json file (a JSON object title -> "
                            "{extract, ...})")
        # The whole file is one object: the reader hands it back as one row, keys (titles) kept.
        for _, data in _rows(path, whole_object=True):
            if not isinstance(data, dict):
                raise DataError(f"{path}: format wikipedia_leads expects a JSON object title -> {{extract, ...}}, "
                                f"got {type(data).__name__}")
            for title, entry in data.items():
                text = entry.get("extract") if isinstance(entry, dict) else entry if isinstance(entry, str) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}: entry {title!r} has no string `extract`")
                yield str(title), text
    elif fmt == "jsonl_text":
        for n, row in _rows(path):
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise DataError(f"{path}:{n}: no string field {text_field!r} (set augmentation.corpus.text_field)")
            yield f"{path.name}:{n}", row[text_field]
    elif fmt == "text_lines":
        from sftflow.data.readers import text_encoding

        enc = text_encoding(path)  # UTF-8, or UTF-16/32 with a BOM or recognised by its NUL bytes (issue 22)
        try:
            with path.open(encoding=enc) as f:
                for n, line in enumerate(f, start=1):
                    if line.strip():
                        yield f"{path.name}:{n}", line
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: invalid {enc.upper()} at byte {e.start}; expected UTF-8 text (format "
                            "text_lines)") from None
    else:
        raise DataError(f"augmentation.corpus.format: unknown format {fmt!r}")


def split_into_segments(text: str, *, max_words: int) -> list[str]:
    """Cut a document into segments of at most ``max_words`` words.

    Paragraphs are packed together while they fit; a paragraph that is too long on its own is cut
    at sentence ends (a single sentence longer than ``max_words`` stays whole and is later
    filtered as too long, rather than being cut mid-sentence).
    """
    units: list[str] = []
    for para in _PARAGRAPHS.split(text):
        para = " ".join(para.split())
        if not para:
            continue
        if len(para.split()) <= max_words:
            units.append(para)
        else:
            units.extend(s for s in _SENTENCE_END.split(para) if s.strip())
    segments: list[str] = []
    current: list[str] = []
    count = 0
    for unit in units:
        n = len(unit.split())
        if current and count + n > max_words:
            segments.append(" ".join(current))
            current, count = [], 0
        current.append(unit)
        count += n
    if current:
        segments.append(" ".join(current))
    return segments


def load_corpus(corpus: CorpusConfig, *, max_words: int) -> list[Segment]:
    """Every segment of the corpus, in file order.

    Raises:
        FileNotFoundError: the corpus path matches no file.
        DataError (a ValueError): a malformed file or row (the message names the file and row).
    """
    segments: list[Segment] = []
    for path in corpus_files(corpus.path):
        fmt = corpus_format(path) if corpus.format == "auto" else corpus.format
        source = f"{corpus.name}:{path.name}"
        for doc_id, text in documents(path, fmt, corpus.text_field):
            pieces = split_into_segments(text, max_words=max_words)
            for k, piece in enumerate(pieces):
                seg_id = doc_id if len(pieces) == 1 else f"{doc_id}#{k}"
                segments.append(Segment(id=seg_id, text=piece, source=source))
    return segments

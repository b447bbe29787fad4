"""Source formats: every converter from an instruction-data format to canonical messages, in one place.

Used by ingestion (``tasks/ingest.py``) and by evaluation's extra held-out sets, so a row means the
same conversation wherever it is read. One entry point, ``load_records(path, format=...)``, reads a
file (``sftflow.data.readers``), detects or applies its format, converts every row and checks that
the conversation is trainable; bad rows come back with a reason, never raise.

Formats (``format``; ``auto`` detects per file by a majority vote of the first 50 rows):

=================  ==========================================================================
alpaca             ``{instruction, input?, output, system?}`` (also AlpacaEval ``{instruction, output}``)
dolly              ``{instruction, context?, response, category?}``
human_assistant    ``{text: "### Human: … ### Assistant: …"}`` (several turns allowed)
messages           ``{messages|conversations: [{role|from, content|value}], tools?}``; content may be a
                   string or a list of parts ``[{type: text|reasoning|tool_call, value|text}]``
                   (ShareGPT / LLaMA-Factory; a ``tool_call`` part, JSON ``{name, arguments}``,
                   becomes the turn's canonical ``tool_calls``); a turn may carry ``loss_weight``
                   (0 or 1; see below); roles: user/assistant/system and the aliases in ``ROLE_ALIASES``
                   (human, gpt, ...). Alias: ``sharegpt``. Tool calling, both layouts:
                   ShareGPT (LLaMA-Factory) ``function_call`` turns (value: JSON ``{name, arguments}``
                   or a list of them) and ``observation`` turns, plus ``tools`` (a JSON string or
                   list of ``{name, description, parameters}``); OpenAI ``messages`` whose assistant
                   turns carry ``tool_calls: [{type: function, function: {name, arguments}}]``,
                   ``role: tool`` results, plus ``tools: [{type: function, function: {...}}]``.
self_instruct      ``{instruction, instances: [{input, output}]}`` → one record per instance
gsm8k              ``{question, answer: "<worked solution>\n#### <final>"}`` (the original GSM8K
                   jsonl) or the Alpaca-shaped copy ``{instruction, input, output}`` (no ``####``:
                   the final answer is the last number). The response is the worked reasoning
                   (calculator annotations ``<<48/2=24>>`` removed) ending ``#### <final>``; the
                   final answer goes to the record's ``answer``. ``auto`` detects only the
                   ``{question, answer}`` shape (an Alpaca-shaped file needs ``format: gsm8k``).
=================  ==========================================================================

Options (per source, ``SourceConfig``), applied by every converter:

* ``reasoning: keep|drop`` (default keep): a ``{type: reasoning}`` content part (or a turn's
  ``reasoning_content``) of an assistant turn is kept as chain-of-thought,
  ``<think>\n{reasoning}\n</think>\n\n{answer}``, or dropped. A turn that only calls tools
  keeps its reasoning as its content (``<think>…</think>``), its calls in ``tool_calls``.
* per-turn ``loss_weight`` (LLaMA-Factory v1): 0 on an assistant turn keeps it as context only
  (the canonical turn carries ``loss_weight: 0.0`` and training gives it no loss); 1 is the
  default. A weight other than 0/1, 1 on a non-assistant turn, or 0 on every assistant turn
  rejects the row with the turn named.
* a table (CSV, Parquet, saved dataset) cell holding a missing-value marker (``NaN``, ``nan``,
  ``NULL``, ``None``, ``N/A``... ``NULL_MARKERS``) in a text column rejects the row.
* ``preference: chosen``: a preference (DPO) row ``{…, chosen, rejected}`` (Alpaca or ShareGPT
  shape) trains on ``chosen``; without it such rows are rejected with a reason saying so.
  A KTO row (``label: true|false``) is kept when its label is true and rejected when false.

Where the parts live: this module is the entry point (formats, detection, ``CONVERTERS``, loading,
accounting); ``sftflow.data.format_rows`` holds ``RowError``, ``ConvertOptions`` and the flat formats'
converters; ``sftflow.data.format_messages`` the ``messages`` format (ShareGPT / LLaMA-Factory /
OpenAI turns, tool calls, ``ROLE_ALIASES``, loss weights) and ``check_messages``.

Keys a row carries that its format does not read are counted per key (``LoadedRecords.unknown_keys``;
turn-level keys as ``turn.<key>``), so ingestion reports what it ignored.

Example::

    got = load_records("data/eval/set.jsonl", format="auto")
    conversations = [r.messages for r in got.records]  # got.rejected: (row, reason, raw)
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sftflow.data.format_messages import check_messages, convert_messages
from sftflow.data.format_rows import (HUMAN_ASSISTANT_MARKER, ConvertOptions, RowError, convert_alpaca,
                                      convert_dolly, convert_gsm8k, convert_human_assistant, convert_self_instruct)
from sftflow.data.readers import IngestError, RawRow, read_file, type_name

FORMATS: tuple[str, ...] = ("alpaca", "dolly", "human_assistant", "messages", "self_instruct", "gsm8k")
# Other spellings of a format (evaluation's config accepts ``alpaca_eval``: AlpacaEval rows are alpaca rows;
# ``sharegpt``: ShareGPT/LLaMA-Factory conversations, tool calls included, are messages rows).
FORMAT_ALIASES: dict[str, str] = {"alpaca_eval": "alpaca", "sharegpt": "messages"}
# Values of CSV/Parquet cells that stand for a missing value (what pandas writes for NaN/None, and
# spreadsheet NULL markers): such a cell is no text to train on (pandas' default na_values, minus
# the empty string, which is blank anyway, and ``NA``, which is also an ordinary word).
NULL_MARKERS: frozenset[str] = frozenset(
    {"NaN", "nan", "-nan", "-NaN", "NULL", "null", "None", "N/A", "n/a", "#N/A", "#N/A N/A", "#NA", "<NA>", "NaT",
     "1.#QNAN", "-1.#QNAN", "1.#IND", "-1.#IND"})
# The keys each format reads from a row; any other key is counted as unknown (and reported).
KNOWN_KEYS: dict[str, frozenset[str]] = {
    "alpaca": frozenset({"instruction", "input", "output", "system", "chosen", "rejected", "label"}),
    "dolly": frozenset({"instruction", "context", "response", "category"}),
    "human_assistant": frozenset({"text"}),
    "messages": frozenset({"messages", "conversations", "system", "tools", "chosen", "rejected", "label"}),
    "self_instruct": frozenset({"instruction", "instances"}),
    "gsm8k": frozenset({"question", "answer", "instruction", "input", "output"}),
}
KNOWN_TURN_KEYS: frozenset[str] = frozenset(
    {"role", "from", "content", "value", "tool_calls", "tool_call_id", "name", "reasoning_content", "loss_weight"})


# --------------------------------------------------------------------------- detection
def detect_format(objs: list[Any]) -> str | None:
    """Guess the format from the keys of the first records (majority vote); None when unknown."""
    votes: dict[str, int] = {}
    for o in objs[:50]:
        f = format_of(o)
        if f:
            votes[f] = votes.get(f, 0) + 1
    return max(votes, key=lambda k: votes[k]) if votes else None


def format_of(o: Any) -> str | None:
    """The format one row's keys say it is in, or None (also: a .json file holding one object is one record)."""
    if not isinstance(o, dict):
        return None
    keys = set(o)
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if "question" in keys and "answer" in keys and isinstance(o["answer"], str) and "####" in o["answer"]:
        return "gsm8k"
    if "instruction" in keys and "instances" in keys:
        return "self_instruct"
    if "instruction" in keys and "response" in keys:
        return "dolly"
    if "instruction" in keys and ("output" in keys or "chosen" in keys):
        return "alpaca"
    if "text" in keys and isinstance(o["text"], str) and HUMAN_ASSISTANT_MARKER.search(o["text"]):
        return "human_assistant"
    return None


_EXPECTED = (
    "alpaca {instruction, input?, output}; dolly {instruction, context?, response}; "
    "human_assistant {text: '### Human: … ### Assistant: …'}; messages {messages|conversations: [...]}; "
    "self_instruct {instruction, instances: [{input, output}]}; gsm8k {question, answer: '… #### 72'}"
)


# A converter returns one item per record the row yields: (messages, category[, meta]) or a RowError;
# ``meta`` holds record metadata (``tools``, ``answer``).
CONVERTERS: dict[str, Callable[[dict, ConvertOptions], list[Any]]] = {
    "alpaca": convert_alpaca,
    "dolly": convert_dolly,
    "human_assistant": convert_human_assistant,
    "messages": convert_messages,
    "self_instruct": convert_self_instruct,
    "gsm8k": convert_gsm8k,
}


# --------------------------------------------------------------------------- loading
# The keys a row of each format cannot do without (one of each tuple).
_REQUIRED_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "alpaca": (("instruction",), ("output",)),
    "dolly": (("instruction",), ("response",)),
    "human_assistant": (("text",),),
    "messages": (("messages", "conversations"),),
    "self_instruct": (("instruction",), ("instances",)),
    "gsm8k": (("question", "instruction"), ("answer", "output")),
}


@dataclass(frozen=True)
class ConvertedRow:
    """One conversation a file yielded: where it was (``row``), its messages, its category ("" when none),
    its tool schemas (JSON, "" when none) and its final answer (verifiable tasks, "" when none)."""

    row: int
    messages: list[dict[str, str]]
    category: str = ""
    tools: str = ""
    answer: str = ""


@dataclass(frozen=True)
class RejectedRow:
    """One row (or Self-Instruct instance) that yields no conversation, with the reason and its raw text."""

    row: int
    reason: str
    raw: str


@dataclass(frozen=True)
class LoadedRecords:
    """What ``load_records`` / ``convert_rows`` made of one file.

    Attributes:
        path: the file (or hub id) read.
        format: the format applied (``auto`` only when no row parsed, so every row is rejected).
        detected: the format was detected (``format="auto"``), not given.
        sha256: sha256 of the bytes parsed ("" for a hub dataset).
        records: the converted rows, in file order.
        rejected: the rejected rows, in file order; ``read = len(records) + len(rejected)``.
        unknown_keys: ``(key, rows)`` for every key the rows carry that the format does not read
            (turn-level keys as ``turn.<key>``), sorted by key: what conversion ignored.
        encoding: how the file's text was decoded (``sftflow.data.readers.FileRows.encoding``).
    """

    path: str
    format: str
    detected: bool
    sha256: str
    records: tuple[ConvertedRow, ...]
    rejected: tuple[RejectedRow, ...]
    unknown_keys: tuple[tuple[str, int], ...] = ()
    encoding: str = "utf-8"  # the text encoding decoded (e.g. "utf-16-le (no byte-order mark)"); "" when binary

    @property
    def read(self) -> int:
        """Rows read (a Self-Instruct task counts one per instance): converted + rejected."""
        return len(self.records) + len(self.rejected)


def canonical_format(fmt: str) -> str:
    """``fmt`` with aliases resolved; raises ValueError naming the known formats for an unknown one."""
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS + tuple(FORMAT_ALIASES))}")
    return fmt


def convert_row(obj: Any, fmt: str, *, max_record_chars: int | None = None,
                options: ConvertOptions = ConvertOptions()) -> list[list[dict[str, str]] | RowError]:
    """One parsed row in ``fmt`` -> one item per conversation it yields: its messages, or the RowError why not.

    Self-Instruct yields one item per instance; every other format one item.
    """
    items: list[list[dict[str, str]] | RowError] = []
    for item in _convert(obj, canonical_format(fmt), options):
        if isinstance(item, RowError):
            items.append(item)
            continue
        try:
            check_messages(item[0], max_chars=max_record_chars)
            items.append(item[0])
        except RowError as e:
            items.append(e)
    return items


def _convert(obj: Any, fmt: str, options: ConvertOptions = ConvertOptions()) -> list[Any]:
    if not isinstance(obj, dict):
        raise RowError(f"expected a JSON object, got {type_name(obj)}")
    return CONVERTERS[fmt](obj, options)


def unknown_keys(obj: Any, fmt: str) -> set[str]:
    """The keys of one row that format ``fmt`` does not read (turn-level ones as ``turn.<key>``)."""
    if not isinstance(obj, dict) or fmt not in KNOWN_KEYS:
        return set()
    out = {str(k) for k in obj if k not in KNOWN_KEYS[fmt]}
    if fmt == "messages":
        turns = obj.get("messages", obj.get("conversations"))
        for t in turns if isinstance(turns, list) else ():
            if isinstance(t, dict):
                out.update(f"turn.{k}" for k in t if k not in KNOWN_TURN_KEYS)
    return out


def _rename(obj: Any, columns: dict[str, str] | None) -> Any:
    if not columns or not isinstance(obj, dict):
        return obj
    return {columns.get(k, k): v for k, v in obj.items()}


def _check_columns(label: str, fmt: str, objs: list[Any], in_where: str) -> None:
    """A table (CSV, Parquet, saved dataset) without a column the format needs is a file error,
    not thousands of identical rejected rows."""
    cols = next((set(o) for o in objs if isinstance(o, dict)), None)
    if cols is None:
        return
    missing = [" or ".join(alts) for alts in _REQUIRED_KEYS[fmt] if not any(a in cols for a in alts)]
    if missing:
        raise IngestError(f"{label}: no column {', '.join(repr(m) for m in missing)} for format {fmt!r} "
                          f"(columns: {sorted(cols)[:20]}); expected {fmt} columns, or map yours with `columns:`"
                          f"{in_where}")


def convert_rows(rows: Sequence[RawRow], *, label: str, format: str = "auto", tabular: bool = False,
                 columns: dict[str, str] | None = None, max_record_chars: int | None = None,
                 sha256: str = "", where: str = "", reasoning: str = "keep",
                 preference: str | None = None) -> LoadedRecords:
    """Convert the raw rows of one file (or hub dataset): detect the format, convert, check each conversation.

    Accounting: every row becomes exactly one converted or one rejected row (a Self-Instruct
    task: one per instance).

    Args:
        rows: the raw rows (``sftflow.data.readers``).
        label: the file path or hub id, for messages.
        format: ``auto`` or a format name (or alias).
        tabular: every row has the same columns (a missing column is then a file error).
        columns: renames applied to every row first (``{their_name: our_name}``).
        max_record_chars: longest conversation kept (all turns); None: no bound.
        sha256: digest of the bytes the rows were parsed from (carried into the result).
        where: the config entry to fix, for messages (e.g. ``the source 'dolly'``).
        reasoning: ``keep`` (reasoning parts become ``<think>…</think>`` before the answer) or ``drop``.
        preference: ``chosen`` trains preference (DPO) rows on their chosen response; None rejects them.

    Raises:
        IngestError: the format cannot be detected, a table lacks a needed column, or there are no rows.
    """
    in_where = f" in {where}" if where else ""
    objs = [_rename(r.obj, columns) for r in rows]
    parsed = [o for r, o in zip(rows, objs) if r.error is None]
    fmt = canonical_format(format)
    detected = False
    if fmt == "auto" and parsed:
        found = detect_format(parsed)
        if found is None:
            keys = sorted({k for o in parsed[:50] if isinstance(o, dict) for k in o})[:20]
            kinds = sorted({type_name(o) for o in parsed[:50] if not isinstance(o, dict)})
            got_what = f"keys {keys}" if keys else f"rows that are not objects: {kinds}"
            raise IngestError(f"{label}: unknown format ({got_what}); expected one of {_EXPECTED}. "
                              f"Set `format:` or map columns with `columns:`{in_where}.")
        fmt, detected = found, True
    if fmt != "auto" and tabular:
        _check_columns(label, fmt, parsed, in_where)
    # fmt stays "auto" only when no row parsed at all: every row is rejected with its own error.
    if reasoning not in ("keep", "drop"):
        raise ValueError(f"reasoning={reasoning!r}: expected 'keep' or 'drop'")
    options = ConvertOptions(reasoning=reasoning, preference=preference)
    records: list[ConvertedRow] = []
    rejected: list[RejectedRow] = []
    unknown: Counter[str] = Counter()
    for r, o in zip(rows, objs):
        if r.error is None:
            unknown.update(unknown_keys(o, fmt))
        try:
            if r.error is not None:
                raise RowError(r.error)
            if tabular:
                _check_null_cells(o, fmt)
            items, per_instance = _convert(o, fmt, options), fmt == "self_instruct"
        except RowError as e:
            items, per_instance = [e], False
        for k, item in enumerate(items):
            try:
                if isinstance(item, RowError):
                    raise item
                msgs, cat, *rest = item
                meta = rest[0] if rest else {}
                check_messages(msgs, max_chars=max_record_chars)
            except RowError as e:
                rejected.append(RejectedRow(r.row, f"instance {k}: {e}" if per_instance else str(e), r.raw))
                continue
            records.append(ConvertedRow(r.row, msgs, cat or "", tools=meta.get("tools", ""),
                                        answer=meta.get("answer", "")))
    if not records and not rejected:
        kind = Path(label).name.rsplit(".", 1)[-1].upper()
        raise IngestError(f"{label}: no records (only blank lines); expected {kind} records")
    return LoadedRecords(path=label, format=fmt, detected=detected, sha256=sha256,
                         records=tuple(records), rejected=tuple(rejected),
                         unknown_keys=tuple(sorted(unknown.items())))


def _check_null_cells(o: Any, fmt: str) -> None:
    """RowError when a text cell of a table row is a missing-value marker (``NaN``, ``NULL``, ``None``...).

    A CSV written by pandas spells a missing value ``nan``/``NaN``; spreadsheets write ``NULL`` or
    ``#N/A``. Read as text, such a row would train the model to answer "nan". Only the columns the
    format reads as text are checked (``category`` and ``label`` are metadata).
    """
    if not isinstance(o, dict):
        return
    for key in sorted(KNOWN_KEYS.get(fmt, ()) - {"category", "label"}):
        v = o.get(key)
        if isinstance(v, str) and v.strip() in NULL_MARKERS:
            raise RowError(f"column {key!r} holds {v.strip()!r}, a missing-value marker, not text (expected text; "
                           "fill the cell or drop the row)")


def line_limit(max_record_chars: int | None) -> int:
    """Longest raw line/row parsed at all: a record's bound with room for JSON syntax and escapes."""
    return sys.maxsize if max_record_chars is None else max_record_chars * 4 + 1024


def load_records(path: str | Path, *, format: str = "auto", columns: dict[str, str] | None = None,
                 max_record_chars: int | None = None, split: str = "train", where: str = "",
                 reasoning: str = "keep", preference: str | None = None) -> LoadedRecords:
    """Read one file and convert every row to canonical messages: the one entry point for instruction files.

    Args:
        path: a .json/.jsonl/.ndjson/.csv/.parquet file, or a ``datasets.save_to_disk`` folder.
        format: ``auto`` (detected from the rows' keys) or one of ``FORMATS`` (or ``FORMAT_ALIASES``).
        columns: renames applied to every row before conversion (``{their_name: our_name}``).
        max_record_chars: longest conversation kept (all turns); longer rows are rejected. None: no bound.
        split: the split to read from a saved ``DatasetDict``.
        where: the config entry to fix, for messages (e.g. ``evaluation.extra_sets[my_set]``).
        reasoning: ``keep`` or ``drop`` reasoning content parts (see the module docstring).
        preference: ``chosen`` to train preference rows on their chosen response (else rejected).

    Returns:
        LoadedRecords: converted rows, rejected rows (with reasons), the format and the sha256 of the bytes read.

    Raises:
        IngestError: the file is missing or unusable as a whole (unreadable, empty, not JSON, not
            UTF-8, unknown format, a table without a column its format needs).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise IngestError(f"{p}: file not found" + (f" ({where})" if where else ""))
    got = read_file(p, max_line_chars=line_limit(max_record_chars), split=split,
                    is_record=lambda obj: format_of(obj) is not None)
    loaded = convert_rows(got.rows, label=str(p), format=format, tabular=got.tabular, columns=columns,
                          max_record_chars=max_record_chars, sha256=got.sha256, where=where, reasoning=reasoning,
                          preference=preference)
    return dataclasses.replace(loaded, encoding=got.encoding)

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
messages           ``{messages|conversations: [{role|from, content|value}]}``; content may be a
                   string or a list of parts ``[{type: text, value|text}]`` (ShareGPT / LLaMA-Factory);
                   roles: user/assistant/system and the aliases in ``ROLE_ALIASES`` (human, gpt, ...)
self_instruct      ``{instruction, instances: [{input, output}]}`` → one record per instance
=================  ==========================================================================

Example::

    got = load_records("data/eval/set.jsonl", format="auto")
    conversations = [r.messages for r in got.records]  # got.rejected: (row, reason, raw)
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sftflow.data.readers import IngestError, RawRow, read_file, type_name
from sftflow.data.records import has_lone_surrogate, is_blank

FORMATS: tuple[str, ...] = ("alpaca", "dolly", "human_assistant", "messages", "self_instruct")
# Other spellings of a format (evaluation's config accepts ``alpaca_eval``: AlpacaEval rows are alpaca rows).
FORMAT_ALIASES: dict[str, str] = {"alpaca_eval": "alpaca"}
ROLE_ALIASES: dict[str, str] = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bard": "assistant",
    "system": "system",
}
_HA_SPLIT = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


class RowError(ValueError):
    """One row is bad; its message is the reason it is rejected (quarantined at ingestion)."""


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
        raise RowError(f"field {key!r} must be a string, got {type_name(v)}")
    return v


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
    raise RowError(f"{where}: content must be a string or a list of text parts, got {type_name(content)}")


def _conv_messages(o: dict) -> list[tuple[list[dict], str]]:
    turns = o.get("messages", o.get("conversations"))
    if not isinstance(turns, list):
        raise RowError(f"`messages` must be a list of turns, got {type_name(turns)}")
    msgs = []
    system = o.get("system")
    if isinstance(system, str) and system.strip():
        msgs.append({"role": "system", "content": system.strip()})
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError(f"turn {i}: expected an object, got {type_name(t)}")
        role_raw = t.get("role", t.get("from"))
        if not isinstance(role_raw, str):
            raise RowError(f"turn {i}: missing `role`/`from`")
        role = ROLE_ALIASES.get(role_raw.strip().lower())
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
            raise RowError(f"instance {i}: expected an object, got {type_name(x)}")
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


def check_messages(msgs: list[dict], *, max_chars: int | None = None) -> None:
    """Raise RowError when a conversation is not trainable (blank turn, bad order, too long, bad UTF-8).

    ``max_chars``: the longest a conversation may be (all turns together); None: no bound.
    """
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
        if has_lone_surrogate(m["content"]):
            raise RowError(f"invalid text in the {m['role']} turn: a lone UTF-16 surrogate (from invalid UTF-8 "
                           "or an unpaired \\ud800-\\udfff escape)")
    total = sum(len(m["content"]) for m in msgs)
    if max_chars is not None and total > max_chars:
        raise RowError(f"record too long: {total} chars > max_record_chars={max_chars}")



# --------------------------------------------------------------------------- loading
# The keys a row of each format cannot do without (one of each tuple).
_REQUIRED_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "alpaca": (("instruction",), ("output",)),
    "dolly": (("instruction",), ("response",)),
    "human_assistant": (("text",),),
    "messages": (("messages", "conversations"),),
    "self_instruct": (("instruction",), ("instances",)),
}


@dataclass(frozen=True)
class ConvertedRow:
    """One conversation a file yielded: where it was (``row``), its messages, its category ("" when none)."""

    row: int
    messages: list[dict[str, str]]
    category: str = ""


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
    """

    path: str
    format: str
    detected: bool
    sha256: str
    records: tuple[ConvertedRow, ...]
    rejected: tuple[RejectedRow, ...]

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


def convert_row(obj: Any, fmt: str, *, max_record_chars: int | None = None) -> list[list[dict[str, str]] | RowError]:
    """One parsed row in ``fmt`` -> one item per conversation it yields: its messages, or the RowError why not.

    Self-Instruct yields one item per instance; every other format one item.
    """
    items: list[list[dict[str, str]] | RowError] = []
    for item in _convert(obj, canonical_format(fmt)):
        if isinstance(item, RowError):
            items.append(item)
            continue
        try:
            check_messages(item[0], max_chars=max_record_chars)
            items.append(item[0])
        except RowError as e:
            items.append(e)
    return items


def _convert(obj: Any, fmt: str) -> list[Any]:
    if not isinstance(obj, dict):
        raise RowError(f"expected a JSON object, got {type_name(obj)}")
    return CONVERTERS[fmt](obj)


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
                 sha256: str = "", where: str = "") -> LoadedRecords:
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
    records: list[ConvertedRow] = []
    rejected: list[RejectedRow] = []
    for r, o in zip(rows, objs):
        try:
            if r.error is not None:
                raise RowError(r.error)
            items, per_instance = _convert(o, fmt), fmt == "self_instruct"
        except RowError as e:
            items, per_instance = [e], False
        for k, item in enumerate(items):
            try:
                if isinstance(item, RowError):
                    raise item
                msgs, cat = item
                check_messages(msgs, max_chars=max_record_chars)
            except RowError as e:
                rejected.append(RejectedRow(r.row, f"instance {k}: {e}" if per_instance else str(e), r.raw))
                continue
            records.append(ConvertedRow(r.row, msgs, cat or ""))
    if not records and not rejected:
        kind = Path(label).name.rsplit(".", 1)[-1].upper()
        raise IngestError(f"{label}: no records (only blank lines); expected {kind} records")
    return LoadedRecords(path=label, format=fmt, detected=detected, sha256=sha256,
                         records=tuple(records), rejected=tuple(rejected))


def line_limit(max_record_chars: int | None) -> int:
    """Longest raw line/row parsed at all: a record's bound with room for JSON syntax and escapes."""
    return sys.maxsize if max_record_chars is None else max_record_chars * 4 + 1024


def load_records(path: str | Path, *, format: str = "auto", columns: dict[str, str] | None = None,
                 max_record_chars: int | None = None, split: str = "train", where: str = "") -> LoadedRecords:
    """Read one file and convert every row to canonical messages: the one entry point for instruction files.

    Args:
        path: a .json/.jsonl/.ndjson/.csv/.parquet file, or a ``datasets.save_to_disk`` folder.
        format: ``auto`` (detected from the rows' keys) or one of ``FORMATS`` (or ``FORMAT_ALIASES``).
        columns: renames applied to every row before conversion (``{their_name: our_name}``).
        max_record_chars: longest conversation kept (all turns); longer rows are rejected. None: no bound.
        split: the split to read from a saved ``DatasetDict``.
        where: the config entry to fix, for messages (e.g. ``evaluation.extra_sets[my_set]``).

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
    return convert_rows(got.rows, label=str(p), format=format, tabular=got.tabular, columns=columns,
                        max_record_chars=max_record_chars, sha256=got.sha256, where=where)

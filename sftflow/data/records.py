"""The canonical record every stage reads and writes (see DESIGN.md).

One row::

    id        stable hash of the normalized messages (same content -> same id)
    messages  list of {"role": "system"|"user"|"assistant"|"tool", "content": str}; an assistant
              turn that calls tools also carries ``tool_calls``: a JSON string of
              ``[{"name": str, "arguments": {...}}, ...]`` (its ``content`` may then be empty); a
              ``tool`` turn is a tool's result (never a training target). An assistant turn that
              is context only (LLaMA-Factory's per-turn ``loss_weight: 0``) carries
              ``loss_weight: 0.0``: training gives its tokens no loss; absent = learned
    source    "<dataset name>:<file name>" (where the row came from)
    origin    "seed" | "backtranslated"
    category  optional str ("" when unknown)
    score     optional float (NaN when unknown; e.g. a self-curation score)
    source_row optional int: where the row came from inside its source file (JSONL/CSV line
              number, or 1-based record index for JSON lists/Parquet/saved datasets); 0 when
              unknown (e.g. a generated record). Quarantine rows of later stages point back to it.
    tools     optional str: the JSON list of tool (function) schemas a tool-calling conversation
              may use (``[{"name", "description", "parameters"}]``); "" when none
    answer    optional str: the final answer of a verifiable task (GSM8K ``#### 72`` -> "72"); ""
              when none (``sftflow.data.answers`` compares answers)

Parquet stores ``messages`` as a list of structs; ``records_to_frame``/``frame_to_records``
convert to/from plain Python dicts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from typing import Any, Iterable, Literal

import pandas as pd

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
ORIGINS: tuple[str, ...] = ("seed", "backtranslated")
COLUMNS: tuple[str, ...] = ("id", "messages", "source", "origin", "category", "score", "source_row", "tools", "answer")
# Optional metadata columns and the value a row gets when it carries none (older frames, generated rows).
OPTIONAL_COLUMNS: dict[str, Any] = {"category": "", "score": math.nan, "source_row": 0, "tools": "", "answer": ""}

_WS = re.compile(r"\s+")
# Lone surrogates: what `surrogateescape` leaves for bytes that were not valid UTF-8, or a JSON
# "\ud800" escape that pairs with nothing. Neither is text, and Parquet cannot store them.
_SURROGATE = re.compile("[\ud800-\udfff]")


class AccountingError(RuntimeError):
    """A row-accounting invariant broke (rows in != rows out + quarantined + removed): a bug, never bad data.

    Raised explicitly (not with ``assert``) so the check also runs under ``python -O``.
    """


def check_accounting(what: str, rows_in: int, **parts: int) -> None:
    """Raise AccountingError unless ``rows_in`` equals the sum of ``parts`` (e.g. kept=..., removed=...).

    The message names every part: ``"dedup accounting broken: 10 in != 7 kept + 2 removed"``.
    """
    if rows_in != sum(parts.values()):
        shown = " + ".join(f"{v} {k}" for k, v in parts.items())
        raise AccountingError(f"{what} accounting broken: {rows_in} in != {shown}")


def has_lone_surrogate(text: str) -> bool:
    """True when ``text`` holds a lone UTF-16 surrogate (from invalid UTF-8 or an unpaired escape)."""
    return _SURROGATE.search(text) is not None


def replace_lone_surrogates(text: str) -> str:
    """``text`` with every lone surrogate shown as U+FFFD, so that Parquet can store it."""
    return _SURROGATE.sub("\ufffd", text)


def normalize_text(text: str) -> str:
    """Unicode NFKC, lower case, collapsed whitespace: the normalization ids are computed on."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().lower()


def record_id(messages: list[dict[str, str]], *, tools: str = "") -> str:
    """Stable id of a conversation: sha256 of its normalized (role, content) turns, 16 hex chars.

    A turn with ``tool_calls`` adds them (normalized) to its entry and a non-empty ``tools`` wraps
    the turns with it, so conversations differing only in their calls or tools differ; a plain
    conversation hashes exactly as it always has (its id never changes).
    """
    canon: list[Any] = []
    for m in messages:
        entry = [m["role"], normalize_text(m["content"])]
        calls = m.get("tool_calls")
        if calls:
            entry.append(normalize_text(calls))
        if _weight(m) is not None:  # a context-only turn makes another training example
            entry.append({"loss_weight": _weight(m)})
        canon.append(entry)
    payload: Any = {"messages": canon, "tools": normalize_text(tools)} if tools else canon
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]


def _weight(m: dict[str, Any]) -> float | None:
    """A turn's ``loss_weight`` as a float, None when it has none (absent, None or NaN: Parquet's null)."""
    w = m.get("loss_weight")
    if w is None or (isinstance(w, float) and math.isnan(w)):
        return None
    return float(w)


def _turn(m: dict[str, Any]) -> dict[str, Any]:
    """One canonical turn: role and content, plus ``tool_calls`` / ``loss_weight`` only where the turn has them."""
    out: dict[str, Any] = {"role": str(m["role"]), "content": str(m["content"])}
    calls = m.get("tool_calls")
    if calls is not None and not (isinstance(calls, float) and math.isnan(calls)) and str(calls):
        out["tool_calls"] = calls if isinstance(calls, str) else json.dumps(calls, ensure_ascii=False)
    if _weight(m) is not None:
        out["loss_weight"] = _weight(m)
    return out


def make_record(
    messages: list[dict[str, str]],
    *,
    source: str,
    origin: str = "seed",
    category: str = "",
    score: float = math.nan,
    source_row: int = 0,
    tools: str = "",
    answer: str = "",
) -> dict[str, Any]:
    """Build one canonical record (id computed from the messages and tools).

    ``source_row`` is the line (or record index) in the source file, 0 when unknown; it is
    provenance only and never part of the id. ``tools`` (JSON list of tool schemas) is part of
    the id; ``answer`` (a verifiable task's final answer, derived from the response) is not.
    """
    msgs = [_turn(m) for m in messages]
    return {
        "id": record_id(msgs, tools=tools or ""),
        "messages": msgs,
        "source": source,
        "origin": origin,
        "category": category or "",
        "score": float(score),
        "source_row": int(source_row),
        "tools": tools or "",
        "answer": answer or "",
    }


# Characters that render as nothing: Unicode's Default_Ignorable_Code_Point set (zero-width
# space/joiners, word joiner, BOM, soft hyphen, bidi controls, variation selectors, tags, Hangul
# fillers, ...) plus the blank Braille pattern. A turn made only of these (and whitespace/control
# characters) is empty, however many code points it has.
_INVISIBLE_RANGES: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x2800, 0x2800),
    (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)


def is_invisible(ch: str) -> bool:
    """True for a character that shows nothing: whitespace, a control, or a default-ignorable code point."""
    if ch.isspace() or unicodedata.category(ch) == "Cc":
        return True
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _INVISIBLE_RANGES)


def visible_text(text: str) -> str:
    """``text`` without the characters that render as nothing (see ``is_invisible``)."""
    return "".join(ch for ch in text if not is_invisible(ch))


def is_blank(text: str) -> bool:
    """True when ``text`` has no visible character to stand on (empty, whitespace, zero-width characters,
    or combining marks with no base character: a "response" of only U+0301s, or Zalgo debris, says nothing)."""
    return all(is_invisible(ch) or unicodedata.category(ch)[0] == "M" for ch in text)


# What counts as non-printable junk (the ``non_printable_fraction`` bound), decided once:
#   junk: C0/C1 control characters (Cc) but tab, newline and carriage return; lone surrogates (Cs:
#         undecodable bytes); private-use code points (Co: no meaning outside one vendor's font);
#         noncharacters (U+FDD0-FDEF, U+xxFFFE/xxFFFF); U+FFFD, the mark of bytes already lost in a
#         decode.
#   text: every format character (Cf) — ZWJ/ZWNJ (Persian, Devanagari, emoji ZWJ sequences),
#         LRM/RLM/ALM and the bidi embeddings/isolates of right-to-left text, the soft hyphen, word
#         joiner, tag characters of subdivision flags, Arabic number signs — plus variation
#         selectors (Mn), emoji modifiers (Sk) and everything else. Unassigned code points (Cn) are
#         not counted either: Python's Unicode database trails Unicode, so a newer emoji or script
#         would look unassigned (noncharacters, which never will be assigned, are junk).
def is_junk_char(ch: str) -> bool:
    """True for a code point that is no text (see the table above)."""
    cat = unicodedata.category(ch)
    if cat == "Cc":
        return ch not in "\n\t\r"
    if cat in ("Cs", "Co") or ch == "\ufffd":
        return True
    cp = ord(ch)
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


def prompt_text(messages: list[dict[str, str]]) -> str:
    """All user turns joined: the 'prompt' used for leakage checks and dedup keys."""
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def response_text(messages: list[dict[str, str]]) -> str:
    """All assistant turns joined: the 'response'."""
    return "\n".join(m["content"] for m in messages if m["role"] == "assistant")


def records_to_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """A DataFrame with exactly the canonical columns, in order (missing metadata filled in)."""
    df = pd.DataFrame(list(records), columns=list(COLUMNS))
    if len(df):
        df["category"] = df["category"].fillna("").astype(str)
        df["score"] = df["score"].astype(float)
        df["source_row"] = df["source_row"].fillna(0).astype("int64")
        df["tools"] = df["tools"].fillna("").astype(str)
        df["answer"] = df["answer"].fillna("").astype(str)
    else:
        df = df.astype({"score": "float64", "source_row": "int64"})
    return df


def with_optional_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every optional metadata column present (its default where it was missing).

    Frames written before a metadata column existed (or by code that does not know it) stay
    readable. Columns that exist are left exactly as they are, so a schema or type check still
    sees a wrong value.
    """
    missing = [c for c in OPTIONAL_COLUMNS if c not in df.columns]
    if not missing:
        return df
    df = df.copy()
    dtypes = {"category": object, "score": "float64", "source_row": "int64", "tools": object, "answer": object}
    for col in missing:
        df[col] = pd.Series([OPTIONAL_COLUMNS[col]] * len(df), index=df.index, dtype=dtypes[col])
    return df


def frame_to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain dicts, ``messages`` as a list of plain dicts (Parquet gives numpy arrays)."""
    out = []
    for row in df.to_dict(orient="records"):
        # Parquet gives every turn of a mixed frame a ``tool_calls`` slot (None where it has none).
        row["messages"] = [_turn(m) for m in row["messages"]]
        out.append(row)
    return out

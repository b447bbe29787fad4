"""The canonical record every stage reads and writes (see DESIGN.md).

One row::

    id        stable hash of the normalized messages (same content -> same id)
    messages  list of {"role": "system"|"user"|"assistant", "content": str}
    source    "<dataset name>:<file name>" (where the row came from)
    origin    "seed" | "backtranslated"
    category  optional str ("" when unknown)
    score     optional float (NaN when unknown; e.g. a self-curation score)

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

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
ORIGINS: tuple[str, ...] = ("seed", "backtranslated")
COLUMNS: tuple[str, ...] = ("id", "messages", "source", "origin", "category", "score")

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Unicode NFKC, lower case, collapsed whitespace: the normalization ids are computed on."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().lower()


def record_id(messages: list[dict[str, str]]) -> str:
    """Stable id of a conversation: sha256 of its normalized (role, content) turns, 16 hex chars."""
    canon = [[m["role"], normalize_text(m["content"])] for m in messages]
    return hashlib.sha256(json.dumps(canon, ensure_ascii=False).encode()).hexdigest()[:16]


def make_record(
    messages: list[dict[str, str]],
    *,
    source: str,
    origin: str = "seed",
    category: str = "",
    score: float = math.nan,
) -> dict[str, Any]:
    """Build one canonical record (id computed from the messages)."""
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    return {
        "id": record_id(msgs),
        "messages": msgs,
        "source": source,
        "origin": origin,
        "category": category or "",
        "score": float(score),
    }


def prompt_text(messages: list[dict[str, str]]) -> str:
    """All user turns joined: the 'prompt' used for leakage checks and dedup keys."""
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def response_text(messages: list[dict[str, str]]) -> str:
    """All assistant turns joined: the 'response'."""
    return "\n".join(m["content"] for m in messages if m["role"] == "assistant")


def records_to_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """A DataFrame with exactly the canonical columns, in order."""
    df = pd.DataFrame(list(records), columns=list(COLUMNS))
    if len(df):
        df["category"] = df["category"].fillna("").astype(str)
        df["score"] = df["score"].astype(float)
    return df


def frame_to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain dicts, ``messages`` as a list of plain dicts (Parquet gives numpy arrays)."""
    out = []
    for row in df.to_dict(orient="records"):
        row["messages"] = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
        out.append(row)
    return out

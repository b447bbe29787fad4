"""The quarantine: one schema for every stage that sets bad rows aside (ingest, validate).

A quarantine row says where the bad row came from and why it was set aside::

    stage       the stage that quarantined it (``ingest``, ``validate``, ``validate_augmented``...)
    source      "<dataset name>:<file name>" of the row's source file
    source_row  where the row is inside that source file (JSONL/CSV line, or 1-based record index)
    file        the file the quarantining stage read (the source file at ingestion, a Parquet later)
    row         where the row is inside ``file``
    reason      a readable reason (the failed rule or expectation)
    raw         the row's raw text, truncated to ``RAW_PREVIEW_CHARS``

Stages write it as ``<stage>/quarantine.parquet`` with ``quarantine_frame``.
"""

from __future__ import annotations

import pandas as pd

from sftflow.data.records import replace_lone_surrogates

QUARANTINE_COLUMNS: tuple[str, ...] = ("stage", "source", "source_row", "file", "row", "reason", "raw")
# Enough of a bad row to recognise it; a 10 MB line must not make the quarantine file 10 MB.
RAW_PREVIEW_CHARS = 2000


def quarantine_row(*, stage: str, source: str, file: str, row: int, reason: str, raw: str,
                   source_row: int | None = None) -> dict:
    """One quarantine row (a dict with ``QUARANTINE_COLUMNS``).

    Args:
        stage: the quarantining stage.
        source: ``"<dataset name>:<file name>"`` the row came from.
        file: the file this stage read; ``row`` is the row's position in it.
        row: line number (JSONL/CSV) or 1-based record index in ``file``.
        reason: why the row was set aside.
        raw: the row's raw text (truncated here).
        source_row: the row's position in its source file (default: ``row``, as at ingestion).
    """
    # Lone surrogates (from invalid UTF-8) cannot be written to Parquet; show them as U+FFFD.
    preview = replace_lone_surrogates(raw[:RAW_PREVIEW_CHARS])
    return {"stage": stage, "source": source, "source_row": int(row if source_row is None else source_row),
            "file": file, "row": int(row), "reason": reason, "raw": preview}


def quarantine_frame(rows: list[dict]) -> pd.DataFrame:
    """The quarantine rows as a DataFrame with the shared quarantine columns (also when empty)."""
    df = pd.DataFrame(rows, columns=list(QUARANTINE_COLUMNS))
    return df.astype({"stage": str, "source": str, "source_row": "int64", "file": str, "row": "int64",
                      "reason": str, "raw": str})

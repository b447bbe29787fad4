"""The validation suite: canonical records flattened to columns, and the GX (Core 1.x) suite over them.

The canonical rows hold nested ``messages``; GX checks columns, so each row is first flattened
into derived columns (``derive_frame``): turn counts, the role pattern, shortest user/assistant
turn (in visible characters: zero-width and other invisible characters do not count), character
and token lengths, the non-printable fraction, plus the canonical scalar columns.
``build_suite`` turns the bounds of ``ValidationConfig`` (pipelines.yaml ``validation:``) into
expectations, each tagged in its ``meta`` with its level (``row`` | ``table`` | ``info``);
``run_suite`` runs them with a file-based GX context; ``describe_expectation`` names a failed one.

The validate stage (``tasks/validate.py``) runs this per shard and decides what the levels mean.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sftflow.config_sections import ValidationConfig
from sftflow.data.records import COLUMNS, ORIGINS, ROLES, is_blank, is_junk_char, visible_text


SUITE_NAME = "sftflow_canonical"
# Optional system turn, then user/assistant pairs ending on assistant; an assistant tool call is
# followed by its tool results (T) and the assistant again (ingestion checks the exact order).
ROLE_PATTERN = r"^S?(?:UA(?:T+A)*)+$"
ID_PATTERN = r"^[0-9a-f]{16}$"
SOURCE_PATTERN = r"^[^:]*\S[^:]*:.*\S.*$"  # "<source name>:<file name>", neither part blank
SCALAR_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c != "messages")
DERIVED_COLUMNS: tuple[str, ...] = (
    "row", "field_types", "messages_shape", "n_turns", "role_pattern", "min_user_chars", "min_assistant_chars",
    "min_system_chars", "prompt_chars", "response_chars", "total_chars", "n_tokens", "non_printable_fraction",
)
_ROLE_LETTER = {"system": "S", "user": "U", "assistant": "A", "tool": "T"}


def _non_printable(text: str) -> int:
    return sum(1 for ch in text if is_junk_char(ch))


def non_printable_detail(msgs: Any) -> str:
    """Which fields hold junk characters and which: ``messages[1].content: U+0007 x3, U+0000 x1``."""
    if _shape(msgs) != "ok":
        return ""
    parts = []
    for i, m in enumerate(msgs):
        counts: dict[str, int] = {}
        for ch in m["content"]:
            if is_junk_char(ch):
                counts[ch] = counts.get(ch, 0) + 1
        if counts:
            top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            shown = ", ".join(f"U+{ord(ch):04X} x{n}" for ch, n in top[:6]) + (", ..." if len(top) > 6 else "")
            parts.append(f"messages[{i}].content: {shown}")
    return "; ".join(parts)


def _loss_weight(m: Any) -> float | None:
    w = m.get("loss_weight") if isinstance(m, dict) else None
    if w is None or (isinstance(w, float) and np.isnan(w)):
        return None
    return w


def _shape(msgs: Any) -> str:
    """'ok' when ``messages`` is a list of {role, content} with str content and known roles, else why not."""
    if msgs is None or isinstance(msgs, (str, bytes, dict)) or not hasattr(msgs, "__len__"):
        return f"not a list ({type(msgs).__name__})"
    if len(msgs) == 0:
        return "empty list"
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return "turn without role/content"
        if m["role"] not in ROLES:
            return f"unknown role {m['role']!r}"
        if not isinstance(m["content"], str):
            return f"content is {type(m['content']).__name__}"
        w = _loss_weight(m)
        # Per-turn loss weight (``sftflow.data.records``): 0 marks an assistant turn as context only.
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or float(w) not in (0.0, 1.0)
                              or (float(w) != 0.0 and m["role"] != "assistant")):
            return f"loss_weight {w!r} on a {m['role']} turn (expected 0, or 1 on an assistant turn)"
    learned = [_loss_weight(m) for m in msgs if m["role"] == "assistant"]
    if learned and all(w is not None and float(w) == 0.0 for w in learned):
        return "every assistant turn has loss_weight 0 (nothing to learn)"
    return "ok"


def _field_types(df: pd.DataFrame) -> list[str]:
    """Per row: 'ok', or which of the string columns holds a non-string (e.g. 'category is int')."""
    cols = [c for c in ("id", "source", "origin", "category") if c in df.columns]
    out = []
    for vals in zip(*(df[c] for c in cols)) if cols else [()] * len(df):
        bad = [f"{c} is {type(v).__name__}" for c, v in zip(cols, vals) if not isinstance(v, str)]
        out.append(", ".join(bad) or "ok")
    return out


def _visible_chars(text: str) -> int:
    """Visible characters of a turn; 0 when it is blank (only invisible characters or base-less combining marks)."""
    return 0 if is_blank(text) else len(visible_text(text))


# The columns derive_frame computes per row (listed so an empty input still has them).
_DERIVED_COLUMNS = ("messages_shape", "n_turns", "role_pattern", "min_user_chars", "min_assistant_chars",
                    "min_system_chars", "prompt_chars", "response_chars", "total_chars", "non_printable_fraction")


def derive_frame(df: pd.DataFrame, *, tokenizer: Any = None) -> pd.DataFrame:
    """Flatten canonical rows into the columns the suite checks (one output row per input row).

    Args:
        df: canonical records (``sftflow.data.records.COLUMNS``); extra/missing columns are passed
            through as they are, so the schema expectation can see them.
        tokenizer: a transformers tokenizer; when given, ``n_tokens`` counts every turn's content
            tokens (no template), else it is NaN.
    """
    out = df.drop(columns=[c for c in ("messages",) if c in df.columns]).reset_index(drop=True).copy()
    msgs_col = list(df["messages"]) if "messages" in df.columns else [None] * len(df)
    rows = []
    texts = []
    for msgs in msgs_col:
        shape = _shape(msgs)
        if shape != "ok":
            rows.append({"messages_shape": shape, "n_turns": 0, "role_pattern": "", "min_user_chars": 0,
                         "min_assistant_chars": 0, "min_system_chars": np.nan, "prompt_chars": 0,
                         "response_chars": 0, "total_chars": 0, "non_printable_fraction": 0.0})
            texts.append("")
            continue
        user = [m["content"] for m in msgs if m["role"] == "user"]
        # An assistant turn that only calls tools has its calls (JSON text) as its response text.
        asst = [m["content"] + (m.get("tool_calls") or "") for m in msgs if m["role"] == "assistant"]
        system = [m["content"] for m in msgs if m["role"] == "system"]
        joined = "\n".join(m["content"] for m in msgs)
        rows.append({
            "messages_shape": "ok",
            "n_turns": len(msgs),
            "role_pattern": "".join(_ROLE_LETTER[m["role"]] for m in msgs),
            # Visible characters only: whitespace, zero-width and other invisible characters do not
            # make a turn non-empty (see ``sftflow.data.records.is_invisible``).
            "min_user_chars": min((_visible_chars(u) for u in user), default=0),
            "min_assistant_chars": min((_visible_chars(a) for a in asst), default=0),
            # NaN when there is no system turn: GX skips nulls, so only a present-but-blank one fails.
            "min_system_chars": min((_visible_chars(x) for x in system), default=np.nan),
            "prompt_chars": sum(len(u) for u in user),
            "response_chars": sum(len(a) for a in asst),
            "total_chars": len(joined),
            "non_printable_fraction": _non_printable(joined) / max(len(joined), 1),
        })
        texts.append(joined)
    derived = pd.DataFrame(rows, index=out.index, columns=list(_DERIVED_COLUMNS))
    derived.insert(0, "row", np.arange(1, len(df) + 1, dtype="int64"))
    derived["field_types"] = _field_types(df)
    if tokenizer is not None and texts:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        derived["n_tokens"] = np.array([len(x) for x in ids], dtype="float64")
    else:
        derived["n_tokens"] = np.full(len(df), np.nan)
    return pd.concat([out, derived[list(DERIVED_COLUMNS)]], axis=1)


# --------------------------------------------------------------------------- the suite
def build_suite(cfg: ValidationConfig, *, with_tokens: bool) -> list[Any]:
    """The expectations (GX 1.x objects), bounds from ``cfg``; ``meta.level`` is row/table/info."""
    import great_expectations as gx

    E = gx.expectations

    def row(e: Any, why: str) -> Any:
        e.meta = {"level": "row", "why": why}
        return e

    def table(e: Any, why: str) -> Any:
        e.meta = {"level": "table", "why": why}
        return e

    suite = [
        table(E.ExpectTableColumnsToMatchSet(column_set=list(SCALAR_COLUMNS) + list(DERIVED_COLUMNS), exact_match=True),
              "canonical schema: id, messages, source, origin, category, score, source_row (messages flattened)"),
        table(E.ExpectTableRowCountToBeBetween(min_value=1), "a stage never hands on an empty dataset"),
        table(E.ExpectColumnValuesToBeOfType(column="score", type_="float64"), "score is a float (NaN when unknown)"),
        table(E.ExpectColumnValuesToBeOfType(column="source_row", type_="int64"),
              "source_row is an int (line/record in the source file, 0 when unknown)"),
        row(E.ExpectColumnValuesToBeBetween(column="source_row", min_value=0), "source_row is a line number or 0"),
        row(E.ExpectColumnValuesToNotBeNull(column="id"), "every row has an id"),
        row(E.ExpectColumnValuesToMatchRegex(column="id", regex=ID_PATTERN), "id = 16 hex chars of sha256"),
        row(E.ExpectColumnValuesToBeInSet(column="messages_shape", value_set=["ok"]),
            "messages is a list of {role, content} with known roles and string content"),
        row(E.ExpectColumnValuesToMatchRegex(column="role_pattern", regex=ROLE_PATTERN),
            "optional system turn, then alternating user/assistant, ending on assistant"),
        row(E.ExpectColumnValuesToBeBetween(column="min_user_chars", min_value=cfg.min_prompt_chars),
            "no empty user turn"),
        row(E.ExpectColumnValuesToBeBetween(column="min_assistant_chars", min_value=cfg.min_response_chars),
            "no empty assistant turn"),
        row(E.ExpectColumnValuesToBeBetween(column="min_system_chars", min_value=1),
            "no empty system turn (a blank system prompt is no system prompt)"),
        row(E.ExpectColumnValuesToBeBetween(column="total_chars", max_value=cfg.max_chars), "length bound in chars"),
        row(E.ExpectColumnValuesToBeBetween(column="non_printable_fraction", max_value=cfg.max_non_printable_fraction),
            "charset sanity: few control / private-use / replacement characters (format characters are text)"),
        row(E.ExpectColumnValuesToBeInSet(column="origin", value_set=list(ORIGINS)), "origin is seed or backtranslated"),
        row(E.ExpectColumnValuesToMatchRegex(column="source", regex=SOURCE_PATTERN), "source = '<name>:<file>'"),
        row(E.ExpectColumnValuesToBeInSet(column="field_types", value_set=["ok"]),
            "id, source, origin, category are strings"),
        row(E.ExpectColumnValuesToBeUnique(column="id"), "duplicate ids"),
    ]
    # Duplicate ids are reported, not quarantined: dedup removes them next, keeping the best copy.
    suite[-1].meta = {"level": "info", "why": "duplicate ids (exact duplicates); removed by dedup with accounting"}
    if with_tokens and cfg.max_tokens:
        suite.append(row(E.ExpectColumnValuesToBeBetween(column="n_tokens", max_value=cfg.max_tokens),
                         "length bound in tokens of the base model"))
    return suite


def describe_expectation(exp: Any) -> str:
    """A readable name for a failed expectation, e.g. ``expect_column_values_to_be_between(total_chars <= 20000)``."""
    kw = exp.configuration.kwargs if hasattr(exp, "configuration") else exp.kwargs
    col = kw.get("column")
    bits = []
    if kw.get("min_value") is not None:
        bits.append(f">= {kw['min_value']:g}")
    if kw.get("max_value") is not None:
        bits.append(f"<= {kw['max_value']:g}")
    if kw.get("regex"):
        bits.append(f"~ {kw['regex']}")
    if kw.get("value_set") is not None:
        bits.append(f"in {list(kw['value_set'])}")
    if kw.get("type_list") is not None:
        bits.append(f"type in {list(kw['type_list'])}")
    inner = " ".join([str(col)] + bits) if col else ", ".join(bits)
    return f"{exp.type}({inner})"


def run_suite(derived: pd.DataFrame, cfg: ValidationConfig, *, gx_dir: Path, with_tokens: bool) -> tuple[Any, str]:
    """Run the suite with a file-based GX context in ``gx_dir`` (rebuilt each run); returns (GX result, docs index)."""
    # GX phones home for analytics by default; this stage must stay offline and quiet.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    if gx_dir.exists():  # a retried stage starts from a clean GX project (names must be unique)
        shutil.rmtree(gx_dir)
    gx_dir.mkdir(parents=True)
    context = gx.get_context(mode="file", project_root_dir=str(gx_dir))
    context.variables.progress_bars = {"globally": False}
    context.variables.save()
    batch_def = (context.data_sources.add_pandas("canonical")
                 .add_dataframe_asset("records").add_batch_definition_whole_dataframe("all_rows"))
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME,
                                                   expectations=build_suite(cfg, with_tokens=with_tokens)))
    vdef = context.validation_definitions.add(gx.ValidationDefinition(name="canonical", data=batch_def, suite=suite))
    actions = [UpdateDataDocsAction(name="data_docs")] if cfg.data_docs else []
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="validate", validation_definitions=[vdef], actions=actions,
        result_format={"result_format": "COMPLETE", "partial_unexpected_count": 5},
    ))
    cp_result = checkpoint.run(batch_parameters={"dataframe": derived})
    result = next(iter(cp_result.run_results.values()))
    docs = ""
    if cfg.data_docs:
        index = gx_dir / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
        docs = str(index) if index.exists() else ""
    return result, docs

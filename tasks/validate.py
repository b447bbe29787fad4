"""Validation: a Great Expectations (GX Core 1.x) suite over the canonical records.

The canonical rows hold nested ``messages``; GX checks columns, so each row is first flattened
into derived columns (``derive_frame``): turn counts, the role pattern, shortest user/assistant
turn (in visible characters: zero-width and other invisible characters do not count), character
and token lengths, the non-printable fraction, plus the canonical scalar columns.
``build_suite`` turns the bounds of ``ValidationConfig`` (pipelines.yaml ``validation:``) into
expectations, each tagged in its ``meta`` with its level:

* ``row``: a failing row goes to quarantine, the reason naming the failed expectation(s);
* ``table``: schema / table facts; a failure fails the stage with the GX summary in the error;
* ``info``: reported in the GX result and Data Docs, never blocking (duplicate ids: dedup removes
  them in the next stage, with its own accounting).

The stage also fails when more than ``max_suite_failure_fraction`` of the rows are bad. The GX
validation result (JSON) and Data Docs (HTML, from a file-based GX context in the stage folder)
are written next to the outputs and logged to MLflow.

The same suite runs as a data contract in tests/data on real samples.
"""

from __future__ import annotations

import json
import os
import shutil
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from sftflow.errors import DataError
from sftflow.config_sections import ValidationConfig
from sftflow.ops.orchestration import (
    IO_RETRIES,
    markdown_artifact,
    retry_unless,
    run_logger,
    stage_cache_policy,
    table_artifact,
)
from sftflow.markers import write_marker
from sftflow.data.quarantine import quarantine_frame, quarantine_row
from sftflow.data.records import (COLUMNS, ORIGINS, ROLES, check_accounting, is_blank, is_junk_char,
                                  visible_text, with_optional_columns)
from sftflow.data.refs import DatasetRef, ModelRef, write_parquet
from sftflow.tracking.runs import StageContext, log_dataset, stage_run
from sftflow.results import ValidateResult


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


class ValidationFailed(DataError, RuntimeError):
    """The suite failed at table level or too many rows are bad; the message holds the GX summary."""


# --------------------------------------------------------------------------- flattening
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


def _describe(exp: Any) -> str:
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


# --------------------------------------------------------------------------- one shard
def validate_shard(args: tuple) -> dict[str, Any]:
    """Run the suite on rows ``[start, stop)`` of a Parquet file (the per-shard map step; pure but for files).

    ``args``: ``(path, start, stop, cfg, tokenizer, gx_dir, valid_path, stage)``. Writes the shard's valid rows to
    ``valid_path`` (``write_parquet``) and its GX project to ``gx_dir``; returns its quarantine rows (``row``
    counted in the whole file), the per-expectation summary, the blocking failures, the ids (for the
    cross-shard uniqueness check) and the GX result as JSON.
    """
    path, start, stop, cfg, tokenizer, gx_dir, valid_path, stage = args
    from sftflow.data.shards import parquet_rows, read_rows

    # Optional metadata (e.g. ``source_row``) may be absent from older frames: add its default.
    df = with_optional_columns(read_rows(path, start, stop))
    derived = derive_frame(df, tokenizer=tokenizer)
    gx_result, docs = run_suite(derived, cfg, gx_dir=Path(gx_dir), with_tokens=tokenizer is not None)
    del derived
    reasons: dict[int, list[str]] = {}
    blocking: list[str] = []
    summary: list[dict[str, Any]] = []
    for r in gx_result.results:
        exp = r.expectation_config
        level = (exp.meta or {}).get("level", "row")
        name = _describe(exp)
        raised = _raised(r.exception_info or {})
        idx = (r.result or {}).get("unexpected_index_list")
        count = (r.result or {}).get("unexpected_count")
        summary.append({"expectation": name, "level": level, "success": bool(r.success),
                        "unexpected": int(count or 0), "observed": _short((r.result or {}).get("observed_value"))})
        if r.success:
            continue
        if raised:
            msg = _exception_message(r.exception_info)
            blocking.append(f"{name}: could not run ({msg})")
        elif level == "table":
            blocking.append(f"{name}: observed {_short((r.result or {}).get('observed_value'))}")
        elif level == "row":
            if idx is None:
                blocking.append(f"{name}: failed without row indices")
                continue
            for i in idx:
                reasons.setdefault(int(i), []).append(name)
    bad = sorted(reasons)
    good_mask = np.ones(len(df), dtype=bool)
    good_mask[bad] = False
    q_rows = []
    for i in bad:
        rec = df.iloc[i]
        raw = json.dumps({c: _jsonable(rec[c]) for c in df.columns}, ensure_ascii=False, default=str)
        why = [r + (f" [{non_printable_detail(rec.get('messages'))}]" if "(non_printable_fraction" in r else "")
               for r in reasons[i]]  # name the field and the code points, not only the bound
        # source/source_row point at the row in its source file; file/row at the stage's input.
        q_rows.append(quarantine_row(stage=stage, source=str(rec.get("source", "")), source_row=_source_row(rec),
                                     file=str(path), row=start + i + 1, reason="; ".join(why), raw=raw))
    _write_valid(df[good_mask], valid_path, source=path, whole=start == 0 and stop >= parquet_rows(path), stage=stage)
    ids = df["id"].astype(str).tolist() if "id" in df.columns else []
    return {"rows": len(df), "quarantine": q_rows, "summary": summary, "blocking": blocking, "docs": docs,
            "ids": ids, "gx": gx_result.to_json_dict(), "statistics": gx_result.statistics}


def _write_valid(df: pd.DataFrame, path: str, *, source: str, whole: bool, stage: str) -> None:
    """Write a shard's valid rows. One shard of several keeps the input file's Arrow schema: a shard
    whose turns all lack an optional field (``tool_calls``, ``loss_weight``) would otherwise get it
    null-typed, and the shards could not be concatenated into one file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(source)
    if whole or list(df.columns) != schema.names:
        write_parquet(df, path, name=f"{stage}_valid")  # the bytes a single shard always had
        return
    tmp = Path(path).with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pandas(df.reset_index(drop=True), schema=schema, preserve_index=False), tmp)
    tmp.replace(path)


def merge_validation(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-shard results into one report (the merge step): counts add up, quarantines concatenate.

    An expectation succeeds when it succeeds on every shard. Uniqueness of ``id`` is a property of the
    whole table, so its count is recomputed over all shards' ids (a duplicate may span two shards).
    """
    if len(shards) == 1:
        one = shards[0]
        return {k: one[k] for k in ("rows", "quarantine", "summary", "blocking", "docs", "statistics")}
    summary = [dict(s) for s in shards[0]["summary"]]
    for sh in shards[1:]:
        for acc, s in zip(summary, sh["summary"]):
            acc["success"] = acc["success"] and s["success"]
            acc["unexpected"] += s["unexpected"]
            if not s["success"] and acc["observed"] != s["observed"]:
                acc["observed"] = "(per shard; see gx_result.json)"
    ids = pd.Series([i for sh in shards for i in sh["ids"]], dtype=object)
    dup = int(ids.duplicated(keep=False).sum())
    for acc in summary:
        if acc["expectation"].startswith("expect_column_values_to_be_unique(id"):
            acc["unexpected"], acc["success"] = dup, dup == 0
    blocking = list(dict.fromkeys(b for sh in shards for b in sh["blocking"]))
    stats = {"evaluated_expectations": sum(int(sh["statistics"].get("evaluated_expectations", 0)) for sh in shards),
             "successful_expectations": sum(1 for s in summary if s["success"]),
             "unsuccessful_expectations": sum(1 for s in summary if not s["success"]),
             "shards": len(shards)}
    return {"rows": sum(sh["rows"] for sh in shards), "quarantine": [q for sh in shards for q in sh["quarantine"]],
            "summary": summary, "blocking": blocking, "docs": shards[0]["docs"], "statistics": stats}


# --------------------------------------------------------------------------- the stage
def validate(
    *,
    dataset: DatasetRef,
    cfg: ValidationConfig,
    out_dir: Path,
    tokenizer: Any = None,
    stage: str = "validate",
    engine: Any = None,
) -> ValidateResult:
    """Validate ``dataset`` with the GX suite; split it into valid rows and quarantined rows.

    The file is validated in shards of ``engine.shard_rows`` rows (``validate_shard``, mapped with the
    engine, then ``merge_validation``): one quarantine, one valid file, one summary whatever the engine.

    Args:
        dataset: canonical records.
        cfg: bounds of the suite (pipelines.yaml ``validation:``).
        out_dir: the stage folder (``valid.parquet``, ``quarantine.parquet``, ``gx_result.json``, ``gx/``).
        tokenizer: a loaded transformers tokenizer for the token bound (None: no token check).
        stage: stage name written in the quarantine rows.
        engine: ``sftflow.engine.Engine`` (default: the active one, local when none).

    Raises:
        ValidationFailed: a table-level expectation failed (schema, empty table), an expectation
            could not run, or more than ``max_suite_failure_fraction`` of the rows are bad. The
            outputs (quarantine, GX result, Data Docs) are written first, for inspection.
    """
    from sftflow.data.shards import concat_parquet, parquet_rows
    from sftflow.engine import current_engine, shard_bounds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = engine or current_engine()
    _check_unchanged(dataset)
    num_rows = parquet_rows(dataset.path)
    bounds = shard_bounds(num_rows, engine.shard_rows)
    gx_root = out_dir / "gx"
    if len(bounds) > 1 and gx_root.exists():  # a retried stage starts from clean GX projects
        shutil.rmtree(gx_root)
    jobs = [(dataset.path, lo, hi, cfg, tokenizer,
             str(gx_root if len(bounds) == 1 else gx_root / f"shard-{k:05d}"),
             str(out_dir / f"valid.shard-{k:05d}.parquet"), stage) for k, (lo, hi) in enumerate(bounds)]
    shards = engine.map(validate_shard, jobs)
    valid = concat_parquet([j[6] for j in jobs], out_dir / "valid.parquet", name=f"{stage}_valid")
    merged = merge_validation(shards)
    result_path = out_dir / "gx_result.json"
    gx_json = shards[0]["gx"] if len(shards) == 1 else {
        "success": all(s["success"] for s in merged["summary"]), "statistics": merged["statistics"],
        "shards": [{"rows": [lo + 1, hi], "result": sh["gx"]} for (lo, hi), sh in zip(bounds, shards)]}
    result_path.write_text(json.dumps(gx_json, indent=2, default=str))
    del shards, gx_json
    summary, blocking, q_rows, docs = merged["summary"], merged["blocking"], merged["quarantine"], merged["docs"]
    n = merged["rows"]
    quarantine = write_parquet(quarantine_frame(q_rows), out_dir / "quarantine.parquet", name=f"{stage}_quarantine")
    check_accounting(stage, n, valid=valid.num_rows, quarantined=quarantine.num_rows)
    (out_dir / "summary.json").write_text(json.dumps(
        {"rows": n, "valid": valid.num_rows, "quarantined": quarantine.num_rows, "expectations": summary,
         "statistics": merged["statistics"], "shards": len(bounds), "engine": engine.kind}, indent=2, default=str))

    run_logger(__name__).info("GX suite %s on %s: %d valid, %d quarantined of %d rows (%d shard(s), %s engine)",
                              SUITE_NAME, dataset.name, valid.num_rows, quarantine.num_rows, n, len(bounds),
                              engine.kind)
    fraction = len(q_rows) / max(n, 1)
    if fraction > cfg.max_suite_failure_fraction:
        blocking.append(f"{len(q_rows)}/{n} rows ({fraction:.1%}) fail row-level expectations "
                        f"(> validation.max_suite_failure_fraction={cfg.max_suite_failure_fraction})")
    if blocking:
        failed = [s for s in summary if not s["success"]]
        lines = "\n".join(f"  - {s['expectation']} [{s['level']}]: {s['unexpected']} unexpected" for s in failed)
        # Point at the rows in their source files (where a user can fix them), not only at the Parquet.
        where = "".join(f"\n  - {q['source']} row {q['source_row']}: {q['reason']}" for q in q_rows[:3])
        raise ValidationFailed(
            f"GX suite {SUITE_NAME!r} failed on {dataset.path} ({dataset.name}):\n  * " + "\n  * ".join(blocking)
            + f"\nFailed expectations:\n{lines}" + (f"\nFirst quarantined rows:{where}" if where else "")
            + f"\nGX result: {result_path}"
            + (f"\nData Docs: {docs}" if docs else "") + f"\nQuarantine: {quarantine.path}"
        )
    return ValidateResult(valid=valid, quarantine=quarantine, gx_result=str(result_path), data_docs=docs)


def _check_unchanged(dataset: DatasetRef) -> None:
    """The same refusal as ``DatasetRef.read``: a missing file, or bytes changed since it was written."""
    from sftflow.data.refs import sha256_file

    p = Path(dataset.path)
    if not p.exists():
        raise FileNotFoundError(f"dataset {dataset.name!r} is missing: {p} (was the run directory deleted?)")
    digest = sha256_file(p)
    if digest != dataset.sha256:
        raise ValueError(f"dataset {dataset.name!r} at {p} changed on disk: sha256 {digest} != {dataset.sha256}")


def _source_row(rec: pd.Series) -> int:
    try:
        return int(rec.get("source_row", 0))
    except (TypeError, ValueError):  # a wrong type is reported by the suite; keep the quarantine writable
        return 0


def _raised(info: dict) -> bool:
    # GX puts {raised_exception, exception_message} at the top or one level down, keyed by metric.
    if info.get("raised_exception"):
        return True
    return any(isinstance(v, dict) and v.get("raised_exception") for v in info.values())


def _exception_message(info: dict) -> str:
    if "exception_message" in info:
        return str(info.get("exception_message"))[:200]
    for v in info.values():
        if isinstance(v, dict) and v.get("exception_message"):
            return str(v["exception_message"])[:200]
    return "unknown error"


def _short(v: Any) -> Any:
    s = json.dumps(v, default=str)
    return v if len(s) <= 200 else s[:200] + "…"


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and np.isnan(v):
        return None
    return v.item() if isinstance(v, np.generic) else v


def load_tokenizer(ref: ModelRef, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model (or of an adapter's base), without loading weights."""
    from transformers import AutoTokenizer

    path = Path(ref.path)
    tok_dir = path if (path / "tokenizer_config.json").exists() or not ref.base else Path(ref.base)
    return AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=trust_remote_code)


@task(name="validate", cache_policy=stage_cache_policy(), persist_result=True, **IO_RETRIES,
      retry_condition_fn=retry_unless(ValidationFailed))
def validate_task(
    dataset: DatasetRef,
    cfg: ValidationConfig,
    *,
    tokenizer: ModelRef | None,
    ctx: StageContext,
    stage: str = "validate",
) -> ValidateResult:
    """Prefect task: run the GX suite in a nested MLflow run; log result JSON, Data Docs and accounting."""
    import mlflow

    with stage_run(ctx, stage):
        out_dir = ctx.stage_dir(stage)
        tok = load_tokenizer(tokenizer) if tokenizer is not None else None
        mlflow.log_params({"tokenizer": tokenizer.path if tokenizer else "none",
                           **{f"validation.{k}": v for k, v in cfg.model_dump().items()}})
        log_dataset(dataset, context=f"{stage}.input")
        try:
            result = validate(dataset=dataset, cfg=cfg, out_dir=out_dir, tokenizer=tok, stage=stage)
        except ValidationFailed:
            _log_outputs(out_dir, stage)  # the failed run still shows what failed and why
            raise
        mlflow.log_metrics({"rows_read": dataset.num_rows, "rows_valid": result.valid.num_rows,
                            "rows_quarantined": result.quarantine.num_rows})
        log_dataset(result.valid, context=f"{stage}.output")
        if result.quarantine.num_rows:
            log_dataset(result.quarantine, context=f"{stage}.quarantine")
        _log_outputs(out_dir, stage)
        summary = json.loads((out_dir / "summary.json").read_text())
        table_artifact(f"{stage}-expectations", summary["expectations"],
                       description=f"GX suite {SUITE_NAME}: {result.valid.num_rows} valid, "
                                   f"{result.quarantine.num_rows} quarantined of {dataset.num_rows}")
        docs_uri = mlflow.get_artifact_uri(f"{stage}/data_docs/index.html") if result.data_docs else ""
        markdown_artifact(f"{stage}-summary", _markdown(result, summary, mlflow.active_run().info.run_id, docs_uri),
                          description="Great Expectations validation")
        write_marker(ctx.layout.stage_dir(stage), outputs=result, stage=stage)  # last: what a cache hit verifies
        return result


def _log_outputs(out_dir: Path, stage: str) -> None:
    import mlflow

    for name in ("gx_result.json", "summary.json", "quarantine.parquet"):
        if (out_dir / name).exists():
            mlflow.log_artifact(str(out_dir / name), stage)
    docs = out_dir / "gx" / "gx" / "uncommitted" / "data_docs" / "local_site"
    if docs.exists():
        mlflow.log_artifacts(str(docs), f"{stage}/data_docs")
    # Validated in several shards: one GX project (and Data Docs site) per shard.
    for shard_docs in sorted((out_dir / "gx").glob("shard-*/gx/uncommitted/data_docs/local_site")):
        mlflow.log_artifacts(str(shard_docs), f"{stage}/data_docs/{shard_docs.parents[3].name}")


def _markdown(result: ValidateResult, summary: dict[str, Any], run_id: str, docs_uri: str) -> str:
    lines = [f"# Validation (GX suite `{SUITE_NAME}`)", "",
             f"{summary['valid']} valid, {summary['quarantined']} quarantined of {summary['rows']} rows.", "",
             "| expectation | level | success | unexpected |", "|---|---|---|---|"]
    for s in summary["expectations"]:
        lines.append(f"| `{s['expectation']}` | {s['level']} | {'✅' if s['success'] else '❌'} | {s['unexpected']} |")
    lines += ["", f"- GX result JSON: `{result.gx_result}`"]
    if result.data_docs:
        lines.append(f"- Data Docs: [{result.data_docs}](file://{result.data_docs})")
    if docs_uri:
        lines.append(f"- Data Docs logged to MLflow run `{run_id}`: [{docs_uri}]({docs_uri})")
    return "\n".join(lines)


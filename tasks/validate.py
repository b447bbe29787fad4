"""Validation stage: the Great Expectations (GX Core 1.x) suite over the canonical records, shard by shard.

The suite itself (rows flattened to derived columns by ``derive_frame``, expectations from
``ValidationConfig`` by ``build_suite``) lives in ``sftflow/data/validation_suite.py``. Each
expectation is tagged in its ``meta`` with its level, and this stage acts on it:

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
import shutil
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
from sftflow.data.records import check_accounting, with_optional_columns
from sftflow.data.refs import DatasetRef, ModelRef, write_parquet
from sftflow.data.validation_suite import (SUITE_NAME, derive_frame, describe_expectation, non_printable_detail,
                                           run_suite)
from sftflow.tracking.runs import StageContext, log_dataset, stage_run
from sftflow.results import ValidateResult


class ValidationFailed(DataError, RuntimeError):
    """The suite failed at table level or too many rows are bad; the message holds the GX summary."""


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
        name = describe_expectation(exp)
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


"""Dedup stage: exact duplicates, then MinHash-LSH near duplicates, then (optional) semantic ones,
and, given a held-out set, rows that leak it.

Runs between validation and the split, and again with a held-out set (``dedup_augmented``): a training
row that duplicates a held-out row is a leak. What counts as a duplicate across sets is defined once,
in ``sftflow/data/neardup.py`` (``find_cross_duplicates``; the split stage uses the same rule). Nothing
vanishes: every removed row is written with
``cluster_id``, ``kept_id`` (the representative that stays, or the held-out row it leaks),
``matched_id`` + ``similarity`` (the verified pair that put it in the cluster) and ``reason``
(``exact`` | ``near`` | ``semantic`` | ``leak``); rows in = kept + removed.

One driver does all of it, in bounded memory (``sftflow.data.dedup_driver.dedup_files``: per-shard
scans, compact arrays for the merge, per-shard writes); ``dedup`` is the stage around it,
``deduplicate`` runs it on frames already in memory (written to a temporary folder first). Run it inside the flow (``flows/``), or alone::

    from tasks.dedup import dedup, deduplicate
    result = dedup(datasets=[ref], cfg=DedupConfig(), out_dir=Path(...), heldout=None)  # files + DedupResult
    frames = deduplicate(df=frame, cfg=DedupConfig())                                  # kept, removed, report

The clustering and keep rules are documented in ``sftflow/data/dedup_driver.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from prefect import task

from sftflow.config_sections import DedupConfig
from sftflow.data.dedup_driver import check_columns, dedup_files
from sftflow.ops.orchestration import IO_RETRIES, markdown_artifact, stage_cache_policy, table_artifact
from sftflow.markers import write_marker
from sftflow.data.refs import DatasetRef, write_parquet
from sftflow.tracking.runs import StageContext, log_dataset, log_json, stage_run
from sftflow.results import DedupResult


class DedupFrames(NamedTuple):
    """What ``deduplicate`` returns (the driver's outputs read back; ``dedup`` returns a ``DedupResult``).

    Attributes:
        kept: rows that stay (input columns).
        removed: removed rows (input columns + ``sftflow.data.dedup_driver.REMOVED_COLUMNS``).
        report: JSON-able report (per stage and per source counts, cluster sizes, sample pairs).
    """

    kept: pd.DataFrame
    removed: pd.DataFrame
    report: dict[str, Any]


def deduplicate(*, df: pd.DataFrame, cfg: DedupConfig, heldout_df: pd.DataFrame | None = None,
                engine: Any = None) -> DedupFrames:
    """``dedup_files`` on frames already in memory: written to a temporary folder, deduplicated, read back.

    Args:
        df: canonical records (``id``, ``messages``, ``source`` at least), in input order.
        cfg: the pipeline's ``dedup`` section.
        heldout_df: held-out records; train rows that duplicate one (``find_cross_duplicates``) are
            removed as ``leak``.
        engine: ``sftflow.engine.Engine`` for the per-shard steps (default: the active one, local when none).

    Returns:
        DedupFrames: kept rows (input columns), removed rows (input columns + ``cluster_id``,
        ``kept_id``, ``matched_id``, ``reason``, ``similarity``), and the JSON-able report.

    Raises:
        ValueError: a frame lacks a canonical column.
        AccountingError: rows in != kept + removed (a bug; never silently).
    """
    import tempfile

    check_columns(df, what="dedup input")
    if heldout_df is not None:
        check_columns(heldout_df, what="dedup heldout")
    with tempfile.TemporaryDirectory(prefix="sftflow-dedup-") as tmp:
        folder = Path(tmp)
        ref = write_parquet(df, folder / "input.parquet", name="input")
        held = write_parquet(heldout_df, folder / "heldout.parquet", name="heldout") if heldout_df is not None else None
        kept, removed, report = dedup_files(datasets=[ref], cfg=cfg, out_dir=folder / "out", heldout=held,
                                            engine=engine)
        return DedupFrames(kept=pd.read_parquet(kept.path), removed=pd.read_parquet(removed.path), report=report)



def plot_cluster_sizes(report: dict[str, Any], path: Path) -> Path:
    """Bar chart of cluster sizes per reason (PNG), without pyplot's global state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    hist = report.get("cluster_size_histogram", {})
    width = 0.8 / max(1, len(hist))
    for k, (reason, counts) in enumerate(sorted(hist.items())):
        xs = np.array([int(s) for s in counts], dtype=float)
        ax.bar(xs + k * width, list(counts.values()), width=width, label=reason)
    ax.set_xlabel("cluster size (rows)")
    ax.set_ylabel("clusters")
    ax.set_yscale("log")
    ax.set_title(f"dedup clusters: {report.get('rows_in', 0)} in, {report.get('rows_removed', 0)} removed")
    if hist:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def dedup(
    *, datasets: list[DatasetRef], cfg: DedupConfig, out_dir: Path, heldout: DatasetRef | None = None,
    stage: str = "dedup",
) -> DedupResult:
    """The dedup stage: deduplicate ``datasets`` (and drop rows leaking ``heldout``), write the audit trail.

    Writes ``kept.parquet``, ``removed.parquet``, ``report.json`` and ``cluster_sizes.png`` in ``out_dir``.

    Args:
        datasets: inputs, concatenated in this order (``first`` keeps the earliest).
        cfg: the pipeline's ``dedup`` section.
        out_dir: the stage folder.
        heldout: held-out set to check for leaks (its rows are never removed here).
        stage: stage name (dataset names); e.g. ``dedup_augmented`` for the pass against the held-out set.

    Returns:
        DedupResult: refs to the kept and removed rows and the report's path.
    """
    out_dir = Path(out_dir)
    # Every pass (the main one and dedup_augmented's held-out pass) streams shard by shard.
    kept, removed, got_report = dedup_files(datasets=datasets, cfg=cfg, out_dir=out_dir, stage=stage, heldout=heldout)
    report = {**got_report, "inputs": [r.to_dict() for r in datasets],
              "outputs": {"kept": kept.to_dict(), "removed": removed.to_dict()}}
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    plot_cluster_sizes(report, out_dir / "cluster_sizes.png")
    return DedupResult(kept=kept, removed=removed, report=str(report_path))


def _markdown(report: dict[str, Any], stage: str) -> str:
    lines = [
        f"### {stage}: {report['rows_in']} rows in, {report['rows_kept']} kept, {report['rows_removed']} removed",
        "",
        "| reason | removed |", "|---|---|",
        *[f"| {r} | {v} |" for r, v in report["removed_by_reason"].items()],
        "",
        "| reason | similarity | prompt a | prompt b |", "|---|---|---|---|",
    ]
    for p in report["sample_pairs"][:10]:
        a = p["prompt_a"].replace("|", "\\|").replace("\n", " ")[:80]
        b = p["prompt_b"].replace("|", "\\|").replace("\n", " ")[:80]
        lines.append(f"| {p['reason']} | {p['similarity']} | {a} | {b} |")
    return "\n".join(lines)


@task(name="dedup", cache_policy=stage_cache_policy(), persist_result=True, **IO_RETRIES)
def dedup_task(
    datasets: list[DatasetRef], cfg: DedupConfig, *, ctx: StageContext, stage: str = "dedup",
    heldout: DatasetRef | None = None,
) -> DedupResult:
    """Prefect task: ``dedup`` in its own nested MLflow run; logs datasets, counts, report, plot, UI artifacts.

    ``ctx`` (flow-run context: MLflow ids, run folder) is not part of the cache key.
    """
    import mlflow

    with stage_run(ctx, stage):
        out_dir = ctx.stage_dir(stage)
        for ref in datasets:
            log_dataset(ref, context=f"{stage}.input")
        if heldout is not None:
            log_dataset(heldout, context=f"{stage}.heldout")
        result = dedup(datasets=datasets, cfg=cfg, out_dir=out_dir, heldout=heldout, stage=stage)
        report = json.loads(Path(result.report).read_text())
        log_dataset(result.kept, context=f"{stage}.output")
        log_dataset(result.removed, context=f"{stage}.removed")
        mlflow.log_metrics({
            "rows_in": report["rows_in"], "rows_kept": report["rows_kept"], "rows_removed": report["rows_removed"],
            **{f"removed_{r}": v for r, v in report["removed_by_reason"].items()},
        })
        mlflow.log_params({"threshold": cfg.near.threshold, "keep": cfg.keep, "ngram": cfg.near.ngram,
                           "num_perm": cfg.near.num_perm, "semantic": cfg.semantic.enabled})
        log_json(report, f"{stage}/report.json")
        mlflow.log_artifact(str(out_dir / "cluster_sizes.png"), artifact_path=stage)
        table_artifact(f"{stage}-per-source", [{"source": s, **v} for s, v in report["per_source"].items()],
                       description=f"{stage}: rows per source (in, removed by reason, kept)")
        markdown_artifact(f"{stage}-summary", _markdown(report, stage), description=f"{stage} summary")
        write_marker(ctx.layout.stage_dir(stage), outputs=result, stage=stage)  # last: what a cache hit verifies
        return result

"""Ingestion: raw instruction files → one canonical Parquet dataset + a quarantine Parquet.

Reads every source of a pipeline (local file, glob, ``datasets.save_to_disk`` folder or hub id),
converts each row of a known format into the canonical record (``sftflow.data.formats`` holds the
formats and their converters; ``sftflow.data.readers`` the file containers), and mixes the sources
by weight / cap. Nothing disappears silently:

* a bad row (malformed JSON line, missing field, wrong type, duplicate key, JSON nested absurdly
  deep, blank or invisible-only instruction or response, invalid UTF-8, absurdly long) goes to the
  quarantine file (``sftflow.data.quarantine``) with its source file, row number, a readable reason
  and its raw text (truncated); the good rows go on. Each record keeps ``source_row`` so later
  stages can point back to the same line;
* a whole file that is unreadable, empty, not valid JSON as a document (with line and column),
  not UTF-8 (with the byte offset), a table without a column its format needs, or of an unknown
  format raises ``IngestError`` naming the file and what was expected;
* per source: ``read = kept + quarantined`` and ``kept = mixed + not_sampled`` (mixing only ever
  takes a subset; rows left out by a weight or cap are counted, not hidden);
* a file in UTF-16/32 (with or without a byte-order mark) is decoded and the encoding logged; an
  undecodable byte quarantines the row holding it, with its byte offset;
* keys a row carries that its format does not read (a KTO ``label`` the format would not use, an
  ``id``...) are counted per source and key (``unknown_keys`` in
  ``report.json``, the log and the summary), never ignored silently.

Each file is read once; the sha256 of those bytes is what lineage logs (``IngestResult.files``).
Memory: each file's task writes its records to a Parquet part (``execution.shard_rows`` records
converted at a time); caps and weights draw row numbers only, and the mixture is streamed from the
parts shard by shard, so the stage never holds more than one file's parsed rows.
``SourceConfig.format`` is one of ``sftflow.data.formats.FORMATS`` or ``auto`` (detected per file
and logged).

Run it inside the flow (``flows/``) or directly::

    from tasks.ingest import ingest
    result = ingest(sources=cfg.sources, cfg=cfg.ingest, out_dir=Path(...))
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from sftflow.config import resolve_paths
from sftflow.config_sections import IngestConfig, SourceConfig
from sftflow.data.formats import LoadedRecords, convert_rows, load_records
from sftflow.data.quarantine import quarantine_frame, quarantine_row
from sftflow.data.readers import FILE_SUFFIXES, IngestError, is_saved_dataset, read_hub
from sftflow.data.records import make_record, records_to_frame, replace_lone_surrogates
from sftflow.data.refs import DatasetRef, sha256_file, write_parquet
from sftflow.data.shards import parquet_rows
from sftflow.ops.orchestration import (
    IO_RETRIES,
    markdown_artifact,
    retry_unless,
    run_logger,
    stage_cache_policy,
    table_artifact,
)
from sftflow.markers import write_marker
from sftflow.results import IngestResult, SourceCounts, SourceFile
from sftflow.tracking.runs import StageContext, log_dataset, log_json, stage_run


# --------------------------------------------------------------------------- one source
def resolve_files(src: SourceConfig) -> list[Path]:
    """Files (or one save_to_disk folder) named by ``src.path``; raises IngestError when none."""
    if src.path is None:
        raise IngestError(f"source {src.name!r}: no `path` (a file, a glob or a saved dataset folder) and no `hub`")
    p = Path(src.path).expanduser()
    if any(ch in src.path for ch in "*?["):
        hits = resolve_paths(src.path)  # THE path-setting resolver (sftflow.config)
        files = [h for h in hits if h.is_file() or is_saved_dataset(h)]
        if not files:
            raise IngestError(f"source {src.name!r}: glob {src.path} matches no file "
                              f"(expected files ending in {'/'.join(FILE_SUFFIXES)})")
        return files
    if not p.exists():
        raise IngestError(f"source {src.name!r}: file not found: {p}")
    if p.is_dir():
        if is_saved_dataset(p):
            return [p]
        inside = sorted(x.name for x in p.iterdir())[:5]
        raise IngestError(
            f"source {src.name!r}: {p} is a folder but not a `datasets.save_to_disk` folder "
            f"(expected a file {'/'.join(FILE_SUFFIXES)}, a glob such as {p}/*.jsonl, or a folder with "
            f"dataset_info.json/dataset_dict.json; it holds {inside or 'nothing'})"
        )
    return [p]


@dataclass
class _SourceOut:
    records: list[dict]
    quarantine: list[dict]
    formats: list[str]
    files: list[SourceFile]
    read: int
    unknown_keys: Counter = field(default_factory=Counter)
    detected: list[tuple[str, str]] = field(default_factory=list)  # (file, format) detected by ``auto``
    unknown_by_file: list[tuple[str, str, dict]] = field(default_factory=list)  # (file, format, key counts)
    encodings: list[tuple[str, str]] = field(default_factory=list)  # (file, encoding) read as other than UTF-8
    parts: list[tuple[str, int]] = field(default_factory=list)  # (Parquet file, rows): records written, not held

    @property
    def kept(self) -> int:
        """Records this source kept (held in ``records`` or written to ``parts``)."""
        return len(self.records) + sum(n for _, n in self.parts)


def _load(src: SourceConfig, path: Path | None, cfg: IngestConfig) -> LoadedRecords:
    """One file of ``src`` (or its hub dataset, ``path=None``), converted row by row."""
    where = f"the source {src.name!r}"
    if path is None:
        rows = read_hub(src.hub, split=src.hub_split, what=f"source {src.name!r}")
        return convert_rows(rows, label=src.hub, format=src.format, tabular=True, columns=src.columns,
                            max_record_chars=cfg.max_record_chars, where=where, reasoning=src.reasoning,
                            preference=src.preference)
    return load_records(path, format=src.format, columns=src.columns, max_record_chars=cfg.max_record_chars,
                        split=src.hub_split, where=where, reasoning=src.reasoning, preference=src.preference)


def ingest_file(args: tuple) -> _SourceOut:
    """Read and convert one file of a source (or its hub dataset, ``path=None``): the per-file map step.

    Pure apart from reading the file: ``args`` is ``(src, path, cfg)``; logging happens in the merge
    (``ingest_source``), so this runs the same in a Ray worker. With ``(src, path, cfg, part,
    chunk_rows)`` the records are written to the Parquet file ``part`` (``chunk_rows`` records
    converted at a time) and only their count comes back (``parts``): the stage's bounded-memory path.
    """
    src, path, cfg, *to_file = args
    out = _SourceOut(records=[], quarantine=[], formats=[], files=[], read=0)
    got = _load(src, path, cfg)
    fname = src.hub if path is None else path.name
    source = replace_lone_surrogates(f"{src.name}:{fname}")  # an undecodable file name still fits Parquet
    out.detected = [(got.path, got.format)] if got.detected else []
    out.encodings = [(got.path, got.encoding)] if got.encoding not in ("utf-8", "") else []
    if got.format != "auto":
        out.formats.append(got.format)
    for bad in got.rejected:
        out.quarantine.append(quarantine_row(stage="ingest", source=source, file=got.path, row=bad.row,
                                             reason=bad.reason, raw=bad.raw))

    def records(recs: Any) -> list[dict]:
        return [make_record(rec.messages, source=source, source_row=rec.row, tools=rec.tools, answer=rec.answer,
                            category=replace_lone_surrogates(rec.category or src.category or ""))  # valid UTF-8
                for rec in recs]

    out.read += got.read
    out.unknown_keys.update(dict(got.unknown_keys))
    out.unknown_by_file = [(got.path, got.format, dict(got.unknown_keys))] if got.unknown_keys else []
    out.files.append(SourceFile(source=src.name, path=got.path, sha256=got.sha256, rows=got.read))
    if not to_file:
        out.records = records(got.records)
        return out
    part, chunk_rows = to_file
    n = len(got.records)
    if n <= chunk_rows:  # one frame: the same bytes as the whole-list path
        write_parquet(records_to_frame(records(got.records)), part)
    else:
        chunks = []
        for k, lo in enumerate(range(0, n, chunk_rows)):
            chunks.append(f"{part}.chunk-{k:05d}")
            write_parquet(records_to_frame(records(got.records[lo : lo + chunk_rows])), chunks[-1])
        del got
        _join_parts(chunks, part)
    out.parts = [(part, n)]
    return out


def _join_parts(chunks: list[str], path: str) -> None:
    """Stream record chunks into one Parquet file (deleting them); chunks whose columns differ in type
    (e.g. only some carry ``tool_calls`` turns) are joined in memory instead, where pandas unifies them."""
    import pyarrow.parquet as pq

    from sftflow.data.shards import concat_parquet

    schemas = [pq.read_schema(c).remove_metadata() for c in chunks if pq.ParquetFile(c).metadata.num_rows]
    if all(sc.equals(schemas[0]) for sc in schemas):
        concat_parquet(chunks, path, name="records")
        return
    frames = [pd.read_parquet(c) for c in chunks]
    write_parquet(pd.concat(frames, ignore_index=True), path)
    for c in chunks:
        Path(c).unlink()


def merge_files(src: SourceConfig, parts: list[_SourceOut]) -> _SourceOut:
    """One source's files merged in file order (the merge step); logs what each file reported."""
    out = _SourceOut(records=[], quarantine=[], formats=[], files=[], read=0)
    log = run_logger(__name__)
    for part in parts:
        for path, fmt in part.detected:
            log.info("source %s: %s detected as format %r", src.name, path, fmt)
        for path, enc in part.encodings:
            log.info("source %s: %s decoded as %s", src.name, path, enc.upper())
        for path, fmt, keys in part.unknown_by_file:
            log.warning("source %s: %s: keys the %s format does not read (rows): %s", src.name, path, fmt, keys)
        out.records.extend(part.records)
        out.parts.extend(part.parts)
        out.quarantine.extend(part.quarantine)
        out.formats.extend(part.formats)
        out.files.extend(part.files)
        out.read += part.read
        out.unknown_keys.update(part.unknown_keys)
    return out


def _source_paths(src: SourceConfig) -> list[Path | None]:
    return [None] if src.hub else list(resolve_files(src))


def ingest_source(src: SourceConfig, cfg: IngestConfig, *, engine: Any = None) -> _SourceOut:
    """Read and convert one source (all its files, one engine task per file); bad rows become quarantine rows.

    Accounting per file: every non-blank line/row becomes exactly one record or one quarantine
    row (a Self-Instruct task: one per instance), so ``read = kept + quarantined`` always holds.
    """
    from sftflow.engine import current_engine

    engine = engine or current_engine()
    return merge_files(src, engine.map(ingest_file, [(src, path, cfg) for path in _source_paths(src)]))


# --------------------------------------------------------------------------- mixing
def mixture_counts(available: list[int], weights: list[float | None]) -> list[int]:
    """How many rows to take from each source.

    No weights: every row (caps were applied before). Weights: the largest mixture whose
    per-source shares equal ``w_i / sum(w)`` without repeating rows (so the scarcest source,
    relative to its weight, is taken whole and the others are downsampled).
    """
    if all(w is None for w in weights):
        return list(available)
    total_w = sum(weights)  # type: ignore[arg-type]
    shares = [w / total_w for w in weights]  # type: ignore[operator]
    size = min(a / s for a, s in zip(available, shares))
    return [min(a, int(math.floor(s * size + 1e-9))) for a, s in zip(available, shares)]


# --------------------------------------------------------------------------- the stage
def ingest(*, sources: list[SourceConfig], cfg: IngestConfig, out_dir: Path, engine: Any = None) -> IngestResult:
    """Ingest every source into ``out_dir/dataset.parquet`` (+ ``quarantine.parquet``, ``report.json``).

    Args:
        sources: the pipeline's sources (read in order).
        cfg: limits (``max_quarantine_fraction``, ``max_record_chars``, ``mixture_seed``).
        out_dir: the stage folder.
        engine: ``sftflow.engine.Engine`` that reads the files (one task per file; default: the
            active one, local when none). The result does not depend on it.

    Returns:
        IngestResult with both dataset refs and per-source counts.

    Raises:
        IngestError: a file/source cannot be read at all, the weights are inconsistent, or a
            source's quarantined fraction exceeds ``max_quarantine_fraction`` (the quarantine
            file is written first so the bad rows can be inspected).
    """
    if not sources:
        raise IngestError("no sources given (pipelines.<name>.sources is empty)")
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        missing = [s.name for s in sources if s.weight is None]
        raise IngestError(f"sources {missing}: give every source a `weight`, or none (weights are relative shares)")
    out_dir = Path(out_dir)
    from sftflow.engine import current_engine

    engine = engine or current_engine()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Every file of every source is one task (sources are read in order, files in name order); each
    # task writes its records to a Parquet part, so no process holds more than one file's rows.
    jobs = [[(s, path, cfg) for path in _source_paths(s)] for s in sources]
    flat_jobs = [(*j, str(out_dir / f"records.part-{k:05d}.parquet"), engine.shard_rows)
                 for k, j in enumerate(j for per_source in jobs for j in per_source)]
    try:
        flat = engine.map(ingest_file, flat_jobs)
    except BaseException:  # a bad file: no record parts of the other files left behind
        for j in flat_jobs:
            for leftover in out_dir.glob(Path(j[3]).name + "*"):
                leftover.unlink(missing_ok=True)
        raise
    outs, at = [], 0
    for s, per_source in zip(sources, jobs):
        outs.append(merge_files(s, flat[at : at + len(per_source)]))
        at += len(per_source)
    del flat

    # Caps first (seeded, so a capped source is a random, reproducible subset, not its first rows).
    # Only row numbers are drawn (the same draws as over the records themselves).
    rng = np.random.default_rng(cfg.mixture_seed)
    pools: list[np.ndarray] = []
    for s, o in zip(sources, outs):
        pool = np.arange(o.kept, dtype=np.int64)
        if s.max_rows is not None and len(pool) > s.max_rows:
            pool = pool[np.sort(rng.choice(len(pool), size=s.max_rows, replace=False))]
        pools.append(pool)
    take = mixture_counts([len(p) for p in pools], [s.weight for s in sources])
    selected: list[np.ndarray] = []
    counts: list[SourceCounts] = []
    for s, o, pool, n in zip(sources, outs, pools, take):
        if n < len(pool):
            pool = pool[np.sort(rng.choice(len(pool), size=n, replace=False))]
        selected.append(pool)
        counts.append(SourceCounts(
            source=s.name, formats=",".join(sorted(set(o.formats))), files=len(o.files), read=o.read,
            kept=o.kept, quarantined=len(o.quarantine), mixed=len(pool),
            not_sampled=o.kept - len(pool), unknown_keys=tuple(sorted(o.unknown_keys.items())),
        ))

    q_rows = [q for o in outs for q in o.quarantine]
    quarantine = write_parquet(quarantine_frame(q_rows), out_dir / "quarantine.parquet", name="ingest_quarantine")
    dataset = _write_mixture(outs, selected, out_dir / "dataset.parquet", shard_rows=engine.shard_rows)
    result = IngestResult(dataset=dataset, quarantine=quarantine, counts=tuple(counts),
                          files=tuple(f for o in outs for f in o.files))
    for c in counts:
        run_logger(__name__).info("source %s (%s): read %d = kept %d + quarantined %d; mixed %d (%.1f%%)",
                                  c.source, c.formats, c.read, c.kept, c.quarantined, c.mixed,
                                  100 * result.mixture()[c.source])
    (out_dir / "report.json").write_text(json.dumps(report(result), indent=2, sort_keys=True))

    too_bad = [c for c in counts if c.read and c.quarantined / c.read > cfg.max_quarantine_fraction]
    if too_bad:
        lines = [f"{c.source}: {c.quarantined}/{c.read} rows quarantined ({c.quarantined / c.read:.1%})" for c in too_bad]
        reasons = {k: int(v) for k, v in pd.Series([q["reason"] for q in q_rows]).value_counts().head(5).items()}
        bad_names = {c.source for c in too_bad}
        first = [f"{q['file']} row {q['row']}: {q['reason']}" for q in q_rows
                 if q["source"].split(":", 1)[0] in bad_names][:3]
        raise IngestError(
            f"too many bad rows (ingest.max_quarantine_fraction={cfg.max_quarantine_fraction}): " + "; ".join(lines)
            + f". Top reasons: {reasons}. First bad rows: " + "; ".join(first)
            + f". Bad rows are in {quarantine.path}"
        )
    return result


def _write_mixture(outs: list[_SourceOut], selected: list[np.ndarray], path: Path, *, shard_rows: int) -> DatasetRef:
    """Write the selected rows of every source's record parts (in source, file, row order) to ``path``.

    Streams shard by shard; one part taken whole is renamed (its bytes are what one frame of all the
    records gives). Deletes the parts.
    """
    parts = [(p, n) for o in outs for p, n in o.parts]
    if len(parts) == 1 and len(selected[[bool(o.parts) for o in outs].index(True)]) == parts[0][1]:
        Path(parts[0][0]).replace(path)
        return DatasetRef(path=str(path), sha256=sha256_file(path), num_rows=parts[0][1], name="ingested")
    frames = _selected_frames(outs, selected, shard_rows=shard_rows)
    if sum(len(x) for x in selected) <= shard_rows:  # small: one frame, the same bytes as one list of records
        got = [f for f in frames]
        nonempty = [f for f in got if len(f)] or got[:1]
        frame = pd.concat(nonempty, ignore_index=True) if nonempty else records_to_frame([])
        return write_parquet(frame, path, name="ingested")
    pieces: list[str] = []
    for frame in frames:
        pieces.append(str(path.parent / f"mixture.piece-{len(pieces):05d}.parquet"))
        write_parquet(frame, pieces[-1])
    _join_parts(pieces, str(path))
    return DatasetRef(path=str(path), sha256=sha256_file(path), num_rows=parquet_rows(path), name="ingested")


def _selected_frames(outs: list[_SourceOut], selected: list[np.ndarray], *, shard_rows: int) -> Any:
    """Frames of the selected rows, part by part and ``shard_rows`` at a time (parts are deleted once read)."""
    from sftflow.data.shards import read_rows

    for o, sel in zip(outs, selected):
        start = 0
        for p, n in o.parts:
            local = sel[(sel >= start) & (sel < start + n)] - start
            for lo in range(0, n, shard_rows):
                rows = local[(local >= lo) & (local < lo + shard_rows)] - lo
                if len(rows):
                    yield read_rows(p, lo, min(n, lo + shard_rows)).iloc[rows]
            start += n
            Path(p).unlink()


def report(result: IngestResult) -> dict[str, Any]:
    """JSON-able summary: per-source accounting and the realised mixture."""
    mix = result.mixture()
    return {
        "dataset": result.dataset.to_dict(),
        "quarantine": result.quarantine.to_dict(),
        "sources": [{**c.__dict__, "unknown_keys": dict(c.unknown_keys), "share": round(mix[c.source], 6)}
                    for c in result.counts],
        "files": [f.__dict__ for f in result.files],
        "totals": {k: sum(getattr(c, k) for c in result.counts)
                   for k in ("read", "kept", "quarantined", "mixed", "not_sampled")},
    }


@task(name="ingest", cache_policy=stage_cache_policy(), persist_result=True, **IO_RETRIES,
      retry_condition_fn=retry_unless(IngestError))
def ingest_task(sources: list[SourceConfig], cfg: IngestConfig, *, ctx: StageContext) -> IngestResult:
    """Prefect task: run ``ingest`` in its own nested MLflow run and publish the accounting."""
    import mlflow

    with stage_run(ctx, "ingest"):
        out_dir = ctx.stage_dir("ingest")
        mlflow.log_params({f"source.{s.name}": s.path or s.hub for s in sources})
        try:
            result = ingest(sources=sources, cfg=cfg, out_dir=out_dir)
        except IngestError:
            # The failed stage run still carries the bad rows and the accounting, for the post-mortem.
            for name in ("quarantine.parquet", "report.json"):
                if (out_dir / name).exists():
                    mlflow.log_artifact(str(out_dir / name), "ingest")
            raise
        for c in result.counts:
            for k in ("read", "kept", "quarantined", "mixed", "not_sampled"):
                mlflow.log_metric(f"{c.source}.{k}", getattr(c, k))
        rep = report(result)
        for k, v in rep["totals"].items():
            mlflow.log_metric(f"rows_{k}", v)
        df = result.dataset.read()
        log_dataset(result.dataset, context="ingest.output", df=df)
        if result.quarantine.num_rows:
            log_dataset(result.quarantine, context="ingest.quarantine")
        # Each source file as its own input, with the sha256 of the bytes this run parsed as digest.
        for f in result.files:
            if f.sha256:
                _log_source_file(f)
        log_json(rep, "ingest/report.json")
        mlflow.log_artifact(result.quarantine.path, "ingest")
        rows = [{**{k: v for k, v in c.__dict__.items() if k != "unknown_keys"},
                 "unknown_keys": ", ".join(f"{k} ({n})" for k, n in c.unknown_keys),
                 "share": f"{result.mixture()[c.source]:.1%}"} for c in result.counts]
        table_artifact("ingest-accounting", rows, description="rows read = kept + quarantined; kept = mixed + not_sampled")
        markdown_artifact("ingest-summary", _markdown(result), description="ingestion summary")
        write_marker(ctx.layout.stage_dir("ingest"), outputs=result, stage="ingest")  # last: what a cache hit verifies
        return result


def _log_source_file(f: SourceFile) -> None:
    """Log one raw source file as an MLflow input; its digest is the sha256 of the bytes ingestion parsed."""
    import mlflow

    path = Path(f.path)
    ds = mlflow.data.from_pandas(pd.DataFrame({"file": [f.path]}), source=f.path, name=f"{f.source}:{path.name}",
                                 digest=f.sha256[:36])
    mlflow.log_input(ds, context="ingest.source", tags={"sftflow.sha256": f.sha256, "sftflow.rows": str(f.rows)})


def _markdown(result: IngestResult) -> str:
    lines = ["# Ingestion", "", "| source | formats | read | kept | quarantined | mixed | share |", "|---|---|---|---|---|---|---|"]
    mix = result.mixture()
    for c in result.counts:
        lines.append(f"| {c.source} | {c.formats} | {c.read} | {c.kept} | {c.quarantined} | {c.mixed} | {mix[c.source]:.1%} |")
    unknown = [f"- {c.source}: " + ", ".join(f"`{k}` ({n} rows)" for k, n in c.unknown_keys)
               for c in result.counts if c.unknown_keys]
    if unknown:
        lines += ["", "Keys the rows carry that their format does not read (ignored):", *unknown]
    lines += ["", f"Dataset: `{result.dataset.path}` ({result.dataset.num_rows} rows, sha256 `{result.dataset.sha256[:12]}`)",
              f"Quarantine: `{result.quarantine.path}` ({result.quarantine.num_rows} rows)"]
    return "\n".join(lines)
"""The dedup driver: exact, MinHash-LSH near, semantic and held-out leak passes over Parquet files.

``dedup_files`` is THE driver (bounded memory: per-shard scans, compact arrays for the merge,
per-shard writes); the stage around it is ``tasks/dedup.py`` (``dedup``, ``dedup_task``, and
``deduplicate`` for frames in memory). The per-shard workers ``dedup_scan_shard`` and
``dedup_write_shard`` stay module-level functions: the Ray engine (``sftflow/engine.py``) ships
them to workers by reference.

Clusters are connected components of the verified pairs (union-find semantics); one row per cluster
is kept by ``cfg.keep``: ``longest_response`` (ties: first seen), ``first`` (input order: datasets in the
order given, rows in file order) or ``source_priority`` (the first entry of ``cfg.source_priority`` that
equals the row's ``source`` or its dataset name before ``:``; unlisted sources rank last; ties: first).
Near-duplicate pairs are verified with the exact Jaccard of their shingle sets, so every reported
pair is at or above ``cfg.near.threshold`` (see ``sftflow/data/minhash.py`` for the engine).
Removed rows carry ``REMOVED_COLUMNS``; ``reason`` is one of ``REASONS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from sftflow.config_sections import DedupConfig
from sftflow.data.minhash import connected_components, find_near_duplicates
from sftflow.data.neardup import (
    ParquetTexts,
    exact_keys_shard,
    find_cross_duplicates,
    leak_key,
    lsh_params,
    strongest_matches,
)
from sftflow.data.records import check_accounting, prompt_text, response_text
from sftflow.data.refs import DatasetRef, write_parquet
from sftflow.data.semantic import embed_texts, semantic_pairs

REASONS: tuple[str, ...] = ("exact", "near", "semantic", "leak")
REMOVED_COLUMNS: tuple[str, ...] = ("cluster_id", "kept_id", "matched_id", "reason", "similarity")
_REQUIRED = ("id", "messages", "source")
_SAMPLE_PAIRS = 20


def _priority(df: pd.DataFrame, cfg: DedupConfig) -> np.ndarray:
    """Primary sort key of the keep rule (smaller is kept first); ties go to input order."""
    n = len(df)
    if cfg.keep == "first":
        return np.zeros(n)
    if cfg.keep == "longest_response":
        return -np.fromiter((len(response_text(m)) for m in df["messages"]), dtype=np.float64, count=n)
    rank = {}
    for k, name in enumerate(cfg.source_priority):
        rank.setdefault(name, k)
    last = len(cfg.source_priority)
    return np.array(
        [min(rank.get(s, last), rank.get(str(s).split(":", 1)[0], last)) for s in df["source"]], dtype=np.float64
    )


def _cluster(
    n: int, pairs: np.ndarray, sims: np.ndarray, priority: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clusters of ``pairs``: (representative per row, best matched row per row, its similarity, cluster label).

    Rows in no pair are their own representative.
    """
    label = connected_components(n, pairs)
    order = np.lexsort((np.arange(n), priority, label))  # by cluster, then keep rule, then input order
    first_of_label = np.ones(n, dtype=bool)
    first_of_label[1:] = label[order][1:] != label[order][:-1]
    rep_of_label = np.full(n, -1, dtype=np.int64)
    rep_of_label[label[order][first_of_label]] = order[first_of_label]
    rep = rep_of_label[label]
    # For the audit trail: each row's strongest verified edge (its evidence for being in the cluster).
    best_sim = np.full(n, -1.0)
    best_match = np.arange(n, dtype=np.int64)
    if len(pairs):
        ends = np.concatenate([pairs[:, 0], pairs[:, 1]])
        other = np.concatenate([pairs[:, 1], pairs[:, 0]])
        s = np.concatenate([sims, sims])
        o = np.lexsort((-s, ends))  # per row, highest similarity first
        firsts = np.ones(len(o), dtype=bool)
        firsts[1:] = ends[o][1:] != ends[o][:-1]
        best_match[ends[o][firsts]] = other[o][firsts]
        best_sim[ends[o][firsts]] = s[o][firsts]
    return rep, best_match, best_sim, label


class _ClusterStep(NamedTuple):
    """One clustering pass over live rows ``idx``: representatives, matches, and the stage's report entry."""

    rep: np.ndarray
    match: np.ndarray
    best: np.ndarray
    gone: np.ndarray
    sizes: list[int]
    stage: dict[str, Any]


def _cluster_step(idx: np.ndarray, pairs: np.ndarray, sims: np.ndarray, priority: np.ndarray,
                  extra: dict[str, Any]) -> _ClusterStep:
    """Cluster the live rows ``idx`` by ``pairs`` (local indices); ``gone`` = local rows that are not representatives.

    Every pass of ``dedup_files`` (exact, near, semantic) goes through it.
    """
    rep, match, best, label = _cluster(len(idx), pairs, sims, priority[idx])
    gone = np.flatnonzero(rep != np.arange(len(idx)))
    sizes = np.bincount(label)
    stage = {
        "rows_in": int(len(idx)),
        "pairs": int(len(pairs)),
        "clusters": int((sizes > 1).sum()),
        "removed": int(len(gone)),
        "min_pair_similarity": float(sims.min()) if len(sims) else None,
        **extra,
    }
    return _ClusterStep(rep, match, best, gone, sorted(int(x) for x in sizes[sizes > 1]), stage)


def _size_histogram(cluster_sizes: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    """Per reason, how many clusters had each size (the report's ``cluster_size_histogram``)."""
    return {reason: {str(k): int(v) for k, v in sorted(pd.Series(s).value_counts().items())}
            for reason, s in cluster_sizes.items()}


def check_columns(df: pd.DataFrame, *, what: str) -> None:
    """Raise ValueError naming ``what`` when ``df`` lacks a column dedup needs (``id``, ``messages``, ``source``)."""
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; dedup needs canonical records (sftflow.data.records)")


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- streaming (the file stage)
_READ_COLUMNS = ("id", "messages", "source")


def _key_hash(text: str) -> bytes:
    """16-byte digest of a normalised exact key (b"" for an empty key, which never matches)."""
    import hashlib

    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest() if text else b""


def dedup_scan_shard(args: tuple) -> dict[str, Any]:
    """Compact per-row facts of rows ``[start, stop)`` of one input file (the per-shard map step; pure).

    ``args`` is ``(path, start, stop, cfg)``. Reads only ``id``, ``messages`` and ``source`` and returns
    numpy arrays: ids, 16-byte digests of the normalised exact keys (equal keys, equal digests;
    empty keys marked), the keep-rule priority and the source of each row (codes into ``sources``).
    """
    from sftflow.data.shards import read_rows

    import pyarrow.parquet as pq

    path, start, stop, cfg = args
    have = pq.ParquetFile(str(path)).schema_arrow.names
    check_columns(pd.DataFrame(columns=have), what=f"dedup input {path}")
    df = read_rows(path, start, stop, columns=list(_READ_COLUMNS))
    n = len(df)
    if cfg.enabled and cfg.exact.enabled:
        keys = exact_keys_shard((list(df["messages"]), cfg.exact))
        digests = np.array([_key_hash(k) for k in keys], dtype="S16")
        nonempty = np.fromiter((bool(k) for k in keys), dtype=bool, count=n)
        del keys
    else:
        digests, nonempty = np.zeros(n, dtype="S16"), np.zeros(n, dtype=bool)
    codes, sources = pd.factorize(df["source"].astype(str), sort=False)
    return {"ids": df["id"].astype(str).to_numpy().astype(np.str_) if n else np.zeros(0, dtype="U1"),
            "digests": digests, "nonempty": nonempty,
            "priority": _priority(df, cfg) if n else np.zeros(0), "source_codes": codes.astype(np.int32),
            "sources": [str(s) for s in sources]}


def _exact_pairs_digest(digests: np.ndarray, nonempty: np.ndarray) -> np.ndarray:
    """``_exact_pairs`` over key digests: (first row of a group, other row) of equal non-empty keys."""
    n = len(digests)
    if n == 0:
        return np.zeros((0, 2), np.int64)
    _, first_of_code, codes = np.unique(digests, return_index=True, return_inverse=True)
    first = first_of_code[codes.reshape(-1)]
    idx = np.arange(n)
    mask = nonempty & (first != idx)
    return np.stack([first[mask], idx[mask]], axis=1).astype(np.int64) if mask.any() else np.zeros((0, 2), np.int64)


def dedup_write_shard(args: tuple) -> dict[str, Any]:
    """Write the kept rows and the removed rows (per reason) of rows ``[start, stop)`` of one input file.

    The per-shard write step (pure but for its files): ``args`` is ``(path, start, stop, removed,
    kept_path, removed_paths)`` where ``removed`` maps a shard-local row to ``(reason, kept_id,
    matched_id, similarity)``. ``removed_paths`` holds one path per reason; a reason without rows in
    this shard writes nothing. With ``kept_path`` None the frames come back instead of being written
    (the one-shard case, written exactly as the in-memory ``deduplicate`` writes them).
    """
    from sftflow.data.shards import read_rows

    path, start, stop, removed, kept_path, removed_paths = args
    df = read_rows(path, start, stop).reset_index(drop=True)
    gone = np.zeros(len(df), dtype=bool)
    gone[[i for i in removed]] = True
    kept = df[~gone].reset_index(drop=True)
    parts: dict[str, pd.DataFrame] = {}
    for reason in REASONS:
        local = sorted(i for i, r in removed.items() if r[0] == reason)
        if not local:
            continue
        rows = df.iloc[local].copy()
        rows["cluster_id"] = [f"{reason}:{removed[i][1]}" for i in local]
        rows["kept_id"] = np.array([removed[i][1] for i in local], dtype=object)
        rows["matched_id"] = np.array([removed[i][2] for i in local], dtype=object)
        rows["reason"] = reason
        rows["similarity"] = np.array([removed[i][3] for i in local], dtype=float)
        parts[reason] = rows
    empty_removed = df.iloc[0:0].assign(
        **{c: pd.Series(dtype=float if c == "similarity" else object) for c in REMOVED_COLUMNS})
    if kept_path is None:
        return {"kept": kept, "removed": parts, "empty_removed": empty_removed}
    write_parquet(kept, kept_path)
    written = {}
    for reason, rows in parts.items():
        write_parquet(rows, removed_paths[reason])
        written[reason] = removed_paths[reason]
    if not parts:  # keeps the schema of an all-empty removed file exactly as the in-memory path writes it
        write_parquet(empty_removed, removed_paths["_empty"])
        written["_empty"] = removed_paths["_empty"]
    return {"kept": len(kept), "removed": written}


def dedup_files(*, datasets: list[DatasetRef], cfg: DedupConfig, out_dir: Path, stage: str = "dedup",
                heldout: DatasetRef | None = None, engine: Any = None) -> tuple[DatasetRef, DatasetRef, dict[str, Any]]:
    """THE dedup driver: exact, near, semantic and held-out leak passes over Parquet ``datasets`` in bounded memory.

    1. scan (per shard, ``dedup_scan_shard``): ids, exact-key digests, keep-rule priority, source;
    2. merge: exact pairs from the digests, near pairs from MinHash-LSH over the live rows' key texts
       (``ParquetTexts``: each signature task reads its own rows), semantic pairs from embeddings
       computed a chunk of texts at a time, clustering over all rows; then, given ``heldout``, the
       live rows that leak it (``find_cross_duplicates``, the split stage's rule: the live rows'
       prompts are the queries, the held-out rows are read block by block);
    3. write (per shard, ``dedup_write_shard``): the kept rows and the removed rows of each reason,
       streamed into ``kept.parquet`` / ``removed.parquet`` (removed in reason order, then input order).

    Only compact arrays (ids, digests, priorities, band keys, signatures' low bytes, embeddings,
    labels; for the leak pass the live rows' prompt texts) exist for all rows at once; row contents
    are held one shard at a time.

    Returns:
        ``(kept, removed, report)``.

    Raises:
        ValueError: an input or the held-out file lacks a canonical column.
        AccountingError: rows in != kept + removed (a bug; never silently).
    """
    from sftflow.data.shards import concat_parquet
    from sftflow.engine import current_engine, shard_bounds

    engine = engine or current_engine()
    shard = engine.shard_rows
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if heldout is not None:
        _check_file_columns(heldout.path, what="dedup heldout")
    files = [(r.path, r.num_rows) for r in datasets]
    jobs = [(ref.path, lo, hi) for ref in datasets for lo, hi in shard_bounds(ref.num_rows, shard) if hi > lo]
    scans = engine.map(dedup_scan_shard, [(*j, cfg) for j in jobs])
    n = sum(len(s["ids"]) for s in scans)
    ids = np.concatenate([s["ids"] for s in scans]) if scans else np.zeros(0, dtype="U1")
    digests = np.concatenate([s["digests"] for s in scans]) if scans else np.zeros(0, dtype="S16")
    nonempty = np.concatenate([s["nonempty"] for s in scans]) if scans else np.zeros(0, dtype=bool)
    priority = np.concatenate([s["priority"] for s in scans]) if scans else np.zeros(0)
    code_of: dict[str, int] = {}
    src_parts = []
    for s in scans:
        remap = np.array([code_of.setdefault(name, len(code_of)) for name in s["sources"]] or [0], dtype=np.int32)
        src_parts.append(remap[s["source_codes"]] if len(s["source_codes"]) else s["source_codes"])
    source_names = list(code_of)
    src = np.concatenate(src_parts) if src_parts else np.zeros(0, np.int32)
    del scans

    alive = np.ones(n, dtype=bool)
    reason_of = np.full(n, -1, dtype=np.int8)
    kept_of = np.full(n, -1, dtype=np.int64)
    match_of = np.full(n, -1, dtype=np.int64)
    sim_of = np.zeros(n, dtype=np.float64)
    report: dict[str, Any] = {"rows_in": n, "enabled": cfg.enabled, "keep": cfg.keep, "stages": {}}
    sample_pairs: list[tuple[str, int, int, float]] = []
    cluster_sizes: dict[str, list[int]] = {}

    def apply(reason: str, idx: np.ndarray, pairs: np.ndarray, sims: np.ndarray, extra: dict[str, Any]) -> None:
        step = _cluster_step(idx, pairs, sims, priority, extra)
        rep, match, best, gone = step.rep, step.match, step.best, step.gone
        cluster_sizes[reason], report["stages"][reason] = step.sizes, step.stage
        if len(gone):
            g = idx[gone]
            reason_of[g] = REASONS.index(reason)
            kept_of[g] = idx[rep[gone]]
            match_of[g] = idx[match[gone]]
            sim_of[g] = best[gone].astype(float)
            alive[g] = False
        for (a, b), s in list(zip(pairs, sims))[:_SAMPLE_PAIRS]:
            sample_pairs.append((reason, int(idx[a]), int(idx[b]), float(s)))

    if cfg.enabled and n:
        if cfg.exact.enabled:
            pairs = _exact_pairs_digest(digests, nonempty)
            apply("exact", np.arange(n), pairs, np.ones(len(pairs)), {"key": cfg.exact.key})
        del digests, nonempty
        if cfg.near.enabled:
            idx = np.flatnonzero(alive)
            texts = ParquetTexts(files, idx, key=cfg.near.key)
            res = find_near_duplicates(texts, lsh_params(cfg.near), map_fn=engine.map, shard_docs=shard)
            apply("near", idx, res.pairs, res.similarity, {
                "key": cfg.near.key, "threshold": cfg.near.threshold, "shingle": f"{cfg.near.shingle} {cfg.near.ngram}-grams",
                "num_perm": cfg.near.num_perm, "bands": res.bands, "rows": res.rows, "verify": cfg.near.verify,
                "candidates": res.num_candidates, "rows_without_shingles": res.num_shingleless,
            })
            del res, texts
        if cfg.semantic.enabled:
            idx = np.flatnonzero(alive)
            emb = embed_texts(ParquetTexts(files, idx, key=cfg.near.key), cfg.semantic, chunk_rows=shard)
            pairs, sims = semantic_pairs(emb, cfg.semantic.threshold)
            apply("semantic", idx, pairs, sims, {"model": cfg.semantic.model, "threshold": cfg.semantic.threshold})
            del emb
    leak_of: dict[int, tuple[str, float]] = {}  # removed row -> (held-out id it leaks, similarity)
    leak_samples: list[tuple[int, int, float]] = []  # (row, held-out position, similarity)
    if heldout is not None and n:
        idx = np.flatnonzero(alive)
        key = leak_key(cfg)
        # The one leak rule (sftflow.data.neardup), the same one the split stage applies.
        # The live rows' prompts are the queries (read a shard at a time: only the texts are held);
        # the held-out rows are the reference, read block by block.
        lazy = ParquetTexts(files, idx, key=key)
        queries = [t for lo in range(0, len(lazy), shard) for t in lazy[lo : lo + shard].load()]
        pairs = find_cross_duplicates(queries,
                                      ParquetTexts([(heldout.path, heldout.num_rows)], np.arange(heldout.num_rows), key=key),
                                      cfg=cfg, map_fn=engine.map, shard_docs=shard)
        del lazy, queries
        best = strongest_matches(pairs)  # each leaking row: its most similar held-out row
        hid = _read_ids(heldout)
        for t in sorted(best):
            g = int(idx[t])
            reason_of[g] = REASONS.index("leak")
            leak_of[g] = (hid[best[t].match], float(best[t].similarity))
            alive[g] = False
        for p in sorted(pairs, key=lambda p: (p.match, p.query))[:_SAMPLE_PAIRS]:  # held-out order
            leak_samples.append((int(idx[p.query]), int(p.match), float(p.similarity)))
        report["stages"]["leak"] = {
            "heldout_rows": int(heldout.num_rows), "pairs": len(pairs), "removed": len(best),
            "threshold": cfg.near.threshold,
            "min_pair_similarity": min((p.similarity for p in pairs), default=None),
        }

    # Write: one task per shard; removed rows carry their representative's and match's ids.
    write_jobs, at = [], 0
    one = len(jobs) == 1
    for k, (path, lo, hi) in enumerate(jobs):
        gl = np.flatnonzero(reason_of[at : at + hi - lo] >= 0)
        removed = {int(i): (("leak", leak_of[at + i][0], leak_of[at + i][0], leak_of[at + i][1])
                            if (at + i) in leak_of else
                            (REASONS[reason_of[at + i]], str(ids[kept_of[at + i]]), str(ids[match_of[at + i]]),
                             float(sim_of[at + i]))) for i in gl}
        paths = {r: str(out_dir / f"removed.{r}.shard-{k:05d}.parquet") for r in (*REASONS, "_empty")}
        write_jobs.append((path, lo, hi, removed, None if one else str(out_dir / f"kept.shard-{k:05d}.parquet"), paths))
        at += hi - lo
    written = engine.map(dedup_write_shard, write_jobs)
    n_kept = int(alive.sum())
    n_removed = int((reason_of >= 0).sum())
    if one:
        got = written[0]
        kept = write_parquet(got["kept"], out_dir / "kept.parquet", name=f"{stage}.kept")
        parts = [got["removed"][r] for r in REASONS if r in got["removed"]]
        removed_df = pd.concat(parts, ignore_index=True) if parts else got["empty_removed"]
        removed = write_parquet(removed_df, out_dir / "removed.parquet", name=f"{stage}.removed")
        del got, parts, removed_df, written
    elif not jobs:  # no input rows at all: empty outputs with the inputs' columns
        frames = [ref.read() for ref in datasets]
        empty = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(_REQUIRED))
        check_columns(empty, what="dedup input")
        kept = write_parquet(empty.iloc[0:0], out_dir / "kept.parquet", name=f"{stage}.kept")
        removed = write_parquet(empty.iloc[0:0].assign(
            **{c: pd.Series(dtype=float if c == "similarity" else object) for c in REMOVED_COLUMNS}),
            out_dir / "removed.parquet", name=f"{stage}.removed")
    else:
        kept = concat_parquet([str(out_dir / f"kept.shard-{k:05d}.parquet") for k in range(len(jobs))],
                              out_dir / "kept.parquet", name=f"{stage}.kept")
        rparts = [w["removed"][r] for r in REASONS for w in written if r in w["removed"]]
        empties = [w["removed"]["_empty"] for w in written if "_empty" in w["removed"]]
        if not rparts:
            rparts, empties = empties[:1], empties[1:]
        for p in empties:
            Path(p).unlink()
        removed = concat_parquet(rparts, out_dir / "removed.parquet", name=f"{stage}.removed")
    check_accounting("dedup", n, kept=kept.num_rows, removed=removed.num_rows)
    check_accounting("dedup", n, kept=n_kept, removed=n_removed)

    # Report: per-source counts from the compact arrays; sample pairs read back from the files.
    by_reason = {r: int((reason_of == k).sum()) for k, r in enumerate(REASONS)}
    per_source: dict[str, dict[str, int]] = {}
    counts_in = np.bincount(src, minlength=len(source_names)) if n else np.zeros(0, np.int64)
    for name in sorted(source_names):
        c = code_of[name]
        per_source[name] = {"in": int(counts_in[c]),
                            **{r: int(((src == c) & (reason_of == k)).sum()) for k, r in enumerate(REASONS)}}
        per_source[name]["kept"] = per_source[name]["in"] - sum(per_source[name][r] for r in REASONS)
    hist = _size_histogram(cluster_sizes)
    need = sorted({i for _, a, b, _ in sample_pairs for i in (a, b)} | {a for a, _, _ in leak_samples})
    rows_of = _read_rows_at(datasets, np.array(need, dtype=np.int64))
    samples = [_pair_sample_rows(reason, rows_of[a], rows_of[b], s) for reason, a, b, s in sample_pairs]
    if leak_samples:
        held_of = _read_rows_at([heldout], np.array(sorted({m for _, m, _ in leak_samples}), dtype=np.int64))
        samples += [_pair_sample_rows("leak", rows_of[a], held_of[m], s) for a, m, s in leak_samples]
    report.update({"rows_kept": n_kept, "rows_removed": n_removed, "removed_by_reason": by_reason,
                   "per_source": per_source, "cluster_size_histogram": hist, "sample_pairs": samples})
    return kept, removed, report


def _check_file_columns(path: str, *, what: str) -> None:
    import pyarrow.parquet as pq

    check_columns(pd.DataFrame(columns=pq.ParquetFile(str(path)).schema_arrow.names), what=f"{what} {path}")


def _read_ids(ref: DatasetRef) -> list[str]:
    """The ``id`` column of ``ref`` as strings (one column read; the held-out set's ids for leak records)."""
    import pyarrow.parquet as pq

    return [str(x) for x in pq.read_table(ref.path, columns=["id"]).column("id").to_pylist()]


def _read_rows_at(datasets: list[DatasetRef], rows: np.ndarray) -> dict[int, dict[str, Any]]:
    """``id``, ``source`` and ``messages`` of the sorted global rows ``rows`` of the concatenated ``datasets``."""
    from sftflow.data.shards import take_column

    out: dict[int, dict[str, Any]] = {int(i): {} for i in rows}
    start = 0
    for ref in datasets:
        lo, hi = np.searchsorted(rows, [start, start + ref.num_rows])
        local = rows[lo:hi] - start
        for col in _READ_COLUMNS:
            for g, v in zip(rows[lo:hi], take_column(ref.path, local, col)):
                out[int(g)][col] = v
        start += ref.num_rows
    return out


def _pair_sample_rows(reason: str, row_a: dict[str, Any], row_b: dict[str, Any], sim: float) -> dict[str, Any]:
    return {
        "reason": reason, "similarity": round(float(sim), 4),
        "id_a": str(row_a["id"]), "id_b": str(row_b["id"]),
        "source_a": str(row_a["source"]), "source_b": str(row_b["source"]),
        "prompt_a": _short(prompt_text(row_a["messages"])), "prompt_b": _short(prompt_text(row_b["messages"])),
    }

"""Split: a deterministic, leak-free train / held-out split of the clean dataset.

1. Rows are put in a canonical order (by ``id``) and shuffled with ``split.seed``, so the split
   depends only on the content and the seed, not on the input row order.
2. The held-out set takes ``heldout_size`` rows (or ``heldout_fraction`` of them), optionally
   stratified by ``source`` or ``category`` (each stratum gets its proportional share, largest
   remainder first, every stratum with >= 2 rows keeps at least one training row).
3. Leakage: a held-out row that duplicates a training row leaks, by the one rule the dedup stage
   uses too (``sftflow.data.neardup.find_cross_duplicates`` on ``dedup.near.key``): equal normalized
   keys are an exact leak, a MinHash near-duplicate (Jaccard >= ``dedup.near.threshold``) a near
   leak. The check always runs (switching dedup off does not switch leak checks off).
   Leaks follow ``dedup.cross_split``:
   ``move`` puts the held-out row into train, ``drop`` removes it from both (written to
   ``leaks.parquet``). Either way they are counted and reported; the held-out set may end up
   smaller than asked, never contaminated.

Accounting: rows in = train + held-out + dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from sftflow.config_sections import DedupConfig, SplitConfig
from sftflow.data.neardup import ParquetTexts, find_cross_duplicates, leak_key, strongest_matches
from sftflow.data.records import check_accounting
from sftflow.data.refs import DatasetRef, write_parquet
from sftflow.errors import DataError
from sftflow.engine import current_engine
from sftflow.ops.orchestration import (
    IO_RETRIES,
    markdown_artifact,
    retry_unless,
    run_logger,
    stage_cache_policy,
    table_artifact,
)
from sftflow.markers import write_marker
from sftflow.results import SplitResult
from sftflow.tracking.runs import StageContext, log_dataset, log_json, stage_run


class SplitError(DataError):
    """The dataset cannot be split as configured; the message names the config key.

    A user error (``sftflow.errors.DataError``): the CLI prints it in one line and exits with 4.
    """


def heldout_count(n: int, cfg: SplitConfig) -> int:
    """How many rows to hold out; raises SplitError naming the key when impossible."""
    if n < 2:
        raise SplitError(f"split: only {n} row(s) remain after ingest, validation and dedup; need at least 2 "
                         "(one train, one held-out); add data or check the quarantine files")
    if cfg.heldout_size is not None:
        if cfg.heldout_size >= n:
            raise SplitError(f"split.heldout_size={cfg.heldout_size} must be smaller than the dataset ({n} rows): "
                             f"only {n} row(s) remain after ingest, validation and dedup, which leaves none for "
                             f"training; use a heldout_size of at most {n - 1} or add data")
        return cfg.heldout_size
    if cfg.heldout_fraction is None:
        raise SplitError("split: set heldout_fraction or heldout_size")
    return int(min(max(round(cfg.heldout_fraction * n), 1), n - 1))


def _quotas(sizes: dict[str, int], k: int) -> dict[str, int]:
    """Proportional held-out quota per stratum (largest remainder), leaving >= 1 train row where possible."""
    n = sum(sizes.values())
    exact = {s: k * c / n for s, c in sizes.items()}
    quota = {s: min(int(np.floor(v)), max(sizes[s] - 1, 0)) for s, v in exact.items()}
    # Remaining rows go by largest remainder (name breaks ties); a stratum's last row only when unavoidable.
    order = sorted(sizes, key=lambda s: (-(exact[s] - quota[s]), s))
    for cap in (lambda s: sizes[s] - 1, lambda s: sizes[s]):
        for s in order:
            while sum(quota.values()) < k and quota[s] < cap(s) and quota[s] < np.ceil(exact[s]):
                quota[s] += 1
        for s in order:
            while sum(quota.values()) < k and quota[s] < cap(s):
                quota[s] += 1
    return quota


def choose_heldout(df: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    """Boolean mask of held-out rows (seeded; stratified when configured)."""
    n = len(df)
    k = heldout_count(n, cfg)
    rng = np.random.default_rng(cfg.seed)
    # Canonical order first, so the same content + seed gives the same split whatever the input order.
    canon = np.lexsort((np.arange(n), df["id"].astype(str).to_numpy()))
    perm = canon[rng.permutation(n)]
    mask = np.zeros(n, dtype=bool)
    if cfg.stratify_by is None:
        mask[perm[:k]] = True
        return mask
    if cfg.stratify_by not in df.columns:
        raise SplitError(f"split.stratify_by={cfg.stratify_by!r}: no such column in the dataset")
    strata = df[cfg.stratify_by].astype(str).to_numpy()
    sizes = pd.Series(strata).value_counts().to_dict()
    quota = _quotas({str(s): int(c) for s, c in sizes.items()}, k)
    taken = {s: 0 for s in quota}
    for i in perm:  # walk the seeded permutation, filling each stratum's quota
        s = strata[i]
        if taken[s] < quota[s]:
            mask[i] = True
            taken[s] += 1
    return mask


def split_write_shard(args: tuple) -> dict[str, Any]:
    """Write the train and held-out rows of rows ``[start, stop)`` of the input (the per-shard write step).

    ``args`` is ``(path, start, stop, side, train_path, heldout_path)``; ``side`` holds one code per row
    (0 train, 1 held-out, 2 dropped). With ``train_path`` None the two frames come back instead (the
    one-shard case, written exactly as before).
    """
    from sftflow.data.shards import read_rows

    path, start, stop, side, train_path, heldout_path = args
    df = read_rows(path, start, stop).reset_index(drop=True)
    train_df, held_df = df[side == 0], df[side == 1]
    if train_path is None:
        return {"train": train_df, "heldout": held_df}
    write_parquet(train_df, train_path)
    write_parquet(held_df, heldout_path)
    return {"train": len(train_df), "heldout": len(held_df)}


def _columns_of(dataset: DatasetRef, columns: list[str]) -> pd.DataFrame:
    """Only ``columns`` of ``dataset`` (those it has), read batch by batch: compact, never the messages."""
    import pyarrow.parquet as pq

    from sftflow.data.shards import read_rows

    have = set(pq.ParquetFile(dataset.path).schema_arrow.names)
    return read_rows(dataset.path, 0, dataset.num_rows, columns=[c for c in columns if c in have])


def split(*, dataset: DatasetRef, cfg: SplitConfig, dedup: DedupConfig, out_dir: Path) -> SplitResult:
    """Split ``dataset`` into train / held-out so that no held-out row duplicates a training row.

    Streams the file: the held-out rows are chosen from the ``id`` (and stratum) column only, the
    leak check reads the training texts shard by shard (``sftflow.data.neardup.ParquetTexts``), and
    both sides are written shard by shard (``split_write_shard``, one engine task each). Row contents
    are never held for more than one shard.

    Args:
        dataset: clean canonical records (after dedup).
        cfg: sizes, stratification and seed (pipelines.yaml ``split:``).
        dedup: normalization switches (``exact``), near-duplicate settings (``near``) and what to
            do with leaking held-out rows (``cross_split``: move | drop).
        out_dir: the stage folder.
    """
    from sftflow.data.shards import concat_parquet
    from sftflow.engine import shard_bounds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not dataset.exists():
        dataset.read()  # raises the DatasetRef's own error (missing file / changed bytes)
    cols = _columns_of(dataset, ["id", *([cfg.stratify_by] if cfg.stratify_by else [])])
    mask = choose_heldout(cols, cfg)
    ids = cols["id"].astype(str).to_numpy()
    strata = cols[cfg.stratify_by].astype(str).to_numpy() if cfg.stratify_by else None
    del cols
    requested = int(mask.sum())
    key = leak_key(dedup)

    # The one leak rule: a held-out row leaks when it duplicates a training row (exactly or nearly).
    held_pos, train_pos = np.flatnonzero(mask), np.flatnonzero(~mask)
    engine = current_engine()  # MinHash shards and pair verification as the engine's tasks; same pairs either way
    held_texts = ParquetTexts([(dataset.path, dataset.num_rows)], held_pos, key=key).load()
    train_texts = ParquetTexts([(dataset.path, dataset.num_rows)], train_pos, key=key)
    pairs = find_cross_duplicates(held_texts, train_texts, cfg=dedup, key=key, map_fn=engine.map,
                                  shard_docs=engine.shard_rows)
    del held_texts, train_texts
    # (Held-out rows duplicating each other do not leak into training; dedup handles those.)
    exact_idx = sorted({int(held_pos[p.query]) for p in pairs if p.exact})
    leak_reason: dict[int, str] = {i: f"exact: same normalized {key} as a training row" for i in exact_idx}
    near_idx: list[int] = []
    for h, p in sorted(strongest_matches(q for q in pairs if int(held_pos[q.query]) not in leak_reason).items()):
        i = int(held_pos[h])
        near_idx.append(i)
        leak_reason[i] = f"near: similarity {p.similarity:.3f} with training row {ids[train_pos[p.match]]}"

    leaks = sorted(leak_reason)
    side = np.where(mask, 1, 0).astype(np.int8)
    if leaks:
        side[leaks] = 0 if dedup.cross_split == "move" else 2
    n_dropped = int((side == 2).sum())
    n_held = int((side == 1).sum())
    if n_held == 0:
        raise SplitError(f"every held-out row leaked into train ({len(leaks)} leaks); "
                         "the dataset has too many duplicate prompts — run dedup or raise split.heldout_size")

    bounds = shard_bounds(dataset.num_rows, engine.shard_rows)
    one = len(bounds) == 1
    jobs = [(dataset.path, lo, hi, side[lo:hi], None if one else str(out_dir / f"train.shard-{k:05d}.parquet"),
             None if one else str(out_dir / f"heldout.shard-{k:05d}.parquet")) for k, (lo, hi) in enumerate(bounds)]
    got = engine.map(split_write_shard, jobs)
    if one:
        train = write_parquet(got[0]["train"], out_dir / "train.parquet", name="train")
        heldout = write_parquet(got[0]["heldout"], out_dir / "heldout.parquet", name="heldout")
    else:
        train = concat_parquet([j[4] for j in jobs], out_dir / "train.parquet", name="train")
        heldout = concat_parquet([j[5] for j in jobs], out_dir / "heldout.parquet", name="heldout")
    del got
    leaks_df = df_leaks(dataset, leak_reason, dedup.cross_split)
    write_parquet(leaks_df, out_dir / "leaks.parquet", name="leaks")
    rep = {
        "rows_in": dataset.num_rows,
        "train": train.num_rows,
        "heldout": heldout.num_rows,
        "heldout_requested": requested,
        "leaks_exact": len(exact_idx),
        "leaks_near": len(near_idx),
        "leak_key": key,
        "cross_split": dedup.cross_split,
        "dropped": n_dropped,
        "stratify_by": cfg.stratify_by,
        "seed": cfg.seed,
        "heldout_by_stratum": (pd.Series(strata[side == 1]).value_counts().sort_index().to_dict()
                               if cfg.stratify_by else {}),
        "train_by_stratum": (pd.Series(strata[side == 0]).value_counts().sort_index().to_dict()
                             if cfg.stratify_by else {}),
    }
    check_accounting("split", rep["rows_in"], train=rep["train"], heldout=rep["heldout"], dropped=rep["dropped"])
    run_logger(__name__).info("split: train %d, held-out %d (asked %d); leaks exact %d, near %d (%s)", train.num_rows,
                   heldout.num_rows, requested, len(exact_idx), len(near_idx), dedup.cross_split)
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(rep, indent=2, sort_keys=True))
    return SplitResult(train=train, heldout=heldout, leaks_moved=len(leaks), leaks_exact=len(exact_idx),
                       leaks_near=len(near_idx), dropped=n_dropped, report=str(report_path))


def df_leaks(dataset: DatasetRef, reasons: dict[int, str], action: str) -> pd.DataFrame:
    """The leaking held-out rows with the reason and what was done (for the report / MLflow).

    Reads the ``id`` and ``source`` of the leaking rows only.
    """
    from sftflow.data.shards import read_rows, take_column

    idx = sorted(reasons)
    if not idx:
        out = read_rows(dataset.path, 0, 0, columns=["id", "source"])
    else:
        rows = np.array(idx, dtype=np.int64)
        out = pd.DataFrame({c: pd.Series(take_column(dataset.path, rows, c), dtype=object) for c in ("id", "source")})
    out["reason"] = [reasons[i] for i in idx]
    out["action"] = action
    return out.reset_index(drop=True)


@task(name="split", cache_policy=stage_cache_policy(), persist_result=True, **IO_RETRIES,
      retry_condition_fn=retry_unless(SplitError))
def split_task(dataset: DatasetRef, cfg: SplitConfig, dedup: DedupConfig, *, ctx: StageContext) -> SplitResult:
    """Prefect task: split in a nested MLflow run; log both sides, the leak counts and the report."""
    import mlflow

    with stage_run(ctx, "split"):
        out_dir = ctx.stage_dir("split")
        mlflow.log_params({"split.seed": cfg.seed, "split.heldout_fraction": cfg.heldout_fraction,
                           "split.heldout_size": cfg.heldout_size, "split.stratify_by": cfg.stratify_by,
                           "dedup.cross_split": dedup.cross_split})
        log_dataset(dataset, context="split.input")
        result = split(dataset=dataset, cfg=cfg, dedup=dedup, out_dir=out_dir)
        rep = json.loads(Path(result.report).read_text())
        mlflow.log_metrics({"rows_in": dataset.num_rows, "rows_train": result.train.num_rows,
                            "rows_heldout": result.heldout.num_rows, "leaks_moved": result.leaks_moved,
                            "leaks_exact": result.leaks_exact, "leaks_near": result.leaks_near,
                            "rows_dropped": result.dropped})
        log_dataset(result.train, context="training")
        log_dataset(result.heldout, context="heldout")
        log_json(rep, "split/report.json")
        mlflow.log_artifact(str(out_dir / "leaks.parquet"), "split")
        rows = [{"side": side, "stratum": s, "rows": c}
                for side in ("train", "heldout") for s, c in rep[f"{side}_by_stratum"].items()]
        if rows:
            table_artifact("split-strata", rows, description=f"rows per {cfg.stratify_by}")
        markdown_artifact("split-summary", _markdown(rep), description="train / held-out split")
        write_marker(ctx.layout.stage_dir("split"), outputs=result, stage="split")  # last: what a cache hit verifies
        return result


def _markdown(rep: dict[str, Any]) -> str:
    return "\n".join([
        "# Split", "",
        f"- rows in: {rep['rows_in']} → train {rep['train']}, held-out {rep['heldout']} "
        f"(asked {rep['heldout_requested']}), dropped {rep['dropped']}",
        f"- leaks ({rep['cross_split']}, on the {rep['leak_key']}): exact {rep['leaks_exact']}, near {rep['leaks_near']}",
        f"- seed {rep['seed']}, stratified by {rep['stratify_by'] or 'nothing'}",
    ])

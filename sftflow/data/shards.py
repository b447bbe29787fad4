"""Parquet shards: read a row range of a file in Arrow batches, write a stage output shard by shard.

The data stages map pure per-shard functions over row ranges of their input (``sftflow.engine``);
a shard reads only its own rows (``read_rows``), and the stage output is streamed together from
the shards' files (``concat_parquet``), so no process holds more than a shard plus one batch.
``take_column`` reads one column at chosen rows, touching only the row groups that hold them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sftflow.data.refs import DatasetRef, sha256_file, write_parquet

_BATCH = 16_384


def parquet_rows(path: str | Path) -> int:
    """Row count of a Parquet file (from its footer; no data read)."""
    return pq.ParquetFile(str(path)).metadata.num_rows


def read_rows(path: str | Path, start: int, stop: int, *, batch_rows: int = _BATCH,
              columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows ``[start, stop)`` of a Parquet file as a DataFrame, read batch by batch (bounded memory).

    Row groups wholly outside the range are not read; ``columns`` (default: all) limits what is read.
    """
    pf = pq.ParquetFile(str(path))
    meta = pf.metadata
    groups, first_row, at = [], None, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if at + n > start and at < stop:
            groups.append(g)
            first_row = at if first_row is None else first_row
        at += n
    schema = pf.schema_arrow
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
    if not groups:
        return schema.empty_table().to_pandas()
    tables, pos = [], first_row
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
        lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
        if hi > lo:
            tables.append(batch.slice(lo, hi - lo))
        pos += batch.num_rows
        if pos >= stop:
            break
    table = pa.Table.from_batches(tables, schema=schema) if tables else schema.empty_table()
    return table.to_pandas()


def concat_parquet(parts: Sequence[str | Path], path: str | Path, *, name: str) -> DatasetRef:
    """Stream shard files into one Parquet file (row order = ``parts`` order) and delete the parts.

    One part is renamed as it is (its bytes are what ``write_parquet`` wrote, as without shards).
    """
    path = Path(path)
    parts = [Path(p) for p in parts]
    if len(parts) == 1:
        parts[0].replace(path)
        return DatasetRef(path=str(path), sha256=sha256_file(path), num_rows=parquet_rows(path), name=name)
    schema = None
    for p in parts:  # the first part with rows fixes the schema (an empty part may have null-typed columns)
        s = pq.ParquetFile(str(p))
        if s.metadata.num_rows:
            schema = s.schema_arrow
            break
    if schema is None:
        empty = pd.read_parquet(parts[0])
        for p in parts:
            p.unlink()
        return write_parquet(empty, path, name=name)
    tmp = path.with_suffix(path.suffix + ".tmp")
    rows = 0
    with pq.ParquetWriter(str(tmp), schema) as writer:
        for p in parts:
            pf = pq.ParquetFile(str(p))
            if pf.metadata.num_rows == 0:
                continue
            for batch in pf.iter_batches(batch_size=_BATCH):
                writer.write_table(pa.Table.from_batches([batch]).cast(schema))
                rows += batch.num_rows
    tmp.replace(path)
    for p in parts:
        p.unlink()
    return DatasetRef(path=str(path), sha256=sha256_file(path), num_rows=rows, name=name)


def row_group_bounds(path: str | Path) -> np.ndarray:
    """First row of every row group of a Parquet file, plus the row count at the end (from the footer)."""
    meta = pq.ParquetFile(str(path)).metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


def take_column(path: str | Path, rows: np.ndarray, column: str, *, batch_rows: int = _BATCH) -> list[Any]:
    """Values of ``column`` at the sorted row positions ``rows`` of a Parquet file, as Python objects.

    Only the row groups holding one of ``rows`` are read, batch by batch, so memory is one batch
    plus the values asked for, whatever the size of the file.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return []
    bounds = row_group_bounds(path)
    pf = pq.ParquetFile(str(path))
    out: list[Any] = []
    groups = np.unique(np.searchsorted(bounds, rows, side="right") - 1)
    for g in groups:
        at = int(bounds[g])
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[int(g)], columns=[column]):
            lo, hi = np.searchsorted(rows, [at, at + batch.num_rows])
            if hi > lo:
                out.extend(batch.column(0).take(pa.array(rows[lo:hi] - at)).to_pylist())
            at += batch.num_rows
    return out

"""Small, hashable references that tasks pass to each other (never DataFrames or models).

A ``DatasetRef`` names a Parquet file plus its sha256 and row count, so Prefect cache keys are
deterministic and MLflow gets a real digest for lineage. A ``ModelRef`` names a model directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

# The digests live once, in sftflow.digests; these names are what DatasetRef/ModelRef users import.
from sftflow.digests import dir_sha256, file_sha256, json_sha256

__all__ = ["DatasetRef", "ModelRef", "dir_sha256", "file_sha256", "json_sha256", "sha256_file", "sha256_json",
           "write_parquet"]

sha256_file = file_sha256  # the historic name, same function
sha256_json = json_sha256  # the historic name, same function


@dataclass(frozen=True)
class DatasetRef:
    """A Parquet dataset written by a stage.

    Attributes:
        path: absolute path of the Parquet file.
        sha256: ``sftflow.digests.file_sha256`` of the file.
        num_rows: number of rows.
        name: short logical name (e.g. ``train``, ``heldout``, ``quarantine``).
    """

    path: str
    sha256: str
    num_rows: int
    name: str = "dataset"

    def read(self) -> pd.DataFrame:
        """Load the dataset, refusing a file whose bytes changed since it was written."""
        p = Path(self.path)
        if not p.exists():
            raise FileNotFoundError(f"dataset {self.name!r} is missing: {p} (was the run directory deleted?)")
        digest = sha256_file(p)
        if digest != self.sha256:
            raise ValueError(f"dataset {self.name!r} at {p} changed on disk: sha256 {digest} != {self.sha256}")
        return pd.read_parquet(p)

    def exists(self) -> bool:
        """True when the file is still there with the same bytes."""
        p = Path(self.path)
        return p.exists() and sha256_file(p) == self.sha256

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON reports)."""
        return asdict(self)


def write_parquet(df: pd.DataFrame, path: str | Path, *, name: str = "dataset") -> DatasetRef:
    """Write ``df`` to ``path`` (Parquet, deterministic bytes) and return its reference.

    The file is written to a temporary name and renamed, so a crash never leaves a half file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    df.reset_index(drop=True).to_parquet(tmp, index=False)
    tmp.replace(path)
    return DatasetRef(path=str(path), sha256=sha256_file(path), num_rows=len(df), name=name)


@dataclass(frozen=True)
class ModelRef:
    """A model directory (transformers layout) or an adapter on top of a base model.

    Attributes:
        path: absolute path of the model (or adapter) directory.
        sha256: ``sftflow.digests.dir_sha256`` of the directory.
        kind: ``base`` (full weights), ``adapter`` (peft adapter; see ``base``) or ``merged``.
        base: for adapters, the ModelRef path of the base model; else empty.
        name: the name the user gave (e.g. ``gemma-3-270m``).
        meta: extra JSON-able facts (e.g. the MLflow run id that produced it).
    """

    path: str
    sha256: str
    kind: str = "base"
    base: str = ""
    name: str = ""
    meta: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def meta_dict(self) -> dict[str, str]:
        """``meta`` as a dict."""
        return dict(self.meta)

"""Run layout: every path derives from $SFTFLOW_HOME; refs detect changed files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sftflow import layout
from sftflow.data.records import make_record, record_id, records_to_frame
from sftflow.data.refs import sha256_file, write_parquet


def test_paths_derive_from_home(sftflow_home: Path) -> None:
    assert layout.sftflow_home() == sftflow_home.resolve()
    for p in (layout.models_dir(), layout.runs_dir(), layout.mlflow_dir(), layout.prefect_home()):
        assert sftflow_home.resolve() in p.parents
    assert not sftflow_home.exists()  # asking for a path creates nothing


def test_default_home_is_dot_sftflow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SFTFLOW_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert layout.sftflow_home() == (tmp_path / ".sftflow").resolve()


def test_run_layout(sftflow_home: Path) -> None:
    run = layout.RunLayout.create(pipeline="demo", run_id="abc/../x y")
    assert run.root.parent == layout.runs_dir() / "demo"
    assert "/" not in run.root.name and " " not in run.root.name
    d = run.stage_dir("ingest")
    assert d.is_dir()  # completion markers: tests/unit/test_cache_integrity.py


def test_write_parquet_ref_and_tamper_detection(tmp_path: Path) -> None:
    rec = make_record([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], source="s:f")
    ref = write_parquet(records_to_frame([rec]), tmp_path / "a.parquet", name="a")
    assert ref.num_rows == 1 and ref.sha256 == sha256_file(ref.path)
    assert ref.read().iloc[0]["id"] == rec["id"]
    pd.DataFrame({"x": [1]}).to_parquet(ref.path)
    with pytest.raises(ValueError, match="changed on disk"):
        ref.read()


def test_record_id_is_stable_under_normalization() -> None:
    a = [{"role": "user", "content": "Hello   World"}, {"role": "assistant", "content": "Hi"}]
    b = [{"role": "user", "content": "hello world "}, {"role": "assistant", "content": "HI"}]
    c = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "Bye"}]
    assert record_id(a) == record_id(b) != record_id(c)

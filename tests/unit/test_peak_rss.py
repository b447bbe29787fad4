"""Each stage run logs its own peak RSS (``peak_rss_mb``), and the closing summary table shows it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from sftflow.tracking.peak_rss import METRIC, peak_rss_mb, reset_peak_rss

linux_only = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux procfs")


def _touch(mb: int) -> None:
    """Allocate and write ``mb`` MiB (so the pages become resident), then free them."""
    a = np.ones(mb * 2**20 // 8)
    del a


@linux_only
def test_the_high_water_mark_resets() -> None:
    reset_peak_rss()
    start = peak_rss_mb()
    _touch(300)
    high = peak_rss_mb()
    assert high >= start + 250  # the 300 MiB block was resident at some point
    assert reset_peak_rss()
    assert peak_rss_mb() < high - 250  # the mark is back near the current RSS


@linux_only
def test_each_stage_run_logs_its_own_peak(sftflow_home: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from sftflow.config import PipelineConfig
    from sftflow.config_sections import SourceConfig
    from sftflow.tracking.runs import end_pipeline_run, stage_run, start_pipeline_run

    src = tmp_path / "src.json"
    src.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi"}]))
    ctx = start_pipeline_run(PipelineConfig(sources=[SourceConfig(name="src", path=str(src))]), pipeline="rss",
                             run_id="flow-1", run_dir=sftflow_home / "runs/rss/flow-1")
    with stage_run(ctx, "big") as big:
        _touch(600)
        with stage_run(ctx, "big.helper") as helper:  # a nested helper run leaves the stage's mark alone
            pass
    with stage_run(ctx, "small") as small:
        pass
    end_pipeline_run(ctx)
    client = MlflowClient(ctx.tracking_uri)
    peak = {name: client.get_run(r.info.run_id).data.metrics.get(METRIC)
            for name, r in (("big", big), ("helper", helper), ("small", small))}
    assert peak["helper"] is None
    # The second stage's peak does not include the first one's 600 MiB (MLflow's own imports and
    # caches may grow the resident base a little between the two).
    assert peak["big"] >= peak["small"] + 350, peak


def test_summary_table_has_a_peak_rss_column() -> None:
    from sftflow.ops.summary import StageRow, stage_row, summary_table

    row = stage_row("train", {"train_rows": 80.0, "steps": 40.0, METRIC: 2560.0})
    assert row.peak_rss_mb == 2560.0
    text = summary_table({"pipeline": "p"}, [row, StageRow(name="ingest", seconds=1.0)])
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("stage"))
    train = next(ln for ln in lines if ln.startswith("train"))
    assert "peak RSS" in header
    assert train.index("2.5 GB") + len("2.5 GB") == header.index("peak RSS") + len("peak RSS")  # right-aligned
    assert next(ln for ln in lines if ln.startswith("ingest")).split()[-1] == "-"

"""The whole ``smoke`` pipeline, run as a user runs it, with ``--set execution.engine=ray`` == with ``local``.

Two ``sftflow run smoke`` processes under two fresh ``$SFTFLOW_HOME``s: the default (``local``) and
``--set execution.engine=ray --set execution.num_cpus=2 --set execution.shard_rows=7``, which starts
a private 2-CPU Ray cluster for the run: the data stages map over shards of 7 rows as Ray tasks,
backtranslation's generation and curation scoring and evaluation's generation and loss run as
Ray Data batch inference on model actors. Every stage output of the two runs (ingest, both
quarantines, dedup kept/removed, the split, backtranslation's candidates and curated pairs,
evaluation samples, the side-by-side metrics and the gate's decision) must be the same, and the Ray
run must leave no Ray process behind. (Shard-boundary cases of the merges: ``tests/unit/test_engine_shards.py``.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# Stage outputs compared between the engines (run-dir relative).
OUTPUTS = ["ingest/dataset.parquet", "ingest/quarantine.parquet", "validate/quarantine.parquet",
           "dedup/kept.parquet", "dedup/removed.parquet", "split/train.parquet", "split/heldout.parquet",
           "backtranslate/candidates.parquet", "backtranslate/curated.parquet",
           "evaluate.base/samples_base.parquet", "evaluate.tuned/samples_tuned.parquet",
           "promote/side_by_side.parquet"]


# Small inference batches in BOTH runs, so generation and scoring make several batches and the Ray
# run sends them to its actors (one batch stays in the driver: nothing to share out).
SMALL_BATCHES = ("evaluation.batch_size=2", "augmentation.generation.batch_size=2")


def _run(home: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_"))}
    env["SFTFLOW_HOME"] = str(home)
    args = [sys.executable, "-m", "flows.cli", "run", "smoke"]
    for o in (*SMALL_BATCHES, *overrides):
        args += ["--set", o]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    runs = [p for p in (home / "runs" / "smoke").iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert len(runs) == 1, runs
    return proc, runs[0]


def _comparable(df: pd.DataFrame, *, home: Path) -> pd.DataFrame:
    # Paths name each run's own $SFTFLOW_HOME and timings differ; every other value must match.
    drop = [c for c in df.columns if c in ("file",) or "seconds" in c or c.endswith("_time")]
    df = df.drop(columns=drop).map(lambda v: v.tolist() if hasattr(v, "tolist") else v).astype(str)
    return df.map(lambda v: str(v).replace(str(home), "$SFTFLOW_HOME"))


def test_smoke_pipeline_on_ray_equals_local(tmp_path: Path) -> None:
    local_home, ray_home = tmp_path / "local", tmp_path / "ray"
    local_proc, local_run = _run(local_home)
    before = _ray_processes()
    ray_proc, ray_run = _run(ray_home, "execution.engine=ray", "execution.num_cpus=2", "execution.shard_rows=7")

    # The Ray run really ran on Ray: its own 2-CPU cluster, several shards per data stage, Ray Data
    # datasets for inference; and Ray printed nothing on the console (its logs go to the run's log).
    ray_log = (ray_run / "sftflow.log").read_text(errors="replace")
    assert "Execution engine: ray (a private local cluster on 127.0.0.1: 2 CPUs" in ray_log, ray_log[-3000:]
    assert "shard(s), ray engine" in ray_log and "Starting execution of Dataset" in ray_log, ray_log[-3000:]
    assert "Execution engine: local" in (local_run / "sftflow.log").read_text(errors="replace")
    assert "core_worker" not in ray_proc.stdout + ray_proc.stderr, ray_proc.stderr[-3000:]
    ingested = pd.read_parquet(local_run / "ingest/dataset.parquet")
    assert len(ingested) > 3 * 7

    for rel in OUTPUTS:
        a, b = local_run / rel, ray_run / rel
        assert a.exists() and b.exists(), rel
        pd.testing.assert_frame_equal(_comparable(pd.read_parquet(b), home=ray_home),
                                      _comparable(pd.read_parquet(a), home=local_home), obj=rel)
    for proc in (local_proc, ray_proc):
        assert "Gate:" in proc.stdout

    # Row accounting holds across shards: ingested = valid + quarantined, valid = kept + removed,
    # kept = train + held-out; the quarantine says where each bad row came from.
    out = {rel: pd.read_parquet(ray_run / rel) for rel in OUTPUTS}
    valid = len(out["ingest/dataset.parquet"]) - len(out["validate/quarantine.parquet"])
    assert len(out["dedup/kept.parquet"]) + len(out["dedup/removed.parquet"]) == valid
    assert len(out["split/train.parquet"]) + len(out["split/heldout.parquet"]) == len(out["dedup/kept.parquet"])
    q = out["ingest/quarantine.parquet"]
    assert len(q) and q["source"].str.contains(":").all() and (q["source_row"] >= 0).all()

    # The cluster the run started is gone with it.
    assert _ray_processes() <= before, _ray_processes() - before


def _ray_processes() -> set[str]:
    """pids of Ray's per-cluster daemons (raylet, GCS) on this machine."""
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout
    return set(out.split())

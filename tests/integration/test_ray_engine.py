"""The data stages of the ``smoke`` pipeline on a local Ray cluster (2 CPUs) give what ``local`` gives.

ingest -> validate -> dedup -> split run twice from the same sources: ``execution.engine=local`` with
one shard, and ``execution.engine=ray`` (set the way a user sets it, ``--set``-style overrides) with
shards of a few rows, so every stage really maps over several Ray tasks and merges. Kept ids,
quarantine rows and reasons, removed rows and the split must be identical.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")

from sftflow.config import resolve_pipeline  # noqa: E402
from sftflow.ops import engine as engines  # noqa: E402
from tasks.dedup import dedup  # noqa: E402
from tasks.ingest import ingest  # noqa: E402
from tasks.split import split  # noqa: E402
from tasks.validate import validate  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _data_stages(cfg, out: Path) -> dict[str, pd.DataFrame]:
    """The smoke pipeline's data stages with the active engine; every output as a frame."""
    raw = ingest(sources=cfg.sources, cfg=cfg.ingest, out_dir=out / "ingest")
    valid = validate(dataset=raw.dataset, cfg=cfg.validation, out_dir=out / "validate")
    clean = dedup(datasets=[valid.valid], cfg=cfg.dedup, out_dir=out / "dedup")
    parts = split(dataset=clean.kept, cfg=cfg.split, dedup=cfg.dedup, out_dir=out / "split")
    return {"ingested": raw.dataset.read(), "ingest_quarantine": raw.quarantine.read(),
            "valid": valid.valid.read(), "validate_quarantine": valid.quarantine.read(),
            "kept": clean.kept.read(), "removed": clean.removed.read(),
            "train": parts.train.read(), "heldout": parts.heldout.read()}


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    # The quarantine's `file` names each run's own stage input; everything else must match exactly.
    df = df.drop(columns=[c for c in ("file",) if c in df.columns])
    return df.map(lambda v: v.tolist() if hasattr(v, "tolist") else v).astype(str)


def test_smoke_data_stages_equal_on_ray_and_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the smoke sources are relative paths
    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    local_cfg = resolve_pipeline("smoke")
    assert local_cfg.execution.engine == "local"
    ray_cfg = resolve_pipeline("smoke", overrides={"execution.engine": "ray", "execution.num_cpus": 2,
                                                   "execution.shard_rows": 7})
    assert ray_cfg.execution.engine == "ray" and ray_cfg.execution.address is None

    engines.activate(local_cfg.execution)
    try:
        local = _data_stages(local_cfg, tmp_path / "local")
    finally:
        engines.release()

    engine = engines.activate(ray_cfg.execution)  # starts a private local cluster: nothing was running
    try:
        assert isinstance(engine, engines.RayEngine) and engine.started and ray.is_initialized()
        assert int(ray.cluster_resources()["CPU"]) == 2
        # Several shards per stage: the equality below is about merging, not about one big task.
        assert local["ingested"].shape[0] > 3 * ray_cfg.execution.shard_rows
        on_ray = _data_stages(ray_cfg, tmp_path / "ray")
    finally:
        engines.release()
    assert not ray.is_initialized()  # the flow's engine shut down the cluster it started

    for name in local:
        pd.testing.assert_frame_equal(_comparable(on_ray[name]), _comparable(local[name]), obj=name)
    # Row accounting holds across shards: ingest kept = validate in = valid + quarantined, etc.
    assert len(local["valid"]) + len(local["validate_quarantine"]) == len(local["ingested"])
    assert len(local["kept"]) + len(local["removed"]) == len(local["valid"])
    assert len(local["train"]) + len(local["heldout"]) == len(local["kept"])
    assert set(on_ray["kept"]["id"]) == set(local["kept"]["id"]) and len(local["heldout"]) == 8
    # The quarantine keeps where each bad row came from.
    q = on_ray["ingest_quarantine"]
    assert q.empty or (q["source"].str.contains(":").all() and (q["source_row"] >= 0).all())

"""The smoke pipeline end to end, as a user runs it: `sftflow run smoke` with the embedded
Prefect (ephemeral server, SQLite) and MLflow (SQLite) under a fresh $SFTFLOW_HOME.

Asserts on what MLflow recorded (parent run, nested stage runs, tags, config artifact, datasets,
registered model + alias) and that a second run with nothing changed is served from cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _run_cli(home: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["SFTFLOW_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


# A stage line of the console: "[0:42] ok dedup               Cached       0.4s  served from cache".
_STAGE_LINE = re.compile(r"^\[\d+:\d\d\] (?:ok|!!) (?P<stage>\S+)\s+(?P<state>[A-Za-z]+)\s", re.M)
# Stages whose task never caches (provision resolves the model; promote moves registry aliases).
_NEVER_CACHED = {"provision", "promote"}


def _stage_states(stdout: str) -> list[tuple[str, str]]:
    """(stage, state) of every stage line the console printed, in order."""
    return [(m["stage"], m["state"]) for m in _STAGE_LINE.finditer(stdout)]


@pytest.fixture(scope="module")
def smoke_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smoke-home")


@pytest.fixture(scope="module")
def first_run(smoke_home: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = _run_cli(smoke_home, "run", "smoke")
    return proc, time.monotonic() - t0


def test_smoke_run_records_everything_in_mlflow(first_run, smoke_home: Path) -> None:
    proc, _ = first_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    out = proc.stdout
    assert "MLflow run:" in out and "Run directory:" in out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{smoke_home / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sftflow-smoke")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags.get("sftflow.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    for tag in ("sftflow.pipeline", "sftflow.prefect_flow_run_id", "sftflow.config_hash", "sftflow.git_commit",
                "sftflow.sources_digest"):
        assert parent.data.tags.get(tag), tag
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "config")}
    assert "config/resolved.yaml" in artifacts

    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags.get("sftflow.stage") for r in children}
    assert {"ingest", "validate", "dedup", "split", "train", "evaluate.base", "evaluate.tuned", "promote"} <= stages, stages
    for r in children:
        assert r.data.tags["sftflow.prefect_flow_run_id"] == parent.data.tags["sftflow.prefect_flow_run_id"]
        assert r.info.status == "FINISHED", (r.data.tags.get("sftflow.stage"), r.info.status)

    # datasets logged with our sha256 as digest and the source file
    ingest = next(r for r in children if r.data.tags.get("sftflow.stage") == "ingest")
    inputs = ingest.inputs.dataset_inputs
    assert inputs, "ingest logged no datasets"
    assert all(d.dataset.digest for d in inputs)

    # registered model with alias candidate
    mv = client.get_model_version_by_alias("sftflow-smoke", "candidate")
    assert mv.run_id in {r.info.run_id for r in runs}

    summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary.json")).read_text())
    assert str(summary["model"]["version"]) == str(mv.version)
    assert Path(summary["run_dir"]).is_dir()
    assert str(smoke_home.resolve()) in summary["run_dir"]


def test_second_run_is_served_from_cache(first_run, smoke_home: Path) -> None:
    proc, first_s = first_run
    assert proc.returncode == 0
    t0 = time.monotonic()
    again = _run_cli(smoke_home, "run", "smoke")
    second_s = time.monotonic() - t0
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    first, second = _stage_states(proc.stdout), _stage_states(again.stdout)
    assert len(first) == len(second) and all(st == "Completed" for _, st in first), (first, second)
    # Exactly provision and promote run again (no cache policy: they resolve the model / move aliases);
    # every other stage, named below in order, comes from cache.
    assert [(s, st) for s, st in second if st != "Cached"] == [("provision", "Completed"), ("promote", "Completed")], second
    # (The console names a cached row by its task run, so the curated pairs' passes may read
    # validate / dedup or validate_augmented / dedup_augmented: compared without the suffix.)
    cached = [s.removesuffix("_augmented") for s, st in second if st == "Cached"]
    assert cached == ["ingest", "validate", "dedup", "split", "backtranslate", "validate", "dedup", "train",
                      "evaluate-base", "evaluate-tuned"], second
    print(f"first run {first_s:.1f}s, cached run {second_s:.1f}s; cached: {[s for s, st in second if st == 'Cached']}")


def test_broken_config_fails_before_any_work(tmp_path: Path) -> None:
    bad = tmp_path / "pipelines.yaml"
    bad.write_text((REPO / "pipelines.yaml").read_text().replace("r: 4, alpha: 8", "r: 0, alpha: 8"))
    home = tmp_path / "home"
    proc = _run_cli(home, "run", "smoke", "--file", str(bad), timeout=120)
    assert proc.returncode == 2
    assert "pipelines.smoke.training.lora.r: must be greater than 0 (got 0)" in proc.stderr
    assert not (home / "runs").exists() and not (home / "mlflow").exists()

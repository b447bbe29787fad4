"""Re-runs as a user makes them: `sftflow run smoke -f <own pipelines.yaml>` over sources in a folder
of one's own, then a source rewritten in place, then nothing changed, then a helper in `sftflow/`
edited, then `--no-cache`.

The CLI runs from a snapshot of the project's packages in a tmp folder, so the code-edit step
edits that copy (and edits made elsewhere meanwhile cannot change the code under test).

Real CLI processes, embedded Prefect (ephemeral server, SQLite) and MLflow (SQLite) under a tmp
$SFTFLOW_HOME. Checks what each run recomputed (Prefect's task-run states), what MLflow recorded
(stage runs, registered versions and their digest tags) and that the digests are the files' sha256.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
CACHEABLE = ("ingest", "validate", "dedup", "split", "train", "evaluate-base", "evaluate-tuned")


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run_cli(proj: Path, home: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"SFTFLOW_HOME": str(home), "PYTHONPATH": str(proj)})
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=proj, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _states(logs: str) -> dict[str, str]:
    """Final Prefect state of each stage's task run: ``{"ingest": "Completed", "train": "Cached", ...}``."""
    out = {}
    for m in re.finditer(r"Task run '([a-z_]+(?:-base|-tuned)?)(?:-[0-9a-f]{3})?' - Finished in state (\w+)", logs):
        out[m.group(1)] = m.group(2)
    return out


@dataclass
class Step:
    proc: subprocess.CompletedProcess[str]
    states: dict[str, str]
    parent: Any  # the MLflow parent run this invocation created
    stages: dict[str, Any]  # stage name -> MLflow stage run (only stages that actually ran)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("cache-rerun")
    src_dir, home, proj = root / "sources", root / "home", root / "proj"
    for pkg in ("sftflow", "tasks", "flows"):
        shutil.copytree(REPO / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", proj / "pyproject.toml")
    src_dir.mkdir()
    for f in (REPO / "data" / "smoke").iterdir():
        shutil.copy(f, src_dir / f.name)
    raw = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    smoke = raw["pipelines"]["smoke"]
    for s in smoke["sources"]:
        s["path"] = str(src_dir / Path(s["path"]).name)
    smoke["augmentation"] = {"enabled": False}  # time: backtranslation is covered by test_flow_smoke
    smoke.pop("schedule", None)
    pfile = root / "pipelines.yaml"
    pfile.write_text(yaml.safe_dump({"pipelines": {"smoke": smoke}}, sort_keys=False))
    client = MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    seen: set[str] = set()

    def step(*extra: str) -> Step:
        proc = _run_cli(proj, home, "run", "smoke", "--verbose", "-f", str(pfile), *extra)  # Prefect's per-task lines
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
        exp = client.get_experiment_by_name("sftflow-smoke")
        runs = client.search_runs([exp.experiment_id], max_results=500)
        parents = [r for r in runs if r.data.tags.get("sftflow.kind") == "pipeline" and r.info.run_id not in seen]
        assert len(parents) == 1
        parent = parents[0]
        seen.add(parent.info.run_id)
        stages = {r.data.tags.get("sftflow.stage"): r for r in runs
                  if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        return Step(proc=proc, states=_states(proc.stdout + proc.stderr), parent=parent, stages=stages)

    dolly = src_dir / "dolly_smoke.jsonl"
    first = step()
    first_dolly_sha = _sha256(dolly)
    # Rewrite one source in place: same path, fewer rows.
    lines = dolly.read_text().splitlines(keepends=True)
    dolly.write_text("".join(lines[:30]))
    edited = step()
    edited_files = {Path(s["path"]).name: _sha256(s["path"]) for s in smoke["sources"]}
    unchanged = step()
    # Edit a helper that dedup imports and ingest/validate do not (a comment: same outputs).
    with open(proj / "sftflow" / "data" / "minhash.py", "a") as f:
        f.write("\n# edited by test_cache_rerun\n")
    code_edit = step()
    no_cache = step("--no-cache")
    return {"client": client, "home": home, "proj": proj, "code_edit": code_edit, "first": first, "edited": edited, "unchanged": unchanged,
            "no_cache": no_cache, "rows_before": len(lines), "rows_after": 30,
            "first_dolly_sha": first_dolly_sha, "edited_files": edited_files, "src_dir": src_dir}


def test_first_run_computes_every_stage(scenario: dict[str, Any]) -> None:
    first: Step = scenario["first"]
    assert all(first.states.get(s) == "Completed" for s in CACHEABLE), first.states
    assert first.stages["ingest"].data.metrics["dolly_smoke.read"] == scenario["rows_before"]


def test_source_edited_in_place_recomputes_and_registers_honest_version(scenario: dict[str, Any]) -> None:
    client = scenario["client"]
    first: Step = scenario["first"]
    edited: Step = scenario["edited"]
    # ingest (and every stage downstream of the changed data) recomputed, none served from cache
    assert all(edited.states.get(s) == "Completed" for s in CACHEABLE), edited.states
    assert edited.stages["ingest"].data.metrics["dolly_smoke.read"] == scenario["rows_after"]
    assert edited.parent.data.tags["sftflow.sources_digest"] != first.parent.data.tags["sftflow.sources_digest"]
    # train really trained (not the reused output of run 1) and registered a new version
    train_run = edited.stages["train"]
    assert train_run.data.tags["sftflow.train.reused_output"] == "false"
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "loss")] == [1, 2, 3, 4]
    v1 = client.get_model_version("sftflow-smoke", "1")
    v2 = client.get_model_version("sftflow-smoke", "2")
    assert v2.run_id == train_run.info.run_id
    run_dir = Path(edited.parent.data.tags["sftflow.run_dir"])
    train_pq, heldout_pq = run_dir / "split" / "train.parquet", run_dir / "split" / "heldout.parquet"
    assert v2.tags["sftflow.train.sha256"] == _sha256(train_pq) != v1.tags["sftflow.train.sha256"]
    assert v2.tags["sftflow.heldout.sha256"] == _sha256(heldout_pq)
    assert v2.tags["sftflow.train_key"] != v1.tags["sftflow.train_key"]

    # `sftflow lineage` reports the digests of the bytes this version was trained from.
    import json

    proc = _run_cli(scenario["proj"], scenario["home"], "lineage", "sftflow-smoke/2", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(proc.stdout)
    dg = d["digests"]
    assert dg["mismatches"] == []
    assert dg["train"] == _sha256(train_pq) and dg["heldout"] == _sha256(heldout_pq)
    assert dg["sources"] == edited.parent.data.tags["sftflow.sources_digest"]
    files = {Path(f["path"]).name: f["sha256"] for f in dg["source_files"]}
    assert files == scenario["edited_files"]
    assert files["dolly_smoke.jsonl"] != scenario["first_dolly_sha"]
    text = _run_cli(scenario["proj"], scenario["home"], "lineage", "sftflow-smoke/2", timeout=300)
    assert text.returncode == 0 and _sha256(train_pq) in text.stdout
    assert scenario["edited_files"]["dolly_smoke.jsonl"] in text.stdout


def test_unchanged_rerun_is_served_from_cache(scenario: dict[str, Any]) -> None:
    unchanged: Step = scenario["unchanged"]
    assert all(unchanged.states.get(s) == "Cached" for s in CACHEABLE), unchanged.states
    assert not set(unchanged.stages) & {"ingest", "train"}  # nothing ran, nothing new registered
    # versions: 1 (first run), 2 (edited source), 3 (--no-cache); none from the cached run
    versions = {int(v.version): v.run_id for v in scenario["client"].search_model_versions("name='sftflow-smoke'")}
    assert versions == {1: scenario["first"].stages["train"].info.run_id,
                        2: scenario["edited"].stages["train"].info.run_id,
                        3: scenario["no_cache"].stages["train"].info.run_id}
    assert unchanged.parent.data.tags["sftflow.sources_digest"] == scenario["edited"].parent.data.tags[
        "sftflow.sources_digest"]


def test_code_edit_recomputes_the_stages_that_import_it(scenario: dict[str, Any]) -> None:
    from sftflow.ops.cachekeys import code_closure

    ce: Step = scenario["code_edit"]
    edited = scenario["proj"] / "sftflow" / "data" / "minhash.py"
    modules = {"ingest": "tasks.ingest", "validate": "tasks.validate", "dedup": "tasks.dedup", "split": "tasks.split",
               "train": "tasks.train", "evaluate-base": "tasks.evaluate", "evaluate-tuned": "tasks.evaluate"}
    importers = {s for s, m in modules.items() if edited in code_closure(m, root=scenario["proj"])}
    assert {"dedup"} <= importers and not {"ingest", "validate", "train"} & importers
    for stage in CACHEABLE:
        # importers recompute; the others are cached: upstream of dedup nothing changed, and
        # downstream the recomputed stages wrote the same bytes (a comment was added), so keys that
        # follow content, not the fact that a stage ran, still match.
        assert ce.states.get(stage) == ("Completed" if stage in importers else "Cached"), (stage, ce.states)
    assert set(ce.stages) - {"promote"} == importers  # promote is never cached (it reads the registry)


def test_no_cache_recomputes_and_really_trains(scenario: dict[str, Any]) -> None:
    client = scenario["client"]
    nc: Step = scenario["no_cache"]
    assert all(nc.states.get(s) == "Completed" for s in CACHEABLE), nc.states
    train_run = nc.stages["train"]
    # same inputs as run 2, so the same work folder, but its finished output was not reused
    assert train_run.data.tags["sftflow.train_key"] == scenario["edited"].stages["train"].data.tags["sftflow.train_key"]
    assert train_run.data.tags["sftflow.train.reused_output"] == "false"
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert train_run.data.metrics.get("steps") == 4.0

"""Damaged cached outputs, as a user damages them: after `sftflow run smoke`, truncate dedup's
kept.parquet, replace split's heldout.parquet by another valid Parquet file and truncate the trained
merged/model.safetensors in `_train/<key>`; the next `sftflow run smoke` recomputes exactly those
stages (one console line each naming the file), serves the others from cache, and its outputs equal
the first run's. Before completion markers were read, that rerun failed (ArrowInvalid, "changed on
disk", SafetensorError) until `--no-cache`.

Real CLI processes from a snapshot of the project's packages, embedded Prefect and MLflow under a
tmp $SFTFLOW_HOME (one run, three damages, one rerun).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run(proj: Path, home: Path, pfile: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"SFTFLOW_HOME": str(home), "PYTHONPATH": str(proj)})
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "smoke", "--verbose", "-f", str(pfile)],
                          cwd=proj, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def _states(logs: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(
        r"Task run '([a-z_]+(?:-base|-tuned)?)(?:-[0-9a-f]{3})?' - Finished in state (\w+)", logs)}


def test_damaged_outputs_are_recomputed_once_and_equal_the_first_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    home, proj = tmp_path / "home", tmp_path / "proj"
    for pkg in ("sftflow", "tasks", "flows"):
        shutil.copytree(REPO / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", proj / "pyproject.toml")
    raw = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    smoke = raw["pipelines"]["smoke"]
    for s in smoke["sources"]:
        s["path"] = str(REPO / s["path"]) if not Path(s["path"]).is_absolute() else s["path"]
    smoke["augmentation"] = {"enabled": False}  # time: backtranslation is covered by test_flow_smoke
    smoke.pop("schedule", None)
    pfile = tmp_path / "pipelines.yaml"
    pfile.write_text(yaml.safe_dump({"pipelines": {"smoke": smoke}}, sort_keys=False))

    first = _run(proj, home, pfile)
    assert all(v == "Completed" for k, v in _states(first.stdout + first.stderr).items() if k != "provision")
    run1 = next(p for p in (home / "runs" / "smoke").iterdir() if not p.name.startswith(("_", ".")))
    kept, heldout = run1 / "dedup" / "kept.parquet", run1 / "split" / "heldout.parquet"
    (weights,) = (home / "runs" / "smoke" / "_train").glob("*/merged/model.safetensors")
    before = {"kept": _sha256(kept), "heldout": _sha256(heldout), "weights": _sha256(weights)}
    client = MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")

    def train_metrics(parent_id: str) -> dict[str, float]:
        exp = client.get_experiment_by_name("sftflow-smoke")
        (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' "
                                                                       "and tags.`sftflow.stage` = 'train'")
        return run.data.metrics

    parents = lambda: {r.info.run_id: r for r in client.search_runs(  # noqa: E731
        [client.get_experiment_by_name("sftflow-smoke").experiment_id], filter_string="tags.`sftflow.kind` = 'pipeline'")}
    first_parent = next(iter(parents()))
    first_train = train_metrics(first_parent)

    kept.write_bytes(kept.read_bytes()[: kept.stat().st_size // 2])  # truncated
    rows = pd.read_parquet(heldout)
    rows.iloc[: max(1, len(rows) // 2)].to_parquet(heldout, index=False)  # another valid Parquet file
    weights.write_bytes(weights.read_bytes()[:4096])  # truncated weights in the training folder

    again = _run(proj, home, pfile)
    logs = again.stdout + again.stderr
    states = _states(logs)
    assert {k: states.get(k) for k in ("ingest", "validate", "dedup", "split", "train", "evaluate-base")} == {
        "ingest": "Cached", "validate": "Cached", "dedup": "Completed", "split": "Completed", "train": "Completed",
        "evaluate-base": "Cached"}, states
    said = [ln for ln in logs.splitlines() if "cached output" in ln and "recomputing" in ln]
    for stage, name in (("dedup", "kept.parquet"), ("split", "heldout.parquet"), ("train", "model.safetensors")):
        mine = [ln for ln in said if re.search(rf"Task run '{stage}(-[0-9a-f]{{3}})?' - cached output", ln)]
        assert len(mine) == 1 and name in mine[0] and "changed on disk" in mine[0], said
    # The recomputed outputs are the first run's bytes again (a new run folder; the model retrained in place).
    run2 = next(p for p in (home / "runs" / "smoke").iterdir() if not p.name.startswith(("_", ".")) and p != run1)
    assert _sha256(run2 / "dedup" / "kept.parquet") == before["kept"]
    assert _sha256(run2 / "split" / "heldout.parquet") == before["heldout"]
    second_parent = next(k for k in parents() if k != first_parent)
    second_train = train_metrics(second_parent)
    for key in ("train_loss", "eval_loss", "steps"):
        if key in first_train:
            assert second_train[key] == pytest.approx(first_train[key], abs=1e-4), key
    assert weights.stat().st_size > 4096

"""A `sftflow run` killed with `kill -9` mid-training, as a user would, and what comes after.

* Nothing the killed run started keeps running (Prefect's temporary server dies with it).
* The next `sftflow run` closes the dead run: its MLflow parent and stage runs become KILLED
  with an end time and the tag ``sftflow.terminated_reason``; its Prefect flow run and unfinished
  task runs become Crashed. Training resumes from the last checkpoint and the run completes.
* Two processes initialising the stores of a fresh $SFTFLOW_HOME at once both succeed.

Embedded stores only (SQLite under a fresh $SFTFLOW_HOME, Prefect's temporary server).
Run: ``python -m pytest tests/integration/test_kill_recovery.py``.
"""

from __future__ import annotations

import glob
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftflow.ops import processes
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# Smoke, made to train long enough to be killed in the middle, checkpointing every 2 steps.
OVERRIDES = ["augmentation.enabled=false", "training.max_steps=40", "training.checkpoint_every=2",
             "training.eval_every=20", "training.log_every=1", "evaluation.max_examples=4"]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["SFTFLOW_HOME"] = str(home)
    return env


def _run_argv() -> list[str]:
    argv = [sys.executable, "-m", "flows.cli", "run", "smoke"]
    for o in OVERRIDES:
        argv += ["--set", o]
    return argv


def _checkpoints(home: Path) -> list[str]:
    return [p for p in glob.glob(str(home / "runs" / "smoke" / "_train" / "*" / "checkpoints" / "step-*"))
            if not p.endswith(".tmp")]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _prefect_states(home: Path, flow_run_id: str) -> tuple[str, dict[str, str]]:
    """(flow run state type, {task run name: state type}) read from the Prefect SQLite database."""
    con = sqlite3.connect(home / "prefect" / "prefect.db")
    try:
        (flow_state,) = con.execute("SELECT state_type FROM flow_run WHERE id = ?", (flow_run_id,)).fetchone()
        tasks = dict(con.execute("SELECT name, state_type FROM task_run WHERE flow_run_id = ?", (flow_run_id,)))
    finally:
        con.close()
    return flow_state, tasks


def _mlflow_runs(home: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sftflow-smoke")
    return client.search_runs([exp.experiment_id], max_results=500)


def test_kill_9_mid_training_is_cleaned_up_by_the_next_run_which_resumes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    log = tmp_path / "killed-run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_run_argv(), cwd=REPO, env=_env(home), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    started: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not _checkpoints(home):
            assert proc.poll() is None, f"the run ended ({proc.returncode}) before a checkpoint:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no training checkpoint after 240 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        started = processes.descendants(proc.pid)
        assert any("uvicorn" in _cmdline(p) and "prefect" in _cmdline(p) for p in started), \
            [(_cmdline(p)[:120]) for p in started]
        os.kill(proc.pid, signal.SIGKILL)  # what `kill -9 <pid>` does: the leader only
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while [p for p in started if processes.is_alive(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [(p, _cmdline(p)[:160]) for p in started if processes.is_alive(p)]
        assert survivors == [], f"processes of the killed run still run: {survivors}"
    finally:
        processes.terminate_tree([proc.pid, *started], grace=2)  # never leave anything behind

    # The dead run, as the kill left it: RUNNING everywhere, and its active-run record.
    runs = _mlflow_runs(home)
    (dead,) = [r for r in runs if r.data.tags.get("sftflow.kind") == "pipeline"]
    assert dead.info.status == "RUNNING"
    flow_run_id = dead.data.tags["sftflow.prefect_flow_run_id"]
    dead_train = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == dead.info.run_id
                  and r.data.tags.get("sftflow.stage") == "train"]
    assert [r.info.status for r in dead_train] == ["RUNNING"]
    assert _prefect_states(home, flow_run_id)[0] == "RUNNING"
    assert (home / "runs" / ".active" / f"{flow_run_id}.json").exists()
    step_killed = max(int(Path(p).name.split("-")[1]) for p in _checkpoints(home))

    # The next command cleans up, resumes training from the checkpoint and completes.
    t0 = time.monotonic()
    again = subprocess.run(_run_argv(), cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-6000:]
    assert f"closed run {flow_run_id}" in out, out[-6000:]
    assert "resumed from" in out and "step" in out, out[-6000:]
    print(f"second run: {time.monotonic() - t0:.0f}s; killed after checkpoint step {step_killed}")

    runs = _mlflow_runs(home)
    by_id = {r.info.run_id: r for r in runs}
    dead = by_id[dead.info.run_id]
    assert dead.info.status == "KILLED" and dead.info.end_time, dead.info
    reason = dead.data.tags["sftflow.terminated_reason"]
    assert f"process {proc.pid}" in reason and "kill -9" in reason
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == dead.info.run_id]
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED"}, [(r.data.tags.get("sftflow.stage"), r.info.status) for r in children]
    train = [r for r in children if r.data.tags.get("sftflow.stage") == "train"]
    assert [r.info.status for r in train] == ["KILLED"] and train[0].info.end_time
    assert "sftflow.terminated_reason" in train[0].data.tags
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert {r.data.tags.get("sftflow.stage") for r in finished} >= {"ingest", "validate", "split"}
    assert all("sftflow.terminated_reason" not in r.data.tags for r in finished)
    new_parents = [r for r in runs if r.data.tags.get("sftflow.kind") == "pipeline" and r.info.run_id != dead.info.run_id]
    assert [r.info.status for r in new_parents] == ["FINISHED"]

    flow_state, tasks = _prefect_states(home, flow_run_id)
    assert flow_state == "CRASHED", (flow_state, tasks)
    assert not {n: s for n, s in tasks.items() if s in ("RUNNING", "PENDING", "SCHEDULED")}, tasks
    assert any(n.startswith("train") and s == "CRASHED" for n, s in tasks.items()), tasks
    assert not list((home / "runs" / ".active").glob("*.json"))


_INIT_STORES = """
import os, sys, time
from sftflow.ops.orchestration import configure_environment
configure_environment()
from sftflow.ops.recovery import guard_ephemeral_server
guard_ephemeral_server()
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.01)
from sftflow.tracking import runs as tracking
uri = tracking.default_tracking_uri()
exp = tracking.ensure_experiment("sftflow-smoke", uri=uri)
from prefect import get_client
with get_client(sync_client=True) as client:
    client.read_flows(limit=1)
print("ok", exp)
"""


def test_concurrent_first_initialisation_of_both_stores_succeeds(tmp_path: Path) -> None:
    """Two processes that open a fresh $SFTFLOW_HOME's MLflow store and start Prefect's temporary
    server on its fresh database at the same moment (what two first `sftflow run` do)."""
    home, go = tmp_path / "home", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _INIT_STORES, str(go)], cwd=REPO, env=_env(home),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(5.0)  # both past their imports
    go.touch()
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.startswith("ok"), err[-4000:]
    assert len({out.split()[1] for out, _ in outs}) == 1
    assert (home / "prefect" / "prefect.db").exists() and (home / "mlflow" / "mlflow.db").exists()

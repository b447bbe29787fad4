"""State that must survive a full disk: the MLflow SQLite store's first migration, interrupted,
is repaired on the next start (``sftflow.tracking.store``); the active-run records are written
atomically and a garbled one is still reaped (``sftflow.ops.recovery``)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
from pathlib import Path

import pytest


# ----------------------------------------------------------------------------- MLflow store migration
def _interrupt_first_migration(db: Path) -> None:
    """Create an MLflow store the way MLflow does (initial tables, then Alembic's upgrades) on a
    "disk" that fills up while a migration rebuilds the experiments table: when Alembic issues
    ``CREATE TABLE _alembic_tmp_experiments``, SQLite's ``max_page_count`` is set a few pages above
    the file's size, so the rebuild fails with SQLite's own ``database or disk is full``, the state
    issue 22 found after a real full disk (a few page budgets are tried: where the copy fails
    depends on the page layout)."""
    import sqlalchemy
    from mlflow.store.db import utils as db_utils
    from sqlalchemy import event

    from sftflow.tracking.store import leftover_tables

    for extra in (3, 2, 5, 8):
        db.unlink(missing_ok=True)
        engine = sqlalchemy.create_engine(f"sqlite:///{db}")
        armed: list[int] = []

        @event.listens_for(engine, "before_cursor_execute")
        def _fill(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
            if statement.lstrip().upper().startswith("CREATE TABLE _ALEMBIC_TMP_EXPERIMENTS") and not armed:
                armed.append(1)
                pages = cursor.execute("PRAGMA page_count").fetchone()[0]
                cursor.execute(f"PRAGMA max_page_count = {pages + extra}")

        with pytest.raises(Exception, match="database or disk is full"):
            db_utils._initialize_tables(engine)
        engine.dispose()
        if leftover_tables(db):
            return
    raise AssertionError("could not reproduce the interrupted migration (no _alembic_tmp_ table left)")


def test_interrupted_mlflow_migration_is_repaired_on_next_start(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from sftflow.tracking import runs
    from sftflow.tracking.store import leftover_tables

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    _interrupt_first_migration(db)
    left = leftover_tables(db)
    assert left and all(t.startswith("_alembic_tmp_") for t in left), left
    # What users saw: every later start fails, even with space free again.
    with pytest.raises(Exception, match=r"table _alembic_tmp_\w+ already exists"):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    assert leftover_tables(db) == left

    with caplog.at_level(logging.WARNING, logger="sftflow.tracking.store"):
        runs.init_store(uri)  # the one place sftflow opens a store first
    lines = [r.getMessage() for r in caplog.records if r.name == "sftflow.tracking.store"]
    assert len(lines) == 1 and "interrupted" in lines[0] and left[0] in lines[0] and str(db) in lines[0]
    assert leftover_tables(db) == []
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("after-repair")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
    from mlflow.store.db import utils as db_utils

    import sqlalchemy

    engine = sqlalchemy.create_engine(uri)
    assert db_utils._get_schema_version(engine) == db_utils._get_latest_schema_revision()
    engine.dispose()


def test_repair_leaves_healthy_and_foreign_stores_alone(tmp_path: Path) -> None:
    from sftflow.tracking.store import repair_interrupted_migration, sqlite_path

    assert repair_interrupted_migration("http://127.0.0.1:5000") == []
    assert sqlite_path("postgresql://u@h/db") is None and sqlite_path("sqlite:///:memory:") is None
    assert repair_interrupted_migration(f"sqlite:///{tmp_path / 'absent.db'}") == []
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 10)
    assert repair_interrupted_migration(f"sqlite:///{junk}") == []  # MLflow reports a corrupt file itself
    # A tmp table whose original is gone holds the only copy of the rows: never dropped.
    orphan = tmp_path / "orphan.db"
    con = sqlite3.connect(orphan)
    con.execute("CREATE TABLE _alembic_tmp_runs (x INTEGER)")
    con.execute("INSERT INTO _alembic_tmp_runs VALUES (1)")
    con.commit()
    con.close()
    assert repair_interrupted_migration(f"sqlite:///{orphan}") == []
    assert sqlite3.connect(orphan).execute("SELECT x FROM _alembic_tmp_runs").fetchall() == [(1,)]


# ----------------------------------------------------------------------------- active-run records
REPO = Path(__file__).resolve().parents[2]

_RUN = """
import json, sys, time
from mlflow.tracking import MlflowClient
from sftflow.tracking import runs as tracking
from sftflow.ops import recovery
uri = tracking.default_tracking_uri()
exp = tracking.ensure_experiment("sftflow-full-disk", uri=uri)
c = MlflowClient(uri)
parent = c.create_run(exp, tags={"sftflow.kind": "pipeline", "sftflow.prefect_flow_run_id": sys.argv[1]}).info.run_id
stage = c.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
recovery.register_active_run(flow_run_id=sys.argv[1], pipeline="p")
if sys.argv[2] == "with-parent":
    recovery.register_active_run(flow_run_id=sys.argv[1], pipeline="p", tracking_uri=uri, parent_run_id=parent)
print(json.dumps({"parent": parent, "stage": stage}), flush=True)
time.sleep(120)
"""


def _killed_run(home: Path, flow_run_id: str, mode: str) -> dict:
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["SFTFLOW_HOME"] = str(home)
    proc = subprocess.Popen([sys.executable, "-c", _RUN, flow_run_id, mode], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, "the run process failed to start"
    proc.kill()  # kill -9
    proc.wait()
    return json.loads(line)


def test_record_write_on_a_full_disk_keeps_the_previous_record(sftflow_home: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from sftflow.ops import recovery

    path = recovery.register_active_run(flow_run_id="local-enospc", pipeline="p")
    before = path.read_text()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the data of the new record cannot reach the disk
    with pytest.raises(OSError, match="No space left"):
        recovery.register_active_run(flow_run_id="local-enospc", pipeline="p", tracking_uri="sqlite:///x.db",
                                     parent_run_id="abc")
    monkeypatch.undo()
    assert path.read_text() == before and json.loads(before)["flow_run_id"] == "local-enospc"
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    recovery.clear_active_run("local-enospc")


@pytest.mark.parametrize("damage", ["empty", "garbled", "no-parent-id"])
def test_unreadable_or_incomplete_record_is_still_reaped(sftflow_home: Path, damage: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A killed run whose record is empty/garbled (or never got its parent run id because that
    write failed): the reaper logs it and closes the MLflow runs it finds by the flow-run tag."""
    from mlflow.tracking import MlflowClient

    from sftflow.ops import recovery
    from sftflow.tracking import runs as tracking

    flow_run_id = f"local-{damage}"
    runs = _killed_run(sftflow_home, flow_run_id, "no-parent" if damage == "no-parent-id" else "with-parent")
    record = recovery.active_dir() / f"{flow_run_id}.json"
    if damage == "empty":
        record.write_text("")
    elif damage == "garbled":
        record.write_bytes(b'{"flow_run_id": "local-gar\x00\x00')
    with caplog.at_level(logging.WARNING, logger="sftflow.ops.recovery"):
        reaped = recovery.reap_orphans(prefect=False)
    assert [r.flow_run_id for r in reaped] == [flow_run_id] and reaped[0].pending == "", reaped
    assert set(reaped[0].mlflow_runs) == {runs["parent"], runs["stage"]}
    client = MlflowClient(tracking.default_tracking_uri())
    assert {client.get_run(r).info.status for r in runs.values()} == {"KILLED"}
    lines = [r.getMessage() for r in caplog.records]
    if damage != "no-parent-id":
        assert any("is unreadable" in ln and flow_run_id in ln for ln in lines), lines
    assert not record.exists() and recovery.reap_orphans(prefect=False) == []


def test_unreadable_record_of_a_live_run_is_left_alone(sftflow_home: Path) -> None:
    from sftflow.ops import recovery

    with recovery.active_run(flow_run_id="local-live", pipeline="p") as path:
        path.write_text("")  # damaged while the run is alive: its lock says so
        assert recovery.reap_orphans(prefect=False) == [] and path.exists()

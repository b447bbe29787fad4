"""Failure hygiene, fast parts: process trees, parent-death signals, active-run records and the
reaping of runs left RUNNING by a killed process (real processes, real MLflow SQLite store),
store initialisation under a lock, secrets kept out of URIs, messages and files.

The end-to-end kill of a real `sftflow run` is in tests/integration/test_kill_recovery.py.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sftflow.ops import processes

from sftflow.ops import recovery

from sftflow.ops import postgres, servers, services

from sftflow.tracking import runs as tracking
REPO = Path(__file__).resolve().parents[2]


def _py(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, **kw)


def _wait_for(pred, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- mask_uri
@pytest.mark.parametrize(("uri", "masked"), [
    ("http://alice:s3cret@mlflow.example:5000", "http://alice:***@mlflow.example:5000"),
    ("https://alice:p%40ss@host/path?x=1", "https://alice:***@host/path?x=1"),
    ("postgresql+psycopg2://sftflow:pw@127.0.0.1:5432/mlflow", "postgresql+psycopg2://sftflow:***@127.0.0.1:5432/mlflow"),
    ("http://tok3n@host:5000", "http://***@host:5000"),
    ("postgresql://u@h/db?password=pw&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
    ("s3://bucket/p?X-Amz-Signature=abc&X-Amz-Credential=k", "s3://bucket/p?X-Amz-Signature=***&X-Amz-Credential=***"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
    ("/a/path/not/a/uri", "/a/path/not/a/uri"),
    ("", ""),
])
def test_mask_uri_hides_passwords_tokens_and_secret_parameters(uri: str, masked: str) -> None:
    assert tracking.mask_uri(uri) == masked


def test_mask_secrets_in_free_text() -> None:
    text = "could not reach postgresql://u:hunter2@db:5432/x nor http://a:b@h, see 'sqlite:///x.db'"
    out = tracking.mask_secrets_in(text)
    assert "hunter2" not in out and ":b@" not in out
    assert "postgresql://u:***@db:5432/x" in out and "http://a:***@h" in out and "sqlite:///x.db" in out


def test_unreachable_tracking_server_message_masks_the_password() -> None:
    uri = f"http://bob:TopSecret42@127.0.0.1:{servers.free_port()}"
    with pytest.raises(RuntimeError) as e:
        tracking.check_tracking_server(uri, timeout=1)
    assert "TopSecret42" not in str(e.value)
    assert "http://bob:***@127.0.0.1" in str(e.value) and "unreachable" in str(e.value)


class _BasicAuthHealth(http.server.BaseHTTPRequestHandler):
    expected = "Basic " + base64.b64encode(b"alice:p@ss word").decode()
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        _BasicAuthHealth.seen.append(self.headers.get("Authorization", ""))
        ok = self.path == "/health" and self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"no")

    def log_message(self, *args) -> None:
        pass


def test_tracking_uri_with_credentials_is_checked_with_basic_auth() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BasicAuthHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        tracking.check_tracking_server(f"http://alice:p%40ss%20word@127.0.0.1:{port}", timeout=5)
        assert _BasicAuthHealth.seen[-1] == _BasicAuthHealth.expected
        with pytest.raises(RuntimeError) as e:
            tracking.check_tracking_server(f"http://alice:wrong-secret@127.0.0.1:{port}", timeout=5)
        assert "wrong-secret" not in str(e.value) and "401" in str(e.value)
    finally:
        server.shutdown()


def test_run_url_never_shows_credentials() -> None:
    ctx = tracking.StageContext(pipeline="p", run_id="r", run_dir="/x", tracking_uri="http://u:pw123@h:5000",
                                experiment_id="1", parent_run_id="abc")
    assert "pw123" not in tracking.run_url(ctx) and tracking.run_url(ctx).startswith("http://u:***@h:5000/#/")


# --------------------------------------------------------------------------- secrets on disk / argv
def test_split_db_password_moves_the_secret_to_pgpassword() -> None:
    url, env = postgres.split_db_password("postgresql+psycopg2://sftflow:a%2Fb@127.0.0.1:5432/mlflow")
    assert url == "postgresql+psycopg2://sftflow@127.0.0.1:5432/mlflow" and env == {"PGPASSWORD": "a/b"}
    assert postgres.split_db_password("sqlite:////x/mlflow.db") == ("sqlite:////x/mlflow.db", {})
    assert postgres.split_db_password("postgresql://u@h/db") == ("postgresql://u@h/db", {})


def test_postgres_cluster_keeps_its_password_out_of_repr_and_urls() -> None:
    c = postgres.PostgresCluster(data_dir="/d", host="127.0.0.1", port=5432, user="sftflow", password="pw/+secret")
    assert "pw/+secret" not in repr(c)
    assert "secret" not in c.url("mlflow", driver="psycopg2")
    assert c.url("mlflow", with_password=True) == "postgresql://sftflow:pw%2F%2Bsecret@127.0.0.1:5432/mlflow"
    assert c.env() == {"PGPASSWORD": "pw/+secret"}


def test_secret_files_are_private_from_the_first_byte(tmp_path: Path) -> None:
    old = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        f = tmp_path / "creds.json"
        f.write_text("old, world-readable")
        f.chmod(0o644)
        postgres.write_secret_file(f, "{}")
        assert stat.S_IMODE(f.stat().st_mode) == 0o600 and f.read_text() == "{}"
    finally:
        os.umask(old)


def test_mlflow_server_argv_carries_no_database_password(sftflow_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """start_mlflow_server with a password in the backend URI: the password is in the server's
    environment only (the server fails to reach the fake database, we only look at its argv/env)."""
    seen: dict = {}

    def fake_spawn(name, argv, *, env, **kw):
        seen.update(argv=argv, env=env)
        raise servers.ServiceError("stop here")

    monkeypatch.setattr(services, "spawn_service", fake_spawn)
    with pytest.raises(servers.ServiceError):
        services.start_mlflow_server(port=servers.free_port(),
                                     backend_store_uri="postgresql+psycopg2://u:Pa55word@127.0.0.1:1/mlflow")
    assert not any("Pa55word" in a for a in seen["argv"])
    assert "postgresql+psycopg2://u@127.0.0.1:1/mlflow" in seen["argv"]
    assert seen["env"]["PGPASSWORD"] == "Pa55word"
    assert seen["env"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


# --------------------------------------------------------------------------- processes
def test_is_alive_tells_a_reused_pid_from_the_original() -> None:
    me = processes.process_identity()
    assert me.start_ticks is not None
    assert processes.is_alive(me.pid, start_ticks_=me.start_ticks)
    assert not processes.is_alive(me.pid, start_ticks_=me.start_ticks - 1)  # "same pid, another process"
    p = _py("pass")
    p.wait()
    assert not processes.is_alive(p.pid)


def test_terminate_tree_ends_every_descendant_even_outside_the_group_and_sigterm_deaf() -> None:
    # root -> child in its own session that ignores SIGTERM -> grandchild; all must end, in bounded time.
    code = (
        "import subprocess,sys,time\n"
        "inner = 'import signal,subprocess,sys,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable,\"-c\",\"import time; time.sleep(120)\"]); time.sleep(120)'\n"
        "subprocess.Popen([sys.executable,'-c',inner], start_new_session=True)\n"
        "time.sleep(120)\n"
    )
    root = _py(code, start_new_session=True)
    _wait_for(lambda: len(processes.descendants(root.pid)) >= 2, what="the process tree")
    tree = [root.pid, *processes.descendants(root.pid)]
    t0 = time.monotonic()
    left = processes.terminate_tree([root.pid], grace=2.0, kill_wait=5.0)
    assert time.monotonic() - t0 < 15
    root.wait(timeout=5)
    assert left == []
    assert [p for p in tree if processes.is_alive(p)] == []


def test_die_with_parent_kills_the_child_when_the_parent_is_killed_not_when_a_thread_ends(tmp_path: Path) -> None:
    out = tmp_path / "child.pid"
    # The parent spawns from a short-lived worker thread through call_in_lifetime_thread: the
    # child must survive that thread's end, then die with the parent's kill -9.
    code = (
        "import subprocess,sys,threading,time\n"
        "from sftflow.ops.processes import call_in_lifetime_thread, die_with_parent\n"
        "def spawn():\n"
        "    argv = die_with_parent([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "    p = call_in_lifetime_thread(lambda: subprocess.Popen(argv, start_new_session=True))\n"
        f"    open({str(out)!r}, 'w').write(str(p.pid))\n"
        "t = threading.Thread(target=spawn); t.start(); t.join()\n"
        "time.sleep(120)\n"
    )
    parent = _py(code)
    _wait_for(lambda: out.exists() and out.read_text(), what="the child pid")
    child = int(out.read_text())
    time.sleep(1.0)
    assert processes.is_alive(child), "the child died when the spawning thread ended"
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    _wait_for(lambda: not processes.is_alive(child), timeout=10, what="the child to die with its parent")


# --------------------------------------------------------------------------- active-run records + reap
_ORPHAN = """
import json, os, sys, time
from mlflow.tracking import MlflowClient
from sftflow.tracking import runs as tracking
from sftflow.ops import recovery
uri = tracking.default_tracking_uri()
exp = tracking.ensure_experiment("sftflow-orphan", uri=uri)
c = MlflowClient(uri)
parent = c.create_run(exp, tags={"sftflow.kind": "pipeline"}).info.run_id
done = c.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
c.set_terminated(done, status="FINISHED")
stage = c.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
nested = c.create_run(exp, tags={"mlflow.parentRunId": stage}).info.run_id
recovery.register_active_run(flow_run_id=sys.argv[1], pipeline="orphan", tracking_uri=uri, parent_run_id=parent)
print(json.dumps({"parent": parent, "done": done, "stage": stage, "nested": nested}), flush=True)
time.sleep(120)
"""


def _orphan(home: Path, flow_run_id: str) -> tuple[subprocess.Popen, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["SFTFLOW_HOME"] = str(home)
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN, flow_run_id], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, "orphan process failed to start"
    return proc, json.loads(line)


def test_reap_orphans_kills_the_runs_of_a_killed_process_and_only_those(sftflow_home: Path) -> None:
    from mlflow.tracking import MlflowClient

    proc, runs = _orphan(sftflow_home, "local-killed")
    record = recovery.active_dir() / "local-killed.json"
    assert record.exists() and stat.S_IMODE(record.stat().st_mode) == 0o600
    assert json.loads(record.read_text())["pid"] == proc.pid

    # While the process lives, nothing is touched.
    assert recovery.reap_orphans() == []
    client = MlflowClient(tracking.default_tracking_uri())
    assert client.get_run(runs["stage"]).info.status == "RUNNING"

    proc.kill()  # kill -9
    proc.wait()
    reaped = recovery.reap_orphans()
    assert len(reaped) == 1 and reaped[0].pending == "", reaped
    assert set(reaped[0].mlflow_runs) == {runs["parent"], runs["stage"], runs["nested"]}
    assert reaped[0].mlflow_runs[-1] == runs["parent"]  # children first, the parent last
    for key in ("parent", "stage", "nested"):
        r = client.get_run(runs[key])
        assert r.info.status == "KILLED" and r.info.end_time, (key, r.info)
        reason = r.data.tags[recovery.TAG_TERMINATED_REASON]
        assert f"process {proc.pid}" in reason and "kill -9" in reason
    finished = client.get_run(runs["done"])
    assert finished.info.status == "FINISHED" and recovery.TAG_TERMINATED_REASON not in finished.data.tags
    assert not record.exists()
    assert recovery.reap_orphans() == []  # nothing left, nothing done twice


def test_a_record_whose_pid_was_reused_counts_as_dead(sftflow_home: Path) -> None:
    path = recovery.register_active_run(flow_run_id="local-reused", pipeline="p")
    recovery._release_lock("local-reused", remove=True)  # a record without a run lock: liveness by pid
    data = json.loads(path.read_text())
    data["start_ticks"] -= 1  # same pid (ours, alive), another process
    path.write_text(json.dumps(data))
    reaped = recovery.reap_orphans()
    assert [r.flow_run_id for r in reaped] == ["local-reused"] and not path.exists()


def test_active_run_context_removes_its_record_and_keeps_it_after_an_exception(sftflow_home: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    with recovery.active_run(flow_run_id="local-ok", pipeline="p") as path:
        assert path.exists() and recovery.lock_held("local-ok") is True
    assert not path.exists() and recovery.lock_held("local-ok") is None
    # A failed run (its own closing may have failed too, e.g. on a full disk) leaves its record with
    # the lock released: the next reap closes what is still open, quietly when nothing is.
    with pytest.raises(ValueError):
        with recovery.active_run(flow_run_id="local-x", pipeline="p") as path:
            raise ValueError("stage failed")
    assert path.exists() and recovery.lock_held("local-x") is False
    with caplog.at_level("DEBUG", logger="sftflow.ops.recovery"):
        reaped = recovery.reap_orphans()
    assert [r.flow_run_id for r in reaped] == ["local-x"] and not path.exists()
    assert not [r for r in caplog.records if r.levelno >= 30]


def test_unreachable_tracking_server_keeps_the_record_for_later(sftflow_home: Path) -> None:
    path = recovery.register_active_run(flow_run_id="local-later", pipeline="p",
                                        tracking_uri=f"http://u:pw@127.0.0.1:{servers.free_port()}",
                                        parent_run_id="abc")
    recovery._release_lock("local-later", remove=True)  # a record without a run lock: liveness by pid
    data = json.loads(path.read_text())
    data["start_ticks"] -= 1
    path.write_text(json.dumps(data))
    t0 = time.monotonic()
    reaped = recovery.reap_orphans()
    assert time.monotonic() - t0 < 30  # fails fast, no minutes of HTTP retries
    assert len(reaped) == 1 and reaped[0].pending.startswith("MLflow"), reaped
    assert ":pw@" not in reaped[0].pending
    assert path.exists() and json.loads(path.read_text())["mlflow_done"] is False


# --------------------------------------------------------------------------- concurrent store init
_INIT = """
import os, sys, time
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.01)
from sftflow.tracking import runs as tracking
uri = tracking.default_tracking_uri()
print(tracking.ensure_experiment("sftflow-first", uri=uri))
from mlflow.tracking import MlflowClient
MlflowClient(uri, registry_uri=uri).search_registered_models()
print("ok")
"""


def test_two_processes_initialising_a_fresh_mlflow_store_both_succeed(tmp_path: Path) -> None:
    home, go = tmp_path / "home", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["SFTFLOW_HOME"] = str(home)
    procs = [subprocess.Popen([sys.executable, "-c", _INIT, str(go)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(3.0)  # both are past their imports and waiting at the start line
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip().endswith("ok"), err[-3000:]
    assert len({out.splitlines()[0] for out, _ in outs}) == 1  # one experiment, created once

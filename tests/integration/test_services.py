"""Real Prefect + MLflow servers on loopback, with SQLite and with PostgreSQL backend stores.

For each backend: the servers answer and fail clearly when absent; a served deployment carries
the pipeline's cron schedule; two triggers of one pipeline run one after the other; the smoke
pipeline triggered through the Prefect API (as the UI does) completes, and MLflow (queried over
HTTP with MlflowClient) holds its runs, datasets, registered model and aliases; a scheduled-style
run with unchanged sources skips retraining and says so.

Run: ``python -m pytest tests/integration/test_services.py -m services`` (``.ci/run`` runs it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from prefect import flow

from sftflow.ops import guards, processes, servers, services
from sftflow.config import load_pipelines
from tests.integration.conftest import (
    REPO,
    SMOKE_DEPLOYMENT,
    flow_run_logs,
    prefect_api,
    serve_process,
    wait_for_flow_run,
)

pytestmark = [pytest.mark.services, pytest.mark.integration]

SLEEPY_REF = "tests.integration.test_services:sleepy_flow"
SLEEPY_DEPLOYMENT = "sftflow-sleepy/smoke"


@flow(name="sftflow-sleepy")
def sleepy_flow(pipeline: str = "demo", overrides: dict[str, Any] | None = None, pipelines_file: str | None = None,
                skip_if_unchanged: bool = False) -> dict[str, Any]:
    """Same parameters as the pipeline flow, but only sleeps: makes overlapping runs visible, fast."""
    time.sleep(3.0)
    return {"pipeline": pipeline}


def test_servers_answer_and_absent_ones_fail_clearly(stack) -> None:
    servers.check_prefect_server(stack.prefect_api_url)
    from sftflow.tracking.runs import check_tracking_server

    check_tracking_server(stack.mlflow_uri)
    dead = f"http://127.0.0.1:{servers.free_port()}"
    with pytest.raises(servers.ServiceError, match=f"Prefect server {dead}/api is unreachable.*infra/local/start.sh"):
        servers.check_prefect_server(f"{dead}/api", timeout=1)
    with pytest.raises(RuntimeError, match=f"MLflow tracking server {dead} is unreachable"):
        check_tracking_server(dead, timeout=1)
    status = services.stack_status(state=stack.home / "services")
    assert {s["healthy"] for s in status.values()} == {True}, status
    if stack.backend == "postgres":
        assert stack.stack.postgres is not None
        assert (Path(stack.stack.postgres.data_dir) / "PG_VERSION").exists()
        assert Path(stack.stack.postgres.data_dir).is_relative_to(stack.home)


def test_deployment_has_schedule_and_runs_of_one_pipeline_are_serialised(stack) -> None:
    from prefect import get_client
    from prefect.deployments import run_deployment

    smoke = load_pipelines(REPO / "pipelines.yaml")["smoke"]
    with serve_process(stack, only="smoke", flow=SLEEPY_REF, deployment=SLEEPY_DEPLOYMENT), \
            prefect_api(stack.prefect_api_url):
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(SLEEPY_DEPLOYMENT)
        assert [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules] == [
            (smoke.schedule.cron, smoke.schedule.timezone)]
        assert dep.schedules[0].parameters == {"skip_if_unchanged": smoke.schedule.skip_if_unchanged}
        assert dep.parameters["pipeline"] == "smoke"
        assert dep.parameter_openapi_schema["properties"]["overrides"]  # typed form in the UI

        # A "schedule" and a "manual" trigger at the same moment.
        runs = [run_deployment(SLEEPY_DEPLOYMENT, timeout=0), run_deployment(SLEEPY_DEPLOYMENT, timeout=0)]
        done = sorted((wait_for_flow_run(r.id, timeout=240) for r in runs), key=lambda r: r.start_time)
    assert [r.state.name for r in done] == ["Completed", "Completed"]
    # The second started only after the first ended: the per-pipeline limit held.
    assert done[1].start_time >= done[0].end_time, [(r.start_time, r.end_time) for r in done]


def test_smoke_pipeline_from_the_api_is_recorded_in_mlflow(stack, smoke_run) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    exp = client.get_experiment_by_name("sftflow-smoke")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("sftflow.kind") == "pipeline"]
    assert len(parents) == 1, [r.data.tags for r in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    # MLflow's parent run names the Prefect flow run that made it.
    assert parent.data.tags["sftflow.prefect_flow_run_id"] == str(smoke_run.id)
    assert parent.data.tags["sftflow.sources_digest"] and parent.data.tags["sftflow.config_hash"]
    run_dir = Path(parent.data.tags["sftflow.run_dir"])
    assert run_dir.is_relative_to(stack.home / "runs" / "smoke") and run_dir.is_dir()

    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags.get("sftflow.stage") for r in children}
    assert {"ingest", "validate", "dedup", "split", "train", "promote"} <= stages, stages
    assert all(r.info.status == "FINISHED" for r in children)
    ingest = next(r for r in children if r.data.tags.get("sftflow.stage") == "ingest")
    assert ingest.inputs.dataset_inputs and all(d.dataset.digest for d in ingest.inputs.dataset_inputs)

    # Artifacts went through the server (its artifact store under this stack's home).
    assert client.list_artifacts(parent.info.run_id, "config")

    candidate = client.get_model_version_by_alias("sftflow-smoke", "candidate")
    assert candidate.run_id in {r.info.run_id for r in runs}
    model = client.get_registered_model("sftflow-smoke")
    assert "candidate" in model.aliases

    if stack.backend == "postgres":
        # The records really live in PostgreSQL (not in a SQLite file next to it).
        import psycopg2

        pg = stack.stack.postgres
        counts = {}
        for db, sql in (("prefect", "SELECT count(*) FROM flow_run WHERE id = %s"),
                        ("mlflow", "SELECT count(*) FROM runs WHERE run_uuid = %s")):
            conn = psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=db)
            try:
                with conn.cursor() as cur:
                    cur.execute(sql, (str(smoke_run.id) if db == "prefect" else parent.info.run_id,))
                    counts[db] = cur.fetchone()[0]
            finally:
                conn.close()
        assert counts == {"prefect": 1, "mlflow": 1}
        assert not list(stack.home.rglob("*.db")), "a SQLite store was created despite the postgres backend"


def test_scheduled_run_with_unchanged_sources_skips_and_says_so(stack, smoke_run, smoke_served) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.deployments import run_deployment

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    exp = client.get_experiment_by_name("sftflow-smoke")
    before = client.search_runs([exp.experiment_id], filter_string="tags.`sftflow.kind` = 'pipeline'")
    with prefect_api(stack.prefect_api_url):
        # What the cron schedule passes (schedule parameters): skip_if_unchanged.
        fr = run_deployment(SMOKE_DEPLOYMENT, parameters={"skip_if_unchanged": True}, timeout=0)
        fr = wait_for_flow_run(fr.id, timeout=300)
        # Logs reach the API in batches, shortly after the run's final state.
        deadline = time.monotonic() + 60
        while "Skipping retraining" not in (logs := flow_run_logs(fr.id)) and time.monotonic() < deadline:
            time.sleep(2)
    assert fr.state.is_completed(), logs[-4000:]
    assert "Skipping retraining" in logs and "unchanged" in logs, logs[-4000:]
    after = client.search_runs([exp.experiment_id], filter_string="tags.`sftflow.kind` = 'pipeline'")
    assert len(after) == len(before)


def test_prefect_yaml_deploys_to_the_docker_work_pool(stack) -> None:
    """The production artifacts are accepted by a real server: the work pool template, then
    `prefect deploy --all` with prefect.yaml (no worker runs here: no Docker engine)."""
    import json
    import os
    import subprocess
    import sys

    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((REPO / "infra/production/work-pools/sftflow-docker.json").read_text())
    with prefect_api(stack.prefect_api_url), get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="sftflow-docker", type="docker", base_job_template=template))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(stack.client_env())
    env.update({"SFTFLOW_IMAGE": "sftflow:test", "DO_NOT_TRACK": "1"})
    prefect_cli = Path(sys.executable).parent / "prefect"
    proc = subprocess.run([str(prefect_cli), "--no-prompt", "deploy", "--all"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pipes = load_pipelines(REPO / "pipelines.yaml")
    with prefect_api(stack.prefect_api_url), get_client(sync_client=True) as client:
        for name, cfg in pipes.items():
            dep = client.read_deployment_by_name(f"sftflow/{name}")
            assert dep.work_pool_name == "sftflow-docker"
            assert dep.job_variables["image"] == "sftflow:test"
            assert dep.parameters == {"pipeline": name}
            if cfg.schedule.cron:
                assert [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules] == [
                    (cfg.schedule.cron, cfg.schedule.timezone)]
                assert dep.schedules[0].parameters == {"skip_if_unchanged": cfg.schedule.skip_if_unchanged}
            # Production deployments must not fire while this test server lives.
            client.pause_deployment(dep.id)


def _start_ui(home: Path, pp: int, mp_: int, *, sigint_ignored: bool = False):
    """`sftflow ui` in its own session (like a terminal's foreground job); its output lines up to "Ctrl-C"."""
    import os
    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["SFTFLOW_HOME"] = str(home)
    # sigint_ignored: what a process started from a non-interactive shell's background job
    # (`make test &`, CI runners) inherits; Ctrl-C / kill -INT must still stop `sftflow ui`.
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--prefect-port", str(pp),
                             "--mlflow-port", str(mp_)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=pre)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
    return proc, "".join(lines)


def _alive_of(pids: list[int]) -> list[tuple[int, str]]:
    from sftflow.ops.processes import is_alive

    out = []
    for p in pids:
        if is_alive(p):
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:150]
            except OSError:
                cmd = "?"
            out.append((p, cmd))
    return out


def test_sftflow_ui_prints_both_urls_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """`sftflow ui`: Prefect + MLflow on SQLite under $SFTFLOW_HOME, loopback, gone after Ctrl-C:
    every process it started (collected before the signal) ends, in bounded time, even when the
    caller's SIGINT disposition is "ignored" (background jobs of non-interactive shells)."""
    import os
    import signal
    import subprocess

    from sftflow.ops.processes import descendants, terminate_tree

    home = tmp_path / "home"
    pp, mp_ = servers.free_port(), servers.free_port()
    proc, out = _start_ui(home, pp, mp_, sigint_ignored=True)
    tree: list[int] = []
    try:
        assert f"http://127.0.0.1:{pp}" in out and f"http://127.0.0.1:{mp_}" in out, out
        servers.check_prefect_server(f"http://127.0.0.1:{pp}/api")
        assert (home / "prefect" / "prefect.db").exists() and (home / "mlflow" / "mlflow.db").exists()
        recorded = [servers.read_service(n, state=home / "services") for n in (servers.PREFECT_NAME, servers.MLFLOW_NAME)]
        assert all(r is not None and processes.is_alive(r.pid) for r in recorded)
        tree = descendants(proc.pid)
        assert {r.pid for r in recorded} <= set(tree), tree
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        try:
            rest, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`sftflow ui` still runs 120 s after Ctrl-C; alive: {_alive_of([proc.pid, *tree])}") from None
        took = time.monotonic() - t0
    finally:
        leftovers = _alive_of([proc.pid, *tree])
        terminate_tree([proc.pid, *tree], grace=1)  # never leave servers behind, even when failing
    assert proc.returncode == 0, rest
    assert "stopping:" in rest
    assert leftovers == [], f"still running after `sftflow ui` ended: {leftovers}"
    assert took < 60, took  # bounded: SIGTERM, 10 s grace, SIGKILL
    assert not servers.port_in_use(pp) and not servers.port_in_use(mp_)
    assert not (home / "services" / "prefect-server.json").exists()


def test_sftflow_ui_killed_with_kill_9_leaves_no_server_behind(tmp_path: Path) -> None:
    """`kill -9` of `sftflow ui` (no chance to clean up): its servers get the parent-death signal."""
    import os
    import signal

    from sftflow.ops.processes import descendants, terminate_tree

    home = tmp_path / "home"
    pp, mp_ = servers.free_port(), servers.free_port()
    proc, out = _start_ui(home, pp, mp_)
    tree: list[int] = []
    try:
        assert "Ctrl-C" in out, out
        tree = descendants(proc.pid)
        assert len(tree) >= 2, tree
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive_of(tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = _alive_of(tree)
    finally:
        terminate_tree([proc.pid, *tree], grace=1)
    assert leftovers == [], f"still running after kill -9 of `sftflow ui`: {leftovers}"
    assert not servers.port_in_use(pp) and not servers.port_in_use(mp_)


def test_postgres_password_is_in_no_command_line_file_or_message(stack) -> None:
    """The cluster's password reaches the servers by environment only: no /proc/*/cmdline (world-
    readable) of any process holds it, nor the files and logs under $SFTFLOW_HOME/services, nor
    messages; a tracking URI that carries it works and is printed masked."""
    if stack.backend != "postgres":
        pytest.skip("PostgreSQL backend only")
    import stat
    from urllib.parse import quote

    from mlflow.tracking import MlflowClient

    from sftflow.tracking.runs import mask_uri

    pg = stack.stack.postgres
    secret = pg.password
    assert secret and secret not in repr(stack.stack)
    leaks = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if secret.encode() in cmd or quote(secret, safe="").encode() in cmd:
                leaks.append((d.name, cmd[:200]))
    assert leaks == []
    # The MLflow server really runs on PostgreSQL: its command line names the database, not the password.
    mlflow_svc = servers.read_service(servers.MLFLOW_NAME, state=stack.home / "services")
    argv = Path(f"/proc/{mlflow_svc.pid}/cmdline").read_bytes().decode()
    assert f"postgresql+psycopg2://{pg.user}@{pg.host}:{pg.port}/mlflow" in argv
    for f in [*(stack.home / "services").rglob("*"), stack.home / "postgres" / "postgres.log"]:
        if f.is_file():
            assert secret not in f.read_text(errors="replace"), f
    creds = stack.home / "postgres" / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert not (stack.home / "postgres" / ".pwfile").exists()

    # A tracking URI with credentials works, and is masked wherever it is printed.
    uri = pg.url("mlflow", driver="psycopg2", with_password=True)
    assert MlflowClient(tracking_uri=uri).search_experiments(max_results=5) is not None
    assert secret not in mask_uri(uri) and f"{pg.user}:***@" in mask_uri(uri)
    smoke = load_pipelines(REPO / "pipelines.yaml")["smoke"]
    unchanged, why = guards.sources_unchanged(smoke, pipeline="no-such-pipeline", tracking_uri=uri)
    assert not unchanged and secret not in why and "***" in why

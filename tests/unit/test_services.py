"""Fast checks of sftflow.ops.services and flows.serve: no servers started (those are in
tests/integration/test_services.py).

"Skip if unchanged" runs against a real MLflow SQLite store; the per-pipeline lock against real
processes; the deployments are built (not served) from the real pipelines.yaml.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import yaml

from sftflow.ops import guards, processes, servers, services
from sftflow.config import config_hash, resolve_pipeline

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- fail-fast checks
def test_check_prefect_server_names_the_url_and_how_to_start(sftflow_home: Path) -> None:
    url = f"http://127.0.0.1:{servers.free_port()}/api"
    with pytest.raises(servers.ServiceError) as e:
        servers.check_prefect_server(url, timeout=1)
    assert url in str(e.value) and "infra/local/start.sh" in str(e.value) and "sftflow ui" in str(e.value)
    with pytest.raises(servers.ServiceError, match="not an http"):
        servers.check_prefect_server("127.0.0.1:4200", timeout=1)


def test_check_prefect_server_without_url_is_the_embedded_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    servers.check_prefect_server()  # nothing to check, no error


def test_serve_all_refuses_without_a_server(sftflow_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.serve import serve_all

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(servers.ServiceError, match="needs a Prefect server.*PREFECT_API_URL"):
        serve_all(pipelines_file=str(REPO / "pipelines.yaml"))
    dead = f"http://127.0.0.1:{servers.free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", dead)
    with pytest.raises(servers.ServiceError, match=f"Prefect server {dead} is unreachable"):
        serve_all(pipelines_file=str(REPO / "pipelines.yaml"))


def test_start_stack_refuses_a_busy_port(sftflow_home: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        with pytest.raises(servers.ServiceError, match=f"127.0.0.1:{busy} is already in use"):
            services.start_stack(prefect_port=busy, mlflow_port=servers.free_port())
    with pytest.raises(servers.ServiceError, match="backend: must be one of"):
        services.start_stack(backend="mysql")  # type: ignore[arg-type]


def test_spawn_reports_a_server_that_dies_with_its_log(sftflow_home: Path, tmp_path: Path) -> None:
    import sys

    state = tmp_path / "state"
    with pytest.raises(servers.ServiceError, match="(?s)exited with code 3.*boom"):
        servers.spawn_service("dies", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                              env=dict(os.environ), url="http://x", health=f"http://127.0.0.1:{servers.free_port()}/",
                              state=state, timeout=30)
    assert not (state / "dies.json").exists()  # no stale pid file left behind


def test_stop_service_ends_the_process_group_by_pid(tmp_path: Path) -> None:
    import subprocess
    import sys

    # A "server" that forks a child, like uvicorn workers: both must end.
    code = "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    time.sleep(1.0)
    children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert children
    svc = servers.Service(name="fake", url="http://x", pid=proc.pid, log="")
    (tmp_path / "fake.json").write_text("{}")
    servers.stop_service(svc, state=tmp_path, timeout=10)
    proc.wait(timeout=5)
    time.sleep(0.5)
    assert not processes.is_alive(children[0])
    assert not (tmp_path / "fake.json").exists()


# --------------------------------------------------------------------------- skip if unchanged
def _write_pipeline(tmp: Path, *, rows: int = 3, lr: float = 1e-3) -> Path:
    data = tmp / "data.json"
    data.write_text(str([{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(rows)]).replace("'", '"'))
    f = tmp / "pipelines.yaml"
    f.write_text(yaml.safe_dump({"pipelines": {"p": {
        "base_model": "tiny-gemma",
        "sources": [{"name": "s", "path": "data.json", "format": "alpaca"}],
        "training": {"learning_rate": lr},
    }}}))
    return f


def _record_run(uri: str, cfg, *, status: str = "FINISHED", pipeline: str = "p") -> str:
    from mlflow.tracking import MlflowClient

    from sftflow.tracking.runs import end_pipeline_run, start_pipeline_run

    ctx = start_pipeline_run(cfg, pipeline=pipeline, run_id=f"r{time.time_ns()}", run_dir=Path("/nonexistent"))
    end_pipeline_run(ctx, status=status)
    assert MlflowClient(uri).get_run(ctx.parent_run_id).info.status == status
    return ctx.parent_run_id


def test_sources_unchanged_compares_digest_and_config_of_last_success(sftflow_home: Path, tmp_path: Path) -> None:
    from sftflow.tracking.runs import default_tracking_uri

    uri = default_tracking_uri()
    pfile = _write_pipeline(tmp_path)
    cfg = resolve_pipeline("p", path=pfile)

    unchanged, why = guards.sources_unchanged(cfg, pipeline="p", tracking_uri=uri)
    assert not unchanged and "no earlier successful run" in why

    # A failed run does not count as the last success.
    _record_run(uri, cfg, status="FAILED")
    assert guards.sources_unchanged(cfg, pipeline="p", tracking_uri=uri)[0] is False

    run_id = _record_run(uri, cfg)
    unchanged, why = guards.sources_unchanged(cfg, pipeline="p", tracking_uri=uri)
    assert unchanged and run_id in why and "unchanged" in why

    # Another pipeline's history is not ours.
    assert guards.sources_unchanged(cfg, pipeline="other", tracking_uri=uri)[0] is False

    # A changed config retrains even on the same data.
    cfg_lr = resolve_pipeline("p", path=pfile, overrides={"training.learning_rate": 5e-4})
    assert config_hash(cfg_lr) != config_hash(cfg)
    unchanged, why = guards.sources_unchanged(cfg_lr, pipeline="p", tracking_uri=uri)
    assert not unchanged and "config changed" in why

    # New source rows retrain.
    _write_pipeline(tmp_path, rows=4)
    cfg2 = resolve_pipeline("p", path=pfile)
    unchanged, why = guards.sources_unchanged(cfg2, pipeline="p", tracking_uri=uri)
    assert not unchanged and "source data changed" in why and run_id in why


def test_sources_unchanged_with_unreachable_server_names_the_uri(tmp_path: Path) -> None:
    cfg = resolve_pipeline("p", path=_write_pipeline(tmp_path))
    dead = f"http://127.0.0.1:{servers.free_port()}"
    with pytest.raises(RuntimeError, match=f"MLflow tracking server {dead} is unreachable"):
        guards.sources_unchanged(cfg, pipeline="p", tracking_uri=dead)


# --------------------------------------------------------------------------- concurrency
def _hold_lock(home: str, pipeline: str, log: str, hold: float) -> None:
    os.environ["SFTFLOW_HOME"] = home
    with guards.pipeline_lock(pipeline, timeout=30):
        with open(log, "a") as f:
            f.write(f"enter {time.monotonic()}\n")
        time.sleep(hold)
        with open(log, "a") as f:
            f.write(f"exit {time.monotonic()}\n")


def test_pipeline_lock_serialises_processes_of_one_pipeline(sftflow_home: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hold_lock, args=(str(sftflow_home), "demo", str(log), 0.8)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events == ["enter", "exit", "enter", "exit"]  # never two inside at once


def test_pipeline_lock_is_per_pipeline_and_times_out_clearly(sftflow_home: Path) -> None:
    with guards.pipeline_lock("demo") as path:
        assert path.is_relative_to(sftflow_home)
        with guards.pipeline_lock("smoke", timeout=1):  # another pipeline: free
            pass
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=_try_lock, args=(str(sftflow_home), "demo"))
        p.start()
        p.join(60)
        assert p.exitcode == 7  # TimeoutError naming the lock


def _try_lock(home: str, pipeline: str) -> None:
    os.environ["SFTFLOW_HOME"] = home
    try:
        with guards.pipeline_lock(pipeline, timeout=0.5):
            raise SystemExit(0)
    except TimeoutError as e:
        raise SystemExit(7 if pipeline in str(e) and ".lock" in str(e) else 1) from None


# --------------------------------------------------------------------------- deployments
def test_build_deployments_one_per_pipeline_with_cron_and_limit(sftflow_home: Path) -> None:
    from flows.serve import build_deployments
    from sftflow.config import load_pipelines

    pipes = load_pipelines(REPO / "pipelines.yaml")
    deps = build_deployments(pipelines_file=str(REPO / "pipelines.yaml"))
    assert sorted(d.name for d in deps) == sorted(pipes)
    for d in deps:
        cfg = pipes[d.name]
        assert d.parameters == {"pipeline": d.name, "pipelines_file": str((REPO / "pipelines.yaml").resolve())}
        crons = [(s.schedule.cron, s.schedule.timezone, s.parameters) for s in d.schedules]
        if cfg.schedule.cron:
            assert crons == [(cfg.schedule.cron, cfg.schedule.timezone,
                              {"skip_if_unchanged": cfg.schedule.skip_if_unchanged})]
        else:
            assert crons == []
        assert d.concurrency_limit == 1 and d.concurrency_options.collision_strategy.value == "ENQUEUE"
        assert d.entrypoint == "flows.pipeline.sftflow_pipeline"
        # Typed parameters: the UI renders a form from this schema.
        props = d._parameter_openapi_schema.properties
        assert {"pipeline", "overrides", "pipelines_file", "skip_if_unchanged"} <= set(props)
    only = build_deployments(pipelines_file=str(REPO / "pipelines.yaml"), only=["smoke"], limit_concurrency=False)
    assert [d.name for d in only] == ["smoke"] and only[0].concurrency_limit is None


def test_build_deployments_unknown_pipeline_is_a_config_error() -> None:
    from flows.serve import build_deployments
    from sftflow.config_sections import ConfigError

    with pytest.raises(ConfigError, match="pipelines.nope: no such pipeline"):
        build_deployments(pipelines_file=str(REPO / "pipelines.yaml"), only=["nope"])


def test_prefect_yaml_matches_pipelines_yaml() -> None:
    """prefect.yaml is generated from pipelines.yaml; regenerate with `python -m flows.serve --write-prefect-yaml`."""
    from flows.serve import prefect_yaml
    from sftflow.config import load_pipelines

    committed = yaml.safe_load((REPO / "prefect.yaml").read_text())
    expected = prefect_yaml(pipelines_file=str(REPO / "pipelines.yaml"))
    committed.pop("prefect-version", None)
    expected.pop("prefect-version", None)
    assert committed == expected, "prefect.yaml is stale: run `python -m flows.serve --write-prefect-yaml`"
    pipes = load_pipelines(REPO / "pipelines.yaml")
    assert {d["name"] for d in committed["deployments"]} == set(pipes)
    for d in committed["deployments"]:
        module, func = d["entrypoint"].split(":")
        assert (REPO / module).exists() and func == "sftflow_pipeline"
        assert d["work_pool"]["name"] == "sftflow-docker"
        assert (REPO / "infra/production/work-pools/sftflow-docker.json").exists()


def test_production_compose_has_the_services_and_binds_loopback() -> None:
    compose = yaml.safe_load((REPO / "infra/production/docker-compose.yml").read_text())
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"} <= set(compose["services"])
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    import json

    pool = json.loads((REPO / "infra/production/work-pools/sftflow-docker.json").read_text())
    assert pool["variables"]["properties"]["networks"]["default"] == [compose["networks"]["sftflow"]["name"]]


def test_production_compose_keeps_secrets_out_of_command_lines() -> None:
    """A container's command line is visible to every user of the host (/proc/<pid>/cmdline, `ps`):
    passwords go through the environment (PGPASSWORD, MC_HOST_<alias>)."""
    compose = yaml.safe_load((REPO / "infra/production/docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        for key in ("command", "entrypoint"):
            value = svc.get(key) or []
            text = " ".join(value) if isinstance(value, list) else str(value)
            assert "PASSWORD" not in text and "SECRET" not in text, (name, key, text)
    env = {k: str(v) for k, v in compose["services"]["mlflow"]["environment"].items() if k != "<<"}
    assert env["PGPASSWORD"] == "${POSTGRES_PASSWORD}"
    prefect_env = compose["services"]["prefect-server"]["environment"]
    assert "PASSWORD" not in prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"]

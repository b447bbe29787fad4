"""Fixtures that start real servers on free loopback ports: Prefect + MLflow (SQLite or PostgreSQL
backends), and ``serve`` processes for deployments.

Everything started here is stopped by its recorded pid at teardown. The PostgreSQL variant needs
the Debian ``postgresql`` package (``.ci/setup_services.sh``); without it those tests skip with
that hint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"


@dataclass(frozen=True)
class Running:
    """A started stack and the $SFTFLOW_HOME it lives in."""

    backend: str
    home: Path
    stack: Any

    @property
    def prefect_api_url(self) -> str:
        return self.stack.prefect_api_url

    @property
    def mlflow_uri(self) -> str:
        return self.stack.mlflow_uri

    def client_env(self) -> dict[str, str]:
        return {**self.stack.client_env(), "SFTFLOW_HOME": str(self.home)}


@contextlib.contextmanager
def _home(home: Path) -> Iterator[None]:
    # Only while starting/stopping: the service helpers derive their folders from $SFTFLOW_HOME.
    # Tests talk to the servers by explicit URL, so no global client setting leaks into other tests.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTFLOW_HOME", str(home))
        for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "SFTFLOW_MLFLOW_ARTIFACTS"):
            mp.delenv(k, raising=False)
        yield


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest) -> Iterator[Running]:
    """A Prefect server + MLflow server on free loopback ports with the given backend store,
    under a fresh $SFTFLOW_HOME (PostgreSQL: a cluster initialised in it)."""
    from sftflow.ops import postgres, servers, services
    backend = request.param
    if backend == "postgres":
        try:
            postgres.pg_bindir()
        except servers.ServiceError as e:
            pytest.skip(str(e))
    # Not under pytest's basetemp: pytest re-chmods /tmp/pytest-of-<user> to 0700 (the `postgres`
    # account must reach the cluster) and concurrent pytest sessions prune old numbered dirs.
    home = Path(tempfile.mkdtemp(prefix=f"sftflow-stack-{backend}-", dir=os.environ.get("SFTFLOW_TEST_TMP")))
    try:
        with _home(home):
            st = services.start_stack(backend=backend, prefect_port=servers.free_port(),
                                      mlflow_port=servers.free_port(), pg_port=servers.free_port())
        try:
            yield Running(backend=backend, home=home, stack=st)
        finally:
            with _home(home):
                services.stop_stack()
    finally:
        if not os.environ.get("SFTFLOW_KEEP_TEST_HOMES"):
            shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def prefect_api(url: str) -> Iterator[None]:
    """Point this process's Prefect client at ``url`` (settings are read once, so patch them)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def wait_for_deployment(name: str, *, timeout: float = 180.0, proc: subprocess.Popen | None = None,
                        log: Path | None = None) -> Any:
    """Poll the API until deployment ``flow/deployment`` exists (the serve process registered it)."""
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"serve process exited ({proc.returncode}):\n{_tail(log)}")
            with contextlib.suppress(Exception):
                return client.read_deployment_by_name(name)
            time.sleep(1.0)
    raise AssertionError(f"deployment {name} not registered after {timeout:.0f}s:\n{_tail(log)}")


def wait_for_flow_run(flow_run_id: Any, *, timeout: float) -> Any:
    """Poll until the flow run reaches a final state; returns the flow run."""
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            fr = client.read_flow_run(flow_run_id)
            if fr.state is not None and fr.state.is_final():
                return fr
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {flow_run_id} still {fr.state.name if fr.state else '?'} "
                                     f"after {timeout:.0f}s")
            time.sleep(2.0)


def flow_run_logs(flow_run_id: Any) -> str:
    """All log messages of a flow run, as the UI shows them."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(f"{l.level} {l.message}" for l in logs)


def _tail(path: Path | None, n: int = 60) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@contextlib.contextmanager
def serve_process(stack: Running, *, only: str, deployment: str,
                  flow: str | None = None) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Run ``python -m flows.serve --only <pipeline>`` against ``stack`` until the block ends."""
    log = stack.home / f"serve-{only}-{(flow or 'pipeline').replace(':', '-')}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(stack.client_env())
    env.update({"PYTHONPATH": str(REPO), "DO_NOT_TRACK": "1",
                "PREFECT_RUNNER_POLL_FREQUENCY": "2"})
    argv = [sys.executable, "-m", "flows.serve", "--only", only]
    if flow:
        argv += ["--flow", flow]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        with prefect_api(stack.prefect_api_url):
            wait_for_deployment(deployment, proc=proc, log=log)
        yield proc, log
    finally:
        # SIGINT: the runner's own clean shutdown (pauses schedules, ends in-flight runs).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


SMOKE_DEPLOYMENT = "sftflow/smoke"


@pytest.fixture(scope="session")
def smoke_served(stack: Running) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``sftflow serve`` of the smoke pipeline (the real flow) against ``stack``."""
    with serve_process(stack, only="smoke", deployment=SMOKE_DEPLOYMENT) as served:
        yield served


@pytest.fixture(scope="session")
def smoke_run(stack: Running, smoke_served: tuple[subprocess.Popen, Path]) -> Any:
    """One smoke run triggered through the Prefect API as the UI's "Run" button does; the finished flow run."""
    from prefect.deployments import run_deployment

    proc, log = smoke_served
    with prefect_api(stack.prefect_api_url):
        fr = run_deployment(SMOKE_DEPLOYMENT, timeout=0)
        fr = wait_for_flow_run(fr.id, timeout=900)
        if fr.state is None or not fr.state.is_completed():
            raise AssertionError(f"smoke flow run {fr.id} ended {fr.state}:\n{flow_run_logs(fr.id)[-6000:]}\n"
                                 f"serve log:\n{_tail(log)}")
    return fr

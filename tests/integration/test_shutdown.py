"""Shutdown with real processes (issue 22, class 7): nothing hangs, nothing outlives its parent.

* ``sftflow serve`` against a real Prefect server on loopback: when the server goes away, serve
  stops within 10 s with one line and no traceback (it used to take 73-78 s and exit with a
  ConnectError and a websocket traceback).
* ``sftflow serve-model`` of a registered tiny model: SIGTERM leaves no listener on the port and
  no process of its tree (``mlflow models serve``, bash, uvicorn) alive; neither does ``kill -9``.

Run: ``python -m pytest tests/integration/test_shutdown.py -m integration``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import prefect_api, wait_for_deployment

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "SFTFLOW_"))}
    env.update({"SFTFLOW_HOME": str(home), "PYTHONPATH": str(REPO), "DO_NOT_TRACK": "1", **extra})
    return env


def _wait_exit(proc: subprocess.Popen, timeout: float) -> float | None:
    """Seconds until ``proc`` exited, or None after ``timeout``."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - t0


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- sftflow serve
def test_serve_stops_within_10s_with_one_line_when_the_prefect_server_is_gone(tmp_path: Path) -> None:
    from sftflow.ops import servers, services

    home = Path(tempfile.mkdtemp(prefix="sftflow-shutdown-", dir=os.environ.get("SFTFLOW_TEST_TMP")))
    state = home / "services"
    server = services.start_prefect_server(port=servers.free_port(), prefect_home=home / "prefect", state=state)
    log = tmp_path / "serve.log"
    out = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve"], cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env=_env(home, PREFECT_API_URL=server.url, PREFECT_RUNNER_POLL_FREQUENCY="2"))
    try:
        with prefect_api(server.url):
            wait_for_deployment("sftflow/smoke", proc=proc, log=log)
        before = log.read_text(errors="replace")
        servers.stop_service(server, state=state)  # SIGTERM its tree; returns once it is gone
        assert not servers.port_in_use(int(server.url.rsplit(":", 1)[1].split("/")[0]))
        took = _wait_exit(proc, timeout=10.0)
        assert took is not None, f"serve still runs 10 s after the server stopped:\n{log.read_text()[-3000:]}"
        after = log.read_text(errors="replace")[len(before):]
        lines = [line for line in after.splitlines() if line.strip()]
        print({"exit_s": round(took, 2), "rc": proc.returncode, "lines": lines})
        assert proc.returncode == 3, after  # EXIT_SERVICE
        assert len(lines) == 1, after
        assert lines[0].startswith(f"sftflow: service unavailable: the Prefect server {server.url} stopped answering")
        assert "Traceback" not in after and "ConnectError" not in after
    finally:
        _kill_group(proc)
        out.close()
        servers.stop_service(server, state=state)
        shutil.rmtree(home, ignore_errors=True)


# --------------------------------------------------------------------------- sftflow serve-model
NAME = "sftflow-shutdown"


@pytest.fixture()
def registered(sftflow_home: Path) -> str:
    """A tiny model registered as ``sftflow-shutdown@champion`` in the SQLite store under the home
    (the same steps as tests/integration/test_serve_model.py)."""
    import mlflow
    from mlflow import MlflowClient

    from sftflow.data.refs import ModelRef
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.tracking.registry import CHAMPION, log_model, set_alias
    from sftflow.tracking.runs import configure, ensure_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri()
    configure(uri)
    tiny = build_tiny_model("tiny-gemma")
    exp = ensure_experiment(NAME, uri=uri)
    with mlflow.start_run(experiment_id=exp):
        _, name, version = log_model(model=ModelRef(path=tiny.path, sha256=tiny.sha256, kind="merged", name="tiny"),
                                     template="gemma", register_as=NAME, metrics=(("train_loss", 1.0),))
    set_alias(MlflowClient(uri), name=name, alias=CHAMPION, version=version)
    return f"{name}@{CHAMPION}"


def _start_serve_model(home: Path, model: str, port: int, log: Path) -> tuple[subprocess.Popen, list]:
    """``sftflow serve-model`` until /ping answers; the process and its tree (psutil processes)."""
    import psutil

    out = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve-model", model, "--port", str(port)], cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT, env=_env(home), start_new_session=True)
    out.close()
    t0 = time.monotonic()
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() - t0 < 300, "model server not up in 300 s: " + log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    return proc, psutil.Process(proc.pid).children(recursive=True)


def _alive(procs: list) -> list[str]:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_serve_model_leaves_no_listener_and_no_child(registered: str, sftflow_home: Path, tmp_path: Path,
                                                     how: str) -> None:
    from sftflow.ops.servers import free_port, port_in_use

    port = free_port()
    log = tmp_path / "serve-model.log"
    proc, tree = _start_serve_model(sftflow_home, registered, port, log)
    assert any("uvicorn" in " ".join(p.cmdline()) for p in tree), [p.cmdline() for p in tree]
    try:
        os.kill(proc.pid, getattr(signal, how))  # the CLI only, as `kill` / a supervisor does
        took = _wait_exit(proc, timeout=20.0)
        assert took is not None, log.read_text()[-3000:]
        deadline = time.monotonic() + 15.0  # after kill -9 the tree gets its parent-death SIGTERM
        while (_alive(tree) or port_in_use(port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        print({"signal": how, "exit_s": round(took, 2), "rc": proc.returncode, "tree": len(tree)})
        assert _alive(tree) == [], log.read_text()[-3000:]
        assert not port_in_use(port)
        if how == "SIGTERM":
            assert proc.returncode == 128 + signal.SIGTERM
            assert "sftflow: stopping the model server (SIGTERM)" in log.read_text()
            assert "Traceback" not in log.read_text()
    finally:
        for p in tree:
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        _kill_group(proc)

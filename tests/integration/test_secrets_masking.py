"""A tracking URI with a password never shows (issue 22, class 1), end to end.

A real ``mlflow server`` on loopback (it ignores the basic-auth credentials the client sends, so the
URI ``http://alice:<password>@127.0.0.1:<port>`` works), then ``sftflow run`` of a tiny pipeline
through the real CLI with ``MLFLOW_TRACKING_URI`` set to it. MLflow itself prints "View run ... at:
<tracking URI>" for every stage run; the password must be nowhere: console, run log, anything under
$SFTFLOW_HOME, the server's store (params, tags) and artifacts. The run log is owner-only.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
PASSWORD = "Zk9-tracking-s3cret"


def _grep(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_tracking_password_is_masked_in_console_log_store_and_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         cli_env, tiny_pipeline, qa_rows) -> None:
    from sftflow.ops import servers, services

    server_home = tmp_path / "server"
    monkeypatch.setenv("SFTFLOW_HOME", str(server_home))
    port = servers.free_port()
    state = server_home / "state"
    state.mkdir(parents=True)
    svc = services.start_mlflow_server(port=port, state=state)
    try:
        f = tiny_pipeline(tmp_path, qa_rows(tmp_path / "d.jsonl", 16))
        home = tmp_path / "home"
        env = cli_env(home, MLFLOW_TRACKING_URI=f"http://alice:{PASSWORD}@127.0.0.1:{port}")
        res = subprocess.run([sys.executable, "-m", "flows.cli", "run", "p", "-f", str(f)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert PASSWORD not in res.stdout + res.stderr
        logs = list(home.glob("runs/p/*/sftflow.log"))
        assert len(logs) == 1
        log = logs[0].read_text()
        # MLflow did print its lines (masked), so the check is not vacuous.
        assert f"View run ingest at: http://alice:***@127.0.0.1:{port}/" in log, log[-3000:]
        assert stat.S_IMODE(logs[0].stat().st_mode) == 0o600
        assert _grep(home, PASSWORD.encode()) == []
        # The server's store (params, tags, run names) and artifacts (resolved config, summary).
        assert _grep(server_home, PASSWORD.encode()) == []
        assert list(server_home.rglob("resolved.yaml")), "the run logged no config artifact"
    finally:
        servers.stop_service(svc, state=state)

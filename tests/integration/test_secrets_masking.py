"""A tracking URI with a password never shows (issue 22, class 1), end to end.

A real ``mlflow server`` on loopback (it ignores the basic-auth credentials the client sends, so the
URI ``http://alice:<password>@127.0.0.1:<port>`` works), then ``sftflow run`` of a tiny pipeline
through the real CLI with ``MLFLOW_TRACKING_URI`` set to it. MLflow itself prints "View run ... at:
<tracking URI>" for every stage run; the password must be nowhere: console, run log, anything under
$SFTFLOW_HOME, the server's store (params, tags) and artifacts. The run log is owner-only.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
PASSWORD = "Zk9-tracking-s3cret"


def _grep(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_tracking_password_is_masked_in_console_log_store_and_artifacts(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from sftflow.ops import servers, services

    server_home = tmp_path / "server"
    monkeypatch.setenv("SFTFLOW_HOME", str(server_home))
    port = servers.free_port()
    state = server_home / "state"
    state.mkdir(parents=True)
    svc = services.start_mlflow_server(port=port, state=state)
    try:
        (tmp_path / "d.jsonl").write_text("".join(
            f'{{"instruction": "question number {i} about topic {i * 7}", "output": "answer {i} is {i * 13}"}}\n'
            for i in range(16)))
        f = tmp_path / "pipelines.yaml"
        f.write_text(textwrap.dedent(f"""
            pipelines:
              p:
                base_model: tiny-gemma
                sources: [{{name: s, path: {tmp_path / 'd.jsonl'}}}]
                evaluation: {{enabled: false}}
                promotion: {{enabled: false}}
                training: {{max_steps: 1, batch_size: 2}}
            """))
        home = tmp_path / "home"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "MLFLOW_")) and k not in ("SFTFLOW_DEBUG", "SFTFLOW_PIPELINES")}
        env.update(SFTFLOW_HOME=str(home), PYTHONPATH=str(REPO),
                   MLFLOW_TRACKING_URI=f"http://alice:{PASSWORD}@127.0.0.1:{port}")
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

"""A filesystem that fills up during ``sftflow run`` (issue 22, class 9): one ``sftflow: disk full``
line naming the filesystem (mount point, type, free of size) and what to do, exit 5, no traceback and
no logging error on the console, the failure said once.

$SFTFLOW_HOME lives on a real small tmpfs (needs root and mount rights; skipped otherwise). The
preflight's free-space estimate is switched off (SFTFLOW_DISK_NEEDED=0) so the disk fills mid-run,
as it does when something else eats the space while a run is going.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sftflow import errors

pytestmark = pytest.mark.integration


@pytest.fixture()
def small_tmpfs(mount_tmpfs) -> Path:
    return mount_tmpfs("11m")


def test_disk_full_mid_run_is_one_line_exit_5(tmp_path: Path, small_tmpfs: Path, cli_env, tiny_pipeline,
                                              qa_rows) -> None:
    f = tiny_pipeline(tmp_path, qa_rows(tmp_path / "d.jsonl", 20))
    env = cli_env(small_tmpfs / "home", SFTFLOW_DISK_NEEDED="0")
    res = subprocess.run([sys.executable, "-m", "flows.cli", "run", "p", "-f", str(f)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == errors.EXIT_HOME, out[-4000:]
    assert "Traceback" not in out and "Logging error" not in out and "probably a bug" not in out, out[-4000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("sftflow:") and "warning:" not in ln]
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("sftflow: disk full: ")
    assert f"mounted at {small_tmpfs} (tmpfs)" in lines[0] and "free of 11.0 MiB" in lines[0]
    assert "set SFTFLOW_HOME" in lines[0]
    # Said once: Prefect's task and flow restatements of the failure stay in the run log.
    assert "Encountered exception during execution" not in res.stdout
    assert sum("Task run failed" in ln for ln in res.stdout.splitlines()) == 0, res.stdout

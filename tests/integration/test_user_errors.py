"""A filesystem that fills up during ``sftflow run`` (issue 22, class 9): one ``sftflow: disk full``
line naming the filesystem (mount point, type, free of size) and what to do, exit 5, no traceback and
no logging error on the console, the failure said once.

$SFTFLOW_HOME lives on a real small tmpfs (needs root and mount rights; skipped otherwise). The
preflight's free-space estimate is switched off (SFTFLOW_DISK_NEEDED=0) so the disk fills mid-run,
as it does when something else eats the space while a run is going.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sftflow import errors

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture()
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=11m", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_mid_run_is_one_line_exit_5(tmp_path: Path, small_tmpfs: Path) -> None:
    (tmp_path / "d.jsonl").write_text("".join(
        f'{{"instruction": "question number {i} about topic {i * 7}", "output": "answer {i} is {i * 13}"}}\n'
        for i in range(20)))
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
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k not in ("SFTFLOW_DEBUG", "SFTFLOW_PIPELINES")}
    env.update(SFTFLOW_HOME=str(small_tmpfs / "home"), PYTHONPATH=str(REPO), SFTFLOW_DISK_NEEDED="0")
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

"""`sftflow run smoke` as a user sees it: a short console without third-party noise, the noise kept
in the run's log file, and `sftflow runs --json` listing the run afterwards (one smoke run shared
by the module)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
# What third-party noise looks like on a console: warnings (UserWarning, FutureWarning, setuptools'
# ...Warning), MLflow's own log lines, and tqdm / Hugging Face progress bars.
NOISE = re.compile(r"Warning\b|warnings\.warn|color_warning|\bmlflow\.[a-z_.]+:|it/s\]|s/it\]|\|[#\u2588-\u258f -]*\| *\d+/\d+"
                   r"|Loading weights|Writing model shards|Downloading artifacts|Successfully registered model")
MAX_CONSOLE_LINES = 60


def _cli(home: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HF_", "TQDM_"))}
    env["SFTFLOW_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    home = tmp_path_factory.mktemp("console-home")
    return home, _cli(home, "run", "smoke")


def test_console_is_short_and_free_of_third_party_noise(smoke) -> None:
    home, proc = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    console = (proc.stdout + proc.stderr).splitlines()
    noisy = [ln for ln in console if NOISE.search(ln)]
    assert not noisy, "third-party noise on the console:\n" + "\n".join(noisy[:20])
    assert len(console) <= MAX_CONSOLE_LINES, f"{len(console)} console lines:\n" + "\n".join(console)
    out = proc.stdout
    for stage in ("ingest", "validate", "dedup", "split", "backtranslate", "train", "evaluate.base",
                  "evaluate.tuned", "promote"):
        assert re.search(rf"^\[\d+:\d\d\] ok {re.escape(stage)} +Completed", out, re.M), stage
    # stage, state, time, rows in, rows out, the stage's own peak RSS, note
    assert re.search(r"^ingest +Completed +[\d.]+s +89 +84 +\d+\.\d GB +5 quarantined$", out, re.M), out
    assert "rougeL (gate)" in out and "Gate:" in out and "MLflow run:" in out
    promoted = "PROMOTED to champion" in out
    version = re.search(r"^Model: +sftflow-smoke version (\d+)", out, re.M)
    assert version, out
    nxt = re.search(r"^Next: +(sftflow lineage \S+)$", out, re.M)
    assert nxt, out
    assert nxt.group(1) == ("sftflow lineage sftflow-smoke@champion" if promoted
                            else f"sftflow lineage sftflow-smoke/{version.group(1)}")
    # the suggested command works
    lineage = _cli(home, *nxt.group(1).split()[1:], timeout=300)
    assert lineage.returncode == 0, lineage.stderr[-2000:]


def test_log_file_under_the_run_dir_kept_the_noise(smoke) -> None:
    home, proc = smoke
    assert proc.returncode == 0
    run_dir = Path(re.search(r"^Run directory: +(\S+)$", proc.stdout, re.M).group(1))
    assert run_dir.is_relative_to(home.resolve() / "runs" / "smoke")
    log = run_dir / "sftflow.log"
    assert re.search(r"^Log: +" + re.escape(str(log)), proc.stdout, re.M)
    text = log.read_text()
    # warnings captured through logging.captureWarnings, with their category and origin
    assert re.search(r"py\.warnings - .*(UserWarning|FutureWarning)", text), text[-3000:]
    # the stages' detail lines and Prefect's task-run lines are kept too
    assert "Finished in state Completed()" in text and "detected as format" in text
    assert "summary: {" in text


def test_runs_json_lists_the_run(smoke) -> None:
    home, proc = smoke
    assert proc.returncode == 0
    res = _cli(home, "runs", "smoke", "--json", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    entries = json.loads(res.stdout)
    assert [e["pipeline"] for e in entries] == ["smoke"]
    entry = entries[0]
    run_id = re.search(r"^MLflow run: +(\S+)$", proc.stdout, re.M).group(1)
    version = re.search(r"^Model: +sftflow-smoke version (\d+)", proc.stdout, re.M).group(1)
    assert [r["run_id"] for r in entry["runs"]] == [run_id]
    run = entry["runs"][0]
    assert run["status"] == "FINISHED" and run["duration_s"] > 0 and run["model_version"] == version
    assert isinstance(run["base_rougeL"], float) and isinstance(run["tuned_rougeL"], float)
    assert isinstance(run["promoted"], bool)
    assert entry["candidate"] == version
    assert entry["champion"] == (version if run["promoted"] else None)
    table = _cli(home, "runs", timeout=300)
    assert table.returncode == 0 and run_id[:12] in table.stdout and "no runs yet" in table.stdout  # demo: none

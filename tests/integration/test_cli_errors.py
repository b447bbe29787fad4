"""User errors that only show once the flow runs (inside Prefect tasks) end `sftflow run` with one
`sftflow:` line naming the file / key and a documented exit code, without a traceback anywhere in
the output (Prefect's run logs included); `--debug` brings the tracebacks back.

Tiny pipelines (tiny random model, a handful of rows, evaluation off) that fail at ingest or at
the split, so each run takes seconds, not a training run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sftflow import errors
pytestmark = pytest.mark.integration


@pytest.fixture()
def cli(cli_env):
    """``cli(home, *args, cwd=, timeout=600)``: `sftflow <args>` as a user runs it, under ``home``."""
    def run(home: Path, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=cli_env(home),
                              capture_output=True, text=True, timeout=timeout)
    return run


def _sftflow_lines(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("sftflow:")]


def test_bad_data_file_is_one_line_exit_4(tmp_path: Path, cli, tiny_pipeline) -> None:
    # A missing comma on line 2.
    (tmp_path / "broken.json").write_text('[{"instruction": "q", "output": "a"},\n'
                                          ' {"instruction": "q2" "output": "a2"}]\n')
    f = tiny_pipeline(tmp_path, "broken.json")
    home = tmp_path / "home"
    res = cli(home, "run", "p", "-f", str(f), cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == errors.EXIT_DATA, out[-4000:]
    assert "Traceback" not in out, out[-6000:]
    lines = _sftflow_lines(res)
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("sftflow: bad input data: ") and "broken.json" in lines[0] and "line 2" in lines[0]

    # The same failure with --debug: the tracebacks are back (Prefect's and ours).
    res = cli(home, "--debug", "run", "p", "-f", str(f), cwd=tmp_path)
    assert res.returncode == errors.EXIT_DATA
    assert "Traceback (most recent call last)" in res.stderr
    assert _sftflow_lines(res)[-1].startswith("sftflow: bad input data: ")

    # Lineage of a model this store does not have: one line, exit 2 (the failed run created the store).
    res = cli(home, "lineage", "sftflow-nope@champion", cwd=tmp_path, timeout=120)
    assert res.returncode == errors.EXIT_CONFIG, res.stderr
    assert res.stderr.strip().splitlines() == ["sftflow: not found: no registered model 'sftflow-nope'; "
                                               "registered models: none"]


def test_too_few_rows_after_dedup_is_one_line_exit_4(tmp_path: Path, cli, tiny_pipeline) -> None:
    # 6 rows pass the preflight bound for heldout_size=2, but 5 are the same pair: dedup leaves 2.
    rows = ['{"instruction": "What is the capital of France?", "output": "Paris is the capital of France."}'] * 5
    rows.append('{"instruction": "Name a large ocean.", "output": "The Pacific Ocean."}')
    (tmp_path / "dup.jsonl").write_text("\n".join(rows) + "\n")
    f = tiny_pipeline(tmp_path, "dup.jsonl", "    split: {heldout_size: 2}\n")
    res = cli(tmp_path / "home", "run", "p", "-f", str(f), cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == errors.EXIT_DATA, out[-4000:]
    assert "Traceback" not in out, out[-6000:]
    lines = _sftflow_lines(res)
    assert len(lines) == 1, res.stderr[-3000:]
    assert "split.heldout_size=2" in lines[0] and "2 row(s) remain after ingest, validation and dedup" in lines[0]

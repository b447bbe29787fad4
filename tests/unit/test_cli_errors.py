"""User errors end `sftflow` with one or two lines naming the file / key, a documented exit code,
no traceback, and nothing created under $SFTFLOW_HOME; `--debug` shows the traceback.

Every case runs the real console command in a subprocess and fails before any flow starts (the
cases that need a flow run are in tests/integration/test_cli_errors.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from sftflow import errors
REPO = Path(__file__).resolve().parents[2]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k not in ("SFTFLOW_DEBUG", "SFTFLOW_PIPELINES")}
    env.update(SFTFLOW_HOME=str(home), PYTHONPATH=str(REPO), **extra)
    return env


def _cli(cwd: Path, home: Path, *args: str, timeout: int = 120, pre: list[str] | None = None,
         **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(pre or []), sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=_env(home, **env),
                          capture_output=True, text=True, timeout=timeout)


def _rows(path: Path, n: int) -> Path:
    path.write_text("".join(f'{{"instruction": "question number {i}", "output": "answer {i}"}}\n' for i in range(n)))
    return path


def _pipelines(tmp_path: Path, body: str) -> Path:
    _rows(tmp_path / "d.jsonl", 5)
    p = tmp_path / "pipelines.yaml"
    p.write_text(textwrap.dedent(body))
    return p


GOOD = """
pipelines:
  p:
    base_model: tiny-gemma
    sources:
      - {name: s, path: d.jsonl}
"""


def _assert_user_error(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == code, out
    assert "Traceback" not in out, out
    lines = res.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, res.stderr
    assert lines[0].startswith("sftflow: "), res.stderr
    for n in needles:
        assert n in res.stderr, res.stderr


# (name, pipelines.yaml body or None for GOOD, argv with {f} = the file, expected substrings)
CONFIG_CASES = [
    ("malformed-yaml", "pipelines:\n  p:\n    sources: [unclosed\n    x: 1\n", ["run", "p", "-f", "{f}"],
     ["pipelines.yaml:4:6: not valid YAML", "started at line 3"]),
    ("unknown-pipeline", None, ["run", "nope", "-f", "{f}"], ["pipelines.nope: no such pipeline (have: p)"]),
    ("missing-source", GOOD.replace("d.jsonl", "gone.jsonl"), ["run", "p", "-f", "{f}"],
     ["pipelines.p.sources.0.path: file not found", "gone.jsonl"]),
    ("heldout-too-large", GOOD + "    split: {heldout_size: 5}\n", ["run", "p", "-f", "{f}"],
     ["pipelines.p.split.heldout_size=5 leaves no rows for training", "at most 5 row(s)", "d.jsonl"]),
    ("heldout-vs-max-rows", GOOD.replace("path: d.jsonl}", "path: d.jsonl, max_rows: 3}")
     + "    split: {heldout_size: 3}\n", ["run", "p", "-f", "{f}"],
     ["pipelines.p.split.heldout_size=3", "at most 3 row(s)", "capped by max_rows=3"]),
    ("bad-override", None, ["run", "p", "-f", "{f}", "--set", "training.lora.r=0"],
     ["pipelines.p.training.lora.r: must be greater than 0 (got 0)"]),
    ("backward-training-typo", GOOD + "    augmentation: {backward_training: {max_stepz: 3}}\n",
     ["validate-config", "-f", "{f}"],
     ["pipelines.p.augmentation.backward_training.max_stepz: unknown key (did you mean 'max_steps'? allowed: method,"]),
    ("forward-training-bad-value", GOOD + "    augmentation: {forward_training: {lora: {r: -1}}}\n",
     ["run", "p", "-f", "{f}"], ["pipelines.p.augmentation.forward_training.lora.r: must be greater than 0"]),
    ("promotion-metric", GOOD + "    promotion: {metric: rougeX}\n", ["validate-config", "-f", "{f}"],
     ["pipelines.p.promotion.metric: 'rougeX' is not a metric the evaluation reports"]),
]


@pytest.mark.parametrize(("name", "body", "argv", "needles"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors_are_one_line_exit_2_and_create_nothing(tmp_path: Path, name: str, body: str | None,
                                                              argv: list[str], needles: list[str]) -> None:
    f = _pipelines(tmp_path, body or GOOD)
    home = tmp_path / "home-not-yet"
    res = _cli(tmp_path, home, *[a.replace("{f}", str(f)) for a in argv])
    _assert_user_error(res, errors.EXIT_CONFIG, *needles)
    assert not home.exists(), sorted(p.name for p in home.rglob("*"))


def test_pipelines_file_that_is_a_folder_or_missing(tmp_path: Path) -> None:
    _pipelines(tmp_path, GOOD)
    home = tmp_path / "home"
    res = _cli(tmp_path, home, "run", "p", "-f", str(tmp_path))
    _assert_user_error(res, errors.EXIT_CONFIG, f"{tmp_path}: is a folder; expected a pipelines YAML file",
                       "did you mean -f")
    res = _cli(tmp_path, home, "validate-config", "-f", str(tmp_path / "nope.yaml"))
    _assert_user_error(res, errors.EXIT_CONFIG, "nope.yaml: pipelines file not found")
    assert not home.exists()


def test_debug_flag_and_env_show_the_traceback(tmp_path: Path) -> None:
    f = _pipelines(tmp_path, GOOD + "    split: {heldout_size: 9}\n")
    home = tmp_path / "home"
    for res in (_cli(tmp_path, home, "--debug", "run", "p", "-f", str(f)),
                _cli(tmp_path, home, "run", "p", "-f", str(f), "--debug"),
                _cli(tmp_path, home, "run", "p", "-f", str(f), SFTFLOW_DEBUG="1")):
        assert res.returncode == errors.EXIT_CONFIG, res.stderr
        assert "Traceback (most recent call last)" in res.stderr and "preflight" in res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("sftflow: invalid configuration: pipelines.p.split")
    assert not home.exists()


def test_unusable_home_is_refused_up_front(tmp_path: Path) -> None:
    f = _pipelines(tmp_path, GOOD)
    a_file = tmp_path / "d.jsonl"
    _assert_user_error(_cli(tmp_path, a_file, "run", "p", "-f", str(f)), errors.EXIT_HOME,
                       f"$SFTFLOW_HOME={a_file} is not a folder")
    _assert_user_error(_cli(tmp_path, a_file / "sub", "run", "p", "-f", str(f)), errors.EXIT_HOME,
                       "cannot be created", f"{a_file} is not a folder")


def test_read_only_home_is_refused_up_front() -> None:
    # Root writes through permission bits; run the command as `nobody` then (setpriv, util-linux),
    # in a folder outside pytest's 0700 basetemp so that `nobody` can reach it.
    pre: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot drop privileges to test a read-only folder")
        pre = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    work = Path(tempfile.mkdtemp(prefix="sftflow-ro-", dir=os.environ.get("SFTFLOW_TEST_TMP")))
    try:
        work.chmod(0o755)
        f = _pipelines(work, GOOD)
        for p in (f, work / "d.jsonl"):
            p.chmod(0o644)
        ro = work / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        res = _cli(work, ro, "run", "p", "-f", str(f), pre=pre)
        _assert_user_error(res, errors.EXIT_HOME, f"$SFTFLOW_HOME={ro} is not writable")
        res = _cli(work, ro / "new", "run", "p", "-f", str(f), pre=pre)
        _assert_user_error(res, errors.EXIT_HOME, f"{ro / 'new'} cannot be created: {ro} is not writable")
        assert list(ro.iterdir()) == []
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_unexpected_error_is_one_line_exit_1_and_debug_shows_it(tmp_path: Path) -> None:
    # A real bug in a command (here: injected into validate-config), through the real entry point.
    code = ("import sys, flows.cli as c\n"
            "def boom(args): return 1 // 0\n"
            "c.COMMANDS['validate-config'] = boom\n"
            "sys.exit(c.main(sys.argv[1:]))\n")
    home = tmp_path / "home"
    home.mkdir()
    cmd = [sys.executable, "-c", code, "validate-config"]
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(home), capture_output=True, text=True, timeout=60)
    _assert_user_error(res, errors.EXIT_FAILURE,
                       "unexpected error: ZeroDivisionError: integer division or modulo by zero", "--debug")
    saved = home / "logs" / "last-error.txt"
    assert str(saved) in res.stderr and "Traceback" in saved.read_text()
    res = subprocess.run([*cmd, "--debug"], cwd=tmp_path, env=_env(home), capture_output=True, text=True, timeout=60)
    assert res.returncode == errors.EXIT_FAILURE and "Traceback (most recent call last)" in res.stderr
    assert "in boom" in res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lineage_fails_fast_without_a_server_or_a_store(tmp_path: Path) -> None:
    home = tmp_path / "home"
    t0 = time.monotonic()
    res = _cli(tmp_path, home, "lineage", "sftflow-x@champion", "--tracking-uri", f"http://127.0.0.1:{_free_port()}")
    _assert_user_error(res, errors.EXIT_SERVICE, "is unreachable")
    res2 = _cli(tmp_path, home, "lineage", "sftflow-x@champion", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{_free_port()}")
    _assert_user_error(res2, errors.EXIT_SERVICE, "is unreachable")
    assert time.monotonic() - t0 < 60
    # No store under this $SFTFLOW_HOME: say so, and do not create an empty one.
    res = _cli(tmp_path, home, "lineage", "sftflow-x@champion")
    _assert_user_error(res, errors.EXIT_CONFIG, f"no MLflow store at {home / 'mlflow' / 'mlflow.db'}")
    assert not home.exists()


def test_help_documents_exit_codes_and_debug(tmp_path: Path) -> None:
    for argv in (["--help"], ["run", "--help"]):
        res = _cli(tmp_path, tmp_path / "home", *argv)
        assert res.returncode == 0
        assert "--debug" in res.stdout and "SFTFLOW_DEBUG=1" in res.stdout
        for code, text in errors.EXIT_CODES.items():
            assert f"{code:<4} {text}" in res.stdout


def test_validate_config_of_the_repo_passes_and_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    res = _cli(tmp_path, home, "validate-config", "-f", str(REPO / "pipelines.yaml"))
    assert res.returncode == 0, res.stderr
    assert "ok  smoke:" in res.stdout and "ok  demo:" in res.stdout
    assert not home.exists()


def test_user_errors_are_found_inside_wrappers() -> None:
    from sftflow.config_sections import ConfigError

    from sftflow.data.readers import IngestError

    try:
        try:
            raise IngestError("data.json: not valid JSON at line 2 column 3")
        except ValueError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as outer:
        found = errors.find_user_error(outer)
    assert found is not None and found[1] == errors.EXIT_DATA and "line 2 column 3" in str(found[0])
    group = ExceptionGroup("many", [KeyError("x"), ConfigError("pipelines.p.x: unknown key")])
    assert errors.find_user_error(group)[1] == errors.EXIT_CONFIG  # type: ignore[index]
    assert errors.find_user_error(ZeroDivisionError()) is None
    assert errors.one_line("a\n\n  b\n") == "a; b"

"""Problems of the environment are user errors, not bugs (issue 22, class 9): one ``sftflow:`` line
naming the path and what to do, a documented exit code, before any stage where it can be known.

Cases: a damaged ``mlflow.db`` (junk bytes; ``lineage``, ``runs`` and ``run``), an unreadable
source file, ``lineage`` on a read-only home, a full filesystem (a real small tmpfs), and that
such failures are never retried. The full-disk run through a whole flow is in
tests/integration/test_user_errors.py.

Unreadable / read-only cases need permission checks to bite: as root they run the command with
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped from the bounding set (``setpriv``), so root
obeys file modes like any user; without setpriv they skip, saying so.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sftflow import errors

REPO = Path(__file__).resolve().parents[2]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k not in ("SFTFLOW_DEBUG", "SFTFLOW_PIPELINES")}
    env.update(SFTFLOW_HOME=str(home), PYTHONPATH=str(REPO), **extra)
    return env


def _as_plain_user() -> list[str]:
    """A command prefix under which file modes apply (root without its DAC override capabilities)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: file modes cannot be made to apply")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _cli(cwd: Path, home: Path, *args: str, pre: list[str] | None = None, timeout: int = 300,
         **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(pre or []), sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=_env(home, **env),
                          capture_output=True, text=True, timeout=timeout)


def _one_line(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    out = res.stdout + res.stderr
    assert res.returncode == code, out[-3000:]
    assert "Traceback" not in out and "probably a bug" not in out, out[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("sftflow:") and "warning:" not in ln]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _real_store(home: Path) -> Path:
    """A real MLflow SQLite store (tables created by MLflow itself) under ``home``."""
    db = home / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True)
    code = ("import sys; from mlflow.tracking import MlflowClient; "
            "c = MlflowClient(tracking_uri=sys.argv[1], registry_uri=sys.argv[1]); "
            "c.search_experiments(); c.search_registered_models()")
    subprocess.run([sys.executable, "-c", code, f"sqlite:///{db}"], check=True, capture_output=True, timeout=300,
                   env=_env(home))
    return db


# ----------------------------------------------------------------------------- a damaged mlflow.db
def test_damaged_store_is_one_line_exit_3_naming_the_file(tmp_path: Path, tiny_pipeline, qa_rows) -> None:
    home = tmp_path / "home"
    db = _real_store(home)
    with open(db, "r+b") as f:  # junk over SQLite's header: "file is not a database"
        f.write(os.urandom(512))
    f = tiny_pipeline(tmp_path, qa_rows(tmp_path / "d.jsonl", 12))
    for argv in (["lineage", "sftflow-p@champion"], ["runs", "p", "-f", str(f)]):
        line = _one_line(_cli(tmp_path, home, *argv), errors.EXIT_SERVICE, "damaged store", str(db),
                         "file is not a database", "move it aside")
        assert "was deleted" not in line
    # `run` says it before any stage: no flow run, no run folder.
    _one_line(_cli(tmp_path, home, "run", "p", "-f", str(f)), errors.EXIT_SERVICE, str(db))
    assert not (home / "runs").exists() and not (home / "prefect").exists()


def test_store_that_is_not_sqlite_at_all(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "mlflow").mkdir(parents=True)
    (home / "mlflow" / "mlflow.db").write_bytes(b"this is not a database\n" * 100)
    _one_line(_cli(tmp_path, home, "lineage", "sftflow-p@champion"), errors.EXIT_SERVICE,
              f"{home / 'mlflow' / 'mlflow.db'}: the store's database is damaged")


# ----------------------------------------------------------------------------- an unreadable source
def test_unreadable_source_is_one_line_exit_4_before_any_stage(tmp_path: Path, tiny_pipeline, qa_rows) -> None:
    pre = _as_plain_user()
    src = tmp_path / "d.jsonl"
    f = tiny_pipeline(tmp_path, qa_rows(src, 12))
    src.chmod(0)
    home = tmp_path / "home"
    try:
        res = _cli(tmp_path, home, "run", "p", "-f", str(f), pre=pre)
    finally:
        src.chmod(0o644)
    _one_line(res, errors.EXIT_DATA, "permission denied", str(src), "chmod")
    assert not (home / "runs").exists() and not (home / "prefect").exists()  # before any flow run


# ----------------------------------------------------------------------------- lineage, read-only home
def test_lineage_on_a_read_only_home_reads_the_store(tmp_path: Path, tiny_pipeline, qa_rows) -> None:
    pre = _as_plain_user()
    home = tmp_path / "home"
    db = _real_store(home)
    (db.parent / "mlflow.db.init.lock").unlink(missing_ok=True)
    for p in [home, *home.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        res = _cli(tmp_path, home, "lineage", "sftflow-nope@champion", pre=pre)
        f = tiny_pipeline(tmp_path, qa_rows(tmp_path / "d.jsonl", 12))
        runs = _cli(tmp_path, home, "runs", "p", "-f", str(f), pre=pre)
    finally:
        for p in [home, *home.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    # It reads the store (the model is not there: the usual "not found"), it does not crash on a lock file.
    _one_line(res, errors.EXIT_CONFIG, "no registered model 'sftflow-nope'")
    assert runs.returncode == 0, runs.stderr


# ----------------------------------------------------------------------------- a full filesystem
@pytest.fixture()
def small_tmpfs(tmp_path: Path):
    """A real 1 MiB tmpfs (needs root and mount rights; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_enospc_becomes_one_line_naming_the_filesystem(small_tmpfs: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFTFLOW_HOME", str(small_tmpfs / "home"))
    target = small_tmpfs / "big.bin"
    with pytest.raises(OSError) as info:
        with open(target, "wb") as f:
            for _ in range(4):
                f.write(b"\0" * (512 * 1024))
                f.flush()
                os.fsync(f.fileno())
    assert info.value.errno == errno.ENOSPC
    try:
        raise RuntimeError("task failed") from info.value  # as Prefect wraps it
    except RuntimeError as wrapped:
        found = errors.find_user_error(wrapped)
    assert found is not None
    err, code, label = found
    assert code == errors.EXIT_HOME and label == "disk full"
    text = str(err)
    assert f"mounted at {small_tmpfs} (tmpfs)" in text and "free of 1.0 MiB" in text
    assert "set SFTFLOW_HOME" in text and "\n" not in text


# ----------------------------------------------------------------------------- no retries
def test_deterministic_failures_are_not_retried() -> None:
    from sftflow.ops.orchestration import retry_unless

    class State:  # what Prefect hands a retry_condition_fn: the failed state, its exception as data
        def __init__(self, exc: BaseException) -> None:
            self.data = exc

    should_retry = retry_unless()
    full = OSError(errno.ENOSPC, "No space left on device", "/x")
    assert not should_retry(None, None, State(full))
    assert not should_retry(None, None, State(PermissionError(errno.EACCES, "Permission denied", "/src.jsonl")))
    assert not should_retry(None, None, State(errors.DataError("bad row 3")))
    wrapped = RuntimeError("stage failed")
    wrapped.__cause__ = full
    assert not should_retry(None, None, State(wrapped))
    assert should_retry(None, None, State(ConnectionResetError("server went away")))  # an I/O hiccup: retried


def test_an_unexpected_error_on_a_full_home_says_disk_full(small_tmpfs: Path) -> None:
    # A full disk often surfaces as something else (the Prefect server's HTTP 500, a closed stream):
    # when $SFTFLOW_HOME's filesystem has no room left, that is what the line says, not "a bug".
    home = small_tmpfs / "home"
    home.mkdir()
    with open(small_tmpfs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    code = ("import sys, flows.cli as c\n"
            "def boom(args): raise RuntimeError('Server error 500 Internal Server Error for url http://127.0.0.1:1/api')\n"
            "c.COMMANDS['validate-config'] = boom\n"
            "sys.exit(c.main(sys.argv[1:]))\n")
    res = subprocess.run([sys.executable, "-c", code, "validate-config"], cwd=small_tmpfs.parent, env=_env(home),
                         capture_output=True, text=True, timeout=120)
    line = _one_line(res, errors.EXIT_HOME, "sftflow: disk full: ", f"mounted at {small_tmpfs} (tmpfs)",
                     "it surfaced as RuntimeError: Server error 500")
    assert "0 B free of 1.0 MiB" in line

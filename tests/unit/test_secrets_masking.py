"""Credentials never reach a log line, the console or a log file (issue 22, class 1).

The masking function itself, then the hooks the product installs: the logging filter (message,
arguments, traceback), the stdout/stderr wrapper (MLflow prints its "View run <tracking URI>" lines
with ``sys.stdout.write``), and the quiet console's run log (owner-only, masked). The end-to-end
check against a real MLflow server is tests/integration/test_secrets_masking.py.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sftflow import masking

REPO = Path(__file__).resolve().parents[2]
SECRET = "Xq7-s3cretPW"


@pytest.mark.parametrize(("text", "gone", "kept"), [
    (f"🏃 View run ingest at: http://alice:{SECRET}@127.0.0.1:5000/#/experiments/1/runs/abc",
     SECRET, "http://alice:***@127.0.0.1:5000/#/experiments/1/runs/abc"),
    (f"could not connect: postgresql+psycopg2://mlflow:{SECRET}@db:5432/mlflow (timeout)",
     SECRET, "postgresql+psycopg2://mlflow:***@db:5432/mlflow (timeout)"),
    (f"dsn host=db user=mlflow password={SECRET} dbname=x", SECRET, "password=*** dbname=x"),
    (f"headers: {{'Authorization': 'Basic {SECRET}'}}", SECRET, "'Authorization': 'Basic ***'"),
    (f"s3://bucket/k?X-Amz-Signature={SECRET}&x=1", SECRET, "X-Amz-Signature=***&x=1"),
])
def test_mask_text_hides_uri_passwords_dsn_pairs_and_auth_headers(text: str, gone: str, kept: str) -> None:
    out = masking.mask_text(text)
    assert gone not in out and kept in out


def test_values_of_secret_named_env_vars_are_masked_and_ordinary_ones_are_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("PGPASSWORD", "pg-Secret-9")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-ish-value")  # "TOKENIZERS" is not "TOKEN"
    monkeypatch.setenv("MY_API_KEY", "true")  # a switch value, not a secret
    text = ("login hunter2hunter2 / pg-Secret-9 / hf_abcdefghijklmnop / wJalrXUtnFEMI/K7MDENG; "
            "false-ish-value; true")
    out = masking.mask_text(text)
    for secret in ("hunter2hunter2", "pg-Secret-9", "hf_abcdefghijklmnop", "wJalrXUtnFEMI/K7MDENG"):
        assert secret not in out
    assert "false-ish-value" in out and out.endswith("; true")
    # Identifiers (run tags) are masked structurally only: a short env value cannot eat a digest.
    assert masking.mask_text("cafe" * 16, env=False) == "cafe" * 16
    assert masking.mask_value({"a": [f"http://u:{SECRET}@h"], "n": 3}) == {"a": ["http://u:***@h"], "n": 3}


def test_masking_filter_masks_message_arguments_and_traceback() -> None:
    logger = logging.getLogger("test_secrets_masking.filter")
    logger.propagate = False
    buf = io.StringIO()
    handler = masking.add_masking(logging.StreamHandler(buf))
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        logger.warning("tracking at %s", f"http://bob:{SECRET}@10.0.0.1:5000")
        try:
            raise ConnectionError(f"cannot reach postgresql://u:{SECRET}@db/x")
        except ConnectionError:
            logger.exception("store failed")
    finally:
        logger.removeHandler(handler)
    text = buf.getvalue()
    assert SECRET not in text, text
    assert "http://bob:***@10.0.0.1:5000" in text and "postgresql://u:***@db/x" in text
    assert "Traceback (most recent call last)" in text  # the traceback is kept, masked


def test_masking_stream_masks_a_uri_written_in_pieces() -> None:
    target = io.StringIO()
    stream = masking.MaskingStream(target)
    stream.write("🏃 View run train at: http://alice:")
    stream.write(SECRET[:4])
    stream.write(SECRET[4:] + "@127.0.0.1:5000/#/runs/1\nnext line without newline")
    assert target.getvalue().endswith("without ")  # the last word is held until more text comes
    stream.flush()
    assert SECRET not in target.getvalue()
    assert "http://alice:***@127.0.0.1:5000/#/runs/1\nnext line without newline" in target.getvalue()


def test_run_console_log_is_owner_only_and_masks_prints_and_log_records(tmp_path: Path) -> None:
    # The real console in a child process (it takes over sys.stdout/stderr and the root logger):
    # MLflow's print-style "View run" line, a library's log record, a console line.
    code = f"""
import logging, sys
from sftflow.masking import install_masking
install_masking()
from sftflow.ops.orchestration import configure_environment
configure_environment()
from sftflow.ops.console import RunConsole
c = RunConsole(pipeline="p", tty=False).install()
sys.stdout.write("View run ingest at: http://alice:{SECRET}@127.0.0.1:5000/#/experiments/1\\n")
print("postgresql://u:{SECRET}@db/x", file=sys.stderr)
logging.getLogger("mlflow.some.library").warning("retrying http://alice:{SECRET}@127.0.0.1:5000")
c.line("console: http://alice:{SECRET}@127.0.0.1:5000")
c.close()
print(c.log_path)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(SFTFLOW_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    log = Path(res.stdout.strip().splitlines()[-1])
    text = log.read_text()
    assert SECRET not in res.stdout + res.stderr + text
    assert "http://alice:***@127.0.0.1:5000/#/experiments/1" in text  # the print went to the log, masked
    assert "postgresql://u:***@db/x" in text and "retrying http://alice:***@" in text
    assert "console: http://alice:***@127.0.0.1:5000" in res.stdout
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700


def test_cli_error_line_and_saved_traceback_are_masked(tmp_path: Path) -> None:
    # A bug whose message holds a URI with a password, through the real entry point.
    code = ("import sys, flows.cli as c\n"
            f"def boom(args): raise RuntimeError('lost http://alice:{SECRET}@h:5000')\n"
            "c.COMMANDS['validate-config'] = boom\n"
            "sys.exit(c.main(sys.argv[1:]))\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "SFTFLOW_DEBUG"))}
    env.update(SFTFLOW_HOME=str(home), PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code, "validate-config"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and "http://alice:***@h:5000" in res.stderr, res.stderr
    saved = home / "logs" / "last-error.txt"
    assert SECRET not in res.stderr + saved.read_text()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    res = subprocess.run([sys.executable, "-c", code, "validate-config", "--debug"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert "Traceback" in res.stderr and SECRET not in res.stderr

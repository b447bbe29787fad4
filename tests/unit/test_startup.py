"""Start-up of `sftflow run` on a warm home: what preflight remembers, and the early temporary server."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest


def test_template_overhead_is_remembered_and_invalidated_by_a_tokenizer_change(sftflow_home: Path) -> None:
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.ops import model_limits

    model_dir = build_tiny_model("tiny-gemma").path
    model_limits.template_overhead.cache_clear()
    first = model_limits.template_overhead(model_dir, template=None, system=None)
    cache = sftflow_home / "cache" / "template_overhead.json"
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [list(first)]

    # A remembered value is what the next process gets, without measuring (it was planted here).
    key = next(iter(stored))
    cache.write_text(json.dumps({key: [first[0] + 7, first[1]]}))
    model_limits.template_overhead.cache_clear()
    assert model_limits.template_overhead(model_dir, template=None, system=None) == (first[0] + 7, first[1])

    # A changed tokenizer file (size/mtime) is a new key: measured again, the real value.
    tok = Path(model_dir) / "tokenizer_config.json"
    tok.write_text(tok.read_text() + "\n")
    model_limits.template_overhead.cache_clear()
    assert model_limits.template_overhead(model_dir, template=None, system=None) == first
    assert len(json.loads(cache.read_text())) == 2


def test_template_overhead_writes_nothing_without_a_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sftflow.ops import model_limits

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "absent"))
    model_limits._remember_overhead("k", (3, "gemma"))
    assert not (tmp_path / "absent").exists()


def test_early_temporary_server_answers_and_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server `sftflow run` starts at launch: it answers on the URL it put in PREFECT_API_URL,
    is marked as this process's own temporary server, and is gone after stop()."""
    from sftflow.ops import prefect_server

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home" / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = prefect_server.start_temporary_server()
    try:
        assert os.environ["PREFECT_API_URL"] == server.api_url == os.environ[prefect_server.TEMPORARY_API_ENV]
        server.wait()
        with urllib.request.urlopen(server.api_url + "/health", timeout=10) as r:
            assert r.status == 200
        assert (tmp_path / "home" / "prefect" / "server.log").exists()
        proc = server.proc
        assert proc is not None and proc.poll() is None
    finally:
        server.stop()
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert proc.poll() is not None

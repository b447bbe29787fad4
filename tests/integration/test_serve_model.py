"""The champion serves: ``mlflow models serve -m models:/NAME@champion --env-manager local`` answers an
OpenAI-style chat request from an environment where this repository cannot be imported.

The "plain environment" is a fresh virtualenv (``python -m venv --without-pip``) whose only addition
is a ``.pth`` line naming the project venv's site-packages *directory*. A path line in a ``.pth`` is
appended to ``sys.path`` but the ``.pth`` files inside it are not executed, so the editable install
of sftflow (``__editable__.sftflow-*.pth``, which installs an import finder) is not active; with
PYTHONPATH cleared, user site off and the working directory outside the repository, ``import
sftflow`` fails there while mlflow/transformers/torch import. The test asserts exactly that before
starting the server with that interpreter (``mlflow`` and ``uvicorn`` on PATH run it).

Run: ``python -m pytest tests/integration/test_serve_model.py -m integration``.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NAME = "sftflow-serve"


def _plain_env(root: Path) -> tuple[Path, dict[str, str]]:
    """A venv that sees the third-party packages but not the editable sftflow; its bin dir + env."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    py = root / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    site_dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    Path(purelib, "project_site.pth").write_text("\n".join(site_dirs) + "\n")
    for tool in ("mlflow", "uvicorn"):  # what `mlflow models serve` runs, with this interpreter
        script = root / "bin" / tool
        script.write_text(f'#!/bin/sh\nexec "{py}" -m {tool} "$@"\n')
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return py, env


def _post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_champion_serves_chat_without_the_repository(sftflow_home: Path, tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from sftflow.data.refs import ModelRef
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.ops.servers import free_port
    from sftflow.tracking.registry import CHAMPION, log_model, serve_command, set_alias
    from sftflow.tracking.runs import configure, ensure_experiment, resolve_tracking_uri

    # A real SQLite store (artifacts on disk) under tmp_path, a version registered as the train stage does.
    uri = resolve_tracking_uri()
    configure(uri)
    tiny = build_tiny_model("tiny-gemma")
    exp = ensure_experiment("sftflow-serve", uri=uri)
    with mlflow.start_run(experiment_id=exp):
        _, name, version = log_model(model=ModelRef(path=tiny.path, sha256=tiny.sha256, kind="merged", name="tiny"),
                                     template="gemma", register_as=NAME, metrics=(("train_loss", 1.0),))
    set_alias(MlflowClient(uri), name=name, alias=CHAMPION, version=version)

    py, env = _plain_env(tmp_path / "plain")
    env["MLFLOW_TRACKING_URI"] = uri
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = subprocess.run([str(py), "-c", "import mlflow, transformers, torch; import sftflow"], cwd=outside,
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode != 0 and "No module named 'sftflow'" in probe.stderr, probe.stderr[-2000:]

    port = free_port()
    cmd = serve_command(f"{name}@{CHAMPION}", port=port)
    cmd[0] = "mlflow"  # the plain environment's, first on PATH
    log = (tmp_path / "serve.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=outside, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() - t0 < 240, "server not up in 240 s: " + (tmp_path / "serve.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        up_s = time.monotonic() - t0
        request = {"messages": [{"role": "user", "content": "What is 2 plus 2?"}], "max_tokens": 16}
        t1 = time.monotonic()
        got = _post(f"{base}/invocations", request)
        first_s = time.monotonic() - t1
        (tmp_path / "serve_exchange.json").write_text(json.dumps(
            {"request": request, "response": got, "server_up_s": round(up_s, 2), "first_request_s": round(first_s, 2)},
            indent=1))
        print(json.dumps({"request": request, "response": got, "server_up_s": round(up_s, 2),
                          "first_request_s": round(first_s, 2)}))
        answers = got if isinstance(got, list) else got.get("predictions", [got])
        (answer,) = answers
        assert answer["object"] == "chat.completion"
        (choice,) = answer["choices"]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        assert 0 < answer["usage"]["completion_tokens"] <= 16
        assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
        # A malformed request is refused with a client error, not a crash.
        with pytest.raises(urllib.error.HTTPError) as bad:
            _post(f"{base}/invocations", {"prompt": "no messages"})
        assert 400 <= bad.value.code < 500
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
        log.close()

"""Shared fixtures: every test gets its own $SFTFLOW_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture()
def sftflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $SFTFLOW_HOME for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("SFTFLOW_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_models_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide folder where the tiny random models are built once."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip when this checkout has none."""
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture()
def stage_ctx(sftflow_home: Path):
    """A StageContext for calling a stage's task function (``task.fn``) outside a flow: the
    embedded SQLite MLflow store under ``sftflow_home``, experiment ``sftflow-test``, a real parent
    run, and run folder ``runs/test/r1``."""
    from mlflow.tracking import MlflowClient

    from sftflow.tracking import runs as tracking
    from sftflow.layout import RunLayout

    uri = tracking.default_tracking_uri()
    exp = tracking.ensure_experiment("sftflow-test", uri=uri)
    parent = MlflowClient(uri).create_run(exp, run_name="parent").info.run_id
    lay = RunLayout.create(pipeline="test", run_id="r1")
    return tracking.StageContext(pipeline="test", run_id="r1", run_dir=str(lay.root), tracking_uri=uri,
                                 experiment_id=exp, parent_run_id=parent)


# ----------------------------------------------------------------------------- running the CLI as a user
def _cli_env(home: Path, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k not in ("SFTFLOW_DEBUG", "SFTFLOW_PIPELINES")}
    env.update(SFTFLOW_HOME=str(home), PYTHONPATH=str(REPO), **extra)
    return env


@pytest.fixture()
def cli_env():
    """``cli_env(home, **extra)``: the environment of a `sftflow` subprocess run as a user would, under
    ``home``: no inherited Prefect/MLflow client settings, no debug switch, this checkout importable."""
    return _cli_env


def _write_tiny_pipeline(folder: Path, source: str | Path, extra: str = "") -> Path:
    import textwrap

    p = Path(folder) / "pipelines.yaml"
    p.write_text(textwrap.dedent(f"""
        pipelines:
          p:
            base_model: tiny-gemma
            sources: [{{name: s, path: {source}}}]
            evaluation: {{enabled: false}}
            promotion: {{enabled: false}}
            training: {{max_steps: 1, batch_size: 2}}
        """) + extra)
    return p


@pytest.fixture()
def tiny_pipeline():
    """``tiny_pipeline(folder, source, extra="")``: writes ``folder/pipelines.yaml`` with pipeline
    ``p``: tiny-gemma, one source, one training step, no evaluation or promotion; ``extra`` is YAML
    appended under ``p`` (4-space indent). Returns the file."""
    return _write_tiny_pipeline


def _write_qa_rows(path: Path, n: int) -> Path:
    Path(path).write_text("".join(
        f'{{"instruction": "question number {i} about topic {i * 7}", "output": "answer {i} is {i * 13}"}}\n'
        for i in range(n)))
    return Path(path)


@pytest.fixture()
def qa_rows():
    """``qa_rows(path, n)``: writes ``n`` distinct instruction/output JSONL rows to ``path``."""
    return _write_qa_rows


@pytest.fixture()
def mount_tmpfs(tmp_path: Path):
    """``mount_tmpfs(size)``: a real tmpfs of ``size`` (e.g. "1m") under ``tmp_path``, unmounted after
    the test; the test skips without root / mount rights."""
    import os
    import shutil
    import subprocess

    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a small tmpfs needs root")
        mnt = tmp_path / f"tmpfs-{len(mounted)}"
        mnt.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)

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

"""The registry module: a logged model loads where Prefect cannot be imported; versions and aliases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def client(sftflow_home: Path):
    from mlflow import MlflowClient

    from sftflow.tracking.runs import configure, resolve_tracking_uri

    uri = resolve_tracking_uri()
    configure(uri)
    return MlflowClient(uri)


def test_registered_model_loads_without_prefect(client, sftflow_home: Path) -> None:
    import mlflow

    from sftflow.data.refs import ModelRef
    from sftflow.inference.models import build_tiny_model
    from sftflow.tracking.registry import CANDIDATE, log_model
    from sftflow.tracking.runs import ensure_experiment, resolve_tracking_uri

    tiny = build_tiny_model("tiny-gemma")
    model = ModelRef(path=tiny.path, sha256=tiny.sha256, kind="merged", name="tiny")
    exp = ensure_experiment("sftflow-registry", uri=resolve_tracking_uri())
    with mlflow.start_run(experiment_id=exp):
        uri, name, version = log_model(model=model, template="gemma", register_as="sftflow-reg",
                                       metrics=(("train_loss", 1.25), ("steps", 4.0)), lineage_tags={"x.tag": "v"})
    assert (name, version) == ("sftflow-reg", "1")
    mv = client.get_model_version_by_alias(name, CANDIDATE)
    assert str(mv.version) == "1"
    assert mv.tags["train_loss"] == "1.25" and "steps" not in mv.tags and mv.tags["x.tag"] == "v"
    assert mv.tags["sftflow.model.sha256"] == tiny.sha256
    # A fresh interpreter where `import prefect` fails loads the model and generates.
    code = ("import sys, json; sys.modules['prefect'] = None\n"
            "import mlflow, pandas as pd\n"
            f"m = mlflow.pyfunc.load_model('models:/{name}@{CANDIDATE}')\n"
            "out = m.predict(pd.DataFrame({'prompt': ['Hi']}), params={'max_new_tokens': 3})\n"
            "print(json.dumps({'cls': type(m.unwrap_python_model()).__module__, 'n': len(out),"
            " 'prefect': sys.modules.get('prefect') is not None}))")
    env = {**os.environ, "MLFLOW_TRACKING_URI": resolve_tracking_uri(), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"cls": "sftflow.tracking.chat_model", "n": 1, "prefect": False}


def test_resolve_version_and_aliases(client, sftflow_home: Path) -> None:
    from sftflow.tracking.registry import (
        CHAMPION,
        ModelVersionNotFound,
        resolve_version,
        set_alias,
        version_by_alias,
    )
    from sftflow.tracking.runs import ensure_experiment, resolve_tracking_uri

    run = client.create_run(ensure_experiment("sftflow-registry", uri=resolve_tracking_uri()))
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    assert version_by_alias(client, "m", CHAMPION) is None and version_by_alias(client, "nope", CHAMPION) is None
    set_alias(client, name="m", alias=CHAMPION, version="1")
    assert str(version_by_alias(client, "m", CHAMPION).version) == "1"
    assert str(resolve_version(client, "m").version) == "2"  # latest
    assert str(resolve_version(client, "m", alias=CHAMPION).version) == "1"
    assert str(resolve_version(client, "m", version="2").version) == "2"
    with pytest.raises(ModelVersionNotFound, match="no registered model 'x'.*'m'"):
        resolve_version(client, "x")
    with pytest.raises(ModelVersionNotFound, match=r"no alias 'staging'; versions: \[1, 2\], aliases: \['champion'\]"):
        resolve_version(client, "m", alias="staging")

"""The registry module: a logged version is a servable chat model that loads without this repository
or Prefect; its serving template equals the training prompt; versions, aliases, the serve command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

@pytest.fixture()
def client(sftflow_home: Path):
    from mlflow import MlflowClient

    from sftflow.tracking.runs import configure, resolve_tracking_uri

    uri = resolve_tracking_uri()
    configure(uri)
    return MlflowClient(uri)


def test_registered_model_is_a_servable_chat_model(client, sftflow_home: Path) -> None:
    """The version is MLflow's transformers chat flavor: signature, input example, stop ids, no sftflow
    code in it; a fresh interpreter where `import prefect` fails loads it and answers a chat request."""
    import mlflow
    import yaml

    from sftflow.data.refs import ModelRef
    from sftflow.inference.formatting import stop_token_ids
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
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

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(sftflow_home / "dl")))
    meta = yaml.safe_load((local / "MLmodel").read_text())
    assert meta["flavors"]["python_function"]["loader_module"] == "mlflow.transformers"
    assert meta["flavors"]["transformers"]["inference_task"] == "llm/v1/chat"
    assert meta["signature"]["inputs"] and "messages" in meta["signature"]["inputs"]
    assert json.loads((local / "input_example.json").read_text())["messages"][0]["role"] == "user"
    assert meta["metadata"]["template"] == "gemma" and meta["metadata"]["kind"] == "merged"
    # Nothing of this repository travels with the model: no code folder, no sftflow module anywhere.
    assert not (local / "code").exists() and meta["flavors"]["transformers"].get("code") is None
    assert "sftflow." not in (local / "MLmodel").read_text()
    # Generation stops at the template's end-of-turn token (and at eos).
    _, tok = load_model(tiny)
    gen = json.loads((local / "model" / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    stops = stop_token_ids(tok, "gemma")
    assert stops[0] == tok.convert_tokens_to_ids("<end_of_turn>") and set(stops) <= set(eos)

    code = ("import sys, json; sys.modules['prefect'] = None\n"
            "import mlflow\n"
            f"m = mlflow.pyfunc.load_model('models:/{name}@{CANDIDATE}')\n"
            "out = m.predict({'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 3})\n"
            "print(json.dumps({'out': out, 'prefect': sys.modules.get('prefect') is not None,"
            " 'sftflow': any(k.startswith('sftflow') for k in sys.modules)}))")
    env = {**os.environ, "MLFLOW_TRACKING_URI": resolve_tracking_uri()}
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=str(sftflow_home.parent))
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["prefect"] is False and got["sftflow"] is False
    (answer,) = got["out"]
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(answer["choices"][0]["message"]["content"], str) and answer["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize("tiny_name,template", [("tiny-gemma", "gemma"), ("tiny-gemma", "chatml"),
                                                ("tiny-chatml", "chatml"), ("tiny-chatml", "native")])
def test_serving_template_matches_training_prompt(sftflow_home: Path, tiny_name: str, template: str) -> None:
    """The served tokenizer's chat template gives exactly the prompt ids training/evaluation use."""
    from sftflow.inference.formatting import build_generation_prompt
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.tracking.registry import serving_chat_template

    _, tok = load_model(build_tiny_model(tiny_name))
    tok.chat_template = serving_chat_template(tok, template)
    convs = [
        [{"role": "user", "content": "What is 2 plus 2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Say 3."}],
    ]
    for msgs in convs:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        served = tok(text, add_special_tokens=False)["input_ids"]  # as the served pipeline tokenizes
        assert served == build_generation_prompt(tok, msgs, template=template), (template, text)


def test_serving_template_refuses_native_without_chat_template(sftflow_home: Path) -> None:
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.tracking.registry import serving_chat_template

    _, tok = load_model(build_tiny_model("tiny-gemma"))
    with pytest.raises(ValueError, match="no chat_template"):
        serving_chat_template(tok, "native")


def test_serve_command_and_model_uri() -> None:
    from sftflow.tracking.registry import registered_model_uri, serve_command

    assert registered_model_uri("m@champion") == "models:/m@champion"
    assert registered_model_uri("models:/m/3") == "models:/m/3"
    assert registered_model_uri("m") == "models:/m@champion"
    for bad in ("", "m@", "@x", "m/x"):
        with pytest.raises(ValueError, match="NAME@ALIAS"):
            registered_model_uri(bad)
    cmd = serve_command("sftflow-demo@champion", port=5123)
    assert Path(cmd[0]).name == "mlflow" and cmd[1:] == [
        "models", "serve", "-m", "models:/sftflow-demo@champion", "--env-manager", "local",
        "--host", "127.0.0.1", "--port", "5123"]


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


def test_adapter_is_merged_and_read_back_as_one_folder(client, sftflow_home: Path, tmp_path: Path) -> None:
    """An adapter version is merged at log time (the served model needs no base folder); the version
    reads back as one loadable folder (weights + tokenizer) that generates like the adapter did."""
    import mlflow
    import torch
    from peft import LoraConfig, get_peft_model

    from sftflow.data.refs import ModelRef
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.tracking.registry import log_model, model_version_ref
    from sftflow.tracking.runs import ensure_experiment, resolve_tracking_uri

    tiny = build_tiny_model("tiny-gemma")
    base, tok = load_model(tiny)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    adir = tmp_path / "adapter"
    peft_model.save_pretrained(str(adir))
    tok.save_pretrained(str(adir))
    ids = torch.tensor([tok("Hello there", add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        want = peft_model(ids).logits
    ref_in = ModelRef(path=str(adir), sha256="a" * 64, kind="adapter", base=tiny.path, name="tiny-adapter")
    with mlflow.start_run(experiment_id=ensure_experiment("sftflow-registry", uri=resolve_tracking_uri())):
        _, name, version = log_model(model=ref_in, template="gemma", register_as="sftflow-adapter")
    ref = model_version_ref(client, client.get_model_version(name, version), download_dir=tmp_path / "dl")
    assert ref.kind == "merged" and ref.meta_dict()["template"] == "gemma"
    folder = Path(ref.path)
    assert (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists()
    assert not (folder / "adapter_config.json").exists()
    model, tok2 = load_model(ref)
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert tok2("Hello there")["input_ids"] == tok("Hello there")["input_ids"]
    # A second read reuses the view folder (re-pointing its links) and gives the same digest.
    again = model_version_ref(client, client.get_model_version(name, version), download_dir=tmp_path / "dl")
    assert again.path == ref.path and again.sha256 == ref.sha256

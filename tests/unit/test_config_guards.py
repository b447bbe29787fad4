"""Config holes that used to waste a run (issue 22, class 6): duplicate YAML keys, unsafe names,
settings the base model cannot honour (LoRA rank, context, the template's minimum length), and
contradictions that failed only after the data stages ran.

The model checks use a real tiny model (config.json, safetensors headers, tokenizer) built under
the test's $SFTFLOW_HOME; nothing is mocked.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sftflow.config import load_pipelines, parse_override, resolve_pipeline
from sftflow.config_sections import ConfigError
from sftflow.ops.preflight import check_provisioned_model, preflight

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "data" / "smoke"


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "pipelines.yaml"
    p.write_text(textwrap.dedent(body))
    return p


def _pipeline(tmp_path: Path, extra: str = "", *, base: str = "tiny-gemma") -> Path:
    """A one-pipeline file `p` on the smoke data; ``extra`` is indented YAML under the pipeline."""
    body = textwrap.dedent(f"""\
        pipelines:
          p:
            base_model: {base}
            sources:
              - {{name: dolly, path: {SMOKE / 'dolly_smoke.jsonl'}}}
            split: {{heldout_size: 8}}
            evaluation: {{max_examples: 8}}
        """) + textwrap.indent(textwrap.dedent(extra), "    ")
    p = tmp_path / "pipelines.yaml"
    p.write_text(body)
    return p


# --------------------------------------------------------------------------- duplicate keys
def test_a_second_training_block_is_refused_with_both_lines(tmp_path: Path) -> None:
    p = _pipeline(tmp_path, """\
        training:
          max_steps: 4
        evaluation: {max_examples: 4}
        training:
          max_steps: 400
        """)
    with pytest.raises(ConfigError) as e:
        load_pipelines(p)
    msg = str(e.value)
    # The first `training:` is on line 8 of the file, the second on line 11.
    assert "pipelines.p.training: duplicate key (first at line 8, again at line 11)" in msg, msg
    assert "pipelines.p.evaluation: duplicate key (first at line 7, again at line 10)" in msg, msg
    assert msg.startswith(f"{p}:"), msg


def test_two_pipelines_with_one_name_are_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, f"""\
        pipelines:
          smoke:
            sources: [{{name: a, path: {SMOKE / 'dolly_smoke.jsonl'}}}]
          smoke:
            sources: [{{name: b, path: {SMOKE / 'dolly_smoke.jsonl'}}}]
        """)
    with pytest.raises(ConfigError, match=r"pipelines\.smoke: duplicate key \(first at line 2, again at line 4\)"):
        load_pipelines(p)
    with pytest.raises(ConfigError, match="duplicate key"):
        resolve_pipeline("smoke", path=p)  # the single-pipeline path reads the file the same way


def test_duplicates_inside_flow_mappings_and_override_values(tmp_path: Path) -> None:
    p = _pipeline(tmp_path, "training: {max_steps: 4, max_steps: 8}\n")
    with pytest.raises(ConfigError, match=r"pipelines\.p\.training\.max_steps: duplicate key \(first at line 8 "
                                          r"column 16, again at column 30\)"):
        load_pipelines(p)
    with pytest.raises(ConfigError, match=r"training\.batch_size: duplicate key"):
        parse_override("training={batch_size: 1, batch_size: 2}")
    p = _pipeline(tmp_path)
    with pytest.raises(ConfigError, match=r"training\.lora\.r: duplicate key"):
        resolve_pipeline("p", path=p, overrides={"training.lora": "{r: 4, r: 8}"})


def test_merge_keys_may_override_what_they_bring(tmp_path: Path) -> None:
    data = SMOKE / "dolly_smoke.jsonl"
    p = _write(tmp_path, f"""\
        pipelines:
          p:
            sources: [{{name: a, path: {data}}}]
            training: &t {{max_steps: 4, batch_size: 2}}
          q:
            sources: [{{name: a, path: {data}}}]
            training:
              <<: *t
              max_steps: 6
        """)
    pipes = load_pipelines(p)
    assert (pipes["p"].training.max_steps, pipes["q"].training.max_steps, pipes["q"].training.batch_size) == (4, 6, 2)


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize("bad", ["../../x", "..", "a/b", "x y", "-x", "a..b", "x" * 65, ""])
def test_unsafe_pipeline_names_are_refused(tmp_path: Path, bad: str) -> None:
    p = _write(tmp_path, f"""\
        pipelines:
          {bad!r}:
            sources: [{{name: a, path: {SMOKE / 'dolly_smoke.jsonl'}}}]
        """)
    with pytest.raises(ConfigError) as e:
        load_pipelines(p)
    assert f"pipelines.{bad}: pipeline name must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}$" in str(e.value)


def test_unsafe_source_model_and_set_names_name_their_key(tmp_path: Path) -> None:
    data = SMOKE / "dolly_smoke.jsonl"
    p = _write(tmp_path, f"""\
        pipelines:
          x:
            sources: [{{name: ../b, path: {data}}}, {{name: ok.name-1_a, path: {data}}}]
            augmentation: {{enabled: true, corpus: {{name: "c/d", path: {data}}}}}
            evaluation: {{extra_sets: [{{name: "x y", path: {data}}}]}}
            promotion: {{model_name: "../../models/evil"}}
        """)
    with pytest.raises(ConfigError) as e:
        load_pipelines(p)
    lines = str(e.value).splitlines()
    for key, got in (("sources.0.name", "'../b'"), ("augmentation.corpus.name", "'c/d'"),
                     ("evaluation.extra_sets.0.name", "'x y'"), ("promotion.model_name", "'../../models/evil'")):
        assert any(line.startswith(f"pipelines.x.{key}: must match ^[A-Za-z0-9]") and line.endswith(f"(got {got})")
                   for line in lines), (key, lines)
    assert not any("sources.1.name" in line for line in lines)


# --------------------------------------------------------------------------- other schema holes
def test_schedule_and_banding_are_checked_at_load(tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    with pytest.raises(ConfigError, match=r"pipelines\.p\.schedule\.cron: not a cron expression .*\(got 'daily'\)"):
        resolve_pipeline("p", path=p, overrides=["schedule.cron=daily"])
    with pytest.raises(ConfigError, match=r"pipelines\.p\.schedule\.timezone: unknown time zone"):
        resolve_pipeline("p", path=p, overrides=["schedule.timezone=Mars/Olympus"])
    assert resolve_pipeline("p", path=p, overrides=["schedule.cron=0 3 * * mon-fri",
                                                    "schedule.timezone=Europe/Berlin"]).schedule.cron
    with pytest.raises(ConfigError, match=r"pipelines\.p\.dedup\.near: bands x rows = 64 x 4 = 256 exceeds num_perm"):
        resolve_pipeline("p", path=p, overrides=["dedup.near.bands=64", "dedup.near.rows=4"])


def test_holes_that_failed_after_the_data_stages_are_refused_at_load(tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    with pytest.raises(ConfigError, match=r"pipelines\.p\.split: give heldout_fraction or heldout_size \(both are null\)"):
        resolve_pipeline("p", path=p, overrides=["split.heldout_size=null", "split.heldout_fraction=null"])
    data = SMOKE / "dolly_smoke.jsonl"
    with pytest.raises(ConfigError, match=r"pipelines\.p: evaluation\.extra_sets names must be unique; repeated: \['a'\]"):
        resolve_pipeline("p", path=p, overrides=[f"evaluation.extra_sets=[{{name: a, path: {data}}}, "
                                                 f"{{name: a, path: {data}}}]"])


def test_contradictions_warn_before_the_run(tmp_path: Path) -> None:
    p = _pipeline(tmp_path, base="./no-model-here")
    (tmp_path / "no-model-here").mkdir()
    warn = preflight(resolve_pipeline("p", path=p, overrides=["evaluation.enabled=false"]), pipeline="p", disk=False)
    assert any("promotion.enabled is true but evaluation.enabled is false" in w for w in warn), warn
    warn = preflight(resolve_pipeline("p", path=p, overrides=["training.max_steps=4", "training.eval_every=10",
                                                              "training.early_stopping_patience=2"]),
                     pipeline="p", disk=False)
    assert any("training.eval_every=10 > training.max_steps=4: early stopping never triggers" in w for w in warn)
    warn = preflight(resolve_pipeline("p", path=p, overrides=["evaluation.format_robustness.max_examples=50"]),
                     pipeline="p", disk=False)
    assert any("evaluation.format_robustness.max_examples=50 > split.heldout_size=8" in w for w in warn), warn
    warn = preflight(resolve_pipeline("p", path=p, overrides=["dedup.keep=source_priority",
                                                              "dedup.source_priority=[dolly, dolyl]"]),
                     pipeline="p", disk=False)
    assert warn == ["pipelines.p.dedup.source_priority: ['dolyl'] name no source (sources: dolly); rows of unlisted "
                    "sources rank last"]


def test_qlora_without_its_package_or_gpu_is_refused_before_the_run(tmp_path: Path) -> None:
    from sftflow.ops.preflight import _cuda_present, _installed

    if _installed("bitsandbytes") and _cuda_present():
        pytest.skip("bitsandbytes and a GPU are present: qlora can run here")
    cfg = resolve_pipeline("p", path=_pipeline(tmp_path), overrides=["training.method=qlora"])
    with pytest.raises(ConfigError, match=r"pipelines\.p\.training\.method: qlora needs "):
        preflight(cfg, pipeline="p", disk=False)


# --------------------------------------------------------------------------- against the model
@pytest.fixture()
def tiny(sftflow_home: Path) -> Path:
    from sftflow.inference.tiny import build_tiny_model

    return Path(build_tiny_model("tiny-gemma").path)


def test_lora_rank_is_bounded_by_the_smallest_targeted_layer(tmp_path: Path, tiny: Path) -> None:
    p = _pipeline(tmp_path)
    # tiny-gemma: hidden 64, k/v projections 64 -> 32 (1 KV head x head_dim 32), MLP 64 <-> 128.
    with pytest.raises(ConfigError) as e:
        preflight(resolve_pipeline("p", path=p, overrides=["training.lora.r=100000"]), pipeline="p", disk=False)
    assert str(e.value).startswith("pipelines.p.training.lora.r=100000: larger than the smallest targeted layer of "
                                   "tiny-gemma"), e.value
    assert "self_attn.k_proj: 64 -> 32" in str(e.value) and str(e.value).endswith("use r <= 32")
    assert preflight(resolve_pipeline("p", path=p, overrides=["training.lora.r=32"]), pipeline="p", disk=False) == []
    # Targeting only the MLP raises the bound to 64; a name the model lacks is refused with its layer names.
    cfg = resolve_pipeline("p", path=p, overrides=["training.lora.r=64", "training.lora.target_modules=[gate_proj, up_proj]"])
    assert preflight(cfg, pipeline="p", disk=False) == []
    with pytest.raises(ConfigError, match=r"training\.lora\.target_modules: \['qkv'\] matches no linear layer of "
                                          r"tiny-gemma .*its layers: down_proj, gate_proj, k_proj, o_proj"):
        preflight(resolve_pipeline("p", path=p, overrides=["training.lora.target_modules=[qkv]"]), pipeline="p",
                  disk=False)
    # Full fine-tuning has no rank.
    assert preflight(resolve_pipeline("p", path=p, overrides=["training.method=full", "training.lora.r=100000"]),
                     pipeline="p", disk=False) == []


def test_max_seq_len_beyond_the_context_is_refused(tmp_path: Path, tiny: Path) -> None:
    p = _pipeline(tmp_path)
    with pytest.raises(ConfigError) as e:
        preflight(resolve_pipeline("p", path=p, overrides=["training.max_seq_len=100000"]), pipeline="p", disk=False)
    assert "pipelines.p.training.max_seq_len=100000: longer than the context of tiny-gemma" in str(e.value)
    assert "(max_position_embeddings=4096): use at most 4096" in str(e.value)
    assert preflight(resolve_pipeline("p", path=p, overrides=["training.max_seq_len=4096"]), pipeline="p",
                     disk=False) == []


def test_max_seq_len_below_the_templates_overhead_is_refused(tmp_path: Path, tiny: Path) -> None:
    from transformers import AutoTokenizer

    from sftflow.inference.formatting import encode_for_training

    # The real overhead: the tokens before the first learned label of a one-word exchange.
    tok = AutoTokenizer.from_pretrained(str(tiny))
    _, labels = encode_for_training(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "OK"}],
                                    template="gemma")
    overhead = next(i for i, x in enumerate(labels) if x != -100)
    p = _pipeline(tmp_path)
    with pytest.raises(ConfigError) as e:
        preflight(resolve_pipeline("p", path=p, overrides=["training.max_seq_len=10"]), pipeline="p", disk=False)
    assert str(e.value) == (
        f"pipelines.p.training.max_seq_len=10: too short for any answer: the gemma template of tiny-gemma spends "
        f"{overhead} tokens on a one-word prompt before the answer; use at least {overhead + 4} (room for 4 answer "
        "tokens), in practice a few hundred")
    assert preflight(resolve_pipeline("p", path=p, overrides=[f"training.max_seq_len={overhead + 4}"]),
                     pipeline="p", disk=False) == []
    # A helper model's own override is named by its key path; an inherited value is reported once.
    aug = f"augmentation={{enabled: true, corpus: {{path: {SMOKE / 'wikipedia_leads_20.json'}}}, " \
          "backward_training: {max_seq_len: 12}}"
    with pytest.raises(ConfigError) as e:
        preflight(resolve_pipeline("p", path=p, overrides=[aug]), pipeline="p", disk=False)
    assert str(e.value).startswith("pipelines.p.augmentation.backward_training.max_seq_len=12: too short"), e.value
    with pytest.raises(ConfigError) as e:
        preflight(resolve_pipeline("p", path=p, overrides=[aug.replace("max_seq_len: 12", "max_steps: 2"),
                                                           "training.lora.r=999"]), pipeline="p", disk=False)
    assert str(e.value).count("lora.r=999") == 1, e.value


def test_the_flow_checks_again_once_the_model_is_provisioned(tmp_path: Path, sftflow_home: Path) -> None:
    from sftflow.inference.tiny import build_tiny_model

    p = _pipeline(tmp_path)
    cfg = resolve_pipeline("p", path=p, overrides=["training.lora.r=100000"])
    # Not on disk yet (first run of this home): preflight cannot know the shape and creates nothing.
    assert preflight(cfg, pipeline="p", disk=False) == [] and not sftflow_home.exists()
    ref = build_tiny_model("tiny-gemma")  # what provision_task does
    with pytest.raises(ConfigError, match=r"pipelines\.p\.training\.lora\.r=100000: larger than"):
        check_provisioned_model(cfg, pipeline="p", model_dir=ref.path)


# --------------------------------------------------------------------------- credentials in the config
@pytest.mark.parametrize("uri", ["http://alice:s3cret-pw@127.0.0.1:5000",
                                 "postgresql://mlflow:s3cret-pw@db.internal:5432/mlflow"])
def test_a_tracking_uri_with_a_password_is_refused_without_echoing_it(tmp_path: Path, uri: str) -> None:
    # The resolved config is stored (Prefect flow-run parameters, MLflow artifacts): a password in it
    # would be kept there, so it is refused; the message points at the environment variables.
    p = _pipeline(tmp_path)
    with pytest.raises(ConfigError) as e:
        resolve_pipeline("p", path=p, overrides=[f"tracking.tracking_uri={uri}"])
    assert "tracking.tracking_uri: holds credentials" in str(e.value)
    assert "MLFLOW_TRACKING_PASSWORD" in str(e.value) and "s3cret-pw" not in str(e.value)
    # A user name alone may be a token: refused too. Without credentials the URI is accepted.
    with pytest.raises(ConfigError, match="holds credentials"):
        resolve_pipeline("p", path=p, overrides=["tracking.tracking_uri=http://ghp_tokenlike@127.0.0.1:5000"])
    ok = resolve_pipeline("p", path=p, overrides=["tracking.tracking_uri=http://127.0.0.1:5000"])
    assert ok.tracking.tracking_uri == "http://127.0.0.1:5000"

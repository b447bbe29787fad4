"""The typed run options (sftflow/run_options.py) and the per-pipeline form of each deployment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sftflow.config import load_pipelines, resolve_pipeline
from sftflow.config_sections import ConfigError
from sftflow.run_options import RunOptions, options_model, options_overrides, resolve_run_config


@pytest.fixture(scope="module")
def demo():
    return load_pipelines()["demo"]


def test_pipeline_model_defaults_are_the_pipelines_current_values(demo) -> None:
    model = options_model(demo, pipeline="demo")
    opts = model()
    assert opts.base_model == demo.base_model
    assert opts.training.max_steps == demo.training.max_steps
    assert opts.training.learning_rate == demo.training.learning_rate
    assert opts.training.max_seq_len == demo.training.max_seq_len
    assert opts.augmentation.max_segments == demo.augmentation.max_segments
    assert opts.evaluation.max_examples == demo.evaluation.max_examples
    assert opts.promotion.metric == demo.promotion.metric
    assert opts.sources.per_source.model_dump() == {s.name: s.max_rows for s in demo.sources}
    # Untouched defaults change nothing.
    assert options_overrides(opts, cfg=demo) == {}
    schema = model.model_json_schema()
    assert schema["$defs"]["TrainingOptionsDemo"]["properties"]["max_steps"]["description"]


def test_changed_fields_become_key_paths(demo) -> None:
    model = options_model(demo, pipeline="demo")
    opts = model.model_validate({"training": {"max_steps": 5, "method": "dora"},
                                 "sources": {"max_rows": 20, "per_source": {"alpaca_gpt4": 7}},
                                 "augmentation": {"enabled": False}, "promotion": {"min_improvement": 0.01}})
    got = options_overrides(opts, cfg=demo)
    names = [s.name for s in demo.sources]
    assert got == {"training.max_steps": 5, "training.method": "dora", "augmentation.enabled": False,
                   "promotion.min_improvement": 0.01,
                   f"sources.{names.index('dolly_open_qa')}.max_rows": 20,
                   f"sources.{names.index('alpaca_gpt4')}.max_rows": 7,
                   f"sources.{names.index('alpaca_long')}.max_rows": 20}


def test_resolve_applies_options_then_overrides_win() -> None:
    cfg = resolve_run_config("smoke", options={"training": {"max_steps": 2, "max_seq_len": 64},
                                               "evaluation": {"max_examples": 3}},
                             overrides={"training.max_steps": 3})
    assert (cfg.training.max_steps, cfg.training.max_seq_len, cfg.evaluation.max_examples) == (3, 64, 3)
    # `--set` strings too; and no options = the plain resolution.
    cfg = resolve_run_config("smoke", options=RunOptions(), overrides=["training.max_steps=6"])
    assert cfg == resolve_pipeline("smoke", overrides=["training.max_steps=6"])


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ValidationError, match="max_steps"):
        resolve_run_config("smoke", options={"training": {"max_steps": 0}})
    with pytest.raises(ValidationError, match="max_stepz"):
        resolve_run_config("smoke", options={"training": {"max_stepz": 3}})
    with pytest.raises(ConfigError, match=r"options\.sources\.per_source\.nope: .*no such source"):
        resolve_run_config("smoke", options={"sources": {"per_source": {"nope": 3}}})
    # A value the config refuses names the pipelines.yaml key path.
    with pytest.raises(ConfigError, match=r"pipelines\.smoke\.training\.max_seq_len"):
        resolve_run_config("smoke", options={"training": {"max_steps": 2}}, overrides={"training.max_seq_len": 4})


def test_each_deployment_form_has_its_pipelines_defaults() -> None:
    from flows.serve import build_deployments

    deps = {d.name: d for d in build_deployments(limit_concurrency=False)}
    for name, cfg in load_pipelines().items():
        schema = deps[name]._parameter_openapi_schema.model_dump_for_openapi()
        default = schema["properties"]["options"]["default"]
        assert default["training"]["max_steps"] == cfg.training.max_steps
        assert default["base_model"] == cfg.base_model
        assert set(default["sources"]["per_source"]) == {s.name for s in cfg.sources}
        assert "Training" in {d.get("title") for d in schema["definitions"].values()}

"""pipelines.yaml schema: good files load, bad ones fail naming the key path, overrides work."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sftflow.config import apply_overrides, config_hash, load_pipelines, parse_override, resolve_pipeline
from sftflow.config_sections import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "d.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    p = tmp_path / "pipelines.yaml"
    p.write_text(textwrap.dedent(body))
    return p


GOOD = """
pipelines:
  p1:
    base_model: tiny-gemma
    sources:
      - {name: s, path: d.jsonl}
    training: {lora: {r: 4}, max_steps: 3}
"""


def test_repo_pipelines_file_is_valid() -> None:
    pipes = load_pipelines(REPO / "pipelines.yaml")
    assert {"demo", "smoke"} <= set(pipes)
    assert pipes["demo"].base_model == "gemma-3-270m"
    # every stage has its own typed section
    for section in ("sources", "ingest", "validation", "dedup", "augmentation", "training", "evaluation",
                    "promotion", "schedule"):
        assert hasattr(pipes["demo"], section)


def test_good_file_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_pipelines(_write(tmp_path, GOOD))["p1"]
    assert cfg.sources[0].path == str(tmp_path / "d.jsonl")  # relative to the YAML file, not the cwd
    assert cfg.training.lora.r == 4 and cfg.training.lora.alpha == 32  # defaults fill the rest


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ("training: {lora: {r: 0}}", "pipelines.p1.training.lora.r: must be greater than 0 (got 0)"),
        ("training: {lora: {rr: 4}}", "pipelines.p1.training.lora.rr: unknown key"),
        ("training: {method: lorax}", "pipelines.p1.training.method: must be one of 'lora', 'dora'"),
        ("training: {batch_size: many}", "pipelines.p1.training.batch_size: must be a valid integer"),
        ("dedup: {near: {threshold: 1.5}}", "pipelines.p1.dedup.near.threshold: must be less than or equal to 1"),
        ("augmentation: {enabled: true}", "pipelines.p1.augmentation: augmentation.enabled is true but no `corpus`"),
        ("tranining: {}", "pipelines.p1.tranining: unknown key"),
    ],
)
def test_bad_values_name_the_key_path(tmp_path: Path, patch: str, expected: str) -> None:
    body = GOOD.replace("    training: {lora: {r: 4}, max_steps: 3}\n", "") + "    " + patch + "\n"
    with pytest.raises(ConfigError) as e:
        load_pipelines(_write(tmp_path, body))
    assert expected in str(e.value), str(e.value)


def test_missing_file_is_refused_before_work(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD.replace("d.jsonl", "nope.jsonl"))
    with pytest.raises(ConfigError, match=r"pipelines\.p1\.sources\.0\.path: file not found: .*nope\.jsonl"):
        load_pipelines(p)


def test_missing_sources_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pipelines\.p1\.sources: Field required"):
        load_pipelines(_write(tmp_path, "pipelines:\n  p1:\n    base_model: x\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipelines(_write(tmp_path, "pipelines: [unclosed\n"))
    with pytest.raises(ConfigError, match="unknown top-level key"):
        load_pipelines(_write(tmp_path, GOOD + "extra: 1\n"))


def test_overrides(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD)
    cfg = resolve_pipeline("p1", overrides=["training.lora.r=8", "training.precision=bf16", "sources.0.max_rows=5"],
                           path=p)
    assert cfg.training.lora.r == 8 and cfg.training.precision == "bf16" and cfg.sources[0].max_rows == 5
    cfg2 = resolve_pipeline("p1", overrides={"training.max_steps": 7, "dedup.enabled": "false"}, path=p)
    assert cfg2.training.max_steps == 7 and cfg2.dedup.enabled is False
    with pytest.raises(ConfigError, match=r"pipelines\.p1\.training\.lora\.r: must be greater than 0"):
        resolve_pipeline("p1", overrides=["training.lora.r=-1"], path=p)
    with pytest.raises(ConfigError, match=r"pipelines\.nope: no such pipeline \(have: p1\)"):
        resolve_pipeline("nope", path=p)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("training.lora.r")
    assert config_hash(cfg) != config_hash(cfg2)
    assert config_hash(cfg) == config_hash(resolve_pipeline("p1", overrides=["training.lora.r=8",
                                           "training.precision=bf16", "sources.0.max_rows=5"], path=p))


def test_apply_overrides_does_not_mutate() -> None:
    raw = {"training": {"lora": {"r": 4}}}
    out = apply_overrides(raw, ["training.lora.r=8"], prefix="pipelines.x")
    assert raw["training"]["lora"]["r"] == 4 and out["training"]["lora"]["r"] == 8


def test_dict_and_list_overrides_parse_values_the_same_way() -> None:
    as_list = apply_overrides({}, ['a.b="123"', "c=8", "d="], prefix="p")
    as_dict = apply_overrides({}, {"a.b": '"123"', "c": "8", "d": ""}, prefix="p")
    assert as_list == as_dict == {"a": {"b": "123"}, "c": 8, "d": ""}


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ("augmentation: {backward_training: {max_stepz: 3}}",
         "pipelines.p1.augmentation.backward_training.max_stepz: unknown key (did you mean 'max_steps'? allowed: "
         "method, lora, template"),
        ("augmentation: {forward_training: {lora: {rr: 4}}}",
         "pipelines.p1.augmentation.forward_training.lora.rr: unknown key (did you mean 'r'? allowed: r, alpha, "
         "dropout, target_modules)"),
        ("augmentation: {forward_training: {batch_size: many}}",
         "pipelines.p1.augmentation.forward_training.batch_size: must be a valid integer"),
        ("augmentation: {backward_training: {method: lorax}}",
         "pipelines.p1.augmentation.backward_training.method: must be one of 'lora'"),
    ],
)
def test_training_overrides_are_typed(tmp_path: Path, patch: str, expected: str) -> None:
    body = GOOD.replace("    training: {lora: {r: 4}, max_steps: 3}\n", "") + "    " + patch + "\n"
    with pytest.raises(ConfigError) as e:
        load_pipelines(_write(tmp_path, body))
    assert expected in str(e.value), str(e.value)


def test_training_overrides_merge_with_the_pipeline_training(tmp_path: Path) -> None:
    body = GOOD + "    augmentation: {backward_training: {max_steps: 2, lora: {alpha: 4}}}\n"
    cfg = load_pipelines(_write(tmp_path, body))["p1"]
    assert cfg.augmentation.backward_training == {"max_steps": 2, "lora": {"alpha": 4}}  # still a partial override
    from sftflow.config_sections import merge_training

    merged = merge_training(cfg.training, cfg.augmentation.backward_training)
    assert merged["lora"] == {**cfg.training.lora.model_dump(), "alpha": 4} and merged["max_steps"] == 2


def test_unknown_keys_list_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_pipelines(_write(tmp_path, GOOD + "    sources_: []\n    dedup: {near: {treshold: 0.5}}\n"))
    msg = str(e.value)
    assert "pipelines.p1.dedup.near.treshold: unknown key (did you mean 'threshold'? allowed: enabled, key," in msg
    assert "pipelines.p1.sources_: unknown key (did you mean 'sources'?" in msg


def test_file_problems_are_config_errors_with_line_and_column(tmp_path: Path) -> None:
    from sftflow.errors import EXIT_CONFIG, UserError

    with pytest.raises(ConfigError, match=r"pipelines\.yaml:4:6: not valid YAML: .*started at line 3, column 14\)$"):
        load_pipelines(_write(tmp_path, "pipelines:\n  p1:\n    sources: [unclosed\n    x: 1\n"))
    with pytest.raises(ConfigError,
                       match=r": is a folder; expected a pipelines YAML file \(did you mean -f .*pipelines\.yaml\?\)"):
        load_pipelines(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes(b"pipelines: {p: \xe9}\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_pipelines(tmp_path / "latin1.yaml")
    err = ConfigError("x")
    assert isinstance(err, UserError) and isinstance(err, ValueError) and err.exit_code == EXIT_CONFIG

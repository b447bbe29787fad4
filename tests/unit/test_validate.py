"""Validation: the GX suite quarantines bad rows by expectation and fails the stage at suite level."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config_sections import IngestConfig, SourceConfig, ValidationConfig
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet
from sftflow.data.quarantine import QUARANTINE_COLUMNS
from sftflow import markers
from tasks.ingest import ingest
from sftflow.data.validation_suite import SOURCE_PATTERN, derive_frame
from tasks.validate import ValidationFailed, validate, validate_task

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "data" / "smoke"


def _rec(q: str, a: str, **kw) -> dict:
    return make_record([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                       source=kw.pop("source", "t:file.json"), **kw)


def _good(n: int) -> list[dict]:
    return [_rec(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(n)]


def _validate(tmp_path: Path, recs_or_df, **cfg):
    df = recs_or_df if isinstance(recs_or_df, pd.DataFrame) else records_to_frame(recs_or_df)
    ref = write_parquet(df, tmp_path / "in.parquet", name="in")
    tok = cfg.pop("tok", None)
    res = validate(dataset=ref, cfg=ValidationConfig(**cfg), out_dir=tmp_path / "v", tokenizer=tok)
    return res, res.valid.read(), pd.read_parquet(res.quarantine.path)


def test_smoke_data_passes_with_gx_outputs(tmp_path: Path) -> None:
    ing = ingest(sources=[SourceConfig(name="dolly", path=str(SMOKE / "dolly_smoke.jsonl")),
                          SourceConfig(name="alpaca", path=str(SMOKE / "alpaca_smoke.json"))],
                 cfg=IngestConfig(), out_dir=tmp_path / "i")
    res = validate(dataset=ing.dataset, cfg=ValidationConfig(), out_dir=tmp_path / "v")
    assert res.valid.num_rows + res.quarantine.num_rows == ing.dataset.num_rows == 84
    assert res.quarantine.num_rows == 0
    gx = json.loads(Path(res.gx_result).read_text())
    assert gx["suite_name"] == "sftflow_canonical" and gx["meta"]["great_expectations_version"].startswith("1.")
    kinds = {r["expectation_config"]["type"] for r in gx["results"]}
    assert {"expect_table_columns_to_match_set", "expect_column_values_to_be_unique",
            "expect_column_values_to_match_regex"} <= kinds
    # duplicate ids are reported (info level), not quarantined: dedup removes them with accounting
    uniq = [r for r in gx["results"] if r["expectation_config"]["type"] == "expect_column_values_to_be_unique"][0]
    assert uniq["success"] is False and uniq["result"]["unexpected_count"] == 6
    assert Path(res.data_docs).name == "index.html" and Path(res.data_docs).exists()
    assert list(Path(res.data_docs).parent.glob("validations/**/*.html"))


def test_row_level_failures_are_quarantined_with_expectation_names(tmp_path: Path) -> None:
    bad = [
        _rec("Empty answer?", "   "),                                      # 21
        make_record([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], source="t:f"),  # 22
        _rec("Long?", "x" * 300),                                          # 23
        _rec("Controls?", "a\x00\x01\x02\x03b"),                           # 24
        _rec("Origin?", "yes", origin="synthetic"),                        # 25
        _rec("Source?", "yes", source="no-colon"),                         # 26
    ]
    df = records_to_frame(_good(20) + bad)
    df.loc[3, "id"] = "NOT-AN-ID"
    res, valid, q = _validate(tmp_path, df, max_chars=200, max_non_printable_fraction=0.1,
                              max_suite_failure_fraction=0.5)
    assert list(q.columns) == list(QUARANTINE_COLUMNS)
    reasons = dict(zip(q["row"], q["reason"]))
    assert reasons == {
        21: "expect_column_values_to_be_between(min_assistant_chars >= 1)",
        22: "expect_column_values_to_match_regex(role_pattern ~ ^S?(?:UA(?:T+A)*)+$)",
        23: "expect_column_values_to_be_between(total_chars <= 200)",
        24: "expect_column_values_to_be_between(non_printable_fraction <= 0.1) "
            "[messages[1].content: U+0000 x1, U+0001 x1, U+0002 x1, U+0003 x1]",
        25: "expect_column_values_to_be_in_set(origin in ['seed', 'backtranslated'])",
        26: f"expect_column_values_to_match_regex(source ~ {SOURCE_PATTERN})",
        4: "expect_column_values_to_match_regex(id ~ ^[0-9a-f]{16}$)",
    }
    assert len(valid) == 19 and len(valid) + len(q) == len(df)
    assert set(q["stage"]) == {"validate"}
    assert json.loads(q.set_index("row").loc[25, "raw"])["origin"] == "synthetic"


def test_derive_frame_flags_malformed_messages_and_types() -> None:
    df = pd.DataFrame({"id": ["a" * 16, "b" * 16, "c" * 16], "source": ["s:f"] * 3, "origin": ["seed"] * 3,
                       "category": ["", 7, ""], "score": [math.nan] * 3,
                       "messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                    "just text", [{"role": "robot", "content": "x"}]]})
    d = derive_frame(df)
    assert list(d["messages_shape"]) == ["ok", "not a list (str)", "unknown role 'robot'"]
    assert list(d["field_types"]) == ["ok", "category is int", "ok"]
    assert list(d["role_pattern"]) == ["UA", "", ""]


def test_token_bound_uses_the_tokenizer(sftflow_home: Path, tmp_path: Path) -> None:
    from sftflow.inference.tiny import build_tiny_model
    from tasks.validate import load_tokenizer

    tok = load_tokenizer(build_tiny_model("tiny-gemma"))
    recs = _good(10) + [_rec("Tell me a long story.", " ".join(["once upon a time"] * 60))]
    res, valid, q = _validate(tmp_path, recs, max_tokens=64, tok=tok)
    assert list(q["reason"]) == ["expect_column_values_to_be_between(n_tokens <= 64)"]
    d = derive_frame(records_to_frame(recs), tokenizer=tok)
    assert d["n_tokens"].iloc[-1] > 64 and d["n_tokens"].iloc[0] < 64


def test_too_many_bad_rows_fails_the_suite(tmp_path: Path) -> None:
    recs = _good(4) + [_rec(f"Empty {i}?", " ") for i in range(2)]
    with pytest.raises(ValidationFailed, match=r"(?s)2/6 rows \(33.3%\) fail row-level expectations.*"
                                               r"max_suite_failure_fraction=0.2.*min_assistant_chars >= 1.*GX result: "):
        _validate(tmp_path, recs)
    assert (tmp_path / "v" / "quarantine.parquet").exists() and (tmp_path / "v" / "gx_result.json").exists()


def test_bad_schema_fails_the_suite(tmp_path: Path) -> None:
    df = records_to_frame(_good(5)).drop(columns=["score"]).assign(extra=1)
    with pytest.raises(ValidationFailed, match=r"expect_table_columns_to_match_set.*observed"):
        _validate(tmp_path, df)


def test_validate_task_logs_gx_artifacts(sftflow_home: Path, stage_ctx) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    ctx = stage_ctx
    uri, exp, lay = ctx.tracking_uri, ctx.experiment_id, ctx.layout
    ref = write_parquet(records_to_frame(_good(8) + [_rec("Empty?", " ")]), sftflow_home / "in.parquet", name="in")
    res = validate_task.fn(ref, ValidationConfig(), tokenizer=None, ctx=ctx)
    assert res.quarantine.num_rows == 1
    run = mlflow.search_runs([exp], filter_string="tags.`sftflow.stage` = 'validate'", output_format="list")[0]
    assert run.data.metrics["rows_quarantined"] == 1 and run.data.metrics["rows_valid"] == 8
    client = MlflowClient(uri)
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "validate")}
    assert {"validate/gx_result.json", "validate/data_docs", "validate/quarantine.parquet"} <= arts
    assert "validate/data_docs/index.html" in {a.path for a in client.list_artifacts(run.info.run_id, "validate/data_docs")}
    contexts = {d.tags[0].value for d in run.inputs.dataset_inputs if d.tags}
    assert {"validate.input", "validate.output"} <= contexts
    # The completion marker records every output's digest; a damaged output fails the check a cache hit makes.
    assert markers.check_outputs(res) == []
    Path(res.valid.path).write_bytes(Path(res.valid.path).read_bytes()[:64])
    assert "valid.parquet changed on disk" in markers.describe(markers.check_outputs(res))

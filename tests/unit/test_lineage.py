"""Lineage of a registered model version, on a pipeline run made in the test (real SQLite store)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config import PipelineConfig
from sftflow.config_sections import SourceConfig
from sftflow.tracking.lineage import LineageError, format_lineage, lineage, parse_spec
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet


def test_parse_spec() -> None:
    assert parse_spec("m@champion") == ("m", "champion", None)
    assert parse_spec("models:/m/3") == ("m", None, "3")
    assert parse_spec("sftflow-demo") == ("sftflow-demo", None, None)
    with pytest.raises(LineageError):
        parse_spec("  ")
    with pytest.raises(LineageError):
        parse_spec("m@")


@pytest.fixture()
def pipeline_run(sftflow_home: Path, tmp_path: Path) -> dict:
    """A pipeline run shaped like the flow's: parent run + stage runs + a registered version."""
    import mlflow
    from mlflow import MlflowClient

    from sftflow.tracking.runs import StageContext, end_pipeline_run, log_dataset, log_json, stage_run, start_pipeline_run

    src = tmp_path / "src.json"
    src.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi"}]))
    cfg = PipelineConfig(sources=[SourceConfig(name="src", path=str(src))])
    ctx: StageContext = start_pipeline_run(cfg, pipeline="lin", run_id="flow-run-123",
                                           run_dir=sftflow_home / "runs/lin/flow-run-123")
    recs = [make_record([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}],
                        source="src:src.json")]
    raw = write_parquet(records_to_frame(recs), Path(ctx.run_dir) / "ingest/raw.parquet", name="raw")
    train = write_parquet(records_to_frame(recs), Path(ctx.run_dir) / "split/train.parquet", name="train")
    with stage_run(ctx, "ingest"):
        log_dataset(raw, context="ingest.output", source=str(src))
    with stage_run(ctx, "validate"):
        log_dataset(raw, context="validate.input")
        log_json({"success": True, "statistics": {"evaluated_expectations": 9}}, "validate/gx_result.json")
        for i in range(3):  # Data Docs: a folder of static files, reported as one index.html
            mlflow.log_text("<html></html>", f"validate/data_docs/{'index' if i == 0 else f'page{i}'}.html")
    with stage_run(ctx, "dedup"):
        log_json({"exact": 0, "near": 0}, "dedup/report.json")
    with stage_run(ctx, "backtranslate"):
        cands = tmp_path / "candidates.parquet"
        pd.DataFrame({"instruction": ["q"], "response": ["a"], "score": [4.5]}).to_parquet(cands)
        mlflow.log_artifact(str(cands), "backtranslate")
        with stage_run(ctx, "backtranslate.backward_model"):  # nested inside a stage
            mlflow.log_metric("loss", 1.0)
    with stage_run(ctx, "train") as run:
        log_dataset(train, context="training")
        mlflow.log_text("weights", "model/model.safetensors")
        train_run_id = run.info.run_id
    end_pipeline_run(ctx)
    client = MlflowClient(ctx.tracking_uri)
    client.create_registered_model("sftflow-lin")
    mv = client.create_model_version("sftflow-lin", source=f"runs:/{train_run_id}/model", run_id=train_run_id)
    client.set_registered_model_alias("sftflow-lin", "champion", mv.version)
    client.set_model_version_tag("sftflow-lin", mv.version, "sftflow.gate.decision", "promoted")
    return {"ctx": ctx, "train_run_id": train_run_id, "version": str(mv.version), "raw": raw, "train": train,
            "src": str(src)}


def test_lineage_of_registered_version(pipeline_run: dict) -> None:
    ctx = pipeline_run["ctx"]
    d = lineage("sftflow-lin@champion")
    assert d["model"]["version"] == pipeline_run["version"] and "champion" in d["model"]["aliases"]
    assert d["training_run"]["run_id"] == pipeline_run["train_run_id"]
    pr = d["pipeline_run"]
    assert pr["run_id"] == ctx.parent_run_id
    assert pr["prefect_flow_run_id"] == "flow-run-123" and pr["pipeline"] == "lin"
    assert pr["config_hash"] == ctx.config_hash and pr["config_hash"]
    assert any(u.endswith("config/resolved.yaml") for u in d["config"]["artifacts"])

    # Every dataset logged in the pipeline's runs, with digest, source and context.
    by_ctx = {(x["stage"], x["context"]): x for x in d["datasets"]}
    ing = by_ctx[("ingest", "ingest.output")]
    assert ing["sha256"] == pipeline_run["raw"].sha256 and ing["source"] == pipeline_run["src"]
    assert ing["digest"] == pipeline_run["raw"].sha256[:36] and ing["rows"] == 1
    tr = by_ctx[("train", "training")]
    assert tr["sha256"] == pipeline_run["train"].sha256 and tr["path"] == pipeline_run["train"].path

    named = d["named"]
    assert [u.rsplit("/", 2)[-2:] for u in named["validation_result"]] == [["validate", "gx_result.json"]]
    assert [u.rsplit("/", 3)[-3:] for u in named["data_docs"]] == [["validate", "data_docs", "index.html"]]
    assert [u.rsplit("/", 1)[-1] for u in named["dedup_report"]] == ["report.json"]
    assert [u.rsplit("/", 1)[-1] for u in named["backtranslation_candidates"]] == ["candidates.parquet"]
    stages = [s["stage"] for s in d["stages"]]
    assert stages[0] == "" and {"ingest", "validate", "dedup", "backtranslate", "backtranslate.backward_model",
                                 "train"} <= set(stages)
    # The train run's weights folder is one opaque entry, not walked file by file.
    assert [a["path"] for a in d["training_run"]["artifacts"]] == ["model/"]

    text = format_lineage(d)
    for needle in ("Model sftflow-lin version", "champion", "flow-run-123", ctx.parent_run_id, "gx_result.json",
                   "report.json", "candidates.parquet", "resolved.yaml", pipeline_run["raw"].sha256[:16],
                   "promotion gate: promoted"):
        assert needle in text, needle
    json.dumps(d)  # JSON-able, for `sftflow lineage --json`


def test_lineage_by_version_and_latest(pipeline_run: dict) -> None:
    v = pipeline_run["version"]
    assert lineage(f"sftflow-lin/{v}")["model"]["version"] == v
    assert lineage("models:/sftflow-lin")["model"]["version"] == v


def test_lineage_errors_name_what_is_missing(pipeline_run: dict) -> None:
    with pytest.raises(LineageError, match="no registered model 'nope'.*sftflow-lin"):
        lineage("nope@champion")
    with pytest.raises(LineageError, match="has no alias 'staging'.*aliases: \\['champion'\\]"):
        lineage("sftflow-lin@staging")
    with pytest.raises(LineageError, match="has no version 99"):
        lineage("sftflow-lin/99")


def test_lineage_of_version_without_pipeline(sftflow_home: Path) -> None:
    from mlflow import MlflowClient

    from sftflow.tracking.runs import configure, resolve_tracking_uri

    uri = resolve_tracking_uri()
    configure(uri)
    client = MlflowClient(uri)
    from sftflow.tracking.runs import ensure_experiment

    run = client.create_run(ensure_experiment("solo", uri=uri))
    client.create_registered_model("solo")
    client.create_model_version("solo", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    d = lineage("solo")
    assert d["pipeline_run"] is None and d["datasets"] == []
    assert "Pipeline run: none" in format_lineage(d)


def test_lineage_reports_a_digest_mismatch(pipeline_run: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(pipeline_run["ctx"].tracking_uri)
    client.set_model_version_tag("sftflow-lin", pipeline_run["version"], "sftflow.train.sha256", "0" * 64)
    d = lineage("sftflow-lin@champion")
    assert d["digests"]["train"] == "0" * 64
    assert d["digests"]["mismatches"] == [
        f"train: model version says {'0' * 64}, its training run logged {pipeline_run['train'].sha256}"]
    assert "MISMATCH: train" in format_lineage(d)


def _sha256(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_lineage_digests_equal_sha256_of_the_files_read(sftflow_home: Path, tmp_path: Path) -> None:
    """Real rows through ingest -> split -> train (tiny model) -> registry; every digest lineage
    reports equals hashlib.sha256 of the file's bytes (sources, train/held-out Parquet, base model)."""
    import shutil

    from sftflow.ops.cachekeys import dir_digest
    from sftflow.config_sections import DedupConfig, IngestConfig, SplitConfig, TrainingConfig
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.tracking.runs import end_pipeline_run, sources_digest, start_pipeline_run
    from tasks.ingest import ingest_task
    from tasks.split import split_task
    from tasks.train import train_task

    repo = Path(__file__).resolve().parents[2]
    srcs = []
    for name in ("dolly_smoke.jsonl", "alpaca_smoke.json"):
        shutil.copy(repo / "data" / "smoke" / name, tmp_path / name)
        srcs.append(SourceConfig(name=name.split(".")[0], path=str(tmp_path / name)))
    cfg = PipelineConfig(sources=srcs, base_model="tiny-gemma")
    ctx = start_pipeline_run(cfg, pipeline="lin2", run_id="flow-run-real", run_dir=sftflow_home / "runs/lin2/r")
    ing = ingest_task.fn(srcs, IngestConfig(), ctx=ctx)
    sp = split_task.fn(ing.dataset, SplitConfig(heldout_size=6), DedupConfig(), ctx=ctx)
    tcfg = TrainingConfig.model_validate({"batch_size": 4, "max_steps": 2, "precision": "fp32",
                                          "checkpoint_every": None, "lora": {"r": 4, "alpha": 8}})
    base = build_tiny_model("tiny-gemma")
    tr = train_task.fn(sp.train, sp.heldout, base, tcfg, ctx=ctx, register_as="sftflow-lin2")
    end_pipeline_run(ctx)

    d = lineage(f"sftflow-lin2/{tr.registered_version}")
    dg = d["digests"]
    assert dg["mismatches"] == []
    assert dg["train"] == _sha256(sp.train.path) and dg["heldout"] == _sha256(sp.heldout.path)
    assert dg["base_model"] == dir_digest(base.path)
    assert dg["sources"] == sources_digest(cfg)
    files = {Path(f["path"]).name: f["sha256"] for f in dg["source_files"]}
    assert files == {n: _sha256(tmp_path / n) for n in ("dolly_smoke.jsonl", "alpaca_smoke.json")}
    by_ctx = {(x["stage"], x["context"]): x["sha256"] for x in d["datasets"]}
    assert by_ctx[("ingest", "ingest.output")] == _sha256(ing.dataset.path)
    assert by_ctx[("train", "training")] == _sha256(sp.train.path)
    assert by_ctx[("train", "heldout")] == _sha256(sp.heldout.path)
    text = format_lineage(d)
    for digest in (dg["train"], dg["heldout"], dg["base_model"], *files.values()):
        assert digest in text  # printed in full: comparable with sha256sum

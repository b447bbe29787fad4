"""Data contracts: ingestion counts and the GX suite on real data (../shared/data, else data/).

Every file of ../shared/data/instruct and ../shared/data/eval must ingest with the record count of
../shared/data/README.md, and a sample of it must pass the same GX suite the flow runs. Where
../shared/data is absent (a fresh clone) the same contracts run on this repository's own
data/instruct files (counts of data/README.md); ``SFTFLOW_CONTRACT_DATA=repo`` picks data/ even
where ../shared/data exists. Only the byte-for-byte rebuild of data/ needs ../shared/data (its source).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config import resolve_pipeline
from sftflow.config_sections import IngestConfig, SourceConfig, ValidationConfig
from tasks.ingest import ingest
from tasks.validate import validate

REPO = Path(__file__).resolve().parents[2]
SHARED = (REPO.parent / "shared" / "data").resolve()

# file -> (records in ../shared/data/README.md, detected format)
SHARED_FILES = {
    "instruct/dolly_open_qa_3742.jsonl": (3742, "human_assistant"),
    "instruct/alpaca_long_2000.json": (2000, "alpaca"),
    "instruct/alpaca_gpt4_999.json": (999, "alpaca"),
    "instruct/gsm8k_train_7473.json": (7473, "alpaca"),
    "instruct/gpteacher_toolformer_7673.json": (7673, "alpaca"),
    "instruct/gpteacher_roleplay_3146.json": (3146, "alpaca"),
    "instruct/self_instruct_seed_175.jsonl": (175, "self_instruct"),
    "instruct/messages_identity_500.jsonl": (500, "messages"),
    "eval/alpaca_eval_805_davinci003.json": (805, "alpaca"),
    "eval/alpaca_eval_805_gpt4.json": (805, "alpaca"),
    "eval/self_instruct_user_oriented_252.jsonl": (252, "self_instruct"),
}
# Real defects in the upstream files, quarantined at ingestion (row number -> reason).
KNOWN_BAD = {
    "eval/alpaca_eval_805_davinci003.json": {248: "empty response", 505: "empty response"},
}
# The repo's own instruct files (data/README.md): file -> (records, detected format).
REPO_FILES = {
    "instruct/dolly_open_qa_600.jsonl": (600, "human_assistant"),
    "instruct/alpaca_gpt4_300.json": (300, "alpaca"),
    "instruct/alpaca_long_300.json": (300, "alpaca"),
    "instruct/gsm8k_alpaca_200.json": (200, "alpaca"),
    "instruct/toolformer_sharegpt_40.json": (40, "messages"),
}
SAMPLE = 400  # rows per file through GX: the contract, in seconds
ON_SHARED = SHARED.exists() and os.environ.get("SFTFLOW_CONTRACT_DATA", "") != "repo"
ROOT, FILES, DIRS = ((SHARED, SHARED_FILES, ("instruct", "eval")) if ON_SHARED
                     else (REPO / "data", REPO_FILES, ("instruct",)))


def test_every_data_file_is_covered() -> None:
    on_disk = {p.relative_to(ROOT).as_posix() for d in DIRS for p in (ROOT / d).iterdir()}
    assert on_disk == set(FILES), f"data files under {ROOT} without a contract here (or gone)"


@pytest.mark.parametrize("rel", sorted(FILES))
def test_data_file_ingests_with_readme_count_and_passes_gx(tmp_path: Path, rel: str) -> None:
    expected_rows, fmt = FILES[rel]
    src = SourceConfig(name=Path(rel).stem, path=str(ROOT / rel), max_rows=SAMPLE)
    res = ingest(sources=[src], cfg=IngestConfig(), out_dir=tmp_path / "ingest")
    c = res.counts[0]
    assert c.formats == fmt
    assert c.read == expected_rows and c.read == c.kept + c.quarantined
    q = pd.read_parquet(res.quarantine.path)
    known = KNOWN_BAD.get(rel, {}) if ON_SHARED else {}
    assert {int(r): s.split(" (")[0] for r, s in zip(q["row"], q["reason"])} == known
    assert c.mixed == min(SAMPLE, c.kept) and c.mixed + c.not_sampled == c.kept

    v = validate(dataset=res.dataset, cfg=ValidationConfig(), out_dir=tmp_path / "validate")
    assert v.valid.num_rows + v.quarantine.num_rows == res.dataset.num_rows
    # Real, curated data: at most a handful of rows may trip the charset/length bounds.
    assert v.quarantine.num_rows <= max(2, SAMPLE // 100), pd.read_parquet(v.quarantine.path)["reason"].tolist()


def test_demo_pipeline_data_passes_ingest_and_gx(sftflow_home: Path, tmp_path: Path) -> None:
    cfg = resolve_pipeline("demo", path=REPO / "pipelines.yaml")
    for s in cfg.sources:  # the demo reads only from this repo
        assert Path(s.path).resolve().is_relative_to(REPO / "data"), s.path
    res = ingest(sources=cfg.sources, cfg=cfg.ingest, out_dir=tmp_path / "ingest")
    for c in res.counts:
        assert c.quarantined == 0 and c.read == c.kept
    assert {c.source: c.read for c in res.counts} == {"dolly_open_qa": 600, "alpaca_gpt4": 300, "alpaca_long": 300}
    v = validate(dataset=res.dataset, cfg=cfg.validation, out_dir=tmp_path / "validate")
    assert v.valid.num_rows + v.quarantine.num_rows == res.dataset.num_rows
    assert v.quarantine.num_rows <= 3
    assert Path(v.data_docs).exists()


def test_repo_data_matches_its_readme() -> None:
    import json

    data = REPO / "data"
    assert len((data / "instruct" / "dolly_open_qa_600.jsonl").read_text().splitlines()) == 600
    gpt4 = json.loads((data / "instruct" / "alpaca_gpt4_300.json").read_text())
    long_ = json.loads((data / "instruct" / "alpaca_long_300.json").read_text())
    assert len(gpt4) == len(long_) == 300
    norm = lambda r: " ".join(r["instruction"].lower().split())  # noqa: E731
    assert len({norm(r) for r in gpt4} & {norm(r) for r in long_}) == 44  # the real near-duplicate case
    assert len(json.loads((data / "unlabeled" / "wikipedia_leads_400.json").read_text())) == 400
    for lic in ("alpaca-data.DATA_LICENSE", "llama-factory.LICENSE"):
        assert (data / "licenses" / lic).exists()
    readme = (data / "README.md").read_text()
    for f in ("dolly_open_qa_600.jsonl", "alpaca_gpt4_300.json", "alpaca_long_300.json", "wikipedia_leads_400.json",
              "CC BY-SA 3.0", "CC BY-NC 4.0", "CC BY-SA 4.0"):
        assert f in readme


def test_repo_data_is_rebuilt_byte_for_byte(shared_data: Path, tmp_path: Path) -> None:
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("build_sample", REPO / "data" / "build_sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    copy = tmp_path / "data"
    shutil.copytree(REPO / "data", copy)
    mod.HERE = copy  # rebuild into a copy, then compare with the committed files
    mod.build(shared_data)
    for f in sorted(p for p in (REPO / "data").rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")):
        assert (copy / f.relative_to(REPO / "data")).read_bytes() == f.read_bytes(), f

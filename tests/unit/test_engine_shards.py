"""Shard + merge: every data stage gives the same result on one shard and on many, whatever the boundaries.

The engine only decides where the per-shard functions run; these tests pin that the shard/merge
split itself is exact: a duplicate cluster cut by a shard boundary, an id repeated in two shards,
files spread over tasks. (The Ray engine on the same functions, in the whole flow: tests/integration/test_ray_flow.py.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from sftflow.config import resolve_pipeline
from sftflow.config_sections import DedupConfig, ExecutionConfig, IngestConfig, SourceConfig, ValidationConfig
from sftflow.data.minhash import LSHParams, find_near_duplicates, signature_shard
from sftflow.data.neardup import find_cross_duplicates
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet
from sftflow.data.shards import concat_parquet, read_rows
from sftflow.engine import LocalEngine, current_engine, engine_session, shard_bounds, start_engine
from tasks.dedup import deduplicate
from tasks.ingest import ingest
from tasks.split import split
from tasks.validate import validate

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _text(rng: random.Random, n: int = 40) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 50)) for _ in range(n))


def _rec(q: str, a: str, source: str = "s:f.jsonl") -> dict:
    return make_record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], source=source)


def _near_corpus() -> list[str]:
    """Twelve texts; 2..6 are one near-duplicate cluster (one word changed each), 9 copies 0 exactly."""
    rng = random.Random(7)
    base = _text(rng)
    texts = [_text(rng) for _ in range(12)]
    for i in range(2, 7):
        words = base.split()
        words[i] = "changed"
        texts[i] = " ".join(words)
    texts[9] = texts[0]
    return texts


@pytest.mark.parametrize("shard_docs", [1, 3, 4, 5, 100])
@pytest.mark.parametrize("keep_shingles", [16_000_000, 0])  # kept shingles, or re-read for verification
def test_minhash_cluster_cut_by_shard_boundaries_equals_one_shard(shard_docs: int, keep_shingles: int) -> None:
    texts = _near_corpus()
    params = LSHParams(threshold=0.7, ngram=3, keep_shingles=keep_shingles)
    one = find_near_duplicates(texts, params)
    assert len(one.pairs) >= 10  # the 5-member cluster plus the exact copy
    calls: list[int] = []

    def counting_map(fn, items):
        calls.append(len(items))
        return [fn(x) for x in items]

    got = find_near_duplicates(texts, params, map_fn=counting_map, shard_docs=shard_docs)
    np.testing.assert_array_equal(got.pairs, one.pairs)
    np.testing.assert_array_equal(got.similarity, one.similarity)
    assert got.num_candidates == one.num_candidates
    if shard_docs < len(texts):
        assert calls and calls[0] == -(-len(texts) // shard_docs)  # one signature task per shard


def test_signature_shards_concatenate_to_the_whole() -> None:
    texts, params = _near_corpus(), LSHParams(threshold=0.7, ngram=3)
    whole = signature_shard(texts, params)
    parts = [signature_shard(texts[lo:lo + 5], params) for lo in range(0, len(texts), 5)]
    np.testing.assert_array_equal(np.concatenate([p.keys for p in parts]), whole.keys)
    np.testing.assert_array_equal(np.concatenate([p.low for p in parts]), whole.low)


def test_cross_duplicates_sharded_equal_unsharded() -> None:
    texts = _near_corpus()
    cfg = DedupConfig.model_validate({"near": {"threshold": 0.7, "ngram": 3}})
    one = find_cross_duplicates(texts[:6], texts[6:], cfg=cfg)
    assert one
    assert find_cross_duplicates(texts[:6], texts[6:], cfg=cfg, map_fn=LocalEngine().map, shard_docs=2) == one


def _dedup_frame() -> pd.DataFrame:
    texts = _near_corpus()
    recs = [_rec(t, f"answer {i} " * (1 + i % 3), source=f"s{i % 2}:f.jsonl") for i, t in enumerate(texts)]
    recs.append(_rec(texts[4].upper() + "!", "shouted copy"))  # exact after normalisation, last shard
    return records_to_frame(recs)


@pytest.mark.parametrize("shard_rows", [1, 2, 3, 5])
def test_dedup_sharded_equals_one_shard(shard_rows: int) -> None:
    df = _dedup_frame()
    cfg = DedupConfig.model_validate({"near": {"threshold": 0.7, "ngram": 3, "key": "prompt"},
                                      "exact": {"key": "prompt"}})
    one = deduplicate(df=df, cfg=cfg, engine=LocalEngine(shard_rows=10_000))
    many = deduplicate(df=df, cfg=cfg, engine=LocalEngine(shard_rows=shard_rows))
    assert one.report["removed_by_reason"]["near"] >= 3 and one.report["removed_by_reason"]["exact"] >= 1
    pd.testing.assert_frame_equal(many.kept, one.kept)
    pd.testing.assert_frame_equal(many.removed, one.removed)
    assert many.report == one.report


def test_validate_sharded_equals_one_shard_and_sees_ids_across_shards(tmp_path: Path) -> None:
    recs = [_rec(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(9)]
    recs[2] = _rec("", "empty prompt")  # quarantined in shard 1
    recs[7] = _rec("ok?", "")  # quarantined in shard 3
    df = records_to_frame(recs + [recs[0]])  # the same id in the first and the last shard
    ref = write_parquet(df, tmp_path / "in.parquet", name="in")
    cfg = ValidationConfig(data_docs=False)
    one = validate(dataset=ref, cfg=cfg, out_dir=tmp_path / "one", engine=LocalEngine())
    many = validate(dataset=ref, cfg=cfg, out_dir=tmp_path / "many", engine=LocalEngine(shard_rows=3))
    pd.testing.assert_frame_equal(many.valid.read(), one.valid.read())
    pd.testing.assert_frame_equal(many.quarantine.read(), one.quarantine.read())
    q = many.quarantine.read()
    assert list(q["row"]) == [3, 8]  # rows of the whole file, not of the shard
    s_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    s_many = json.loads((tmp_path / "many" / "summary.json").read_text())
    assert s_many["shards"] == 4 and s_one["shards"] == 1
    uniq = [s for s in s_many["expectations"] if s["expectation"].startswith("expect_column_values_to_be_unique")]
    assert uniq[0]["unexpected"] == 2 and not uniq[0]["success"]  # a duplicate id spanning shards 1 and 4
    assert [(s["expectation"], s["unexpected"]) for s in s_many["expectations"]] == \
        [(s["expectation"], s["unexpected"]) for s in s_one["expectations"]]


def test_ingest_files_as_tasks_equal_one_task(tmp_path: Path) -> None:
    for k in range(3):
        lines = [json.dumps({"instruction": f"Question {k}-{i}?", "output": f"Answer {k}-{i}."}) for i in range(4)]
        lines.insert(2, "{not json")
        (tmp_path / f"part{k}.jsonl").write_text("\n".join(lines) + "\n")
    srcs = [SourceConfig(name="parts", path=str(tmp_path / "part*.jsonl"))]
    calls: list[int] = []

    class Counting(LocalEngine):
        def map(self, fn, items):
            calls.append(len(items))
            return super().map(fn, items)

    got = ingest(sources=srcs, cfg=IngestConfig(max_quarantine_fraction=0.5), out_dir=tmp_path / "a", engine=Counting())
    assert calls == [3]  # one task per file
    q = got.quarantine.read()
    assert list(q["source"]) == [f"parts:part{k}.jsonl" for k in range(3)] and list(q["row"]) == [3, 3, 3]
    assert got.counts[0].read == 15 and got.counts[0].kept == 12 and got.counts[0].quarantined == 3


def test_split_sharded_leak_check_equals_one_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sftflow.config_sections import SplitConfig
    from sftflow import engine as engines

    df = _dedup_frame()
    ref = write_parquet(df, tmp_path / "in.parquet", name="in")
    dcfg = DedupConfig.model_validate({"near": {"threshold": 0.7, "ngram": 3}})
    scfg = SplitConfig(heldout_size=5, seed=3)
    one = split(dataset=ref, cfg=scfg, dedup=dcfg, out_dir=tmp_path / "one")
    monkeypatch.setattr(engines, "_active", LocalEngine(shard_rows=2))
    assert current_engine().shard_rows == 2
    many = split(dataset=ref, cfg=scfg, dedup=dcfg, out_dir=tmp_path / "many")
    assert one.leaks_moved == many.leaks_moved and one.leaks_moved > 0
    pd.testing.assert_frame_equal(many.train.read(), one.train.read())
    pd.testing.assert_frame_equal(many.heldout.read(), one.heldout.read())


def test_parquet_row_ranges_and_concat(tmp_path: Path) -> None:
    df = pd.DataFrame({"a": np.arange(50), "b": [f"x{i}" for i in range(50)]})
    path = tmp_path / "t.parquet"
    df.to_parquet(path, index=False, row_group_size=7)
    assert shard_bounds(50, 20) == [(0, 20), (20, 40), (40, 50)] and shard_bounds(0, 5) == [(0, 0)]
    parts = []
    for k, (lo, hi) in enumerate(shard_bounds(50, 13)):
        got = read_rows(path, lo, hi, batch_rows=4)
        pd.testing.assert_frame_equal(got, df.iloc[lo:hi].reset_index(drop=True))
        parts.append(write_parquet(got, tmp_path / f"p{k}.parquet").path)
    ref = concat_parquet(parts, tmp_path / "all.parquet", name="all")
    assert ref.num_rows == 50 and not any(Path(p).exists() for p in parts)
    pd.testing.assert_frame_equal(ref.read(), df)


def test_execution_config_and_local_engine() -> None:
    assert ExecutionConfig().engine == "local" and ExecutionConfig().address is None
    with pytest.raises(ValidationError):
        ExecutionConfig(engine="spark")
    with pytest.raises(ValidationError):
        ExecutionConfig(shard_rows=0)
    cfg = resolve_pipeline("smoke", overrides={"execution.engine": "ray", "execution.address": "auto"},
                           path=str(Path(__file__).resolve().parents[2] / "pipelines.yaml"))
    assert cfg.execution.engine == "ray" and cfg.execution.address == "auto"
    assert isinstance(start_engine(None), LocalEngine)
    with engine_session(ExecutionConfig(shard_rows=11)) as eng:
        assert current_engine() is eng and eng.shard_rows == 11 and eng.map(abs, [-1, 2]) == [1, 2]
    assert current_engine().shard_rows == 100_000  # released: back to a fresh local engine

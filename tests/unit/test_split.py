"""Split: deterministic, sized, stratified, and leak-free (exact and near duplicates, by the one leak rule)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config_sections import DedupConfig, ExactDedupConfig, SplitConfig
from sftflow.data.neardup import find_cross_duplicates, normalize_for_exact
from sftflow.data.records import make_record, prompt_text, records_to_frame
from sftflow.data.refs import write_parquet
from sftflow import markers
from tasks.split import SplitError, heldout_count, split, split_task

# Near *dedup* off; the leak check runs anyway (on dedup.near.key, here prompt + response).
NO_NEAR = DedupConfig(near={"enabled": False})
# Leaks judged on the prompt alone (as the demo pipeline does).
PROMPT_LEAKS = DedupConfig(near={"enabled": False, "key": "prompt"})


def normalize_prompt(text: str) -> str:
    return normalize_for_exact(text, ExactDedupConfig())


def _rec(q: str, a: str, source: str = "s:f.json", category: str = "") -> dict:
    return make_record([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                       source=source, category=category)


def _ref(tmp_path: Path, recs: list[dict], name: str = "in.parquet"):
    return write_parquet(records_to_frame(recs), tmp_path / name, name="clean")


def _distinct(n: int, source: str = "s:f.json", category: str = "") -> list[dict]:
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "garden", "rocket", "silver", "forest"]
    return [_rec(f"Question {i}: describe the {words[i % 10]} number {i * 7919 % 1000} in detail",
                 f"Answer {i}.", source, category) for i in range(n)]


def _split(tmp_path: Path, recs, cfg: SplitConfig, dedup: DedupConfig = NO_NEAR, out: str = "out"):
    ref = recs if hasattr(recs, "sha256") else _ref(tmp_path, recs)
    res = split(dataset=ref, cfg=cfg, dedup=dedup, out_dir=tmp_path / out)
    return res, res.train.read(), res.heldout.read()


def test_sizes_by_fraction_and_count(tmp_path: Path) -> None:
    recs = _distinct(50)
    res, tr, he = _split(tmp_path, recs, SplitConfig(heldout_fraction=0.2))
    assert (len(tr), len(he), res.leaks_moved) == (40, 10, 0)
    assert set(tr["id"]).isdisjoint(he["id"]) and len(set(tr["id"]) | set(he["id"])) == 50
    res, tr, he = _split(tmp_path, recs, SplitConfig(heldout_size=7), out="o2")
    assert (len(tr), len(he)) == (43, 7)
    assert heldout_count(3, SplitConfig(heldout_fraction=0.01)) == 1
    with pytest.raises(SplitError, match=r"split.heldout_size=50 must be smaller than the dataset \(50 rows\)"):
        heldout_count(50, SplitConfig(heldout_size=50))
    with pytest.raises(SplitError, match="need at least 2"):
        heldout_count(1, SplitConfig())


def test_deterministic_and_order_independent(tmp_path: Path) -> None:
    recs = _distinct(60)
    _, _, a = _split(tmp_path, recs, SplitConfig(heldout_size=12, seed=3), out="a")
    _, _, b = _split(tmp_path, list(reversed(recs)), SplitConfig(heldout_size=12, seed=3), out="b")
    _, _, c = _split(tmp_path, recs, SplitConfig(heldout_size=12, seed=4), out="c")
    assert sorted(a["id"]) == sorted(b["id"])  # same content + seed -> same held-out set
    assert sorted(a["id"]) != sorted(c["id"])  # another seed -> another split


def test_stratified_by_source_and_category(tmp_path: Path) -> None:
    recs = _distinct(80, "big:a.json", "open_qa") + [
        _rec(f"Small source question number {i} about tea", f"ok {i}", "small:b.json", "brainstorming") for i in range(20)]
    res, tr, he = _split(tmp_path, recs, SplitConfig(heldout_size=10, stratify_by="source"))
    assert he["source"].value_counts().to_dict() == {"big:a.json": 8, "small:b.json": 2}
    rep = json.loads(Path(res.report).read_text())
    assert rep["heldout_by_stratum"] == {"big:a.json": 8, "small:b.json": 2}
    assert rep["train_by_stratum"] == {"big:a.json": 72, "small:b.json": 18}
    _, _, he = _split(tmp_path, recs, SplitConfig(heldout_size=10, stratify_by="category"), out="cat")
    assert he["category"].value_counts().to_dict() == {"open_qa": 8, "brainstorming": 2}


def test_exact_prompt_leaks_are_moved(tmp_path: Path) -> None:
    # Every prompt appears twice (different answers / spelling), so any held-out row would leak.
    base = _distinct(20)
    twins = [_rec(prompt_text(r["messages"]).upper() + "!", "A different answer.") for r in base]
    res, tr, he = _split(tmp_path, base + twins + _distinct(40)[20:], SplitConfig(heldout_size=10, seed=1), PROMPT_LEAKS)
    train_prompts = {normalize_prompt(prompt_text(list(m))) for m in tr["messages"]}
    held_prompts = {normalize_prompt(prompt_text(list(m))) for m in he["messages"]}
    assert train_prompts.isdisjoint(held_prompts)
    assert res.leaks_exact == res.leaks_moved > 0 and res.dropped == 0
    assert len(tr) + len(he) == 60 and len(he) == 10 - res.leaks_moved
    leaks = pd.read_parquet(tmp_path / "out" / "leaks.parquet")
    assert len(leaks) == res.leaks_moved and set(leaks["action"]) == {"move"}
    assert leaks["reason"].str.startswith("exact: same normalized prompt").all()


def test_exact_leaks_dropped_when_configured(tmp_path: Path) -> None:
    base = _distinct(20)
    twins = [_rec(prompt_text(r["messages"]), "Another answer.") for r in base]
    dedup = DedupConfig(near={"enabled": False, "key": "prompt"}, cross_split="drop")
    res, tr, he = _split(tmp_path, base + twins + _distinct(40)[20:], SplitConfig(heldout_size=10, seed=1), dedup)
    assert res.dropped == res.leaks_moved > 0
    assert len(tr) + len(he) + res.dropped == 60
    rep = json.loads(Path(res.report).read_text())
    assert rep["rows_in"] == rep["train"] + rep["heldout"] + rep["dropped"]


def test_everything_leaks_is_a_clear_error(tmp_path: Path) -> None:
    recs = [_rec("Same question?", f"answer {i}") for i in range(10)]
    with pytest.raises(SplitError, match="every held-out row leaked into train"):
        _split(tmp_path, recs, SplitConfig(heldout_size=3), PROMPT_LEAKS)


def test_near_duplicate_leaks_are_moved(tmp_path: Path) -> None:
    story = ("the quick brown fox jumps over the lazy dog near the quiet river bank while the farmer "
             "watches from his old wooden porch and drinks a cup of strong black coffee every morning")
    base = [_rec(f"{story} variant {i} about topic number {i}", f"answer {i}") for i in range(12)]
    fillers = _distinct(40)
    dedup = DedupConfig(near={"enabled": True, "key": "prompt", "threshold": 0.7, "ngram": 3})
    res, tr, he = _split(tmp_path, base + fillers, SplitConfig(heldout_size=15, seed=0), dedup)
    assert res.leaks_near > 0 and res.leaks_exact == 0
    held_story = [p for p in he["messages"].map(lambda m: prompt_text(list(m))) if p.startswith("the quick brown fox")]
    assert held_story == []  # every near-duplicate of a training prompt left the held-out set
    leaks = pd.read_parquet(tmp_path / "out" / "leaks.parquet")
    assert leaks["reason"].str.startswith("near: similarity").sum() == res.leaks_near


def test_leak_rule_is_the_shared_one_and_not_optional(tmp_path: Path) -> None:
    # Same prompt, different answers: a leak on the prompt key, even with dedup switched off entirely.
    base = _distinct(20)
    twins = [_rec(prompt_text(r["messages"]), "Another answer.") for r in base]
    off = DedupConfig(enabled=False, near={"enabled": False, "key": "prompt"})
    res, tr, he = _split(tmp_path, base + twins + _distinct(40)[20:], SplitConfig(heldout_size=10, seed=1), off)
    assert res.leaks_moved > 0
    # What split left behind holds no pair by the rule dedup's held-out pass applies (sftflow.data.neardup).
    assert find_cross_duplicates(he, tr, cfg=off) == []
    rep = json.loads(Path(res.report).read_text())
    assert rep["leak_key"] == "prompt"


def test_split_task_logs_to_mlflow(tmp_path: Path, stage_ctx) -> None:
    import mlflow

    ctx = stage_ctx
    exp, lay = ctx.experiment_id, ctx.layout
    res = split_task.fn(_ref(tmp_path, _distinct(30)), SplitConfig(heldout_size=5), NO_NEAR, ctx=ctx)
    assert res.heldout.num_rows == 5
    run = mlflow.search_runs([exp], filter_string="tags.`sftflow.stage` = 'split'", output_format="list")[0]
    assert run.data.metrics["rows_train"] == 25 and run.data.metrics["leaks_moved"] == 0
    digests = {d.dataset.digest for d in run.inputs.dataset_inputs}
    assert {res.train.sha256[:36], res.heldout.sha256[:36]} <= digests
    # The completion marker records every output's digest; a damaged output fails the check a cache hit makes.
    assert markers.check_outputs(res) == []
    Path(res.heldout.path).write_bytes(Path(res.heldout.path).read_bytes()[:64])
    assert "heldout.parquet changed on disk" in markers.describe(markers.check_outputs(res))


def test_too_few_rows_is_a_user_error_naming_the_key() -> None:
    from sftflow.errors import EXIT_DATA, UserError

    with pytest.raises(SplitError) as e:
        heldout_count(6, SplitConfig(heldout_size=6))
    assert isinstance(e.value, UserError) and e.value.exit_code == EXIT_DATA
    assert "split.heldout_size=6" in str(e.value) and "remain after ingest, validation and dedup" in str(e.value)
    assert "at most 5" in str(e.value)

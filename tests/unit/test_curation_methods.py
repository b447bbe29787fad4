"""Curation methods (issue 24): per-token PMI / log-likelihood through the one batch API, every
method's held-out AUC in the report and MLflow, and the min_auc actions (warn, skip, fail).

Tiny random models for the mechanics (a random tiny model discriminates nothing; the real
measurement on the demo's held-out pairs with Gemma 3 270M is bench/curator_auc.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from sftflow.augment.curation import (
    CuratorBelowMinAuc,
    check_curator,
    curator_auc,
    keep_decision,
    likelihood_scores,
)
from sftflow.augment.pairs import BELOW, KEPT, NOT_CURATED, accounting, select_top_fraction
from sftflow.config_sections import AugmentationConfig, CorpusConfig, CurationConfig, TrainingConfig
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import ModelRef, write_parquet
from sftflow.errors import UserError
from sftflow.inference.batch import ModelHandle, loglik_texts

REPO = Path(__file__).resolve().parents[2]
REPO_LEADS = REPO / "data" / "unlabeled" / "wikipedia_leads_400.json"

PAIRS = [("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
         ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare."),
         ("Name a colour.", "Blue."),
         ("Explain photosynthesis briefly.", "Plants turn light, water and carbon dioxide into sugar and oxygen. " * 3),
         ("", "An answer after an empty user turn."),
         ("An instruction with an empty answer.", "")]


@pytest.fixture()
def tiny(sftflow_home: Path) -> ModelRef:
    from sftflow.inference.tiny import build_tiny_model

    return build_tiny_model("tiny-gemma")


def _records(pairs) -> list[dict]:
    return [make_record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], source="unit")
            for q, a in pairs]


# --------------------------------------------------------------------------- the log-probabilities
def test_loglik_batched_equals_one_by_one_and_the_models_own_logits(tiny: ModelRef) -> None:
    import torch

    from sftflow.inference.loglik import answer_row

    handle = ModelHandle(tiny)
    try:
        batched = loglik_texts(handle, PAIRS, template=None, batch_size=4)
        single = [loglik_texts(handle, [p], template=None, batch_size=1)[0] for p in PAIRS]
        model, tok = handle.model_and_tokenizer()
        for (q, a), b, s in zip(PAIRS, batched, single):
            ids, start = answer_row(tok, q, a, template="gemma")
            assert len(b) == len(s) == len(ids) - start  # one value per answer token
            assert b == pytest.approx(s, abs=1e-4)
            assert all(math.isfinite(v) and v <= 0 for v in b)
            if b:  # the decoder + head path equals the model's own forward
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
                ref = torch.log_softmax(logits[start - 1:-1], -1).gather(1, torch.tensor(ids[start:])[:, None])
                assert b == pytest.approx(ref.squeeze(1).tolist(), abs=1e-4)
        assert batched[-1] == []  # an empty answer has nothing to score
    finally:
        handle.close()


def test_pmi_and_loglik_are_finite_and_pmi_is_the_difference(tiny: ModelRef) -> None:
    cfg, training = AugmentationConfig(curation={"batch_size": 3}), TrainingConfig()
    rows = likelihood_scores(tiny, PAIRS, cfg=cfg, training=training)
    assert all(math.isfinite(r["pmi"]) and math.isfinite(r["loglik"]) for r in rows[:-1])
    assert math.isnan(rows[-1]["pmi"]) and rows[-1]["answer_tokens"] == 0
    # pmi = mean of log p(y|x) - log p(y|empty user turn); the empty instruction's pmi is exactly 0.
    cond = loglik_texts(tiny, PAIRS[:4], template=None, batch_size=2)
    ref = loglik_texts(tiny, [("", a) for _, a in PAIRS[:4]], template=None, batch_size=2)
    for r, c, u in zip(rows, cond, ref):
        assert r["loglik"] == pytest.approx(sum(c) / len(c), abs=1e-5)
        assert r["pmi"] == pytest.approx((sum(c) - sum(u)) / len(c), abs=1e-5)
    assert rows[4]["pmi"] == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- AUC, keep rules, checks
def test_curator_auc_reports_every_method(tiny: ModelRef) -> None:
    got = curator_auc(tiny, _records(PAIRS[:4]), cfg=AugmentationConfig(curation={"method": "pmi"}),
                      training=TrainingConfig())
    assert got["curator_auc_pairs"] == 4
    for m in ("rubric", "pmi", "loglik"):
        assert 0.0 <= got[f"curator_auc_{m}"] <= 1.0
    assert got["curator_auc"] == got["curator_auc_pmi"]  # the chosen method
    assert 1.0 <= got["curator_true_mean_rubric"] <= 5.0


def test_keep_rules_per_method() -> None:
    flags, why = select_top_fraction([0.3, float("nan"), 0.9, 0.1, 0.5], 0.5)
    assert flags == [False, False, True, False, True] and "rank 1 of 4" in why[2] and why[1] == "no score (NaN)"
    assert select_top_fraction([0.2, 0.2, 0.2], 0.34)[0] == [True, True, False]  # ceil(1.02) = 2, earlier first
    rows = [{"score": s, "expected": s, "argmax": 5} for s in (0.4, -0.2, 1.3)]
    assert keep_decision(rows, CurationConfig(method="pmi"))[0] == [False, False, True]  # top 25% of 3 = 1
    assert keep_decision(rows, CurationConfig(method="pmi", keep="threshold", min_score=0.0))[0] == [True, False, True]
    assert keep_decision(rows, CurationConfig(threshold=1.0))[0] == [False, False, True]  # rubric: expected >= 1.0
    with pytest.raises(ValueError, match="score5 reads a 1-5 rating"):
        CurationConfig(method="pmi", keep="score5")
    with pytest.raises(ValueError, match="needs min_score"):
        CurationConfig(method="loglik", keep="threshold")


def test_min_auc_check_names_the_key_and_the_auc() -> None:
    q = {"curator_auc_pairs": 32.0, "curator_auc_rubric": 0.512, "curator_auc_pmi": 0.94}
    ok = check_curator(q, CurationConfig(method="pmi"))
    assert ok.status == "ok" and not ok.below
    warn = check_curator(q, CurationConfig(method="rubric"))
    assert warn.below and "0.512" in warn.message() and "curating anyway" in warn.message()
    assert check_curator({}, CurationConfig()).status == "unmeasured"
    with pytest.raises(CuratorBelowMinAuc) as err:
        check_curator(q, CurationConfig(method="rubric", below_min_auc="fail"))
    text = str(err.value)
    assert isinstance(err.value, UserError)
    assert "augmentation.curation.min_auc" in text and "0.512" in text and "below_min_auc: fail" in text
    assert "pmi 0.940" in text  # what the other methods measured


# --------------------------------------------------------------------------- the stage, end to end
def _stage_inputs(home: Path, *, curation: dict) -> dict:
    from sftflow.inference.tiny import build_tiny_model

    base = build_tiny_model("tiny-gemma")
    leads = json.loads(REPO_LEADS.read_text())
    corpus = home / "leads.json"
    corpus.write_text(json.dumps(dict(list(leads.items())[:10])))
    seed = _records([("What is the capital of France?", "The capital of France is Paris."),
                     ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare around 1600.")] * 2)
    heldout = _records(PAIRS[:4])
    cfg = AugmentationConfig(
        enabled=True, corpus=CorpusConfig(name="wiki", path=str(corpus)), max_segments=4, min_words=20,
        max_words=120, reject_truncated=False, backward_training={"max_steps": 1},
        generation={"max_new_tokens": 6, "batch_size": 4}, curation={"model": "base", "batch_size": 4, **curation},
    )
    training = TrainingConfig(batch_size=2, max_seq_len=128, lora={"r": 4, "alpha": 8}, precision="fp32",
                              checkpoint_every=None, learning_rate=1e-3)
    return dict(seed=write_parquet(records_to_frame(seed), home / "seed.parquet", name="seed"), base=base, cfg=cfg,
                training=training, heldout=write_parquet(records_to_frame(heldout), home / "heldout.parquet",
                                                         name="heldout"))


def test_stage_with_pmi_reports_every_auc_and_keeps_the_top_fraction(sftflow_home: Path) -> None:
    from tasks.backtranslate import backtranslate

    kw = _stage_inputs(sftflow_home, curation={"method": "pmi", "top_fraction": 0.5, "min_auc": 0.0})
    out = backtranslate(out_dir=sftflow_home / "bt", **kw)
    frame = pd.read_parquet(out.candidates.path)
    counts = dict(out.counts)
    scored = frame[frame.status.isin([KEPT, BELOW])]
    assert len(scored) == counts["scored"] > 0 and counts["not_curated"] == 0
    assert scored.score.map(math.isfinite).all() and (scored.score == scored.pmi).all()
    assert counts["kept"] == math.ceil(0.5 * len(scored))
    assert scored[scored.status == KEPT].score.min() >= scored[scored.status == BELOW].score.max()
    q = dict(out.quality)
    assert {"curator_auc_rubric", "curator_auc_pmi", "curator_auc_loglik"} <= set(q)
    assert q["curator_auc"] == q["curator_auc_pmi"] and q["curator_below_min_auc"] == 0.0
    report = json.loads(Path(out.report).read_text())
    assert report["curation"]["method"] == "pmi" and report["curation"]["keep"] == "top_fraction"
    assert set(report["curation"]["auc"]) == {"rubric", "pmi", "loglik"}
    assert report["curation"]["checks"][0]["status"] == "ok" and report["counts"] == counts
    curated = pd.read_parquet(out.curated.path)
    assert sorted(curated.score.round(6)) == sorted(scored[scored.status == KEPT].score.round(6))


def test_below_min_auc_warn_skip_fail(sftflow_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    from sftflow.augment.report import markdown_summary
    from tasks.backtranslate import backtranslate

    # A random tiny model is no curator: min_auc 0.99 is out of its reach.
    kw = _stage_inputs(sftflow_home, curation={"method": "rubric", "min_auc": 0.99})
    with caplog.at_level("WARNING", logger="sftflow.backtranslate"):
        warned = backtranslate(out_dir=sftflow_home / "warn", **kw)
    q = dict(warned.quality)
    assert q["curator_auc_rubric"] < 0.99 and q["curator_below_min_auc"] == 1.0 and q["curator_min_auc"] == 0.99
    assert dict(warned.counts)["scored"] > 0  # warn: curated anyway ...
    assert any("curating anyway" in r.getMessage() for r in caplog.records)  # ... and said so in the log
    frame = pd.read_parquet(warned.candidates.path)
    md = markdown_summary(dict(warned.counts), frame, kw["cfg"], warned.iteration_kept, unparseable=0.0,
                          quality=q, checks=warned.checks)
    assert "**WARNING: curator rubric" in md.splitlines()[2]  # right under the title
    assert "| pmi | " in md and "| rubric (chosen) | " in md

    skip_kw = {**kw, "cfg": kw["cfg"].model_copy(update={"curation": kw["cfg"].curation.model_copy(
        update={"below_min_auc": "skip"})})}
    skipped = backtranslate(out_dir=sftflow_home / "skip", **skip_kw)
    counts = dict(skipped.counts)
    frame = pd.read_parquet(skipped.candidates.path)
    assert skipped.curated.num_rows == 0 and counts["kept"] == counts["generated"] == 0
    assert counts["not_curated"] == (frame.status == NOT_CURATED).sum() > 0
    assert accounting(frame) == counts  # balances: in = filtered + generated + not curated
    assert counts["segments_in"] == counts["segments_filtered"] + counts["not_curated"]
    assert (frame.reason[frame.status == NOT_CURATED] == "curator_below_min_auc").all()
    assert "below_min_auc: skip" in frame.detail[frame.status == NOT_CURATED].iloc[0]
    assert json.loads(Path(skipped.report).read_text())["curation"]["skipped"] is True
    # What the model version's description and its sftflow.data.note tag carry (promote_task(note=...)).
    from sftflow.augment.report import curation_note

    assert "no pair curated (below_min_auc: skip)" in curation_note(skipped.report)
    assert "curating anyway (below_min_auc: warn)" in curation_note(warned.report)

    fail_kw = {**kw, "cfg": kw["cfg"].model_copy(update={"curation": kw["cfg"].curation.model_copy(
        update={"below_min_auc": "fail"})})}
    with pytest.raises(CuratorBelowMinAuc, match=r"augmentation\.curation\.min_auc: the rubric curator's held-out AUC"):
        backtranslate(out_dir=sftflow_home / "fail", **fail_kw)
    assert not (sftflow_home / "fail" / "candidates.parquet").exists()  # stopped before generating


@pytest.mark.timeout(600)
def test_loglik_on_ray_equals_local(tiny: ModelRef) -> None:
    """engine=ray (a real local Ray cluster, 2 CPUs): the same length-sorted batches on Ray Data actors."""
    ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")
    from sftflow import engine as engines
    from sftflow.config_sections import ExecutionConfig

    local = loglik_texts(tiny, PAIRS, template=None, batch_size=2)
    engine = engines.activate(ExecutionConfig(engine="ray", num_cpus=2, generation_backend="hf"))
    try:
        assert isinstance(engine, engines.RayEngine) and int(ray.cluster_resources()["CPU"]) == 2
        seen: list[int] = []
        remote = loglik_texts(tiny, PAIRS, template=None, batch_size=2, on_progress=lambda d, _t: seen.append(d))
    finally:
        engines.release()
    assert [len(r) for r in remote] == [len(r) for r in local] and seen[-1] == len(PAIRS)
    for a, b in zip(local, remote):
        assert a == pytest.approx(b, abs=1e-5)

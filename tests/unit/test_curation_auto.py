"""curation.method: auto (issue 24): every method's held-out AUC first, the best one curates, the report
says which and why; a planted true/mismatched set where a curator that learned the pairs must rank the
true answers first; iterations: 2 with a per-iteration report (the smoke pipeline's settings).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from sftflow.augment.curation import AUTO_FALLBACK, CuratorBelowMinAuc, check_curator, choose_method, curator_auc
from sftflow.augment.pairs import BELOW, KEPT, accounting
from sftflow.config_sections import AugmentationConfig, CorpusConfig, CurationConfig, TrainingConfig
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet

REPO = Path(__file__).resolve().parents[2]

# The planted set: each answer belongs to its question and to no other (the mismatched pair of row i
# is question i with answer i+1).
PLANTED = [("Name the capital of France.", "Paris is the capital of France."),
           ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
           ("What colour is the sky?", "The sky is blue on a clear day."),
           ("How many legs does a spider have?", "A spider has eight legs."),
           ("What do bees make?", "Bees make honey and wax."),
           ("Which planet is red?", "Mars is the red planet."),
           ("What is frozen water?", "Frozen water is ice."),
           ("Where do penguins live?", "Penguins live in the southern hemisphere.")]


def _records(pairs) -> list[dict]:
    return [make_record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], source="unit")
            for q, a in pairs]


# --------------------------------------------------------------------------- the choice
def test_auto_picks_the_highest_auc_and_says_why() -> None:
    q = {"curator_auc_pairs": 32.0, "curator_auc_rubric": 0.529, "curator_auc_pmi": 0.907, "curator_auc_loglik": 0.71}
    c = choose_method(q, CurationConfig())
    assert (c.method, c.configured) == ("pmi", "auto")
    assert c.reason == ("pmi (auto: highest held-out AUC 0.907 on 32 true vs mismatched pairs; loglik 0.710, "
                        "rubric 0.529)")
    assert choose_method({**q, "curator_auc_rubric": 0.95}, CurationConfig()).method == "rubric"
    tie = choose_method({"curator_auc_rubric": 0.8, "curator_auc_pmi": 0.8, "curator_auc_loglik": 0.8}, CurationConfig())
    assert tie.method == "pmi"  # a tie goes to the cheaper likelihood method
    none = choose_method({}, CurationConfig())
    assert none.method == AUTO_FALLBACK and "no held-out AUC" in none.reason
    named = choose_method(q, CurationConfig(method="rubric"))
    assert named.method == "rubric" and "configured" in named.reason


def test_min_auc_applies_to_the_method_auto_chose() -> None:
    q = {"curator_auc_pairs": 32.0, "curator_auc_rubric": 0.52, "curator_auc_pmi": 0.58, "curator_auc_loglik": 0.55}
    check = check_curator(q, CurationConfig(min_auc=0.6))
    assert check.method == "pmi" and check.below and "0.580" in check.message()
    with pytest.raises(CuratorBelowMinAuc, match="the pmi curator's held-out AUC is 0.580"):
        check_curator(q, CurationConfig(min_auc=0.6, below_min_auc="fail"))
    assert check_curator({**q, "curator_auc_pmi": 0.9}, CurationConfig(min_auc=0.6)).status == "ok"


def test_auto_is_the_default_and_refuses_a_single_scale_keep_rule() -> None:
    assert CurationConfig().method == "auto" and CurationConfig().keep_rule == "top_fraction"
    for keep in ("threshold", "score5"):
        with pytest.raises(ValueError, match=f"keep: {keep} reads one method's scale; method auto"):
            CurationConfig(keep=keep)
    from sftflow.config import load_pipelines

    demo = load_pipelines(REPO / "pipelines.yaml")["demo"].augmentation
    # The demo curates with auto; 48 leads and no ablation until generation fits its time budget (pipelines.yaml).
    assert demo.curation.method == "auto" and demo.keep_if_helps


# --------------------------------------------------------------------------- a planted set, a tiny curator
@pytest.mark.timeout(600)
def test_a_curator_trained_on_the_pairs_ranks_true_above_mismatched(sftflow_home: Path) -> None:
    """M0 as the stage trains it (curation.model: forward), here on the planted pairs themselves: the
    likelihood methods must rank every true answer above the mismatched ones; untrained, they cannot."""
    from sftflow.augment.humpback import curation_model
    from sftflow.inference.tiny import build_tiny_model

    base = build_tiny_model("tiny-gemma")
    records = _records(PLANTED)
    seed = write_parquet(records_to_frame(records), sftflow_home / "seed.parquet", name="seed")
    cfg = AugmentationConfig(enabled=True, corpus=CorpusConfig(name="w", path="unused.json"),
                             curation={"model": "forward", "batch_size": 8})
    training = TrainingConfig(batch_size=4, max_seq_len=64, lora={"r": 8, "alpha": 16}, precision="fp32",
                              checkpoint_every=None, learning_rate=1e-2, max_steps=30, warmup_ratio=0.0)
    m0, trained = curation_model(cfg=cfg, base=base, seed=seed, forward_cfg=training,
                                 work_root=sftflow_home / "_train")
    assert len(trained) == 1
    before = curator_auc(base, records, cfg=cfg, training=training)
    after = curator_auc(m0, records, cfg=cfg, training=training)
    assert after["curator_auc_pairs"] == len(PLANTED)
    for m in ("pmi", "loglik"):
        assert after[f"curator_auc_{m}"] >= 0.9 > before[f"curator_auc_{m}"]
        assert after[f"curator_true_mean_{m}"] > after[f"curator_mismatched_mean_{m}"]
    assert 0.0 <= after["curator_auc_rubric"] <= 1.0  # measured too (a tiny model reads no rating)
    choice = choose_method(after, cfg.curation)
    assert choice.method in ("pmi", "loglik") and f"{after[f'curator_auc_{choice.method}']:.3f}" in choice.reason


# --------------------------------------------------------------------------- the stage: auto, two iterations
@pytest.mark.timeout(900)
def test_stage_auto_two_iterations_reports_each_iteration(sftflow_home: Path) -> None:
    """The smoke pipeline's augmentation and training settings with iterations: 2 (M_1 = M0, M_2 trained
    on the seed + the pairs M0 kept)."""
    from sftflow.config import load_pipelines
    from sftflow.inference.tiny import build_tiny_model
    from tasks.backtranslate import backtranslate

    smoke = load_pipelines(REPO / "pipelines.yaml")["smoke"]
    aug = smoke.augmentation.model_copy(update={"iterations": 2})
    assert aug.curation.method == "auto"
    base = build_tiny_model(smoke.base_model)
    seed = write_parquet(records_to_frame(_records(PLANTED) * 2), sftflow_home / "seed.parquet", name="seed")
    heldout = write_parquet(records_to_frame(_records(PLANTED)), sftflow_home / "heldout.parquet", name="heldout")
    out = backtranslate(seed=seed, base=base, cfg=aug, training=smoke.training, out_dir=sftflow_home / "bt",
                        heldout=heldout)
    report = json.loads(Path(out.report).read_text())
    cur = report["curation"]
    aucs = {m: v for m, v in cur["auc_per_iteration"][0].items() if v is not None}
    assert cur["configured_method"] == "auto" and cur["method"] == out.choice.method == max(aucs, key=aucs.get)
    assert cur["why"] == out.choice.reason and cur["keep"] == "top_fraction"
    assert len(cur["auc_per_iteration"]) == 2 and len(cur["checks"]) == 2
    rows = cur["iterations"]
    assert [r["iteration"] for r in rows] == [1, 2] and [r["kept"] for r in rows] == report["iteration_kept"]
    counts = dict(out.counts)
    for r, check in zip(rows, cur["checks"]):
        assert r["method"] == cur["method"] and r["scored"] == counts["scored"] > 0
        assert r["kept"] == math.ceil(aug.curation.top_fraction * r["scored"])
        assert r["auc"] == check["auc"] and r["kept_mean_score"] >= r["scored_mean_score"]
    # The second iteration's curator is M_2 (its own AUC per method), and it decided the final statuses.
    assert {h.run_name for h in out.helpers} >= {"backtranslate.curation", "backtranslate.curation_iter2"}
    frame = pd.read_parquet(out.candidates.path)
    scored = frame[frame.status.isin([KEPT, BELOW])]
    assert (scored.score == scored.score_iter2).all() and scored.score_iter1.notna().all()
    assert accounting(frame) == counts and counts["kept"] == rows[-1]["kept"]
    q = dict(out.quality)
    assert q["curator_auc"] == q[f"curator_auc_{cur['method']}"]
    assert {"curator_auc_pmi_iter1", "curator_auc_pmi_iter2"} <= set(q)


def test_curated_summary_names_the_chosen_method(tmp_path: Path) -> None:
    from sftflow.augment.report import curation_note

    assert curation_note(tmp_path / "missing.json") == ""
    doc = {"counts": {"segments_in": 400, "scored": 320}, "iteration_kept": [80],
           "curation": {"method": "pmi", "why": "pmi (auto: highest held-out AUC 0.907)",
                        "auc": {"rubric": 0.529, "pmi": 0.907, "loglik": 0.71, "x": None},
                        "checks": [{"message": "curator pmi (iteration 1): held-out AUC 0.907 ..."}]}}
    (tmp_path / "report.json").write_text(json.dumps(doc))
    note = curation_note(tmp_path / "report.json").splitlines()
    assert note[0] == "Curation method: pmi (auto: highest held-out AUC 0.907)"
    assert note[1] == "Held-out curator AUC per method: rubric 0.529, pmi 0.907, loglik 0.710"
    assert note[2].startswith("curator pmi (iteration 1)")
    assert note[3] == "Kept per iteration: [80] of 320 scored (400 segments read)"

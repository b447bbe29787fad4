"""Evaluation that matches training (issue 13): tagged prompts equal training's prefix token by
token, the loss split into answer and end marker, runaways counted only where the reference fits,
max_new_tokens from the references, the paper's curation rule and the curator's AUC."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from sftflow.config_sections import AugmentationConfig, EvaluationConfig, TrainingConfig
from sftflow.data.records import frame_to_records, make_record, records_to_frame
from sftflow.data.refs import write_parquet

TAG = "Answer in the style of an AI Assistant."


def _records(n: int = 6) -> list[dict]:
    return [make_record([{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"The answer is {2 * i}, of course."}],
                        source="unit:synthetic") for i in range(n)]


@pytest.fixture()
def tiny(sftflow_home: Path):
    from sftflow.inference.tiny import build_tiny_model

    return build_tiny_model("tiny-gemma")


@pytest.mark.parametrize("template", ["gemma", "chatml"])
def test_eval_prompt_equals_training_prompt_token_by_token_with_tags(sftflow_home: Path, tiny, template: str) -> None:
    """The held-out set is tagged by the seed's own function, so the prompt evaluation generates from
    is exactly the prefix of the row training learned from, system tag included."""
    from sftflow.data.tags import tag_dataset
    from sftflow.inference.formatting import IGNORE_INDEX, build_generation_prompt, encode_for_training
    from sftflow.inference.models import load_model
    from sftflow.evaluation.sets import split_prompt_reference

    _, tok = load_model(tiny)
    ref = write_parquet(records_to_frame(_records()), sftflow_home / "heldout.parquet", name="heldout")
    tagged = tag_dataset(ref, TAG, sftflow_home / "heldout_tagged.parquet", name="heldout_tagged")
    seed_tagged = tag_dataset(ref, TAG, sftflow_home / "seed_tagged.parquet", name="seed_tagged", origin="seed")
    for ev, tr in zip(frame_to_records(tagged.read()), frame_to_records(seed_tagged.read())):
        assert ev["messages"] == tr["messages"] and ev["messages"][0] == {"role": "system", "content": TAG}
        prompt, _ = split_prompt_reference(ev["messages"])
        gen_ids = list(build_generation_prompt(tok, prompt, template=template))
        train_ids, labels = encode_for_training(tok, tr["messages"], template=template, max_len=None)
        first_label = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        assert gen_ids == train_ids[:first_label]
        assert TAG in tok.decode(gen_ids)


def test_row_losses_split_answer_and_end_marker_and_add_up_to_the_heldout_loss(sftflow_home: Path, tiny) -> None:
    from sftflow.inference.formatting import stop_token_ids
    from sftflow.inference.models import load_model
    from sftflow.training.loss import heldout_loss, row_losses

    model, tok = load_model(tiny, dtype="float32")
    convs = [r["messages"] for r in _records()]
    stops = stop_token_ids(tok, "gemma")
    rows = row_losses(model, tok, convs, template="gemma", max_seq_len=512, stop_ids=stops, batch_size=4)
    total = heldout_loss(model, tok, convs, template="gemma", max_seq_len=512, batch_size=4, precision="fp32")
    assert len(rows) == len(convs) and all(r is not None for r in rows)
    # The per-row sums are the held-out loss (same encoding, same tokens).
    assert sum(r.tokens for r in rows) == total.tokens
    assert sum(r.loss for r in rows) / total.tokens == pytest.approx(total.loss, rel=1e-4)
    for r in rows:  # exactly one end marker per single-turn row, scored apart from the answer
        assert r.answer_tokens == r.tokens - 1 and r.end_logprob <= 0
        assert r.loss == pytest.approx(r.answer_loss - r.end_logprob, rel=1e-5)
    # Truncation that cuts the end marker off leaves no end probability; the answer still counts.
    from sftflow.inference.formatting import encode_for_training

    ids, _ = encode_for_training(tok, convs[0], template="gemma", max_len=None)
    end_at = max(i for i, t in enumerate(ids) if t in stops)  # the answer's <end_of_turn>
    cut = row_losses(model, tok, convs[:1], template="gemma", max_seq_len=end_at, stop_ids=stops)
    assert cut[0] is not None and math.isnan(cut[0].end_logprob)
    # Dropped (overlong: drop) and label-less rows are None, aligned with their input.
    dropped = row_losses(model, tok, convs[:2], template="gemma", max_seq_len=8, overlong="drop", stop_ids=stops)
    assert dropped == [None, None]


def test_max_new_tokens_auto_covers_the_reference_quantile() -> None:
    from sftflow.evaluation.metrics import resolve_max_new_tokens

    assert resolve_max_new_tokens(EvaluationConfig(max_new_tokens=64), [500]) == 64
    lengths = list(range(1, 101))  # 1..100 tokens
    auto = EvaluationConfig(max_new_tokens="auto", auto_quantile=0.9, auto_max_new_tokens=384)
    assert resolve_max_new_tokens(auto, lengths) == 96  # the 90th percentile (90) rounded up to 8
    assert resolve_max_new_tokens(auto, [3, 4]) == 16  # never below 16
    assert resolve_max_new_tokens(auto.model_copy(update={"auto_max_new_tokens": 40}), lengths) == 40
    assert resolve_max_new_tokens(auto, []) == 16


def test_runaway_rate_counts_only_references_that_fit() -> None:
    from sftflow.evaluation.metrics import generation_metrics

    m, _ = generation_metrics(outputs=["a b", "c", "d", "e"], references=["a b", "c", "x", "y"],
                              num_tokens=[2, 1, 8, 8], finished=[True, True, False, False],
                              fits=[True, True, True, False])
    assert m["runaway_rate"] == pytest.approx(1 / 3)  # one of the three fitting rows ran away
    assert m["runaway_rate_all"] == 0.5 and m["fit_fraction"] == 0.75
    none_fit, _ = generation_metrics(outputs=["a"], references=["a"], num_tokens=[8], finished=[False], fits=[False])
    assert math.isnan(none_fit["runaway_rate"]) and none_fit["runaway_rate_all"] == 1.0


def _score(expected: float, argmax: int) -> SimpleNamespace:
    return SimpleNamespace(expected=expected, argmax=argmax)


def test_curation_keep_rules() -> None:
    from sftflow.augment.pairs import select_pairs

    scores = [_score(4.6, 5), _score(4.4, 4), _score(3.2, 5), _score(float("nan"), 5)]
    keep, why = select_pairs(scores, keep="threshold", threshold=4.0)
    assert keep == [True, True, False, False] and "4.40 >= threshold 4.0" in why[1]
    keep, why = select_pairs(scores, keep="score5", threshold=4.0)
    assert keep == [True, False, True, False] and "rating 4 != 5" in why[1]


def test_auc() -> None:
    from sftflow.stats import auc

    assert auc([3, 4, 5], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4, 5]) == 0.0
    assert auc([2, 2], [2, 2]) == 0.5
    assert auc([3, 1], [2, float("nan")]) == 0.5
    assert math.isnan(auc([], [1.0]))


def test_curator_auc_on_heldout_rows(sftflow_home: Path, tiny) -> None:
    from sftflow.augment.curation import curator_auc

    # The unsuffixed keys are the configured method's (the default, auto, chooses later): rubric's 1-5 scale.
    cfg = AugmentationConfig(curation={"batch_size": 4, "method": "rubric"})
    got = curator_auc(tiny, _records(5), cfg=cfg, training=TrainingConfig())
    assert got["curator_auc_pairs"] == 5 and 0.0 <= got["curator_auc"] <= 1.0
    assert 1.0 <= got["curator_true_mean"] <= 5.0 and 1.0 <= got["curator_mismatched_mean"] <= 5.0
    assert curator_auc(tiny, _records(1), cfg=cfg, training=TrainingConfig()) == {}


def test_side_by_side_metrics_table_has_every_evaluation(sftflow_home: Path) -> None:
    from sftflow.results import EvalResult
    from tasks.promote import metrics_markdown

    samples = write_parquet(pd.DataFrame({"x": [1]}), sftflow_home / "s.parquet", name="s")

    def ev(label: str, rouge: float, end: float) -> EvalResult:
        return EvalResult(label=label, metrics=(("rougeL", rouge), ("end_prob", end), ("runaway_rate", math.nan)),
                          samples=samples)

    md = metrics_markdown(ev("base", 0.15, 1e-9), ev("tuned", 0.25, 0.4), others=[ev("seed_only", 0.2, 0.3)])
    lines = md.splitlines()
    assert lines[0] == "| metric | base | tuned | tuned - base | seed_only |"
    assert "| rougeL | 0.15 | 0.25 | 0.1 | 0.2 |" in lines
    assert "| runaway_rate | - | - | - | - |" in lines

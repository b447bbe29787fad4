"""Serve what was evaluated (issue 24): the tuned model is evaluated with the seed tag (as trained) and
without it (as a served model is prompted); the served default is the way that evaluated better."""

from __future__ import annotations

from pathlib import Path

import pytest

TAG = "Answer in the style of an AI Assistant."


def _rows():
    return [{"messages": [{"role": "system", "content": TAG}, {"role": "user", "content": "Name a colour."},
                          {"role": "assistant", "content": "Blue."}]},
            {"messages": [{"role": "system", "content": TAG + "\n\nBe brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]}]


def test_tag_is_found_and_removed_as_a_user_would_send_it() -> None:
    from sftflow.evaluation.sets import common_system_tag, without_tag

    rows = _rows()
    assert common_system_tag(rows) == TAG
    assert without_tag(rows[0]["messages"][:2], TAG) == [{"role": "user", "content": "Name a colour."}]
    assert without_tag(rows[1]["messages"][:2], TAG)[0] == {"role": "system", "content": "Be brief."}
    untagged = [{"messages": r["messages"][1:]} for r in rows]
    assert common_system_tag(untagged) is None  # nothing to compare: no tag
    assert common_system_tag([rows[0], {"messages": [{"role": "system", "content": "Other."}]}]) is None


@pytest.mark.parametrize("tagged,untagged,way", [
    ({"rougeL": 0.20, "runaway_rate": 0.1}, {"rougeL": 0.25, "runaway_rate": 0.5}, "untagged"),
    ({"rougeL": 0.20, "runaway_rate": 0.1}, {"rougeL": 0.15, "runaway_rate": 0.0}, "tagged"),
    ({"rougeL": 0.20, "runaway_rate": 0.3}, {"rougeL": 0.20, "runaway_rate": 0.1}, "untagged"),
    ({"rougeL": 0.20, "runaway_rate": 0.1}, {"rougeL": 0.20, "runaway_rate": 0.1}, "tagged"),
])
def test_better_way_is_the_higher_rouge_then_fewer_runaways(tagged, untagged, way) -> None:
    from sftflow.evaluation.metrics import better_prompt_way, served_system_prompt

    assert better_prompt_way(tagged=tagged, untagged=untagged) == way
    metrics = {"serve_with_tag": 1.0 if way == "tagged" else 0.0}
    assert served_system_prompt(metrics, TAG) == (TAG if way == "tagged" else None)
    assert served_system_prompt({}, TAG) == TAG  # one way evaluated: the way training prompts


@pytest.mark.parametrize("serve_with_tag", [1.0, 0.0])
def test_served_template_renders_the_better_evaluated_prompt(sftflow_home: Path, serve_with_tag: float) -> None:
    """On the tiny model: a plain request through the served chat template gives exactly the ids the
    better-evaluated way generated from (tagged: the training prompt; untagged: the plain prompt)."""
    from sftflow.evaluation.metrics import served_system_prompt
    from sftflow.inference.formatting import build_generation_prompt, with_default_system
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.tracking.registry import serving_chat_template

    _, tok = load_model(build_tiny_model("tiny-gemma"))
    system = served_system_prompt({"serve_with_tag": serve_with_tag}, TAG)
    tok.chat_template = with_default_system(serving_chat_template(tok, "gemma"), system)
    plain = [{"role": "user", "content": "Name a colour."}]
    served = tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    served_ids = tok(served, add_special_tokens=False)["input_ids"]
    evaluated = [{"role": "system", "content": TAG}, *plain] if serve_with_tag else plain
    assert served_ids == build_generation_prompt(tok, evaluated, template="gemma")
    # A request with its own system turn is rendered as sent.
    own = [{"role": "system", "content": "Be brief."}, *plain]
    ids = tok(tok.apply_chat_template(own, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids == build_generation_prompt(tok, own, template="gemma")


def test_both_ways_pass_on_the_tiny_model(sftflow_home: Path) -> None:
    """The real generation pass without the tag: its metrics, and serve_with_tag agrees with the rule."""
    from sftflow.config_sections import EvaluationConfig
    from sftflow.evaluation.metrics import TAGGED, better_prompt_way, generation_metrics
    from sftflow.evaluation.passes import both_ways, generate_outputs
    from sftflow.evaluation.sets import split_prompt_reference
    from sftflow.inference.batch import ModelHandle
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model

    ref = build_tiny_model("tiny-gemma")
    lm, tok = load_model(ref)
    handle = ModelHandle(ref, loaded=(lm, tok))
    cfg = EvaluationConfig()
    prompts, refs = zip(*(split_prompt_reference(r["messages"]) for r in _rows()))
    ref_len = [len(tok(r)["input_ids"]) for r in refs]
    gens = generate_outputs(handle, list(prompts), template="gemma", cfg=cfg, max_new_tokens=8)
    tagged, _ = generation_metrics(outputs=[g.text for g in gens], references=list(refs),
                                   num_tokens=[g.num_tokens for g in gens], finished=[g.finished for g in gens],
                                   fits=[n <= 8 for n in ref_len])
    out = both_ways(handle, prompts=list(prompts), refs=list(refs), tag=TAG, tagged=tagged, ref_len=ref_len, tools=None,
                    template="gemma", cfg=cfg, max_new_tokens=8)
    assert {"untagged_rougeL", "untagged_runaway_rate", "serve_with_tag", "tagged_minus_untagged_rougeL"} <= set(out)
    untagged = {"rougeL": out["untagged_rougeL"], "runaway_rate": out["untagged_runaway_rate"]}
    assert out["serve_with_tag"] == (1.0 if better_prompt_way(tagged=tagged, untagged=untagged) == TAGGED else 0.0)
    assert out["tagged_minus_untagged_rougeL"] == pytest.approx(tagged["rougeL"] - out["untagged_rougeL"])

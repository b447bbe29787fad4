"""The one leak / near-duplicate rule (sftflow.data.neardup): keys, normalisation, cross-set pairs."""

from __future__ import annotations

import random

import pytest

from sftflow.config_sections import DedupConfig, ExactDedupConfig
from sftflow.data.neardup import (
    CrossPair,
    find_cross_duplicates,
    key_text,
    key_texts,
    leak_key,
    normalize_for_exact,
    strongest_matches,
)
from sftflow.data.records import make_record, records_to_frame


def _rec(q: str, a: str) -> dict:
    return make_record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], source="s:f.json")


def _text(rng: random.Random, n: int) -> str:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
             "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
    return " ".join(rng.choice(words) + str(rng.randrange(50)) for _ in range(n))


def test_key_text_per_key() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    assert key_text(msgs, "prompt") == "Q1\nQ2"
    assert key_text(msgs, "response") == "A1\nA2"
    # A separator no text contains: ("a", "bc") and ("ab", "c") must not collide.
    a = key_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "bc"}], "prompt_response")
    b = key_text([{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}], "prompt_response")
    assert a != b
    with pytest.raises(ValueError, match="unknown key"):
        key_text(msgs, "everything")  # type: ignore[arg-type]
    frame = records_to_frame([_rec("q", "a")])
    assert key_texts(frame, "prompt") == key_texts([_rec("q", "a")], "prompt") == ["q"]


def test_normalize_for_exact_follows_its_switches() -> None:
    assert normalize_for_exact("  Ｈello,   World! ", ExactDedupConfig()) == "hello world"
    assert normalize_for_exact("Hello, World!", ExactDedupConfig(lowercase=False, strip_punctuation=False)) == "Hello, World!"


def test_cross_duplicates_near_and_exact() -> None:
    rng = random.Random(9)
    shared = _text(rng, 40)
    words = shared.split()
    train = records_to_frame([_rec(_text(rng, 40), "a"), _rec(shared, "b"), _rec(_text(rng, 40), "c")])
    held = records_to_frame([_rec(_text(rng, 40), "x"), _rec(" ".join(words[:39] + ["zulu"]), "y")])
    cfg = DedupConfig(near={"key": "prompt", "threshold": 0.7})
    pairs = find_cross_duplicates(held, train, cfg=cfg)
    assert [(p.query, p.match, p.exact) for p in pairs] == [(1, 1, False)]
    assert 0.7 <= pairs[0].similarity < 1.0
    assert find_cross_duplicates(held, train.iloc[0:0], cfg=cfg) == []
    # Too short for 5-gram shingles, still a duplicate when the normalised keys are equal.
    short = find_cross_duplicates([_rec("Hi?", "a"), _rec("other", "b")], [_rec("hi", "c")],
                                  cfg=DedupConfig(near={"key": "prompt"}))
    assert short == [CrossPair(0, 0, 1.0, True)]


def test_key_decides_what_is_compared() -> None:
    same_prompt = [_rec("Name the capital of France please", "Paris.")]
    other_answer = [_rec("Name the capital of France please", "It is Paris, on the Seine, since the Middle Ages.")]
    by_prompt = DedupConfig(near={"key": "prompt"})
    by_both = DedupConfig(near={"key": "prompt_response"})
    # Leaks are judged on the prompt whatever within-set dedup compares ...
    assert leak_key(by_prompt) == leak_key(by_both) == "prompt"
    assert find_cross_duplicates(same_prompt, other_answer, cfg=by_prompt)[0].exact
    assert find_cross_duplicates(same_prompt, other_answer, cfg=by_both)[0].exact
    # ... while an explicit key (backtranslation's seed check) compares what it names.
    assert find_cross_duplicates(same_prompt, other_answer, cfg=by_both, key="prompt_response") == []
    # An explicit key wins; plain strings are taken as key texts.
    assert find_cross_duplicates(same_prompt, other_answer, cfg=by_both, key="prompt")
    assert find_cross_duplicates(["Paris."], same_prompt, cfg=by_both, key="response")[0].exact


def test_leak_checks_ignore_the_dedup_switches() -> None:
    off = DedupConfig(enabled=False, exact={"enabled": False}, near={"enabled": False, "key": "prompt"})
    assert find_cross_duplicates([_rec("What is two plus two?", "4")], [_rec("what is two plus two", "four")], cfg=off)


def test_strongest_match_per_query() -> None:
    pairs = [CrossPair(0, 3, 0.8, False), CrossPair(0, 1, 0.9, False), CrossPair(0, 2, 0.9, False),
             CrossPair(2, 5, 1.0, True)]
    best = strongest_matches(pairs)
    assert best[0] == CrossPair(0, 1, 0.9, False)  # ties: the smaller reference position
    assert best[2].exact and set(best) == {0, 2}

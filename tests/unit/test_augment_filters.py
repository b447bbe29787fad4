"""Backtranslation's filters (``sftflow.augment.filters``), each check alone: what it rejects, the
nearest text it lets through, and the reason/detail it gives. Then the combined filters keep their
order (the first failing check names the row)."""

from __future__ import annotations

import pytest

from sftflow.augment import filters as f
from sftflow.augment.corpus import Segment
from sftflow.config_sections import AugmentationConfig, DedupConfig

SEGMENT = ("Paris is the capital and most populous city of France. Since the 17th century Paris has been one of "
           "the major centres of finance, diplomacy, commerce, culture, fashion and gastronomy.")
PROSE = "Rivers carry water from the hills to the sea and shape the valleys they run through over many years."


def _words(text: str) -> list[str]:
    from sftflow.data.records import normalize_text

    return normalize_text(" ".join(text.split())).split()


# --------------------------------------------------------------------------- segment checks
def test_length_reason_bounds_are_inclusive():
    ten = " ".join(["word"] * 10)
    assert f.length_reason(ten, min_words=10, max_words=10) is None
    assert f.length_reason(ten, min_words=11, max_words=20) == ("too_short", "10 words < min_words 11")
    assert f.length_reason(ten, min_words=1, max_words=9) == ("too_long", "10 words > max_words 9")


@pytest.mark.parametrize("text", ["We use cookies to improve your visit.", "Click here for more.",
                                  "Copyright 2020 The Authors.", "Posted by admin on Monday.",
                                  "Leave a reply below.", "© 2021 Example Corp."])
def test_boilerplate_reason(text):
    why = f.boilerplate_reason(text)
    assert why is not None and why[0] == "boilerplate" and why[1].startswith("matched")


def test_boilerplate_needs_the_phrase_not_a_lookalike():
    assert f.boilerplate_reason(PROSE) is None
    assert f.boilerplate_reason("The logging industry felled the old forests.") is None  # not "log in"
    assert f.boilerplate_reason("The login screen of early terminals was plain text.")[0] == "boilerplate"
    assert f.boilerplate_reason("He wrote a newsletter column.") is not None  # the word itself counts


def test_url_heavy_reason_counts_urls_and_emails():
    assert f.url_heavy_reason("See https://a.example for details.") is None  # one is fine
    assert f.url_heavy_reason("See https://a.example and www.b.example.") == ("url_heavy", "2 URLs/e-mails")
    assert f.url_heavy_reason("Mail ann@x.org or bob@y.org.") == ("url_heavy", "2 URLs/e-mails")


def test_non_prose_reason_at_sixty_percent_letters():
    assert f.non_prose_reason(PROSE) is None
    assert f.non_prose_reason("abc123") == ("non_prose", "letters are 50% of characters")
    assert f.non_prose_reason("abcd12") is None  # 4/6 = 67%
    assert f.non_prose_reason("abc1234") == ("non_prose", "letters are 43% of characters")
    assert f.non_prose_reason("| 1 | 2 | 3 |") == ("non_prose", "letters are 0% of characters")


def test_segment_filter_reason_first_failing_check_wins():
    # Too short and boilerplate: length comes first.
    assert f.segment_filter_reason("Click here", min_words=5, max_words=50)[0] == "too_short"
    assert f.segment_filter_reason(PROSE + " Click here.", min_words=5, max_words=50)[0] == "boilerplate"
    assert f.segment_filter_reason(PROSE, min_words=5, max_words=50) is None


# --------------------------------------------------------------------------- seed duplicates
def test_seed_duplicates_exact_and_near_on_the_response():
    seed = ["The capital of France is Paris, a city known for its museums, art and food and many other things."]
    near = seed[0].replace("many other things", "a great deal more")
    got = f.seed_duplicates([seed[0], near, PROSE], seed, rule=f.seed_duplicate_rule())
    assert set(got) == {0, 1} and got[0].exact and not got[1].exact
    assert got[1].similarity >= f.SEED_DUP_JACCARD


def test_select_segments_reasons_and_order():
    segs = [Segment(id="ok", text=PROSE, source="c"), Segment(id="dup", text=PROSE.upper(), source="c"),
            Segment(id="url", text=PROSE + " https://a.example https://b.example", source="c")]
    cfg = AugmentationConfig(max_segments=10, min_words=5, max_words=60, dedup_against_seed=False)
    accepted, rejected = f.select_segments(segs, seed_responses=[], cfg=cfg, shuffle_seed=0)
    assert [s.id for s in accepted] in (["ok"], ["dup"])  # whichever of the two copies comes first
    reasons = {s.id: r for s, r, _ in rejected}
    assert reasons["url"] == "url_heavy" and "duplicate_segment" in reasons.values()
    assert len(accepted) + len(rejected) == len(segs)  # every segment examined is accounted for


# --------------------------------------------------------------------------- instruction checks
def test_empty_reason():
    assert f.empty_reason("") == ("empty", "empty output")
    assert f.empty_reason("?! 12") == ("empty", "no letters")
    assert f.empty_reason("a") is None


def test_too_short_reason():
    assert f.too_short_reason(_words("Paris?")) == ("too_short", "1 words")
    assert f.too_short_reason(_words("Where is Paris?")) is None


@pytest.mark.parametrize("text,segment,bad", [
    ("What is Paris known for? 𒉊", SEGMENT, True),           # a script the segment does not use
    ("What is a café in Paris?", "A café is a restaurant.", False),  # accented Latin is not noise
    ("Что такое Москва?", "Москва is a city in Russia.", True),  # Cyrillic letters the segment lacks
    ("Where is Москва?", "Москва is a city in Russia.", False),  # ...but the ones it uses are fine
    ("What is Paris \x17 known for?", SEGMENT, True),          # a control character
    ("What is \ufffd Paris?", SEGMENT, True),                   # a replacement character (cut UTF-8)
])
def test_garbled_reason(text, segment, bad):
    why = f.garbled_reason(text, segment)
    assert (why is not None and why[0] == "garbled") is bad, why


@pytest.mark.parametrize("text,detail", [
    ("Why is the sky soooooooooo blue?", "a character repeated 10+ times"),
    ("Is Paris paris paris paris nice in spring?", "a word repeated 4+ times in a row"),
    ("Tell me tell me tell me tell me about Paris", "trigram 'tell me tell' repeated"),
    ("paris paris rome paris rome paris rome rome paris", "distinct words"),
    ("what is paris what is paris what is paris known for", "trigram 'what is paris' repeated"),
])
def test_repetitive_reason(text, detail):
    why = f.repetitive_reason(text, _words(text))
    assert why is not None and why[0] == "repetitive" and detail in why[1], why


def test_repetitive_reason_lets_ordinary_questions_through():
    for text in ("Tell me tell me about Paris.", "What is Paris and what is Rome?", "Is a good good idea?"):
        assert f.repetitive_reason(text, _words(text)) is None, text


def test_copies_segment_reason():
    span = "Paris is the capital and most populous city of France."
    assert f.copies_segment_reason(_words(span), SEGMENT) == ("copies_segment", "the instruction is a span of the segment")
    mostly = "Since the 17th century Paris has been one of the major centres of trade?"
    why = f.copies_segment_reason(_words(mostly), SEGMENT)
    assert why is not None and "word 6-grams from the segment" in why[1]
    assert f.copies_segment_reason(_words("Paris is the capital of France?"), SEGMENT) is None  # < 8 words
    assert f.copies_segment_reason(_words("Why has Paris mattered to finance and fashion for centuries?"), SEGMENT) is None


@pytest.mark.parametrize("text", [
    "This text describes the city of Paris.",             # describes the text
    "Write a short paragraph about Paris.",               # asks for the text itself
    "Summarize the following passage about Paris.",       # a task on a text the user never gave
    "According to the passage, what is Paris known for?",
    "This is a description of Paris and its history.",
    "An overview of the history of Paris.",
    "Here is a paragraph about Paris.",
])
def test_meta_instruction_reason_each_pattern(text):
    why = f.meta_instruction_reason(text)
    assert why is not None and why[0] == "meta_instruction", text


@pytest.mark.parametrize("text", [
    "Write a poem about the river Seine.",                # writing something other than the text: fine
    "What is the capital of France?",
    "Give me an overview of Paris as a centre of fashion.",
    "Translate 'good morning' into French.",
])
def test_meta_instruction_reason_leaves_real_requests(text):
    assert f.meta_instruction_reason(text) is None, text


def test_salvage_instruction():
    assert f.salvage_instruction("What is ballet?What is ballet?junk") == "What is ballet?"
    assert f.salvage_instruction("Describe the city of Paris\nmodel junk") == "Describe the city of Paris"
    assert f.salvage_instruction("Why?What else") is None  # the first question is too short
    assert f.salvage_instruction("no end in sight") is None


def test_instruction_filter_reason_order_and_truncation():
    # Truncated comes right after empty, before everything else; it can be allowed.
    assert f.instruction_filter_reason("Tell me tell me tell me tell me", SEGMENT, finished=False)[0] == "truncated"
    assert f.instruction_filter_reason("Tell me tell me tell me tell me", SEGMENT, finished=False,
                                       reject_truncated=False)[0] == "repetitive"
    assert f.instruction_filter_reason("", SEGMENT, finished=False)[0] == "empty"
    # garbled before repetitive before copies before meta
    assert f.instruction_filter_reason("This text describes 𒉊 Paris.", SEGMENT, finished=True)[0] == "garbled"
    assert f.instruction_filter_reason("What is the capital of France?", SEGMENT, finished=True) is None


def test_seed_duplicate_rule_takes_the_pipeline_dedup_section():
    rule = f.seed_duplicate_rule(DedupConfig(near={"threshold": 0.9, "bands": 4, "rows": 2, "key": "prompt"}))
    assert (rule.near.key, rule.near.threshold, rule.near.ngram, rule.near.bands, rule.near.rows) == \
        ("response", f.SEED_DUP_JACCARD, f.SEED_DUP_NGRAM, None, None)

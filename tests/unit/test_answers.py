"""Final-answer extraction and matching (GSM8K exact-match accuracy) on tricky strings and real rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftflow.data.answers import answers_match, extract_final_answer, format_number

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, want", [
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 1,234", "1234"),                               # thousands separator
    ("Total: 1,234,567 apples", "1234567"),
    ("So she pays $5.", "5"),                             # currency, sentence full stop
    ("He earns 5 dollars", "5"),                          # unit word
    ("It is 50% off", "50"),
    ("The temperature falls to -3 degrees", "-3"),        # negative
    ("The result is −7", "-7"),                           # Unicode minus
    ("10-5 = 5", "5"),                                    # a subtraction is not a negative
    ("x = 8 - 3", "3"),                                   # a spaced minus is an operator, not a sign
    ("It costs $3.50", "3.5"),                            # decimals normalized
    ("#### 5.0", "5"),
    ("about .5 of it", "0.5"),
    ("#### 3/4", "0.75"),                                 # fraction
    ("#### 1/3", "1/3"),                                  # non-terminating fraction kept exact
    ("The answer is 42. Later 7 more came.", "42"),       # 'answer is' beats the last number
    ("Final answer: $1,000.50 in total", "1000.5"),
    ("so \\boxed{12} apples, 3 left", "12"),
    ("She counts 1,2,3", "3"),                            # not a thousands group
    ("Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.", "10"),  # no ####
    ("#### -15", "-15"),
    ("first #### 3\nthen #### 4", "4"),                   # the last marker wins
    ("#### yes", "yes"),                                  # a non-numeric final answer
])
def test_extract_final_answer(text: str, want: str) -> None:
    assert extract_final_answer(text) == want


@pytest.mark.parametrize("text", [None, "", "   ", "no number here", "####"])
def test_no_answer(text) -> None:
    assert extract_final_answer(text) is None


def test_answers_match() -> None:
    assert answers_match("The answer is $3.50.", "3.5")
    assert answers_match("so 1/2 of them", "#### 0.5")
    assert answers_match("It totals 1,200 dollars", "1200")
    assert answers_match("#### -4", "−4")
    assert answers_match("#### Yes", "#### yes")
    assert not answers_match("#### 73", "72")
    assert not answers_match("no idea", "72")
    assert not answers_match("72", None)
    assert not answers_match("-5", "5")


def test_format_number() -> None:
    from fractions import Fraction
    assert [format_number(Fraction(x)) for x in ("72", "-3", "7/2", "3/4", "1/3", "100")] == \
        ["72", "-3", "3.5", "0.75", "1/3", "100"]


def test_every_shipped_gsm8k_row_has_an_answer_matching_its_own_solution() -> None:
    rows = json.loads((ROOT / "data/instruct/gsm8k_alpaca_200.json").read_text())
    assert len(rows) == 200
    answers = [extract_final_answer(r["output"]) for r in rows]
    assert all(a is not None for a in answers)
    assert answers[:3] == ["72", "10", "5"]  # Natalia's clips, Weng's earnings, Betty's wallet
    assert all(answers_match(r["output"] + "\n#### " + a, a) for r, a in zip(rows, answers))

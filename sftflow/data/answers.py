"""Final answers of verifiable tasks (GSM8K-style maths): extract one from a worked solution, compare two.

``extract_final_answer`` looks, in order of trust, for:

1. a ``#### <answer>`` line (GSM8K's marker; the last one wins);
2. ``\\boxed{<answer>}`` (the last one);
3. "the (final) answer is <answer>" / "answer: <answer>" (the last one);
4. otherwise the last number in the text.

Numbers are normalized so equal values compare equal: thousands separators (``1,234``), currency
and units (``$5``, ``5 dollars``, ``50%``), signs (``-3``, ``−3``), decimals (``3.50`` == ``3.5``,
``.5`` == ``0.5``), fractions (``3/4`` == ``0.75``) and integers written as decimals (``5.0`` == ``5``).
A ``####`` line without any number (``#### yes``) gives its text, lower-cased.

Example::

    extract_final_answer("She has 48/2 = 24 left.\\n#### 1,024")  # "1024"
    answers_match("The answer is $3.50.", "3.5")                   # True
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# A number as written in a solution: optional sign (ASCII or Unicode minus) and currency sign,
# digits with optional thousands separators, optional decimals, optional "/denominator".
# The sign counts only when not glued to a preceding word/number ("10-5" is a subtraction).
_NUMBER = re.compile(
    r"(?<![\w.])(?:(?P<sign>[-−])[$€£]?|[$€£]\s?)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:/(?P<den>\d+(?:\.\d+)?))?"
    r"(?![\d])"
)
_HASHES = re.compile(r"####\s*(.*)")
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_ANSWER_IS = re.compile(r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(.*)", re.IGNORECASE)


def _value(m: re.Match[str]) -> Fraction | None:
    """The exact value of one ``_NUMBER`` match (None for a zero denominator)."""
    num = Fraction(Decimal(m.group("num").replace(",", "")))
    if m.group("den") is not None:
        den = Fraction(Decimal(m.group("den")))
        if den == 0:
            return None
        num /= den
    return -num if m.group("sign") else num


def format_number(value: Fraction) -> str:
    """Canonical text of a value: ``72``, ``-3``, ``3.5``, ``0.75``; a non-terminating fraction as ``1/3``."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:  # not a terminating decimal
        return f"{value.numerator}/{value.denominator}"
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _numbers(text: str) -> list[Fraction]:
    out = []
    for m in _NUMBER.finditer(text):
        try:
            v = _value(m)
        except (InvalidOperation, ValueError, ZeroDivisionError):
            continue
        if v is not None:
            out.append(v)
    return out


def _first_number(text: str) -> str | None:
    nums = _numbers(text)
    return format_number(nums[0]) if nums else None


def extract_final_answer(text: str | None) -> str | None:
    """The final answer of a worked solution, normalized (see the module docstring); None when none.

    Args:
        text: a worked solution or a bare answer (``"72"``, ``"$1,200.50"``, ``"... #### 5"``).

    Returns:
        The canonical number text (``"1024"``, ``"3.5"``, ``"-2"``, ``"1/3"``), the lower-cased
        text after ``####`` when it holds no number, or None when the text has no answer at all.
    """
    if not text or not text.strip():
        return None
    marked = _HASHES.findall(text)
    if marked:
        last = marked[-1].strip()
        found = _first_number(last)
        if found is not None:
            return found
        return last.rstrip(".").strip().lower() or None
    boxed = _BOXED.findall(text)
    if boxed:
        found = _first_number(boxed[-1])
        if found is not None:
            return found
    said = list(_ANSWER_IS.finditer(text))
    for m in reversed(said):
        found = _first_number(m.group(1).split("\n", 1)[0])
        if found is not None:
            return found
    nums = _numbers(text)
    return format_number(nums[-1]) if nums else None


def answers_match(pred: str | None, ref: str | None) -> bool:
    """True when a prediction's final answer equals the reference's (exact-match accuracy).

    Both sides go through ``extract_final_answer``, so ``ref`` may be a bare answer (``"72"``) or a
    whole worked solution; numbers compare by value (``"3.50"`` == ``"$3.5"``, ``"1/2"`` == ``"0.5"``).
    A side without an answer never matches.
    """
    a, b = extract_final_answer(pred), extract_final_answer(ref)
    if a is None or b is None:
        return False
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return a == b

"""The filters of backtranslation, each a pure function with its reason in words.

* **Segments** (future responses), before the backward model sees them: ``segment_filter_reason``
  (too short / too long, boilerplate, URL-heavy, non-prose), duplicates inside the corpus and
  (near-)duplicates of a seed response (``seed_duplicates``, the one near-duplicate definition of
  ``sftflow.data.neardup`` on the response); ``select_segments`` applies them in a seeded order
  until ``max_segments`` pass.
* **Generated instructions**: ``salvage_instruction`` (the first question of a generation that ran
  into the token bound) and ``instruction_filter_reason`` (empty, truncated, too short, garbled,
  repetitive, copied from the segment, or a *meta-instruction* that describes the text).

Every rejection is ``(reason, detail)``; the driver (``sftflow.augment.humpback``) writes it to the
candidate table, so no segment disappears without one.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter
from typing import Sequence

from sftflow.augment.corpus import Segment
from sftflow.config_sections import AugmentationConfig, DedupConfig
from sftflow.data.neardup import CrossPair, find_cross_duplicates, strongest_matches
from sftflow.data.records import normalize_text

# (reason, detail), or None when the check passes: what every filter returns.
Problem = tuple[str, str] | None


# --------------------------------------------------------------------------- segments
_BOILERPLATE = re.compile(
    r"cookie|privacy policy|terms of (use|service)|all rights reserved|click here|subscribe|sign up|"
    r"log ?in\b|newsletter|javascript|share on (facebook|twitter)|skip to (main )?content|add to cart|"
    r"free shipping|\bcopyright\b|©|read more\b|posted (by|on)\b|leave a (comment|reply)",
    re.IGNORECASE,
)
_URL = re.compile(r"https?://|www\.|\S+@\S+\.\w+")


def length_reason(text: str, *, min_words: int, max_words: int) -> Problem:
    """``too_short`` / ``too_long``: outside ``[min_words, max_words]`` words."""
    n = len(text.split())
    if n < min_words:
        return "too_short", f"{n} words < min_words {min_words}"
    if n > max_words:
        return "too_long", f"{n} words > max_words {max_words}"
    return None


def boilerplate_reason(text: str) -> Problem:
    """``boilerplate``: web-page furniture (cookies, sign-up, copyright, "read more"...)."""
    m = _BOILERPLATE.search(text)
    return ("boilerplate", f"matched {m.group(0)!r}") if m else None


def url_heavy_reason(text: str) -> Problem:
    """``url_heavy``: two or more URLs / e-mail addresses."""
    urls = len(_URL.findall(text))
    return ("url_heavy", f"{urls} URLs/e-mails") if urls >= 2 else None


def non_prose_reason(text: str) -> Problem:
    """``non_prose``: letters are under 60% of the visible characters (tables, numbers, code)."""
    visible = [c for c in text if not c.isspace()]
    alpha = sum(c.isalpha() for c in visible) / max(1, len(visible))
    return ("non_prose", f"letters are {alpha:.0%} of characters") if alpha < 0.6 else None


def segment_filter_reason(text: str, *, min_words: int, max_words: int) -> Problem:
    """Why a segment is unusable as a response, as (reason, detail); None when it is fine.

    The checks, first failing one wins: length, boilerplate, URL-heavy, non-prose.
    """
    return (length_reason(text, min_words=min_words, max_words=max_words) or boilerplate_reason(text)
            or url_heavy_reason(text) or non_prose_reason(text))


# Seed near-duplicates use the one near-duplicate definition (``sftflow.data.neardup``) on the
# response text (a segment is a future response: the seed's responses are what it must not copy),
# with word 5-grams at Jaccard >= 0.5: stricter than dedup's default 0.8, since a segment that
# shares half its 5-grams with a seed answer would teach that answer back.
SEED_DUP_JACCARD = 0.5
SEED_DUP_NGRAM = 5


def seed_duplicate_rule(dedup: DedupConfig | None = None) -> DedupConfig:
    """The pipeline's ``dedup`` section (default: its defaults) with the seed check's key and threshold.

    Exact normalisation and the MinHash engine settings come from ``dedup``; the key is the
    response, shingles are word 5-grams, the threshold ``SEED_DUP_JACCARD`` (bands/rows are reset
    so LSH is tuned to that threshold).
    """
    dedup = dedup or DedupConfig()
    near = dedup.near.model_copy(update={"key": "response", "shingle": "word", "ngram": SEED_DUP_NGRAM,
                                         "threshold": SEED_DUP_JACCARD, "bands": None, "rows": None})
    return dedup.model_copy(update={"near": near})


def seed_duplicates(texts: Sequence[str], seed_responses: Sequence[str], *, rule: DedupConfig) -> dict[int, CrossPair]:
    """The seed response each text duplicates (its closest one), by position in ``texts``.

    Args:
        texts: candidate responses (segment texts).
        seed_responses: the seed data's responses.
        rule: from ``seed_duplicate_rule``.
    """
    return strongest_matches(find_cross_duplicates(list(texts), list(seed_responses), cfg=rule))


def select_segments(
    segments: Sequence[Segment],
    *,
    seed_responses: Sequence[str],
    cfg: AugmentationConfig,
    shuffle_seed: int,
    dedup: DedupConfig | None = None,
) -> tuple[list[Segment], list[tuple[Segment, str, str]]]:
    """Pick up to ``cfg.max_segments`` usable segments, in a seeded random order.

    Segments are examined in that order until enough have passed the filters; the ones examined
    and rejected come back with (reason, detail). Segments never examined are not counted anywhere.
    They are examined in windows, so the seed check (``seed_duplicates``) runs once per window
    rather than once per segment, and a large corpus is not checked past what is needed.

    Args:
        segments: the corpus segments, in file order.
        seed_responses: the seed data's responses (``cfg.dedup_against_seed`` rejects their near-duplicates).
        cfg: the ``augmentation`` section.
        shuffle_seed: seeds the examination order.
        dedup: the pipeline's ``dedup`` section, for the seed check's normalisation and engine
            settings (``seed_duplicate_rule``; default: its defaults).

    Returns:
        (accepted segments, [(rejected segment, reason, detail), ...]).
    """
    order = list(range(len(segments)))
    random.Random(shuffle_seed).shuffle(order)
    rule = seed_duplicate_rule(dedup) if cfg.dedup_against_seed else None
    window = max(256, 4 * cfg.max_segments)
    seen: dict[str, str] = {}
    accepted: list[Segment] = []
    rejected: list[tuple[Segment, str, str]] = []
    for start in range(0, len(order), window):
        if len(accepted) >= cfg.max_segments:
            break
        chunk = [segments[i] for i in order[start:start + window]]
        reasons: list[tuple[str, str] | None] = []
        for seg in chunk:
            why = segment_filter_reason(seg.text, min_words=cfg.min_words, max_words=cfg.max_words)
            if why is None:
                key = normalize_text(seg.text)
                if key in seen:
                    why = ("duplicate_segment", f"same text as segment {seen[key]!r}")
                else:
                    seen[key] = seg.id
            reasons.append(why)
        if rule is not None:
            todo = [k for k, why in enumerate(reasons) if why is None]
            for pos, pair in seed_duplicates([chunk[k].text for k in todo], seed_responses, rule=rule).items():
                reasons[todo[pos]] = ("seed_duplicate", "exact copy of a seed response" if pair.exact else
                                      f"word {SEED_DUP_NGRAM}-gram Jaccard {pair.similarity:.2f} with a seed response")
        # Segments past the one that fills max_segments were never examined: they count nowhere.
        for seg, why in zip(chunk, reasons):
            if len(accepted) >= cfg.max_segments:
                break
            if why is None:
                accepted.append(seg)
            else:
                rejected.append((seg, why[0], why[1]))
    return accepted, rejected


# --------------------------------------------------------------------------- generated instructions
_META = [
    # "This text describes ...", "The passage is about ..."
    re.compile(r"^\W*(this|the|that|above|following|given)\s+(\w+\s+)?(text|passage|article|paragraph|excerpt|"
               r"document|section|piece|essay|entry|page|content|summary)\s+(is|was|describes|discusses|explains|"
               r"talks|presents|provides|gives|covers|introduces|tells|outlines|contains|mentions|focuses|deals)\b",
               re.IGNORECASE),
    # "Write a (short) paragraph about X": asks for the text itself rather than something it answers.
    re.compile(r"\b(write|compose|create|generate|produce|draft)\s+(a|an|one|the)?\s*([\w-]+\s+){0,2}?"
               r"(paragraph|passage|text|article|summary|description|biography|entry|blurb|introduction|"
               r"overview|lead)s?\s+(about|on|of|describing|that describes|explaining|for)\b", re.IGNORECASE),
    # "Summarize the following text", "Rewrite this paragraph"
    re.compile(r"^\W*(please\s+)?(summari[sz]e|paraphrase|rewrite|rephrase|translate|proofread|edit|shorten|"
               r"simplify|continue)\s+(the|this|that|following|above|given)\s+(\w+\s+)?(text|passage|article|"
               r"paragraph|excerpt|document|sentence)", re.IGNORECASE),
    # "According to the passage, ..." (the user never gave a passage: the segment is the answer)
    re.compile(r"\b(in|from|according to|based on|using)\s+(the|this|that)\s+(above\s+|following\s+|given\s+|"
               r"provided\s+)?(text|passage|article|paragraph|excerpt|document)\b", re.IGNORECASE),
    # "This is a description of ...", "A summary of ...", "Here is a paragraph about ..."
    re.compile(r"^\W*(this|it)\s+(is|was)\s+(a|an|the)\s+(\w+\s+)?(description|summary|text|passage|article|"
               r"paragraph|biography|overview|excerpt|definition|introduction)\b", re.IGNORECASE),
    re.compile(r"^\W*(a|an)\s+(\w+\s+)?(description|summary|overview|paragraph|passage|article|biography|"
               r"introduction)\s+(of|about|on)\b", re.IGNORECASE),
    re.compile(r"^\W*(here\s+is|here's|below\s+is|the\s+following\s+is)\b", re.IGNORECASE),
]


def salvage_instruction(text: str) -> str | None:
    """The first question or line of a generation that ran into the token bound, or None.

    A briefly trained backward model often writes a good first question and then fails to emit
    its end-of-turn ("What is ballet?What is ballet?<junk>..."). Its first question (or first
    line) is the instruction it meant; anything shorter than 3 words is not worth keeping.
    """
    m = re.search(r"\?|\n", text)
    if not m:
        return None
    cut = text[: m.end()].strip()
    return cut if len(cut.split()) >= 3 else None


def _foreign_letters(instruction: str, segment: str) -> list[str]:
    """Decoding noise: letters of a script (beyond Latin/IPA) that the segment does not use,
    replacement characters (a token cut inside a UTF-8 sequence) and control characters."""
    seg = set(segment)
    return [c for c in instruction
            if (ord(c) >= 0x0250 and c.isalpha() and c not in seg) or c == "\ufffd"
            or (unicodedata.category(c) == "Cc" and c not in "\n\t")]


def empty_reason(text: str) -> Problem:
    """``empty``: no letter at all."""
    if not any(c.isalpha() for c in text):
        return "empty", "no letters" if text else "empty output"
    return None


def too_short_reason(words: Sequence[str]) -> Problem:
    """``too_short``: fewer than 3 (normalised) words."""
    return ("too_short", f"{len(words)} words") if len(words) < 3 else None


def garbled_reason(text: str, segment: str) -> Problem:
    """``garbled``: letters of a script the segment does not use, replacement or control characters."""
    foreign = _foreign_letters(text, segment)
    if foreign:
        return "garbled", f"{len(foreign)} letters of a script the segment does not use, e.g. {foreign[0]!r}"
    return None


def repetitive_reason(text: str, words: Sequence[str]) -> Problem:
    """``repetitive``: a character 10+ times, a word 4+ times in a row, few distinct words, or a trigram 3+ times."""
    if re.search(r"(.)\1{9,}", text):
        return "repetitive", "a character repeated 10+ times"
    if re.search(r"\b(\w+)(\W+\1\b){3,}", text, re.IGNORECASE):
        return "repetitive", "a word repeated 4+ times in a row"
    if len(words) >= 8 and len(set(words)) / len(words) < 0.4:
        return "repetitive", f"{len(set(words))}/{len(words)} distinct words"
    trigrams = Counter(zip(words, words[1:], words[2:]))
    if trigrams and trigrams.most_common(1)[0][1] >= 3:
        return "repetitive", f"trigram {' '.join(trigrams.most_common(1)[0][0])!r} repeated"
    return None


def copies_segment_reason(words: Sequence[str], segment: str) -> Problem:
    """``copies_segment``: an instruction of 8+ words that is a span of the segment, or shares more
    than half its word 6-grams with it (the answer copied into the question)."""
    if len(words) < 8:
        return None
    norm_instr, norm_seg = " ".join(words), normalize_text(segment)
    if norm_instr in norm_seg:
        return "copies_segment", "the instruction is a span of the segment"
    six = {tuple(words[i:i + 6]) for i in range(len(words) - 5)}
    seg_words = norm_seg.split()
    seg_six = {tuple(seg_words[i:i + 6]) for i in range(len(seg_words) - 5)}
    if six and len(six & seg_six) / len(six) > 0.5:
        return "copies_segment", f"{len(six & seg_six)}/{len(six)} word 6-grams from the segment"
    return None


def meta_instruction_reason(text: str) -> Problem:
    """``meta_instruction``: the instruction describes the text or asks for it (``_META``) instead of
    asking something the segment answers."""
    for pattern in _META:
        m = pattern.search(text)
        if m:
            return "meta_instruction", f"matched {m.group(0).strip()!r}"
    return None


def instruction_filter_reason(instruction: str, segment: str, *, finished: bool, reject_truncated: bool = True
                              ) -> Problem:
    """Why a generated instruction is unusable, as (reason, detail); None when it passes.

    The checks, first failing one wins: ``empty``, ``truncated`` (hit the token bound without an
    end-of-turn, nothing to salvage; only with ``reject_truncated``), ``too_short``, ``garbled``
    (decoding noise), ``repetitive``, ``copies_segment``, ``meta_instruction``.
    """
    text = " ".join(instruction.split())
    why = empty_reason(text)
    if why is None and not finished and reject_truncated:
        why = "truncated", "hit max_new_tokens without an end-of-turn"
    if why is not None:
        return why
    words = normalize_text(text).split()
    return (too_short_reason(words) or garbled_reason(text, segment) or repetitive_reason(text, words)
            or copies_segment_reason(words, segment) or meta_instruction_reason(text))

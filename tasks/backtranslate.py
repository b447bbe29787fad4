"""Instruction backtranslation (Humpback; Li et al. 2023, "Self-Alignment with Instruction Backtranslation").

Reads top to bottom as the method:

1. **Corpus.** Load the unlabeled corpus (``wikipedia_leads`` JSON object title -> {extract, ...},
   ``jsonl_text`` with a text field, or ``text_lines``), cut documents into segments of at most
   ``max_words`` words (paragraphs, then sentences), and pre-filter them: too short / too long,
   boilerplate, URL-heavy or non-prose text, duplicates inside the corpus and (near-)duplicates of a
   seed response. Every rejected segment keeps its reason.
2. **Backward model M_yx.** Reverse the seed data (the response becomes the user turn, the
   instruction the assistant turn) and fine-tune the base model on it with the shared training recipe
   (``sftflow.training.loop.train``; ``augmentation.backward_training`` overrides ``training``).
3. **Self-augmentation.** M_yx writes one candidate instruction per segment, batched with the KV
   cache (``sftflow.inference.generation.generate_batch``; temperature/top-p from config, tokens bounded),
   through ``sftflow.inference.batch.generate_texts``: in this process, or with ``execution.engine: ray``
   over Ray Data actors (one model each; vLLM on GPU per ``execution.generation_backend``).
   A generation that ran into the token bound keeps its first question/line when it has one
   (``salvage_instruction``). Candidates that are empty, cut off with nothing to salvage,
   garbled, repetitive, copied from the segment, or
   *meta-instructions* (describing the text, "write a paragraph about X", "according to the
   passage ...") are rejected with the reason.
4. **Self-curation.** A curation model (``curation.model``: ``forward`` = M0 trained on the seed
   data, ``base``, or a model name/path) rates each remaining (instruction, segment) pair 1-5 from
   the next-token distribution after ``Score:`` (``sftflow.inference.generation.score_pairs``: one forward
   pass; through ``sftflow.inference.batch.score_texts``, local or Ray Data actors); pairs whose
   expected score >= ``curation.threshold`` are kept. The share of ratings the model did not expect
   (little probability on "1".."5") is logged as ``bt_unparseable_scores``.
5. **Iteration** (``iterations`` > 1): train M_k on tagged seed + curated pairs and rescore.
6. **Tagging.** Curated pairs carry ``augmented_system_prompt`` as a system turn and
   ``origin=backtranslated``; the seed gets ``seed_system_prompt`` (``tag_seed``), so the final
   model can be steered at inference time.

Accounting, checked before anything is returned::

    segments examined = segments filtered + candidates generated
    candidates generated = instructions rejected + pairs scored
    pairs scored = kept + below threshold

Every segment examined (text, candidate instruction, score distribution, status, reason) is one row
of ``candidates.parquet``. ``backtranslate`` only computes and writes files; ``backtranslate_task``
logs it to MLflow with a score histogram (and each trained model in its own nested run), and a
Prefect table artifact shows the best and worst pairs.

Run it alone (the flow does this through ``backtranslate_task``)::

    from tasks.backtranslate import backtranslate
    out = backtranslate(seed=train_ref, base=base_ref, cfg=cfg.augmentation, training=cfg.training,
                        out_dir=Path(".../backtranslate"))
"""

from __future__ import annotations

import glob
import json
import math
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pandas as pd
from prefect import task

from sftflow import layout
from sftflow.config import AugmentationConfig, ConfigError, CorpusConfig, DedupConfig, TrainingConfig
from sftflow.ops.console import progress_callback
from sftflow.ops.orchestration import markdown_with_image, stage_cache_policy, table_artifact
from sftflow.markers import write_marker
from sftflow.data.records import (
    AccountingError,
    frame_to_records,
    make_record,
    normalize_text,
    records_to_frame,
    response_text,
)
from sftflow.inference.generation import RATING_MASS_FLOOR, unparseable_share
from sftflow.inference.batch import ModelHandle, generate_texts, score_texts
from sftflow.data.neardup import CrossPair, find_cross_duplicates, strongest_matches
from sftflow.data.refs import DatasetRef, ModelRef, write_parquet
from sftflow.data.tags import tag_dataset, tag_records  # noqa: F401  (tag_records: re-exported for callers)
from sftflow.tracking.runs import StageContext, log_dataset, log_json, stage_run
from sftflow.results import AugmentResult

if TYPE_CHECKING:  # torch-heavy: imported where a model is trained
    from sftflow.training.export import TrainOutput

STAGE = "backtranslate"

# Candidate statuses (one per row of candidates.parquet).
FILTERED = "filtered_segment"  # the segment never reached the backward model
REJECTED = "rejected_instruction"  # the generated instruction failed a filter
BELOW = "below_threshold"  # scored, expected score < threshold
KEPT = "kept"  # scored, expected score >= threshold
STATUSES = (FILTERED, REJECTED, BELOW, KEPT)

CANDIDATE_COLUMNS = (
    "segment_id", "source", "segment", "num_words", "instruction", "num_tokens", "finished",
    "probs", "expected", "argmax", "mass", "status", "reason", "detail",
)


# =========================================================================== results
@dataclass(frozen=True)
class HelperModel:
    """A model the stage fine-tuned (M_yx, M0, M_k), kept so the task can log it in its own run.

    Attributes:
        run_name: the nested MLflow run it belongs in (``backtranslate.backward`` ...).
        data: what it was trained on.
        cfg: the training settings it was trained with.
        output: what training produced (model, metrics, loss curve, training folder).
    """

    run_name: str
    data: DatasetRef
    cfg: TrainingConfig
    output: TrainOutput


@dataclass(frozen=True)
class AugmentOutput:
    """What ``backtranslate`` produced.

    Attributes:
        curated: kept pairs as canonical records (``origin=backtranslated``, tagged).
        candidates: every segment examined with its instruction, scores, status and reason.
        seed: the seed data tagged with ``seed_system_prompt``.
        reversed: the backward model's training data (response -> instruction).
        backward_model: the backward model M_yx.
        curation_model: the model that gave the final scores (M0, base, a named model, or M_k).
        counts: the accounting, as sorted (name, value) pairs.
        iteration_kept: pairs kept after each curation iteration.
        helpers: every model trained here, in training order (for the task to log).
        heldout: the held-out set tagged like the seed (evaluation prompts = training prompts), or None.
        quality: curator and backward-model quality figures (``curator_auc``, ``backward_finished_rate``...).
    """

    curated: DatasetRef
    candidates: DatasetRef
    seed: DatasetRef
    reversed: DatasetRef
    backward_model: ModelRef
    curation_model: ModelRef
    counts: tuple[tuple[str, int], ...]
    iteration_kept: tuple[int, ...]
    helpers: tuple[HelperModel, ...] = ()
    heldout: DatasetRef | None = None
    quality: tuple[tuple[str, float], ...] = ()


# =========================================================================== 1. corpus
@dataclass(frozen=True)
class Segment:
    """One unlabeled text segment: a future response."""

    id: str
    text: str
    source: str

    @property
    def num_words(self) -> int:
        return len(self.text.split())


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_PARAGRAPHS = re.compile(r"\n\s*\n|\n")


def detect_format(path: Path) -> str:
    """``wikipedia_leads`` for ``.json``, ``jsonl_text`` for ``.jsonl``, else ``text_lines``."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "wikipedia_leads"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl_text"
    return "text_lines"


def _corpus_files(path: str) -> list[Path]:
    if any(ch in path for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(path))]
    else:
        files = [Path(path)]
    missing = [str(p) for p in files if not p.is_file()]
    if not files or missing:
        raise FileNotFoundError(f"augmentation.corpus.path: file not found: {missing[0] if missing else path}")
    return files


def _documents(path: Path, fmt: str, text_field: str) -> Iterable[tuple[str, str]]:
    """(document id, text) pairs of one corpus file; bad rows are errors naming file and row."""
    if fmt == "wikipedia_leads":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: format wikipedia_leads expects a JSON object title -> {{extract, ...}}, "
                             f"got {type(data).__name__}")
        for title, entry in data.items():
            if isinstance(entry, dict):
                text = entry.get("extract")
            else:
                text = entry if isinstance(entry, str) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}: entry {title!r} has no string `extract`")
            yield str(title), text
    elif fmt == "jsonl_text":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise ValueError(f"{path}:{n}: no string field {text_field!r} "
                                     f"(set augmentation.corpus.text_field)")
                yield f"{path.name}:{n}", row[text_field]
    elif fmt == "text_lines":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    yield f"{path.name}:{n}", line
    else:
        raise ValueError(f"augmentation.corpus.format: unknown format {fmt!r}")


def split_into_segments(text: str, *, max_words: int) -> list[str]:
    """Cut a document into segments of at most ``max_words`` words.

    Paragraphs are packed together while they fit; a paragraph that is too long on its own is cut
    at sentence ends (a single sentence longer than ``max_words`` stays whole and is later
    filtered as too long, rather than being cut mid-sentence).
    """
    units: list[str] = []
    for para in _PARAGRAPHS.split(text):
        para = " ".join(para.split())
        if not para:
            continue
        if len(para.split()) <= max_words:
            units.append(para)
        else:
            units.extend(s for s in _SENTENCE_END.split(para) if s.strip())
    segments: list[str] = []
    current: list[str] = []
    count = 0
    for unit in units:
        n = len(unit.split())
        if current and count + n > max_words:
            segments.append(" ".join(current))
            current, count = [], 0
        current.append(unit)
        count += n
    if current:
        segments.append(" ".join(current))
    return segments


def load_corpus(corpus: CorpusConfig, *, max_words: int) -> list[Segment]:
    """Every segment of the corpus, in file order.

    Raises:
        FileNotFoundError: the corpus path matches no file.
        ValueError: a malformed file or row (the message names the file and row).
    """
    segments: list[Segment] = []
    for path in _corpus_files(corpus.path):
        fmt = detect_format(path) if corpus.format == "auto" else corpus.format
        source = f"{corpus.name}:{path.name}"
        for doc_id, text in _documents(path, fmt, corpus.text_field):
            pieces = split_into_segments(text, max_words=max_words)
            for k, piece in enumerate(pieces):
                seg_id = doc_id if len(pieces) == 1 else f"{doc_id}#{k}"
                segments.append(Segment(id=seg_id, text=piece, source=source))
    return segments


# --------------------------------------------------------------------------- segment filters
_BOILERPLATE = re.compile(
    r"cookie|privacy policy|terms of (use|service)|all rights reserved|click here|subscribe|sign up|"
    r"log ?in\b|newsletter|javascript|share on (facebook|twitter)|skip to (main )?content|add to cart|"
    r"free shipping|\bcopyright\b|©|read more\b|posted (by|on)\b|leave a (comment|reply)",
    re.IGNORECASE,
)
_URL = re.compile(r"https?://|www\.|\S+@\S+\.\w+")


def segment_filter_reason(text: str, *, min_words: int, max_words: int) -> tuple[str, str] | None:
    """Why a segment is unusable as a response, as (reason, detail); None when it is fine."""
    n = len(text.split())
    if n < min_words:
        return "too_short", f"{n} words < min_words {min_words}"
    if n > max_words:
        return "too_long", f"{n} words > max_words {max_words}"
    m = _BOILERPLATE.search(text)
    if m:
        return "boilerplate", f"matched {m.group(0)!r}"
    urls = len(_URL.findall(text))
    if urls >= 2:
        return "url_heavy", f"{urls} URLs/e-mails"
    visible = [c for c in text if not c.isspace()]
    alpha = sum(c.isalpha() for c in visible) / max(1, len(visible))
    if alpha < 0.6:
        return "non_prose", f"letters are {alpha:.0%} of characters"
    return None


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


# =========================================================================== 2. backward model
def reverse_records(records: Iterable[dict[str, Any]], *, max_response_words: int | None = None
                    ) -> list[dict[str, Any]]:
    """The backward model's training data: the response as the user turn, the instruction as the answer.

    Uses the first user turn and the first assistant turn of each seed record (Humpback works on
    single-turn pairs); system turns are dropped, since the backward model sees only the text.
    Records without both turns are skipped.

    Args:
        records: canonical seed records.
        max_response_words: cut responses to their first this-many words. Training truncates
            from the right, so an over-long response would otherwise push the instruction (the
            only learned part) out of ``max_seq_len``; the backward model also only ever sees
            segments of at most ``max_words`` words.
    """
    out = []
    for r in records:
        user = next((m["content"] for m in r["messages"] if m["role"] == "user"), "")
        assistant = next((m["content"] for m in r["messages"] if m["role"] == "assistant"), "")
        if not user.strip() or not assistant.strip():
            continue
        if max_response_words is not None and len(assistant.split()) > max_response_words:
            assistant = " ".join(assistant.split()[:max_response_words])
        out.append(make_record(
            [{"role": "user", "content": assistant}, {"role": "assistant", "content": user}],
            source=r.get("source", "seed"), origin="seed", category=r.get("category", "") or "",
        ))
    return out


def training_with_overrides(training: TrainingConfig, overrides: dict[str, Any], *, key: str) -> TrainingConfig:
    """``training`` with ``overrides`` merged in (nested dicts merge), validated; ``merge`` defaults to False.

    Raises:
        ConfigError: naming ``augmentation.<key>.<field>`` for an unknown key or a bad value.
    """
    from pydantic import ValidationError

    from sftflow.config import _format_errors

    def merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in upd.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    # Helper models are used in memory and logged as adapters: no merged copy of the base
    # weights on disk unless the override asks for one.
    try:
        return TrainingConfig.model_validate(merge(training.model_dump(), {"merge": False, **dict(overrides)}))
    except ValidationError as e:
        raise ConfigError(_format_errors(e, f"augmentation.{key}")) from None


# =========================================================================== 3. candidate filters
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


def instruction_filter_reason(instruction: str, segment: str, *, finished: bool, reject_truncated: bool = True
                              ) -> tuple[str, str] | None:
    """Why a generated instruction is unusable, as (reason, detail); None when it passes.

    Reasons: ``empty``, ``truncated`` (hit the token bound without an end-of-turn, nothing to
    salvage), ``too_short``, ``garbled`` (letters of a script the segment does not use: decoding
    noise), ``repetitive``, ``copies_segment``, ``meta_instruction``.
    """
    text = " ".join(instruction.split())
    if not any(c.isalpha() for c in text):
        return "empty", "no letters" if text else "empty output"
    if not finished and reject_truncated:
        return "truncated", "hit max_new_tokens without an end-of-turn"
    words = normalize_text(text).split()
    if len(words) < 3:
        return "too_short", f"{len(words)} words"
    foreign = _foreign_letters(text, segment)
    if foreign:
        return "garbled", f"{len(foreign)} letters of a script the segment does not use, e.g. {foreign[0]!r}"
    if re.search(r"(.)\1{9,}", text):
        return "repetitive", "a character repeated 10+ times"
    if re.search(r"\b(\w+)(\W+\1\b){3,}", text, re.IGNORECASE):
        return "repetitive", "a word repeated 4+ times in a row"
    if len(words) >= 8 and len(set(words)) / len(words) < 0.4:
        return "repetitive", f"{len(set(words))}/{len(words)} distinct words"
    trigrams = Counter(zip(words, words[1:], words[2:]))
    if trigrams and trigrams.most_common(1)[0][1] >= 3:
        return "repetitive", f"trigram {' '.join(trigrams.most_common(1)[0][0])!r} repeated"
    norm_instr, norm_seg = " ".join(words), normalize_text(segment)
    if len(words) >= 8 and norm_instr in norm_seg:
        return "copies_segment", "the instruction is a span of the segment"
    if len(words) >= 8:
        six = {tuple(words[i:i + 6]) for i in range(len(words) - 5)}
        seg_words = norm_seg.split()
        seg_six = {tuple(seg_words[i:i + 6]) for i in range(len(seg_words) - 5)}
        if six and len(six & seg_six) / len(six) > 0.5:
            return "copies_segment", f"{len(six & seg_six)}/{len(six)} word 6-grams from the segment"
    for pattern in _META:
        m = pattern.search(text)
        if m:
            return "meta_instruction", f"matched {m.group(0).strip()!r}"
    return None


# =========================================================================== 4/5. curation
def select_by_threshold(expected: Sequence[float], threshold: float) -> list[bool]:
    """Keep a pair when its expected score is >= threshold (NaN never passes)."""
    return [not math.isnan(e) and e >= threshold for e in expected]


def select_pairs(scores: Sequence[Any], *, keep: str, threshold: float) -> tuple[list[bool], list[str]]:
    """The keep decision for each scored pair under ``curation.keep``, with the reason in words.

    ``threshold`` keeps an expected score >= ``threshold``; ``score5`` is the Humpback paper's rule:
    keep only pairs the curator rates 5 (its most likely rating is 5). NaN scores never pass.

    Returns:
        (keep flags, detail strings), one per score.
    """
    if keep == "score5":
        flags = [not math.isnan(s.expected) and int(s.argmax) == 5 for s in scores]
        details = [f"most likely rating {int(s.argmax)} {'==' if k else '!='} 5 (expected {s.expected:.2f})"
                   for s, k in zip(scores, flags)]
        return flags, details
    flags = select_by_threshold([s.expected for s in scores], threshold)
    details = [f"expected {s.expected:.2f} {'>=' if k else '<'} threshold {threshold}" for s, k in zip(scores, flags)]
    return flags, details


# =========================================================================== 6. tagging
def tag_seed(ref: DatasetRef, system_prompt: str | None, out_path: Path) -> DatasetRef:
    """Write the seed dataset with ``system_prompt`` as its system turn and ``origin=seed``.

    Args:
        ref: the seed (train split) dataset.
        system_prompt: the seed tag (``augmentation.seed_system_prompt``); None copies the rows as is.
        out_path: the Parquet file to write.

    Returns:
        The tagged dataset.
    """
    return tag_dataset(ref, system_prompt, out_path, name="seed_tagged", origin="seed")


def curated_records(rows: Iterable[dict[str, Any]], *, system_prompt: str | None) -> list[dict[str, Any]]:
    """Kept candidates as canonical records: (system tag,) user = instruction, assistant = segment."""
    out = []
    for r in rows:
        msgs = [{"role": "user", "content": r["instruction"].strip()}, {"role": "assistant", "content": r["segment"]}]
        if system_prompt:
            msgs.insert(0, {"role": "system", "content": system_prompt})
        out.append(make_record(msgs, source=r["source"], origin="backtranslated", score=float(r["expected"])))
    return out


# =========================================================================== accounting
def accounting(candidates: pd.DataFrame) -> dict[str, int]:
    """Counts of the candidate table, checking that no row disappeared.

    Raises:
        AccountingError: a status outside ``STATUSES`` or a broken identity (a bug, never bad data).
    """
    status = candidates["status"].value_counts().to_dict() if len(candidates) else {}
    unknown = set(status) - set(STATUSES)
    if unknown:
        raise AccountingError(f"backtranslate accounting: unknown candidate statuses {sorted(unknown)}")
    c = {
        "segments_in": len(candidates),
        "segments_filtered": int(status.get(FILTERED, 0)),
        "generated": int(status.get(REJECTED, 0) + status.get(BELOW, 0) + status.get(KEPT, 0)),
        "rejected": int(status.get(REJECTED, 0)),
        "scored": int(status.get(BELOW, 0) + status.get(KEPT, 0)),
        "kept": int(status.get(KEPT, 0)),
        "below_threshold": int(status.get(BELOW, 0)),
    }
    # The identities of the module docstring (they cannot fail unless a status was lost). Raised,
    # not asserted: the check must also run under `python -O`.
    for total, parts in (("segments_in", ("segments_filtered", "generated")), ("generated", ("rejected", "scored")),
                         ("scored", ("kept", "below_threshold"))):
        if c[total] != sum(c[p] for p in parts):
            raise AccountingError(f"backtranslate accounting broken: {total} {c[total]} != "
                                  + " + ".join(f"{p} {c[p]}" for p in parts) + f" ({c})")
    return c


# =========================================================================== the stage
def _train_model(*, run_name: str, data: DatasetRef, base: ModelRef, cfg: TrainingConfig, out_dir: Path,
                 trust_remote_code: bool) -> HelperModel:
    """Fine-tune a helper model with the shared training recipe (no MLflow: the task logs it)."""
    from sftflow.training.loop import train

    output = train(train=data, heldout=None, base=base, cfg=cfg, out_dir=out_dir, trust_remote_code=trust_remote_code)
    return HelperModel(run_name=run_name, data=data, cfg=cfg, output=output)


def _score(ref: ModelRef, rows: list[dict[str, Any]], *, cfg: AugmentationConfig, training: TrainingConfig,
           trust_remote_code: bool) -> list[Any]:
    # In this process, or over Ray Data actors (one model each) with execution.engine=ray.
    pairs = [(r["instruction"], r["segment"]) for r in rows]
    return score_texts(ref, pairs, template=training.template, batch_size=cfg.curation.batch_size,
                       dtype=cfg.generation.dtype, trust_remote_code=trust_remote_code,
                       on_progress=progress_callback(f"{STAGE} score"))


def backtranslate(
    *,
    seed: DatasetRef,
    base: ModelRef,
    cfg: AugmentationConfig,
    training: TrainingConfig,
    out_dir: Path,
    trust_remote_code: bool = False,
    dedup: DedupConfig | None = None,
    heldout: DatasetRef | None = None,
) -> AugmentOutput:
    """Run instruction backtranslation end to end (see the module docstring).

    Args:
        seed: the seed instruction data (canonical records; the clean train split).
        base: the base model the backward and curation models are fine-tuned from.
        cfg: the ``augmentation`` section (needs ``corpus``).
        training: the ``training`` section (backward/forward overrides apply on top of it).
        out_dir: the stage folder; every file and model goes below it.
        trust_remote_code: passed to model loading.
        dedup: the pipeline's ``dedup`` section, for the seed near-duplicate check
            (``seed_duplicate_rule``; None: its defaults).
        heldout: the held-out split. It comes back tagged with ``seed_system_prompt`` (the
            paper's inference prompt, and the tag the seed trains with) so that evaluation and
            training's eval loss see the prompts training saw; its first ``curation.auc_examples``
            rows also check the curator (``curator_auc``).

    Returns:
        The refs and counts (``AugmentOutput``), and the models it trained (``helpers``). Nothing
        is logged to MLflow here: ``backtranslate_task`` logs the stage and each helper model.

    Raises:
        ConfigError: no corpus, or a bad training override (naming its key path).
        ValueError: a malformed corpus file (naming file and row) or an empty seed.
    """
    from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids

    if cfg.corpus is None:
        raise ConfigError("augmentation.corpus: required to backtranslate")
    out_dir = layout.ensure(Path(out_dir))
    backward_cfg = training_with_overrides(training, cfg.backward_training, key="backward_training")
    forward_cfg = training_with_overrides(training, cfg.forward_training, key="forward_training")

    seed_records = frame_to_records(seed.read())
    if not seed_records:
        raise ValueError(f"seed dataset {seed.path} is empty: nothing to learn a backward model from")

    # 1. corpus -> filtered segments
    segments = load_corpus(cfg.corpus, max_words=cfg.max_words)
    accepted, filtered = select_segments(
        segments, seed_responses=[response_text(r["messages"]) for r in seed_records], cfg=cfg,
        shuffle_seed=cfg.generation.seed, dedup=dedup,
    )
    rows: list[dict[str, Any]] = [
        _row(seg, status=FILTERED, reason=reason, detail=detail) for seg, reason, detail in filtered
    ]

    # 2. backward model M_yx on reversed seed data
    # Responses are cut to fit: at most max_words (what M_yx sees at inference) and about half the
    # training context (~1.3 tokens a word), leaving room for the template and the instruction.
    words_cap = min(cfg.max_words, max(16, backward_cfg.max_seq_len // 2))
    reversed_ref = write_parquet(records_to_frame(reverse_records(seed_records, max_response_words=words_cap)),
                                 out_dir / "reversed.parquet", name="reversed_seed")
    helpers = [_train_model(run_name=f"{STAGE}.backward", data=reversed_ref, base=base, cfg=backward_cfg,
                            out_dir=out_dir / "backward", trust_remote_code=trust_remote_code)]
    backward = helpers[0].output.model

    # 3. self-augmentation: one candidate instruction per segment, batched
    generated: list[dict[str, Any]] = []
    if accepted:
        # The local engine loads M_yx here; execution.engine=ray loads only its tokenizer here and
        # the model once per Ray Data actor (vLLM where execution.generation_backend selects it).
        backward_model = ModelHandle(backward, dtype=cfg.generation.dtype, trust_remote_code=trust_remote_code)
        tok = backward_model.tokenizer
        template = resolve_template(tok, backward_cfg.template)
        prompts = [build_generation_prompt(tok, [{"role": "user", "content": s.text}], template=template)
                   for s in accepted]
        g = cfg.generation
        try:
            outs = generate_texts(backward_model, prompts, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                                  top_p=g.top_p, batch_size=g.batch_size, stop_ids=stop_token_ids(tok, template),
                                  seed=g.seed, on_progress=progress_callback(f"{STAGE} generate instructions"))
        finally:
            backward_model.close()
        for seg, out in zip(accepted, outs):
            text, salvaged = out.text, False
            if not out.finished:
                cut = salvage_instruction(out.text)
                if cut is not None:
                    text, salvaged = cut, True
            why = instruction_filter_reason(text, seg.text, finished=out.finished or salvaged,
                                            reject_truncated=cfg.reject_truncated)
            row = _row(seg, status=REJECTED if why else BELOW, reason=why[0] if why else "",
                       detail=why[1] if why else "")
            row.update(instruction=text.strip(), raw_output=out.text, num_tokens=out.num_tokens,
                       finished=out.finished, salvaged=salvaged)
            generated.append(row)
    to_score = [r for r in generated if r["status"] != REJECTED]

    # 4. self-curation with M0 (or base / a named model), 5. optional iterations with M_k
    seed_tagged = tag_seed(seed, cfg.seed_system_prompt, out_dir / "seed_tagged.parquet")
    curation, trained = _curation_model(cfg=cfg, base=base, seed=seed, forward_cfg=forward_cfg, out_dir=out_dir,
                                        trust_remote_code=trust_remote_code)
    helpers += trained
    iteration_kept: list[int] = []
    for it in range(1, cfg.iterations + 1):
        if it > 1:
            # M_k: seed + the pairs curated so far, both tagged, as in the paper's iteration.
            kept_rows = [r for r in to_score if r["status"] == KEPT]
            mix = seed_tagged.read()
            mix = pd.concat([mix, records_to_frame(curated_records(kept_rows, system_prompt=cfg.augmented_system_prompt))],
                            ignore_index=True)
            mix_ref = write_parquet(mix, out_dir / f"train_iter{it}.parquet", name=f"curation_train_iter{it}")
            helpers.append(_train_model(run_name=f"{STAGE}.curation_iter{it}", data=mix_ref, base=base,
                                        cfg=forward_cfg, out_dir=out_dir / f"curation_iter{it}",
                                        trust_remote_code=trust_remote_code))
            curation = helpers[-1].output.model
        scores = _score(curation, to_score, cfg=cfg, training=forward_cfg, trust_remote_code=trust_remote_code) \
            if to_score else []
        keep, details = select_pairs(scores, keep=cfg.curation.keep, threshold=cfg.curation.threshold)
        for r, s, k, detail in zip(to_score, scores, keep, details):
            r.update(probs=list(s.probs), expected=s.expected, argmax=s.argmax, mass=s.mass,
                     status=KEPT if k else BELOW, reason="" if k else "below_threshold", detail=detail)
            r[f"expected_iter{it}"] = s.expected
        iteration_kept.append(sum(keep))

    # 6. quality of the helpers: does M_yx end its instructions, can the curator tell a true answer
    #    from another question's answer (held-out rows, never trained on)?
    quality: dict[str, float] = {}
    if generated:
        quality["backward_finished_rate"] = sum(bool(r["finished"]) for r in generated) / len(generated)
    heldout_tagged = None
    if heldout is not None:
        heldout_tagged = tag_dataset(heldout, cfg.seed_system_prompt, out_dir / "heldout_tagged.parquet",
                                     name="heldout_tagged")
        if cfg.curation.auc_examples:
            quality.update(curator_auc(curation, frame_to_records(heldout.read())[: cfg.curation.auc_examples],
                                       cfg=cfg, training=forward_cfg, trust_remote_code=trust_remote_code))

    # 7. outputs: the audit table, the tagged curated records
    frame = pd.DataFrame(rows + generated)
    for col in CANDIDATE_COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    extra = sorted(c for c in frame.columns if c not in CANDIDATE_COLUMNS)
    frame = frame[list(CANDIDATE_COLUMNS) + extra]
    counts = accounting(frame)
    candidates_ref = write_parquet(frame, out_dir / "candidates.parquet", name="backtranslation_candidates")
    kept_rows = [r for r in generated if r["status"] == KEPT]
    curated_ref = write_parquet(records_to_frame(curated_records(kept_rows, system_prompt=cfg.augmented_system_prompt)),
                                out_dir / "curated.parquet", name="curated")
    return AugmentOutput(curated=curated_ref, candidates=candidates_ref, seed=seed_tagged, reversed=reversed_ref,
                         backward_model=backward, curation_model=curation, counts=tuple(sorted(counts.items())),
                         iteration_kept=tuple(iteration_kept), helpers=tuple(helpers), heldout=heldout_tagged,
                         quality=tuple(sorted(quality.items())))


def curator_auc(curation: ModelRef, records: Sequence[dict[str, Any]], *, cfg: AugmentationConfig,
                training: TrainingConfig, trust_remote_code: bool = False) -> dict[str, float]:
    """How well the curator separates a row's true answer from another row's answer.

    Each held-out row is scored twice with the curation rubric: (its instruction, its answer) and
    (its instruction, the next row's answer). The AUC of the two score sets is the chance that a
    true pair outscores a mismatched one: 0.5 is a curator that cannot tell them apart.

    Returns:
        ``curator_auc``, ``curator_true_mean``, ``curator_mismatched_mean`` and ``curator_auc_pairs``
        (empty with fewer than two usable rows).
    """
    from sftflow.data.records import prompt_text
    from sftflow.stats import auc

    rows = [(prompt_text(r["messages"]), response_text(r["messages"])) for r in records]
    rows = [(q, a) for q, a in rows if q.strip() and a.strip()]
    if len(rows) < 2:
        return {}
    true = [{"instruction": q, "segment": a} for q, a in rows]
    mismatched = [{"instruction": q, "segment": rows[(i + 1) % len(rows)][1]} for i, (q, _) in enumerate(rows)]
    scores = _score(curation, true + mismatched, cfg=cfg, training=training, trust_remote_code=trust_remote_code)
    pos = [s.expected for s in scores[: len(true)]]
    neg = [s.expected for s in scores[len(true):]]
    return {"curator_auc": auc(pos, neg), "curator_true_mean": float(sum(pos) / len(pos)),
            "curator_mismatched_mean": float(sum(neg) / len(neg)), "curator_auc_pairs": float(len(rows))}


def _row(seg: Segment, *, status: str, reason: str, detail: str) -> dict[str, Any]:
    return {
        "segment_id": seg.id, "source": seg.source, "segment": seg.text, "num_words": seg.num_words,
        "instruction": "", "num_tokens": 0, "finished": False, "probs": None, "expected": math.nan,
        "argmax": 0, "mass": math.nan, "status": status, "reason": reason, "detail": detail,
        "raw_output": "", "salvaged": False,
    }


def _curation_model(*, cfg: AugmentationConfig, base: ModelRef, seed: DatasetRef, forward_cfg: TrainingConfig,
                    out_dir: Path, trust_remote_code: bool) -> tuple[ModelRef, list[HelperModel]]:
    """M0 per ``curation.model``: ``forward`` trains it on the seed, ``base`` reuses the base model.

    Returns:
        (the curation model, the models trained for it: [M0] for ``forward``, else []).
    """
    choice = cfg.curation.model
    if choice == "forward":
        m0 = _train_model(run_name=f"{STAGE}.curation", data=seed, base=base, cfg=forward_cfg,
                          out_dir=out_dir / "curation", trust_remote_code=trust_remote_code)
        return m0.output.model, [m0]
    if choice == "base":
        return base, []
    from sftflow.inference.models import resolve_model

    return resolve_model(choice, trust_remote_code=trust_remote_code), []


# =========================================================================== reporting
def unparseable_scores(frame: pd.DataFrame) -> float:
    """Share of scored pairs whose rating the curation model did not expect.

    A pair counts when the model put less than ``RATING_MASS_FLOOR`` of its next-token probability
    on the five rating tokens (``generation.unparseable_share``): a text-parsing scorer would most
    likely have lost that rating. 0.0 when nothing was scored.
    """
    scored = frame[frame["status"].isin([KEPT, BELOW])]
    return unparseable_share(scored["mass"].astype(float).tolist())


def score_histogram_png(frame: pd.DataFrame, path: Path, *, threshold: float) -> Path:
    """Histogram of expected scores (kept vs below threshold) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = frame[frame["status"].isin([KEPT, BELOW])]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = [1 + 0.25 * i for i in range(17)]
    ax.hist([scored.loc[scored.status == KEPT, "expected"], scored.loc[scored.status == BELOW, "expected"]],
            bins=bins, stacked=True, label=["kept", "below threshold"], color=["#2a9d8f", "#e76f51"])
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    ax.set_xlabel("expected score (1-5)")
    ax.set_ylabel("pairs")
    ax.set_title(f"Self-curation scores ({len(scored)} pairs)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _examples(frame: pd.DataFrame, *, n: int = 5) -> list[dict[str, Any]]:
    scored = frame[frame["status"].isin([KEPT, BELOW])].sort_values("expected", ascending=False)
    picks = [("best", r) for _, r in scored.head(n).iterrows()]
    picks += [("worst", r) for _, r in scored.tail(min(n, max(0, len(scored) - n))).iloc[::-1].iterrows()]
    return [{"rank": tag, "expected": round(float(r.expected), 3), "status": r.status,
             "instruction": r.instruction[:200], "segment": r.segment[:240]} for tag, r in picks]


def _markdown_summary(counts: dict[str, int], frame: pd.DataFrame, cfg: AugmentationConfig,
                      iteration_kept: Sequence[int], *, unparseable: float,
                      quality: dict[str, float] | None = None) -> str:
    reasons = frame[frame.reason != ""].groupby(["status", "reason"]).size()
    lines = [f"## Backtranslation: {counts['kept']} of {counts['segments_in']} segments kept",
             "", "| step | rows |", "|---|---|"]
    order = ("segments_in", "segments_filtered", "generated", "rejected", "scored", "kept", "below_threshold")
    lines += [f"| {k} | {counts[k]} |" for k in order if k in counts]
    rule = "most likely rating 5" if cfg.curation.keep == "score5" else f"threshold {cfg.curation.threshold}"
    q = quality or {}
    if "backward_finished_rate" in q:
        lines += ["", f"Backward model ended its instruction in {q['backward_finished_rate']:.0%} of generations"]
    if "curator_auc" in q:
        lines += ["", f"Curator AUC on {int(q['curator_auc_pairs'])} held-out rows (true vs mismatched answer): "
                  f"{q['curator_auc']:.3f} (mean expected score {q['curator_true_mean']:.2f} vs "
                  f"{q['curator_mismatched_mean']:.2f}; 0.5 = chance)"]
    lines += ["", f"Kept per curation iteration: {list(iteration_kept)} ({rule})",
              "", f"Unparseable ratings (probability on 1-5 below {RATING_MASS_FLOOR}): {unparseable:.1%} "
              "of scored pairs",
              "", "| status | reason | rows |", "|---|---|---|"]
    lines += [f"| {s} | {r} | {n} |" for (s, r), n in reasons.items()]
    scored = frame[frame["status"].isin([KEPT, BELOW])]
    if len(scored):
        lines += ["", "Score histogram (expected score):", "```"]
        edges = [1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5.0001]
        for lo, hi in zip(edges, edges[1:]):
            n = int(((scored.expected >= lo) & (scored.expected < hi)).sum())
            lines.append(f"{lo:3.1f}-{min(hi, 5):3.1f} | {'#' * n} {n}")
        lines.append("```")
    return "\n".join(lines)


def _log_helper(helper: HelperModel, *, base: ModelRef) -> None:
    """Log one trained helper model to the active run: settings, data, training curves, the model.

    The model was trained before this run opened (``backtranslate`` logs nothing), so its per-step
    metrics are replayed from the training history with their step numbers.
    """
    import mlflow

    from sftflow.tracking.registry import log_model
    from sftflow.tracking.train_logging import log_training_summary, step_logger
    from sftflow.training.loop import STEP_METRICS

    cfg, output = helper.cfg, helper.output
    mlflow.log_params({"base_model": base.path, "train_rows": helper.data.num_rows, "max_steps": cfg.max_steps,
                       "method": cfg.method, "learning_rate": cfg.learning_rate})
    log_dataset(helper.data, context="training")
    on_metrics = step_logger()
    for rec in output.history():
        on_metrics(int(rec["step"]), {k: rec[k] for k in STEP_METRICS if k in rec})
    log_training_summary(output)
    log_model(model=output.model, template=output.template, metrics=output.metrics, register_as=None)


@task(name=STAGE, cache_policy=stage_cache_policy(), persist_result=True)
def backtranslate_task(
    seed: DatasetRef,
    base: ModelRef,
    cfg: AugmentationConfig,
    training: TrainingConfig,
    *,
    ctx: StageContext,
    trust_remote_code: bool = False,
    dedup: DedupConfig | None = None,
    heldout: DatasetRef | None = None,
) -> AugmentResult:
    """Prefect task: ``backtranslate`` in its own MLflow run, each model it trained in a nested run.

    The stage run gets the settings, the accounting (``bt_*``), the mean expected score and the
    share of unparseable ratings, the candidate table, the score histogram and a summary; each
    helper model's run gets its training data, curves and the model itself.
    No retries: it trains models (a rerun of the flow redoes the stage; cached when unchanged).

    Args:
        seed: the seed data (the clean train split).
        base: the base model.
        cfg: the ``augmentation`` section.
        training: the ``training`` section.
        ctx: the flow's stage context (tracking URI, parent run, run folder).
        trust_remote_code: passed to model loading.
        dedup: the pipeline's ``dedup`` section, for the seed near-duplicate check (None: its defaults).
        heldout: the held-out split; returned tagged like the seed (``AugmentResult.heldout``) and
            used to measure the curator (``bt_curator_auc``).
    """
    import mlflow

    out_dir = ctx.stage_dir(STAGE)
    with stage_run(ctx, STAGE):
        mlflow.log_params({
            "corpus": cfg.corpus.path if cfg.corpus else "", "max_segments": cfg.max_segments,
            "min_words": cfg.min_words, "max_words": cfg.max_words, "temperature": cfg.generation.temperature,
            "top_p": cfg.generation.top_p, "max_new_tokens": cfg.generation.max_new_tokens,
            "curation_model": cfg.curation.model, "threshold": cfg.curation.threshold, "iterations": cfg.iterations,
            "curation_keep": cfg.curation.keep,
        })
        log_dataset(seed, context="backtranslate.seed")
        out = backtranslate(seed=seed, base=base, cfg=cfg, training=training, out_dir=out_dir,
                            trust_remote_code=trust_remote_code, dedup=dedup, heldout=heldout)
        # Each helper model is the logged model of its own run, nested in the stage run.
        for helper in out.helpers:
            with stage_run(ctx, helper.run_name):
                _log_helper(helper, base=base)
        counts = dict(out.counts)
        mlflow.log_metrics({f"bt_{k}": float(v) for k, v in counts.items()})
        mlflow.log_metrics({f"bt_{k}": float(v) for k, v in out.quality})
        for it, kept in enumerate(out.iteration_kept, start=1):
            mlflow.log_metric("bt_kept_per_iteration", float(kept), step=it)
        frame = pd.read_parquet(out.candidates.path)
        scored = frame[frame["status"].isin([KEPT, BELOW])]
        if len(scored):
            mlflow.log_metric("bt_mean_expected_score", float(scored.expected.mean()))
        unparseable = unparseable_scores(frame)
        mlflow.log_metric("bt_unparseable_scores", unparseable)
        for ref, context in ((out.candidates, "backtranslate.candidates"), (out.curated, "backtranslate.curated"),
                             (out.reversed, "backtranslate.backward_train"), (out.seed, "backtranslate.seed_tagged")):
            log_dataset(ref, context=context)
        mlflow.log_artifact(out.candidates.path, artifact_path="backtranslate")
        png = score_histogram_png(frame, out_dir / "score_histogram.png", threshold=cfg.curation.threshold)
        mlflow.log_artifact(str(png), artifact_path="backtranslate")
        summary = _markdown_summary(counts, frame, cfg, out.iteration_kept, unparseable=unparseable,
                                    quality=dict(out.quality))
        mlflow.log_text(summary, "backtranslate/summary.md")
        if out.heldout is not None:
            log_dataset(out.heldout, context="backtranslate.heldout_tagged")
        log_json({"counts": counts, "iteration_kept": list(out.iteration_kept), "quality": dict(out.quality),
                  "backward_model": out.backward_model.path, "curation_model": out.curation_model.path},
                 "backtranslate/summary.json")
        table_artifact(f"{ctx.pipeline}-backtranslate-examples", _examples(frame),
                       description="Self-curation: best and worst scored pairs")
        markdown_with_image(f"{ctx.pipeline}-backtranslate-summary", summary, png, alt="score histogram",
                            description="Backtranslation accounting and score histogram")
    write_marker(ctx.layout.stage_dir(STAGE), outputs=out, stage=STAGE)  # last: what a cache hit verifies
    return AugmentResult(curated=out.curated, candidates=out.candidates, backward_model=out.backward_model,
                         curation_model=out.curation_model, seed=out.seed, counts=out.counts, heldout=out.heldout,
                         quality=out.quality)

"""The rows of backtranslation: the candidate table, the pairs models train on, the keep decision.

* ``candidates.parquet`` has one row per segment examined (``CANDIDATE_COLUMNS``) and its status
  (``STATUSES``); ``accounting`` counts them and checks the identities::

      segments examined = segments filtered + candidates generated + not curated
      candidates generated = instructions rejected + pairs scored
      pairs scored = kept + below threshold

  (``not curated``: accepted segments never sent to the backward model because the curator's
  held-out AUC was below ``curation.min_auc`` with ``below_min_auc: skip``.)

* ``reverse_records``: the backward model's training data (response -> instruction);
  ``curated_records``: kept pairs as canonical records (``origin=backtranslated``, tagged);
  ``tag_seed``: the seed with its system tag.
* ``select_pairs``: the rubric's keep rules (``curation.keep``: threshold or score 5);
  ``select_top_fraction`` / ``select_at_least``: any method's score (``sftflow.augment.curation``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from sftflow.augment.corpus import Segment
from sftflow.data.records import AccountingError, make_record
from sftflow.data.refs import DatasetRef
from sftflow.data.tags import tag_dataset

# Candidate statuses (one per row of candidates.parquet).
FILTERED = "filtered_segment"  # the segment never reached the backward model
REJECTED = "rejected_instruction"  # the generated instruction failed a filter
BELOW = "below_threshold"  # scored, expected score < threshold
KEPT = "kept"  # scored, expected score >= threshold
NOT_CURATED = "not_curated"  # accepted, but the curator failed min_auc (below_min_auc: skip): nothing curated
STATUSES = (FILTERED, REJECTED, BELOW, KEPT, NOT_CURATED)

CANDIDATE_COLUMNS = (
    "segment_id", "source", "segment", "num_words", "instruction", "num_tokens", "finished",
    "probs", "expected", "argmax", "mass", "score", "status", "reason", "detail",
)


def candidate_row(seg: Segment, *, status: str, reason: str, detail: str) -> dict[str, Any]:
    """A row of the candidate table for a segment (no instruction yet, no scores)."""
    return {
        "segment_id": seg.id, "source": seg.source, "segment": seg.text, "num_words": seg.num_words,
        "instruction": "", "num_tokens": 0, "finished": False, "probs": None, "expected": math.nan,
        "argmax": 0, "mass": math.nan, "score": math.nan, "status": status, "reason": reason, "detail": detail,
        "raw_output": "", "salvaged": False,
    }


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
    """Kept candidates as canonical records: (system tag,) user = instruction, assistant = segment.

    A record's ``score`` is the curation method's score (``score``; a rubric row without it: ``expected``).
    """
    out = []
    for r in rows:
        msgs = [{"role": "user", "content": r["instruction"].strip()}, {"role": "assistant", "content": r["segment"]}]
        if system_prompt:
            msgs.insert(0, {"role": "system", "content": system_prompt})
        score = r.get("score")
        score = r["expected"] if score is None or (isinstance(score, float) and math.isnan(score)) else score
        out.append(make_record(msgs, source=r["source"], origin="backtranslated", score=float(score)))
    return out


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


def select_top_fraction(scores: Sequence[float], fraction: float) -> tuple[list[bool], list[str]]:
    """Keep the best ``ceil(fraction * n)`` of the ``n`` non-NaN scores (ties: the earlier row first).

    Returns:
        (keep flags, detail strings), one per score.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"augmentation.curation.top_fraction must be in (0, 1] (got {fraction})")
    valid = [i for i, s in enumerate(scores) if not math.isnan(float(s))]
    k = math.ceil(fraction * len(valid)) if valid else 0
    order = sorted(valid, key=lambda i: (-float(scores[i]), i))
    rank = {i: r for r, i in enumerate(order, start=1)}
    flags = [rank.get(i, k + 1) <= k for i in range(len(scores))]
    details = [f"score {float(s):.3f} rank {rank[i]} of {len(valid)} {'<=' if f else '>'} top {fraction:g} ({k} kept)"
               if i in rank else "no score (NaN)" for i, (s, f) in enumerate(zip(scores, flags))]
    return flags, details


def select_at_least(scores: Sequence[float], min_score: float) -> tuple[list[bool], list[str]]:
    """Keep a score >= ``min_score`` (NaN never passes); (keep flags, detail strings)."""
    flags = select_by_threshold([float(s) for s in scores], min_score)
    details = [f"score {float(s):.3f} {'>=' if f else '<'} min_score {min_score:g}" for s, f in zip(scores, flags)]
    return flags, details


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
        "not_curated": int(status.get(NOT_CURATED, 0)),
    }
    # The identities of the module docstring (they cannot fail unless a status was lost). Raised,
    # not asserted: the check must also run under `python -O`.
    for total, parts in (("segments_in", ("segments_filtered", "generated", "not_curated")),
                         ("generated", ("rejected", "scored")),
                         ("scored", ("kept", "below_threshold"))):
        if c[total] != sum(c[p] for p in parts):
            raise AccountingError(f"backtranslate accounting broken: {total} {c[total]} != "
                                  + " + ".join(f"{p} {c[p]}" for p in parts) + f" ({c})")
    return c

"""Rejection sampling's rules, without a model: the reasons a prompt yields nothing, the candidate
table's columns, answer scoring, the per-prompt keep rule (``select_best``) and the accounting.

Each pool prompt gets exactly one outcome: kept, or one of ``REASONS``::

    prompts in = kept + duplicate_prompt + duplicate_of_heldout + bad_prompt
                 + empty + unfinished + below_threshold + wrong_answer
    samples = prompts sampled * k
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd

from sftflow.data.answers import answers_match
from sftflow.data.records import AccountingError, check_accounting, is_blank

ORIGIN = "rejection_sampled"  # the ``origin`` of a selected record

# Reasons a prompt yields no selected sample (each prompt gets exactly one: kept or one of these).
DUP_PROMPT = "duplicate_prompt"  # repeats an earlier prompt of the pool (not sampled)
DUP_HELDOUT = "duplicate_of_heldout"  # duplicates a held-out prompt (not sampled: a leak)
BAD_PROMPT = "bad_prompt"  # the prompt cannot be rendered for generation (not sampled)
EMPTY = "empty"  # every sample was empty
UNFINISHED = "unfinished"  # no non-empty sample ended before max_new_tokens
BELOW = "below_threshold"  # best rubric score < threshold
WRONG = "wrong_answer"  # no finished sample has the reference's final answer
REASONS = (DUP_PROMPT, DUP_HELDOUT, BAD_PROMPT, EMPTY, UNFINISHED, BELOW, WRONG)
SCREENED = (DUP_PROMPT, DUP_HELDOUT, BAD_PROMPT)  # decided before sampling

CANDIDATE_COLUMNS = (
    "prompt_id", "prompt_index", "sample_index", "source", "prompt", "response", "num_tokens", "finished",
    "scorer", "score", "reference_answer", "predicted_answer", "best", "kept", "reason", "detail",
)


def answer_score(response: str, reference: str) -> float:
    """1.0 when the response's final answer equals the reference's, else 0.0 (no reference: NaN)."""
    if not reference.strip():
        return math.nan
    return 1.0 if answers_match(response, reference) else 0.0


def select_best(samples: Sequence[dict[str, Any]], *, method: str, threshold: float,
                require_finished: bool = True) -> tuple[int | None, bool, str, str]:
    """Pick the best sample of one prompt and decide whether it is kept.

    Args:
        samples: the prompt's samples in sample order, each with ``response``, ``finished`` and
            ``score`` (NaN: unscored).
        method: ``answer`` (kept when correct: score 1.0) or ``rubric`` (kept when score >= threshold).
        threshold: the rubric threshold.
        require_finished: only samples that ended with a stop token are eligible.

    Returns:
        (best sample index or None when none is eligible, kept, reason ('' when kept), detail).
    """
    nonblank = [i for i, s in enumerate(samples) if not is_blank(str(s["response"]))]
    if not nonblank:
        return None, False, EMPTY, f"all {len(samples)} samples empty"
    eligible = [i for i in nonblank if samples[i]["finished"] or not require_finished]
    if not eligible:
        return None, False, UNFINISHED, f"none of {len(nonblank)} non-empty samples ended before max_new_tokens"
    scored = [i for i in eligible if not math.isnan(float(samples[i]["score"]))]
    if not scored:
        return eligible[0], False, (WRONG if method == "answer" else BELOW), "no sample could be scored"
    # Highest score; ties go to the lowest sample index (max keeps the first maximum).
    best = max(scored, key=lambda i: float(samples[i]["score"]))
    score = float(samples[best]["score"])
    if method == "answer":
        ok = score >= 1.0
        return best, ok, "" if ok else WRONG, (f"{sum(float(samples[i]['score']) >= 1 for i in scored)} of "
                                               f"{len(scored)} eligible samples correct")
    ok = score >= threshold
    return best, ok, "" if ok else BELOW, f"best score {score:.2f} {'>=' if ok else '<'} threshold {threshold}"


def accounting(candidates: pd.DataFrame, *, k: int) -> dict[str, int]:
    """Counts of the candidate table, checked: prompts in = kept + rejected by reason; samples = sampled * k.

    Raises:
        AccountingError: a broken identity or an unknown reason (a bug, never bad data).
    """
    per_prompt = candidates.groupby("prompt_index", sort=True).agg(kept=("kept", "any"), reason=("reason", "first"),
                                                                 sampled=("sample_index", "max"))
    unknown = set(per_prompt.loc[~per_prompt.kept, "reason"]) - set(REASONS)
    if unknown:
        raise AccountingError(f"rejection sampling accounting: unknown reasons {sorted(unknown)}")
    counts = {"prompts_in": int(len(per_prompt)), "kept": int(per_prompt.kept.sum())}
    for r in REASONS:
        counts[r] = int(((~per_prompt.kept) & (per_prompt.reason == r)).sum())
    check_accounting("rejection sampling", counts["prompts_in"], kept=counts["kept"],
                     **{r: counts[r] for r in REASONS})
    sampled = int((per_prompt.sampled >= 0).sum())
    samples = int((candidates.sample_index >= 0).sum())
    check_accounting("rejection sampling samples", samples, **{f"prompts_sampled_x{k}": sampled * k})
    counts.update(prompts_sampled=sampled, samples=samples,
                  samples_finished=int(candidates.loc[candidates.sample_index >= 0, "finished"].astype(bool).sum()))
    return counts

"""Evaluation metrics on strings and counts (no model): ROUGE-L, answer accuracy, generation rates,
and the generation bound a set is evaluated with.

``GENERATION_METRICS`` and ``LOSS_METRICS`` are the names every evaluated set reports (an extra set
prefixes them with ``<set>/``); preflight's list of evaluation metrics is kept equal to them by a test.
"""

from __future__ import annotations

import math
from typing import Any

from sftflow.config_sections import EvaluationConfig
from sftflow.data.answers import answers_match, extract_final_answer

# Metric names computed for every set (extra sets get a "<set>/" prefix).
GENERATION_METRICS = ("rougeL", "mean_new_tokens", "mean_words", "empty_rate", "runaway_rate", "runaway_rate_all",
                      "fit_fraction")
LOSS_METRICS = ("eval_loss", "perplexity", "eval_tokens", "answer_loss", "end_prob")


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (``rouge_score``, with stemming).

    An empty prediction or reference scores 0.0 (``rouge_score`` does the same; made explicit here).
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"rouge_l: {len(predictions)} predictions vs {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out = []
    for pred, ref in zip(predictions, references):
        if not pred.strip() or not ref.strip():
            out.append(0.0)
            continue
        out.append(float(scorer.score(ref, pred)["rougeL"].fmeasure))
    return out


def answer_accuracy(*, outputs: list[str], answers: list[str]) -> tuple[dict[str, float], list, list[float]]:
    """Exact-match accuracy of the outputs' final answers against the reference answers.

    Args:
        outputs: the generated responses (worked solutions).
        answers: per row, the reference final answer ("" for a row without one: not scored).

    Returns:
        (metrics, per-row predicted answer (None when the output has none), per-row correct
        (1.0 / 0.0, NaN for rows without a reference)). ``metrics`` is empty when no row has a
        reference answer, else ``accuracy`` and ``accuracy_examples``.
    """
    if len(outputs) != len(answers):
        raise ValueError(f"answer_accuracy: {len(outputs)} outputs vs {len(answers)} answers")
    preds = [extract_final_answer(o) for o in outputs]
    correct = [float(answers_match(o, a)) if a else math.nan for o, a in zip(outputs, answers)]
    scored = [c for c in correct if not math.isnan(c)]
    if not scored:
        return {}, preds, correct
    return {"accuracy": sum(scored) / len(scored), "accuracy_examples": float(len(scored))}, preds, correct


def generation_metrics(
    *, outputs: list[str], references: list[str], num_tokens: list[int], finished: list[bool],
    fits: list[bool] | None = None,
) -> tuple[dict[str, float], list[float]]:
    """Aggregate generation metrics of one set, plus per-row ROUGE-L.

    Args:
        fits: per row, whether the reference (and its end marker) fits in ``max_new_tokens``; a
            model that is cut off on a reference longer than the bound is not running away.
            None: every reference fits.

    Returns:
        (metrics, per-row rougeL). ``empty_rate`` counts whitespace-only outputs; ``runaway_rate``
        counts generations that never produced an end-of-turn (cut at ``max_new_tokens``) among
        the rows whose reference fits (NaN when none does); ``runaway_rate_all`` over every row;
        ``fit_fraction`` is the share of rows whose reference fits.
    """
    n = len(outputs)
    fits = [True] * n if fits is None else list(fits)
    if not (n == len(references) == len(num_tokens) == len(finished) == len(fits)):
        raise ValueError("generation_metrics: outputs, references, num_tokens, finished and fits differ in length")
    scores = rouge_l(outputs, references)
    if n == 0:
        return {k: math.nan for k in GENERATION_METRICS}, scores
    n_fit = sum(fits)
    metrics = {
        "rougeL": sum(scores) / n,
        "mean_new_tokens": sum(num_tokens) / n,
        "mean_words": sum(len(o.split()) for o in outputs) / n,
        "empty_rate": sum(1 for o in outputs if not o.strip()) / n,
        "runaway_rate": sum(1 for f, ok in zip(finished, fits) if ok and not f) / n_fit if n_fit else math.nan,
        "runaway_rate_all": sum(1 for f in finished if not f) / n,
        "fit_fraction": n_fit / n,
    }
    return metrics, scores


def reference_lengths(tokenizer: Any, references: list[str]) -> list[int]:
    """Tokens of each reference answer, plus one for the end marker the model must also emit."""
    return [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in references]


def resolve_max_new_tokens(cfg: EvaluationConfig, ref_lengths: list[int]) -> int:
    """The generation bound of one set: ``evaluation.max_new_tokens``, or for ``auto`` the
    ``auto_quantile`` of the references' lengths (end marker included), rounded up to a multiple
    of 8, within [16, ``auto_max_new_tokens``].

    A bound below the references' lengths caps every model's ROUGE-L and makes a model that would
    have stopped look like a runaway; a bound far above them only costs time on runaways.
    """
    if cfg.max_new_tokens != "auto":
        return int(cfg.max_new_tokens)
    if not ref_lengths:
        return 16
    ordered = sorted(ref_lengths)
    q = ordered[min(len(ordered) - 1, max(0, math.ceil(cfg.auto_quantile * len(ordered)) - 1))]
    return int(min(cfg.auto_max_new_tokens, max(16, -(-q // 8) * 8)))



# The two ways a tuned model is evaluated (issue 24): prompts as training built them (the seed tag as
# the system turn) and as a user of the served model sends them (no tag).
TAGGED, UNTAGGED = "tagged", "untagged"


def better_prompt_way(*, tagged: dict[str, float], untagged: dict[str, float]) -> str:
    """Which way the served model should build prompts: the one with the higher held-out ROUGE-L;
    on a tie, the lower runaway rate; on a tie again, ``tagged`` (what training saw).

    Args:
        tagged / untagged: generation metrics (``generation_metrics``) of the two ways.

    Returns:
        ``"tagged"`` or ``"untagged"``.
    """
    def key(m: dict[str, float]) -> tuple[float, float]:
        rl, ra = m.get("rougeL", math.nan), m.get("runaway_rate", math.nan)
        return (round(rl, 9) if rl == rl else -math.inf, -(round(ra, 9) if ra == ra else math.inf))

    return UNTAGGED if key(untagged) > key(tagged) else TAGGED


def served_system_prompt(metrics: dict[str, float], tag: str | None) -> str | None:
    """The served model's default system prompt: ``tag`` when the tagged way evaluated better (or only
    one way was evaluated: the way training and evaluation prompt), else None (plain messages).

    Args:
        metrics: the tuned model's evaluation metrics (``serve_with_tag`` from ``passes.both_ways``).
        tag: the seed tag the held-out prompts carried (``sets.common_system_tag``).
    """
    return tag if tag and metrics.get("serve_with_tag", 1.0) >= 0.5 else None

"""Reporting of backtranslation: figures, the score histogram, the best/worst pairs, the summary.

Pure functions of the candidate table (``candidates.parquet``); ``tasks.backtranslate`` logs what
they return to MLflow and Prefect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from sftflow.augment.pairs import BELOW, KEPT
from sftflow.config import AugmentationConfig
from sftflow.inference.generation import RATING_MASS_FLOOR, unparseable_share


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


def examples(frame: pd.DataFrame, *, n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` best and ``n`` worst scored pairs (table rows: rank, score, status, instruction, segment)."""
    scored = frame[frame["status"].isin([KEPT, BELOW])].sort_values("expected", ascending=False)
    picks = [("best", r) for _, r in scored.head(n).iterrows()]
    picks += [("worst", r) for _, r in scored.tail(min(n, max(0, len(scored) - n))).iloc[::-1].iterrows()]
    return [{"rank": tag, "expected": round(float(r.expected), 3), "status": r.status,
             "instruction": r.instruction[:200], "segment": r.segment[:240]} for tag, r in picks]


def markdown_summary(counts: dict[str, int], frame: pd.DataFrame, cfg: AugmentationConfig,
                      iteration_kept: Sequence[int], *, unparseable: float,
                      quality: dict[str, float] | None = None) -> str:
    """The stage's summary in Markdown: accounting, helper quality, reasons, a text score histogram."""
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

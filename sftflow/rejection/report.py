"""Rejection sampling's report: the score histogram, the ``rs_*`` metrics and the markdown summary
(what ``rejection_task`` logs; computed from the candidate table and the accounting).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from sftflow.config_sections import RejectionSamplingConfig
from sftflow.rejection.selection import REASONS


def score_histogram_png(frame: pd.DataFrame, path: Path, *, threshold: float) -> Path:
    """Histogram of sample scores (rubric: expected 1-5, kept best vs others; answer: correct vs wrong) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = frame[(frame.sample_index >= 0) & frame.score.notna()]
    rubric, answer = scored[scored.scorer == "rubric"], scored[scored.scorer == "answer"]
    panels = [p for p in (("rubric", rubric), ("answer", answer)) if len(p[1])] or [("rubric", rubric)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, (kind, part) in zip(axes[0], panels):
        if kind == "rubric":
            bins = [1 + 0.25 * i for i in range(17)]
            ax.hist([part.loc[part.kept, "score"], part.loc[~part.kept, "score"]], bins=bins, stacked=True,
                    label=["kept (best of its prompt)", "not kept"], color=["#2a9d8f", "#e76f51"])
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold}")
            ax.set_xlabel("rubric expected score (1-5)")
        else:
            correct = int((part.score >= 1).sum())
            ax.bar(["correct", "wrong"], [correct, len(part) - correct], color=["#2a9d8f", "#e76f51"])
            ax.set_xlabel("final answer")
        ax.set_ylabel("samples")
        ax.set_title(f"Rejection sampling: {len(part)} {kind}-scored samples")
        if kind == "rubric":
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def rejection_metrics(counts: dict[str, int], frame: pd.DataFrame) -> dict[str, float]:
    """``rs_<count>`` for every count, the keep and finished rates, and the score summaries (mean rubric
    score, mean best score; answer: per-sample accuracy and pass@k); a metric that is NaN is left out."""
    m = {f"rs_{k}": float(v) for k, v in counts.items()}
    sampled = frame[frame.sample_index >= 0]
    m["rs_keep_rate"] = counts["kept"] / counts["prompts_in"] if counts["prompts_in"] else 0.0
    if len(sampled):
        m["rs_finished_rate"] = float(sampled.finished.astype(bool).mean())
        rub = sampled[(sampled.scorer == "rubric") & sampled.score.notna()]
        if len(rub):
            m["rs_mean_score"] = float(rub.score.mean())
            m["rs_mean_best_score"] = float(rub[rub.best].score.mean()) if rub.best.any() else math.nan
        ans = sampled[(sampled.scorer == "answer") & sampled.score.notna()]
        if len(ans):
            m["rs_sample_accuracy"] = float((ans.score >= 1).mean())
            per = ans.groupby("prompt_index").score.max()
            m["rs_pass_at_k"] = float((per >= 1).mean())
    return {k: v for k, v in m.items() if not math.isnan(v)}


def markdown_summary(counts: dict[str, int], metrics: dict[str, float], cfg: RejectionSamplingConfig) -> str:
    """The stage's summary: outcomes per reason, the sampling settings and the score metrics."""
    lines = [f"## Rejection sampling: {counts['kept']} of {counts['prompts_in']} prompts kept "
             f"(best of k={cfg.k})", "", "| outcome | prompts |", "|---|---|", f"| kept | {counts['kept']} |"]
    lines += [f"| {r} | {counts[r]} |" for r in REASONS if counts.get(r)]
    lines += ["", f"Samples: {counts['samples']} ({counts['samples_finished']} finished); "
              f"temperature {cfg.temperature}, top_p {cfg.top_p}, max_new_tokens {cfg.max_new_tokens}; "
              f"rubric threshold {cfg.threshold}"]
    lines += [f"- {k}: {v:.3f}" for k, v in sorted(metrics.items()) if k in (
        "rs_mean_score", "rs_mean_best_score", "rs_sample_accuracy", "rs_pass_at_k", "rs_finished_rate")]
    return "\n".join(lines)

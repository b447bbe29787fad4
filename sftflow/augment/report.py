"""Reporting of backtranslation: figures, the score histogram, the best/worst pairs, the summary.

Pure functions of the candidate table (``candidates.parquet``) and the curation checks;
``tasks.backtranslate`` logs what they return to MLflow and Prefect. Scores are the curation
method's (``score``: the rubric's expected rating, or PMI / log-likelihood in nats per token).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from sftflow.augment.curation import METHODS, SCORE_UNITS, CuratorCheck
from sftflow.augment.pairs import BELOW, KEPT
from sftflow.config_sections import AugmentationConfig
from sftflow.inference.rubric import RATING_MASS_FLOOR, unparseable_share


def unparseable_scores(frame: pd.DataFrame) -> float:
    """Share of scored pairs whose rating the curation model did not expect (rubric scores only).

    A pair counts when the model put less than ``RATING_MASS_FLOOR`` of its next-token probability
    on the five rating tokens (``generation.unparseable_share``): a text-parsing scorer would most
    likely have lost that rating. 0.0 when nothing was scored.
    """
    scored = frame[frame["status"].isin([KEPT, BELOW])]
    return unparseable_share(scored["mass"].astype(float).tolist())


def _scores(scored: pd.DataFrame) -> pd.Series:
    """The method's score of each scored row (``score``; a table from before it existed: ``expected``)."""
    if "score" in scored.columns and scored["score"].notna().any():
        return scored["score"].astype(float)
    return scored["expected"].astype(float)


def _cut(cfg: AugmentationConfig) -> tuple[float | None, str]:
    """The keep rule's fixed cut on the score axis (None for top_fraction) and its words."""
    cur = cfg.curation
    rule = cur.keep_rule
    if rule == "score5":
        return None, "most likely rating 5"
    if rule == "top_fraction":
        return None, f"top {cur.top_fraction:g} of scored pairs"
    value = cur.threshold if cur.method == "rubric" else cur.min_score
    return value, f"{'threshold' if cur.method == 'rubric' else 'min_score'} {value}"


def _edges(values: Sequence[float], method: str, *, bins: int) -> list[float]:
    if method == "rubric":
        return [1 + 4 * i / bins for i in range(bins + 1)]
    vals = [v for v in values if math.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return [lo + (hi - lo) * i / bins for i in range(bins + 1)]


def score_histogram_png(frame: pd.DataFrame, path: Path, *, cfg: AugmentationConfig) -> Path:
    """Histogram of the curation method's scores (kept vs not kept) as a PNG, with the keep rule's cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    method = cfg.curation.method
    scored = frame[frame["status"].isin([KEPT, BELOW])]
    values = _scores(scored)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = _edges(values.tolist(), method, bins=16)
    ax.hist([values[scored.status == KEPT], values[scored.status == BELOW]],
            bins=bins, stacked=True, label=["kept", "not kept"], color=["#2a9d8f", "#e76f51"])
    cut, words = _cut(cfg)
    if cut is not None:
        ax.axvline(cut, color="black", linestyle="--", linewidth=1, label=words)
    ax.set_xlabel(SCORE_UNITS[method])
    ax.set_ylabel("pairs")
    ax.set_title(f"Self-curation scores, {method} ({len(scored)} pairs)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def examples(frame: pd.DataFrame, *, n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` best and ``n`` worst scored pairs (table rows: rank, score, status, instruction, segment)."""
    scored = frame[frame["status"].isin([KEPT, BELOW])]
    scored = scored.assign(_score=_scores(scored)).sort_values("_score", ascending=False)
    picks = [("best", r) for _, r in scored.head(n).iterrows()]
    picks += [("worst", r) for _, r in scored.tail(min(n, max(0, len(scored) - n))).iloc[::-1].iterrows()]
    return [{"rank": tag, "score": round(float(r._score), 3), "status": r.status,
             "instruction": r.instruction[:200], "segment": r.segment[:240]} for tag, r in picks]


def curation_lines(cfg: AugmentationConfig, quality: dict[str, float], checks: Sequence[CuratorCheck]) -> list[str]:
    """Markdown lines: the method and keep rule, each method's held-out AUC (chosen one marked), the check."""
    cur = cfg.curation
    _, words = _cut(cfg)
    lines = [f"Curation method: **{cur.method}** ({SCORE_UNITS[cur.method]}), keep rule: {words}"]
    if "curator_auc_pairs" in quality:
        lines += ["", f"Curator AUC on {int(quality['curator_auc_pairs'])} held-out rows (true vs mismatched answer; "
                  "0.5 = chance):", "", "| method | AUC | mean score true | mean score mismatched |", "|---|---|---|---|"]
        for m in METHODS:
            if f"curator_auc_{m}" in quality:
                mark = " (chosen)" if m == cur.method else ""
                lines.append(f"| {m}{mark} | {quality[f'curator_auc_{m}']:.3f} | "
                             f"{quality[f'curator_true_mean_{m}']:.3f} | {quality[f'curator_mismatched_mean_{m}']:.3f} |")
    for c in checks:
        if c.status == "ok":
            lines += ["", c.message()]
        else:
            lines += ["", f"**WARNING: {c.message()}**"]
    return lines


def markdown_summary(counts: dict[str, int], frame: pd.DataFrame, cfg: AugmentationConfig,
                     iteration_kept: Sequence[int], *, unparseable: float,
                     quality: dict[str, float] | None = None, checks: Sequence[CuratorCheck] = ()) -> str:
    """The stage's summary in Markdown: accounting, curation method and AUCs, reasons, a text score histogram."""
    reasons = frame[frame.reason != ""].groupby(["status", "reason"]).size()
    lines = [f"## Backtranslation: {counts['kept']} of {counts['segments_in']} segments kept"]
    below = [c for c in checks if c.below]
    if below:  # said first: a curator below min_auc must not be read past
        lines += ["", f"**WARNING: {below[-1].message()}**"]
    lines += ["", "| step | rows |", "|---|---|"]
    order = ("segments_in", "segments_filtered", "generated", "rejected", "scored", "kept", "below_threshold",
             "not_curated")
    lines += [f"| {k} | {counts[k]} |" for k in order if k in counts]
    q = quality or {}
    if "backward_finished_rate" in q:
        lines += ["", f"Backward model ended its instruction in {q['backward_finished_rate']:.0%} of generations"]
    lines += [""] + curation_lines(cfg, q, checks)
    _, words = _cut(cfg)
    lines += ["", f"Kept per curation iteration: {list(iteration_kept)} ({words})"]
    if cfg.curation.method == "rubric":
        lines += ["", f"Unparseable ratings (probability on 1-5 below {RATING_MASS_FLOOR}): {unparseable:.1%} "
                  "of scored pairs"]
    lines += ["", "| status | reason | rows |", "|---|---|---|"]
    lines += [f"| {s} | {r} | {n} |" for (s, r), n in reasons.items()]
    scored = frame[frame["status"].isin([KEPT, BELOW])]
    if len(scored):
        values = _scores(scored)
        lines += ["", f"Score histogram ({SCORE_UNITS[cfg.curation.method]}):", "```"]
        if cfg.curation.method == "rubric":  # the rubric's fixed bins, as before
            edges = [1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5.0001]
        else:
            edges = _edges(values.tolist(), cfg.curation.method, bins=8)
            edges[-1] += 1e-9
        for lo, hi in zip(edges, edges[1:]):
            n = int(((values >= lo) & (values < hi)).sum())
            label = f"{lo:3.1f}-{min(hi, 5):3.1f}" if cfg.curation.method == "rubric" else f"{lo:7.3f}-{hi:7.3f}"
            lines.append(f"{label} | {'#' * n} {n}")
        lines.append("```")
    return "\n".join(lines)


def curation_note(report_path: str | Path) -> str:
    """What the curation did, in a few lines for the model version and the run's summary: the method
    (and why, for auto), each method's held-out AUC, the min_auc check of each iteration (and its
    action when below), the pairs kept per iteration. "" when ``report.json`` is missing."""
    import json

    path = Path(report_path)
    if not path.is_file():
        return ""
    doc = json.loads(path.read_text())
    cur = doc.get("curation", {})
    aucs = ", ".join(f"{m} {v:.3f}" for m, v in (cur.get("auc") or {}).items() if v is not None)
    lines = [f"Curation method: {cur.get('why') or cur.get('method')}",  # why starts with the method
             f"Held-out curator AUC per method: {aucs or 'not measured'}"]
    lines += [c["message"] for c in cur.get("checks", [])]
    lines.append(f"Kept per iteration: {doc.get('iteration_kept')} of {doc.get('counts', {}).get('scored', 0)} "
                 f"scored ({doc.get('counts', {}).get('segments_in', 0)} segments read)")
    return "\n".join(lines)

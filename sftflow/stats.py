"""The promotion gate's statistics: which way a metric is better, and a paired bootstrap of the gain.

Two questions the gate must answer honestly:

* *Which direction is better?* Implied by the metric's name (``METRIC_DIRECTIONS``): a loss or a
  failure rate is minimised, an overlap or a judge score is maximised. An explicit
  ``promotion.direction`` that contradicts the table is refused (``metric: eval_loss`` with
  ``maximize`` would promote a worse model); an unknown metric needs an explicit direction.
* *Is the gain more than noise?* With a few dozen held-out examples the mean gain of a run is
  mostly noise. ``paired_bootstrap`` resamples the held-out examples (the same indices for the
  base and the tuned model: the comparison is paired) and returns a percentile interval of the
  sign-adjusted gain; the gate promotes only when the interval's lower bound clears the margin.

Pure numpy, no I/O and no imports from the rest of sftflow at module level (``sftflow.config``
may call ``implied_direction`` from a validator without an import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAXIMIZE = "maximize"
MINIMIZE = "minimize"

# Metric name (without any ``<set>/`` or ``<label>/`` prefix) -> the better direction. Names not in
# the table fall back to the suffix rules below; anything else needs ``promotion.direction``.
METRIC_DIRECTIONS: dict[str, str] = {
    "eval_loss": MINIMIZE,
    "perplexity": MINIMIZE,
    "runaway_rate": MINIMIZE,
    "empty_rate": MINIMIZE,
    "rougeL": MAXIMIZE,
    "end_prob": MAXIMIZE,
    "answer_loss": MINIMIZE,
    "rouge1": MAXIMIZE,
    "rouge2": MAXIMIZE,
    "judge_score": MAXIMIZE,
    "accuracy": MAXIMIZE,
    "exact_match": MAXIMIZE,
    "f1": MAXIMIZE,
    "bleu": MAXIMIZE,
}
_SUFFIX_DIRECTIONS: tuple[tuple[str, str], ...] = (
    ("_loss", MINIMIZE), ("perplexity", MINIMIZE), ("_rate", MINIMIZE),
    ("_accuracy", MAXIMIZE), ("_score", MAXIMIZE),
)
# Prefixes a metric may carry in ``promotion.metric`` that do not change what it measures.
LABEL_PREFIXES = ("tuned/", "base/", "champion/", "delta/")


def strip_label(metric: str) -> str:
    """``tuned/rougeL`` -> ``rougeL``; an extra set's prefix stays (``tuned/alpaca/rougeL`` -> ``alpaca/rougeL``)."""
    for prefix in LABEL_PREFIXES:
        metric = metric.removeprefix(prefix)
    return metric


def bare_metric(metric: str) -> str:
    """``tuned/rougeL`` -> ``rougeL``; ``alpaca/eval_loss`` -> ``eval_loss`` (label and set prefixes dropped)."""
    return strip_label(metric).rsplit("/", 1)[-1]


def implied_direction(metric: str) -> str | None:
    """The direction a metric's name implies (``maximize``/``minimize``), or None when unknown.

    Examples: ``eval_loss``, ``alpaca/perplexity``, ``runaway_rate`` -> minimize; ``rougeL``,
    ``tuned/judge_score`` -> maximize; ``mean_words`` -> None (longer is not better or worse).
    """
    name = bare_metric(metric)
    if name in METRIC_DIRECTIONS:
        return METRIC_DIRECTIONS[name]
    for suffix, direction in _SUFFIX_DIRECTIONS:
        if name.endswith(suffix):
            return direction
    return None


def direction_problem(*, metric: str, direction: str | None) -> str | None:
    """Why ``promotion.metric`` + ``promotion.direction`` cannot be used, or None when they can.

    The one check behind ``resolve_direction`` (raises) and preflight (collects the message).
    """
    implied = implied_direction(metric)
    if direction is not None and direction not in (MAXIMIZE, MINIMIZE):
        return f"promotion.direction: must be {MAXIMIZE!r} or {MINIMIZE!r} (got {direction!r})"
    if implied is None and direction is None:
        return (f"promotion.direction: the metric {metric!r} (promotion.metric) does not imply whether higher or "
                f"lower is better; set promotion.direction to {MAXIMIZE!r} or {MINIMIZE!r}")
    if implied is not None and direction is not None and direction != implied:
        return (f"promotion.direction: {direction!r} contradicts promotion.metric {metric!r}, which is "
                f"{'lower' if implied == MINIMIZE else 'higher'}-is-better ({implied}); remove "
                f"promotion.direction (it is implied by the metric) or set it to {implied!r}")
    return None


def resolve_direction(*, metric: str, direction: str | None) -> str:
    """The gate's direction: the explicit one when it agrees with the metric, else the implied one.

    Raises:
        sftflow.config_sections.ConfigError: the direction contradicts the metric, or the metric implies
            none and none was given (the message names ``promotion.direction``).
    """
    problem = direction_problem(metric=metric, direction=direction)
    if problem is not None:
        from sftflow.config_sections import ConfigError  # lazily: config may import this module

        raise ConfigError(problem)
    return direction or implied_direction(metric)  # type: ignore[return-value]


@dataclass(frozen=True)
class GainInterval:
    """A paired bootstrap interval of the gain (positive = better in the metric's direction).

    Attributes:
        gain: the gain on the examples as evaluated (the point estimate).
        low / high: the two-sided percentile interval at ``confidence``.
        confidence: the interval's level (e.g. 0.95).
        n: number of paired examples.
        resamples: number of bootstrap resamples.
    """

    gain: float
    low: float
    high: float
    confidence: float
    n: int
    resamples: int

    def text(self) -> str:
        """``+0.0412 [95% CI +0.0120, +0.0705], n=32`` (for reasons, tags and descriptions)."""
        return (f"{self.gain:+.4f} [{self.confidence:.0%} CI {self.low:+.4f}, {self.high:+.4f}], "
                f"n={self.n}")


def paired_bootstrap(
    *,
    base: np.ndarray,
    tuned: np.ndarray,
    direction: str,
    resamples: int,
    confidence: float,
    weights: np.ndarray | None = None,
    seed: int = 0,
) -> GainInterval:
    """Percentile interval of the gain of ``tuned`` over ``base``, resampling examples in pairs.

    Each resample draws ``n`` example indices with replacement and uses the same indices for both
    models, so the per-example difference (not two independent means) is what varies: far tighter,
    and the right test for two models scored on the same examples.

    Args:
        base / tuned: per-example values, aligned (row i is the same example). NaN rows are dropped.
        direction: ``maximize`` (gain = tuned - base) or ``minimize`` (gain = base - tuned).
        resamples: number of bootstrap resamples (>= 1).
        confidence: two-sided level in (0, 1).
        weights: per-example weights (e.g. scored tokens for a token-averaged loss: the statistic is
            then ``sum(w * v) / sum(w)`` per model, exactly how such a metric is aggregated).
        seed: the generator's seed; the same inputs and seed give the same interval.

    Returns:
        GainInterval.

    Raises:
        ValueError: mismatched lengths, no usable example, or a bad direction/confidence.
    """
    b = np.asarray(base, dtype=float)
    t = np.asarray(tuned, dtype=float)
    w = np.ones_like(b) if weights is None else np.asarray(weights, dtype=float)
    if not (b.shape == t.shape == w.shape) or b.ndim != 1:
        raise ValueError(f"base, tuned and weights must be aligned 1-d arrays (got {b.shape}, {t.shape}, {w.shape})")
    if direction not in (MAXIMIZE, MINIMIZE):
        raise ValueError(f"direction must be {MAXIMIZE!r} or {MINIMIZE!r} (got {direction!r})")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and resamples >= 1 (got {confidence}, {resamples})")
    ok = np.isfinite(b) & np.isfinite(t) & np.isfinite(w) & (w > 0)
    b, t, w = b[ok], t[ok], w[ok]
    n = int(b.size)
    if n == 0:
        raise ValueError("no example has a finite value for both models")
    sign = 1.0 if direction == MAXIMIZE else -1.0

    def gain(idx: np.ndarray) -> np.ndarray:
        # idx: (resamples, n) or (n,). Weighted means of each model over the drawn examples.
        ww = w[idx]
        return sign * ((t[idx] * ww).sum(-1) - (b[idx] * ww).sum(-1)) / ww.sum(-1)

    rng = np.random.default_rng(seed)
    draws = gain(rng.integers(0, n, size=(resamples, n)))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return GainInterval(gain=float(gain(np.arange(n))), low=float(low), high=float(high), confidence=confidence,
                        n=n, resamples=resamples)


def auc(positives: "list[float] | np.ndarray", negatives: "list[float] | np.ndarray") -> float:
    """Area under the ROC curve: P(a random positive scores above a random negative), ties half.

    The Mann-Whitney statistic over every (positive, negative) pair; NaN scores are left out and
    NaN is returned when either side is empty. 0.5 is a scorer no better than chance.
    """
    pos = np.asarray(positives, dtype=float)
    neg = np.asarray(negatives, dtype=float)
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)

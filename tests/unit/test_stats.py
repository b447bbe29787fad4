"""sftflow.stats: the direction a metric implies, and the paired bootstrap of a gain."""

from __future__ import annotations

import numpy as np
import pytest

from sftflow.config_sections import ConfigError
from sftflow.errors import UserError
from sftflow.stats import direction_problem, implied_direction, paired_bootstrap, resolve_direction


@pytest.mark.parametrize("metric, expected", [
    ("eval_loss", "minimize"), ("tuned/eval_loss", "minimize"), ("alpaca/perplexity", "minimize"),
    ("runaway_rate", "minimize"), ("empty_rate", "minimize"), ("answer_loss", "minimize"),
    ("rougeL", "maximize"), ("base/rougeL", "maximize"), ("alpaca/judge_score", "maximize"),
    ("accuracy", "maximize"), ("mean_words", None), ("mean_new_tokens", None), ("num_examples", None),
])
def test_implied_direction(metric: str, expected: str | None) -> None:
    assert implied_direction(metric) == expected


def test_resolve_direction_implied_explicit_and_refused() -> None:
    assert resolve_direction(metric="eval_loss", direction=None) == "minimize"
    assert resolve_direction(metric="rougeL", direction=None) == "maximize"
    assert resolve_direction(metric="rougeL", direction="maximize") == "maximize"
    assert resolve_direction(metric="mean_words", direction="minimize") == "minimize"  # unknown: explicit wins
    contradiction = r"promotion\.direction: 'maximize' contradicts promotion\.metric 'eval_loss'"
    with pytest.raises(ConfigError, match=contradiction):
        resolve_direction(metric="eval_loss", direction="maximize")
    with pytest.raises(UserError, match=r"promotion\.direction.*'minimize' contradicts"):
        resolve_direction(metric="tuned/rougeL", direction="minimize")
    with pytest.raises(ConfigError, match=r"'mean_words' \(promotion\.metric\) does not imply.*promotion\.direction"):
        resolve_direction(metric="mean_words", direction=None)
    assert direction_problem(metric="rougeL", direction=None) is None
    assert "must be" in direction_problem(metric="rougeL", direction="up")


def test_clear_gain_interval_is_above_zero_and_deterministic() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(0.1, 0.3, size=32)
    tuned = base + 0.05 + rng.normal(0, 0.02, size=32)
    a = paired_bootstrap(base=base, tuned=tuned, direction="maximize", resamples=1000, confidence=0.95)
    b = paired_bootstrap(base=base, tuned=tuned, direction="maximize", resamples=1000, confidence=0.95)
    assert a == b  # seeded
    assert a.gain == pytest.approx(float(np.mean(tuned - base)))
    assert 0 < a.low < a.gain < a.high and a.n == 32 and a.resamples == 1000
    assert "95% CI" in a.text() and "n=32" in a.text()
    # A wider level gives a wider interval; another seed moves it a little.
    wide = paired_bootstrap(base=base, tuned=tuned, direction="maximize", resamples=1000, confidence=0.99)
    assert wide.low <= a.low and wide.high >= a.high
    assert paired_bootstrap(base=base, tuned=tuned, direction="maximize", resamples=1000, confidence=0.95,
                            seed=7) != a


def test_noise_interval_straddles_zero() -> None:
    rng = np.random.default_rng(2)
    base = rng.uniform(0.1, 0.3, size=32)
    noise = rng.normal(0, 0.05, size=16)
    tuned = base + np.concatenate([noise, -noise])  # symmetric: mean gain exactly 0
    iv = paired_bootstrap(base=base, tuned=tuned, direction="maximize", resamples=1000, confidence=0.95)
    assert iv.gain == pytest.approx(0.0, abs=1e-12) and iv.low < 0 < iv.high


def test_minimize_flips_the_sign_and_weights_match_a_token_average() -> None:
    base = np.array([2.0, 3.0, 4.0])
    tuned = np.array([1.5, 2.5, 3.0])
    tokens = np.array([10.0, 1.0, 1.0])
    iv = paired_bootstrap(base=base, tuned=tuned, direction="minimize", resamples=200, confidence=0.9,
                          weights=tokens)
    expected = (base * tokens).sum() / tokens.sum() - (tuned * tokens).sum() / tokens.sum()
    assert iv.gain == pytest.approx(expected) and iv.low > 0
    worse = paired_bootstrap(base=tuned, tuned=base, direction="minimize", resamples=200, confidence=0.9)
    assert worse.gain < 0 and worse.high < 0


def test_nan_rows_are_dropped_and_bad_input_refused() -> None:
    iv = paired_bootstrap(base=np.array([0.1, np.nan, 0.2]), tuned=np.array([0.3, 0.5, np.nan]),
                          direction="maximize", resamples=100, confidence=0.95)
    assert iv.n == 1 and iv.gain == pytest.approx(0.2)
    with pytest.raises(ValueError, match="aligned"):
        paired_bootstrap(base=np.zeros(2), tuned=np.zeros(3), direction="maximize", resamples=10, confidence=0.9)
    with pytest.raises(ValueError, match="no example"):
        paired_bootstrap(base=np.array([np.nan]), tuned=np.array([1.0]), direction="maximize", resamples=10,
                         confidence=0.9)
    with pytest.raises(ValueError, match="direction"):
        paired_bootstrap(base=np.zeros(2), tuned=np.zeros(2), direction="up", resamples=10, confidence=0.9)

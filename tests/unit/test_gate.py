"""sftflow.gate: per-example evidence from synthetic evaluations and the bootstrap-based decision."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sftflow.config_sections import PromotionConfig
from sftflow.data.refs import write_parquet
from sftflow.gate import decide, gate_evidence, interval_lines, per_example_markdown, per_example_values
from sftflow.results import EvalResult
from sftflow.stats import GainInterval

N = 32


def _eval(tmp: Path, label: str, rouge: np.ndarray, *, loss: np.ndarray | None = None,
          tokens: np.ndarray | None = None, extra_set: bool = True) -> EvalResult:
    """An EvalResult whose metrics are the means of its per-example samples (as the evaluation writes them)."""
    cols = {"set": "heldout", "id": [f"id{i}" for i in range(len(rouge))], "output": "o", "rougeL": rouge,
            "finished": True, "judge": math.nan}
    metrics = {"rougeL": float(np.mean(rouge))}
    if loss is not None:
        tokens = np.ones_like(loss) if tokens is None else tokens
        cols.update(loss=loss, loss_tokens=tokens)
        metrics["eval_loss"] = float((loss * tokens).sum() / tokens.sum())
    df = pd.DataFrame(cols)
    if extra_set:  # rows of another set must not enter the held-out comparison
        df = pd.concat([df, pd.DataFrame({"set": "other", "id": ["x"], "output": "o", "rougeL": [9.0],
                                          "finished": True, "judge": math.nan})], ignore_index=True)
    ref = write_parquet(df, tmp / f"samples_{label}.parquet", name=f"eval_samples_{label}")
    return EvalResult(label=label, metrics=tuple(sorted(metrics.items())), samples=ref, eval_key="k")


def _gate(base: EvalResult, tuned: EvalResult, cfg: PromotionConfig, *, direction: str,
          champion: EvalResult | None = None, champion_value: float | None = None):
    ev = gate_evidence(base=base, tuned=tuned, champion=champion, cfg=cfg, direction=direction)
    metric = cfg.metric
    if champion is not None:
        champion_value = champion.metric(metric)
    out = decide(metric=metric, direction=direction, min_improvement=cfg.min_improvement,
                 base=base.metric(metric), candidate=tuned.metric(metric), champion=champion_value,
                 over_base=ev.over_base, over_champion=ev.over_champion)
    return out, ev


@pytest.fixture()
def base_rouge() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.05, 0.35, size=N)


def test_clear_win_is_promoted_with_lower_bound_above_zero(tmp_path: Path, base_rouge: np.ndarray) -> None:
    tuned = base_rouge + 0.06 + np.random.default_rng(1).normal(0, 0.03, size=N)
    out, ev = _gate(_eval(tmp_path, "base", base_rouge), _eval(tmp_path, "tuned", tuned),
                    PromotionConfig(metric="rougeL", min_improvement=0.01), direction="maximize")
    assert out.promote and "no champion yet" in out.reason and "95% CI" in out.reason
    assert ev.over_base is not None and ev.over_base.low > 0.01 and ev.over_base.n == N
    assert len(ev.table) == N and set(ev.table["set"]) == {"heldout"}  # the extra set's row is not paired
    assert ev.table["gain_over_base"].to_numpy() == pytest.approx(tuned - base_rouge)
    assert "Gain over base" in interval_lines(ev) and "| id | base | tuned | gain_over_base |" in \
        per_example_markdown(ev, limit=3)


def test_noise_is_not_promoted_and_the_interval_straddles_zero(tmp_path: Path, base_rouge: np.ndarray) -> None:
    noise = np.random.default_rng(3).normal(0, 0.05, size=N // 2)
    tuned = base_rouge + np.concatenate([noise, -noise]) + 0.002  # a tiny mean gain: the point rule would promote
    out, ev = _gate(_eval(tmp_path, "base", base_rouge), _eval(tmp_path, "tuned", tuned),
                    PromotionConfig(metric="rougeL"), direction="maximize")
    assert out.gain_over_base > 0 and not out.promote
    assert ev.over_base.low < 0 < ev.over_base.high and "noise" in out.reason


def test_a_loss_of_quality_is_not_promoted(tmp_path: Path, base_rouge: np.ndarray) -> None:
    out, ev = _gate(_eval(tmp_path, "base", base_rouge), _eval(tmp_path, "tuned", base_rouge - 0.05),
                    PromotionConfig(metric="rougeL"), direction="maximize")
    assert not out.promote and ev.over_base.high < 0 and out.gain_over_base == pytest.approx(-0.05)


def test_lower_loss_promotes_when_minimizing_with_token_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    base_loss = rng.uniform(2.0, 3.0, size=N)
    tokens = rng.integers(5, 50, size=N).astype(float)
    r = np.full(N, 0.2)
    base = _eval(tmp_path, "base", r, loss=base_loss, tokens=tokens)
    better = _eval(tmp_path, "tuned", r, loss=base_loss - 0.2 + rng.normal(0, 0.05, size=N), tokens=tokens)
    out, ev = _gate(base, better, PromotionConfig(metric="eval_loss"), direction="minimize")
    assert out.promote and ev.over_base.low > 0
    assert ev.over_base.gain == pytest.approx(base.metric("eval_loss") - better.metric("eval_loss"))
    worse = _eval(tmp_path, "worse", r, loss=base_loss + 0.2, tokens=tokens)
    assert not _gate(base, worse, PromotionConfig(metric="eval_loss"), direction="minimize")[0].promote


def test_metric_without_per_example_values_is_not_promoted_on_a_point_estimate(tmp_path: Path) -> None:
    base = _eval(tmp_path, "base", np.full(N, 0.2), loss=np.full(N, 2.5))
    tuned = _eval(tmp_path, "tuned", np.full(N, 0.2), loss=np.full(N, 2.0))
    no_rows = EvalResult(label="tuned", metrics=(("perplexity", 7.0),), samples=tuned.samples)
    assert per_example_values(no_rows, "perplexity") is None
    ev = gate_evidence(base=base, tuned=no_rows, champion=None, cfg=PromotionConfig(metric="perplexity"),
                       direction="minimize")
    assert ev.over_base is None and not len(ev.table) and "no interval" in interval_lines(ev)
    out = decide(metric="perplexity", direction="minimize", min_improvement=0, base=12.0, candidate=7.0,
                 champion=None)
    assert not out.promote and "no interval" in out.reason and "point estimate" in out.reason
    assert decide(metric="perplexity", direction="minimize", min_improvement=0, base=12.0, candidate=7.0,
                  champion=None, allow_point_estimate=True).promote


def test_champion_with_samples_is_compared_by_interval(tmp_path: Path, base_rouge: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    base = _eval(tmp_path, "base", base_rouge)
    tuned = _eval(tmp_path, "tuned", base_rouge + 0.1 + rng.normal(0, 0.02, size=N))
    cfg = PromotionConfig(metric="rougeL")
    # A champion as good as the candidate (noise around it): not replaced although its mean may be lower.
    noise = rng.normal(0, 0.05, size=N // 2)
    twin = _eval(tmp_path, "twin", base_rouge + 0.1 + np.concatenate([noise, -noise]))
    out, ev = _gate(base, tuned, cfg, direction="maximize", champion=twin)
    assert not out.promote and ev.over_champion is not None and ev.over_champion.low <= 0
    assert "gain_over_champion" in ev.table and "not the champion" in out.reason
    # A clearly worse champion is replaced.
    weak = _eval(tmp_path, "weak", base_rouge + 0.02)
    out, ev = _gate(base, tuned, cfg, direction="maximize", champion=weak)
    assert out.promote and ev.over_champion.low > 0 and "beats the champion" in out.reason


def test_champion_without_samples_falls_back_to_a_point_comparison(tmp_path: Path, base_rouge: np.ndarray) -> None:
    base, tuned = _eval(tmp_path, "base", base_rouge), _eval(tmp_path, "tuned", base_rouge + 0.1)
    cfg = PromotionConfig(metric="rougeL")
    out, _ = _gate(base, tuned, cfg, direction="maximize", champion_value=float(np.mean(base_rouge)) + 0.09)
    assert out.promote and "point comparison" in out.reason
    out, _ = _gate(base, tuned, cfg, direction="maximize", champion_value=float(np.mean(base_rouge)) + 0.2)
    assert not out.promote and "point comparison" in out.reason


def test_decide_interval_rule_against_the_margin() -> None:
    iv = GainInterval(gain=0.05, low=0.02, high=0.08, confidence=0.95, n=32, resamples=1000)
    kw = dict(metric="rougeL", direction="maximize", base=0.2, candidate=0.25, champion=None, over_base=iv)
    assert decide(min_improvement=0.01, **kw).promote
    assert not decide(min_improvement=0.02, **kw).promote  # the lower bound must exceed the margin strictly
    assert not decide(min_improvement=0.03, **kw).promote

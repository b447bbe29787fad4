"""The promotion gate's decision: per-example evidence, paired bootstrap intervals, the verdict.

Pure (no registry, no MLflow): ``gate_evidence`` pairs the base, tuned (and champion) evaluations
example by example on the gated metric (from each evaluation's samples Parquet) and bootstraps the
gains (``sftflow.stats.paired_bootstrap``); ``decide`` turns values and intervals into a
``GateOutcome``. ``tasks/promote.py`` reads the registry, calls these and records the result.

The rule: promote only when the lower bound of the gain over the base exceeds
``promotion.min_improvement`` and the candidate beats the champion (lower bound > 0 with the
champion's per-example values, strictly on its recorded value without them). A metric without
per-example values has no interval and is not promoted on its point gain unless
``allow_point_estimate``. With ``promotion.max_task_regression`` a candidate that passes is still
refused when, on any task of the held-out mixture (a ``source`` or ``category`` of its rows, see
``sftflow.breakdown``), the gated metric is worse for tuned than for base by more than that
margin; the reason names the task. Base and tuned scored by different judges
(``EvalResult.judge_sha256``) are not compared at all (``judge_mismatch``): a judge score, and a
decision on it, means nothing across two judges.

``ablation_choice`` (``augmentation.keep_if_helps``) picks the better of seed+curated and seed-only
before the gate runs, with the paired bootstrap interval of their difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from sftflow.breakdown import BREAKDOWNS, task_name, weighted_mean
from sftflow.config_sections import PromotionConfig
from sftflow.results import HELDOUT_SET, EvalResult
from sftflow.stats import MAXIMIZE, MINIMIZE, GainInterval, paired_bootstrap, resolve_direction, strip_label

# Fixed so that the same evaluations always give the same interval and decision (a re-run of the
# gate must not flip on the bootstrap's draw).
BOOTSTRAP_SEED = 0


# --------------------------------------------------------------------------- pure decision
@dataclass(frozen=True)
class GateOutcome:
    """The pure gate's verdict.

    Attributes:
        promote: move ``champion`` to the candidate.
        reason: one sentence with the numbers (and the intervals, when there are).
        gain_over_base: improvement over the base in the better direction (positive = better).
        gain_over_champion: same against the champion (None when there is none).
    """

    promote: bool
    reason: str
    gain_over_base: float
    gain_over_champion: float | None


def improvement(*, new: float, old: float, direction: str) -> float:
    """How much better ``new`` is than ``old`` (positive = better) for ``maximize``/``minimize``."""
    if direction == MAXIMIZE:
        return new - old
    if direction == MINIMIZE:
        return old - new
    raise ValueError(f"direction must be 'maximize' or 'minimize' (got {direction!r})")


def decide(
    *,
    metric: str,
    direction: str,
    min_improvement: float,
    base: float,
    candidate: float,
    champion: float | None,
    over_base: GainInterval | None = None,
    over_champion: GainInterval | None = None,
    allow_point_estimate: bool = False,
    max_task_regression: float | None = None,
    tasks: pd.DataFrame | None = None,
) -> GateOutcome:
    """Decide promotion from numbers alone (no I/O).

    Args:
        metric: metric name (for the reason text).
        direction: ``maximize`` or ``minimize`` (already resolved, see ``sftflow.stats.resolve_direction``).
        min_improvement: the margin the gain's lower bound must exceed (>= 0).
        base: the base model's value.
        candidate: the fine-tuned model's value.
        champion: the current champion's value on the same held-out data; None when there is none.
        over_base: the paired bootstrap interval of the candidate's gain over the base; None when
            the metric has no per-example values.
        over_champion: same against the champion; None when the champion's per-example values are
            unavailable (its recorded value is then compared as a point).
        allow_point_estimate: without ``over_base``, judge the point gain (> 0 and >=
            ``min_improvement``) instead of refusing.
        max_task_regression: refuse a candidate that passes when any task's gain over the base
            (``tasks``) is below ``-max_task_regression``; None: not checked.
        tasks: per-task gains (``task_gains``: columns ``task, n, base, tuned, gain_over_base``);
            None or empty with ``max_task_regression`` set refuses (the check cannot be made).

    Returns:
        GateOutcome. Promoted when the gain over the base is confidently above the margin
        (``over_base.low > min_improvement``), and the candidate beats the champion (when there is
        one): ``over_champion.low > 0``, or strictly on the point value without an interval.
        A NaN anywhere is never promoted.
    """
    outcome = _decide_overall(metric=metric, direction=direction, min_improvement=min_improvement, base=base,
                              candidate=candidate, champion=champion, over_base=over_base,
                              over_champion=over_champion, allow_point_estimate=allow_point_estimate)
    if not outcome.promote or max_task_regression is None:
        return outcome
    refusal = task_regression_refusal(tasks, metric=metric, margin=max_task_regression)
    if refusal is None:
        return GateOutcome(True, outcome.reason.removesuffix("; promoted")
                           + f"; no task regresses by more than {max_task_regression:.4f}; promoted",
                           outcome.gain_over_base, outcome.gain_over_champion)
    return GateOutcome(False, outcome.reason.removesuffix("; promoted") + f"; but {refusal}; not promoted",
                       outcome.gain_over_base, outcome.gain_over_champion)


def task_regression_refusal(tasks: pd.DataFrame | None, *, metric: str, margin: float) -> str | None:
    """Why the per-task check refuses (None: every task is within ``margin``).

    A task regresses when its gain over the base (positive = better) is below ``-margin``; the
    text names the worst task with its values and how many tasks regress.
    """
    if margin < 0:
        raise ValueError(f"max_task_regression must be >= 0 (got {margin})")
    if tasks is None or not len(tasks):
        return (f"promotion.max_task_regression is set and {metric} has no per-task values (the samples lack "
                "per-example values or source/category columns), so no task can be checked")
    known = tasks.dropna(subset=["gain_over_base"])
    bad = known[known["gain_over_base"] < -margin].sort_values("gain_over_base")
    if not len(bad):
        return None
    w = bad.iloc[0]
    more = f" ({len(bad)} tasks regress: {', '.join(bad['task'])})" if len(bad) > 1 else ""
    return (f"task {w['task']} regresses: {metric} {w['tuned']:.4f} vs base {w['base']:.4f} on {int(w['n'])} "
            f"examples (gain {w['gain_over_base']:+.4f} < -{margin:.4f} = -promotion.max_task_regression){more}")


def _decide_overall(*, metric: str, direction: str, min_improvement: float, base: float, candidate: float,
                    champion: float | None, over_base: GainInterval | None, over_champion: GainInterval | None,
                    allow_point_estimate: bool) -> GateOutcome:
    """``decide`` on the overall metric only (see there)."""
    if min_improvement < 0:
        raise ValueError(f"min_improvement must be >= 0 (got {min_improvement})")
    if math.isnan(candidate) or math.isnan(base):
        return GateOutcome(False, f"{metric} is NaN (candidate={candidate}, base={base}); not promoted",
                           math.nan, None)
    gain_base = improvement(new=candidate, old=base, direction=direction)
    better = "higher" if direction == MAXIMIZE else "lower"
    head = f"{metric} {candidate:.4f} vs base {base:.4f} ({better} is better)"
    if over_base is not None:
        head += f": gain {over_base.text()}"
        if not over_base.low > min_improvement:
            straddle = " (the interval includes no gain: noise)" if over_base.low <= 0 < over_base.high else ""
            return GateOutcome(False, f"{head}; lower bound {over_base.low:+.4f} <= required "
                                      f"{min_improvement:.4f}{straddle}; not promoted", gain_base, None)
    else:
        head += f": gain {gain_base:+.4f} (no per-example values: no interval)"
        if not allow_point_estimate:
            return GateOutcome(False, f"{head}; not promoted on a point estimate (a gain on a few examples can be "
                                      "noise; set promotion.allow_point_estimate to accept it)", gain_base, None)
        if gain_base <= 0 or gain_base < min_improvement:
            within = " (within the margin)" if gain_base > 0 else ""
            return GateOutcome(False, f"{head} < required {max(min_improvement, 0.0):.4f}{within}; not promoted",
                               gain_base, None)
    if champion is None:
        return GateOutcome(True, f"{head} >= {min_improvement:.4f}; no champion yet; promoted", gain_base, None)
    if math.isnan(champion):
        return GateOutcome(False, f"{head}; the champion's {metric} is NaN; not promoted (re-evaluate the champion)",
                           gain_base, math.nan)
    gain_champ = improvement(new=candidate, old=champion, direction=direction)
    if over_champion is not None:
        vs = f"the champion {champion:.4f}: gain {over_champion.text()}"
        beats = over_champion.low > 0
    else:
        vs = (f"the champion {champion:.4f}: gain {gain_champ:+.4f} (point comparison: the champion's "
              "per-example values are unavailable)")
        beats = gain_champ > 0
    if not beats:
        return GateOutcome(False, f"{head}; but not {vs}; not promoted", gain_base, gain_champ)
    return GateOutcome(True, f"{head}; and beats {vs}; promoted", gain_base, gain_champ)


def judge_mismatch(base: EvalResult, tuned: EvalResult) -> str | None:
    """Why base and tuned cannot be compared because different judges scored them (None: same judge).

    The judges are compared by content digest (``EvalResult.judge_sha256``): the same folder
    rewritten, another model, or one evaluation judged and the other not, all differ.
    """
    b, t = base.judge_sha256 or "", tuned.judge_sha256 or ""
    if b == t:
        return None

    def name(r: EvalResult, digest: str) -> str:
        if not digest:
            return "no judge"
        where = f" ({r.judge.name or r.judge.path})" if r.judge is not None else ""
        return f"judge {digest[:12]}{where}"

    return (f"base and tuned were scored by different judges ({base.label}: {name(base, b)}; {tuned.label}: "
            f"{name(tuned, t)}), so their evaluations are not comparable; evaluate both with one judge "
            "(evaluation.judge_model, default the pipeline's base model)")


def metric_name(cfg: PromotionConfig) -> str:
    """The configured metric without a ``base/``/``tuned/`` prefix (``tuned/rougeL`` -> ``rougeL``)."""
    return strip_label(cfg.metric)


# --------------------------------------------------------------------------- per-example evidence
# Per-example columns of the evaluation's samples Parquet (tasks/evaluate.py) behind each metric:
# the metric is the mean of these values over a set's rows (``eval_loss``: weighted by scored tokens).
def _per_example(df: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series] | None:
    """(values, weights) of ``metric`` per row of ``df``, or None when the samples lack them."""
    ones = pd.Series(1.0, index=df.index)
    if metric == "rougeL" and "rougeL" in df:
        return df["rougeL"].astype(float), ones
    if metric == "accuracy" and "correct" in df and df["correct"].notna().any():
        # Rows without a reference answer are NaN: the bootstrap and the per-task means skip them.
        return df["correct"].astype(float), ones
    if metric == "judge_score" and "judge" in df and df["judge"].notna().any():
        return df["judge"].astype(float), ones
    if metric == "runaway_rate" and "finished" in df:
        return (~df["finished"].astype(bool)).astype(float), ones
    if metric == "empty_rate" and "output" in df:
        return (df["output"].fillna("").str.strip() == "").astype(float), ones
    if metric == "eval_loss" and {"loss", "loss_tokens"} <= set(df.columns):
        return df["loss"].astype(float), df["loss_tokens"].astype(float)
    return None


def per_example_values(result: EvalResult, metric: str) -> pd.DataFrame | None:
    """The gated metric per example of its set: columns ``set, id, _n, value, weight`` (plus ``source`` and
    ``category`` when the samples have them); None if unavailable.

    ``metric`` is unprefixed (``rougeL``) for the held-out set or ``<set>/<metric>`` for an extra set.
    ``_n`` numbers repeated ids within a set, so duplicates pair up by position.
    """
    set_name, _, bare = metric.rpartition("/")
    set_name = set_name or HELDOUT_SET
    df = pd.read_parquet(result.samples.path)
    if not len(df) or not {"set", "id"} <= set(df.columns):
        return None
    df = df[df["set"] == set_name].reset_index(drop=True)
    got = _per_example(df, bare) if len(df) else None
    if got is None:
        return None
    out = df[["set", "id"] + [c for c, _ in BREAKDOWNS if c in df]].copy()
    out["_n"] = out.groupby(["set", "id"]).cumcount()
    out["value"], out["weight"] = got[0].to_numpy(), got[1].to_numpy()
    return out


@dataclass(frozen=True)
class GateEvidence:
    """The per-example comparison behind a decision.

    Attributes:
        direction: the resolved direction.
        over_base / over_champion: paired bootstrap intervals of the candidate's gain (None: no
            per-example values for that pair).
        table: one row per example: ``set, id, base, tuned, gain_over_base`` (+ ``champion,
            gain_over_champion`` when available); gains are sign-adjusted (positive = better).
            Empty when the metric has no per-example values.
        tasks: per task of the mixture (``task_gains``): ``task, n, base, tuned, gain_over_base``.
    """

    direction: str
    over_base: GainInterval | None
    over_champion: GainInterval | None
    table: pd.DataFrame
    tasks: pd.DataFrame = field(default_factory=pd.DataFrame)


def task_gains(pairs: pd.DataFrame, *, direction: str) -> pd.DataFrame:
    """The gated metric per task (``by_source/<name>``, ``by_category/<name>``) for base and tuned.

    Each task's value is the weighted mean of its examples (the same aggregation as the overall
    metric, so the tasks' values weighted by ``weight`` sum back to it); examples without a finite
    value for both models are left out.

    Returns:
        Columns ``task, n, weight, base, tuned, gain_over_base`` (gain sign-adjusted, positive =
        better), one row per task; empty when ``pairs`` has no source/category column.
    """
    sign = 1.0 if direction == MAXIMIZE else -1.0
    rows = []
    both = pairs[pairs["base"].notna() & pairs["tuned"].notna()]
    for column, prefix in BREAKDOWNS:
        if column not in both:
            continue
        names = both[column].map(lambda v, c=column: task_name(v, column=c))
        for name, grp in both.groupby(names, sort=True):
            b, w = weighted_mean(grp["base"], grp["weight"])
            t, _ = weighted_mean(grp["tuned"], grp["weight"])
            rows.append({"task": f"{prefix}/{name}", "n": len(grp), "weight": w, "base": b, "tuned": t,
                         "gain_over_base": sign * (t - b)})
    return pd.DataFrame(rows, columns=["task", "n", "weight", "base", "tuned", "gain_over_base"])


def _interval(pairs: pd.DataFrame, *, old: str, new: str, direction: str, cfg: PromotionConfig) -> GainInterval:
    return paired_bootstrap(base=pairs[old].to_numpy(), tuned=pairs[new].to_numpy(), weights=pairs["weight"].to_numpy(),
                            direction=direction, resamples=cfg.bootstrap_samples, confidence=cfg.confidence,
                            seed=BOOTSTRAP_SEED)


def gate_evidence(*, base: EvalResult, tuned: EvalResult, champion: EvalResult | None, cfg: PromotionConfig,
                  direction: str) -> GateEvidence:
    """Pair base, tuned (and champion) per example on the gated metric and bootstrap the gains.

    Examples are joined on (set, id, position); only examples both models were scored on count.
    The weight of an example is the tuned evaluation's (scored tokens for a loss; 1 otherwise).
    """
    metric = metric_name(cfg)
    b, t = per_example_values(base, metric), per_example_values(tuned, metric)
    if b is None or t is None:
        return GateEvidence(direction, None, None, pd.DataFrame())
    keys = ["set", "id", "_n"]
    # Task columns come from the tuned side (both evaluated the same held-out rows).
    pairs = b[keys + ["value"]].rename(columns={"value": "base"}).merge(
        t.rename(columns={"value": "tuned"}), on=keys, how="inner", validate="one_to_one")
    sign = 1.0 if direction == MAXIMIZE else -1.0
    pairs["gain_over_base"] = sign * (pairs["tuned"] - pairs["base"])
    over_base = _interval(pairs, old="base", new="tuned", direction=direction, cfg=cfg) if len(pairs) else None
    over_champion = None
    c = per_example_values(champion, metric) if champion is not None else None
    if c is not None:
        pairs = pairs.merge(c[keys + ["value"]].rename(columns={"value": "champion"}), on=keys, how="left",
                            validate="one_to_one")
        pairs["gain_over_champion"] = sign * (pairs["tuned"] - pairs["champion"])
        both = pairs.dropna(subset=["champion"])
        if len(both):
            over_champion = _interval(both, old="champion", new="tuned", direction=direction, cfg=cfg)
    tasks = task_gains(pairs, direction=direction)
    return GateEvidence(direction, over_base, over_champion,
                        pairs.drop(columns=["_n"] + [c for c, _ in BREAKDOWNS if c in pairs]), tasks)


def per_example_markdown(evidence: GateEvidence, *, limit: int, width: int = 40) -> str:
    """The gate's per-example table as Markdown (first ``limit`` rows; ids cut to ``width``)."""
    df = evidence.table
    if not len(df):
        return "(no per-example values for the gated metric)"
    cols = [c for c in ("id", "base", "tuned", "gain_over_base", "champion", "gain_over_champion") if c in df]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.head(limit).iterrows():
        cells = [str(row[c])[:width] if c == "id" else ("" if pd.isna(row[c]) else f"{row[c]:.4f}") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    if len(df) > limit:
        lines.append(f"({len(df) - limit} more rows in the promote run's promotion/per_example.json)")
    return "\n".join(lines)


def interval_lines(evidence: GateEvidence | None) -> str:
    """One line per interval, for descriptions and the Prefect summary ("" without evidence)."""
    if evidence is None:
        return ""
    out = [f"Gain over base: {evidence.over_base.text()} ({evidence.over_base.resamples} paired bootstrap "
           f"resamples)." if evidence.over_base else "Gain over base: no per-example values, no interval."]
    if evidence.over_champion is not None:
        out.append(f"Gain over champion: {evidence.over_champion.text()}.")
    return "\n".join(out)



# --------------------------------------------------------------------------- keep_if_helps (the ablation)
CURATED = "seed+curated"
SEED_ONLY = "seed-only"


@dataclass(frozen=True)
class AblationChoice:
    """Seed+curated vs seed-only at equal steps (``augmentation.ablation``) and which one is registered.

    Attributes:
        keep: ``CURATED`` or ``SEED_ONLY``: the better of the two on the promotion metric (a tie keeps
            seed+curated, the configured recipe).
        metric / direction: the promotion metric (unprefixed) and its direction.
        curated / seed_only: the two models' values of the metric on the held-out set.
        difference: paired bootstrap interval of seed+curated minus seed-only (positive = curation
            helped; ``promotion.bootstrap_samples`` / ``confidence``, seed ``BOOTSTRAP_SEED``); None
            without per-example values.
        reason: one sentence with the numbers: which is kept and why.
    """

    keep: str
    metric: str
    direction: str
    curated: float
    seed_only: float
    difference: GainInterval | None
    reason: str

    def markdown(self) -> str:
        """The side-by-side table with the interval of the difference and the choice."""
        diff = self.difference.text() if self.difference else "no per-example values, no interval"
        return "\n".join([
            f"Ablation (equal steps), {self.metric} ({self.direction}):", "",
            "| model | value |", "|---|---|", f"| {CURATED} | {self.curated:.4f} |",
            f"| {SEED_ONLY} | {self.seed_only:.4f} |", "",
            f"Seed+curated minus seed-only: {diff}.", f"Registered: **{self.keep}**. {self.reason}"])

    def tags(self) -> dict[str, str]:
        """Model-version tags: which model was kept, why, and the interval of the difference."""
        return {"sftflow.ablation.kept": self.keep, "sftflow.ablation.reason": self.reason[:5000],
                "sftflow.ablation.curated": repr(self.curated), "sftflow.ablation.seed_only": repr(self.seed_only),
                "sftflow.ablation.difference": self.difference.text() if self.difference else "none"}

    def summary(self) -> dict[str, object]:
        """JSON-able figures for the flow's summary."""
        d = self.difference
        return {"kept": self.keep, "metric": self.metric, CURATED: self.curated, SEED_ONLY: self.seed_only,
                "difference": None if d is None else {"gain": d.gain, "low": d.low, "high": d.high,
                                                      "confidence": d.confidence, "n": d.n},
                "reason": self.reason}


def ablation_choice(*, curated: EvalResult, seed_only: EvalResult, cfg: PromotionConfig) -> AblationChoice:
    """Which of seed+curated and seed-only to register (``augmentation.keep_if_helps``).

    The better on the promotion metric's value (in its direction) is kept; the paired bootstrap
    interval of the difference (same examples, same resamples as the gate's) says how sure that is.
    The gate then compares the kept model with the base as usual.

    Raises:
        sftflow.config_sections.ConfigError: ``promotion.direction`` contradicts the metric.
    """
    direction = resolve_direction(metric=cfg.metric, direction=cfg.direction)
    metric = metric_name(cfg)
    c_value, s_value = curated.metric(metric), seed_only.metric(metric)
    interval = None
    c, s = per_example_values(curated, metric), per_example_values(seed_only, metric)
    if c is not None and s is not None:
        keys = ["set", "id", "_n"]
        pairs = s[keys + ["value"]].rename(columns={"value": "base"}).merge(
            c[keys + ["value", "weight"]].rename(columns={"value": "tuned"}), on=keys, validate="one_to_one")
        if len(pairs):
            interval = _interval(pairs, old="base", new="tuned", direction=direction, cfg=cfg)
    sign = 1.0 if direction == MAXIMIZE else -1.0
    gain = sign * (c_value - s_value)
    if math.isnan(gain) or gain >= 0:
        keep = CURATED
        why = (f"seed+curated {metric} {c_value:.4f} vs seed-only {s_value:.4f}: the curated pairs "
               + ("did not hurt" if gain == 0 else "helped" if gain > 0 else "could not be compared") + ", kept")
    else:
        keep = SEED_ONLY
        why = (f"seed-only {metric} {s_value:.4f} beats seed+curated {c_value:.4f}: the curated pairs did not "
               "help, so the seed-only model is registered (augmentation.keep_if_helps)")
    if interval is not None:
        why += f"; seed+curated minus seed-only {interval.text()}"
    return AblationChoice(keep=keep, metric=metric, direction=direction, curated=c_value, seed_only=s_value,
                          difference=interval, reason=why)

"""Promotion gate: does the fine-tuned model earn the registry alias ``champion``?

Inputs are the two evaluations of the flow (``base`` and ``tuned``, same held-out data, same
settings) and the model version the train stage registered (alias ``candidate`` already set).

The gate (``sftflow.gate.decide``, a pure function) promotes the new version only when, on the pipeline's chosen
metric (``promotion.metric``; its better direction is implied by the metric, see ``sftflow.stats``,
and an explicit ``promotion.direction`` that contradicts it is refused):

1. it beats the base model with confidence: a paired bootstrap over the held-out examples
   (``promotion.bootstrap_samples`` resamples, seeded) gives a ``promotion.confidence`` interval of
   the per-example gain, and its lower bound must exceed ``promotion.min_improvement``. A metric
   without per-example values in the samples (``eval_loss`` until the evaluation writes per-row
   losses) has no interval: its point gain is reported and it is not promoted on it (unless
   ``promotion.allow_point_estimate`` is set), and
2. it beats the current ``champion`` on the same held-out data: the interval's lower bound against
   the champion must exceed 0 when the champion's per-example values exist (it was re-evaluated
   here); otherwise (recorded numbers only) the candidate must beat its value strictly, and the
   reason says the comparison was a point comparison. A champion evaluated on another held-out set
   or with other settings (its recorded ``sftflow.eval.key`` differs, the judge's digest included)
   is re-evaluated on this run's held-out set first, so the comparison is like for like.

Base and tuned scored by different judges (``EvalResult.judge_sha256``) are refused before any
number is compared (``sftflow.gate.judge_mismatch``); the judge's digest is recorded in the
decision (``PromotionDecision.judge_sha256``) and on the model version (``sftflow.eval.judge_sha256``).

``promote`` only reads (the registry's current champion, a re-evaluation when needed) and returns
the decision; ``promote_task`` applies it (``record_decision``: the alias move through
``sftflow.tracking.registry``, tags and description on the version). Whatever the outcome, the
decision and its numbers are written to the model version and to the run (metrics,
``promotion/decision.json``). The stage also logs the
base-vs-tuned deltas (``delta/<metric>``) and the side-by-side table (prompt, reference, base
output, tuned output, per-row ROUGE-L) as an MLflow table, an HTML page and a Prefect table, and the
gate's per-example table (the gated metric for base, tuned, champion, and the gains) as
``promotion/per_example.*``; the interval and that table are also on the model version.

Per task: beside the metrics table, ``per_task_markdown`` shows the held-out metrics of each
source and category of the mixture (``by_source/…``, ``by_category/…``, see ``sftflow.breakdown``)
for base and tuned, and with ``promotion.max_task_regression`` the gate refuses a candidate whose
gated metric regresses on any task by more than that margin (``sftflow.gate.decide``).
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from sftflow.breakdown import BREAKDOWN_PREFIXES, task_groups
from sftflow.config_sections import EvaluationConfig, PromotionConfig, TrainingConfig
from sftflow.ops.orchestration import IO_RETRIES, retry_unless, markdown_artifact, table_artifact
from sftflow.data.refs import DatasetRef
from sftflow.results import EvalResult, PromotionDecision, TrainResult
from sftflow.gate import (
    AblationChoice,
    GateEvidence,
    decide,
    gate_evidence,
    interval_lines,
    judge_mismatch,
    metric_name,
    per_example_markdown,
)
from sftflow.stats import resolve_direction
from sftflow.tracking.registry import CHAMPION, model_version_ref, set_alias, set_version_tags, version_by_alias
from sftflow.tracking.runs import StageContext, log_json, stage_run

# Evaluates a registered champion on this run's held-out set and settings, called as
# ``evaluate_champion(model=, heldout=, evaluation=, training=, template=, out_dir=, judge=)``
# (the flow passes the evaluation stage's function; stages do not import each other).
ChampionEvaluator = Callable[..., EvalResult]
# Tags written on every model version the gate looks at; a later gate reads them back.
TAG_DECISION = "sftflow.gate.decision"
TAG_REASON = "sftflow.gate.reason"
TAG_METRIC = "sftflow.gate.metric"
TAG_VALUE = "sftflow.gate.value"
TAG_BASE_VALUE = "sftflow.gate.base_value"
TAG_CHAMPION_VALUE = "sftflow.gate.champion_value"
TAG_CHAMPION_VERSION = "sftflow.gate.champion_version"
TAG_EVAL_KEY = "sftflow.eval.key"
TAG_HELDOUT = "sftflow.eval.heldout_sha256"
TAG_JUDGE = "sftflow.eval.judge_sha256"
TAG_EVAL_METRICS = "sftflow.eval.metrics"
TAG_RUN = "sftflow.gate.run_id"
TAG_CI = "sftflow.gate.ci"
TAG_CHAMPION_CI = "sftflow.gate.champion_ci"


def deltas(base: EvalResult, tuned: EvalResult) -> dict[str, float]:
    """tuned - base for every metric both evaluations have (timings excluded)."""
    b, t = base.metrics_dict(), tuned.metrics_dict()
    return {k: t[k] - b[k] for k in sorted(set(b) & set(t)) if not k.endswith("eval_seconds")}


def side_by_side(base: EvalResult, tuned: EvalResult) -> pd.DataFrame:
    """One row per evaluated example: prompt, reference, base/tuned outputs and ROUGE-L."""
    b = pd.read_parquet(base.samples.path)
    t = pd.read_parquet(tuned.samples.path)
    keep = ["set", "id", "source", "category", "prompt", "reference", "output", "rougeL", "judge", "answer",
            "pred_answer", "correct"]
    shared = ("prompt", "reference", "source", "category", "answer")
    b = b[[c for c in keep if c in b.columns]].rename(
        columns={"output": "base_output", "rougeL": "base_rougeL", "judge": "base_judge",
                 "pred_answer": "base_pred_answer", "correct": "base_correct"})
    t = t[[c for c in keep if c in t.columns and c not in shared]].rename(
        columns={"output": "tuned_output", "rougeL": "tuned_rougeL", "judge": "tuned_judge",
                 "pred_answer": "tuned_pred_answer", "correct": "tuned_correct"})
    # Rows may repeat an id (duplicate prompts in an extra set): pair them by position within (set, id).
    b["_n"] = b.groupby(["set", "id"]).cumcount()
    t["_n"] = t.groupby(["set", "id"]).cumcount()
    df = b.merge(t, on=["set", "id", "_n"], how="outer", validate="one_to_one").drop(columns="_n")
    df["delta_rougeL"] = df["tuned_rougeL"] - df["base_rougeL"]
    return df


# Held-out metrics of the side-by-side metrics table, in reading order (those an evaluation lacks are left out).
SIDE_BY_SIDE_METRICS = ("rougeL", "accuracy", "judge_score", "eval_loss", "answer_loss", "end_prob", "runaway_rate",
                        "runaway_rate_all", "fit_fraction", "mean_new_tokens", "max_new_tokens", "num_examples",
                        "accuracy_examples", "format_spread", "format_std")


def metrics_markdown(base: EvalResult, tuned: EvalResult, champion: EvalResult | None = None,
                     others: Sequence[EvalResult] = ()) -> str:
    """The held-out metrics of base, tuned (and a re-evaluated champion, and ``others`` such as the
    seed-only ablation, one column each by label) side by side, with tuned - base.

    ``answer_loss`` is the loss on answer tokens without the end marker, ``end_prob`` the mean
    probability of the end-of-turn token where the reference ends, ``runaway_rate`` counts only
    references that fit in ``max_new_tokens`` (``runaway_rate_all``: every row).
    """
    b, t = base.metrics_dict(), tuned.metrics_dict()
    extra = ([("champion", champion.metrics_dict())] if champion is not None else []) + [
        (o.label, o.metrics_dict()) for o in others]
    head = "| metric | base | tuned | tuned - base |" + "".join(f" {label} |" for label, _ in extra)
    lines = [head, "|---|---|---|---|" + "---|" * len(extra)]

    def fmt(v: float | None) -> str:
        return "-" if v is None or not math.isfinite(v) else f"{v:.4g}"

    # Format robustness: ROUGE-L under each prompt wrapper, after the fixed rows.
    wrappers = sorted({k for k in (*b, *t) if k.startswith("format/")}, key=lambda k: (k.endswith("accuracy"), k))
    for m in (*SIDE_BY_SIDE_METRICS, *wrappers):
        if m not in b and m not in t:
            continue
        bv, tv = b.get(m), t.get(m)
        delta = tv - bv if bv is not None and tv is not None else None
        row = f"| {m} | {fmt(bv)} | {fmt(tv)} | {fmt(delta)} |"
        row += "".join(f" {fmt(d.get(m))} |" for _, d in extra)
        lines.append(row)
    return "\n".join(lines)


# Metrics of the per-task table, in reading order (those no task has are left out).
PER_TASK_METRICS = ("rougeL", "accuracy", "eval_loss")


def per_task_markdown(base: EvalResult, tuned: EvalResult, champion: EvalResult | None = None,
                      others: Sequence[EvalResult] = ()) -> str:
    """The held-out metrics per task (each ``source`` and ``category`` of the mixture) side by side.

    One row per task (``by_source/<name>``, ``by_category/<name>``) with its example count and, for
    ``rougeL``, ``accuracy`` (rows with a reference answer only) and ``eval_loss``: base, tuned and
    tuned - base (plus one column per champion / other evaluation). "" when the evaluations have
    no per-task metrics.
    """
    b, t = base.metrics_dict(), tuned.metrics_dict()
    extra = ([("champion", champion.metrics_dict())] if champion is not None else []) + [
        (o.label, o.metrics_dict()) for o in others]
    groups = task_groups({**b, **t})
    tasks = [f"{prefix}/{name}" for prefix in (p.rstrip("/") for p in BREAKDOWN_PREFIXES)
             for name in groups.get(prefix, [])]
    if not tasks:
        return ""
    metrics = [m for m in PER_TASK_METRICS if any(f"{task}/{m}" in d for task in tasks for d in (b, t))]

    def fmt(v: float | None) -> str:
        return "-" if v is None or not math.isfinite(v) else f"{v:.4g}"

    head = "| task | n |" + "".join(f" {m} base | {m} tuned | {m} Δ |" + "".join(f" {m} {label} |" for label, _ in extra)
                                    for m in metrics)
    lines = [head, "|---|---|" + "---|" * (len(metrics) * (3 + len(extra)))]
    for task in tasks:
        n = t.get(f"{task}/num_examples", b.get(f"{task}/num_examples"))
        row = f"| {task} | {fmt(n)} |"
        for m in metrics:
            bv, tv = b.get(f"{task}/{m}"), t.get(f"{task}/{m}")
            delta = tv - bv if bv is not None and tv is not None else None
            row += f" {fmt(bv)} | {fmt(tv)} | {fmt(delta)} |" + "".join(f" {fmt(d.get(f'{task}/{m}'))} |"
                                                                     for _, d in extra)
        lines.append(row)
    return "\n".join(lines)


def _overall_metrics(metrics: Sequence[tuple[str, float]]) -> dict[str, float]:
    """The finite metrics without the per-task breakdown (which can be long: tags hold 5000 characters)."""
    return {k: v for k, v in metrics if math.isfinite(v) and not k.startswith(BREAKDOWN_PREFIXES)}


# --------------------------------------------------------------------------- the registry record
def recorded_value(mv: Any, *, metric: str, key: str) -> float | None:
    """The champion's ``metric`` from its tags, when it was evaluated under the same ``eval_key``."""
    tags = mv.tags or {}
    if tags.get(TAG_EVAL_KEY) != key or TAG_EVAL_METRICS not in tags:
        return None
    try:
        value = json.loads(tags[TAG_EVAL_METRICS]).get(metric)
    except (ValueError, AttributeError):
        return None
    return None if value is None else float(value)


# Model version descriptions are stored in a 5000-character column.
_DESCRIPTION_LIMIT = 5000


def record_on_version(client: Any, *, name: str, version: str, decision: PromotionDecision, tuned: EvalResult,
                      run_id: str, evidence: GateEvidence | None = None, metrics_md: str = "") -> None:
    """Write the gate's decision and numbers on the model version (tags + description).

    With ``evidence`` the intervals go to tags (``sftflow.gate.ci``, ``sftflow.gate.champion_ci``)
    and the description carries them and as much of the per-example table as fits.
    """
    tags = {
        TAG_DECISION: "promoted" if decision.promoted else "rejected",
        TAG_REASON: decision.reason[:5000],
        TAG_METRIC: f"{decision.metric} ({decision.direction}, min_improvement={decision.min_improvement})",
        TAG_VALUE: repr(decision.tuned_value),
        TAG_BASE_VALUE: repr(decision.base_value),
        TAG_CHAMPION_VALUE: "" if decision.champion_value is None else repr(decision.champion_value),
        TAG_CHAMPION_VERSION: decision.champion_version,
        TAG_EVAL_KEY: tuned.eval_key,
        TAG_HELDOUT: tuned.heldout_sha256,
        TAG_JUDGE: tuned.judge_sha256,
        # Overall metrics only: a tag truncated mid-JSON would hide the champion's recorded value.
        TAG_EVAL_METRICS: json.dumps(_overall_metrics(tuned.metrics), sort_keys=True)[:5000],
        TAG_RUN: run_id,
    }
    if evidence is not None:
        tags[TAG_CI] = evidence.over_base.text() if evidence.over_base else "none (no per-example values)"
        if evidence.over_champion is not None:
            tags[TAG_CHAMPION_CI] = evidence.over_champion.text()
    set_version_tags(client, name=name, version=version, tags=tags)
    champ = ("none" if decision.champion_value is None
             else f"v{decision.champion_version} = {decision.champion_value:.4f}"
             + (" (re-evaluated on this held-out set)" if decision.champion_reevaluated else ""))
    description = (
        f"Promotion gate: {'PROMOTED to champion' if decision.promoted else 'not promoted'}.\n"
        f"{decision.metric} ({decision.direction}, min improvement {decision.min_improvement}): "
        f"tuned {decision.tuned_value:.4f}, base {decision.base_value:.4f}, champion {champ}.\n"
        f"{decision.reason}\n{interval_lines(evidence)}\n"
        f"Held-out sha256: {tuned.heldout_sha256}. Gate run: {run_id}."
    )
    if metrics_md:
        description += f"\n\nHeld-out metrics:\n{metrics_md}"
    if evidence is not None and len(evidence.table):
        # As many per-example rows as fit (the full table is the run's promotion/per_example.json).
        for limit in (len(evidence.table), 50, 20, 5):
            full = f"{description}\n\nPer example ({decision.metric}):\n{per_example_markdown(evidence, limit=limit)}"
            if len(full) <= _DESCRIPTION_LIMIT:
                description = full
                break
    client.update_model_version(name, version, description=description[:_DESCRIPTION_LIMIT])


# --------------------------------------------------------------------------- the stage
def promote(
    *,
    base: EvalResult,
    tuned: EvalResult,
    registered_name: str,
    registered_version: str,
    cfg: PromotionConfig,
    heldout: DatasetRef | None,
    evaluation: EvaluationConfig,
    training: TrainingConfig,
    out_dir: Path,
    client: Any = None,
    evaluate_champion: ChampionEvaluator | None = None,
) -> tuple[PromotionDecision, EvalResult | None]:
    """Decide whether the candidate version becomes champion. Reads the registry, writes nothing to it.

    Args:
        base / tuned: the two evaluations of this run.
        registered_name / registered_version: the candidate model version ("" when not registered).
        cfg: the ``promotion`` section.
        heldout / evaluation / training: what a champion re-evaluation needs (same data and settings).
        out_dir: where a re-evaluated champion's model download and samples go.
        client: an ``MlflowClient`` (default: one for the configured tracking URI).
        evaluate_champion: evaluates the current champion when its recorded numbers come from
            another held-out set or other settings (see ``ChampionEvaluator``).

    Returns:
        (decision, the champion's re-evaluation or None). Apply the decision with ``record_decision``.

    Raises:
        ValueError: the champion must be re-evaluated and no ``evaluate_champion`` was given.
        sftflow.config_sections.ConfigError: ``promotion.direction`` contradicts the metric, or the metric
            implies no direction and none is set.
    """
    from mlflow import MlflowClient

    # Refused before anything is read: a contradictory direction would promote a worse model.
    direction = resolve_direction(metric=cfg.metric, direction=cfg.direction)
    client = client or MlflowClient()
    metric = metric_name(cfg)
    base_value, tuned_value = base.metric(metric), tuned.metric(metric)
    d = tuple(deltas(base, tuned).items())
    common = dict(metric=metric, direction=direction, min_improvement=cfg.min_improvement,
                  base_value=base_value, tuned_value=tuned_value, registered_name=registered_name,
                  registered_version=str(registered_version or ""), deltas=d, judge_sha256=tuned.judge_sha256)
    mismatch = judge_mismatch(base, tuned)
    if mismatch is not None:
        # Refused before the registry is read: no number of these two evaluations may be compared.
        return PromotionDecision(promoted=False, reason=f"{mismatch}; not promoted", champion_value=None,
                                 champion_version="", champion_reevaluated=False, **common), None
    if not registered_name or not registered_version:
        return PromotionDecision(promoted=False, reason="no registered model version to promote",
                                 champion_value=None, champion_version="", champion_reevaluated=False,
                                 **common), None

    champ_mv = version_by_alias(client, registered_name, CHAMPION)
    champion_value: float | None = None
    champion_eval: EvalResult | None = None
    if champ_mv is not None and str(champ_mv.version) == str(registered_version):
        # The candidate already is the champion (e.g. a cached re-run): nothing to move.
        return PromotionDecision(promoted=True, reason=f"version {registered_version} already holds champion",
                                 champion_value=tuned_value, champion_version=str(champ_mv.version),
                                 champion_reevaluated=False, **common), None
    if champ_mv is not None:
        champion_value = recorded_value(champ_mv, metric=metric, key=tuned.eval_key)
        if champion_value is None:
            # Its recorded numbers come from another held-out set or other settings: evaluate it here.
            if evaluate_champion is None:
                raise ValueError(f"champion {registered_name}/{champ_mv.version} was evaluated on another held-out "
                                 "set or with other settings; pass evaluate_champion to re-evaluate it")
            ref = model_version_ref(client, champ_mv, download_dir=out_dir / "champion_model")
            # Prompted the way it was trained (its own template), on this run's data and settings.
            template = ref.meta_dict().get("template") or training.template
            # Scored by the judge that scored base and tuned, not by itself.
            champion_eval = evaluate_champion(model=ref, heldout=heldout, evaluation=evaluation, training=training,
                                              template=template, out_dir=out_dir, judge=tuned.judge or base.judge)
            champion_value = champion_eval.metric(metric)

    evidence = gate_evidence(base=base, tuned=tuned, champion=champion_eval, cfg=cfg, direction=direction)
    outcome = decide(metric=metric, direction=direction, min_improvement=cfg.min_improvement,
                     base=base_value, candidate=tuned_value, champion=champion_value,
                     over_base=evidence.over_base, over_champion=evidence.over_champion,
                     allow_point_estimate=cfg.allow_point_estimate,
                     max_task_regression=cfg.max_task_regression, tasks=evidence.tasks)
    decision = PromotionDecision(
        promoted=outcome.promote, reason=outcome.reason, champion_value=champion_value,
        champion_version="" if champ_mv is None else str(champ_mv.version),
        champion_reevaluated=champion_eval is not None, **common,
        ci_low=None if evidence.over_base is None else evidence.over_base.low,
        ci_high=None if evidence.over_base is None else evidence.over_base.high,
        confidence=cfg.confidence,
        n_examples=0 if evidence.over_base is None else evidence.over_base.n,
        champion_ci_low=None if evidence.over_champion is None else evidence.over_champion.low,
        champion_ci_high=None if evidence.over_champion is None else evidence.over_champion.high,
    )
    return decision, champion_eval


def record_decision(client: Any, decision: PromotionDecision, *, tuned: EvalResult, run_id: str,
                    evidence: GateEvidence | None = None, metrics_md: str = "") -> None:
    """Apply a decision to the registry: move ``champion`` when promoted, record the numbers on the version.

    A decision without a registered version changes nothing; a candidate that already holds
    ``champion`` keeps it (only its record is refreshed). ``evidence`` (``gate_evidence``) adds the
    intervals and the per-example table to the version's record.
    """
    name, version = decision.registered_name, decision.registered_version
    if not name or not version:
        return
    if decision.promoted and decision.champion_version != version:
        set_alias(client, name=name, alias=CHAMPION, version=version)
    record_on_version(client, name=name, version=version, decision=decision, tuned=tuned, run_id=run_id,
                      evidence=evidence, metrics_md=metrics_md)


def _markdown_table(df: pd.DataFrame, *, limit: int, width: int = 160) -> str:
    def cell(v: Any) -> str:
        s = f"{v:.3f}" if isinstance(v, float) else str(v)
        s = s.replace("|", "\\|").replace("\n", " ")
        return s if len(s) <= width else s[: width - 1] + "…"

    cols = ["set", "prompt", "reference", "base_output", "tuned_output", "base_rougeL", "tuned_rougeL"]
    cols = [c for c in cols if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.head(limit).iterrows():
        lines.append("| " + " | ".join(cell(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def _tasks_table(tasks: pd.DataFrame) -> str:
    """The gate's per-task table (``GateEvidence.tasks``) as Markdown."""
    lines = ["| task | n | base | tuned | gain_over_base |", "|---|---|---|---|---|"]
    for _, r in tasks.iterrows():
        lines.append(f"| {r['task']} | {int(r['n'])} | {r['base']:.4f} | {r['tuned']:.4f} | {r['gain_over_base']:+.4f} |")
    return "\n".join(lines)


# Never served from cache: the gate reads the registry (current champion), which changes between runs.
@task(name="promote", cache_policy=NO_CACHE, persist_result=True, **IO_RETRIES, retry_condition_fn=retry_unless())
def promote_task(
    base: EvalResult,
    tuned: EvalResult,
    train: TrainResult | None,
    cfg: PromotionConfig,
    *,
    ctx: StageContext,
    heldout: DatasetRef,
    evaluation: EvaluationConfig,
    training: TrainingConfig,
    evaluate_champion: ChampionEvaluator | None = None,
    others: Sequence[EvalResult] = (),
    ablation: AblationChoice | None = None,
    note: str = "",
) -> PromotionDecision:
    """Prefect task: side-by-side table, deltas, and the promotion gate, in the nested run ``promote``.

    Retried on failure: everything here is registry/file I/O (a champion re-evaluation repeats
    deterministically).

    Args:
        base / tuned: the evaluations of the base and the fine-tuned model.
        train: the train stage's result (its registered version is the candidate); None when
            nothing was trained, which promotes nothing.
        cfg: the ``promotion`` section.
        ctx: the flow's tracking context.
        heldout / evaluation / training: what a champion re-evaluation needs.
        evaluate_champion: the evaluation stage's champion evaluator (``ChampionEvaluator``).
        others: further evaluations shown beside base and tuned (e.g. the seed-only ablation);
            they do not take part in the decision.
        ablation: seed+curated vs seed-only (``sftflow.gate.ablation_choice``): its table and the
            interval of the difference go in the summary, the version's description and tags
            (``sftflow.ablation.*``: which model ``augmentation.keep_if_helps`` registered and why).
        note: lines about how the training data was made (the curation method, its AUCs and the
            min_auc checks, ``sftflow.augment.report.curation_note``): in the summary, the version's
            description and its tag ``sftflow.data.note``.

    Raises:
        TypeError: ``train`` is neither a ``TrainResult`` nor None (a wiring mistake in the flow
            must not read as "no model to promote").
    """
    import mlflow
    from mlflow import MlflowClient

    if train is not None and not isinstance(train, TrainResult):
        raise TypeError(f"promote_task: train must be the train stage's TrainResult or None, got {type(train).__name__}")

    stage = "promote"
    with stage_run(ctx, stage) as run:
        out_dir = ctx.stage_dir(stage)
        client = MlflowClient()
        parent = ctx.parent_run_id

        # Read champion -> compare -> move alias as one critical section per pipeline, so a manual
        # run and a scheduled run finishing together cannot both crown themselves.
        from sftflow.ops.guards import pipeline_lock

        with pipeline_lock(ctx.pipeline, what="registry"):
            decision, champion_eval = promote(
                base=base, tuned=tuned, registered_name=train.registered_name if train else "",
                registered_version=train.registered_version if train else "", cfg=cfg, heldout=heldout,
                evaluation=evaluation, training=training, out_dir=out_dir, client=client,
                evaluate_champion=evaluate_champion,
            )
            # Deterministic (fixed seed): the same intervals ``promote`` decided on.
            evidence = gate_evidence(base=base, tuned=tuned, champion=champion_eval, cfg=cfg,
                                     direction=decision.direction)
            metrics_md = metrics_markdown(base, tuned, champion_eval, others)
            tasks_md = per_task_markdown(base, tuned, champion_eval, others)
            if tasks_md:
                metrics_md += f"\n\nPer task (held-out source and category):\n\n{tasks_md}"
            if ablation is not None:  # said before the per-task numbers would push it out of the description
                metrics_md = f"{ablation.markdown()}\n\n{metrics_md}"
            if note:
                metrics_md = f"{note}\n\n{metrics_md}"
                if decision.registered_name and decision.registered_version:
                    set_version_tags(client, name=decision.registered_name, version=decision.registered_version,
                                     tags={"sftflow.data.note": note[:5000]})
            record_decision(client, decision, tuned=tuned, run_id=run.info.run_id, evidence=evidence,
                            metrics_md=metrics_md)

        verdict = (f"**Promotion gate: {'promoted' if decision.promoted else 'not promoted'}.** {decision.reason}\n\n"
                   f"{interval_lines(evidence)}\n\n{metrics_md}\n\n")
        # Side-by-side table, headed by the decision: in this run and in the parent run (where people look first).
        table = side_by_side(base, tuned)
        table_path = out_dir / "side_by_side.parquet"
        table.to_parquet(table_path, index=False)
        html = (f"<p>{escape(verdict)}</p>\n"
                + table.to_html(index=False, float_format=lambda x: f"{x:.3f}", na_rep="", escape=True))
        md = verdict + _markdown_table(table, limit=evaluation.samples_in_table)
        gate_md = (verdict + f"Per example ({decision.metric}, gains positive = better):\n\n"
                   + per_example_markdown(evidence, limit=len(evidence.table) or 1))
        evidence.table.to_parquet(out_dir / "per_example.parquet", index=False)
        if len(evidence.tasks):
            gate_md += f"\n\nPer task ({decision.metric}, gains positive = better):\n\n" + _tasks_table(evidence.tasks)
            evidence.tasks.to_parquet(out_dir / "per_task.parquet", index=False)
        for rid in [run.info.run_id] + ([parent] if parent else []):
            mlflow.log_table(table, artifact_file="eval/side_by_side.json", run_id=rid)
            client.log_text(rid, html, "eval/side_by_side.html")
            client.log_text(rid, md, "eval/side_by_side.md")
            if len(evidence.table):
                mlflow.log_table(evidence.table, artifact_file="promotion/per_example.json", run_id=rid)
            client.log_text(rid, gate_md, "promotion/per_example.md")
            if len(evidence.tasks):
                mlflow.log_table(evidence.tasks, artifact_file="promotion/per_task.json", run_id=rid)
            client.log_text(rid, metrics_md, "eval/metrics_side_by_side.md")
        table_artifact(
            "side-by-side",
            [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
             for r in table.head(evaluation.samples_in_table).to_dict(orient="records")],
            description="held-out prompts: reference, base output, tuned output, per-row ROUGE-L",
        )

        metrics = {f"delta/{k}": v for k, v in decision.deltas if math.isfinite(v)}
        metrics["promotion/promoted"] = float(decision.promoted)
        if ablation is not None:
            metrics.update({"ablation/seed_curated": ablation.curated, "ablation/seed_only": ablation.seed_only,
                            "ablation/kept_seed_only": float(ablation.keep != "seed+curated")})
            if ablation.difference is not None:
                d = ablation.difference
                metrics.update({"ablation/difference": d.gain, "ablation/difference_low": d.low,
                                "ablation/difference_high": d.high})
            metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        for which, iv in (("base", evidence.over_base), ("champion", evidence.over_champion)):
            if iv is not None:
                metrics.update({f"promotion/gain_over_{which}": iv.gain, f"promotion/gain_over_{which}_low": iv.low,
                                f"promotion/gain_over_{which}_high": iv.high})
        if champion_eval is not None:
            metrics.update({f"champion/{k}": v for k, v in champion_eval.metrics if math.isfinite(v)})
        if decision.champion_value is not None and math.isfinite(decision.champion_value):
            metrics[f"champion/{decision.metric}"] = decision.champion_value
        mlflow.log_metrics(metrics)
        if parent:
            for k, v in metrics.items():
                client.log_metric(parent, k, v)
        tags = {"sftflow.gate.decision": "promoted" if decision.promoted else "rejected",
                "sftflow.gate.reason": decision.reason[:5000],
                "sftflow.model.name": decision.registered_name,
                "sftflow.model.version": decision.registered_version,
                **(ablation.tags() if ablation is not None else {})}
        mlflow.set_tags(tags)
        if parent:
            for k, v in tags.items():
                client.set_tag(parent, k, v)
        log_json(decision.summary(), "promotion/decision.json")

        markdown_artifact(
            "promotion",
            f"### Promotion gate: {'promoted' if decision.promoted else 'not promoted'}\n\n"
            f"{decision.reason}\n\n{interval_lines(evidence)}\n\n{metrics_md}\n\n"
            f"| | {decision.metric} |\n|---|---|\n| base | {decision.base_value:.4f} |\n"
            f"| tuned | {decision.tuned_value:.4f} |\n"
            f"| champion (v{decision.champion_version or '-'}) | "
            f"{'-' if decision.champion_value is None else f'{decision.champion_value:.4f}'} |\n\n"
            f"Model: `{decision.registered_name}` version {decision.registered_version or '-'}\n\n"
            + per_example_markdown(evidence, limit=evaluation.samples_in_table),
            description="promotion decision",
        )
        return decision

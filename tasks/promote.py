"""Promotion gate: does the fine-tuned model earn the registry alias ``champion``?

Inputs are the two evaluations of the flow (``base`` and ``tuned``, same held-out data, same
settings) and the model version the train stage registered (alias ``candidate`` already set).

The gate (``decide``, a pure function) promotes the new version only when, on the pipeline's chosen
metric (``promotion.metric`` + ``promotion.direction``):

1. it beats the base model by at least ``promotion.min_improvement`` (and strictly), and
2. it beats the current ``champion`` (strictly) on the same held-out data. A champion evaluated on
   another held-out set or with other settings (its recorded ``sftflow.eval.key`` differs) is
   re-evaluated on this run's held-out set first, so the comparison is like for like.

Whatever the outcome, the decision and its numbers are written to the model version (tags and
description) and to the run (metrics, ``promotion/decision.json``). The stage also logs the
base-vs-tuned deltas (``delta/<metric>``) and the side-by-side table (prompt, reference, base
output, tuned output, per-row ROUGE-L) as an MLflow table, an HTML page and a Prefect table.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from sftflow.config import EvaluationConfig, PromotionConfig, TrainingConfig
from sftflow.ops.orchestration import IO_RETRIES, markdown_artifact, table_artifact
from sftflow.data.refs import DatasetRef, ModelRef, sha256_dir
from sftflow.tracking.runs import StageContext, log_json, stage_run
from sftflow.results import PromotionDecision
from tasks.evaluate import EvalResult

CHAMPION = "champion"
CANDIDATE = "candidate"
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
TAG_EVAL_METRICS = "sftflow.eval.metrics"
TAG_RUN = "sftflow.gate.run_id"


# --------------------------------------------------------------------------- pure decision
@dataclass(frozen=True)
class GateOutcome:
    """The pure gate's verdict.

    Attributes:
        promote: move ``champion`` to the candidate.
        reason: one sentence with the numbers.
        gain_over_base: improvement over the base in the better direction (positive = better).
        gain_over_champion: same against the champion (None when there is none).
    """

    promote: bool
    reason: str
    gain_over_base: float
    gain_over_champion: float | None


def improvement(*, new: float, old: float, direction: str) -> float:
    """How much better ``new`` is than ``old`` (positive = better) for ``maximize``/``minimize``."""
    if direction == "maximize":
        return new - old
    if direction == "minimize":
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
) -> GateOutcome:
    """Decide promotion from numbers alone (no I/O).

    Args:
        metric: metric name (for the reason text).
        direction: ``maximize`` or ``minimize``.
        min_improvement: the margin the candidate must gain over the base (>= 0).
        base: the base model's value.
        candidate: the fine-tuned model's value.
        champion: the current champion's value on the same held-out data; None when there is none.

    Returns:
        GateOutcome. The candidate is promoted when it gains strictly more than zero and at least
        ``min_improvement`` over the base, and strictly beats the champion (when there is one).
        A NaN anywhere is never promoted.
    """
    if min_improvement < 0:
        raise ValueError(f"min_improvement must be >= 0 (got {min_improvement})")
    if math.isnan(candidate) or math.isnan(base):
        return GateOutcome(False, f"{metric} is NaN (candidate={candidate}, base={base}); not promoted",
                           math.nan, None)
    gain_base = improvement(new=candidate, old=base, direction=direction)
    better = "higher" if direction == "maximize" else "lower"
    if gain_base <= 0 or gain_base < min_improvement:
        within = " (within the margin)" if gain_base > 0 else ""
        return GateOutcome(
            False,
            f"{metric} {candidate:.4f} vs base {base:.4f}: gain {gain_base:+.4f} < required "
            f"{max(min_improvement, 0.0):.4f} ({better} is better){within}; not promoted",
            gain_base,
            None,
        )
    if champion is None:
        return GateOutcome(
            True,
            f"{metric} {candidate:.4f} beats base {base:.4f} by {gain_base:+.4f} (>= {min_improvement:.4f}); "
            f"no champion yet; promoted",
            gain_base,
            None,
        )
    if math.isnan(champion):
        return GateOutcome(False, f"champion's {metric} is NaN; not promoted (re-evaluate the champion)",
                           gain_base, math.nan)
    gain_champ = improvement(new=candidate, old=champion, direction=direction)
    if gain_champ <= 0:
        return GateOutcome(
            False,
            f"{metric} {candidate:.4f} beats base {base:.4f} by {gain_base:+.4f} but not the champion "
            f"{champion:.4f} ({gain_champ:+.4f}, {better} is better); not promoted",
            gain_base,
            gain_champ,
        )
    return GateOutcome(
        True,
        f"{metric} {candidate:.4f} beats base {base:.4f} by {gain_base:+.4f} and the champion {champion:.4f} "
        f"by {gain_champ:+.4f}; promoted",
        gain_base,
        gain_champ,
    )


def metric_name(cfg: PromotionConfig) -> str:
    """The configured metric without a ``base/``/``tuned/`` prefix (``tuned/rougeL`` -> ``rougeL``)."""
    name = cfg.metric
    for prefix in ("tuned/", "base/", "champion/", "delta/"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def deltas(base: EvalResult, tuned: EvalResult) -> dict[str, float]:
    """tuned - base for every metric both evaluations have (timings excluded)."""
    b, t = base.metrics_dict(), tuned.metrics_dict()
    return {k: t[k] - b[k] for k in sorted(set(b) & set(t)) if not k.endswith("eval_seconds")}


def side_by_side(base: EvalResult, tuned: EvalResult) -> pd.DataFrame:
    """One row per evaluated example: prompt, reference, base/tuned outputs and ROUGE-L."""
    b = pd.read_parquet(base.samples.path)
    t = pd.read_parquet(tuned.samples.path)
    keep = ["set", "id", "prompt", "reference", "output", "rougeL", "judge"]
    b = b[[c for c in keep if c in b.columns]].rename(
        columns={"output": "base_output", "rougeL": "base_rougeL", "judge": "base_judge"})
    t = t[[c for c in keep if c in t.columns and c not in ("prompt", "reference")]].rename(
        columns={"output": "tuned_output", "rougeL": "tuned_rougeL", "judge": "tuned_judge"})
    # Rows may repeat an id (duplicate prompts in an extra set): pair them by position within (set, id).
    b["_n"] = b.groupby(["set", "id"]).cumcount()
    t["_n"] = t.groupby(["set", "id"]).cumcount()
    df = b.merge(t, on=["set", "id", "_n"], how="outer", validate="one_to_one").drop(columns="_n")
    df["delta_rougeL"] = df["tuned_rougeL"] - df["base_rougeL"]
    return df


# --------------------------------------------------------------------------- registry helpers
def current_champion(client: Any, name: str) -> Any | None:
    """The model version holding ``champion`` (None when the alias or the model is absent)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


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


def _find_model_dir(root: Path) -> Path | None:
    """The transformers model folder below ``root`` (config.json + weights, or a peft adapter)."""
    for cfg in sorted(root.rglob("config.json"), key=lambda p: len(p.parts)):
        if any(cfg.parent.glob("*.safetensors")):
            return cfg.parent
    for cfg in sorted(root.rglob("adapter_config.json"), key=lambda p: len(p.parts)):
        return cfg.parent
    return None


def _pyfunc_model_config(model_root: Path) -> dict[str, Any]:
    """``model_config`` of an MLflow pyfunc folder (the train stage records kind/template/base_path)."""
    import yaml

    mlmodel = model_root / "MLmodel"
    if not mlmodel.exists():
        return {}
    meta = yaml.safe_load(mlmodel.read_text()) or {}
    pyfunc = (meta.get("flavors") or {}).get("python_function") or {}
    # MLflow stores a pyfunc's model_config under `config`; `metadata` is the fallback.
    out = dict(meta.get("metadata") or {})
    out.update(pyfunc.get("config") or pyfunc.get("model_config") or {})
    return out


def _local_model_root(client: Any, mv: Any) -> Path | None:
    """The version's pyfunc folder when the artifact store is a local directory (no copy needed)."""
    from urllib.parse import unquote, urlparse

    locations = []
    if getattr(mv, "model_id", None):
        try:
            locations.append(client.get_logged_model(mv.model_id).artifact_location)
        except Exception:  # an older version without a LoggedModel
            pass
    locations.append(mv.source or "")
    for loc in locations:
        u = urlparse(loc or "")
        if u.scheme in ("file", "") and loc and Path(unquote(u.path)).is_dir():
            return Path(unquote(u.path))
    return None


def model_version_ref(client: Any, mv: Any, *, download_dir: Path) -> ModelRef:
    """A loadable ModelRef of a registered version, offline.

    The train stage logs a pyfunc whose artifacts are the merged safetensors (or an adapter plus
    the local path of its base, in ``model_config``). Looked up in order: a ``sftflow.model_path``
    tag on the version, the local artifact folder (file stores), a download of the version.
    ``meta`` carries the ``template`` the model was trained with.
    """
    import mlflow

    local = (mv.tags or {}).get("sftflow.model_path")
    root: Path | None = Path(local) if local and Path(local).is_dir() else None
    root = root or _local_model_root(client, mv)
    if root is None or _find_model_dir(root) is None:
        dst = download_dir / f"v{mv.version}"
        dst.mkdir(parents=True, exist_ok=True)
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                        dst_path=str(dst)))
    model_dir = _find_model_dir(root)
    if model_dir is None:
        raise FileNotFoundError(
            f"model version {mv.name}/{mv.version}: no transformers model (config.json + *.safetensors "
            f"or adapter_config.json) in its artifacts at {root}"
        )
    cfg = _pyfunc_model_config(root)
    kind, base = "merged", ""
    if cfg.get("kind") == "adapter" or (
        (model_dir / "adapter_config.json").exists() and not any(model_dir.glob("model*.safetensors"))
    ):
        kind = "adapter"
        base = cfg.get("base_path") or json.loads((model_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path", "")
    meta = (("template", str(cfg["template"])),) if cfg.get("template") else ()
    return ModelRef(path=str(model_dir), sha256=sha256_dir(model_dir), kind=kind, base=base,
                    name=f"{mv.name}/{mv.version}", meta=meta)


def record_on_version(client: Any, *, name: str, version: str, decision: PromotionDecision, tuned: EvalResult,
                      run_id: str) -> None:
    """Write the gate's decision and numbers on the model version (tags + description)."""
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
        TAG_EVAL_METRICS: json.dumps({k: v for k, v in tuned.metrics if math.isfinite(v)}, sort_keys=True)[:5000],
        TAG_RUN: run_id,
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    champ = ("none" if decision.champion_value is None
             else f"v{decision.champion_version} = {decision.champion_value:.4f}"
             + (" (re-evaluated on this held-out set)" if decision.champion_reevaluated else ""))
    description = (
        f"Promotion gate: {'PROMOTED to champion' if decision.promoted else 'not promoted'}.\n"
        f"{decision.metric} ({decision.direction}, min improvement {decision.min_improvement}): "
        f"tuned {decision.tuned_value:.4f}, base {decision.base_value:.4f}, champion {champ}.\n"
        f"{decision.reason}\nHeld-out sha256: {tuned.heldout_sha256}. Gate run: {run_id}."
    )
    client.update_model_version(name, version, description=description)


# --------------------------------------------------------------------------- the stage
def promote(
    *,
    base: EvalResult,
    tuned: EvalResult,
    registered_name: str,
    registered_version: str,
    cfg: PromotionConfig,
    heldout: DatasetRef,
    evaluation: EvaluationConfig,
    training: TrainingConfig,
    out_dir: Path,
    run_id: str = "",
    client: Any = None,
) -> tuple[PromotionDecision, EvalResult | None]:
    """Run the gate against the registry and record the decision (alias, tags, description).

    Args:
        base / tuned: the two evaluations of this run.
        registered_name / registered_version: the candidate model version ("" when not registered).
        cfg: the ``promotion`` section.
        heldout / evaluation / training: what a champion re-evaluation needs (same data and settings).
        out_dir: where a re-evaluated champion's artifacts and samples go.
        run_id: the MLflow run recording the gate (written on the version).
        client: an ``MlflowClient`` (default: one for the configured tracking URI).

    Returns:
        (decision, the champion's re-evaluation or None).
    """
    from mlflow import MlflowClient

    client = client or MlflowClient()
    metric = metric_name(cfg)
    base_value, tuned_value = base.metric(metric), tuned.metric(metric)
    d = tuple(deltas(base, tuned).items())
    common = dict(metric=metric, direction=cfg.direction, min_improvement=cfg.min_improvement,
                  base_value=base_value, tuned_value=tuned_value, registered_name=registered_name,
                  registered_version=str(registered_version or ""), deltas=d)
    if not registered_name or not registered_version:
        return PromotionDecision(promoted=False, reason="no registered model version to promote",
                                 champion_value=None, champion_version="", champion_reevaluated=False,
                                 **common), None

    champ_mv = current_champion(client, registered_name)
    champion_value: float | None = None
    champion_eval: EvalResult | None = None
    if champ_mv is not None and str(champ_mv.version) == str(registered_version):
        # The candidate already is the champion (e.g. a cached re-run): nothing to move.
        decision = PromotionDecision(promoted=True, reason=f"version {registered_version} already holds champion",
                                     champion_value=tuned_value, champion_version=str(champ_mv.version),
                                     champion_reevaluated=False, **common)
        record_on_version(client, name=registered_name, version=str(registered_version), decision=decision,
                          tuned=tuned, run_id=run_id)
        return decision, None
    if champ_mv is not None:
        champion_value = recorded_value(champ_mv, metric=metric, key=tuned.eval_key)
        if champion_value is None:
            # Its recorded numbers come from another held-out set or other settings: evaluate it here.
            from tasks.evaluate import evaluate, resolve_judge

            ref = model_version_ref(client, champ_mv, download_dir=out_dir / "champion_model")
            # Prompted the way it was trained (its own template), on this run's data and settings.
            template = ref.meta_dict().get("template") or training.template
            champion_eval = evaluate(model=ref, heldout=heldout, cfg=evaluation, label="champion",
                                     template=template, out_dir=out_dir,
                                     max_seq_len=training.max_seq_len, judge=resolve_judge(evaluation, ref))
            champion_value = champion_eval.metric(metric)

    outcome = decide(metric=metric, direction=cfg.direction, min_improvement=cfg.min_improvement,
                     base=base_value, candidate=tuned_value, champion=champion_value)
    decision = PromotionDecision(
        promoted=outcome.promote, reason=outcome.reason, champion_value=champion_value,
        champion_version="" if champ_mv is None else str(champ_mv.version),
        champion_reevaluated=champion_eval is not None, **common,
    )
    if outcome.promote:
        client.set_registered_model_alias(registered_name, CHAMPION, str(registered_version))
    record_on_version(client, name=registered_name, version=str(registered_version), decision=decision,
                      tuned=tuned, run_id=run_id)
    return decision, champion_eval


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


# Never served from cache: the gate reads the registry (current champion), which changes between runs.
@task(name="promote", cache_policy=NO_CACHE, persist_result=True, **IO_RETRIES)
def promote_task(
    base: EvalResult,
    tuned: EvalResult,
    train: Any,
    cfg: PromotionConfig,
    *,
    ctx: StageContext,
    heldout: DatasetRef,
    evaluation: EvaluationConfig,
    training: TrainingConfig,
) -> PromotionDecision:
    """Prefect task: side-by-side table, deltas, and the promotion gate, in the nested run ``promote``.

    ``train`` is the train stage's ``TrainResult`` (``registered_name`` / ``registered_version``).
    Retried on failure: everything here is registry/file I/O (a champion re-evaluation repeats
    deterministically).
    """
    import mlflow
    from mlflow import MlflowClient

    stage = "promote"
    with stage_run(ctx, stage) as run:
        out_dir = ctx.stage_dir(stage)
        client = MlflowClient()
        parent = ctx.parent_run_id

        # Side-by-side table: in this run and in the parent run (where people look first).
        table = side_by_side(base, tuned)
        table_path = out_dir / "side_by_side.parquet"
        table.to_parquet(table_path, index=False)
        html = table.to_html(index=False, float_format=lambda x: f"{x:.3f}", na_rep="", escape=True)
        md = _markdown_table(table, limit=evaluation.samples_in_table)
        for rid in [run.info.run_id] + ([parent] if parent else []):
            mlflow.log_table(table, artifact_file="eval/side_by_side.json", run_id=rid)
            client.log_text(rid, html, "eval/side_by_side.html")
            client.log_text(rid, md, "eval/side_by_side.md")
        table_artifact(
            "side-by-side",
            [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
             for r in table.head(evaluation.samples_in_table).to_dict(orient="records")],
            description="held-out prompts: reference, base output, tuned output, per-row ROUGE-L",
        )

        # Read champion -> compare -> move alias as one critical section per pipeline, so a manual
        # run and a scheduled run finishing together cannot both crown themselves.
        from sftflow.ops.guards import pipeline_lock

        with pipeline_lock(ctx.pipeline, what="registry"):
            decision, champion_eval = promote(
                base=base, tuned=tuned, registered_name=getattr(train, "registered_name", ""),
                registered_version=getattr(train, "registered_version", ""), cfg=cfg, heldout=heldout,
                evaluation=evaluation, training=training, out_dir=out_dir, run_id=run.info.run_id, client=client,
            )

        metrics = {f"delta/{k}": v for k, v in decision.deltas if math.isfinite(v)}
        metrics["promotion/promoted"] = float(decision.promoted)
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
                "sftflow.model.version": decision.registered_version}
        mlflow.set_tags(tags)
        if parent:
            for k, v in tags.items():
                client.set_tag(parent, k, v)
        log_json(decision.summary(), "promotion/decision.json")

        markdown_artifact(
            "promotion",
            f"### Promotion gate: {'promoted' if decision.promoted else 'not promoted'}\n\n"
            f"{decision.reason}\n\n"
            f"| | {decision.metric} |\n|---|---|\n| base | {decision.base_value:.4f} |\n"
            f"| tuned | {decision.tuned_value:.4f} |\n"
            f"| champion (v{decision.champion_version or '-'}) | "
            f"{'-' if decision.champion_value is None else f'{decision.champion_value:.4f}'} |\n\n"
            f"Model: `{decision.registered_name}` version {decision.registered_version or '-'}",
            description="promotion decision",
        )
        ctx.layout.mark_done(stage)
        return decision

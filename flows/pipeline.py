"""The sftflow pipeline as one Prefect flow: wiring only.

Run it with ``sftflow run demo`` (or ``python -m flows.pipeline demo``); trigger it from the
Prefect UI through the deployments that ``sftflow serve`` registers. Every stage is a Prefect
task (tasks/), every task a nested MLflow run under one parent run per flow run.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from sftflow.augment import report as augment_report
from sftflow.layout import RunLayout
from sftflow.engine import activate as activate_engine, release as release_engine
from sftflow.evaluation.judge import resolve_judge
from sftflow.gate import SEED_ONLY, ablation_choice
from sftflow.ops.preflight import check_provisioned_model, preflight
from sftflow.ops.recovery import active_run, reap_orphans, register_active_run
from sftflow.run_options import RunOptions, resolve_run_config
from sftflow.tracking.runs import end_pipeline_run, run_url, start_pipeline_run
from tasks.backtranslate import backtranslate_task
from tasks.dedup import dedup_task
from tasks.evaluate import evaluate_champion, evaluate_task
from tasks.ingest import ingest_task
from tasks.promote import promote_task
from tasks.provision import provision_task
from tasks.rejection import rejection_task
from tasks.split import split_task
from tasks.train import register_task, train_task
from tasks.validate import validate_task


def _flow_run_id() -> str:
    """Prefect's flow-run id, or a fresh one when the flow function is called outside Prefect."""
    from prefect.runtime import flow_run

    return str(flow_run.id or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")


@flow(name="sftflow", log_prints=True, persist_result=True)
def sftflow_pipeline(
    pipeline: str = "demo",
    options: RunOptions | None = None,
    overrides: dict[str, Any] | None = None,
    pipelines_file: str | None = None,
    skip_if_unchanged: bool = False,
) -> dict[str, Any]:
    """Run one pipeline of pipelines.yaml end to end.

    Args:
        pipeline: name of the pipeline in pipelines.yaml.
        options: the knobs people change (base model, training steps/learning rate, source rows,
            augmentation, evaluation size, promotion gate); an empty field keeps pipelines.yaml's value.
        overrides: ``{"training.max_steps": 10, ...}`` key paths relative to the pipeline, for
            everything else; they win over ``options``.
        pipelines_file: path of pipelines.yaml (default: ``$SFTFLOW_PIPELINES`` or the repo's).
        skip_if_unchanged: stop early when sources and config equal the last successful run's
            (what scheduled retraining uses).

    Returns:
        A JSON-able summary: MLflow run id/URI, run directory, refs and metrics of each stage.
    """
    log = get_run_logger()
    run_id = _flow_run_id()
    # A run killed earlier (kill -9, OOM) left its MLflow/Prefect runs RUNNING: close them now.
    reap_orphans(logger=log)
    # While this record exists, a kill of this process is cleaned up the same way by the next run.
    with active_run(flow_run_id=run_id, pipeline=pipeline):
        cfg = resolve_run_config(pipeline, options=options, overrides=overrides, path=pipelines_file)
        for warning in preflight(cfg, pipeline=pipeline):  # UI-triggered runs do not go through the CLI's checks
            log.warning(warning)
        layout = RunLayout.create(pipeline=pipeline, run_id=run_id)

        if skip_if_unchanged:
            from sftflow.ops.guards import sources_unchanged

            unchanged, why = sources_unchanged(cfg, pipeline=pipeline)
            if unchanged:
                log.info("Skipping retraining: %s", why)
                return {"pipeline": pipeline, "skipped": True, "reason": why}

        # The data stages' engine (execution.engine: local, or Ray tasks over Parquet shards), once per run.
        log.info("Execution engine: %s", activate_engine(cfg.execution).describe())
        ctx = start_pipeline_run(cfg, pipeline=pipeline, run_id=run_id, run_dir=layout.root)
        # From here on a kill -9 leaves a record that names the MLflow runs the next run must close.
        register_active_run(flow_run_id=run_id, pipeline=pipeline, tracking_uri=ctx.tracking_uri,
                            parent_run_id=ctx.parent_run_id)
        log.info("MLflow parent run %s; run directory %s", ctx.parent_run_id, layout.root)
        summary: dict[str, Any] = {"pipeline": pipeline, "flow_run_id": run_id, "run_dir": str(layout.root),
                                   "mlflow_run_id": ctx.parent_run_id, "mlflow": run_url(ctx)}
        try:
            base = provision_task(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
            # LoRA rank, context, template length and free space against the model, before any data stage.
            check_provisioned_model(cfg, pipeline=pipeline, model_dir=base.path)
            raw = ingest_task(cfg.sources, cfg.ingest, ctx=ctx)
            valid = validate_task(raw.dataset, cfg.validation, tokenizer=base, ctx=ctx)
            clean = dedup_task([valid.valid], cfg.dedup, ctx=ctx).kept if cfg.dedup.enabled else valid.valid
            split = split_task(clean, cfg.split, cfg.dedup, ctx=ctx)
            train_data = split.train
            # Evaluation and training's eval loss read the held-out set with the prompts training saw:
            # with augmentation, tagged like the seed.
            heldout = split.heldout

            curation_note = ""
            if cfg.augmentation.enabled:
                aug = backtranslate_task(split.train, base, cfg.augmentation, cfg.training, ctx=ctx, dedup=cfg.dedup,
                                         heldout=split.heldout)
                summary["augmentation"] = {"candidates": aug.candidates.num_rows, "curated": aug.curated.num_rows,
                                           **dict(aug.quality)}
                # The method, AUCs and min_auc checks, stated on the model version by the gate.
                curation_note = augment_report.curation_note(Path(aug.candidates.path).parent / "report.json")
                summary["augmentation"]["curation"] = curation_note
                train_data = aug.seed or split.train
                heldout = aug.heldout or split.heldout
                if aug.curated.num_rows:
                    aug_valid = validate_task(aug.curated, cfg.validation, tokenizer=base, ctx=ctx,
                                              stage="validate_augmented")
                    # Curated pairs go through dedup like any other data, against the seed and the held-out set.
                    train_data = dedup_task([train_data, aug_valid.valid], cfg.dedup, ctx=ctx,
                                            stage="dedup_augmented", heldout=split.heldout).kept
                else:
                    log.warning("Self-curation kept no candidate pairs; training on the seed data only.")

            model_name = cfg.promotion.model_name or f"sftflow-{pipeline}"
            rft = cfg.rejection_sampling.enabled
            ablation = cfg.augmentation.enabled and cfg.augmentation.ablation
            # keep_if_helps: both ablation models are evaluated and only the better one is registered (below).
            keep_if_helps = ablation and cfg.augmentation.keep_if_helps and cfg.evaluation.enabled and not rft
            # With rejection sampling, round 2 is the registered candidate; round 1 is not registered.
            trained = train_task(train_data, heldout, base, cfg.training, ctx=ctx,
                                 register_as=None if rft or keep_if_helps else model_name)
            seed_only = None
            if ablation:
                # The Humpback ablation: the same recipe and steps on the (tagged) seed alone.
                seed_only = train_task(aug.seed or split.train, heldout, base, cfg.training, ctx=ctx, register_as=None,
                                       stage="train.seed_only")
            round1 = None
            if rft:
                # RFT: best-of-k samples of the round-1 model, then round 2 on its data + the selected samples.
                rs = rejection_task(train_data, heldout, trained.model, cfg.rejection_sampling, cfg.training, ctx=ctx,
                                    base=base, dedup=cfg.dedup, trust_remote_code=cfg.trust_remote_code)
                summary["rejection_sampling"] = dict(rs.counts)
                round1 = trained
                # Round 2 continues from round 1 by default (round2_from: round1); `base` retrains from scratch.
                start = trained.model if cfg.rejection_sampling.round2_from == "round1" else base
                trained = train_task(rs.train_round2, heldout, start, cfg.rejection_sampling.round2(cfg.training),
                                     ctx=ctx, register_as=model_name, stage="train.round2")
            summary["model"] = {"name": trained.registered_name, "version": trained.registered_version,
                                "uri": trained.model_uri, "path": trained.model.path}

            if cfg.evaluation.enabled:
                # One judge for every evaluation (None without evaluation.judge; default the base model),
                # resolved once and passed in, so its content is in each evaluation's cache key.
                judge = resolve_judge(cfg.evaluation, base, base=base, trust_remote_code=cfg.trust_remote_code)
                base_eval = evaluate_task(base, heldout, cfg.evaluation, label="base", ctx=ctx,
                                          training=cfg.training, judge=judge)
                tuned_eval = evaluate_task(trained.model, heldout, cfg.evaluation, label="tuned", ctx=ctx,
                                           training=cfg.training, judge=judge)
                summary["metrics"] = {"base": dict(base_eval.metrics), "tuned": dict(tuned_eval.metrics)}
                others = ()
                choice = None
                if seed_only is not None:
                    seed_eval = evaluate_task(seed_only.model, heldout, cfg.evaluation, label="seed_only", ctx=ctx,
                                              training=cfg.training, judge=judge)
                    others = (seed_eval,)
                    summary["metrics"]["seed_only"] = dict(seed_eval.metrics)
                    choice = ablation_choice(curated=tuned_eval, seed_only=seed_eval, cfg=cfg.promotion)
                    summary["ablation"] = choice.summary()
                    log.info("Ablation: %s", choice.reason)
                    if keep_if_helps:
                        # The better of the two is the candidate; the gate compares it with the base as usual.
                        if choice.keep == SEED_ONLY:
                            others = (dataclasses.replace(tuned_eval, label="seed_curated"),)
                            trained, tuned_eval = seed_only, seed_eval
                        trained = register_task(trained, model_name, tags=choice.tags(),
                                                stage="train.seed_only" if choice.keep == SEED_ONLY else "train")
                        summary["model"] = {"name": trained.registered_name, "version": trained.registered_version,
                                            "uri": trained.model_uri, "path": trained.model.path}
                if round1 is not None:
                    # Round 1 beside round 2 (the `tuned` candidate the gate sees), on the same held-out set.
                    round1_eval = evaluate_task(round1.model, heldout, cfg.evaluation, label="round1", ctx=ctx,
                                                training=cfg.training, judge=judge)
                    others = (*others, round1_eval)
                    summary["metrics"]["round1"] = dict(round1_eval.metrics)
                if cfg.promotion.enabled:
                    decision = promote_task(base_eval, tuned_eval, trained, cfg.promotion, ctx=ctx,
                                            heldout=heldout, evaluation=cfg.evaluation, training=cfg.training,
                                            evaluate_champion=evaluate_champion, others=others, ablation=choice,
                                            note=curation_note)
                    summary["promotion"] = decision.summary()
        except BaseException:
            release_engine()
            end_pipeline_run(ctx, status="FAILED", summary=summary)
            raise
        release_engine()
        end_pipeline_run(ctx, status="FINISHED", summary=summary)
        return summary


if __name__ == "__main__":
    from sftflow.ops.orchestration import configure_environment
    from sftflow.ops.recovery import guard_ephemeral_server

    configure_environment()
    guard_ephemeral_server()  # Prefect's temporary server dies with this process
    sftflow_pipeline(pipeline=sys.argv[1] if len(sys.argv) > 1 else "demo")

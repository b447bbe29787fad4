"""Instruction backtranslation stage (Humpback; Li et al. 2023, "Self-Alignment with Instruction Backtranslation").

The method, step by step, is ``sftflow.augment.humpback``: segments of an unlabeled corpus
(``sftflow.augment.corpus``, filtered by ``sftflow.augment.filters``) become responses; a backward
model M_yx trained on the reversed seed writes an instruction for each; a curation model (M0
trained on the seed, the base model, or a named model) scores each pair with ``curation.method``
(``sftflow.augment.curation``: the paper's 1-5 ``rubric``, per-token ``pmi`` of answer and
instruction, ``loglik``, or ``auto``: the one of highest held-out AUC) and the best are kept, tagged with ``augmented_system_prompt`` (the
seed gets ``seed_system_prompt``). Every method's AUC on held-out true vs mismatched pairs is
measured and logged (``curation/auc/<method>``); the chosen one below ``curation.min_auc`` warns,
skips curation or fails, per ``curation.below_min_auc``. Every segment
examined is one row of ``candidates.parquet`` with its status and reason; the accounting
(``sftflow.augment.pairs.accounting``) is checked before anything is returned.

The models are trained through the one training entry (``sftflow.training.entry.run_training``)
in content-keyed folders ``runs/<pipeline>/_train/<key>``: M_yx and M0 train in
``training.num_processes`` processes like the train stage, and resume after a crash.

``backtranslate`` computes and writes files; ``backtranslate_task`` logs it to MLflow (each trained
model in its own nested run) with a score histogram, and a Prefect table shows the best and worst
pairs. Run it alone::

    from tasks.backtranslate import backtranslate
    out = backtranslate(seed=train_ref, base=base_ref, cfg=cfg.augmentation, training=cfg.training,
                        out_dir=Path(".../backtranslate"))
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task

from sftflow.augment.humpback import AugmentOutput, HelperModel, humpback
from sftflow.augment.pairs import BELOW, KEPT
from sftflow.augment.report import examples, markdown_summary, score_histogram_png, unparseable_scores
from sftflow.config_sections import AugmentationConfig, DedupConfig, TrainingConfig
from sftflow.data.refs import DatasetRef, ModelRef
from sftflow.ops.progress_report import progress_callback
from sftflow.ops.orchestration import markdown_with_image, stage_cache_policy, table_artifact
from sftflow.markers import write_marker
from sftflow.results import AugmentResult
from sftflow.tracking.runs import StageContext, log_dataset, log_json, stage_run

STAGE = "backtranslate"


def backtranslate(
    *,
    seed: DatasetRef,
    base: ModelRef,
    cfg: AugmentationConfig,
    training: TrainingConfig,
    out_dir: Path,
    trust_remote_code: bool = False,
    dedup: DedupConfig | None = None,
    heldout: DatasetRef | None = None,
    work_root: Path | None = None,
    retrain: bool = False,
) -> AugmentOutput:
    """Run instruction backtranslation end to end (``sftflow.augment.humpback.humpback``).

    Args:
        seed: the seed instruction data (canonical records; the clean train split).
        base: the base model the backward and curation models are fine-tuned from.
        cfg: the ``augmentation`` section (needs ``corpus``).
        training: the ``training`` section; ``augmentation.backward_training`` /
            ``forward_training`` apply on top of it (``AugmentationConfig.backward`` / ``.forward``).
        out_dir: the stage folder; every data file goes below it.
        trust_remote_code: passed to model loading.
        dedup: the pipeline's ``dedup`` section, for the seed near-duplicate check (None: its defaults).
        heldout: the held-out split; comes back tagged with ``seed_system_prompt`` and checks the
            curator (``curator_auc``).
        work_root: the content-keyed training folders of M_yx, M0 and M_k (the flow passes
            ``runs/<pipeline>/_train``, so a rerun after a crash resumes; default ``<out_dir>/_train``).
        retrain: retrain helper models whose finished output exists (``--no-cache``).

    Returns:
        The refs and counts (``AugmentOutput``) and the models it trained (``helpers``). Nothing is
        logged to MLflow here: ``backtranslate_task`` logs the stage and each helper model.

    Raises:
        ConfigError: no corpus, or a bad training override (naming its key path).
        CuratorBelowMinAuc: the curator's held-out AUC is below ``curation.min_auc`` with
            ``below_min_auc: fail`` (names the keys and the AUC).
        ValueError: a malformed corpus file (naming file and row) or an empty seed.
    """
    return humpback(seed=seed, base=base, cfg=cfg, backward_cfg=cfg.backward(training),
                    forward_cfg=cfg.forward(training), out_dir=Path(out_dir),
                    work_root=Path(work_root) if work_root is not None else Path(out_dir) / "_train",
                    trust_remote_code=trust_remote_code, dedup=dedup, heldout=heldout, retrain=retrain,
                    progress=progress_callback, stage=STAGE)


def curation_metrics(quality: dict[str, float], *, method: str) -> dict[str, float]:
    """MLflow metrics of the curators' quality: ``curation/auc/<method>`` for every method measured, the
    chosen method's as ``curation/auc``, ``curation/min_auc`` and ``curation/below_min_auc`` (1.0: below)."""
    out = {f"curation/auc/{k[len('curator_auc_'):]}": v for k, v in quality.items()
           if k.startswith("curator_auc_") and k != "curator_auc_pairs" and "_iter" not in k}
    if f"curator_auc_{method}" in quality:
        out["curation/auc"] = quality[f"curator_auc_{method}"]
    for key, name in (("curator_min_auc", "curation/min_auc"), ("curator_below_min_auc", "curation/below_min_auc")):
        if key in quality:
            out[name] = quality[key]
    return out


def _log_helper(helper: HelperModel, *, base: ModelRef) -> None:
    """Log one trained helper model to the active run: settings, data, training curves, the model.

    The model was trained before this run opened (``backtranslate`` logs nothing), so its per-step
    metrics are replayed from the training history with their step numbers.
    """
    import mlflow

    from sftflow.tagnames import TAG_TRAIN_KEY
    from sftflow.tracking.registry import log_model
    from sftflow.tracking.train_logging import log_training_summary, step_logger
    from sftflow.training.loop import STEP_METRICS

    cfg, output = helper.cfg, helper.output
    mlflow.log_params({"base_model": base.path, "train_rows": helper.data.num_rows, "max_steps": cfg.max_steps,
                       "method": cfg.method, "learning_rate": cfg.learning_rate, "num_processes": cfg.num_processes,
                       "work_dir": str(helper.run.work_dir), "reused_output": helper.run.reused,
                       "resumed_from_step": output.resumed_from_step})
    mlflow.set_tag(TAG_TRAIN_KEY, helper.run.key)
    log_dataset(helper.data, context="training")
    on_metrics = step_logger()
    for rec in output.history():
        on_metrics(int(rec["step"]), {k: rec[k] for k in STEP_METRICS if k in rec})
    log_training_summary(output)
    log_model(model=output.model, template=output.template, metrics=output.metrics, register_as=None)


@task(name=STAGE, cache_policy=stage_cache_policy(), persist_result=True)
def backtranslate_task(
    seed: DatasetRef,
    base: ModelRef,
    cfg: AugmentationConfig,
    training: TrainingConfig,
    *,
    ctx: StageContext,
    trust_remote_code: bool = False,
    dedup: DedupConfig | None = None,
    heldout: DatasetRef | None = None,
) -> AugmentResult:
    """Prefect task: ``backtranslate`` in its own MLflow run, each model it trained in a nested run.

    The stage run gets the settings, the accounting (``bt_*``), every curation method's held-out
    AUC (``curation/auc/<method>``, the chosen one also as ``curation/auc`` and ``bt_curator_auc``,
    ``curation/below_min_auc`` 1.0 when it is below ``min_auc``), the mean score (and for the
    rubric the share of unparseable ratings), the candidate table, the score histogram, ``report.json``
    and a summary; each
    helper model's run gets its training data, curves and the model itself. No retries: a rerun of
    the flow redoes the stage (cached when unchanged) and its models resume from their keyed folders.

    Args:
        seed: the seed data (the clean train split).
        base: the base model.
        cfg: the ``augmentation`` section.
        training: the ``training`` section.
        ctx: the flow's stage context (tracking URI, parent run, run folder).
        trust_remote_code: passed to model loading.
        dedup: the pipeline's ``dedup`` section, for the seed near-duplicate check (None: its defaults).
        heldout: the held-out split; returned tagged like the seed (``AugmentResult.heldout``) and
            used to measure the curator (``bt_curator_auc``).
    """
    import mlflow

    from sftflow.ops.cachekeys import refresh_cache_requested
    from sftflow.training.entry import pipeline_work_root

    out_dir = ctx.stage_dir(STAGE)
    with stage_run(ctx, STAGE):
        mlflow.log_params({
            "corpus": cfg.corpus.path if cfg.corpus else "", "max_segments": cfg.max_segments,
            "min_words": cfg.min_words, "max_words": cfg.max_words, "temperature": cfg.generation.temperature,
            "top_p": cfg.generation.top_p, "max_new_tokens": cfg.generation.max_new_tokens,
            "curation_model": cfg.curation.model, "threshold": cfg.curation.threshold, "iterations": cfg.iterations,
            "curation_keep": cfg.curation.keep_rule, "curation_method": cfg.curation.method,
            "curation_min_auc": cfg.curation.min_auc, "curation_below_min_auc": cfg.curation.below_min_auc,
            "curation_top_fraction": cfg.curation.top_fraction, "curation_min_score": cfg.curation.min_score,
        })
        log_dataset(seed, context="backtranslate.seed")
        out = backtranslate(seed=seed, base=base, cfg=cfg, training=training, out_dir=out_dir,
                            trust_remote_code=trust_remote_code, dedup=dedup, heldout=heldout,
                            work_root=pipeline_work_root(ctx.run_dir), retrain=refresh_cache_requested())
        used = out.curation_config(cfg)  # the method that curated (auto: the best held-out AUC)
        if out.choice is not None:
            mlflow.log_param("curation_method_used", out.choice.method)
            mlflow.set_tag("sftflow.curation.method", out.choice.reason[:5000])
        # Each helper model is the logged model of its own run, nested in the stage run.
        for helper in out.helpers:
            with stage_run(ctx, helper.run_name):
                _log_helper(helper, base=base)
        counts = dict(out.counts)
        mlflow.log_metrics({f"bt_{k}": float(v) for k, v in counts.items()})
        mlflow.log_metrics({f"bt_{k}": float(v) for k, v in out.quality})
        mlflow.log_metrics(curation_metrics(dict(out.quality), method=used.curation.method))
        for it, kept in enumerate(out.iteration_kept, start=1):
            mlflow.log_metric("bt_kept_per_iteration", float(kept), step=it)
        for row in out.per_iteration:
            for key in ("kept_mean_score", "scored_mean_score"):
                if row[key] == row[key]:  # not NaN
                    mlflow.log_metric(f"curation/{key}_per_iteration", float(row[key]), step=int(row["iteration"]))
        for check in out.checks:
            if check.status != "unmeasured":
                mlflow.log_metric("curation/auc_per_iteration", check.auc, step=check.iteration)
        frame = pd.read_parquet(out.candidates.path)
        scored = frame[frame["status"].isin([KEPT, BELOW])]
        if len(scored):
            mlflow.log_metric("bt_mean_score", float(scored.score.mean()))
            if used.curation.method == "rubric":
                mlflow.log_metric("bt_mean_expected_score", float(scored.expected.mean()))
        unparseable = unparseable_scores(frame)
        if used.curation.method == "rubric":  # the rubric's ratings only; likelihood methods read no digit
            mlflow.log_metric("bt_unparseable_scores", unparseable)
        for ref, context in ((out.candidates, "backtranslate.candidates"), (out.curated, "backtranslate.curated"),
                             (out.reversed, "backtranslate.backward_train"), (out.seed, "backtranslate.seed_tagged")):
            log_dataset(ref, context=context)
        mlflow.log_artifact(out.candidates.path, artifact_path="backtranslate")
        png = score_histogram_png(frame, out_dir / "score_histogram.png", cfg=used)
        mlflow.log_artifact(str(png), artifact_path="backtranslate")
        if out.report:
            mlflow.log_artifact(out.report, artifact_path="backtranslate")
        summary = markdown_summary(counts, frame, used, out.iteration_kept, unparseable=unparseable,
                                   quality=dict(out.quality), checks=out.checks)
        if out.choice is not None:
            summary = f"Curation method: {out.choice.reason}\n\n{summary}"
        mlflow.log_text(summary, "backtranslate/summary.md")
        if out.heldout is not None:
            log_dataset(out.heldout, context="backtranslate.heldout_tagged")
        log_json({"counts": counts, "iteration_kept": list(out.iteration_kept), "quality": dict(out.quality),
                  "curation": {"method": used.curation.method, "configured_method": cfg.curation.method,
                               "why": out.choice.reason if out.choice else "", "keep": used.curation.keep_rule,
                               "iterations": list(out.per_iteration),
                               "checks": [c.message() for c in out.checks]},
                  "backward_model": out.backward_model.path, "curation_model": out.curation_model.path,
                  "work_dirs": {h.run_name: str(h.run.work_dir) for h in out.helpers}},
                 "backtranslate/summary.json")
        table_artifact(f"{ctx.pipeline}-backtranslate-examples", examples(frame),
                       description="Self-curation: best and worst scored pairs")
        markdown_with_image(f"{ctx.pipeline}-backtranslate-summary", summary, png, alt="score histogram",
                            description="Backtranslation accounting and score histogram")
    write_marker(ctx.layout.stage_dir(STAGE), outputs=out, stage=STAGE)  # last: what a cache hit verifies
    return AugmentResult(curated=out.curated, candidates=out.candidates, backward_model=out.backward_model,
                         curation_model=out.curation_model, seed=out.seed, counts=out.counts, heldout=out.heldout,
                         quality=out.quality)

"""Rejection-sampling fine-tuning (RFT / best-of-n): sample k answers per prompt from the round-1
model, keep the best one when it is good enough, and train round 2 on seed + selected.

Reads top to bottom as the method:

1. **Prompt pool.** The train split's prompts (``prompts: train``: each record's turns before its
   last assistant turn, system tag included) or a prompt file (``.jsonl``/``.json`` rows with
   ``prompt``/``instruction``/``question`` and an optional ``answer``, or ``.txt``, one prompt a
   line); shuffled with ``seed`` and capped at ``max_prompts``.
2. **Screening.** A prompt that repeats an earlier pool prompt (``duplicate_prompt``) or duplicates
   a held-out prompt (``duplicate_of_heldout``: ``sftflow.data.neardup.find_cross_duplicates``, the
   leak rule dedup and split use) is not sampled: training on it would leak the evaluation.
3. **Sampling.** ``k`` samples per prompt from the round-1 model with the batch inference API
   (``sftflow.inference.batch.generate_texts(num_samples=k)``): on transformers each prompt is
   prefilled ONCE and its KV cache repeated k times for decoding (``generation.sample_k``,
   temperature/top-p, seeded); ``execution.engine: ray`` runs the same batches on Ray Data actors
   (same samples), ``execution.generation_backend: vllm`` uses vLLM's ``SamplingParams(n=k)``.
4. **Scoring.** Every sample gets a score: answer correctness (1.0/0.0, ``sftflow.data.answers``)
   for verifiable rows (a non-empty ``answer``; ``scorer: auto`` or ``answer``), else the logit
   1-5 rubric score of self-curation (``batch.score_texts``; expected rating) from ``scorer_model``,
   resolved by ``sftflow.inference.judges.resolve_scorer`` (a scorer that cannot be loaded is an
   error naming the key, never silently another model).
5. **Selection.** Per prompt, the best eligible sample (non-empty; finished unless
   ``require_finished`` is off; ties: the lowest sample index) is kept when it is correct (answer)
   or its score is >= ``threshold`` (rubric). Otherwise the prompt is rejected with its reason.
6. **Outputs.** ``candidates.parquet`` (one row per sample; a prompt screened out in step 2 has one
   row with ``sample_index`` -1), ``selected.parquet`` (canonical records,
   ``origin=rejection_sampled``) and ``train_round2.parquet`` (round-1 training data + selected).

Accounting, checked before anything is returned::

    prompts in = kept + duplicate_prompt + duplicate_of_heldout + bad_prompt
                 + empty + unfinished + below_threshold + wrong_answer
    samples = prompts sampled * k

``rejection_sample`` only computes and writes files; ``rejection_task`` logs it to MLflow
(params, ``rs_*`` metrics, the candidate table via ``mlflow.log_table``, datasets, a histogram).

This module is the stage: ``rejection_sample`` runs the steps in order and ``rejection_task`` logs
it. The steps live in ``sftflow/rejection/``: ``pool`` (steps 1-2), ``sampling`` (3-4),
``selection`` (5, the reasons and the accounting) and ``report`` (histogram, metrics, summary).

Run it alone::

    from tasks.rejection import rejection_sample
    out = rejection_sample(train=train_ref, heldout=heldout_ref, model=round1_ref, base=base_ref,
                           cfg=cfg.rejection_sampling, training=cfg.training, out_dir=Path(".../rejection"))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from prefect import task

from sftflow import layout
from sftflow.config_sections import DedupConfig, RejectionSamplingConfig, TrainingConfig
from sftflow.data.records import check_accounting, frame_to_records, make_record, records_to_frame
from sftflow.data.refs import DatasetRef, ModelRef, write_parquet
from sftflow.markers import write_marker
from sftflow.ops.progress_report import progress_callback
from sftflow.ops.orchestration import markdown_with_image, stage_cache_policy, table_artifact
from sftflow.rejection.pool import load_pool, screen_prompts
from sftflow.rejection.report import markdown_summary, rejection_metrics, score_histogram_png
from sftflow.rejection.sampling import sample_and_score
from sftflow.rejection.selection import CANDIDATE_COLUMNS, ORIGIN, accounting, select_best
from sftflow.results import RejectionResult
from sftflow.tracking.runs import StageContext, log_dataset, log_json, stage_run

STAGE = "rejection"


@dataclass(frozen=True)
class RejectionOutput:
    """What ``rejection_sample`` produced.

    Attributes:
        selected: kept samples as canonical records (``origin=rejection_sampled``).
        candidates: one row per sample (and per screened prompt), with score, keep flag and reason.
        train_round2: the round-1 training data + ``selected``.
        counts: the accounting, as sorted (name, value) pairs.
    """

    selected: DatasetRef
    candidates: DatasetRef
    train_round2: DatasetRef
    counts: tuple[tuple[str, int], ...]


def rejection_sample(
    *,
    train: DatasetRef,
    heldout: DatasetRef | None,
    model: ModelRef,
    cfg: RejectionSamplingConfig,
    training: TrainingConfig,
    out_dir: Path,
    base: ModelRef | None = None,
    dedup: DedupConfig | None = None,
    trust_remote_code: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> RejectionOutput:
    """Run rejection sampling end to end (see the module docstring).

    Args:
        train: the round-1 training data (the prompt pool with ``prompts: train``; round 2 trains on it + selected).
        heldout: the held-out set; pool prompts duplicating it are never sampled.
        model: the round-1 tuned model (the sampler; also the rubric scorer with ``scorer_model: tuned``).
        cfg: the ``rejection_sampling`` section.
        training: the ``training`` section (its template renders prompts).
        out_dir: the stage folder.
        base: the base model (for ``scorer_model: base``).
        dedup: the pipeline's ``dedup`` section (the held-out duplicate rule; None: its defaults).
        trust_remote_code: passed to model loading.
        on_progress: ``(prompts_done, prompts_total)`` after each sampling batch.

    Returns:
        The refs and counts (``RejectionOutput``); nothing is logged to MLflow here.

    Raises:
        ValueError: a malformed prompt file (naming file and row) or an empty pool.
        AccountingError: a broken accounting identity (a bug).
    """
    out_dir = layout.ensure(Path(out_dir))
    pool = load_pool(cfg, train=train)
    if not pool:
        raise ValueError(f"rejection_sampling.prompts: the prompt pool ({cfg.prompts}) is empty")
    screened = screen_prompts(pool, heldout=heldout, dedup=dedup)

    sampled_rows = sample_and_score(pool, screened, model=model, base=base, cfg=cfg, training=training,
                                    trust_remote_code=trust_remote_code, on_progress=on_progress)
    rows: list[dict[str, Any]] = []
    for i, (reason, detail) in sorted(screened.items()):
        item = pool[i]
        rows.append({"prompt_id": item.prompt_id, "prompt_index": i, "sample_index": -1, "source": item.source,
                     "prompt": item.text, "response": "", "num_tokens": 0, "finished": False, "scorer": "",
                     "score": math.nan, "reference_answer": item.answer, "predicted_answer": "", "best": False,
                     "kept": False, "reason": reason, "detail": detail})

    selected = []
    for i, rs in sampled_rows.items():
        best, kept, reason, detail = select_best(rs, method=rs[0]["scorer"], threshold=cfg.threshold,
                                                 require_finished=cfg.require_finished)
        for r in rs:
            r.update(reason=reason, detail=detail)
        if best is not None:
            rs[best]["best"] = True
            rs[best]["kept"] = kept
        if kept and best is not None:
            item = pool[i]
            selected.append(make_record(item.turns() + [{"role": "assistant", "content": rs[best]["response"]}],
                                        source=item.source or "rejection", origin=ORIGIN, category=item.category,
                                        score=float(rs[best]["score"]), tools=item.tools, answer=item.answer))
        rows.extend(rs)

    frame = pd.DataFrame(rows, columns=list(CANDIDATE_COLUMNS)).sort_values(["prompt_index", "sample_index"],
                                                                           ignore_index=True)
    frame["score"] = frame["score"].astype(float)
    counts = accounting(frame, k=cfg.k)
    check_accounting("rejection sampling selected", counts["kept"], selected=len(selected))
    candidates_ref = write_parquet(frame, out_dir / "candidates.parquet", name="rejection_candidates")
    selected_frame = records_to_frame(selected)
    selected_ref = write_parquet(selected_frame, out_dir / "selected.parquet", name="rejection_selected")
    round2 = pd.concat([records_to_frame(frame_to_records(train.read())), selected_frame], ignore_index=True)
    round2_ref = write_parquet(round2, out_dir / "train_round2.parquet", name="train_round2")
    check_accounting("rejection sampling round-2 data", round2_ref.num_rows, round1=train.num_rows,
                     selected=selected_ref.num_rows)
    return RejectionOutput(selected=selected_ref, candidates=candidates_ref, train_round2=round2_ref,
                           counts=tuple(sorted(counts.items())))


@task(name=STAGE, cache_policy=stage_cache_policy(), persist_result=True)
def rejection_task(
    train: DatasetRef,
    heldout: DatasetRef | None,
    model: ModelRef,
    cfg: RejectionSamplingConfig,
    training: TrainingConfig,
    *,
    ctx: StageContext,
    base: ModelRef | None = None,
    dedup: DedupConfig | None = None,
    trust_remote_code: bool = False,
) -> RejectionResult:
    """Prefect task: ``rejection_sample`` in its own MLflow run.

    The run gets the settings, the accounting and score metrics (``rs_*``), the candidate table
    (``mlflow.log_table``, and the Parquet file), the datasets (candidates, selected, round-2
    data), a score histogram and a summary. No retries: it runs models (cached when unchanged).

    Args:
        train: the round-1 training data.
        heldout: the held-out split (prompts duplicating it are not sampled).
        model: the round-1 tuned model.
        cfg: the ``rejection_sampling`` section.
        training: the ``training`` section.
        ctx: the flow's stage context.
        base: the base model (for ``scorer_model: base``).
        dedup: the pipeline's ``dedup`` section.
        trust_remote_code: passed to model loading.
    """
    import mlflow

    out_dir = ctx.stage_dir(STAGE)
    with stage_run(ctx, STAGE):
        mlflow.log_params({"prompts": cfg.prompts, "max_prompts": cfg.max_prompts, "k": cfg.k,
                           "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                           "threshold": cfg.threshold, "scorer": cfg.scorer, "scorer_model": cfg.scorer_model,
                           "require_finished": cfg.require_finished, "seed": cfg.seed, "sampler_model": model.path})
        log_dataset(train, context="rejection.round1_train")
        out = rejection_sample(train=train, heldout=heldout, model=model, cfg=cfg, training=training, out_dir=out_dir,
                               base=base, dedup=dedup, trust_remote_code=trust_remote_code,
                               on_progress=progress_callback(f"{STAGE} prompts"))
        counts = dict(out.counts)
        frame = pd.read_parquet(out.candidates.path)
        metrics = rejection_metrics(counts, frame)
        mlflow.log_metrics(metrics)
        mlflow.log_table(data=frame, artifact_file="rejection/candidates.json")
        for ref, context in ((out.candidates, "rejection.candidates"), (out.selected, "rejection.selected"),
                             (out.train_round2, "rejection.train_round2")):
            log_dataset(ref, context=context)
        mlflow.log_artifact(out.candidates.path, artifact_path="rejection")
        png = score_histogram_png(frame, out_dir / "score_histogram.png", threshold=cfg.threshold)
        mlflow.log_artifact(str(png), artifact_path="rejection")
        summary = markdown_summary(counts, metrics, cfg)
        mlflow.log_text(summary, "rejection/summary.md")
        log_json({"counts": counts, "metrics": metrics, "sampler_model": model.path}, "rejection/summary.json")
        best = frame[frame.best].sort_values("score", ascending=False)
        table_artifact(f"{ctx.pipeline}-rejection-examples",
                       [{"prompt": r.prompt[:200], "response": r.response[:240], "score": round(float(r.score), 3),
                         "kept": bool(r.kept), "reason": r.reason} for r in best.head(10).itertuples()],
                       description="Rejection sampling: best sample of each prompt")
        markdown_with_image(f"{ctx.pipeline}-rejection-summary", summary, png, alt="score histogram",
                            description="Rejection sampling accounting and score histogram")
    write_marker(ctx.layout.stage_dir(STAGE), outputs=out, stage=STAGE)  # last: what a cache hit verifies
    return RejectionResult(selected=out.selected, candidates=out.candidates, train_round2=out.train_round2,
                           counts=out.counts)

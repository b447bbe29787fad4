"""Held-out evaluation: the same data and settings for the base model and the fine-tuned model.

Runs twice in the flow (``label="base"`` and ``label="tuned"``); the promotion stage compares the
two results. For each evaluated set (the held-out split, plus any ``evaluation.extra_sets``):

1. **Loss / perplexity** on the reference responses: training's own held-out loss
   (``sftflow.training.loss.heldout_loss``: same encoding, same ``max_seq_len`` truncation or
   ``overlong`` drop, only assistant tokens counted), so evaluation's ``eval_loss`` and training's
   agree on the same rows. The loss is the token-weighted mean over the set.
2. **Generation**: the prompt (every turn before the last assistant turn) is formatted with
   ``build_generation_prompt`` and answered with ``sftflow.inference.generation.generate_batch`` (greedy by
   default, ``max_new_tokens`` bounded, batched; via ``sftflow.inference.batch.generate_texts``: in this
   process, or over Ray Data actors with ``execution.engine: ray``, vLLM per
   ``execution.generation_backend``). Metrics: ROUGE-L F1 against the reference
   (``rouge_score``), mean response length (new tokens and words), empty rate, runaway rate
   (generations that hit the token bound without an end-of-turn).
3. **Answer accuracy** (verifiable tasks): when rows carry a reference ``answer`` (GSM8K-style
   sources, ``format: gsm8k``), the final answer of the greedy output is extracted
   (``sftflow.data.answers.extract_final_answer``) and compared with it (``answers_match``):
   ``accuracy`` is the exact-match rate over those rows (``accuracy_examples`` of them); per row
   ``pred_answer`` and ``correct`` (NaN for rows without a reference answer).
4. **Per task**: the held-out metrics broken down by the rows' ``source`` and ``category``
   (``sftflow.breakdown``: ``by_source/<name>/rougeL``, ``by_category/<name>/accuracy``, … with
   ``num_examples``); each group's mean weighted by its weight sums back to the overall metric.
5. **Format robustness** (``evaluation.format_robustness.wrappers: N``): the held-out prompts are
   answered again under the first N prompt wrappers of ``sftflow.data.wrappers`` (``plain`` is the
   ordinary run, reused), giving ``format/<wrapper>/rougeL`` (and ``/accuracy``), their
   ``format_spread`` (max - min) and ``format_std``; per-row outputs go to ``format_<label>.parquet``.
6. **Judge** (optional): the logit-based 1-5 rubric scorer of self-curation
   (``sftflow.inference.generation.score_pairs``, via ``sftflow.inference.batch.score_texts``), run by one
   fixed judge model so base and tuned are scored by the same judge: ``evaluation.judge_model``, else
   the pipeline's base model, resolved by ``sftflow.inference.judges.resolve_scorer`` (a judge that
   cannot be loaded is an error naming the key, never the model under test). The judge's digest is
   in the evaluation's ``eval_key`` and ``EvalResult.judge_sha256``; the flow passes the resolved
   judge to ``evaluate_task``, so its content is in the stage's cache key too.

Extra sets are read by ingestion's converters (``sftflow.data.formats.load_records``), so every
format and role alias ingest accepts works here, multi-turn conversations included.

Per-row samples go to a Parquet file (``set, id, source, category, prompt, reference, output, rougeL,
answer, pred_answer, correct, ...``) that the
promotion stage joins into the base-vs-tuned side-by-side table.

This module is the stage: ``evaluate`` (the typed function) runs the library's parts in order and
``evaluate_task`` logs it. The parts live in ``sftflow/evaluation/``: ``sets`` (rows, prompt/reference,
``eval_key``), ``metrics`` (ROUGE-L, accuracy, rates, the ``auto`` bound), ``passes`` (loss,
generation, format robustness) and ``judge`` (``resolve_judge``, the judge pass).

Run it alone::

    from tasks.evaluate import evaluate
    evaluate(model=ref, heldout=heldout_ref, cfg=EvaluationConfig(), label="base",
             template=None, out_dir=Path("..."))
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from sftflow import layout
from sftflow.breakdown import per_task_metrics
from sftflow.config_sections import EvaluationConfig, TrainingConfig
from sftflow.data.refs import DatasetRef, ModelRef, write_parquet
from sftflow.evaluation.judge import judge_scores, resolve_judge
from sftflow.evaluation.metrics import answer_accuracy, generation_metrics, reference_lengths, resolve_max_new_tokens
from sftflow.evaluation.passes import both_ways as both_ways_pass
from sftflow.evaluation.passes import format_robustness, generate_outputs, loss_metrics
from sftflow.evaluation.sets import common_system_tag, eval_key, heldout_rows, load_eval_set, split_prompt_reference
from sftflow.inference.batch import ModelHandle
from sftflow.inference.judges import scorer_digest
from sftflow.markers import write_marker
from sftflow.ops.progress_report import progress_callback
from sftflow.ops.orchestration import markdown_artifact, stage_cache_policy
from sftflow.results import HELDOUT_SET, EvalResult
from sftflow.tracking.runs import StageContext, log_dataset, log_json, stage_run


# --------------------------------------------------------------------------- the stage
def evaluate(
    *,
    model: ModelRef,
    heldout: DatasetRef,
    cfg: EvaluationConfig,
    label: str,
    template: str | None,
    out_dir: Path,
    max_seq_len: int = 512,
    overlong: str = "truncate",
    judge: ModelRef | None = None,
    trust_remote_code: bool = False,
    both_ways: bool = False,
) -> EvalResult:
    """Evaluate one model on the held-out set (and the configured extra sets).

    Args:
        model: the model to evaluate (base, merged, or adapter).
        heldout: the held-out split (canonical records).
        cfg: the pipeline's ``evaluation`` section.
        label: ``base`` / ``tuned`` / ``champion``; names the samples file.
        template: ``training.template`` (None: the tokenizer's own chat template, else gemma).
        out_dir: folder for the samples Parquet.
        max_seq_len: ``training.max_seq_len``, and
        overlong: ``training.overlong``: the loss is training's held-out loss, on the same truncation.
        judge: the judge model when ``cfg.judge`` (default: ``resolve_judge(cfg, model)``, the
            configured judge or ``model``'s base model, never a fine-tuned ``model`` itself; pass one
            fixed judge so that two evaluations are scored by the same judge).
        trust_remote_code: passed to the model loader.
        both_ways: when the held-out prompts carry a seed tag (``sets.common_system_tag``), evaluate
            them once more without it, as the served model is prompted (``passes.both_ways``:
            ``untagged_*`` metrics and ``serve_with_tag``, which way evaluated better).

    Returns:
        EvalResult with unprefixed metrics and the per-row samples.
    """
    from sftflow.inference.formatting import resolve_template
    from sftflow.inference.models import load_model

    t0 = time.monotonic()
    lm, tok = load_model(model, dtype=cfg.dtype, trust_remote_code=trust_remote_code)
    lm.eval()
    tmpl = resolve_template(tok, template)
    # Generation uses this model in this process (local engine), or loads it once per Ray Data
    # actor (execution.engine=ray), as load_model loads it: the adapter is not merged.
    handle = ModelHandle(model, dtype=cfg.dtype, trust_remote_code=trust_remote_code, merge_adapter=False,
                         loaded=(lm, tok))

    sets: list[tuple[str, list[dict[str, Any]]]] = [(HELDOUT_SET, heldout_rows(heldout, max_rows=cfg.max_examples))]
    for spec in cfg.extra_sets:
        sets.append((spec.name, load_eval_set(spec, max_rows=cfg.max_examples)))

    metrics: dict[str, float] = {}
    frames = []
    for set_name, rows in sets:
        prefix = "" if set_name == HELDOUT_SET else f"{set_name}/"
        convs = [r["messages"] for r in rows]
        prompts, refs = zip(*(split_prompt_reference(c) for c in convs)) if convs else ((), ())
        tools = [r.get("tools", "") for r in rows]
        set_loss, losses = loss_metrics(lm, tok, convs, template=tmpl, max_seq_len=max_seq_len,
                                        overlong=overlong, batch_size=cfg.batch_size, tools=tools)
        metrics.update({prefix + k: v for k, v in set_loss.items()})
        ref_len = reference_lengths(tok, list(refs))
        bound = resolve_max_new_tokens(cfg, ref_len)
        gens = generate_outputs(handle, list(prompts), template=tmpl, cfg=cfg, max_new_tokens=bound, tools=tools,
                                on_progress=progress_callback(f"evaluate.{label} {set_name}")) if prompts else []
        outputs = [g.text for g in gens]
        gm, per_row = generation_metrics(
            outputs=outputs,
            references=list(refs),
            num_tokens=[int(g.num_tokens) for g in gens],
            finished=[bool(g.finished) for g in gens],
            fits=[n <= bound for n in ref_len],
        )
        metrics.update({prefix + k: v for k, v in gm.items()})
        tag = common_system_tag(rows) if both_ways and set_name == HELDOUT_SET and prompts else None
        if tag:
            metrics.update(both_ways_pass(handle, prompts=list(prompts), refs=list(refs), tag=tag, tagged=gm,
                                          ref_len=ref_len, tools=tools, template=tmpl, cfg=cfg, max_new_tokens=bound,
                                          on_progress=progress_callback(f"evaluate.{label} untagged")))
        answers = [r.get("answer", "") for r in rows]
        acc, pred_answers, correct = answer_accuracy(outputs=outputs, answers=answers)
        metrics.update({prefix + k: v for k, v in acc.items()})
        metrics[prefix + "num_examples"] = float(len(rows))
        metrics[prefix + "max_new_tokens"] = float(bound)
        frame = pd.DataFrame(
            {
                "set": set_name,
                "id": [r["id"] for r in rows],
                "prompt": ["\n".join(m["content"] for m in p if m["role"] == "user") for p in prompts],
                "reference": list(refs),
                "output": outputs,
                "rougeL": per_row,
                "num_tokens": [int(g.num_tokens) for g in gens],
                "finished": [bool(g.finished) for g in gens],
                "reference_tokens": ref_len,
                "fits": [n <= bound for n in ref_len],
                "judge": math.nan,
                "source": [r.get("source", set_name) for r in rows],
                "category": [r.get("category", "") for r in rows],
                "answer": answers,
                "pred_answer": pred_answers,
                "correct": correct,
            }
        )
        frame = pd.concat([frame, losses], axis=1)
        if set_name == HELDOUT_SET:
            # Per task (source, category) of the held-out mixture; extra sets are one task each.
            metrics.update(per_task_metrics(frame))
            if cfg.format_robustness.wrappers:
                metrics.update(format_robustness(handle, prompts=list(prompts), refs=list(refs), tools=tools,
                                                 answers=answers, plain=frame, template=tmpl, cfg=cfg,
                                                 max_new_tokens=bound, progress=progress_callback,
                                                 out_path=Path(out_dir) / f"format_{layout.safe_name(label)}.parquet"))
        frames.append(frame)
    samples_df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    judge = (judge or resolve_judge(cfg, model, trust_remote_code=trust_remote_code)) if cfg.judge else None
    if judge is not None and len(samples_df):
        # A judge that is the evaluated model (a base model judged by itself) reuses its loaded weights.
        same = judge == model
        metrics.update(judge_scores(samples_df, judge, template=template, cfg=cfg, lm=lm if same else None,
                                    tok=tok if same else None, trust_remote_code=trust_remote_code))
    handle.close()  # a vLLM engine it started; lm stays this function's
    metrics["eval_seconds"] = time.monotonic() - t0

    samples = write_parquet(samples_df, Path(out_dir) / f"samples_{layout.safe_name(label)}.parquet",
                            name=f"eval_samples_{label}")
    return EvalResult(
        label=label,
        metrics=tuple(sorted(metrics.items())),
        samples=samples,
        heldout_sha256=heldout.sha256,
        # The resolved template: `None` and `"gemma"` on a tokenizer without a chat template are the same prompts.
        eval_key=eval_key(heldout=heldout, cfg=cfg, template=tmpl, max_seq_len=max_seq_len, judge=judge),
        judge=judge,
        judge_sha256=scorer_digest(judge),
    )



def evaluate_champion(*, model: ModelRef, heldout: DatasetRef, evaluation: EvaluationConfig,
                      training: TrainingConfig, template: str | None, out_dir: Path,
                      judge: ModelRef | None = None) -> EvalResult:
    """Evaluate the registry's current champion on this run's held-out set (the promotion gate's
    ``ChampionEvaluator``): same settings and loss rule as base and tuned, its own template.

    Args:
        judge: the judge that scored base and tuned (``EvalResult.judge``), so the champion is
            scored by the same one; None falls back to ``resolve_judge`` (the champion's base).
    """
    return evaluate(model=model, heldout=heldout, cfg=evaluation, label="champion", template=template,
                    out_dir=out_dir, max_seq_len=training.max_seq_len, overlong=training.overlong,
                    judge=judge or resolve_judge(evaluation, model))


def log_eval_metrics(result: EvalResult, *, parent_run_id: str) -> None:
    """Log ``<label>/<metric>`` to the active (stage) run and to the flow's parent run."""
    import mlflow
    from mlflow import MlflowClient

    finite = {f"{result.label}/{k}": float(v) for k, v in result.metrics if v is not None and math.isfinite(v)}
    mlflow.log_metrics(finite)
    if parent_run_id:
        client = MlflowClient()
        for k, v in finite.items():
            client.log_metric(parent_run_id, k, v)


@task(name="evaluate", task_run_name="evaluate-{label}", cache_policy=stage_cache_policy(), persist_result=True)
def evaluate_task(
    model: ModelRef,
    heldout: DatasetRef,
    cfg: EvaluationConfig,
    *,
    label: str,
    ctx: StageContext,
    training: TrainingConfig,
    trust_remote_code: bool = False,
    judge: ModelRef | None = None,
) -> EvalResult:
    """Prefect task: evaluate ``model`` on ``heldout`` in the nested run ``evaluate.<label>``.

    ``judge``: the resolved judge (``resolve_judge(cfg, model, base=<pipeline base>)``; the flow
    passes it, so the judge's content is in this task's cache key and every label shares it);
    None resolves it here from ``model``'s base model.

    Logs ``<label>/`` metrics (stage run and parent run), the held-out set as an input, the
    samples Parquet, an MLflow table of the samples and a Prefect markdown summary.
    No retries: evaluation is deterministic compute, not I/O.
    """
    import mlflow

    stage = f"evaluate.{label}"
    with stage_run(ctx, stage, tags={"sftflow.eval.label": label}):
        out_dir = ctx.stage_dir(stage)
        log_dataset(heldout, context="eval")
        mlflow.log_params({"label": label, "model": model.name or model.path, "model_kind": model.kind,
                           "max_examples": cfg.max_examples, "max_new_tokens": cfg.max_new_tokens,
                           "do_sample": cfg.do_sample, "judge": cfg.judge})
        judge = judge if judge is not None or not cfg.judge else resolve_judge(
            cfg, model, trust_remote_code=trust_remote_code)
        if judge is not None:
            mlflow.log_params({"judge_model": judge.name or judge.path, "judge_sha256": scorer_digest(judge)})
        result = evaluate(model=model, heldout=heldout, cfg=cfg, label=label, template=training.template,
                          out_dir=out_dir, max_seq_len=training.max_seq_len, overlong=training.overlong, judge=judge,
                          trust_remote_code=trust_remote_code, both_ways=label == "tuned")
        mlflow.set_tags({"sftflow.eval.heldout_sha256": result.heldout_sha256, "sftflow.eval.key": result.eval_key,
                         "sftflow.eval.judge_sha256": result.judge_sha256})
        log_eval_metrics(result, parent_run_id=ctx.parent_run_id)
        samples_df = pd.read_parquet(result.samples.path)
        log_dataset(result.samples, context="eval.samples", df=samples_df)
        mlflow.log_artifact(result.samples.path, artifact_path="eval")
        robustness = Path(out_dir) / f"format_{layout.safe_name(label)}.parquet"
        if cfg.format_robustness.wrappers and robustness.exists():
            mlflow.log_artifact(str(robustness), artifact_path="eval")
        mlflow.log_table(samples_df, artifact_file=f"eval/samples_{label}.json")
        log_json(dict(result.metrics), f"eval/metrics_{label}.json")
        lines = [f"### Evaluation: {label}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in result.metrics]
        m = dict(result.metrics)
        if "serve_with_tag" in m:  # issue 24: the served model's prompts vs the evaluated ones
            lines += ["", f"Served default: {'with' if m['serve_with_tag'] else 'without'} the seed tag "
                      f"(held-out ROUGE-L with tag {m['rougeL']:.3f}, without {m['untagged_rougeL']:.3f}; "
                      f"runaway rate {m.get('runaway_rate', float('nan')):.2f} vs {m.get('untagged_runaway_rate', float('nan')):.2f})"]
        markdown_artifact(f"evaluate-{label}", "\n".join(lines), description=f"held-out evaluation of {label}")
        write_marker(ctx.layout.stage_dir(stage), outputs=result, stage=stage)  # last: what a cache hit verifies
        return result

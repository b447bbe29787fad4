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
from sftflow.config import EvaluationConfig, ExtraEvalSet, TrainingConfig
from sftflow.ops.console import progress_callback
from sftflow.ops.orchestration import markdown_artifact, stage_cache_policy
from sftflow.markers import write_marker
from sftflow.breakdown import per_task_metrics
from sftflow.data.answers import answers_match, extract_final_answer
from sftflow.data.records import frame_to_records
from sftflow.data.refs import DatasetRef, ModelRef, write_parquet
from sftflow.errors import DataError
from sftflow.inference.batch import ModelHandle, generate_texts, score_texts
from sftflow.inference.judges import base_model_of, resolve_scorer, scorer_digest
from sftflow.tracking.runs import StageContext, log_dataset, log_json, stage_run
from sftflow.results import HELDOUT_SET, EvalResult

# Metric names computed for every set (extra sets get a "<set>/" prefix).
GENERATION_METRICS = ("rougeL", "mean_new_tokens", "mean_words", "empty_rate", "runaway_rate", "runaway_rate_all",
                      "fit_fraction")
LOSS_METRICS = ("eval_loss", "perplexity", "eval_tokens", "answer_loss", "end_prob")


# --------------------------------------------------------------------------- pure metric helpers
def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (``rouge_score``, with stemming).

    An empty prediction or reference scores 0.0 (``rouge_score`` does the same; made explicit here).
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"rouge_l: {len(predictions)} predictions vs {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out = []
    for pred, ref in zip(predictions, references):
        if not pred.strip() or not ref.strip():
            out.append(0.0)
            continue
        out.append(float(scorer.score(ref, pred)["rougeL"].fmeasure))
    return out


def answer_accuracy(*, outputs: list[str], answers: list[str]) -> tuple[dict[str, float], list, list[float]]:
    """Exact-match accuracy of the outputs' final answers against the reference answers.

    Args:
        outputs: the generated responses (worked solutions).
        answers: per row, the reference final answer ("" for a row without one: not scored).

    Returns:
        (metrics, per-row predicted answer (None when the output has none), per-row correct
        (1.0 / 0.0, NaN for rows without a reference)). ``metrics`` is empty when no row has a
        reference answer, else ``accuracy`` and ``accuracy_examples``.
    """
    if len(outputs) != len(answers):
        raise ValueError(f"answer_accuracy: {len(outputs)} outputs vs {len(answers)} answers")
    preds = [extract_final_answer(o) for o in outputs]
    correct = [float(answers_match(o, a)) if a else math.nan for o, a in zip(outputs, answers)]
    scored = [c for c in correct if not math.isnan(c)]
    if not scored:
        return {}, preds, correct
    return {"accuracy": sum(scored) / len(scored), "accuracy_examples": float(len(scored))}, preds, correct


def generation_metrics(
    *, outputs: list[str], references: list[str], num_tokens: list[int], finished: list[bool],
    fits: list[bool] | None = None,
) -> tuple[dict[str, float], list[float]]:
    """Aggregate generation metrics of one set, plus per-row ROUGE-L.

    Args:
        fits: per row, whether the reference (and its end marker) fits in ``max_new_tokens``; a
            model that is cut off on a reference longer than the bound is not running away.
            None: every reference fits.

    Returns:
        (metrics, per-row rougeL). ``empty_rate`` counts whitespace-only outputs; ``runaway_rate``
        counts generations that never produced an end-of-turn (cut at ``max_new_tokens``) among
        the rows whose reference fits (NaN when none does); ``runaway_rate_all`` over every row;
        ``fit_fraction`` is the share of rows whose reference fits.
    """
    n = len(outputs)
    fits = [True] * n if fits is None else list(fits)
    if not (n == len(references) == len(num_tokens) == len(finished) == len(fits)):
        raise ValueError("generation_metrics: outputs, references, num_tokens, finished and fits differ in length")
    scores = rouge_l(outputs, references)
    if n == 0:
        return {k: math.nan for k in GENERATION_METRICS}, scores
    n_fit = sum(fits)
    metrics = {
        "rougeL": sum(scores) / n,
        "mean_new_tokens": sum(num_tokens) / n,
        "mean_words": sum(len(o.split()) for o in outputs) / n,
        "empty_rate": sum(1 for o in outputs if not o.strip()) / n,
        "runaway_rate": sum(1 for f, ok in zip(finished, fits) if ok and not f) / n_fit if n_fit else math.nan,
        "runaway_rate_all": sum(1 for f in finished if not f) / n,
        "fit_fraction": n_fit / n,
    }
    return metrics, scores


def reference_lengths(tokenizer: Any, references: list[str]) -> list[int]:
    """Tokens of each reference answer, plus one for the end marker the model must also emit."""
    return [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in references]


def resolve_max_new_tokens(cfg: EvaluationConfig, ref_lengths: list[int]) -> int:
    """The generation bound of one set: ``evaluation.max_new_tokens``, or for ``auto`` the
    ``auto_quantile`` of the references' lengths (end marker included), rounded up to a multiple
    of 8, within [16, ``auto_max_new_tokens``].

    A bound below the references' lengths caps every model's ROUGE-L and makes a model that would
    have stopped look like a runaway; a bound far above them only costs time on runaways.
    """
    if cfg.max_new_tokens != "auto":
        return int(cfg.max_new_tokens)
    if not ref_lengths:
        return 16
    ordered = sorted(ref_lengths)
    q = ordered[min(len(ordered) - 1, max(0, math.ceil(cfg.auto_quantile * len(ordered)) - 1))]
    return int(min(cfg.auto_max_new_tokens, max(16, -(-q // 8) * 8)))


def split_prompt_reference(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """Prompt = every turn before the last assistant turn; reference = that assistant turn.

    A reference that calls tools is its text plus its calls (``formatting.assistant_text``).

    Raises:
        ValueError: the conversation has no assistant turn, or no user turn before it.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise ValueError("no assistant turn to use as the reference")
    prompt = list(messages[:last])
    if not any(m["role"] == "user" for m in prompt):
        raise ValueError("no user turn before the last assistant turn")
    from sftflow.inference.formatting import assistant_text

    return prompt, assistant_text(messages[last])


# --------------------------------------------------------------------------- extra held-out sets
def load_eval_set(spec: ExtraEvalSet, *, max_rows: int | None = None) -> list[dict[str, Any]]:
    """Load an extra held-out set as ``[{id, messages}]`` (the first ``max_rows`` usable rows).

    Rows are read and converted by ingestion's converters (``sftflow.data.formats.load_records``:
    every format and role alias ingest knows, every turn kept), so an extra set means what the same
    file would mean as training data. Rows that cannot be used are skipped and counted, never
    silently: more than half of the file unusable is an error naming the file and the first rows.

    Raises:
        DataError: the file is missing or unusable (``IngestError``), or most of its rows are.
    """
    from sftflow.data.formats import load_records
    from sftflow.data.records import record_id

    where = f"evaluation.extra_sets[{spec.name}]"
    got = load_records(spec.path, format=spec.format, where=where)
    if not got.records or len(got.rejected) > len(got.records):
        shown = "; ".join(f"row {r.row}: {r.reason}" for r in got.rejected[:3])
        raise DataError(f"{where}: {len(got.rejected)} of {got.read} rows in {got.path} are unusable: {shown}")
    limit = spec.max_rows or max_rows
    # Every converted conversation ends with an assistant turn after a user turn (formats checks
    # it), so each one splits into a prompt and a reference.
    records = got.records[:limit] if limit else got.records
    return [{"id": record_id(r.messages, tools=r.tools), "messages": r.messages, "source": spec.name,
             "category": r.category, "answer": r.answer, "tools": r.tools} for r in records]


def _text(value: Any) -> str:
    """A metadata cell as text: "" for a missing value (None, NaN: older frames lack the column)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _heldout_rows(heldout: DatasetRef, *, max_rows: int | None) -> list[dict[str, Any]]:
    df = heldout.read()
    rows = []
    for rec in frame_to_records(df):
        try:
            split_prompt_reference(rec["messages"])
        except ValueError as e:
            raise ValueError(f"held-out dataset {heldout.path} row id={rec['id']}: {e}") from None
        rows.append({"id": rec["id"], "messages": rec["messages"], "source": _text(rec.get("source")),
                     "category": _text(rec.get("category")), "answer": _text(rec.get("answer")),
                     "tools": _text(rec.get("tools"))})
        if max_rows and len(rows) >= max_rows:
            break
    return rows


# --------------------------------------------------------------------------- model passes
def _loss_metrics(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *, template: str,
                  max_seq_len: int, overlong: str, batch_size: int,
                  tools: list[str] | None = None) -> tuple[dict[str, float], pd.DataFrame]:
    """Loss metrics of one set, and the per-row losses behind them.

    ``eval_loss``/``perplexity``/``eval_tokens`` come from ``sftflow.training.loss.heldout_loss``,
    which encodes, truncates (or drops) and averages exactly as training's eval loss does, so the
    two numbers agree on the same rows. ``row_losses`` splits each row's loss into its answer
    tokens (``answer_loss``, the end marker left out) and the end marker (``end_prob``: mean
    probability of the end-of-turn token where the reference truly ends). NaN when no token counts.

    Returns:
        (metrics, per-row frame with columns ``loss`` (mean per token), ``loss_tokens``,
        ``answer_loss``, ``answer_tokens``, ``end_prob``; NaN/0 for rows without labels).
    """
    from sftflow.inference.formatting import stop_token_ids
    from sftflow.training.loss import heldout_loss, row_losses

    got = heldout_loss(model, tokenizer, conversations, template=template, max_seq_len=max_seq_len,
                       overlong=overlong, batch_size=batch_size, tools=tools)
    rows = row_losses(model, tokenizer, conversations, template=template, max_seq_len=max_seq_len,
                      overlong=overlong, stop_ids=stop_token_ids(tokenizer, template), batch_size=batch_size,
                      tools=tools)
    per_row = pd.DataFrame({
        "loss": [r.loss / r.tokens if r and r.tokens else math.nan for r in rows],
        "loss_tokens": [r.tokens if r else 0 for r in rows],
        "answer_loss": [r.answer_loss / r.answer_tokens if r and r.answer_tokens else math.nan for r in rows],
        "answer_tokens": [r.answer_tokens if r else 0 for r in rows],
        "end_prob": [math.exp(r.end_logprob) if r and not math.isnan(r.end_logprob) else math.nan for r in rows],
    })
    answer_tokens = int(per_row["answer_tokens"].sum())
    answer_sum = sum(r.answer_loss for r in rows if r)
    metrics = {
        "eval_loss": got.loss if got.tokens else math.nan,
        "perplexity": got.perplexity if got.tokens else math.nan,
        "eval_tokens": float(got.tokens),
        "answer_loss": answer_sum / answer_tokens if answer_tokens else math.nan,
        "end_prob": float(per_row["end_prob"].mean()) if per_row["end_prob"].notna().any() else math.nan,
    }
    return metrics, per_row


def _generate(model: ModelHandle, prompts: list[list[dict[str, str]]], *, template: str, cfg: EvaluationConfig,
              max_new_tokens: int, tools: list[str] | None = None, what: str = "evaluate generate"):
    """Generations for ``prompts`` with the active engine (this process, or Ray Data actors / vLLM)."""
    from sftflow.inference.formatting import build_generation_prompt, stop_token_ids

    tokenizer = model.tokenizer
    # A tool conversation's prompt shows its tool schemas, exactly as training rendered them.
    tool_list = tools if tools is not None else [None] * len(prompts)
    ids = [list(build_generation_prompt(tokenizer, p, template=template, tools=t or None))
           for p, t in zip(prompts, tool_list, strict=True)]
    return generate_texts(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=cfg.temperature if cfg.do_sample else 0.0,
        top_p=cfg.top_p if cfg.do_sample else 1.0,
        batch_size=cfg.batch_size,
        stop_ids=list(stop_token_ids(tokenizer, template)),
        seed=cfg.seed,
        on_progress=progress_callback(what),
    )


def _format_robustness(model: ModelHandle, *, prompts: list[list[dict[str, str]]], refs: list[str],
                       tools: list[str] | None = None,
                       answers: list[str], plain: pd.DataFrame, template: str, cfg: EvaluationConfig,
                       max_new_tokens: int, out_path: Path) -> dict[str, float]:
    """ROUGE-L (and accuracy) of the held-out prompts under the first N prompt wrappers, and their spread.

    ``plain`` (the prompts as they are) reuses the ordinary run's outputs (``plain``: the held-out
    samples frame); every other wrapper rewrites the user turns (``sftflow.data.wrappers``), still
    inside the chat template, and generates with the same settings and bound. With
    ``format_robustness.max_examples`` below the held-out size, evenly spaced rows are used (the
    held-out file may be ordered by source; the first rows could all be one task). Writes the
    per-row outputs of every wrapper to ``out_path``.

    Returns:
        ``format/<wrapper>/rougeL`` (+ ``/accuracy`` with reference answers), ``format_spread``
        (max - min ROUGE-L over the wrappers), ``format_std`` (population std), ``format_wrappers``
        and ``format_examples``.
    """
    from sftflow.data.wrappers import WRAPPER_NAMES, wrap_messages

    total = len(prompts)
    n = min(total, cfg.format_robustness.max_examples or total)
    rows = [i * total // n for i in range(n)]
    metrics: dict[str, float] = {}
    frames = []
    scores = []
    for name in WRAPPER_NAMES[: cfg.format_robustness.wrappers]:
        if name == "plain":
            outputs = [str(plain["output"].iloc[i]) for i in rows]
            per_row = [float(plain["rougeL"].iloc[i]) for i in rows]
        else:
            wrapped = [wrap_messages(prompts[i], name) for i in rows]
            outputs = [g.text for g in _generate(model, wrapped, template=template, cfg=cfg,
                                                 max_new_tokens=max_new_tokens,
                                                 tools=[tools[i] for i in rows] if tools else None,
                                                 what=f"evaluate format {name}")] if n else []
            per_row = rouge_l(outputs, [refs[i] for i in rows])
        acc, _, correct = answer_accuracy(outputs=outputs, answers=[answers[i] for i in rows])
        value = sum(per_row) / n if n else math.nan
        scores.append(value)
        metrics[f"format/{name}/rougeL"] = value
        if acc:
            metrics[f"format/{name}/accuracy"] = acc["accuracy"]
        frames.append(pd.DataFrame({"wrapper": name, "id": [plain["id"].iloc[i] for i in rows], "output": outputs,
                                    "rougeL": per_row, "correct": correct}))
    finite = [v for v in scores if math.isfinite(v)]
    metrics["format_spread"] = max(finite) - min(finite) if finite else math.nan
    metrics["format_std"] = float(pd.Series(finite).std(ddof=0)) if finite else math.nan
    metrics["format_wrappers"] = float(len(scores))
    metrics["format_examples"] = float(n)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames, ignore_index=True).to_parquet(out_path, index=False)
    return metrics


def eval_key(*, heldout: DatasetRef, cfg: EvaluationConfig, template: str | None, max_seq_len: int,
             judge: ModelRef | None = None) -> str:
    """Digest of what makes two evaluations comparable (data + generation settings + formatting + judge).

    With ``evaluation.judge`` the judge's content digest (``judges.scorer_digest(judge)``) is part
    of it: two evaluations scored by different judges never share a key.
    """
    from sftflow.data.refs import sha256_file, sha256_json

    extra = []
    for s in cfg.extra_sets:
        p = Path(s.path)
        extra.append([s.name, s.format, s.max_rows, sha256_file(p) if p.is_file() else s.path])
    key: dict[str, Any] = {}
    if cfg.format_robustness.wrappers:  # only when on, so that keys of earlier evaluations stay valid
        key["format_robustness"] = [cfg.format_robustness.wrappers, cfg.format_robustness.max_examples]
    if cfg.judge:  # likewise: keys of evaluations without a judge stay what they were
        key["judge_sha256"] = scorer_digest(judge)
    return sha256_json(
        {
            **key,
            "heldout": heldout.sha256,
            "extra": extra,
            "max_examples": cfg.max_examples,
            "max_new_tokens": cfg.max_new_tokens,
            "auto": [cfg.auto_quantile, cfg.auto_max_new_tokens] if cfg.max_new_tokens == "auto" else None,
            "do_sample": cfg.do_sample,
            "temperature": cfg.temperature if cfg.do_sample else None,
            "top_p": cfg.top_p if cfg.do_sample else None,
            "seed": cfg.seed,
            "judge": cfg.judge_model if cfg.judge else None,
            "template": template,
            "max_seq_len": max_seq_len,
            "dtype": cfg.dtype,
        }
    )


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

    sets: list[tuple[str, list[dict[str, Any]]]] = [(HELDOUT_SET, _heldout_rows(heldout, max_rows=cfg.max_examples))]
    for spec in cfg.extra_sets:
        sets.append((spec.name, load_eval_set(spec, max_rows=cfg.max_examples)))

    metrics: dict[str, float] = {}
    frames = []
    for set_name, rows in sets:
        prefix = "" if set_name == HELDOUT_SET else f"{set_name}/"
        convs = [r["messages"] for r in rows]
        prompts, refs = zip(*(split_prompt_reference(c) for c in convs)) if convs else ((), ())
        tools = [r.get("tools", "") for r in rows]
        loss_metrics, losses = _loss_metrics(lm, tok, convs, template=tmpl, max_seq_len=max_seq_len,
                                             overlong=overlong, batch_size=cfg.batch_size, tools=tools)
        metrics.update({prefix + k: v for k, v in loss_metrics.items()})
        ref_len = reference_lengths(tok, list(refs))
        bound = resolve_max_new_tokens(cfg, ref_len)
        gens = _generate(handle, list(prompts), template=tmpl, cfg=cfg, max_new_tokens=bound,
                         tools=tools, what=f"evaluate.{label} {set_name}") if prompts else []
        outputs = [g.text for g in gens]
        gm, per_row = generation_metrics(
            outputs=outputs,
            references=list(refs),
            num_tokens=[int(g.num_tokens) for g in gens],
            finished=[bool(g.finished) for g in gens],
            fits=[n <= bound for n in ref_len],
        )
        metrics.update({prefix + k: v for k, v in gm.items()})
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
                metrics.update(_format_robustness(handle, prompts=list(prompts), refs=list(refs), tools=tools,
                                                  answers=answers,
                                                  plain=frame, template=tmpl, cfg=cfg, max_new_tokens=bound,
                                                  out_path=Path(out_dir) / f"format_{layout.safe_name(label)}.parquet"))
        frames.append(frame)
    samples_df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    judge = (judge or resolve_judge(cfg, model, trust_remote_code=trust_remote_code)) if cfg.judge else None
    if judge is not None and len(samples_df):
        # A judge that is the evaluated model (a base model judged by itself) reuses its loaded weights.
        same = judge == model
        metrics.update(_judge(samples_df, judge, template=template, cfg=cfg, lm=lm if same else None,
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


def _judge(
    samples_df: pd.DataFrame, judge: ModelRef, *, template: str | None, cfg: EvaluationConfig,
    lm: Any, tok: Any, trust_remote_code: bool,
) -> dict[str, float]:
    """Score every (prompt, output) with the rubric scorer; fills ``samples_df.judge`` in place.

    ``lm``/``tok``: the judge already loaded here (None: ``judge`` is loaded by ``score_texts``,
    in this process or once per Ray Data actor).
    """
    handle = ModelHandle(judge, dtype=cfg.dtype, trust_remote_code=trust_remote_code, merge_adapter=False,
                         loaded=None if lm is None else (lm, tok))
    try:
        scores = score_texts(handle, list(zip(samples_df["prompt"], samples_df["output"])), template=template,
                             batch_size=cfg.batch_size)
    finally:
        handle.close()
    samples_df["judge"] = [float(s.expected) for s in scores]
    out = {}
    for set_name, grp in samples_df.groupby("set", sort=False):
        prefix = "" if set_name == HELDOUT_SET else f"{set_name}/"
        out[prefix + "judge_score"] = float(grp["judge"].mean())
    return out


# --------------------------------------------------------------------------- Prefect task
def resolve_judge(cfg: EvaluationConfig, model: ModelRef, *, base: ModelRef | None = None,
                  trust_remote_code: bool = False) -> ModelRef | None:
    """The fixed judge (None without ``evaluation.judge``): ``judges.resolve_scorer`` for role ``judge``.

    ``cfg.judge_model`` when set, else ``base`` (the pipeline's base model: the flow passes it, so
    base and tuned share one judge), else the base model ``model`` records (``judges.base_model_of``).

    Raises:
        sftflow.inference.judges.ScorerUnavailable: the judge cannot be loaded (the message names
            ``evaluation.judge_model`` and the path); never falls back to ``model`` itself.
    """
    if not cfg.judge:
        return None
    if base is None and not cfg.judge_model:
        base = base_model_of(model, role="judge", trust_remote_code=trust_remote_code)
    return resolve_scorer(configured=cfg.judge_model, base=base, role="judge", trust_remote_code=trust_remote_code)


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
                          trust_remote_code=trust_remote_code)
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
        markdown_artifact(f"evaluate-{label}", "\n".join(lines), description=f"held-out evaluation of {label}")
        write_marker(ctx.layout.stage_dir(stage), outputs=result, stage=stage)  # last: what a cache hit verifies
        return result

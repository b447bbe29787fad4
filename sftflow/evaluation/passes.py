"""The model passes of an evaluation: the held-out loss, generation through the batch inference
API, and format robustness (the same prompts under other prompt wrappers).

Generation goes through ``sftflow.inference.batch.generate_texts``: in this process, or over Ray
Data actors with ``execution.engine: ray``, vLLM per ``execution.generation_backend``. The loss is
training's own held-out loss (``sftflow.training.loss``), so evaluation's ``eval_loss`` and
training's agree on the same rows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from sftflow.config_sections import EvaluationConfig
from sftflow.evaluation.metrics import answer_accuracy, rouge_l
from sftflow.inference.batch import ModelHandle, generate_texts
from sftflow.inference.generation import Generated, ProgressCallback


def loss_metrics(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *, template: str,
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


def generate_outputs(model: ModelHandle, prompts: list[list[dict[str, str]]], *, template: str,
                     cfg: EvaluationConfig, max_new_tokens: int, tools: list[str] | None = None,
                     on_progress: ProgressCallback | None = None) -> list[Generated]:
    """Generations for ``prompts`` with the active engine (this process, or Ray Data actors / vLLM).

    Greedy unless ``evaluation.do_sample``; ``on_progress(done, total)`` after each batch.
    """
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
        on_progress=on_progress,
    )


def format_robustness(model: ModelHandle, *, prompts: list[list[dict[str, str]]], refs: list[str],
                      tools: list[str] | None = None,
                      answers: list[str], plain: pd.DataFrame, template: str, cfg: EvaluationConfig,
                      max_new_tokens: int, out_path: Path,
                      progress: Callable[[str], ProgressCallback] | None = None) -> dict[str, float]:
    """ROUGE-L (and accuracy) of the held-out prompts under the first N prompt wrappers, and their spread.

    ``plain`` (the prompts as they are) reuses the ordinary run's outputs (``plain``: the held-out
    samples frame); every other wrapper rewrites the user turns (``sftflow.data.wrappers``), still
    inside the chat template, and generates with the same settings and bound. With
    ``format_robustness.max_examples`` below the held-out size, evenly spaced rows are used (the
    held-out file may be ordered by source; the first rows could all be one task). Writes the
    per-row outputs of every wrapper to ``out_path``. ``progress(what)`` makes the ``on_progress``
    of each wrapper's generation (None: no progress reports).

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
            outputs = [g.text for g in generate_outputs(
                model, wrapped, template=template, cfg=cfg, max_new_tokens=max_new_tokens,
                tools=[tools[i] for i in rows] if tools else None,
                on_progress=progress(f"evaluate format {name}") if progress else None)] if n else []
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


# The untagged way's metrics, flat (``untagged_<metric>``: a ``/`` would read as an extra set's name).
UNTAGGED_METRICS = ("rougeL", "runaway_rate", "mean_new_tokens", "empty_rate")


def both_ways(model: ModelHandle, *, prompts: list[list[dict[str, str]]], refs: list[str], tag: str,
              tagged: dict[str, float], ref_len: list[int], tools: list[str] | None, template: str,
              cfg: EvaluationConfig, max_new_tokens: int,
              on_progress: ProgressCallback | None = None) -> dict[str, float]:
    """The held-out set evaluated without the seed tag, as a user of the served model prompts it (issue 24).

    Training and the main evaluation prompt with the seed tag as the system turn; a served model
    gets plain messages. This generates again with the tag removed (``sets.without_tag``), same
    bound and decoding, and says which way evaluated better (``metrics.better_prompt_way``).

    Args:
        tagged: the tagged way's generation metrics (already computed).
        (the rest as in ``generate_outputs``; ``ref_len`` as for the tagged way.)

    Returns:
        ``untagged_<metric>`` for ``UNTAGGED_METRICS``, ``tagged_minus_untagged_rougeL`` and
        ``serve_with_tag`` (1.0: the served default should carry the tag, 0.0: plain messages).
    """
    from sftflow.evaluation.metrics import TAGGED, better_prompt_way, generation_metrics
    from sftflow.evaluation.sets import without_tag

    plain = [without_tag(p, tag) for p in prompts]
    gens = generate_outputs(model, plain, template=template, cfg=cfg, max_new_tokens=max_new_tokens, tools=tools,
                            on_progress=on_progress)
    gm, _ = generation_metrics(outputs=[g.text for g in gens], references=refs,
                               num_tokens=[int(g.num_tokens) for g in gens], finished=[bool(g.finished) for g in gens],
                               fits=[n <= max_new_tokens for n in ref_len])
    out = {f"untagged_{k}": float(gm[k]) for k in UNTAGGED_METRICS if k in gm}
    out["tagged_minus_untagged_rougeL"] = float(tagged["rougeL"] - gm["rougeL"])
    out["serve_with_tag"] = 1.0 if better_prompt_way(tagged=tagged, untagged=gm) == TAGGED else 0.0
    return out

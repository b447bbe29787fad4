"""Rejection sampling's model passes: k samples per prompt and their scores, all through the batch
inference API (``sftflow.inference.batch``), so ``execution.engine`` and
``execution.generation_backend`` apply.

On transformers each prompt is prefilled ONCE and its KV cache repeated k times for decoding
(``generation.sample_k``, temperature/top-p, seeded); ``execution.engine: ray`` runs the same batches
on Ray Data actors (same samples), ``execution.generation_backend: vllm`` uses vLLM's
``SamplingParams(n=k)``. A sample is scored by answer correctness (1.0/0.0, ``sftflow.data.answers``)
for a verifiable prompt (a non-empty ``answer``; ``scorer: auto`` or ``answer``), else by the logit
1-5 rubric score of self-curation (``batch.score_texts``; expected rating) from ``scorer_model``,
resolved by ``sftflow.inference.judges.resolve_scorer`` (a scorer that cannot be loaded is an error
naming the key, never silently another model).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from sftflow.config_sections import RejectionSamplingConfig, TrainingConfig
from sftflow.data.answers import extract_final_answer
from sftflow.data.records import is_blank
from sftflow.data.refs import ModelRef
from sftflow.inference.batch import ModelHandle, generate_texts, score_texts
from sftflow.inference.generation import ProgressCallback
from sftflow.inference.judges import resolve_scorer
from sftflow.rejection.pool import PoolPrompt
from sftflow.rejection.selection import BAD_PROMPT, answer_score


def scorer_for(item: PoolPrompt, scorer: str) -> str:
    """``answer`` or ``rubric`` for one prompt under ``cfg.scorer`` (auto: answer when the row has one)."""
    if scorer == "auto":
        return "answer" if item.answer.strip() else "rubric"
    return scorer


def rubric_scores(rows: list[dict[str, Any]], *, scorer: ModelRef | None, sampler: ModelHandle, model: ModelRef,
                  cfg: RejectionSamplingConfig, training: TrainingConfig, trust_remote_code: bool = False
                  ) -> list[float]:
    """Expected 1-5 rubric scores of (prompt, response) rows by ``scorer`` (batch ``score_texts``).

    The sampler's own model (``scorer_model: tuned``) reuses the sampler's handle (loaded once);
    another scorer is loaded as the sampler is (adapter merged, ``cfg.dtype``).
    """
    if not rows:
        return []
    if scorer is None:
        raise ValueError("rejection sampling: rubric rows to score but no scorer was resolved (a bug)")
    ref = scorer
    own = ref != model
    handle = ModelHandle(ref, dtype=cfg.dtype, trust_remote_code=trust_remote_code) if own else sampler
    try:
        scores = score_texts(handle, [(r["prompt"], r["response"]) for r in rows], template=training.template,
                             batch_size=cfg.score_batch_size)
    finally:
        if own:
            handle.close()
    return [float(s.expected) for s in scores]


def sample_and_score(pool: Sequence[PoolPrompt], screened: dict[int, tuple[str, str]], *, model: ModelRef,
                     cfg: RejectionSamplingConfig, training: TrainingConfig, base: ModelRef | None = None,
                     trust_remote_code: bool = False, on_progress: ProgressCallback | None = None
                     ) -> dict[int, list[dict[str, Any]]]:
    """k samples of every pool prompt not ``screened`` (a prompt that cannot be rendered is added to
    it as ``bad_prompt``), each scored; ``{pool position: its k candidate rows}``.

    Sampling and rubric scoring go through the batch inference API (engine and backend apply).
    ``base``: the pipeline's base model (``scorer_model: base``); ``on_progress(prompts_done,
    prompts_total)`` after each sampling batch.
    """
    from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids

    # The sampler, as batch inference loads it: here (local engine) or once per Ray Data actor / vLLM.
    sampler = ModelHandle(model, dtype=cfg.dtype, trust_remote_code=trust_remote_code)
    try:
        tok = sampler.tokenizer
        template = resolve_template(tok, training.template)
        to_sample: list[int] = []
        prompt_ids: list[list[int]] = []
        for i, item in enumerate(pool):
            if i in screened:
                continue
            try:
                ids = build_generation_prompt(tok, item.turns(), template=template, tools=item.tools or None)
            except ValueError as e:
                screened[i] = (BAD_PROMPT, str(e)[:300])
                continue
            to_sample.append(i)
            prompt_ids.append(list(ids))
        # The rubric scorer is resolved before any sampling: a scorer that cannot be loaded fails fast.
        scorer = resolve_scorer(configured=cfg.scorer_model, base=base, role="rejection", model=model,
                                trust_remote_code=trust_remote_code) \
            if any(scorer_for(pool[i], cfg.scorer) == "rubric" for i in to_sample) else None
        samples = generate_texts(sampler, prompt_ids, num_samples=cfg.k, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size,
                                 stop_ids=stop_token_ids(tok, template), seed=cfg.seed, on_progress=on_progress) \
            if prompt_ids else []

        sampled_rows: dict[int, list[dict[str, Any]]] = {}
        for i, gens in zip(to_sample, samples):
            item = pool[i]
            method = scorer_for(item, cfg.scorer)
            sampled_rows[i] = [{
                "prompt_id": item.prompt_id, "prompt_index": i, "sample_index": s, "source": item.source,
                "prompt": item.text, "response": g.text, "num_tokens": g.num_tokens, "finished": g.finished,
                "scorer": method, "score": math.nan, "reference_answer": item.answer,
                "predicted_answer": (extract_final_answer(g.text) or "") if method == "answer" else "",
                "best": False, "kept": False, "reason": "", "detail": "",
            } for s, g in enumerate(gens)]

        # Score every non-empty sample: answers by comparison, the rest with the rubric in one pass.
        rubric_rows = []
        for rs in sampled_rows.values():
            for r in rs:
                if is_blank(r["response"]):
                    continue
                if r["scorer"] == "answer":
                    r["score"] = answer_score(r["response"], r["reference_answer"])
                else:
                    rubric_rows.append(r)
        got = rubric_scores(rubric_rows, scorer=scorer, sampler=sampler, model=model, cfg=cfg, training=training,
                            trust_remote_code=trust_remote_code)
    finally:
        sampler.close()
    for r, score in zip(rubric_rows, got):
        r["score"] = score
    return sampled_rows

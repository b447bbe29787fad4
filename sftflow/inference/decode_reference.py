"""The reference generation path: transformers ``model.generate`` (the code ``generate_batch`` and
``sample_k`` ran before the lean decode loop of ``sftflow.inference.decode``).

Kept so the fast path can be checked against it: greedy decoding must be token-identical in fp32,
and seeded sampling must draw the same tokens (``tests/unit/test_generation_speed.py``), and
``bench/generate.py`` times both on the same model in the same run. Same signatures and semantics
as ``generation.generate_batch`` / ``generation.sample_k``; not used by the pipeline.
"""

from __future__ import annotations

from typing import Any, Sequence

from sftflow.inference.generation import (
    Generated,
    ProgressCallback,
    _cache_kwarg,
    _check_prompts,
    _device,
    _left_pad,
    _length_sorted_batches,
    _pad_id,
    nucleus_sample,
)


def _base_gen_kwargs(*, max_new_tokens: int, sample: bool, stops: list[int], pad_id: int) -> dict[str, Any]:
    """``generate`` arguments every caller sets. Explicit values override anything in the model's
    generation_config (e.g. Gemma ships do_sample with top_k=64/top_p=0.95; a global default
    top_k=50 would apply otherwise)."""
    return {"max_new_tokens": max_new_tokens, "do_sample": sample, "repetition_penalty": 1.0,
            "eos_token_id": stops or None, "pad_token_id": pad_id, "use_cache": True}



def _nucleus_processor(temperature: float, top_p: float) -> Any:
    """A logits processor that samples (``nucleus_sample``) and leaves only the drawn token finite.

    ``generate`` then runs in greedy mode and takes exactly that token: its own softmax +
    multinomial over the full vocabulary never runs.
    """
    import torch
    from transformers.generation import LogitsProcessor

    class _NucleusSampler(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            choice = nucleus_sample(scores, temperature=temperature, top_p=top_p)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, choice.unsqueeze(1), 0.0)

    return _NucleusSampler()



def reference_generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int,
    stop_ids: Sequence[int],
    seed: int = 0,
    min_new_tokens: int = 0,
    on_progress: ProgressCallback | None = None,
) -> list[Generated]:
    """``generation.generate_batch`` through ``model.generate`` (the reference path).

    Args:
        model: a transformers causal LM (peft-wrapped is fine).
        tokenizer: its tokenizer (used to decode, and for the pad id).
        prompts: token ids of each prompt (e.g. from ``formatting.build_generation_prompt``).
        max_new_tokens: hard bound on new tokens per prompt.
        temperature: 0 means greedy decoding; > 0 samples with this temperature.
        top_p: nucleus sampling mass (sampling only). top-k is off, whatever the model's
            generation_config says, so the sampling is exactly (temperature, top_p).
        batch_size: prompts per forward pass; prompts are sorted by length first so a batch
            carries little padding.
        stop_ids: token ids that end a generation (end-of-turn, eos).
        seed: seeds sampling (per batch: ``seed + batch index``), so a rerun gives the same text.
        min_new_tokens: stop tokens are suppressed before this many new tokens (0: off); a
            benchmark sets it to ``max_new_tokens`` so every row decodes the same length.
        on_progress: called as ``on_progress(prompts_done, prompts_total)`` after each batch (a
            stage passes one that feeds ``sftflow.ops.progress_report.Progress``).

    Returns:
        One ``Generated`` per prompt, in input order.

    Raises:
        ValueError: on an empty prompt or non-positive sizes.
    """
    import torch

    if max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be > 0")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    rows = _check_prompts(prompts)
    if not rows:
        return []
    stops = [int(s) for s in stop_ids]
    stop_set = set(stops)
    pad_id = _pad_id(tokenizer, stops)
    device = _device(model)
    sample = temperature > 0
    gen_kwargs = _base_gen_kwargs(max_new_tokens=max_new_tokens, sample=sample, stops=stops, pad_id=pad_id)
    if sample:
        gen_kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    if min_new_tokens > 0:
        gen_kwargs["min_new_tokens"] = int(min_new_tokens)

    results: list[Generated | None] = [None] * len(rows)
    done = 0
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for b, idx in enumerate(_length_sorted_batches([len(r) for r in rows], batch_size)):
            ids, mask, _ = _left_pad([rows[i] for i in idx], pad_id, device)
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(seed + b)
                out = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
            new = out[:, ids.shape[1]:].tolist()
            for j, i in enumerate(idx):
                toks = new[j]
                cut = next((k for k, t in enumerate(toks) if t in stop_set), None)
                content = toks if cut is None else toks[:cut]
                text = tokenizer.decode(content, skip_special_tokens=True)
                results[i] = Generated(text=text, num_tokens=len(content), finished=cut is not None)
            done += len(idx)
            if on_progress is not None:
                on_progress(done, len(rows))
    finally:
        if was_training:
            model.train()
    return [r for r in results if r is not None]


def reference_sample_k(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 0.7,
    top_p: float = 1.0,
    batch_size: int,
    stop_ids: Sequence[int],
    seed: int = 0,
    min_new_tokens: int = 0,
    on_progress: ProgressCallback | None = None,
) -> list[list[Generated]]:
    """``generation.sample_k`` through ``model.generate`` (the reference path): k samples per prompt, one prefill.

    Each batch of prompts is left-padded and prefilled once (all prompt tokens but the last, with
    the KV cache); the cache is then repeated ``num_samples`` times along the batch
    (``batch_repeat_interleave``) and ``model.generate`` decodes the ``batch * num_samples`` rows
    from it. The prompt is thus never recomputed per sample: k samples cost one prefill plus a
    decode loop over k times the rows (which a batched forward absorbs far better than k loops).

    Sampling is temperature + nucleus (``nucleus_sample``; top-k off, repetition penalty 1), seeded
    per batch with ``seed + batch index``: the same prompts, batch size and seed give the same
    samples. ``temperature=0`` decodes greedily (the k samples are then identical, and equal to
    ``generate_batch``'s output: a check of the shared prefill).

    Args:
        model: a transformers causal LM (peft-wrapped is fine).
        tokenizer: its tokenizer.
        prompts: token ids of each prompt.
        num_samples: k, samples per prompt (>= 1).
        max_new_tokens: bound on new tokens per sample.
        temperature: sampling temperature (0: greedy).
        top_p: nucleus mass (sampling only).
        batch_size: prompts per prefill; the decode batch is ``batch_size * num_samples`` rows.
        stop_ids: token ids that end a sample.
        seed: sampling seed.
        min_new_tokens: stop tokens are suppressed before this many new tokens (0: off).
        on_progress: called as ``on_progress(prompts_done, prompts_total)`` after each batch.

    Returns:
        For each prompt (input order), its ``num_samples`` generations in sample order.

    Raises:
        ValueError: an empty prompt, non-positive sizes, or a negative temperature.
    """
    import torch

    if num_samples <= 0:
        raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
    if max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be > 0")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
    rows = _check_prompts(prompts)
    if not rows:
        return []
    stops = [int(s) for s in stop_ids]
    stop_set = set(stops)
    pad_id = _pad_id(tokenizer, stops)
    device = _device(model)
    cache_arg = _cache_kwarg(model)
    sample = temperature > 0
    # Sampling happens in one processor (temperature, then top-p, then the draw); generate decodes
    # greedily and so takes the drawn token: nothing from the model's generation_config adds to it.
    gen_kwargs = _base_gen_kwargs(max_new_tokens=max_new_tokens, sample=False, stops=stops, pad_id=pad_id)
    if sample:
        gen_kwargs["logits_processor"] = [_nucleus_processor(float(temperature), float(top_p))]
    if min_new_tokens > 0:
        gen_kwargs["min_new_tokens"] = int(min_new_tokens)

    results: list[list[Generated] | None] = [None] * len(rows)
    was_training = getattr(model, "training", False)
    model.eval()
    done = 0
    try:
        for b, idx in enumerate(_length_sorted_batches([len(r) for r in rows], batch_size)):
            ids, mask, pos = _left_pad([rows[i] for i in idx], pad_id, device)
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(seed + b)
                kwargs: dict[str, Any] = {}
                if ids.shape[1] > 1 and cache_arg is not None:
                    # The shared prefill: every prompt token but the last (generate feeds the last
                    # one itself, and needs at least one uncached token to start from).
                    pre = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                                use_cache=True, logits_to_keep=1)
                    cache = getattr(pre, "past_key_values", None) or getattr(pre, "cache", None)
                    if cache is not None and hasattr(cache, "batch_repeat_interleave"):
                        cache.batch_repeat_interleave(num_samples)
                        kwargs[cache_arg] = cache  # transformers 5.x: ``cache`` (was past_key_values)
                out = model.generate(input_ids=ids.repeat_interleave(num_samples, dim=0),
                                     attention_mask=mask.repeat_interleave(num_samples, dim=0),
                                     **gen_kwargs, **kwargs)
            new = out[:, ids.shape[1]:].tolist()
            for j, i in enumerate(idx):
                samples = []
                for s in range(num_samples):
                    toks = new[j * num_samples + s]
                    cut = next((k for k, t in enumerate(toks) if t in stop_set), None)
                    content = toks if cut is None else toks[:cut]
                    samples.append(Generated(text=tokenizer.decode(content, skip_special_tokens=True),
                                             num_tokens=len(content), finished=cut is not None))
                results[i] = samples
            done += len(idx)
            if on_progress is not None:
                on_progress(done, len(rows))
    finally:
        if was_training:
            model.train()
    return [r for r in results if r is not None]

"""A lean KV-cache decode loop: prefill once, then one-token steps, logits at the last position only.

``generation.generate_batch`` and ``generation.sample_k`` decode through ``decode_loop`` instead of
transformers' ``model.generate``. The loop does exactly what ``generate`` does for these settings
(greedy or one externally drawn token per step, stop ids with per-row stopping, left padding with
position ids counted over real tokens, ``min_new_tokens`` suppressing the stop ids), so greedy output
is token-identical to ``generate`` in fp32 (``tests/unit/test_generation_speed.py``), but it skips
``generate``'s per-step machinery: config merging, stopping-criteria objects, logits-processor lists,
``prepare_inputs_for_generation``'s clones, and a growing ``input_ids`` tensor re-concatenated every
step. ``bench/generate.py`` measures what that is worth against ``generate`` on the same model.

Per step the model gets one new token per row, the cache, the grown attention mask and the next
position ids, with ``logits_to_keep=1`` (so the 262k-entry LM head of Gemma runs on one position).
Finished rows keep decoding (their token is replaced by the pad id) until every row has finished,
like ``generate``: a batch costs its longest member, and the random draws per step do not depend on
which rows finished (so a seeded run draws exactly what ``generate`` + a sampling processor draws).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

# ``pick(scores) -> token ids``: chooses one token per row from float32 next-token scores (rows, vocab).
Picker = Callable[[Any], Any]


def greedy_pick(scores: Any) -> Any:
    """The most likely token of each row (first index on ties, as ``generate``'s greedy search)."""
    return scores.argmax(dim=-1)


def model_cache(out: Any) -> Any:
    """The KV cache a forward pass returned (transformers 5.x: ``cache``; 4.x: ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def decode_loop(
    model: Any,
    input_ids: Any,
    attention_mask: Any,
    position_ids: Any,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    pick: Picker = greedy_pick,
    min_new_tokens: int = 0,
    cache: Any = None,
    cache_arg: str = "cache",
) -> Any:
    """Decode up to ``max_new_tokens`` new tokens per row; returns them, shape (rows, steps), long.

    Call it under ``torch.inference_mode()``. ``input_ids`` / ``attention_mask`` / ``position_ids``
    are the left-padded prompts (``generation._left_pad``). Without ``cache`` the first forward is
    the prefill of the whole prompt; with ``cache`` (holding every prompt token but the last, as
    ``sample_k``'s shared prefill does) the first forward feeds only the last prompt token.

    Args:
        model: a transformers causal LM (peft-wrapped is fine); its forward takes ``cache_arg``,
            ``position_ids`` and ``logits_to_keep``.
        input_ids: (rows, width) prompt ids.
        attention_mask: (rows, width), 1 on real tokens.
        position_ids: (rows, width), real-token positions.
        max_new_tokens: steps at most.
        stop_ids: ids that finish a row (the stop token is emitted; the row pads afterwards).
        pad_id: the token a finished row emits.
        pick: chooses the next token from float32 scores (greedy by default).
        min_new_tokens: the stop ids are masked out of the scores for the first this-many steps.
        cache: a KV cache for all prompt tokens but the last, or None.
        cache_arg: the forward's keyword for the cache (``generation._cache_kwarg``).

    Returns:
        The new tokens; fewer than ``max_new_tokens`` columns when every row stopped earlier.
    """
    import torch

    rows = input_ids.shape[0]
    device = input_ids.device
    stops = torch.tensor(sorted({int(s) for s in stop_ids}), dtype=torch.long, device=device)
    if cache is None:
        step_ids, step_pos = input_ids, position_ids
    else:
        step_ids, step_pos = input_ids[:, -1:], position_ids[:, -1:]
    # The mask grows by one column per step; preallocated once instead of a torch.cat per step.
    mask = torch.ones((rows, attention_mask.shape[1] + max_new_tokens), dtype=attention_mask.dtype, device=device)
    mask[:, :attention_mask.shape[1]] = attention_mask
    width = attention_mask.shape[1]
    out = torch.full((rows, max_new_tokens), int(pad_id), dtype=torch.long, device=device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    pad = torch.tensor(int(pad_id), dtype=torch.long, device=device)
    steps = 0
    for step in range(max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=mask[:, :width + step], position_ids=step_pos,
                    use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        cache = model_cache(res)
        # float32 copy of the last position's logits: what generate hands its processors.
        scores = res.logits[:, -1, :].to(dtype=torch.float32, copy=True)
        del res
        if step < min_new_tokens and stops.numel():
            scores.index_fill_(1, stops, float("-inf"))
        token = torch.where(unfinished, pick(scores), pad)
        out[:, step] = token
        steps = step + 1
        if stops.numel():
            unfinished &= ~torch.isin(token, stops)
            if not bool(unfinished.any()):
                break
        step_ids = token.unsqueeze(1)
        step_pos = step_pos[:, -1:] + 1
    return out[:, :steps]

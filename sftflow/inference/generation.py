"""Batched KV-cache generation: one sample per prompt (``generate_batch``) or k (``sample_k``).

Shared by backtranslation (candidate instructions from the backward model), rejection sampling
(k samples per prompt) and evaluation (held-out generations), all through ``sftflow.inference.batch``.

``generate_batch`` left-pads length-sorted batches of prompt ids and decodes them with the lean
KV-cache loop of ``sftflow.inference.decode`` (per-row attention mask and position ids, logits at
the last position only), so a batch of prompts costs about as much as its longest member instead of
one full decode loop per prompt. Results come back in input order. The loop replaced
``model.generate`` (kept as ``decode_reference``): greedy output is token-identical to it in fp32
and sampled draws are the same for the same seed (``tests/unit/test_generation_speed.py``).

``sample_k`` draws k samples per prompt from ONE prefill of the prompt: the prompt's KV cache is
repeated k times along the batch and decoding starts from it (rejection sampling / best-of-n).

The logit-based 1-5 rubric scorer (``score_pairs``) is ``sftflow.inference.rubric``; it shares
this module's batching helpers (``_length_sorted_batches``, ``_left_pad``).

Example::

    from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids
    template = resolve_template(tok, None)
    ids = [build_generation_prompt(tok, [{"role": "user", "content": q}], template=template) for q in qs]
    outs = generate_batch(model, tok, ids, max_new_tokens=64, batch_size=8,
                          stop_ids=stop_token_ids(tok, template), seed=0)
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from sftflow.inference.decode import decode_loop, greedy_pick, model_cache

# ``on_progress(done, total)``: generation reports progress through a plain callback, so this
# module stays free of console/orchestration imports (the stage adapts it to ``ops.progress_report.Progress``).
ProgressCallback = Callable[[int, int], None]



@dataclass(frozen=True)
class Generated:
    """One generation.

    Attributes:
        text: the decoded new tokens, stop token and special tokens removed.
        num_tokens: new tokens produced, not counting the stop token.
        finished: True when a stop token ended it; False when it ran into ``max_new_tokens``.
    """

    text: str
    num_tokens: int
    finished: bool


# --------------------------------------------------------------------------- helpers
def _device(model: Any) -> Any:
    import torch

    dev = getattr(model, "device", None)
    if dev is not None:
        return dev
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _pad_id(tokenizer: Any, stop_ids: Sequence[int]) -> int:
    """The id used for left padding: the tokenizer's pad, else its eos, else the first stop id."""
    for cand in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(cand, int):
            return cand
    if stop_ids:
        return int(stop_ids[0])
    return 0


def _left_pad(rows: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any, Any]:
    """Left-pad ``rows`` into (input_ids, attention_mask, position_ids) tensors.

    Position ids count real tokens only, so a padded row sees exactly the positions it would see
    unpadded (without them, left padding shifts every rotary position and changes the output).
    """
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _check_prompts(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        ids = [int(x) for x in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token id")
        out.append(ids)
    return out


def _cache_kwarg(model: Any) -> str | None:
    """Name of the forward argument that takes a KV cache (transformers 5.x: ``cache``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return None
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: a memory error shows early)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------- generation
@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """``model`` in eval mode for the block, its training mode restored after (also on an error):
    inference inside a training run (a curation or evaluation pass) must not leave it in eval mode."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def progress_batches(lengths: list[int], batch_size: int,
                     on_progress: ProgressCallback | None = None) -> Iterator[list[int]]:
    """The length-sorted batches of row indices (``_length_sorted_batches``), calling
    ``on_progress(rows done, rows total)`` once each batch has been processed by the caller."""
    done = 0
    for idx in _length_sorted_batches(lengths, batch_size):
        yield idx
        done += len(idx)
        if on_progress is not None:
            on_progress(done, len(lengths))


def generate_batch(
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
    """Generate continuations of many prompts, batched with the KV cache.

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
    cache_arg = _cache_kwarg(model) or "cache"
    pick = _picker(temperature=temperature, top_p=top_p, exact_hf=True)

    results: list[Generated | None] = [None] * len(rows)
    with eval_mode(model):
        for b, idx in enumerate(progress_batches([len(r) for r in rows], batch_size, on_progress)):
            ids, mask, pos = _left_pad([rows[i] for i in idx], pad_id, device)
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(seed + b)
                new = decode_loop(model, ids, mask, pos, max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=pad_id,
                                  pick=pick, min_new_tokens=min_new_tokens, cache_arg=cache_arg).tolist()
            for j, i in enumerate(idx):
                results[i] = _finish(tokenizer, new[j], stop_set)
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------- k samples per prompt
# Nucleus sampling looks for the nucleus among this many top tokens first: ``topk`` over the
# vocabulary is far cheaper than the full sort a generic top-p warper does per step (Gemma's
# vocabulary has 262k entries, and k samples multiply the rows). Rows whose nucleus is wider fall
# back to the full sort, so the distribution is exactly nucleus sampling either way.
NUCLEUS_CANDIDATES = 256


def _nucleus(scores: Any, *, top_p: float, candidates: int) -> list[tuple[Any, Any, Any, Any]]:
    """The nucleus of each row of (already temperature-scaled) ``scores``, most likely token first.

    Returns groups ``(rows, token ids, probabilities, kept)``, to apply in order: every row over its
    top ``candidates`` tokens (found with ``topk``), then, if any, the rows whose nucleus is wider
    than that (a flat distribution), sorted over the whole vocabulary: they replace what the first
    group gave them. A token is kept when the mass of the tokens ranked above it is below ``top_p``
    (the top token always is).
    """
    import torch

    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    top, idx = scores.topk(min(int(candidates), scores.shape[-1]), dim=-1)
    p = (top - lse).exp()
    above = p.cumsum(-1) - p
    groups = [(slice(None), idx, p, above < top_p)]
    wide = (above[:, -1] + p[:, -1]) < top_p
    if not bool(wide.any()):
        return groups
    full, fidx = scores[wide].sort(dim=-1, descending=True)
    fp = (full - lse[wide]).exp()
    groups.append((wide, fidx, fp, (fp.cumsum(-1) - fp) < top_p))
    return groups


def nucleus_logits(scores: Any, *, temperature: float, top_p: float, candidates: int = NUCLEUS_CANDIDATES) -> Any:
    """Logits for temperature + nucleus (top-p) sampling: ``scores / temperature`` outside the nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (a token is kept when the mass of the tokens ranked above it is below ``top_p``; the top token
    is always kept). The reference distribution ``nucleus_sample`` draws from.

    Args:
        scores: next-token logits, shape (rows, vocab).
        temperature: > 0.
        top_p: in (0, 1]; 1 keeps every token.
        candidates: how many top tokens are searched before falling back to a full sort.
    """
    import torch

    scores = scores.float() / float(temperature)
    if top_p >= 1.0:
        return scores
    out = torch.full_like(scores, float("-inf"))
    for rows, ids, _, kept in _nucleus(scores, top_p=top_p, candidates=candidates):
        values = torch.where(kept, scores[rows].gather(1, ids), torch.full_like(ids, float("-inf"), dtype=scores.dtype))
        out[rows] = out[rows].scatter(1, ids, values)
    return out


def nucleus_sample(scores: Any, *, temperature: float, top_p: float, candidates: int = NUCLEUS_CANDIDATES) -> Any:
    """Draw one token per row from temperature + nucleus (top-p) sampling; token ids, shape (rows,).

    The same distribution as ``nucleus_logits`` followed by softmax + multinomial, drawn with the
    exponential race (``argmax(p_i / E_i)``, ``E_i ~ Exp(1)``, picks ``i`` with probability
    proportional to ``p_i``) over the nucleus candidates only. ``torch.multinomial`` over Gemma's
    262k-entry vocabulary, and the full sort of a generic top-p warper, cost far more per decode
    step than the model's forward at k samples x prompts rows on a CPU (``bench/rejection.py``).
    Uses the global torch generator (``sample_k`` seeds it per batch).

    Args:
        scores: next-token logits, shape (rows, vocab).
        temperature: > 0.
        top_p: in (0, 1]; 1 samples from the whole vocabulary.
        candidates: how many top tokens are searched before falling back to a full sort.
    """
    import torch

    scores = scores.float() / float(temperature)
    if top_p >= 1.0:
        p = torch.softmax(scores, dim=-1)
        return (p / torch.empty_like(p).exponential_()).argmax(-1)
    choice = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    for rows, ids, p, kept in _nucleus(scores, top_p=top_p, candidates=candidates):
        w = torch.where(kept, p, torch.zeros_like(p))
        choice[rows] = ids.gather(1, (w / torch.empty_like(w).exponential_()).argmax(-1, keepdim=True)).squeeze(1)
    return choice


def hf_sample(scores: Any, *, temperature: float, top_p: float) -> Any:
    """One token per row, drawn exactly as transformers' ``generate(do_sample=True, top_k=0)`` draws it.

    The same operations in the same order (temperature, the ascending-sort top-p warper, softmax,
    ``torch.multinomial``), so with the same seed the same tokens come out as from ``generate``:
    ``generate_batch`` samples this way so the pipeline's sampled generations (backtranslation)
    did not change when ``generate`` was replaced. ``nucleus_sample`` is the faster draw from the
    same distribution (no full sort), used by ``sample_k``.
    """
    import torch

    if temperature != 1.0:
        scores = scores / float(temperature)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - float(top_p))
        remove[..., -1:] = 0
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def _picker(*, temperature: float, top_p: float, exact_hf: bool = False) -> Any:
    """The per-step token choice: greedy at temperature 0; else ``hf_sample`` (``exact_hf``: the draws
    of the former ``generate`` path) or ``nucleus_sample`` (temperature + top-p, top-k off). Both use
    the global torch generator, which the callers seed per batch."""
    if temperature <= 0:
        return greedy_pick
    if exact_hf:
        return lambda scores: hf_sample(scores, temperature=float(temperature), top_p=float(top_p))
    return lambda scores: nucleus_sample(scores, temperature=float(temperature), top_p=float(top_p))


def _finish(tokenizer: Any, toks: list[int], stop_set: set[int]) -> Generated:
    """One row's new tokens as a ``Generated``: cut at the first stop id, decoded without special tokens."""
    cut = next((k for k, t in enumerate(toks) if t in stop_set), None)
    content = toks if cut is None else toks[:cut]
    return Generated(text=tokenizer.decode(content, skip_special_tokens=True), num_tokens=len(content),
                     finished=cut is not None)


def sample_k(
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
    """``num_samples`` continuations of each prompt, the k samples of a prompt sharing ONE prefill.

    Each batch of prompts is left-padded and prefilled once (all prompt tokens but the last, with
    the KV cache); the cache is then repeated ``num_samples`` times along the batch
    (``batch_repeat_interleave``) and ``decode.decode_loop`` decodes the ``batch * num_samples`` rows
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
    pick = _picker(temperature=temperature, top_p=top_p)

    results: list[list[Generated] | None] = [None] * len(rows)
    with eval_mode(model):
        for b, idx in enumerate(progress_batches([len(r) for r in rows], batch_size, on_progress)):
            ids, mask, pos = _left_pad([rows[i] for i in idx], pad_id, device)
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(seed + b)
                cache = None
                if ids.shape[1] > 1 and cache_arg is not None:
                    # The shared prefill: every prompt token but the last (the decode loop feeds the
                    # last one, so each of the k rows starts from one uncached token).
                    pre = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                                use_cache=True, logits_to_keep=1)
                    cache = model_cache(pre)
                    del pre
                    if cache is not None and hasattr(cache, "batch_repeat_interleave"):
                        cache.batch_repeat_interleave(num_samples)
                    else:
                        cache = None
                k_ids, k_mask, k_pos = (t.repeat_interleave(num_samples, dim=0) for t in (ids, mask, pos))
                new = decode_loop(model, k_ids, k_mask, k_pos, max_new_tokens=max_new_tokens, stop_ids=stops,
                                  pad_id=pad_id, pick=pick, min_new_tokens=min_new_tokens, cache=cache,
                                  cache_arg=cache_arg or "cache").tolist()
            for j, i in enumerate(idx):
                results[i] = [_finish(tokenizer, new[j * num_samples + s], stop_set) for s in range(num_samples)]
    return [r for r in results if r is not None]

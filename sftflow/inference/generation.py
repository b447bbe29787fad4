"""Batched KV-cache generation and the logit-based 1-5 rubric scorer.

Shared by backtranslation (candidate instructions from the backward model, self-curation
scores) and evaluation (held-out generations, the optional judge).

``generate_batch`` left-pads length-sorted batches of prompt ids and calls ``model.generate``
(KV cache, per-row attention mask and position ids), so a batch of prompts costs about as much
as its longest member instead of one full decode loop per prompt. Results come back in input order.

``sample_k`` draws k samples per prompt from ONE prefill of the prompt: the prompt's KV cache is
repeated k times along the batch and decoding starts from it (rejection sampling / best-of-n).

``score_pairs`` reads a rating from ONE forward pass: the rubric prompt ends where the model's
answer would be ``Score: <digit>``, and the rating is the model's probability over the tokens
``1``..``5`` at that position, renormalised. There is nothing to parse, so no rating is ever
lost to free-form output (an open Humpback reimplementation lost 45% of its ratings that way).
Each score keeps the probability mass the model put on the five rating tokens; ``unparseable_share``
counts the ratings a text parser would likely have lost (mass below ``RATING_MASS_FLOOR``).
The rubric text every prompt starts with is run once and its KV cache reused by every batch, so a
batch pays only for its own instructions and responses.

Example::

    from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids
    template = resolve_template(tok, None)
    ids = [build_generation_prompt(tok, [{"role": "user", "content": q}], template=template) for q in qs]
    outs = generate_batch(model, tok, ids, max_new_tokens=64, batch_size=8,
                          stop_ids=stop_token_ids(tok, template), seed=0)
    scores = score_pairs(model, tok, [(q, o.text) for q, o in zip(qs, outs)], template=template, batch_size=8)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# ``on_progress(done, total)``: generation reports progress through a plain callback, so this
# module stays free of console/orchestration imports (the stage adapts it to ``ops.console.Progress``).
ProgressCallback = Callable[[int, int], None]

# Humpback's self-curation rubric (Li et al. 2023, table 19), adapted: the model answers with the
# rating straight away (no reasoning first), because we read the rating from the next-token
# distribution at "Score: " instead of parsing generated text.
DEFAULT_RUBRIC = """Below is an instruction from a user and a candidate answer. Evaluate whether or not the answer is a good example of how an AI Assistant should respond to the user's instruction. Please assign a score using the following 5-point scale:
1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the user asked for. For example, some content seems missing, the opening sentence repeats the user's question, the response is from another person's perspective with their personal experience, looks like an answer from a forum, or contains promotional text, navigation text, or other irrelevant information.
2: It means the answer addresses most of the asks from the user. It does not directly address the user's question. For example, it only provides a high-level methodology instead of the exact solution to the user's question.
3: It means the answer is helpful but not written by an AI Assistant. It addresses all the basic asks from the user. It is complete and self-contained, with the drawback that the response is not written from an AI assistant's perspective but from other people's perspective: the content looks like an excerpt from a blog post, web page, or web search results.
4: It means the answer is written from an AI assistant's perspective with a clear focus on addressing the instruction. It provides a complete, clear, and comprehensive response to the user's question or instruction without missing or irrelevant information. It is well organized, self-contained, and written in a helpful tone. It has minor room for improvement, e.g. more concise and focused.
5: It means it is a perfect answer from an AI Assistant. It has a clear focus on being a helpful AI Assistant, where the response looks intentionally written to address the user's question or instruction without any irrelevant sentences. The answer provides high-quality content, demonstrating expert knowledge in the area, is very well written, logical, easy-to-follow, engaging and insightful.

Answer with the score only, as "Score: <rating>".

<instruction>
{instruction}
</instruction>

<answer>
{response}
</answer>"""

SCORE_PREFIX = "Score:"
SCORE_LABELS: tuple[str, ...] = ("1", "2", "3", "4", "5")
# Below this probability on the five rating tokens, a rating counts as unparseable: the model
# more likely than not would have written something other than a digit after "Score:", so a
# text-parsing scorer would have lost it. The logit scorer still reads a rating from it; the
# share of such ratings says how far the scores can be trusted.
RATING_MASS_FLOOR = 0.5


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


@dataclass(frozen=True)
class Score:
    """A 1-5 rating read from the next-token distribution.

    Attributes:
        probs: probabilities of the ratings 1..5 (renormalised over those five tokens; sum 1).
        expected: sum of rating * probability, in [1, 5].
        argmax: the most likely rating, 1..5.
        mass: the probability the model put on the five rating tokens before renormalising
            (a low value means the model did not expect a rating there; see ``unparseable_share``).
    """

    probs: tuple[float, float, float, float, float]
    expected: float
    argmax: int
    mass: float = 1.0


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


def _base_gen_kwargs(*, max_new_tokens: int, sample: bool, stops: list[int], pad_id: int) -> dict[str, Any]:
    """``generate`` arguments every caller sets. Explicit values override anything in the model's
    generation_config (e.g. Gemma ships do_sample with top_k=64/top_p=0.95; a global default
    top_k=50 would apply otherwise)."""
    return {"max_new_tokens": max_new_tokens, "do_sample": sample, "repetition_penalty": 1.0,
            "eos_token_id": stops or None, "pad_token_id": pad_id, "use_cache": True}


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


def _length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: a memory error shows early)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------- generation
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
            stage passes one that feeds ``sftflow.ops.console.Progress``).

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


# --------------------------------------------------------------------------- scoring
def score_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Find how this tokenizer writes ``Score: <digit>``.

    Returns ``(prefix_ids, digit_ids)``: the answer prefix to append after the assistant opener,
    and the five single tokens that can follow it for the ratings 1..5. BPE vocabularies
    (SmolLM2, GPT-2) have a " 3" token after "Score:"; SentencePiece ones (Gemma) split the space
    off, so the prefix is "Score: " and the digit is "3". Either way each rating is exactly one token.

    Raises:
        ValueError: when no prefix makes every rating a single token.
    """

    def enc(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    for prefix in (SCORE_PREFIX, SCORE_PREFIX + " "):
        pre = enc(prefix)
        digits = []
        for label in SCORE_LABELS:
            full = enc(SCORE_PREFIX + " " + label)
            if full[: len(pre)] == pre and len(full) == len(pre) + 1:
                digits.append(full[-1])
        if len(digits) == len(SCORE_LABELS) and len(set(digits)) == len(SCORE_LABELS):
            return pre, digits
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} does not encode '{SCORE_PREFIX} 1'..'{SCORE_PREFIX} 5' "
        "as a shared prefix plus one rating token; the logit scorer cannot read ratings with it"
    )


def rubric_prompt_ids(
    tokenizer: Any,
    instruction: str,
    response: str,
    *,
    template: str,
    rubric: str | None = None,
    max_response_tokens: int | None = 768,
) -> list[int]:
    """Token ids of the rubric prompt for one pair, ending right before the rating token.

    The rubric goes in the user turn (formatted with the shared ``build_generation_prompt``), and
    the assistant turn is opened with ``Score:`` so the next token is the rating.
    """
    from sftflow.inference.formatting import build_generation_prompt

    if max_response_tokens is not None:
        # Truncate an over-long response by tokens so the prompt (and its tail) fits the context.
        resp_ids = tokenizer.encode(response, add_special_tokens=False)
        if len(resp_ids) > max_response_tokens:
            response = tokenizer.decode(resp_ids[:max_response_tokens], skip_special_tokens=True) + " ..."
    text = (rubric or DEFAULT_RUBRIC).format(instruction=instruction.strip(), response=response.strip())
    ids = list(build_generation_prompt(tokenizer, [{"role": "user", "content": text}], template=template))
    prefix, _ = score_token_ids(tokenizer)
    return ids + prefix


def _forward_accepts(model: Any, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    # **kwargs counts as accepting it (peft wrappers forward **kwargs to the base model).
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def score_from_logits(logits: Any, digit_ids: Sequence[int]) -> list[Score]:
    """Ratings from next-token logits of shape (batch, vocab).

    Softmax over the whole vocabulary (for ``mass``), then renormalised over the five rating tokens.
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    sel = logp[:, list(digit_ids)]  # (batch, 5) log-probs of the rating tokens
    mass = sel.exp().sum(-1)
    probs = torch.softmax(sel, dim=-1)
    ratings = torch.arange(1, len(digit_ids) + 1, dtype=probs.dtype, device=probs.device)
    expected = (probs * ratings).sum(-1)
    argmax = probs.argmax(-1) + 1
    out = []
    for i in range(probs.shape[0]):
        p = tuple(float(x) for x in probs[i].tolist())
        out.append(Score(probs=p, expected=float(expected[i]), argmax=int(argmax[i]), mass=float(mass[i])))  # type: ignore[arg-type]
    return out


def score_pairs(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    *,
    template: str,
    batch_size: int,
    rubric: str | None = None,
    max_response_tokens: int | None = 768,
    share_prefix: bool = True,
) -> list[Score]:
    """Rate (instruction, response) pairs 1-5 with one forward pass per batch.

    Args:
        model: a transformers causal LM (the curation model M0, a judge...).
        tokenizer: its tokenizer.
        pairs: (instruction, response) tuples.
        template: prompt template name, as from ``formatting.resolve_template``.
        batch_size: pairs per forward pass (length-sorted, left-padded).
        rubric: a rubric with ``{instruction}`` and ``{response}`` placeholders (default: the
            adapted Humpback self-curation rubric, ``DEFAULT_RUBRIC``).
        max_response_tokens: responses longer than this are cut (so the prompt fits the context).
        share_prefix: compute the KV cache of the rubric text (the prefix every prompt shares)
            once and run only each pair's own tokens per batch; falls back to full left-padded
            prompts for models without a cache argument. Same scores up to float rounding.

    Returns:
        One ``Score`` per pair, in input order. Every pair gets a score, and its ``mass`` says
        whether the model expected a rating there (``unparseable_share`` counts those it did not).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0 (got {batch_size})")
    if rubric is not None and ("{instruction}" not in rubric or "{response}" not in rubric):
        raise ValueError("rubric must contain the placeholders {instruction} and {response}")
    if not pairs:
        return []
    _, digit_ids = score_token_ids(tokenizer)
    rows = [
        rubric_prompt_ids(tokenizer, str(q), str(a), template=template, rubric=rubric,
                          max_response_tokens=max_response_tokens)
        for q, a in pairs
    ]
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        results = None
        if share_prefix:
            results = _score_with_shared_prefix(model, tokenizer, rows, digit_ids, batch_size=batch_size)
        if results is None:
            results = _score_left_padded(model, tokenizer, rows, digit_ids, batch_size=batch_size)
    finally:
        if was_training:
            model.train()
    return results


def unparseable_share(masses: Sequence[float], *, floor: float = RATING_MASS_FLOOR) -> float:
    """Share of ratings whose probability mass on the rating tokens is below ``floor``.

    Args:
        masses: ``Score.mass`` of each rated pair (NaN counts as unparseable: no rating was read).
        floor: the mass below which a rating counts as unparseable (default ``RATING_MASS_FLOOR``).

    Returns:
        A share in [0, 1]; 0.0 when there are no ratings (none was lost).
    """
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1] (got {floor})")
    values = [float(m) for m in masses]
    if not values:
        return 0.0
    # `not m >= floor` also counts NaN.
    return sum(1 for m in values if not m >= floor) / len(values)


def _score_left_padded(model: Any, tokenizer: Any, rows: list[list[int]], digit_ids: Sequence[int], *,
                       batch_size: int) -> list[Score]:
    """One forward pass per left-padded batch; the rating is read at the last column."""
    import torch

    pad_id = _pad_id(tokenizer, [])
    device = _device(model)
    keep_last = _forward_accepts(model, "logits_to_keep")
    pass_pos = _forward_accepts(model, "position_ids")
    results: list[Score | None] = [None] * len(rows)
    for idx in _length_sorted_batches([len(r) for r in rows], batch_size):
        ids, mask, pos = _left_pad([rows[i] for i in idx], pad_id, device)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if pass_pos:
            kwargs["position_ids"] = pos
        if keep_last:
            # Only the last position's logits are needed; with Gemma's 262k vocabulary the full
            # (batch, seq, vocab) tensor would be gigabytes.
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode():
            logits = model(**kwargs).logits[:, -1, :]
        for j, s in zip(idx, score_from_logits(logits, digit_ids)):
            results[j] = s
    return [r for r in results if r is not None]


def _common_prefix_len(rows: list[list[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows) - 1  # every row keeps at least one token of its own
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


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


MIN_SHARED_PREFIX = 16


def _score_with_shared_prefix(model: Any, tokenizer: Any, rows: list[list[int]], digit_ids: Sequence[int], *,
                              batch_size: int) -> list[Score] | None:
    """Score with the rubric's KV cache computed once and reused by every batch.

    Every rubric prompt starts with the same few hundred tokens (the rubric text); only the
    instruction and response differ. The shared prefix runs once; each batch then runs only its
    suffixes (right-padded, so the prefix positions stay aligned) on a copy of the prefix cache,
    and the rating is read at each row's last real token. Returns None when the model takes no
    cache argument or the shared prefix is too short to matter (the caller falls back).
    """
    import copy

    import torch

    cache_arg = _cache_kwarg(model)
    plen = _common_prefix_len(rows)
    if cache_arg is None or plen < MIN_SHARED_PREFIX:
        return None
    device = _device(model)
    pad_id = _pad_id(tokenizer, [])
    with torch.inference_mode():
        prefix = torch.tensor([rows[0][:plen]], dtype=torch.long, device=device)
        out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, logits_to_keep=1)
    prefix_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if prefix_cache is None or not hasattr(prefix_cache, "batch_repeat_interleave"):
        return None
    results: list[Score | None] = [None] * len(rows)
    for idx in _length_sorted_batches([len(r) for r in rows], batch_size):
        suffixes = [rows[i][plen:] for i in idx]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), plen + width), dtype=torch.long)
        mask[:, :plen] = 1
        for j, suf in enumerate(suffixes):
            ids[j, : len(suf)] = torch.tensor(suf, dtype=torch.long)
            mask[j, plen: plen + len(suf)] = 1
        last = torch.tensor([len(s) - 1 for s in suffixes])
        keep = torch.unique(last)  # sorted positions whose logits are needed
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(idx))
        pos = (plen + torch.arange(width)).unsqueeze(0).expand(len(idx), -1)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           use_cache=True, logits_to_keep=keep.to(device), **{cache_arg: cache}).logits
        col = torch.searchsorted(keep, last)
        rows_logits = logits[torch.arange(len(idx)), col.to(logits.device)]
        for j, s in zip(idx, score_from_logits(rows_logits, digit_ids)):
            results[j] = s
    return [r for r in results if r is not None]

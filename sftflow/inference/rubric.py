"""The logit-based 1-5 rubric scorer: a rating read from ONE forward pass, nothing parsed.

``score_pairs`` builds the rubric prompt (``rubric_prompt_ids``) so that it ends where the model's
answer would be ``Score: <digit>``; the rating is the model's probability over the tokens
``1``..``5`` at that position, renormalised (``score_from_logits``). There is nothing to parse, so
no rating is ever lost to free-form output (an open Humpback reimplementation lost 45% of its
ratings that way). Each score keeps the probability mass the model put on the five rating tokens;
``unparseable_share`` counts the ratings a text parser would likely have lost (mass below
``RATING_MASS_FLOOR``). The rubric text every prompt starts with is run once and its KV cache
reused by every batch, so a batch pays only for its own instructions and responses.

Used by self-curation and the evaluation judge through ``sftflow.inference.batch.score_texts``
(the one inference path; ``tests/unit/test_inference_path.py``). Generation is in
``sftflow.inference.generation``, whose batching helpers this module shares.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

from sftflow.inference.generation import _cache_kwarg, _device, _left_pad, _length_sorted_batches, _pad_id, eval_mode


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
    with eval_mode(model):
        results = None
        if share_prefix:
            results = _score_with_shared_prefix(model, tokenizer, rows, digit_ids, batch_size=batch_size)
        if results is None:
            results = _score_left_padded(model, tokenizer, rows, digit_ids, batch_size=batch_size)
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

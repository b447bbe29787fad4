"""Per-token log-probabilities of an answer given a prompt: the likelihood signals of curation.

``answer_row`` lays out one (instruction, answer) pair as the model sees it in the ONE prompt format
(``formatting.build_generation_prompt``: the user turn, then the assistant-turn opener) followed
by the answer's tokens; ``token_logprobs`` runs right-padded, length-sorted batches through the
decoder and applies the LM head only at the answer's positions, a chunk of rows at a time (Gemma's
262k-token head would otherwise need batch x length x vocab floats), returning
``log p(y_t | prompt, y_<t)`` for every answer token.

The answer is tokenised on its own (``split_special_tokens=True``: data never becomes control
tokens, as in training), so the same answer has the same tokens under any prompt: a per-token
difference of two prompts' log-probabilities (pointwise mutual information with an empty user
turn as the reference) is well defined. The answer's end-of-turn marker is not scored: a base
model's untrained ``<end_of_turn>`` row would dominate it.

Stages call these through ``sftflow.inference.batch.loglik_texts`` (in process or Ray Data
actors), never directly.
"""

from __future__ import annotations

from typing import Any, Sequence

from sftflow.inference.generation import ProgressCallback, eval_mode, progress_batches

# Rows of LM-head logits computed at once: bounds the logits buffer (rows x vocab floats) to ~256 MB
# for Gemma's 262k vocabulary (as the training loss does).
_HEAD_CHUNK_ELEMS = 64 * 1024 * 1024


def answer_row(tokenizer: Any, instruction: str, answer: str, *, template: str,
               max_answer_tokens: int | None = 768) -> tuple[list[int], int]:
    """Token ids of ``instruction`` as a user turn + the assistant opener + ``answer``, and where the answer starts.

    Args:
        tokenizer: the model's tokenizer.
        instruction: the user turn's text ("" gives an empty user turn: the reference prompt of PMI).
        answer: the assistant's text (tokenised alone, control-token text split as data).
        template: a resolved template name (``formatting.resolve_template``).
        max_answer_tokens: the answer is cut to its first this-many tokens (None: whole).

    Returns:
        ``(ids, start)``: ``ids[start:]`` are the answer's tokens (possibly none).
    """
    from sftflow.inference.formatting import build_generation_prompt

    prompt = list(build_generation_prompt(tokenizer, [{"role": "user", "content": str(instruction)}],
                                          template=template))
    ans = list(tokenizer(str(answer), add_special_tokens=False, split_special_tokens=True)["input_ids"])
    if max_answer_tokens is not None:
        ans = ans[:max_answer_tokens]
    return prompt + ans, len(prompt)


def _parts(model: Any) -> tuple[Any, Any, float | None]:
    """(decoder, LM head, final logit soft-cap) of a causal LM (peft-wrapped or not); decoder None if absent."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    head = inner.get_output_embeddings()
    return decoder, head, getattr(getattr(inner, "config", None), "final_logit_softcapping", None)


def token_logprobs(model: Any, rows: Sequence[tuple[Sequence[int], int]], *, batch_size: int, pad_id: int,
                   on_progress: ProgressCallback | None = None) -> list[list[float]]:
    """``log p(ids[t] | ids[:t])`` for every ``t >= start`` of each ``(ids, start)`` row, in input order.

    Rows run in right-padded batches of similar length (``generation._length_sorted_batches``:
    the batches batch inference sends to Ray actors), so real tokens never attend to padding and
    positions start at 0 in every row; a row's values equal its one-by-one values up to float
    rounding.

    Args:
        model: a causal LM on its device (eval mode is set for the call).
        rows: ``(token ids, index of the first scored token)``; ``start`` must be >= 1.
        batch_size: rows per decoder pass.
        pad_id: the id padded positions get (masked out).
        on_progress: ``on_progress(rows done, rows total)`` after each batch.

    Returns:
        One list of floats per row (empty when the row has no scored token).

    Raises:
        ValueError: a non-positive ``batch_size`` or a row whose ``start`` is outside ``[1, len(ids)]``.
    """
    import torch

    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0 (got {batch_size})")
    rows = [(list(map(int, ids)), int(start)) for ids, start in rows]
    for i, (ids, start) in enumerate(rows):
        if not 1 <= start <= len(ids):
            raise ValueError(f"row {i}: start {start} must be in [1, {len(ids)}] (a prompt of at least one token)")
    out: list[list[float]] = [[] for _ in rows]
    if not rows:
        return out
    decoder, head, softcap = _parts(model)
    vocab = int(head.weight.shape[0])
    chunk = max(16, _HEAD_CHUNK_ELEMS // max(1, vocab))
    device = next(model.parameters()).device
    with eval_mode(model), torch.inference_mode():
        for idx in progress_batches([len(r[0]) for r in rows], batch_size, on_progress):
            width = max(len(rows[i][0]) for i in idx)
            ids = torch.full((len(idx), width), int(pad_id), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                n = len(rows[i][0])
                ids[j, :n] = torch.tensor(rows[i][0], dtype=torch.long)
                mask[j, :n] = 1
            ids, mask = ids.to(device), mask.to(device)
            if decoder is not None:
                hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                logits_all = None
            else:  # no separable decoder: the model's own logits (whole vocabulary per position)
                hidden, logits_all = None, model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for j, i in enumerate(idx):
                seq, start = rows[i]
                n = len(seq)
                if start >= n:
                    continue
                # The prediction of token t comes from position t - 1.
                target = ids[j, start:n]
                values = []
                for s in range(start - 1, n - 1, chunk):
                    e = min(s + chunk, n - 1)
                    logits = (head(hidden[j, s:e]) if logits_all is None else logits_all[j, s:e]).float()
                    if softcap:
                        logits = torch.tanh(logits / softcap) * softcap
                    lp = torch.log_softmax(logits, dim=-1)
                    values.append(lp.gather(1, target[s - start + 1:e - start + 1, None]).squeeze(1))
                out[i] = [float(v) for v in torch.cat(values).tolist()]
    return out

"""Which embedding rows train besides a LoRA adapter: the template's control tokens whose rows are untrained.

A *base* model may ship control tokens it never saw in pre-training: Gemma 3 270M base's
``<end_of_turn>`` row (tied input/output embedding) is nearly identical to ~4,700 other never-used
rows (``<unused*>``, ``<pad>``...). LoRA on linear layers cannot move an embedding row, so the
tuned model never learns to end its turn. ``resolve_trainable_tokens`` picks the rows peft's
``trainable_token_indices`` should train (``training.trainable_tokens``).

The "untrained" rule (``untrained_token_ids``): pre-training pushes the row of every token it sees
to a direction of its own, while rows never updated stay at their (shared) initialisation, so they
form a tight cluster. A row is untrained when its cosine similarity exceeds ``cos`` (0.99) with
more than ``max(min_twins, twin_fraction x vocab)`` (8, 0.1%) *other* rows. For an untied model
the output (LM-head) row is checked too, and either row being untrained selects the token.

``init_untrained_rows`` then starts those rows at the mean of the trained rows (issue 24: a
stable start for the token rows' larger learning rate; see ``training.model.make_optimizer``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from sftflow.inference.formatting import encode_for_training, stop_token_ids

# Rows of the vocabulary compared at once: bounds the similarity buffer (candidates x chunk).
_CHUNK_ROWS = 32768
_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def template_control_token_ids(tokenizer: Any, template: str) -> list[int]:
    """The control tokens the template emits: its end-of-turn/stop ids, then its turn openers.

    Stop ids come from ``formatting.stop_token_ids`` (what the model must predict to stop); the
    other control tokens are the special tokens found in the template's encoding of a probe
    conversation (turn openers such as ``<start_of_turn>``), less the sequence's leading ``<bos>``
    and ``<pad>``, which play no part in a turn.

    Returns:
        Deduplicated ids, stop ids first.
    """
    special = {int(i) for i in tokenizer.all_special_ids}
    special |= {int(i) for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    special.discard(tokenizer.pad_token_id)
    ids = list(stop_token_ids(tokenizer, template))
    probe, _ = encode_for_training(tokenizer, _PROBE, template=template)
    if probe and probe[0] == tokenizer.bos_token_id:
        probe = probe[1:]  # a leading <bos> opens the sequence, not a turn (ChatML's bos may be <|im_start|>)
    ids += [int(i) for i in probe if int(i) in special]
    return list(dict.fromkeys(ids))


def _twin_counts(weight: torch.Tensor, ids: Sequence[int], *, cos: float) -> list[int]:
    """For each id, how many OTHER rows of ``weight`` have cosine > ``cos`` with its row (chunked)."""
    w = weight.detach()
    cand = torch.nn.functional.normalize(w[list(ids)].float(), dim=1)
    counts = torch.zeros(len(ids), dtype=torch.long)
    for s in range(0, w.shape[0], _CHUNK_ROWS):
        block = torch.nn.functional.normalize(w[s : s + _CHUNK_ROWS].float(), dim=1)
        counts += (cand @ block.T > cos).sum(dim=1).cpu()
    return [int(c) - 1 for c in counts]  # each row matches itself once


def untrained_token_ids(model: Any, ids: Sequence[int], *, cos: float = 0.99, min_twins: int = 8,
                        twin_fraction: float = 0.001) -> list[int]:
    """The ids among ``ids`` whose embedding row (or output row, if untied) looks untrained.

    A row is untrained when more than ``max(min_twins, twin_fraction * vocab)`` other rows have a
    cosine similarity above ``cos`` with it (see the module docstring for why). Vectorised and
    chunked over the vocabulary: a 262k x 640 matrix takes well under a second on CPU.

    Args:
        model: a transformers causal LM (or a peft wrapper of one).
        ids: candidate token ids (e.g. ``template_control_token_ids``).
        cos: cosine above which two rows count as the same.
        min_twins / twin_fraction: the number of look-alike rows that marks a row untrained.

    Returns:
        The untrained ids, in the order given.
    """
    ids = [int(i) for i in dict.fromkeys(ids)]
    if not ids:
        return []
    emb = model.get_input_embeddings().weight
    vocab = emb.shape[0]
    ids = [i for i in ids if 0 <= i < vocab]
    limit = max(min_twins, int(twin_fraction * vocab))
    flagged = {i for i, c in zip(ids, _twin_counts(emb, ids, cos=cos)) if c > limit}
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.data_ptr():
        flagged |= {i for i, c in zip(ids, _twin_counts(head.weight, ids, cos=cos)) if c > limit}
    return [i for i in ids if i in flagged]


def resolve_trainable_tokens(model: Any, tokenizer: Any, template: str, setting: str | Sequence[str | int]) -> list[int]:
    """The token rows to train besides the adapter (``training.trainable_tokens``).

    Args:
        model: the base model (before peft wrapping).
        tokenizer: its tokenizer.
        template: the resolved prompt template.
        setting: ``"none"`` (no rows), ``"auto"`` (the template's control tokens whose rows are
            untrained) or a list of token strings / ids.

    Returns:
        Sorted, deduplicated ids.

    Raises:
        ValueError: a listed token is not a single token of the vocabulary, or an id is out of range.
    """
    if setting == "none":
        return []
    if setting == "auto":
        return sorted(untrained_token_ids(model, template_control_token_ids(tokenizer, template)))
    vocab = model.get_input_embeddings().weight.shape[0]
    out: list[int] = []
    for tok in setting:
        if isinstance(tok, int):
            if not 0 <= tok < vocab:
                raise ValueError(f"training.trainable_tokens: id {tok} is outside the vocabulary (0..{vocab - 1})")
            out.append(tok)
            continue
        tid = tokenizer.convert_tokens_to_ids(tok)
        # Unknown tokens map to unk (or None); the round trip tells a real single token apart.
        if tid is None or tokenizer.convert_ids_to_tokens(tid) != tok:
            raise ValueError(f"training.trainable_tokens: {tok!r} is not a single token of this tokenizer's "
                             "vocabulary (give its exact token string or its integer id)")
        out.append(int(tid))
    return sorted(set(out))


def init_untrained_rows(model: Any, *, cos: float = 0.99, min_twins: int = 8, twin_fraction: float = 0.001) -> list[int]:
    """Start each untrained trainable token row at the mean of the matrix's trained rows.

    Why: an untrained row sits in the shared never-updated cluster (``untrained_token_ids``), far
    from where trained tokens live, so the token-row optimizer must move it a long way, fast, and
    its first large Adam steps (about lr per coordinate, all in one direction) raise its logit at
    every position at once: the loss spikes. The mean of the trained rows is a neutral start (the
    average token's logit), from which a smaller, warmed-up step suffices. Rows that are trained
    already (a token listed explicitly in ``training.trainable_tokens``) keep their values.

    Args:
        model: a peft model whose trainable-tokens layers are set up (``apply_method``).
        cos / min_twins / twin_fraction: the untrained rule, as in ``untrained_token_ids``.

    Returns:
        The token ids whose rows were re-initialised (deduplicated, sorted).
    """
    from sftflow.inference.token_rows import token_rows_of

    done: set[int] = set()
    seen: set[int] = set()
    for mod in model.modules():
        if not (hasattr(mod, "trainable_tokens_delta") and hasattr(mod, "base_layer")):
            continue
        found = token_rows_of(mod)
        if found is None or id(found[1]) in seen:
            continue
        ids, rows = found
        weight = mod.base_layer.weight.detach()
        limit = max(min_twins, int(twin_fraction * weight.shape[0]))
        counts = _twin_counts(weight, ids, cos=cos)
        cand = [k for k, c in enumerate(counts) if c > limit]
        if not cand:
            continue
        # Trained rows: every row outside the cluster of any untrained candidate (chunked, like _twin_counts).
        cvec = torch.nn.functional.normalize(weight[[ids[k] for k in cand]].float(), dim=1)
        total = torch.zeros(weight.shape[1], dtype=torch.float64)
        n = 0
        for s in range(0, weight.shape[0], _CHUNK_ROWS):
            block = weight[s : s + _CHUNK_ROWS].float()
            keep = ~((torch.nn.functional.normalize(block, dim=1) @ cvec.T) > cos).any(dim=1)
            total += block[keep].double().sum(dim=0).cpu()
            n += int(keep.sum())
        if n == 0:
            continue
        mean = (total / n).to(rows.dtype).to(rows.device)
        with torch.no_grad():
            for k in cand:
                rows[k].copy_(mean)
        seen.add(id(rows))
        done |= {int(ids[k]) for k in cand}
    return sorted(done)

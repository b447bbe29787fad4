"""Training data: tokenize canonical records once, then batch them.

The loss is on assistant tokens only (``sftflow.inference.formatting.encode_for_training``);
over-long rows are truncated or dropped per ``training.overlong`` and every row is accounted for.
Batches are a pure function of ``(seed, epoch)`` so that a resumed run sees the same data order.

Prompt-format diversification (``training.format_diversification``) happens here, at encoding:
a share of the training rows has its user turns rewritten by a wrapper of
``sftflow.data.wrappers`` (chosen from ``training.seed`` and the row id) before the chat template
renders it; the assistant turns are untouched, so the labels stay on the answer only. Held-out
rows are never wrapped (their loss must stay comparable with evaluation's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from sftflow.config_sections import FormatDiversificationConfig, TrainingConfig
from sftflow.data.records import frame_to_records
from sftflow.data.refs import DatasetRef
from sftflow.data.wrappers import choose_wrapper, wrap_messages
from sftflow.inference.formatting import IGNORE_INDEX, encode_for_training


@dataclass
class Encoded:
    """Tokenized rows plus the accounting of the others: rows in = kept + dropped_overlong + dropped_no_labels.

    ``wrapped`` counts the rows (of those read) rendered with each prompt wrapper (format diversification).
    """

    rows: list[tuple[list[int], list[int]]]
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_labels: int = 0
    errors: list[str] = field(default_factory=list)
    wrapped: dict[str, int] = field(default_factory=dict)


def encode_records(records: Iterable[Mapping[str, Any]], tokenizer: Any, *, template: str, max_seq_len: int,
                   overlong: str = "truncate", where: str = "",
                   diversify: FormatDiversificationConfig | None = None, seed: int = 0) -> Encoded:
    """Tokenize canonical records (``messages``, optional ``id``) and apply the over-long policy.

    Training and held-out evaluation both encode through here, so a row is truncated (or dropped)
    the same way wherever its loss is computed.

    Args:
        records: rows with ``messages`` (the canonical shape); ``id`` names a row in errors;
            ``tools`` (optional) holds a tool conversation's schemas.
        tokenizer: the model's tokenizer.
        template: resolved prompt template (``gemma``/``chatml``/``native``).
        max_seq_len: longest row in tokens.
        overlong: ``truncate`` (keep the first ``max_seq_len`` tokens) or ``drop``.
        where: prefix of error messages (e.g. the file the rows come from).
        diversify: wrap a share of the rows' user turns in varied prompt formats (training only);
            None or ``share: 0`` encodes every row as it is.
        seed: with ``diversify``, the seed of the per-row wrapper choice (with the row's ``id``).

    Returns:
        ``Encoded`` (possibly with no rows).

    Raises:
        ValueError: a row's messages are malformed (the message names the row id).
    """
    out = Encoded(rows=[])
    share = diversify.share if diversify is not None else 0.0
    for n, row in enumerate(records):
        messages = row["messages"]
        if share > 0:
            name = choose_wrapper(str(row.get("id", n)), seed=seed, share=share, names=diversify.wrappers)
            if name is not None:
                messages = wrap_messages(messages, name)
                out.wrapped[name] = out.wrapped.get(name, 0) + 1
        try:
            # A tool conversation's schemas render with it (template or text fallback), so the
            # model learns its calls with the tools it was offered in view.
            ids, labels = encode_for_training(tokenizer, messages, template=template, max_len=None,
                                              tools=row.get("tools") or None)
        except ValueError as e:
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}row id={row.get('id', n)!r}: {e}") from None
        truncated = len(ids) > max_seq_len
        if truncated:
            if overlong == "drop":
                out.dropped_overlong += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(lab == IGNORE_INDEX for lab in labels[1:]):  # truncation ate every answer token
            out.dropped_no_labels += 1
            continue
        out.truncated += truncated
        out.rows.append((list(ids), list(labels)))
    return out


def encode_dataset(ref: DatasetRef, tokenizer: Any, *, template: str, cfg: TrainingConfig,
                   diversify: bool = False) -> Encoded:
    """Tokenize a canonical dataset file for training (``encode_records`` with ``cfg``'s limits).

    Args:
        diversify: apply ``cfg.format_diversification`` (the recipe passes True for the training
            rows only; a held-out set's loss must match evaluation's, which never wraps).

    Raises:
        ValueError: a row's messages are malformed (the message names the file and row id), or
            nothing is left to train on.
    """
    out = encode_records(frame_to_records(ref.read()), tokenizer, template=template, max_seq_len=cfg.max_seq_len,
                         overlong=cfg.overlong, where=ref.path,
                         diversify=cfg.format_diversification if diversify else None, seed=cfg.seed)
    if not out.rows:
        raise ValueError(f"{ref.path}: no trainable rows left (overlong dropped {out.dropped_overlong}, "
                         f"no answer tokens {out.dropped_no_labels}); raise training.max_seq_len")
    return out


def _length_grouped(lengths: list[int], order: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Batches of similar length (little padding) in random order.

    Rows are taken in the shuffled ``order``, sorted by length inside mega-batches of 64 batches
    (so batches stay random across the epoch) and the batches shuffled.
    """
    mega = batch_size * 64
    batches = []
    for s in range(0, len(order), mega):
        chunk = sorted(order[s : s + mega].tolist(), key=lambda i: -lengths[i])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def _packed(lengths: list[int], order: np.ndarray, batch_size: int, max_len: int, rng: np.random.Generator) -> list[list[list[int]]]:
    """Pack rows into bins of ``max_len`` tokens (first-fit decreasing); ``batch_size`` bins per batch."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(order.tolist(), key=lambda i: -lengths[i]):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_len - lengths[i])
    perm = rng.permutation(len(bins)).tolist()
    bins = [bins[i] for i in perm]
    return [bins[k : k + batch_size] for k in range(0, len(bins), batch_size)]


def epoch_batches(lengths: list[int], *, cfg: TrainingConfig, epoch: int, world: int) -> list[Any]:
    """The deterministic micro-batch list of one epoch (a function of seed and epoch only, so resumable).

    Rows (bins when packing) are grouped into global batches of ``batch_size x grad_accum x world``,
    each cut into ``grad_accum x world`` consecutive micro-batches (the loop gives micro-batch
    ``k`` of a step to rank ``k % world``). So an optimizer step sees the same rows however the
    global batch is split: 1 process x batch 4 trains on what 2 processes x batch 2 train on. With
    one process and ``grad_accum`` 1 this is the plain batch list. The epoch's last, partial global
    batch is cut as evenly as possible (larger parts first, possibly some empty ones, which the
    loop skips); it is dropped when it cannot give every rank a row.

    Raises:
        ValueError: fewer rows (bins) than processes.
    """
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(lengths))
    parts = cfg.grad_accum * world
    size = cfg.batch_size * parts
    if cfg.packing:
        global_batches: list[Any] = _packed(lengths, order, size, cfg.max_seq_len, rng)
    else:
        global_batches = _length_grouped(lengths, order, size, rng)
    batches: list[Any] = []
    for g in global_batches:
        if len(g) < world:
            continue
        q, r = divmod(len(g), parts)
        bounds = np.cumsum([0] + [q + (k < r) for k in range(parts)]).tolist()
        batches += [g[bounds[k] : bounds[k + 1]] for k in range(parts)]
    if not batches:
        raise ValueError(f"{len(lengths)} training rows cannot give each of {world} processes a batch; "
                         "lower training.num_processes or add rows")
    return batches


def collate(rows: list[tuple[list[int], list[int]]], batch: Any, *, packed: bool, pad_id: int,
            max_len: int) -> dict[str, torch.Tensor]:
    """Tensors of one micro-batch.

    Padded: right padding to the longest row, a 2-D attention mask, labels -100 on pads.
    Packed: each row holds several examples; ``position_ids`` restart at 0 for each example and no
    attention mask is passed, so transformers builds a block-diagonal causal mask from them: no
    token attends across examples. Pad tail positions form their own (ignored) block.
    """
    if not packed:
        width = max(len(rows[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            n = len(rows[i][0])
            ids[r, :n] = torch.tensor(rows[i][0])
            labels[r, :n] = torch.tensor(rows[i][1])
            mask[r, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "n_tokens": mask.sum()}
    width = max(sum(len(rows[i][0]) for i in bin_) for bin_ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(batch), width), dtype=torch.long)
    n_tokens = 0
    for r, bin_ in enumerate(batch):
        at = 0
        for i in bin_:
            seq, lab = rows[i]
            n = len(seq)
            ids[r, at : at + n] = torch.tensor(seq)
            labels[r, at : at + n] = torch.tensor(lab)
            labels[r, at] = IGNORE_INDEX  # never learn an example's first token from the previous one
            pos[r, at : at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(width - at)  # the pad tail is one more isolated block
        n_tokens += at
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "n_tokens": torch.tensor(n_tokens)}

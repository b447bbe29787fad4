"""The loss of a causal LM on assistant tokens, and THE held-out loss.

``CausalLMLoss`` runs the decoder on every token but the LM head only where a label is learned,
through a fused, chunked cross-entropy (Gemma's 262k-token head would otherwise dominate FLOPs and
memory). ``encoded_loss`` is the held-out loss training logs (eval loss, early stopping);
``heldout_loss`` wraps it for evaluation: same encoder (``data.encode_records``), same truncation,
same masked tokens, so the two stages report the same number for the same model and rows.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from sftflow.inference.formatting import IGNORE_INDEX
from sftflow.inference.token_rows import token_rows_of

log = logging.getLogger("sftflow.train")

# Rows of the fused LM head + cross-entropy computed at once: bounds each fp32 logits buffer
# (rows x vocab floats) to ~128 MB for Gemma's 262k vocabulary (128 rows). At most two such buffers
# plus logsumexp's temporary are alive per chunk (the softcap and the gradient work in place); at
# 64M elements with out-of-place softcap the head alone added ~1.1 GB to the training peak.
_HEAD_CHUNK_ELEMS = 32 * 1024 * 1024


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of ``hidden @ weight.T`` without materialising all logits.

    The logits are computed chunk by chunk; the gradient w.r.t. ``hidden`` (and ``weight`` when it
    trains) is computed in the same pass, so backward costs no second pass over the vocabulary and
    only one chunk of logits is ever alive.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, compute_dtype, chunk, row_ids=None, rows=None):  # type: ignore[override]
        # ``rows`` (k x hidden) replace rows ``row_ids`` of the frozen ``weight``: trainable token
        # rows (``sftflow.inference.token_rows``). Their logits are computed apart, and only they get a
        # weight gradient, so no (vocab x hidden) gradient or merged copy is ever made.
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        need_r = rows is not None and rows.requires_grad
        w = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grad_r = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) if need_r else None
        if rows is not None:
            rw = rows.to(compute_dtype)
            # grad_h = g @ W_eff = g @ W + g[:, ids] @ (rows - W[ids]): the correction, in fp32
            fix = rw.float() - w[row_ids].float() if need_h else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].to(compute_dtype)
            t = targets[s : s + chunk]
            logits = (h @ w.T).float()
            if rows is not None:
                logits[:, row_ids] = (h @ rw.T).float()
            if bias is not None:
                logits += bias.float()
            tanh = None
            if softcap:
                # In place, same operations and values as tanh(logits / softcap) * softcap: the
                # buffer becomes tanh (kept for the gradient) and one new buffer the capped logits.
                tanh = logits.div_(softcap).tanh_()
                logits = tanh * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b or need_r:
                # d(lse - logit_t)/d logits = softmax - onehot (computed in place, one buffer)
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                if tanh is not None:
                    g *= tanh.mul_(tanh).neg_().add_(1.0)  # 1 - tanh^2, in the tanh buffer
                    tanh = None  # its buffer is free before the gradient matmuls
                if need_b:
                    grad_b += g.sum(0)
                gc = g.to(compute_dtype)
                if need_h:
                    gh = gc @ w
                    if rows is not None:
                        gh = gh.float() + g[:, row_ids] @ fix
                    grad_h[s : s + chunk] = gh.to(hidden.dtype)
                if need_w:
                    grad_w += (gc.T @ h).float()
                if need_r:
                    grad_r += (gc[:, row_ids].T @ h).float()
        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in (grad_h, grad_w, grad_b, grad_r)))
        ctx.needs = (need_h, need_w, need_b, need_r)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b, grad_r = ctx.saved_tensors
        need_h, need_w, need_b, need_r = ctx.needs
        return (grad_h * grad_out if need_h else None, grad_w * grad_out if need_w else None,
                grad_b * grad_out if need_b else None, None, None, None, None, None,
                (grad_r * grad_out).to(grad_r.dtype) if need_r else None)


class CausalLMLoss(torch.nn.Module):
    """Summed cross-entropy over label positions of a causal LM, and the number of those positions.

    The decoder runs on every token; the LM head only on positions whose next token is learned
    (on SFT data that skips the prompt, and the pads). Wrapping the whole loss in one module lets
    DDP see a single forward.

    Args:
        model: a transformers causal LM, possibly peft-wrapped.
        compute_dtype: dtype of the head matmuls (bf16 under bf16 precision).
        fused: use the fused head; False calls the model's own head module on the selected
            positions (needed when the head itself carries an adapter).

    A head wrapped by peft for trainable token rows stays fused: the frozen matrix plus the rows
    (``tokens.token_rows_of``), so only the rows get a gradient.
    """

    def __init__(self, model: Any, *, compute_dtype: torch.dtype, fused: bool = True):
        super().__init__()
        self.model = model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = inner.get_decoder()
        self.head = inner.get_output_embeddings()
        # A peft trainable-tokens wrapper: the fused head reads the frozen layer inside it (reading
        # the wrapper's ``.weight`` would build a merged copy of the whole matrix).
        self._linear = getattr(getattr(self.head, "token_adapter", None), "base_layer", self.head)
        self.softcap = getattr(inner.config, "final_logit_softcapping", None)
        self.compute_dtype = compute_dtype
        self.fused = fused and type(self._linear) is torch.nn.Linear
        self._frozen_w: tuple[int, torch.Tensor] | None = None
        vocab = self._linear.weight.shape[0]
        self.chunk = max(16, _HEAD_CHUNK_ELEMS // vocab)

    def _head_weight(self) -> torch.Tensor:
        w = self._linear.weight
        if w.requires_grad or w.dtype == self.compute_dtype:
            return w
        # A frozen head (LoRA) is cast to the compute dtype once, not on every step.
        key = w._version
        if self._frozen_w is None or self._frozen_w[0] != key:
            self._frozen_w = (key, w.detach().to(self.compute_dtype))
        return self._frozen_w[1]

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        h = hidden[:, :-1][keep]
        t = targets[keep]
        n = t.numel()
        if n == 0:
            return hidden.sum() * 0.0, n
        rows = token_rows_of(self.head) if self._linear is not self.head else None
        if self.fused and (rows is not None or self._linear is self.head):
            ids, weights = rows if rows is not None else (None, None)
            ids = None if ids is None else torch.as_tensor(ids, dtype=torch.long, device=h.device)
            loss = FusedLinearCrossEntropy.apply(h, self._head_weight(), self._linear.bias, t, self.softcap,
                                                  self.compute_dtype, self.chunk, ids, weights)
        else:
            logits = self.head(h).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            loss = torch.nn.functional.cross_entropy(logits, t, reduction="sum")
        return loss, n


def check_head_matches_model(loss_mod: CausalLMLoss, model: Any, sample: dict[str, torch.Tensor], *,
                              device: torch.device) -> None:
    """Compare our head-only loss with the model's own forward once; fall back if they differ.

    Guards against architectures that post-process logits in ways the fused head does not know.
    """
    ids, labels = sample["input_ids"][:1, :64].to(device), sample["labels"][:1, :64].to(device)
    if (labels[:, 1:] != IGNORE_INDEX).sum() == 0:
        return
    with torch.no_grad():
        ours, n = loss_mod(ids, labels)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="sum")
    if not torch.allclose(ours.float(), ref, rtol=2e-2, atol=1e-2 * n):
        log.warning("fused LM-head loss %.4f differs from the model's own %.4f; using the model's head",
                    float(ours) / n, float(ref) / n)
        loss_mod.fused = False


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast under ``precision == "bf16"``, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class HeldoutLoss:
    """Token-averaged cross-entropy on the assistant tokens of held-out rows.

    Attributes:
        loss: mean loss per label token (NaN when no token counts).
        tokens: label tokens the mean is over.
        rows: rows that contributed (after the over-long policy).
    """

    loss: float
    tokens: int
    rows: int

    @property
    def perplexity(self) -> float:
        """``exp(loss)``; inf past ~700 (a diverged model) rather than an overflow."""
        return math.exp(self.loss) if self.loss < 700 else math.inf


def encoded_loss(loss_mod: CausalLMLoss, rows: list[tuple[list[int], list[int]]], *, batch_size: int, pad_id: int,
                 device: torch.device, precision: str, world: int = 1, rank: int = 0) -> HeldoutLoss:
    """Held-out loss of already encoded rows: length-sorted batches, no grad, right padding.

    Under data parallelism each rank takes every ``world``-th batch and the sums are all-reduced.
    """
    from sftflow.training.data import collate

    was_training = loss_mod.model.training
    loss_mod.model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)][rank::world]
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), autocast(device, precision):
        for b in batches:
            t = collate(rows, b, packed=False, pad_id=pad_id, max_len=max(len(rows[i][0]) for i in b))
            loss, n = loss_mod(t["input_ids"].to(device), t["labels"].to(device), attention_mask=t["attention_mask"].to(device))
            total += torch.tensor([float(loss), n], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(total)
    loss_mod.model.train(was_training)
    tokens = int(total[1])
    return HeldoutLoss(loss=float(total[0] / tokens) if tokens else math.nan, tokens=tokens, rows=len(rows))


def _aligned_tools(tools: Sequence[Any] | None, n: int) -> list[Any]:
    """Per-conversation tool schemas, checked to be aligned with the conversations."""
    if tools is None:
        return [None] * n
    out = list(tools)
    if len(out) != n:
        raise ValueError(f"tools: {len(out)} entries for {n} conversations (one per conversation expected)")
    return out


def heldout_loss(model: Any, tokenizer: Any, conversations: Iterable[list[Mapping[str, str]]], *, template: str,
                 max_seq_len: int, overlong: str = "truncate", batch_size: int = 8,
                 precision: str = "auto", tools: Sequence[Any] | None = None) -> HeldoutLoss:
    """The held-out loss of ``model`` on ``conversations``, exactly as training measures it.

    Rows are encoded with training's encoder and over-long policy (pass ``training.max_seq_len``
    and ``training.overlong``), so evaluation and training's eval loss agree on the same rows.

    Args:
        model: a transformers causal LM (possibly peft-wrapped), already on its device.
        tokenizer: its tokenizer.
        conversations: message lists (``[{role, content}, ...]``); the loss is on assistant turns.
        template: the resolved prompt template.
        max_seq_len: longest row in tokens (``training.max_seq_len``).
        overlong: ``truncate`` or ``drop`` (``training.overlong``).
        batch_size: rows per forward pass.
        precision: ``auto`` computes the head in the model's own dtype without autocast;
            ``bf16`` autocasts as bf16 training does; ``fp32`` computes in float32.
        tools: per conversation, its tool schemas (the record's ``tools``; None/"" for none),
            aligned with ``conversations``; None when no conversation has tools.

    Returns:
        ``HeldoutLoss`` (NaN loss and 0 tokens when no row has an answer token).

    Raises:
        ValueError: a conversation is malformed (the message names its index).
    """
    from sftflow.training.data import collate, encode_records

    convs = [list(c) for c in conversations]
    tool_list = _aligned_tools(tools, len(convs))
    data = encode_records(({"messages": c, "tools": t} for c, t in zip(convs, tool_list)), tokenizer,
                          template=template, max_seq_len=max_seq_len, overlong=overlong)
    if not data.rows:
        return HeldoutLoss(loss=math.nan, tokens=0, rows=0)
    head_dtype = model.get_output_embeddings().weight.dtype
    compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(precision, head_dtype)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss_mod = CausalLMLoss(model, compute_dtype=compute_dtype)
    first = collate(data.rows, [0], packed=False, pad_id=pad_id, max_len=max_seq_len)
    check_head_matches_model(loss_mod, model, first, device=device)
    return encoded_loss(loss_mod, data.rows, batch_size=batch_size, pad_id=pad_id, device=device,
                        precision="bf16" if precision == "bf16" else "fp32")


def _target_logprobs(head_mod: CausalLMLoss, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position of ``hidden`` (rows x hidden), through the model's head."""
    logits = head_mod.head(hidden).float()
    if head_mod.softcap:
        # In place (same operations and values as tanh(logits / c) * c): one (rows x vocab) buffer
        # instead of three; float() above already copied a lower-precision head's output.
        logits.div_(head_mod.softcap).tanh_().mul_(head_mod.softcap)
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


@dataclass(frozen=True)
class RowLoss:
    """One held-out row's loss, split into its answer tokens and its end-of-turn marker.

    Attributes:
        loss: summed cross-entropy over every label token (answer + end marker), as training counts.
        tokens: label tokens in ``loss``.
        answer_loss: summed cross-entropy over the answer tokens only (stop-id labels left out).
        answer_tokens: tokens in ``answer_loss``.
        end_logprob: log p(end marker) where the reference's last turn truly ends (NaN when
            truncation cut that marker off).
    """

    loss: float
    tokens: int
    answer_loss: float
    answer_tokens: int
    end_logprob: float


def row_losses(model: Any, tokenizer: Any, conversations: Iterable[list[Mapping[str, str]]], *, template: str,
               max_seq_len: int, overlong: str = "truncate", stop_ids: Iterable[int] = (),
               batch_size: int = 8, tools: Sequence[Any] | None = None) -> list[RowLoss | None]:
    """Per-row held-out losses, aligned with ``conversations`` (None for a row that has no label).

    Rows are encoded and truncated exactly as ``heldout_loss``/training do (``encode_for_training``
    + ``training.max_seq_len``/``overlong``); ``overlong: drop`` gives None for an over-long row.
    The end marker (a label in ``stop_ids``) is scored apart from the answer, because on a base model
    whose end-of-turn row is untrained it dominates the loss (p ~ 1e-14) and hides whether the
    answer itself got better.

    Args:
        model: a causal LM on its device. tokenizer: its tokenizer. template: resolved template.
        max_seq_len / overlong: training's over-long policy.
        stop_ids: the template's end-of-turn ids (``formatting.stop_token_ids``).
        batch_size: rows per decoder pass (the head runs one row at a time: bounded logits memory).
        tools: per conversation, its tool schemas (aligned with ``conversations``), as ``heldout_loss``.
    """
    from sftflow.inference.formatting import encode_for_training
    from sftflow.training.data import collate

    stops = {int(i) for i in stop_ids}
    encoded: list[tuple[list[int], list[int]] | None] = []
    convs = [list(c) for c in conversations]
    for c, t in zip(convs, _aligned_tools(tools, len(convs))):
        ids, labels = encode_for_training(tokenizer, c, template=template, max_len=None, tools=t or None)
        if len(ids) > max_seq_len:
            if overlong == "drop":
                encoded.append(None)
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        encoded.append((list(ids), list(labels)) if any(lab != IGNORE_INDEX for lab in labels[1:]) else None)
    out: list[RowLoss | None] = [None] * len(encoded)
    present = [i for i, e in enumerate(encoded) if e is not None]
    if not present:
        return out
    rows = [encoded[i] for i in present]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    head_mod = CausalLMLoss(model, compute_dtype=model.get_output_embeddings().weight.dtype)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda k: len(rows[k][0]))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            b = order[s : s + batch_size]
            t = collate(rows, b, packed=False, pad_id=pad_id, max_len=max(len(rows[k][0]) for k in b))
            hidden = head_mod.decoder(input_ids=t["input_ids"].to(device), attention_mask=t["attention_mask"].to(device),
                                      use_cache=False).last_hidden_state
            targets = t["labels"][:, 1:].to(device)
            for j, k in enumerate(b):
                keep = targets[j] != IGNORE_INDEX
                tgt = targets[j][keep]
                hk = hidden[j, :-1][keep]
                # Chunks of positions: a row's full-vocabulary logits (262k x 4 bytes per label
                # token, plus log_softmax's copy) would take over 1 GB for a 384-token answer.
                logp = torch.cat([_target_logprobs(head_mod, hk[c : c + head_mod.chunk], tgt[c : c + head_mod.chunk])
                                  for c in range(0, len(tgt), head_mod.chunk)])
                is_stop = torch.tensor([int(x) in stops for x in tgt.tolist()], device=logp.device)
                end = torch.nonzero(is_stop).flatten()
                out[present[k]] = RowLoss(
                    loss=float(-logp.sum()), tokens=int(tgt.numel()),
                    answer_loss=float(-logp[~is_stop].sum()), answer_tokens=int((~is_stop).sum()),
                    end_logprob=float(logp[end[-1]]) if len(end) else math.nan,
                )
    model.train(was_training)
    return out

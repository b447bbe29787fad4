"""SFT training stage: LoRA / DoRA / rsLoRA / QLoRA / full fine-tuning of a causal LM.

One linear recipe, read top to bottom:

1. **set up**: device, precision, threads, seed; the base model through ``sftflow.inference.models``; peft
   adapters; the data, tokenized once with the shared ``sftflow.inference.formatting`` (loss on assistant
   turns only), over-long rows truncated or dropped (counted);
2. **train**: length-grouped batches with dynamic padding (or packing with per-example attention
   isolation), AdamW + warmup + cosine/linear schedule, gradient accumulation, clipping; the LM
   head runs only at positions that carry a label, with a fused chunked cross-entropy (Gemma's
   262k-token head would otherwise dominate the FLOPs and memory); held-out eval loss + early
   stopping; atomic checkpoints (weights, optimizer, scheduler, RNG, data position) from which a
   re-run with the same ``out_dir`` resumes;
3. **save**: adapter, merged safetensors (``cfg.merge``), tokenizer, model card, loss curve;
4. **log** (``train_task``): per-step metrics to MLflow, the model as an offline-loadable pyfunc,
   registered as a new version with alias ``candidate``.

Run it standalone (the flow calls ``train_task``)::

    python -m tasks.train --train train.parquet --heldout heldout.parquet --base gemma-3-270m \\
        --out /tmp/sft --set max_steps=30 --set lora.r=8

Data parallel on several GPUs (or CPU processes) with the same code::

    torchrun --nproc_per_node 4 -m tasks.train --train ... --base ... --out ...
    accelerate launch --num_processes 4 -m tasks.train --train ... --base ... --out ...

Each rank takes every ``world_size``-th batch; gradients are averaged by DDP; rank 0 writes
checkpoints and outputs. A killed run resumes from its last checkpoint when run again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import mlflow.pyfunc
import numpy as np
import torch
from prefect import task

from sftflow.ops.cachekeys import (
    TAG_BASE_SHA256,
    TAG_CACHE_KEY,
    TAG_CODE_DIGEST,
    TAG_HELDOUT_SHA256,
    TAG_MODEL_SHA256,
    TAG_TRAIN_KEY,
    TAG_TRAIN_SHA256,
)
from sftflow.config import TrainingConfig, apply_overrides
from sftflow.inference.formatting import IGNORE_INDEX, encode_for_training, resolve_template
from sftflow.ops.orchestration import markdown_artifact, stage_cache_policy
from sftflow.data.records import frame_to_records
from sftflow.data.refs import DatasetRef, ModelRef, sha256_json
from sftflow.tracking.runs import StageContext, log_dataset, log_json, stage_run
from sftflow.results import TrainResult

log = logging.getLogger("sftflow.train")

LORA_METHODS = ("lora", "dora", "rslora", "qlora")
DEFAULT_LR = {"full": 2e-5, **{m: 2e-4 for m in LORA_METHODS}}
# Whether the train stage returned the finished output of an earlier run with the same key.
TAG_REUSED = "sftflow.train.reused_output"
OUTPUT_FILE = "train_output.json"  # written last: its presence means the run finished
CKPT_DIR = "checkpoints"
# Rows of the fused LM head + cross-entropy computed at once: bounds the logits buffer
# (rows x vocab floats) to ~256 MB for Gemma's 262k vocabulary.
_HEAD_CHUNK_ELEMS = 64 * 1024 * 1024


# ============================================================================ results
@dataclass(frozen=True)
class TrainOutput:
    """What ``train`` produced.

    Attributes:
        model: the model to use downstream: merged weights (``kind="merged"``) when
            ``cfg.merge`` or full fine-tuning, else the adapter (``kind="adapter"``, ``base`` set).
        adapter: the peft adapter (None for full fine-tuning).
        merged: the merged/full weights (None when not merged).
        metrics: ``(name, value)`` pairs: final/eval losses, tokens/s, pad fraction, counts.
        out_dir: the training folder (checkpoints, history, loss curve).
        loss_curve: PNG of train/eval loss per step.
        template: the prompt template used (``gemma``/``chatml``/``native``).
        resumed_from_step: the checkpoint step this run resumed from (0 = fresh).
    """

    model: ModelRef
    adapter: ModelRef | None
    merged: ModelRef | None
    metrics: tuple[tuple[str, float], ...]
    out_dir: str
    loss_curve: str
    template: str
    resumed_from_step: int = 0

    def metrics_dict(self) -> dict[str, float]:
        """``metrics`` as a dict."""
        return dict(self.metrics)


# ============================================================================ set-up helpers
def learning_rate(cfg: TrainingConfig) -> float:
    """The configured peak lr, else the usual default of the method (LoRA 2e-4, full 2e-5)."""
    return cfg.learning_rate if cfg.learning_rate is not None else DEFAULT_LR[cfg.method]


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmuls (AVX512-BF16 or AMX), where bf16 is the fast path."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA with bf16 support or a bf16-capable CPU, else ``fp32``.

    On this project's CPUs bf16 autocast keeps the loss within noise of fp32 (see bench/train.py)
    at ~3x the matmul throughput, so it is the default where the hardware has it.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def _dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun/accelerate environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _setup_device(world: int, local_rank: int) -> torch.device:
    """CUDA when present (one GPU per local rank), else CPU with every core we may use."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, cores // max(1, local_world)))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def training_key(*, train: DatasetRef, heldout: DatasetRef | None, base: ModelRef,
                 cfg: TrainingConfig) -> tuple[str, dict[str, Any]]:
    """Content key of one training job and what it covers (``sftflow.ops.cachekeys``).

    The bytes of the train/held-out Parquet files and of the base model's folder as they are on
    disk now, the config, the code this module runs (its import closure in the project) and the
    versions of the libraries that shape the weights. The training work folder is named by it.

    Returns:
        ``(hex key, components)``.
    """
    from sftflow.ops.cachekeys import key_of, stage_key_components

    comps = stage_key_components({"train": train, "heldout": heldout, "base": base, "cfg": cfg},
                                 module=Path(__file__))
    return key_of(comps), comps


def _fingerprint(*, train: DatasetRef, heldout: DatasetRef | None, base: ModelRef, cfg: TrainingConfig,
                 world: int) -> str:
    """Identity of a training run: a checkpoint or finished output is only reused by the same run
    (same data bytes, base model, config, code and library versions, same world size)."""
    key, _ = training_key(train=train, heldout=heldout, base=base, cfg=cfg)
    return sha256_json({"key": key, "world": world, "version": 2})


def _load_base(base: ModelRef, cfg: TrainingConfig, *, device: torch.device, trust_remote_code: bool):
    """Load the base model in float32 (QLoRA: 4-bit on CUDA); an adapter base is merged first."""
    from sftflow.inference.models import load_model

    if cfg.method == "qlora":
        if device.type != "cuda":
            raise RuntimeError("training.method=qlora needs a CUDA GPU (4-bit bitsandbytes kernels); none is "
                               "present here. Use method: lora (same adapter, full-precision base) on CPU.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RuntimeError("training.method=qlora needs the bitsandbytes package: pip install bitsandbytes") from None
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(base.path, quantization_config=quant, device_map={"": device.index},
                                                     trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(base.path, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        return model, tokenizer
    model, tokenizer = load_model(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if base.kind == "adapter":  # continue training from an adapter: start from its merged weights
        model = model.merge_and_unload()
    return model.to(device), tokenizer


def _apply_method(model: Any, cfg: TrainingConfig) -> Any:
    """Wrap the model with peft (LoRA family) or unfreeze everything (full)."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,  # "all-linear" = every linear layer but the LM head
        use_dora=cfg.method == "dora",
        use_rslora=cfg.method == "rslora",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


# ============================================================================ data
@dataclass
class Encoded:
    """Tokenized rows plus the accounting of the others: rows in = kept + dropped_overlong + dropped_no_labels."""

    rows: list[tuple[list[int], list[int]]]
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_labels: int = 0
    errors: list[str] = field(default_factory=list)


def encode_dataset(ref: DatasetRef, tokenizer: Any, *, template: str, cfg: TrainingConfig) -> Encoded:
    """Tokenize a canonical dataset with the shared formatting and apply the over-long policy.

    Raises:
        ValueError: a row's messages are malformed (the message names the row id), or nothing is left.
    """
    out = Encoded(rows=[])
    for row in frame_to_records(ref.read()):
        try:
            ids, labels = encode_for_training(tokenizer, row["messages"], template=template, max_len=None)
        except ValueError as e:
            raise ValueError(f"{ref.path}: row id={row.get('id')!r}: {e}") from None
        truncated = len(ids) > cfg.max_seq_len
        if truncated:
            if cfg.overlong == "drop":
                out.dropped_overlong += 1
                continue
            ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
        if all(lab == IGNORE_INDEX for lab in labels[1:]):  # truncation ate every answer token
            out.dropped_no_labels += 1
            continue
        out.truncated += truncated
        out.rows.append((ids, labels))
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
    """The deterministic batch list of one epoch (a function of seed and epoch only, so resumable)."""
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(lengths))
    if cfg.packing:
        batches: list[Any] = _packed(lengths, order, cfg.batch_size, cfg.max_seq_len, rng)
    else:
        batches = _length_grouped(lengths, order, cfg.batch_size, rng)
    if world > 1:  # every rank needs the same number of micro-batches
        batches = batches[: max(world, len(batches) // world * world)]
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


# ============================================================================ loss
class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of ``hidden @ weight.T`` without materialising all logits.

    The logits are computed chunk by chunk; the gradient w.r.t. ``hidden`` (and ``weight`` when it
    trains) is computed in the same pass, so backward costs no second pass over the vocabulary and
    only one chunk of logits is ever alive.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, compute_dtype, chunk):  # type: ignore[override]
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        w = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].to(compute_dtype)
            t = targets[s : s + chunk]
            logits = (h @ w.T).float()
            if bias is not None:
                logits += bias.float()
            if softcap:
                tanh = torch.tanh(logits / softcap)
                logits = tanh * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                # d(lse - logit_t)/d logits = softmax - onehot (computed in place, one buffer)
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                if softcap:
                    g *= 1.0 - tanh * tanh
                if need_b:
                    grad_b += g.sum(0)
                gc = g.to(compute_dtype)
                if need_h:
                    grad_h[s : s + chunk] = (gc @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (gc.T @ h).float()
        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in (grad_h, grad_w, grad_b)))
        ctx.needs = (need_h, need_w, need_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs
        return (grad_h * grad_out if need_h else None, grad_w * grad_out if need_w else None,
                grad_b * grad_out if need_b else None, None, None, None, None)


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
    """

    def __init__(self, model: Any, *, compute_dtype: torch.dtype, fused: bool = True):
        super().__init__()
        self.model = model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = inner.get_decoder()
        self.head = inner.get_output_embeddings()
        self.softcap = getattr(inner.config, "final_logit_softcapping", None)
        self.compute_dtype = compute_dtype
        self.fused = fused and type(self.head) is torch.nn.Linear
        self._frozen_w: tuple[int, torch.Tensor] | None = None
        vocab = self.head.weight.shape[0]
        self.chunk = max(16, _HEAD_CHUNK_ELEMS // vocab)

    def _head_weight(self) -> torch.Tensor:
        w = self.head.weight
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
        if self.fused:
            loss = _FusedLinearCrossEntropy.apply(h, self._head_weight(), self.head.bias, t, self.softcap,
                                                  self.compute_dtype, self.chunk)
        else:
            logits = self.head(h).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            loss = torch.nn.functional.cross_entropy(logits, t, reduction="sum")
        return loss, n


def _check_head_matches_model(loss_mod: CausalLMLoss, model: Any, sample: dict[str, torch.Tensor], *,
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


def cast_frozen_linears(model: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Store the frozen weights of linear layers in ``dtype`` once; return the originals.

    Under bf16 autocast every matmul rounds its fp32 weight to bf16 on each call anyway, so this
    changes no number, but it removes a cast of ~100M weights per forward (and per backward).
    The originals are restored (``restore_weights``) before merging, so merged weights stay exact.
    """
    originals: dict[str, torch.Tensor] = {}
    # The LM head is left alone: it is often tied to the input embeddings (whose fp32 output
    # starts the residual stream), and the fused loss keeps its own bf16 copy.
    head = model.get_output_embeddings()
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if mod is head or getattr(w, "data_ptr", lambda: 0)() == head.weight.data_ptr():
            continue
        if isinstance(mod, torch.nn.Linear) and w is not None and not w.requires_grad and w.dtype != dtype:
            originals[name] = w.data
            mod.weight.data = w.data.to(dtype)
    return originals


def restore_weights(model: Any, originals: dict[str, torch.Tensor]) -> None:
    """Undo ``cast_frozen_linears``."""
    mods = dict(model.named_modules())
    for name, data in originals.items():
        mods[name].weight.data = data


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _neftune_hook(alpha: float, active: list[bool]):
    """NEFTune: uniform noise of scale alpha/sqrt(seq_len * hidden) on input embeddings (training only)."""

    def hook(_module, _inputs, output):
        if not active[0]:
            return output
        mag = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-mag, mag)

    return hook


# ============================================================================ checkpoints
def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise RuntimeError(f"checkpoint does not match the model (unknown parameters, e.g. {missing[:3]})")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (``step-N`` folders; ``*.tmp`` ones are half written)."""
    root = out_dir / CKPT_DIR
    done = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / "state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_checkpoint(out_dir: Path, *, step: int, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                     rank: int, world: int, keep: int) -> None:
    """Write a checkpoint to ``step-N.tmp`` and rename it: a crash never leaves a checkpoint half-trusted."""
    root = out_dir / CKPT_DIR
    tmp, final = root / f"step-{step:07d}.tmp", root / f"step-{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world)
    torch.save(_rng_state(), tmp / f"rng-{rank}.pt")  # each rank's own dropout/noise stream
    if rank == 0:
        torch.save(_trainable_state(model), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    _barrier(world)
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps(state, indent=1))  # last file in: marks it complete
        os.replace(tmp, final)
        old = sorted((p for p in root.glob("step-*") if not p.name.endswith(".tmp")), key=lambda p: p.name)
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier(world)


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# ============================================================================ the recipe
def train(
    *,
    train: DatasetRef,
    heldout: DatasetRef | None,
    base: ModelRef,
    cfg: TrainingConfig,
    out_dir: Path,
    trust_remote_code: bool = False,
    log_to_mlflow: bool = True,
    metric_prefix: str = "",
) -> TrainOutput:
    """Fine-tune ``base`` on ``train`` and save the result under ``out_dir``.

    Re-running with the same ``out_dir`` and inputs resumes from the last checkpoint (or returns
    the finished output straight away); a different config or dataset starts afresh.

    Args:
        train: canonical training rows (``messages``); loss on assistant turns only.
        heldout: rows for the periodic eval loss and early stopping (None: no eval).
        base: the model to fine-tune (``sftflow.inference.models.resolve_model``).
        cfg: hyper-parameters (``pipelines.yaml`` ``training:``).
        out_dir: folder for checkpoints and outputs (e.g. the stage folder of the run).
        trust_remote_code: allow custom model code (only when the config asks).
        log_to_mlflow: log per-step metrics and the loss curve to the *active* MLflow run (if any).
        metric_prefix: prefix for metric names (e.g. ``backward/`` when training a helper model).

    Returns:
        ``TrainOutput`` with the model to use downstream and the run's metrics.

    Raises:
        RuntimeError: QLoRA without CUDA/bitsandbytes; a checkpoint that does not fit the model.
        ValueError: malformed rows (the message names the row id), or nothing left to train on.
    """
    out_dir = Path(out_dir)
    logger = _logger()
    rank, world, local_rank = _dist_info()
    device = _setup_device(world, local_rank)
    fingerprint = _fingerprint(train=train, heldout=heldout, base=base, cfg=cfg, world=world)
    finished = _finished_output(out_dir, fingerprint)
    if finished is not None:
        logger.info("training output in %s is complete for this config and data; reusing it", out_dir)
        return finished
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    mlflow_on = log_to_mlflow and rank == 0 and _mlflow_active()

    # ---------------------------------------------------------------- model
    model, tokenizer = _load_base(base, cfg, device=device, trust_remote_code=trust_remote_code)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _apply_method(model, cfg)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    template = resolve_template(tokenizer, cfg.template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ---------------------------------------------------------------- data
    data = encode_dataset(train, tokenizer, template=template, cfg=cfg)
    evaldata = encode_dataset(heldout, tokenizer, template=template, cfg=cfg) if heldout is not None and heldout.num_rows else None
    lengths = [len(ids) for ids, _ in data.rows]
    batches_per_epoch = len(epoch_batches(lengths, cfg=cfg, epoch=0, world=world))
    # Epoch mode trains on exactly `epochs` x the data (the last step may accumulate fewer
    # micro-batches); max_steps mode cycles through epochs until the step count is reached.
    total_micro = None if cfg.max_steps else max(world, int(cfg.epochs * batches_per_epoch) // world * world)
    total_steps = cfg.max_steps or max(1, math.ceil(total_micro / (world * cfg.grad_accum)))
    if rank == 0:
        logger.info("train: %d rows (%d truncated, %d dropped overlong, %d without answer tokens), %d steps, "
                 "template=%s, precision=%s, device=%s, world=%d, trainable %.2fM / %.1fM params",
                 len(data.rows), data.truncated, data.dropped_overlong, data.dropped_no_labels, total_steps,
                 template, precision, device, world, n_trainable / 1e6, n_total / 1e6)

    # ---------------------------------------------------------------- optimizer, schedule, loss
    from transformers import get_scheduler

    decay = [p for p in trainable if p.ndim >= 2]  # no weight decay on biases and norm scales
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate(cfg), betas=(0.9, 0.999), eps=1e-8,
        fused=device.type == "cuda",
    )
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    loss_mod = CausalLMLoss(model, compute_dtype=compute_dtype)
    loss_mod._head_weight()  # cache the bf16 head before the frozen linears are cast (tied weights)
    first = collate(data.rows, epoch_batches(lengths, cfg=cfg, epoch=0, world=world)[0], packed=cfg.packing,
                    pad_id=pad_id, max_len=cfg.max_seq_len)
    model.eval()
    _check_head_matches_model(loss_mod, model, first, device=device)
    # (not for QLoRA, whose frozen linears are 4-bit, nor full fine-tuning, where nothing is frozen)
    originals = cast_frozen_linears(model, compute_dtype) if precision == "bf16" and cfg.method in ("lora", "dora", "rslora") else {}
    runner: Any = loss_mod
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(loss_mod, device_ids=[local_rank] if device.type == "cuda" else None)
    neft_active = [False]
    if cfg.neftune_alpha:
        model.get_input_embeddings().register_forward_hook(_neftune_hook(cfg.neftune_alpha, neft_active))

    # ---------------------------------------------------------------- resume
    state: dict[str, Any] = {"step": 0, "fingerprint": fingerprint, "history": [], "best_eval": None,
                             "bad_evals": 0, "tokens": 0, "pad": 0, "slots": 0, "seconds": 0.0, "stopped_early": False}
    resumed_from = 0
    ckpt = _latest_checkpoint(out_dir)
    if ckpt is not None:
        saved = json.loads((ckpt / "state.json").read_text())
        if saved.get("fingerprint") != fingerprint:
            logger.warning("checkpoints in %s belong to another config/dataset; starting afresh", out_dir)
            if rank == 0:
                shutil.rmtree(out_dir / CKPT_DIR, ignore_errors=True)
            _barrier(world)
        else:
            _load_trainable(model, torch.load(ckpt / "trainable.pt", map_location=device))
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=False))
            scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
            _set_rng_state(torch.load(ckpt / f"rng-{rank}.pt", weights_only=False))
            state = saved
            resumed_from = state["step"]
            logger.info("resumed from %s (step %d of %d)", ckpt, resumed_from, total_steps)

    # ---------------------------------------------------------------- train
    def micro_batches(step: int) -> list[Any]:
        """This rank's micro-batches of optimizer step ``step`` (0-based), a pure function of step."""
        out = []
        for k in range(cfg.grad_accum * world):
            global_idx = step * cfg.grad_accum * world + k
            if total_micro is not None and global_idx >= total_micro:
                break
            if k % world == rank:
                out.append(divmod(global_idx, batches_per_epoch))  # (epoch, batch index)
        return out

    epoch_cache: dict[int, list[Any]] = {}

    def batch_at(epoch: int, idx: int) -> dict[str, torch.Tensor]:
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = epoch_batches(lengths, cfg=cfg, epoch=epoch, world=world)
        return collate(data.rows, epoch_cache[epoch][idx], packed=cfg.packing, pad_id=pad_id, max_len=cfg.max_seq_len)

    best_path = out_dir / "best_trainable.pt"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    step = state["step"]
    while step < total_steps and not state["stopped_early"]:
        t0 = time.perf_counter()
        model.train()
        neft_active[0] = True
        batches = [batch_at(e, i) for e, i in micro_batches(step)]
        # Normalise by the label tokens of the whole (global) step, so every token weighs the same
        # whatever its micro-batch or rank (correct gradient accumulation).
        counts = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
                               sum(int(b["n_tokens"]) for b in batches),
                               sum(b["input_ids"].numel() for b in batches)], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(counts)
        n_labels, n_tokens, n_slots = (int(x) for x in counts.tolist())
        loss_sum = torch.zeros((), dtype=torch.float64)
        for k, b in enumerate(batches):
            inputs = {key: v.to(device) for key, v in b.items() if key != "n_tokens"}
            sync = contextlib.nullcontext() if world == 1 or k == len(batches) - 1 else runner.no_sync()
            with sync, _autocast(device, precision):
                loss, _ = runner(**inputs)
                (loss * (world / max(1, n_labels))).backward()
            loss_sum += loss.detach().double().cpu()
        if world > 1:
            torch.distributed.all_reduce(loss_sum)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        neft_active[0] = False
        step += 1
        dt = time.perf_counter() - t0
        state["tokens"] += n_tokens
        state["pad"] += n_slots - n_tokens
        state["slots"] += n_slots
        state["seconds"] += dt
        rec = {"step": step, "loss": float(loss_sum) / max(1, n_labels), "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": n_tokens / dt, "pad_fraction": (n_slots - n_tokens) / max(1, n_slots),
               "tokens": n_tokens, "label_tokens": n_labels}

        if evaldata is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps):
            rec["eval_loss"] = evaluate_loss(loss_mod, evaldata, cfg=cfg, pad_id=pad_id, device=device,
                                             precision=precision, world=world, rank=rank)
            if state["best_eval"] is None or rec["eval_loss"] < state["best_eval"] - 1e-6:
                state["best_eval"], state["bad_evals"] = rec["eval_loss"], 0
                if cfg.early_stopping_patience and rank == 0:
                    _atomic_torch_save(_trainable_state(model), best_path)
            else:
                state["bad_evals"] += 1
                if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                    state["stopped_early"] = True
                    logger.info("early stopping at step %d: eval loss has not improved for %d evals", step, state["bad_evals"])
        state["history"].append(rec)
        state["step"] = step
        if rank == 0:
            if mlflow_on:
                _log_step_metrics(rec, prefix=metric_prefix)
            if step % cfg.log_every == 0 or step == total_steps or step == resumed_from + 1:
                logger.info(_progress_line(rec, state, total_steps))
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0) and step < total_steps and not state["stopped_early"]:
            _save_checkpoint(out_dir, step=step, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                             rank=rank, world=world, keep=cfg.keep_checkpoints)

    # ---------------------------------------------------------------- save
    restore_weights(model, originals)
    if cfg.early_stopping_patience and best_path.exists():
        _load_trainable(model, torch.load(best_path, map_location=device))  # the best eval-loss weights
    metrics = _summary_metrics(state, data=data, n_trainable=n_trainable, n_total=n_total, run_seconds=time.perf_counter() - t_run)
    output = None
    if rank == 0:
        output = _save_outputs(model, tokenizer, base=base, cfg=cfg, out_dir=out_dir, template=template,
                               metrics=metrics, state=state, fingerprint=fingerprint, resumed_from=resumed_from)
        if mlflow_on:
            import mlflow

            mlflow.log_metrics({f"{metric_prefix}{k}": v for k, v in metrics.items()})
            mlflow.log_artifact(output.loss_curve, artifact_path=f"{metric_prefix}plots".strip("/"))
            log_json(state["history"], f"{metric_prefix}history.json")
    _barrier(world)
    if output is None:  # other ranks read what rank 0 wrote
        output = _finished_output(out_dir, fingerprint)
    return output


def evaluate_loss(loss_mod: CausalLMLoss, data: Encoded, *, cfg: TrainingConfig, pad_id: int, device: torch.device,
                  precision: str, world: int = 1, rank: int = 0) -> float:
    """Token-averaged loss on held-out rows (assistant tokens only), length-sorted batches, no grad."""
    was_training = loss_mod.model.training
    loss_mod.model.eval()
    order = sorted(range(len(data.rows)), key=lambda i: len(data.rows[i][0]))
    batches = [order[k : k + cfg.batch_size] for k in range(0, len(order), cfg.batch_size)][rank::world]
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), _autocast(device, precision):
        for b in batches:
            t = collate(data.rows, b, packed=False, pad_id=pad_id, max_len=cfg.max_seq_len)
            loss, n = loss_mod(t["input_ids"].to(device), t["labels"].to(device), attention_mask=t["attention_mask"].to(device))
            total += torch.tensor([float(loss), n], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(total)
    loss_mod.model.train(was_training)
    return float(total[0] / max(1.0, float(total[1])))


def _progress_line(rec: dict[str, Any], state: dict[str, Any], total_steps: int) -> str:
    done = len(state["history"])
    per_step = state["seconds"] / max(1, done)
    eta = per_step * (total_steps - rec["step"])
    line = (f"step {rec['step']}/{total_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"grad {rec['grad_norm']:.3f} | {rec['tokens_per_s']:.0f} tok/s | pad {rec['pad_fraction']:.1%} | "
            f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
    if "eval_loss" in rec:
        line += f" | eval_loss {rec['eval_loss']:.4f}"
    return line


def _summary_metrics(state: dict[str, Any], *, data: Encoded, n_trainable: int, n_total: int,
                     run_seconds: float) -> dict[str, float]:
    hist = state["history"]
    tail = hist[-max(1, min(10, len(hist) // 4 or 1)):]
    evals = [h["eval_loss"] for h in hist if "eval_loss" in h]
    m = {
        "train_loss": hist[-1]["loss"] if hist else float("nan"),
        "train_loss_tail": sum(h["loss"] for h in tail) / len(tail) if tail else float("nan"),
        "steps": float(state["step"]),
        "train_tokens": float(state["tokens"]),
        "tokens_per_s": state["tokens"] / state["seconds"] if state["seconds"] else 0.0,
        "pad_fraction": state["pad"] / state["slots"] if state["slots"] else 0.0,
        "train_rows": float(len(data.rows)),
        "overlong_truncated": float(data.truncated),
        "overlong_dropped": float(data.dropped_overlong),
        "dropped_no_labels": float(data.dropped_no_labels),
        "trainable_params": float(n_trainable),
        "total_params": float(n_total),
        "train_seconds": float(state["seconds"]),
        "stopped_early": float(bool(state["stopped_early"])),
    }
    if evals:
        m["eval_loss"] = evals[-1]
        m["best_eval_loss"] = min(evals)
    return m


def _logger() -> Any:
    """Prefect's run logger inside a flow (shows in the UI), else this module's logger."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:
        return log


def _mlflow_active() -> bool:
    try:
        import mlflow
    except ImportError:
        return False
    return mlflow.active_run() is not None


def _log_step_metrics(rec: dict[str, Any], *, prefix: str) -> None:
    import mlflow

    keys = ("loss", "lr", "grad_norm", "tokens_per_s", "pad_fraction", "eval_loss")
    mlflow.log_metrics({f"{prefix}{k}": float(rec[k]) for k in keys if k in rec}, step=int(rec["step"]))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ============================================================================ outputs
def _finished_output(out_dir: Path, fingerprint: str) -> TrainOutput | None:
    """The output of a finished run with this fingerprint, or None."""
    p = Path(out_dir) / OUTPUT_FILE
    if not p.exists():
        return None
    data = json.loads(p.read_text())
    if data.get("fingerprint") != fingerprint:
        return None

    def ref(d: dict[str, Any] | None) -> ModelRef | None:
        return None if d is None else ModelRef(**{**d, "meta": tuple(tuple(x) for x in d.get("meta", ()))})

    o = data["output"]
    if not Path(o["model"]["path"]).exists():
        return None
    return TrainOutput(model=ref(o["model"]), adapter=ref(o["adapter"]), merged=ref(o["merged"]),
                       metrics=tuple((k, float(v)) for k, v in o["metrics"]), out_dir=o["out_dir"],
                       loss_curve=o["loss_curve"], template=o["template"], resumed_from_step=o["resumed_from_step"])


def _save_outputs(model: Any, tokenizer: Any, *, base: ModelRef, cfg: TrainingConfig, out_dir: Path, template: str,
                  metrics: dict[str, float], state: dict[str, Any], fingerprint: str, resumed_from: int) -> TrainOutput:
    """Adapter, merged weights, tokenizer, model cards, loss curve, then ``train_output.json`` last."""
    from sftflow.inference.models import model_dir_digest

    model.eval()
    meta = (("template", template), ("train_fingerprint", fingerprint))
    adapter = merged = None
    if cfg.method != "full":
        adir = out_dir / "adapter"
        shutil.rmtree(adir, ignore_errors=True)
        model.save_pretrained(str(adir))
        tokenizer.save_pretrained(str(adir))
        _write_model_card(adir, base=base, cfg=cfg, template=template, metrics=metrics, kind="adapter")
        adapter = ModelRef(path=str(adir), sha256=model_dir_digest(adir), kind="adapter", base=base.path,
                           name=f"{base.name or Path(base.path).name}-sft-adapter", meta=meta)
    if cfg.merge or cfg.method == "full":
        mdir = out_dir / "merged"
        shutil.rmtree(mdir, ignore_errors=True)
        # float32 on purpose: rounding merged weights to bf16 (2^-9 relative) would swamp small
        # LoRA deltas, undoing part of the fine-tune.
        full = (model.merge_and_unload() if cfg.method != "full" else model).to(torch.float32)
        full.config.dtype = "float32"
        full.save_pretrained(str(mdir), safe_serialization=True)
        tokenizer.save_pretrained(str(mdir))
        _write_model_card(mdir, base=base, cfg=cfg, template=template, metrics=metrics, kind="merged")
        merged = ModelRef(path=str(mdir), sha256=model_dir_digest(mdir), kind="merged", base=base.path,
                          name=f"{base.name or Path(base.path).name}-sft", meta=meta)
    curve = _plot_loss(state["history"], out_dir / "loss_curve.png")
    (out_dir / "history.json").write_text(json.dumps(state["history"], indent=1))
    out = TrainOutput(model=merged or adapter, adapter=adapter, merged=merged, metrics=tuple(sorted(metrics.items())),
                      out_dir=str(out_dir), loss_curve=str(curve), template=template, resumed_from_step=resumed_from)
    doc = {"fingerprint": fingerprint, "output": {**asdict(out), "metrics": list(out.metrics)}}
    tmp = out_dir / (OUTPUT_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=list))
    os.replace(tmp, out_dir / OUTPUT_FILE)
    shutil.rmtree(out_dir / CKPT_DIR, ignore_errors=True)  # finished: the output supersedes checkpoints
    return out


def _write_model_card(path: Path, *, base: ModelRef, cfg: TrainingConfig, template: str, metrics: dict[str, float],
                      kind: str) -> None:
    """A README.md model card: what was trained, from what, how, and how well."""
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()))
    lora = "" if cfg.method == "full" else f" (r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, targets={cfg.lora.target_modules})"
    card = f"""---
library_name: {"peft" if kind == "adapter" else "transformers"}
base_model: {base.name or base.path}
tags: [sftflow, sft, {cfg.method}]
---
# {base.name or Path(base.path).name} — supervised fine-tune ({kind})

Trained by sftflow's training stage (`tasks/train.py`).

- base model: `{base.path}` (sha256 `{base.sha256[:16]}`)
- method: **{cfg.method}**{lora}
- prompt template: `{template}` (`sftflow.inference.formatting`; loss on assistant turns only)
- lr {learning_rate(cfg)} ({cfg.lr_scheduler}, warmup {cfg.warmup_ratio}), batch {cfg.batch_size} x accum {cfg.grad_accum},
  max_seq_len {cfg.max_seq_len} ({cfg.overlong}), packing {cfg.packing}, precision {cfg.precision}, seed {cfg.seed}

## Metrics

| metric | value |
|---|---|
{rows}

## Use

```python
from sftflow.inference.models import resolve_model, load_model
from sftflow.inference.formatting import build_generation_prompt, stop_token_ids
model, tok = load_model(resolve_model("{path}"))
ids = build_generation_prompt(tok, [{{"role": "user", "content": "Hi!"}}], template="{template}")
```
"""
    (path / "README.md").write_text(card)


def _plot_loss(history: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in worker threads
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    ev = [h for h in history if "eval_loss" in h]
    if ev:
        ax.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ============================================================================ MLflow model
class SFTChatModel(mlflow.pyfunc.PythonModel):
    """Chat generation with the fine-tuned model, loadable offline (the weights are artifacts).

    Input: a DataFrame with a ``prompt`` column (one user turn each). Output: one response per row.
    Params: ``max_new_tokens`` (default 64), ``temperature`` (default 0 = greedy).
    """

    def load_context(self, context):  # MLflow hook
        from sftflow.inference.models import load_model

        cfg = context.model_config or {}
        kind = "adapter" if cfg.get("kind") == "adapter" else "merged"
        ref = ModelRef(path=context.artifacts["model"], sha256="", kind=kind, base=cfg.get("base_path", ""))
        self.model, self.tokenizer = load_model(ref)
        self.template = cfg.get("template") or None

    def predict(self, context, model_input, params=None):  # MLflow hook
        from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids
        from sftflow.inference.generation import generate_batch

        params = params or {}
        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        template = resolve_template(self.tokenizer, self.template)
        ids = [build_generation_prompt(self.tokenizer, [{"role": "user", "content": str(p)}], template=template)
               for p in prompts]
        outs = generate_batch(self.model, self.tokenizer, ids, max_new_tokens=int(params.get("max_new_tokens", 64)),
                              temperature=float(params.get("temperature", 0.0)), batch_size=8,
                              stop_ids=stop_token_ids(self.tokenizer, template), seed=0)
        return [o.text for o in outs]


def log_model(output: TrainOutput, *, register_as: str | None,
              lineage_tags: dict[str, str] | None = None) -> tuple[str, str, str]:
    """Log the trained model to the active MLflow run as a pyfunc that loads offline.

    The merged weights (or the adapter, with the absolute path of its local base recorded) are
    the model's artifacts, so no hub is ever contacted to load it. When ``register_as`` is given,
    a new version is registered and gets the alias ``candidate``, tagged with its final losses,
    the sha256 of the model it holds and ``lineage_tags`` (``train_task`` passes the digests of
    the train/held-out files and the base model it trained from, and its cache/code keys).

    Returns:
        ``(model_uri, registered_name, registered_version)`` (name/version empty when not registered).
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64), ParamSpec("temperature", "double", 0.0)]),
    )
    m = output.model
    artifacts = {"model": m.path}
    config = {"kind": m.kind, "template": output.template, "base_path": m.base}
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=SFTChatModel(),
        artifacts=artifacts,
        model_config=config,
        signature=signature,
        # Explicit requirements: inferring them would load the model in a subprocess.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", _req("transformers"), _req("peft"), _req("mlflow")],
        registered_model_name=register_as,
        metadata={"sftflow_kind": m.kind, "base_model": m.base, "template": output.template},
    )
    version = ""
    if register_as:
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(register_as, "candidate", version)
        for k, v in output.metrics:
            if k in ("train_loss", "eval_loss", "best_eval_loss"):
                client.set_model_version_tag(register_as, version, k, f"{v:.6g}")
        tags = {TAG_MODEL_SHA256: m.sha256, **(lineage_tags or {})}
        for k, v in sorted(tags.items()):
            client.set_model_version_tag(register_as, version, k, v)
    return info.model_uri, register_as or "", version


def _req(dist: str) -> str:
    import importlib.metadata

    return f"{dist}=={importlib.metadata.version(dist)}"


# ============================================================================ Prefect task
_train_fn = train  # the task's ``train`` argument shadows the function inside train_task


@task(name="train", cache_policy=stage_cache_policy(), persist_result=True)  # no retries: training resumes instead
def train_task(train: DatasetRef, heldout: DatasetRef | None, base: ModelRef, cfg: TrainingConfig, *,
               ctx: StageContext, register_as: str | None) -> TrainResult:
    """The SFT stage of the flow: train, log to the stage's MLflow run, register the candidate.

    Not retried on failure: when the flow runs again with the same inputs (bytes of the data and
    base model, config, code, library versions), training resumes from the last checkpoint in
    ``runs/<pipeline>/_train/<key>``. Under ``--no-cache`` a finished output there is discarded
    and the model is trained again.
    """
    import mlflow

    with stage_run(ctx, "train") as run:
        log_dataset(train, context="training")
        if heldout is not None:
            log_dataset(heldout, context="heldout")
        mlflow.log_params({**_flat_params(cfg.model_dump(mode="json")), "base_model": base.path,
                           "learning_rate_effective": learning_rate(cfg)})
        # Checkpoints live in a folder keyed by the content of the inputs and by the code (not by
        # the run id), so that a new flow run after a crash (same data, model, config and code)
        # resumes where the killed one stopped. A file lock keeps two concurrent runs with
        # identical inputs from sharing it.
        from filelock import FileLock

        from sftflow.ops.cachekeys import current_stage_key, refresh_cache_requested

        key, comps = training_key(train=train, heldout=heldout, base=base, cfg=cfg)
        work_dir = ctx.layout.root.parent / "_train" / key[:16]
        (ctx.stage_dir("train") / "work_dir.txt").write_text(str(work_dir) + "\n")
        with FileLock(str(work_dir) + ".lock"):
            done_file = work_dir / OUTPUT_FILE
            if done_file.exists() and refresh_cache_requested():
                # --no-cache recomputes every stage: a finished output is not a substitute for
                # training. (Checkpoints of an unfinished run with the same key are still resumed.)
                _logger().info("--no-cache: discarding the finished training output in %s", work_dir)
                shutil.rmtree(work_dir)
            before = done_file.stat().st_mtime_ns if done_file.exists() else None
            work_dir.mkdir(parents=True, exist_ok=True)
            output = _train_fn(train=train, heldout=heldout, base=base, cfg=cfg, out_dir=work_dir,
                               log_to_mlflow=True)
            # Reused = the finished output of an earlier run with the same key was returned as is.
            finished = before is not None and done_file.exists() and done_file.stat().st_mtime_ns == before
        lineage_tags = _lineage_tags(comps, key=key, stage_key=current_stage_key())
        mlflow.set_tags({**lineage_tags, TAG_REUSED: str(finished).lower(),
                         "sftflow.train.resumed_from_step": str(output.resumed_from_step)})
        log_json(comps, "train/cache_key.json")
        model_uri, name, version = log_model(output, register_as=register_as, lineage_tags=lineage_tags)
        for card in {output.model.path, output.adapter.path if output.adapter else output.model.path}:
            mlflow.log_artifact(str(Path(card) / "README.md"), artifact_path=f"model_card/{Path(card).name}")
        metrics = output.metrics_dict()
        markdown_artifact("train-summary", _summary_markdown(output, model_uri=model_uri, name=name, version=version))
        ctx.layout.mark_done("train")
        meta = output.model.meta + (("mlflow_run_id", run.info.run_id), ("model_uri", model_uri))
        model = ModelRef(path=output.model.path, sha256=output.model.sha256, kind=output.model.kind,
                         base=output.model.base, name=output.model.name, meta=meta)
        return TrainResult(model=model, run_id=run.info.run_id, model_uri=model_uri, registered_name=name,
                           registered_version=version, metrics=tuple(sorted(metrics.items())))


def _lineage_tags(comps: dict[str, Any], *, key: str,
                  stage_key: tuple[str, dict[str, Any]] | None) -> dict[str, str]:
    """Tags naming the bytes a training run read: train/held-out sha256, base model digest, keys.

    Digests come from the key components, i.e. the files as they were on disk when this run
    started (the datasets are re-verified against them when read).
    """
    inputs = comps["inputs"]
    tags = {
        TAG_TRAIN_SHA256: inputs["train"]["DatasetRef"]["content"],
        TAG_HELDOUT_SHA256: inputs["heldout"]["DatasetRef"]["content"] if inputs.get("heldout") else "",
        TAG_BASE_SHA256: inputs["base"]["ModelRef"]["content"].removeprefix("dir:"),
        TAG_TRAIN_KEY: key,
        TAG_CODE_DIGEST: comps["code"]["digest"],
    }
    if stage_key is not None:  # the Prefect cache key of this task run
        tags[TAG_CACHE_KEY] = stage_key[0]
    return {k: v for k, v in tags.items() if v}


def _flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _summary_markdown(output: TrainOutput, *, model_uri: str, name: str, version: str) -> str:
    m = output.metrics_dict()
    lines = ["# Training", "", f"- model: `{output.model.path}` ({output.model.kind})", f"- MLflow model: `{model_uri}`"]
    if name:
        lines.append(f"- registered: `{name}` version {version} (alias `candidate`)")
    if output.resumed_from_step:
        lines.append(f"- resumed from checkpoint step {output.resumed_from_step}")
    lines += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in sorted(m.items())]
    return "\n".join(lines)


# ============================================================================ CLI
def _cli_config(pipeline: str | None, sets: list[str]) -> TrainingConfig:
    """TrainingConfig from a pipeline's ``training:`` section (or defaults) plus ``key=value`` overrides."""
    from sftflow.config import resolve_pipeline

    base = resolve_pipeline(pipeline).training.model_dump(mode="json") if pipeline else {}
    raw = apply_overrides(base, sets, prefix="training")
    return TrainingConfig.model_validate(raw)


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.train`` (also under torchrun / accelerate launch)."""
    from sftflow.inference.models import resolve_model
    from sftflow.data.refs import sha256_file

    p = argparse.ArgumentParser(prog="python -m tasks.train", description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, help="canonical Parquet dataset (messages column)")
    p.add_argument("--heldout", help="held-out Parquet dataset for eval loss / early stopping")
    p.add_argument("--base", required=True, help="model name (embedded, tiny-*, local dir or hub id)")
    p.add_argument("--out", required=True, help="output folder (re-run with the same folder to resume)")
    p.add_argument("--pipeline", help="take the training section of this pipeline in pipelines.yaml")
    p.add_argument("--set", dest="sets", action="append", default=[], help="override, e.g. max_steps=20 (repeatable)")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    # Progress lines on stdout (prefect, imported above, configures the root logger its own way).
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    def ref(path: str, name: str) -> DatasetRef:
        import pyarrow.parquet as pq

        return DatasetRef(path=str(Path(path).resolve()), sha256=sha256_file(path),
                          num_rows=pq.ParquetFile(path).metadata.num_rows, name=name)

    cfg = _cli_config(args.pipeline, args.sets)
    out = train(train=ref(args.train, "train"), heldout=ref(args.heldout, "heldout") if args.heldout else None,
                base=resolve_model(args.base, trust_remote_code=args.trust_remote_code), cfg=cfg,
                out_dir=Path(args.out).resolve(), trust_remote_code=args.trust_remote_code, log_to_mlflow=False)
    if _dist_info()[0] == 0:
        print(json.dumps({"model": out.model.path, "kind": out.model.kind, "metrics": out.metrics_dict(),
                          "resumed_from_step": out.resumed_from_step}, indent=1))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The SFT recipe: LoRA / DoRA / rsLoRA / QLoRA / full fine-tuning of a causal LM, top to bottom.

1. **set up**: device, precision, threads, seed (``model``); the base model through
   ``sftflow.inference.models``; peft adapters; the data, tokenized once with the shared
   ``sftflow.inference.formatting`` (loss on assistant turns only), over-long rows truncated or
   dropped and counted (``data``);
2. **train**: length-grouped batches with dynamic padding (or packing with per-example attention
   isolation), AdamW + warmup + cosine/linear schedule, gradient accumulation, clipping; the LM
   head runs only at positions that carry a label, with a fused chunked cross-entropy (``loss``);
   held-out eval loss + early stopping; atomic checkpoints (weights, optimizer, scheduler, RNG,
   data position) from which a re-run with the same ``out_dir`` resumes (``checkpoint``);
3. **save**: adapter, merged safetensors (``cfg.merge``), tokenizer, model card, loss curve (``export``).

``train`` logs nowhere but the logger: metrics go to an optional ``on_metrics`` callback (the
Prefect task ``tasks.train.train_task`` passes one that logs to MLflow, then registers the model).
Run it standalone, also data parallel under torchrun / accelerate: see ``python -m sftflow.training``.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from sftflow.config_sections import TrainingConfig
from sftflow.data.refs import DatasetRef, ModelRef, sha256_json
from sftflow.inference.formatting import IGNORE_INDEX, resolve_template
from sftflow.progress import StepEvent, run_logger
from sftflow.training.checkpoint import atomic_torch_save, barrier, load_trainable, resume, save_checkpoint, trainable_state
from sftflow.training.data import Encoded, collate, encode_dataset, epoch_batches
from sftflow.training.export import TrainOutput, finished_output, save_outputs
from sftflow.training.loss import CausalLMLoss, autocast, check_head_matches_model, encoded_loss
from sftflow.training.model import (
    apply_method,
    cast_frozen_linears,
    dist_info,
    learning_rate,
    load_base,
    neftune_hook,
    resolve_precision,
    restore_weights,
    seed_everything,
    setup_device,
    token_rows_learning_rate,
)
from sftflow.training.tokens import resolve_trainable_tokens

LOGGER_NAME = "sftflow.train"
# Step-record keys handed to ``on_metrics`` (the rest of a record is bookkeeping).
STEP_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "pad_fraction", "eval_loss")
OnMetrics = Callable[[int, dict[str, float]], None]


def training_key(*, train: DatasetRef, heldout: DatasetRef | None, base: ModelRef, cfg: TrainingConfig,
                 module: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """Content key of one training job and what it covers (``sftflow.keys``).

    The bytes of the train/held-out Parquet files and of the base model's folder as they are on
    disk now, the config, the code that runs (the import closure of ``module``, default this
    recipe) and the versions of the libraries that shape the weights.

    Returns:
        ``(hex key, components)``.
    """
    from sftflow.keys import key_of, stage_key_components

    comps = stage_key_components({"train": train, "heldout": heldout, "base": base, "cfg": cfg},
                                 module=module or Path(__file__))
    return key_of(comps), comps


def _fingerprint(*, train: DatasetRef, heldout: DatasetRef | None, base: ModelRef, cfg: TrainingConfig,
                 world: int) -> str:
    """Identity of a training run: a checkpoint or finished output is only reused by the same run
    (same data bytes, base model, config, code and library versions, same world size)."""
    key, _ = training_key(train=train, heldout=heldout, base=base, cfg=cfg)
    return sha256_json({"key": key, "world": world, "version": 2})


def train(
    *,
    train: DatasetRef,
    heldout: DatasetRef | None,
    base: ModelRef,
    cfg: TrainingConfig,
    out_dir: Path,
    trust_remote_code: bool = False,
    on_metrics: OnMetrics | None = None,
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
        on_metrics: called on rank 0 after every optimizer step with ``(step, metrics)``
            (``STEP_METRICS`` present in the step: loss, lr, grad_norm, tokens_per_s,
            pad_fraction, eval_loss); e.g. an MLflow logger. Not called for a reused output.

    Returns:
        ``TrainOutput`` with the model to use downstream and the run's metrics.

    Raises:
        RuntimeError: QLoRA without CUDA/bitsandbytes; a checkpoint that does not fit the model.
        ValueError: malformed rows (the message names the row id), or nothing left to train on.
    """
    out_dir = Path(out_dir)
    logger = run_logger(LOGGER_NAME)
    rank, world, local_rank = dist_info()
    device = setup_device(world, local_rank)
    fingerprint = _fingerprint(train=train, heldout=heldout, base=base, cfg=cfg, world=world)
    finished = finished_output(out_dir, fingerprint)
    if finished is not None:
        logger.info("training output in %s is complete for this config and data; reusing it", out_dir)
        return finished
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)

    # ---------------------------------------------------------------- model
    model, tokenizer = load_base(base, cfg, device=device, trust_remote_code=trust_remote_code)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    template = resolve_template(tokenizer, cfg.template)
    # Control-token rows the adapter cannot move (e.g. an untrained <end_of_turn>) train as well.
    token_ids = [] if cfg.method == "full" else resolve_trainable_tokens(model, tokenizer, template, cfg.trainable_tokens)
    if rank == 0 and cfg.method != "full":
        logger.info("trainable token rows (training.trainable_tokens=%s): %s", cfg.trainable_tokens,
                    {i: tokenizer.convert_ids_to_tokens(i) for i in token_ids} or "none")
    model = apply_method(model, cfg, token_ids=token_ids)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ---------------------------------------------------------------- data
    data = encode_dataset(train, tokenizer, template=template, cfg=cfg, diversify=True)
    evaldata = encode_dataset(heldout, tokenizer, template=template, cfg=cfg, diversify=False) if heldout is not None and heldout.num_rows else None
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
    # No weight decay on biases, norm scales, nor token rows; token rows at their own lr, warmed up and
    # clipped on their own (make_optimizer, issue 24): the clip below is the adapter's alone.
    from sftflow.training.model import adapter_params, make_optimizer

    optimizer, scheduler = make_optimizer(model, cfg, trainable=trainable, total_steps=total_steps, device=device)
    trainable = adapter_params(optimizer)
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    loss_mod = CausalLMLoss(model, compute_dtype=compute_dtype)
    loss_mod._head_weight()  # cache the bf16 head before the frozen linears are cast (tied weights)
    first = collate(data.rows, epoch_batches(lengths, cfg=cfg, epoch=0, world=world)[0], packed=cfg.packing,
                    pad_id=pad_id, max_len=cfg.max_seq_len)
    model.eval()
    check_head_matches_model(loss_mod, model, first, device=device)
    # (not for QLoRA, whose frozen linears are 4-bit, nor full fine-tuning, where nothing is frozen)
    originals = cast_frozen_linears(model, compute_dtype) if precision == "bf16" and cfg.method in ("lora", "dora", "rslora") else {}
    runner: Any = loss_mod
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(loss_mod, device_ids=[local_rank] if device.type == "cuda" else None)
    neft_active = [False]
    if cfg.neftune_alpha:
        model.get_input_embeddings().register_forward_hook(neftune_hook(cfg.neftune_alpha, neft_active))

    # ---------------------------------------------------------------- resume
    state: dict[str, Any] = {"step": 0, "fingerprint": fingerprint, "history": [], "best_eval": None,
                             "bad_evals": 0, "tokens": 0, "pad": 0, "slots": 0, "seconds": 0.0, "stopped_early": False}
    saved = resume(out_dir, fingerprint=fingerprint, model=model, optimizer=optimizer, scheduler=scheduler,
                   device=device, rank=rank, world=world, total_steps=total_steps, logger=logger)
    if saved is not None:
        state = saved
    resumed_from = state["step"]

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

    def batch_at(epoch: int, idx: int) -> dict[str, torch.Tensor] | None:
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = epoch_batches(lengths, cfg=cfg, epoch=epoch, world=world)
        if not epoch_cache[epoch][idx]:  # an empty part of the epoch's last global batch (epoch_batches)
            return None
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
        batches = [b for b in (batch_at(e, i) for e, i in micro_batches(step)) if b is not None]
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
            with sync, autocast(device, precision):
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
            rec["eval_loss"] = encoded_loss(loss_mod, evaldata.rows, batch_size=cfg.batch_size, pad_id=pad_id,
                                            device=device, precision=precision, world=world, rank=rank).loss
            if state["best_eval"] is None or rec["eval_loss"] < state["best_eval"] - 1e-6:
                state["best_eval"], state["bad_evals"] = rec["eval_loss"], 0
                if cfg.early_stopping_patience and rank == 0:
                    atomic_torch_save(trainable_state(model), best_path)
            else:
                state["bad_evals"] += 1
                if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                    state["stopped_early"] = True
                    logger.info("early stopping at step %d: eval loss has not improved for %d evals", step, state["bad_evals"])
        state["history"].append(rec)
        state["step"] = step
        if rank == 0:
            if on_metrics is not None:
                on_metrics(step, {k: float(rec[k]) for k in STEP_METRICS if k in rec})
            if step % cfg.log_every == 0 or step == total_steps or step == resumed_from + 1:
                logger.info(_progress_line(rec, state, total_steps), extra=StepEvent.extra(  # the console reads the event
                    step=step, total=total_steps, loss=rec["loss"], eval_loss=rec.get("eval_loss"),
                    seconds_per_step=state["seconds"] / max(1, len(state["history"]))))
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0) and step < total_steps and not state["stopped_early"]:
            save_checkpoint(out_dir, step=step, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                             rank=rank, world=world, keep=cfg.keep_checkpoints)

    # ---------------------------------------------------------------- save
    restore_weights(model, originals)
    # Before merging: drop the bf16 head copy and give freed activations back to the OS (glibc
    # keeps them mapped), so the merge and the save do not stack on the training peak.
    from sftflow.inference.models import release_memory

    loss_mod._frozen_w = None
    release_memory()
    if cfg.early_stopping_patience and best_path.exists():
        load_trainable(model, torch.load(best_path, map_location=device))  # the best eval-loss weights
    metrics = _summary_metrics(state, data=data, n_trainable=n_trainable, n_total=n_total, run_seconds=time.perf_counter() - t_run)
    metrics["trainable_token_rows"] = float(len(token_ids))
    output = None
    if rank == 0:
        output = save_outputs(model, tokenizer, base=base, cfg=cfg, out_dir=out_dir, template=template,
                              metrics=metrics, state=state, fingerprint=fingerprint, resumed_from=resumed_from)
    barrier(world)
    if output is None:  # other ranks read what rank 0 wrote
        output = finished_output(out_dir, fingerprint)
    return output


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

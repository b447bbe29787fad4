"""Set-up of a training run: where it runs (device, ranks, threads), in what precision, and the
model it trains (the base, loaded once; peft adapters or full fine-tuning; bf16 weight casts;
NEFTune noise)."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftflow.config_sections import TrainingConfig
from sftflow.data.refs import ModelRef

LORA_METHODS = ("lora", "dora", "rslora", "qlora")
DEFAULT_LR = {"full": 2e-5, **{m: 2e-4 for m in LORA_METHODS}}


def learning_rate(cfg: TrainingConfig) -> float:
    """The configured peak lr, else the usual default of the method (LoRA 2e-4, full 2e-5)."""
    return cfg.learning_rate if cfg.learning_rate is not None else DEFAULT_LR[cfg.method]


# Default lr of trainable token rows, as a multiple of the adapter's (see token_rows_learning_rate).
TOKEN_LR_MULTIPLIER = 25.0


def token_rows_learning_rate(cfg: TrainingConfig) -> float:
    """Peak lr of the trainable token rows: ``training.trainable_tokens_lr``, else 25x the adapter's.

    Why 25x: on the demo (Gemma 3 270M, LoRA lr 2e-4, 30 steps) the untrained ``<end_of_turn>`` row
    reached p(end) 0.51 at the true end with 5e-3 (runaway 4% of fitting references) but only 0.11
    with 2e-3 on one data order (58% runaways); 1e-2 stopped answers early (ROUGE-L 0.162 vs 0.194).
    """
    return cfg.trainable_tokens_lr if cfg.trainable_tokens_lr is not None else TOKEN_LR_MULTIPLIER * learning_rate(cfg)


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


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun/accelerate environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup_device(world: int, local_rank: int) -> torch.device:
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


def load_base(base: ModelRef, cfg: TrainingConfig, *, device: torch.device, trust_remote_code: bool):
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


def apply_method(model: Any, cfg: TrainingConfig, *, token_ids: list[int] | tuple[int, ...] = (),
                 init_rows: bool = True) -> Any:
    """Wrap the model with peft (LoRA family) or unfreeze everything (full).

    Args:
        model: the base model.
        cfg: the training config.
        token_ids: embedding rows to train besides the adapter (``sftflow.training.tokens``), through
            peft's ``trainable_token_indices``: for tied embeddings peft ties the LM head's rows to
            them; for untied ones the same rows of the LM head train too. ``merge_and_unload``
            bakes them into the weights and the adapter file stores them. Their layers compute
            sparsely (``sftflow.inference.token_rows.sparse_token_rows``): only the rows get a gradient, never the whole
            (vocab x hidden) matrix. Ignored for full fine-tuning, where every row trains.
        init_rows: start the untrained ones among those rows at the mean of the trained rows
            (``sftflow.training.tokens.init_untrained_rows``; issue 24's stable recipe).
    """
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
        trainable_token_indices=_token_targets(model, list(token_ids)) if token_ids else None,
    )
    model = get_peft_model(model, lcfg)
    if token_ids:
        from sftflow.inference.token_rows import sparse_token_rows

        sparse_token_rows(model)
        if init_rows:
            from sftflow.training.tokens import init_untrained_rows

            init_untrained_rows(model)
    return model


def _token_targets(model: Any, ids: list[int]) -> list[int] | dict[str, list[int]]:
    """peft's ``trainable_token_indices``: the ids (input embeddings, and with them a tied head), or
    for an untied head the same ids on both the embedding and the head module."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight.data_ptr() == emb.weight.data_ptr():
        return ids
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(emb)]: ids, names[id(head)]: ids}


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
    # A peft wrapper (trainable token rows) computes ``.weight`` afresh on each access (a copy of
    # the whole matrix): read the wrapped layer's weight, once.
    head_ptr = _unwrapped(head).weight.data_ptr()
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if mod is head or getattr(w, "data_ptr", lambda: 0)() == head_ptr:
            continue
        if isinstance(mod, torch.nn.Linear) and w is not None and not w.requires_grad and w.dtype != dtype:
            originals[name] = w.data
            mod.weight.data = w.data.to(dtype)
    return originals


def _unwrapped(module: Any) -> Any:
    """The plain layer inside a peft wrapper (``original_module`` / ``base_layer``), else the module."""
    module = getattr(module, "original_module", None) or module
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def restore_weights(model: Any, originals: dict[str, torch.Tensor]) -> None:
    """Undo ``cast_frozen_linears``."""
    mods = dict(model.named_modules())
    for name, data in originals.items():
        mods[name].weight.data = data


def neftune_hook(alpha: float, active: list[bool]):
    """NEFTune: uniform noise of scale alpha/sqrt(seq_len * hidden) on input embeddings (training only)."""

    def hook(_module, _inputs, output):
        if not active[0]:
            return output
        mag = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-mag, mag)

    return hook


# The token rows' own warm-up, as a fraction of the run's steps (on top of the schedule's warm-up).
TOKEN_WARMUP_FRACTION = 0.25


def make_optimizer(model: Any, cfg: TrainingConfig, *, trainable: list[torch.nn.Parameter], total_steps: int,
                   device: torch.device, token_warmup_fraction: float = TOKEN_WARMUP_FRACTION,
                   per_group_clip: bool = True) -> tuple[Any, Any]:
    """AdamW and its lr schedule for the adapter and the trainable token rows (issue 24's stable recipe).

    Groups: decayed matrices, undecayed vectors, and the token rows (no weight decay: peft stores
    whole rows, decay would pull them towards zero, not towards where they started) at their own,
    larger lr (``token_rows_learning_rate``): an untrained row must travel far in few steps.

    Why the token rows get their own warm-up and clip: Adam's first updates move every coordinate
    by about the lr, all in the direction of the first gradients, which at 25x the adapter's lr
    raises the row's logit at every position and the loss spiked (bench/stability.py). The token
    group's lr multiplies the schedule by a linear ramp over ``token_warmup_fraction`` of the steps,
    and its gradient norm is clipped on its own (``cfg.max_grad_norm``) in a pre-step hook, so
    neither group's norm scales the other's gradient. The adapter's own clip stays with the caller
    (``adapter_params``).

    Args:
        model: the (peft) model.
        cfg: the training config (lr, scheduler, warm-up ratio, weight decay, max_grad_norm).
        trainable: the parameters that require grad.
        total_steps: optimizer steps of the run.
        device: the training device (fused AdamW on CUDA).
        token_warmup_fraction: the token rows' extra warm-up, a fraction of ``total_steps`` (0: none).
        per_group_clip: clip the token rows' gradient norm on their own before each step.

    Returns:
        ``(optimizer, scheduler)``; a token-row group is marked ``token_rows=True``.
    """
    from transformers import get_scheduler

    rows = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n and p.requires_grad]
    row_ids = {id(p) for p in rows}
    decay = [p for p in trainable if p.ndim >= 2 and id(p) not in row_ids]
    no_decay = [p for p in trainable if p.ndim < 2 and id(p) not in row_ids]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if rows:
        groups.append({"params": rows, "weight_decay": 0.0, "lr": token_rows_learning_rate(cfg), "token_rows": True})
    optimizer = torch.optim.AdamW(groups, lr=learning_rate(cfg), betas=(0.9, 0.999), eps=1e-8,
                                  fused=device.type == "cuda")
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    if rows and token_warmup_fraction > 0:
        ramp = max(1, math.ceil(token_warmup_fraction * total_steps))
        k = len(groups) - 1
        scheduler.lr_lambdas[k] = _Ramped(scheduler.lr_lambdas[k], ramp)
        group = optimizer.param_groups[k]
        group["lr"] = group["initial_lr"] * scheduler.lr_lambdas[k](scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if rows and per_group_clip:
        def clip_token_rows(opt: Any, _args: Any, _kwargs: Any) -> None:
            for g in opt.param_groups:
                if g.get("token_rows"):
                    torch.nn.utils.clip_grad_norm_(g["params"], cfg.max_grad_norm)

        optimizer.register_step_pre_hook(clip_token_rows)
    return optimizer, scheduler


def adapter_params(optimizer: Any, *, per_group_clip: bool = True) -> list[torch.nn.Parameter]:
    """The parameters the training loop clips together: every group's but the token rows' when those
    clip on their own (``make_optimizer(per_group_clip=True)``), else all of them."""
    return [p for g in optimizer.param_groups if not (per_group_clip and g.get("token_rows")) for p in g["params"]]


class _Ramped:
    """A schedule multiplied by a linear ramp from 1/(steps+1) to 1 over ``steps`` steps (picklable)."""

    def __init__(self, inner: Any, steps: int) -> None:
        self.inner, self.steps = inner, steps

    def __call__(self, step: int) -> float:
        return float(self.inner(step)) * min(1.0, (step + 1) / (self.steps + 1))

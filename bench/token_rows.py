"""Benchmark: trainable token rows, peft's dense path vs the sparse path, side by side. Prints JSON.

One process, one model (Gemma 3 270M base), the same LoRA (r=16, all-linear) + the ``<end_of_turn>``
row, the same batches, bf16 autocast as the recipe runs it. The two paths alternate step by step
(which one goes first alternates too), so a busy machine slows both alike and the ratio holds:

* ``dense``: peft's ``trainable_token_indices`` forward (a merged copy of the 262k x 640 tied
  matrix per call, a dense gradient for it) with the LM head unfused: what training ran before;
* ``sparse``: ``sftflow.inference.token_rows.sparse_token_rows`` + the fused head with row overrides.

Reported: tokens/s per path (non-pad tokens over the timed steps, the first one is warm-up), their
ratio, tokens per CPU-second of this process (less blurred by other work on a shared machine; use
``--threads 1`` there, so no thread spins waiting for a descheduled sibling), the FLOPs and bytes of
new tensors of one step on the same batch (FlopCounterMode: the work itself, machine-independent), per-step losses of both (they must agree), MFU against the bf16 matmul peak measured in the
same run (model FLOPs per token as in bench/train.py).

Run::

    SFTFLOW_HOME=$PWD/.sftflow python bench/token_rows.py --steps 4 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import flops_per_token, load_examples, matmul_peak  # noqa: E402  (bench/train.py)


def build(path: str, base, token_ids, cfg, precision: str):
    """The recipe's set-up (sftflow.training.model) for one path; returns (model, loss module, optimizer)."""
    from sftflow.training.loss import CausalLMLoss
    from sftflow.training.model import apply_method, cast_frozen_linears, load_base, token_rows_learning_rate

    model, tok = load_base(base, cfg, device=torch.device("cpu"), trust_remote_code=False)
    model.config.use_cache = False
    torch.manual_seed(0)
    model = apply_method(model, cfg, token_ids=token_ids)
    if path == "dense":  # peft's own forward; the head module unfused (the code before the fix)
        for m in model.modules():
            m.__dict__.pop("forward", None)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    loss_mod = CausalLMLoss(model, compute_dtype=dtype, fused=path == "sparse")
    loss_mod._head_weight()
    if precision == "bf16":
        cast_frozen_linears(model, dtype)
    rows = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    others = [p for p in model.parameters() if p.requires_grad and all(p is not r for r in rows)]
    opt = torch.optim.AdamW([{"params": others}, {"params": rows, "lr": token_rows_learning_rate(cfg), "weight_decay": 0.0}],
                            lr=2e-4)
    return model, tok, loss_mod, opt


def step(model, loss_mod, opt, batch, precision: str) -> tuple[float, float, float]:
    """One optimizer step; returns (wall seconds, CPU seconds of this process, mean loss)."""
    from sftflow.training.loss import autocast

    model.train()
    t, c = time.perf_counter(), time.process_time()
    with autocast(torch.device("cpu"), precision):
        loss, n = loss_mod(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
        (loss / n).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t, time.process_time() - c, float(loss.detach()) / n


def counted_step(model, loss_mod, opt, batch, precision: str) -> tuple[float, float]:
    """FLOPs (torch's FlopCounterMode: matmuls, forward + backward) and bytes of new tensors of one
    step: the work itself, which a busy machine cannot blur. Returns (GFLOP, GB allocated)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class Bytes(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    Bytes.total += t.numel() * t.element_size()
            return out

    flops = FlopCounterMode(display=False)
    with flops, Bytes():
        step(model, loss_mod, opt, batch, precision)
    return flops.get_total_flops() / 1e9, Bytes.total / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: every core we may use)")
    args = p.parse_args()
    from sftflow.config_sections import TrainingConfig
    from sftflow.inference.formatting import resolve_template
    from sftflow.inference.models import resolve_model
    from sftflow.training.data import collate, encode_records
    from sftflow.training.tokens import resolve_trainable_tokens

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    base = resolve_model(args.model)
    cfg = TrainingConfig.model_validate({"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
                                         "target_modules": "all-linear"}, "precision": args.precision, "max_seq_len": 512})
    from sftflow.inference.models import load_model

    m0, tok = load_model(base)  # the token ids, picked from the base as the recipe picks them
    token_ids = resolve_trainable_tokens(m0, tok, resolve_template(tok, cfg.template), cfg.trainable_tokens)
    del m0
    models = {path: build(path, base, token_ids, cfg, args.precision) for path in ("dense", "sparse")}
    tok = models["sparse"][1]
    template = resolve_template(tok, cfg.template)
    data = encode_records(({"messages": m} for m in load_examples(args.examples)), tok, template=template, max_seq_len=512)
    order = sorted(range(len(data.rows)), key=lambda i: len(data.rows[i][0]))
    batches = [collate(data.rows, order[k : k + args.batch_size], packed=False, pad_id=tok.pad_token_id, max_len=512)
               for k in range(0, len(order), args.batch_size)]
    peak = {"bf16_before": matmul_peak(torch.bfloat16)}
    res = {path: {"seconds": [], "cpu": [], "tokens": [], "losses": []} for path in models}
    for s in range(args.steps):
        b = batches[s % len(batches)]
        for path in (("dense", "sparse") if s % 2 == 0 else ("sparse", "dense")):
            model, _, loss_mod, opt = models[path]
            dt, cpu, loss = step(model, loss_mod, opt, b, args.precision)
            res[path]["seconds"].append(dt)
            res[path]["cpu"].append(cpu)
            res[path]["tokens"].append(int(b["attention_mask"].sum()))
            res[path]["losses"].append(round(loss, 5))
            print(f"step {s} {path}: {dt:.2f}s loss {loss:.4f}", file=sys.stderr, flush=True)
    peak["bf16_after"] = matmul_peak(torch.bfloat16)
    b = batches[0]
    for path in models:  # one more (counted) step each, on the same batch
        gflop, gb = counted_step(models[path][0], models[path][2], models[path][3], b, args.precision)
        res[path]["counted"] = {"tokens": int(b["attention_mask"].sum()), "gflop": round(gflop, 1),
                                "gb_allocated": round(gb, 2)}
    rows = data.rows
    avg_len = sum(len(r[0]) for r in rows) / len(rows)
    label_frac = sum(sum(1 for x in r[1][1:] if x != -100) for r in rows) / sum(len(r[0]) for r in rows)
    fpt = flops_per_token(models["sparse"][0].get_base_model(), avg_len=avg_len, label_frac=label_frac)
    best_peak = max(peak.values())
    out = {"setup": {"model": args.model, "batch_size": args.batch_size, "steps": args.steps, "precision": args.precision,
                     "token_rows": token_ids, "threads": torch.get_num_threads(),
                     "load_avg": os.getloadavg()[0], "model_gflop_per_token": round(fpt / 1e9, 3)},
           "peak_gflops_bf16": {k: round(v, 1) for k, v in peak.items()}}
    for path, r in res.items():
        timed = slice(1, None) if args.steps > 1 else slice(None)
        tps = sum(r["tokens"][timed]) / sum(r["seconds"][timed])
        cpu_tps = sum(r["tokens"][timed]) / sum(r["cpu"][timed])
        out[path] = {"tokens_per_s": round(tps, 2), "mfu": round(tps * fpt / (best_peak * 1e9), 4),
                     "tokens_per_cpu_s": round(cpu_tps, 2),
                     "step_seconds": [round(x, 2) for x in r["seconds"]],
                     "step_cpu_seconds": [round(x, 2) for x in r["cpu"]], "step_losses": r["losses"],
                     "one_step_work": r["counted"]}
    out["speedup_sparse_over_dense"] = round(out["sparse"]["tokens_per_s"] / out["dense"]["tokens_per_s"], 3)
    out["cpu_speedup_sparse_over_dense"] = round(out["sparse"]["tokens_per_cpu_s"] / out["dense"]["tokens_per_cpu_s"], 3)
    out["gflop_ratio_dense_over_sparse"] = round(res["dense"]["counted"]["gflop"] / res["sparse"]["counted"]["gflop"], 3)
    out["max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(res["sparse"]["losses"], res["dense"]["losses"]))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

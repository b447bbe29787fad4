"""Benchmark: do the trainable token rows make the loss spike, and does the stable recipe fix it? Prints JSON.

Issue 24: with the untrained ``<end_of_turn>`` row training at 25x the adapter's lr, bench/train.py's
loss curve spiked (2.03, 5.56, 1.86, ...) where TRL's did not. This runs the recipe's own pieces
(``load_base``, ``apply_method``, ``make_optimizer``, the fused loss, the loop's batching, bf16
autocast as the recipe runs it) on the same examples, batches and seed, once per variant:

* ``frozen``: no token rows (LoRA only);
* ``rows_25x``: the rows at 25x, as before the recipe (no init, no token warm-up, one global clip);
* ``rows_1x``: the rows at the adapter's lr, otherwise as ``rows_25x``;
* ``recipe``: 25x with the stable recipe (rows started at the mean of the trained rows, the token
  group's lr ramped over the first quarter of the steps, its gradient norm clipped on its own);
* ``warmup_only`` / ``init_only`` (``--ablate``): one part of the recipe each.

Per variant: the step losses (the curve), the biggest step-to-step rise (the spike), and how well the
end of turn is learned on the next examples (not trained on): mean p(<end_of_turn>) at the true end
of the answer, the share of answers where it is the top token there (the answer would stop), and
its mean p inside the answers (a premature stop). A PNG of the curves is written with ``--plot``.

Measured 2026-12-08 (24 examples, batch 4, 6 steps, bf16, seed 0, Gemma 3 270M, a machine at load 5-40,
so no timings): step losses
  frozen   1.840 1.945 2.177 4.119 1.718 3.953
  rows_25x 1.840 1.945 2.116 3.518 1.686 3.494
  recipe   1.775 1.896 2.049 3.215 1.671 3.309
The rises at steps 4 and 6 are the batches (largest with the rows frozen: an untrained end of turn
costs most in short-answer batches), not the token rows; the recipe is lowest at every step.

Run (about 1-2 minutes per variant on 2 quiet cores)::

    SFTFLOW_HOME=/tmp/x python bench/stability.py                       # 48 examples, batch 8: 6 steps
    SFTFLOW_HOME=/tmp/x python bench/stability.py --examples 80 --batch-size 4 --plot /tmp/x/curves.png
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
from train import load_examples  # noqa: E402  (bench/train.py: the same examples)

VARIANTS = {
    "frozen": {"rows": False},
    "rows_25x": {"rows": True, "mult": 25.0, "init": False, "warmup": 0.0, "clip": False},
    "rows_1x": {"rows": True, "mult": 1.0, "init": False, "warmup": 0.0, "clip": False},
    "recipe": {"rows": True, "mult": 25.0, "init": True, "warmup": None, "clip": True},
}
ABLATIONS = {
    "warmup_only": {"rows": True, "mult": 25.0, "init": False, "warmup": None, "clip": False},
    "init_only": {"rows": True, "mult": 25.0, "init": True, "warmup": 0.0, "clip": False},
}


def run_variant(name: str, spec: dict, *, base, cfg_dict: dict, train_msgs, probe_msgs, batch_size: int) -> dict:
    """Train one variant for one epoch of ``train_msgs``; return its curve and end-of-turn figures."""
    from sftflow.config_sections import TrainingConfig
    from sftflow.inference.formatting import resolve_template
    from sftflow.training.data import collate, encode_records, epoch_batches
    from sftflow.training.loss import CausalLMLoss, autocast
    from sftflow.training.model import (TOKEN_WARMUP_FRACTION, adapter_params, apply_method, learning_rate,
                                        load_base, make_optimizer, resolve_precision, seed_everything)
    from sftflow.training.tokens import resolve_trainable_tokens

    cfg = TrainingConfig.model_validate({**cfg_dict, "trainable_tokens": "auto" if spec["rows"] else "none",
                                         **({"trainable_tokens_lr": spec["mult"] * cfg_dict["learning_rate"]}
                                            if spec["rows"] else {})})
    device = torch.device("cpu")
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    model, tok = load_base(base, cfg, device=device, trust_remote_code=False)
    model.config.use_cache = False
    template = resolve_template(tok, cfg.template)
    token_ids = resolve_trainable_tokens(model, tok, template, cfg.trainable_tokens)
    model = apply_method(model, cfg, token_ids=token_ids, init_rows=bool(spec.get("init")))
    data = encode_records(({"messages": m} for m in train_msgs), tok, template=template, max_seq_len=cfg.max_seq_len)
    lengths = [len(ids) for ids, _ in data.rows]
    batches = epoch_batches(lengths, cfg=cfg, epoch=0, world=1)
    total = len(batches)
    trainable = [p for p in model.parameters() if p.requires_grad]
    warm = TOKEN_WARMUP_FRACTION if spec.get("warmup") is None else spec["warmup"]
    clip = bool(spec.get("clip"))
    optimizer, scheduler = make_optimizer(model, cfg, trainable=trainable, total_steps=total, device=device,
                                          token_warmup_fraction=warm, per_group_clip=clip)
    clipped = adapter_params(optimizer, per_group_clip=clip)
    rows_group = [g for g in optimizer.param_groups if g.get("token_rows")]
    loss_mod = CausalLMLoss(model, compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    losses, row_lrs, grad_norms, row_norms = [], [], [], []
    t0 = time.perf_counter()
    for s, idx in enumerate(batches):
        model.train()
        b = collate(data.rows, idx, packed=False, pad_id=tok.pad_token_id, max_len=cfg.max_seq_len)
        with autocast(device, precision):
            loss, n = loss_mod(b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
            (loss / max(1, n)).backward()
        row_grad = (float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in rows_group[0]["params"]])))
                    if rows_group else None)
        grad_norms.append({"adapter_or_all": round(float(torch.nn.utils.clip_grad_norm_(clipped, cfg.max_grad_norm)), 4),
                           "rows": None if row_grad is None else round(row_grad, 4)})
        row_lrs.append(rows_group[0]["lr"] if rows_group else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()) / max(1, n), 4))
        if rows_group:
            row_norms.append(round(float(rows_group[0]["params"][0].detach().norm()), 4))
        print(f"{name} step {s + 1}/{total}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t0
    eot = end_of_turn_probe(model, tok, template, probe_msgs, max_len=cfg.max_seq_len)
    rises = [b - a for a, b in zip(losses, losses[1:])]
    return {"steps": total, "step_losses": losses, "max_rise": round(max(rises), 4) if rises else 0.0,
            "max_loss_over_first": round(max(losses) / losses[0], 3), "token_rows": token_ids,
            "token_lr_peak": cfg.trainable_tokens_lr if spec["rows"] else None, "adapter_lr": learning_rate(cfg),
            "token_row_lr_per_step": [None if x is None else float(f"{x:.3g}") for x in row_lrs],
            "grad_norms": grad_norms, "row_norm_per_step": row_norms, "train_seconds": round(train_s, 1), **eot}


def end_of_turn_probe(model, tok, template: str, convs, *, max_len: int) -> dict:
    """p(<end_of_turn>) at the true end of each answer, whether it is the top token there, and its
    mean p inside the answer (bf16-free: fp32 logits, one conversation at a time)."""
    from sftflow.inference.formatting import stop_token_ids
    from sftflow.training.data import encode_records

    stop = stop_token_ids(tok, template)[0]
    rows = encode_records(({"messages": m} for m in convs), tok, template=template, max_seq_len=max_len).rows
    p_end, top_end, p_inside = [], [], []
    model.eval()
    with torch.no_grad():
        for ids, labels in rows:
            pos = [i for i in range(1, len(ids)) if labels[i] == stop]  # label == stop: the true end
            if not pos:
                continue
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0].float()
            probs = torch.softmax(logits, dim=-1)
            e = pos[-1] - 1  # the position whose next token is the end of turn
            p_end.append(float(probs[e, stop]))
            top_end.append(int(probs[e].argmax()) == stop)
            inside = [i - 1 for i in range(1, len(ids)) if labels[i] not in (-100, stop)]
            p_inside.append(float(probs[inside, stop].mean()) if inside else 0.0)
    n = max(1, len(p_end))
    return {"probe_answers": len(p_end), "p_end_at_true_end": round(sum(p_end) / n, 4),
            "end_is_top_at_true_end": round(sum(top_end) / n, 4), "p_end_inside_answer": round(sum(p_inside) / n, 5)}


def plot(results: dict, path: str) -> None:
    """The loss curves, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in results.items():
        ax.plot(range(1, len(r["step_losses"]) + 1), r["step_losses"], marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.set_title("token rows: loss per step (same batches, seed 0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=48)
    p.add_argument("--probe", type=int, default=32, help="next examples (not trained on) for the end-of-turn probe")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="bf16")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ablate", action="store_true", help="also warmup_only and init_only")
    p.add_argument("--plot", default=None, help="write a PNG of the curves here")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    from sftflow.inference.models import resolve_model

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    base = resolve_model(args.model)
    msgs = load_examples(args.examples + args.probe)
    cfg_dict = {"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
                "learning_rate": args.lr, "lr_scheduler": "cosine", "warmup_ratio": args.warmup_ratio,
                "batch_size": args.batch_size, "max_seq_len": 512, "precision": args.precision, "seed": 0,
                "checkpoint_every": None}
    specs = {**VARIANTS, **(ABLATIONS if args.ablate else {})}
    names = [n for n in args.variants.split(",") if n] + (list(ABLATIONS) if args.ablate else [])
    results = {n: run_variant(n, specs[n], base=base, cfg_dict=cfg_dict, train_msgs=msgs[: args.examples],
                              probe_msgs=msgs[args.examples :], batch_size=args.batch_size) for n in names}
    out = {"setup": {"model": args.model, "examples": args.examples, "probe": args.probe, "batch_size": args.batch_size,
                     "lr": args.lr, "warmup_ratio": args.warmup_ratio, "precision": args.precision,
                     "load_avg": os.getloadavg()[0]}, "variants": results}
    if args.plot:
        plot(results, args.plot)
        out["plot"] = args.plot
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

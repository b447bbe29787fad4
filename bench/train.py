"""Benchmark: our SFT trainer vs TRL's ``SFTTrainer`` on the same run, same machine. Prints JSON.

Same base model (Gemma 3 270M base), same data (the first N examples of
../shared/data/instruct/alpaca_gpt4_999.json), same LoRA (r=16, alpha=32, dropout 0.05,
all-linear), same max length (512), batch size, optimizer schedule, epochs and precision. Both sides
see the same prompt/completion texts (our Gemma template); TRL gets them as a prompt/completion
dataset (completion-only loss, padding, no packing).

Reported per side:

* ``tokens_per_s``: non-pad training tokens per second over the steps after the first (warm-up);
* ``final_train_loss``: each trainer's own loss averaged over its last steps;
* ``trainset_loss_after``: the assistant-token loss of the trained model on the same examples,
  computed by one shared function in fp32 — the like-for-like "loss after the same tokens";
* ``mfu``: model FLOPs per second / the bf16 matmul peak measured in this run (2048^3 matmuls).
  Model FLOPs per non-pad token for LoRA training = 4 x (decoder linear params) (forward + input
  gradients; frozen weights need no weight gradient) + 3 x attention score/value FLOPs, plus
  4 x hidden x vocab for each labelled token (the LM head forward + its input gradient). The same
  formula is applied to both sides, so the MFU ratio equals the throughput ratio.

Run (about 8 minutes on 2 cores; TRL dominates)::

    SFTFLOW_HOME=$PWD/.sftflow python bench/train.py                # bf16, 48 examples, batch 8
    SFTFLOW_HOME=$PWD/.sftflow python bench/train.py --precision fp32 --examples 32
    SFTFLOW_HOME=$PWD/.sftflow python bench/train.py --skip-trl     # ours only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "instruct" / "alpaca_gpt4_999.json"


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 4) -> float:
    """Best-of-``reps`` GFLOP/s of an n^3 matmul in ``dtype`` (the peak MFU is measured against)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def load_examples(n: int) -> list[list[dict[str, str]]]:
    rows = json.loads(DATA.read_text())[:n]
    out = []
    for r in rows:
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}])
    return out


def flops_per_token(model, *, avg_len: float, label_frac: float) -> float:
    """Model FLOPs per non-pad token of LoRA training (see module docstring)."""
    cfg = model.config
    decoder = model.get_decoder()
    linear = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    heads_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    attn_fwd = 2 * 2 * cfg.num_hidden_layers * heads_dim * (avg_len / 2)  # QK^T + AV, causal: half the keys
    head = 4 * cfg.hidden_size * cfg.vocab_size * label_frac
    return 4 * linear + 3 * attn_fwd + head


def trainset_loss(model_dir_or_model, tokenizer, rows, *, device) -> float:
    """Assistant-token loss of a model on encoded rows (fp32, one shared function for both sides)."""
    from sftflow.training.data import collate
    from sftflow.training.loss import CausalLMLoss

    model = model_dir_or_model
    model.eval()
    loss_mod = CausalLMLoss(model, compute_dtype=torch.float32)
    total, n = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    with torch.no_grad():
        for k in range(0, len(order), 8):
            b = collate(rows, order[k : k + 8], packed=False, pad_id=tokenizer.pad_token_id, max_len=512)
            loss, c = loss_mod(b["input_ids"].to(device), b["labels"].to(device), attention_mask=b["attention_mask"].to(device))
            total, n = total + float(loss), n + c
    return total / n


def run_ours(args, base, rows_msgs, work: Path) -> dict:
    from sftflow.config_sections import TrainingConfig
    from sftflow.inference.models import load_model
    from sftflow.data.records import make_record, records_to_frame
    from sftflow.data.refs import write_parquet
    from sftflow.training.data import encode_dataset
    from sftflow.training.entry import run_training

    ref = write_parquet(records_to_frame([make_record(m, source="bench:alpaca_gpt4") for m in rows_msgs]),
                        work / "train.parquet", name="train")
    cfg = TrainingConfig.model_validate({
        "method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "learning_rate": args.lr, "lr_scheduler": "cosine", "warmup_ratio": 0.03, "batch_size": args.batch_size,
        "epochs": args.epochs, "max_seq_len": 512, "precision": args.precision, "checkpoint_every": None,
        "merge": False, "seed": 0, "packing": args.packing, "log_every": 1,
    })
    t = time.perf_counter()
    # The pipeline's one training entry (content-keyed folder below work/ours, fresh per temp dir;
    # torchrun when num_processes > 1), so the benchmark times what the stages run.
    out = run_training(train=ref, heldout=None, base=base, cfg=cfg, work_root=work / "ours").output
    wall = time.perf_counter() - t
    hist = json.loads((Path(out.out_dir) / "history.json").read_text())
    timed = hist[1:] or hist  # the first step is warm-up (allocator, caches)
    secs = sum(h["tokens"] / h["tokens_per_s"] for h in timed)
    m = out.metrics_dict()
    model, tok = load_model(out.adapter)
    rows = encode_dataset(ref, tok, template=out.template, cfg=cfg).rows
    return {
        "tokens_per_s": sum(h["tokens"] for h in timed) / secs,
        "steps": len(hist), "timed_steps": len(timed), "tokens": int(m["train_tokens"]),
        "pad_fraction": m["pad_fraction"],
        "step_losses": [round(h["loss"], 4) for h in hist],
        "final_train_loss": sum(h["loss"] for h in hist[-2:]) / len(hist[-2:]),
        "trainset_loss_after": trainset_loss(model, tok, rows, device="cpu"),
        "wall_s_incl_load_and_save": wall,
        "_rows": rows,
    }


def run_trl(args, base, rows_msgs, work: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftflow.inference.models import load_model

    model, tok = load_model(base)
    model.train()
    # The same Gemma-template texts as ours; the completion ends with <end_of_turn>, which TRL is
    # told is the eos (so it appends nothing more).
    prompts = [f"<bos><start_of_turn>user\n{m[0]['content']}<end_of_turn>\n<start_of_turn>model\n" for m in rows_msgs]
    completions = [f"{m[1]['content']}<end_of_turn>" for m in rows_msgs]
    ds = Dataset.from_dict({"prompt": prompts, "completion": completions})
    sft_args = SFTConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_train_epochs=args.epochs, learning_rate=args.lr, lr_scheduler_type="cosine",
        # transformers 5 has no warmup_ratio; the same ceil(0.03 x steps) warm-up steps as ours
        warmup_steps=math.ceil(0.03 * math.ceil(len(rows_msgs) / args.batch_size * args.epochs)),
        max_length=512, packing=False, padding_free=False, completion_only_loss=True, bf16=args.precision == "bf16",
        use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", report_to=[], seed=0,
        eos_token="<end_of_turn>", dataloader_num_workers=0, disable_tqdm=True,
    )
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)

    batch_tokens: list[int] = []
    inner = trainer.data_collator

    def counting_collator(features):
        batch = inner(features)
        batch_tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    step_times: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Timer())
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its log dicts; stdout is our JSON
        trainer.train()
    wall = time.perf_counter() - t
    n = len(step_times)
    toks = batch_tokens[:n]  # the dataloader may prefetch one batch more than it trains on
    timed_t, timed_s = (toks[1:], step_times[1:]) if n > 1 else (toks, step_times)
    return {
        "tokens_per_s": sum(timed_t) / sum(timed_s),
        "steps": n, "timed_steps": len(timed_s), "tokens": sum(toks),
        "step_losses": [round(x, 4) for x in losses],
        "final_train_loss": sum(losses[-2:]) / len(losses[-2:]) if losses else float("nan"),
        "trainset_loss_after": None,  # filled by the caller with the shared function
        "wall_s_incl_setup": wall,
        "_model": trainer.model, "_tok": tok,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--packing", action="store_true", help="pack our side (TRL stays padded)")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--model", default="gemma-3-270m")
    args = p.parse_args()
    if not DATA.exists():
        print(json.dumps({"error": f"{DATA} not found"}))
        return 2
    os.environ.setdefault("SFTFLOW_HOME", str(REPO / ".sftflow"))
    import logging

    logging.getLogger("sftflow.train").addHandler(logging.StreamHandler(sys.stderr))
    logging.getLogger("sftflow.train").setLevel(logging.INFO)
    from sftflow.inference.models import resolve_model

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    base = resolve_model(args.model)
    rows_msgs = load_examples(args.examples)
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    result: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": cores,
                    "load_avg_start": os.getloadavg()[0], "torch": torch.__version__},
        "setup": {"model": args.model, "examples": args.examples, "batch_size": args.batch_size, "epochs": args.epochs,
                  "lora": "r=16 alpha=32 dropout=0.05 all-linear", "max_len": 512, "precision": args.precision,
                  "lr": args.lr, "packing_ours": args.packing},
        "peak_gflops": {"bf16": round(peak_bf16, 1), "fp32": round(peak_fp32, 1)},
    }
    with tempfile.TemporaryDirectory(dir=os.environ["SFTFLOW_HOME"]) as tmp:
        work = Path(tmp)
        ours = run_ours(args, base, rows_msgs, work)
        rows = ours.pop("_rows")
        avg_len = sum(len(r[0]) for r in rows) / len(rows)
        label_frac = sum(sum(1 for x in r[1][1:] if x != -100) for r in rows) / sum(len(r[0]) for r in rows)
        from sftflow.inference.models import load_model

        ref_model, tok = load_model(base)
        result["base_trainset_loss"] = trainset_loss(ref_model, tok, rows, device="cpu")
        fpt = flops_per_token(ref_model, avg_len=avg_len, label_frac=label_frac)
        del ref_model
        result["data"] = {"avg_tokens": round(avg_len, 1), "label_fraction": round(label_frac, 3),
                          "model_gflop_per_token": round(fpt / 1e9, 3)}
        ours["mfu"] = ours["tokens_per_s"] * fpt / (peak_bf16 * 1e9)
        result["ours"] = ours
        if not args.skip_trl:
            trl_res = run_trl(args, base, rows_msgs, work)
            model, ttok = trl_res.pop("_model"), trl_res.pop("_tok")
            trl_res["trainset_loss_after"] = trainset_loss(model, ttok, rows, device="cpu")
            trl_res["mfu"] = trl_res["tokens_per_s"] * fpt / (peak_bf16 * 1e9)
            result["trl"] = trl_res
            result["speedup_tokens_per_s"] = ours["tokens_per_s"] / trl_res["tokens_per_s"]
            result["loss_ours_minus_trl"] = ours["trainset_loss_after"] - trl_res["trainset_loss_after"]
    result["machine"]["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1, default=lambda x: round(x, 4) if isinstance(x, float) else str(x)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

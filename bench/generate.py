"""Benchmark: generation speed against the machine's matmul peak, and one-forward-pass scoring. Prints JSON.

1. **Generation** (``generation`` key; the engine under backtranslation, evaluation and rejection
   sampling): greedy decoding of ``--batch-size`` real prompts x ``--max-new-tokens`` tokens (stop
   ids suppressed until then, so every path decodes the same number of tokens), in one process:

   - ``before``: the former ``generate()``-based path (``decode_reference.reference_generate_batch``);
   - ``after``: ``generation.generate_batch`` (the lean decode loop of ``sftflow.inference.decode``),
     in fp32 and bf16;
   - ``hf_generate_defaults``: transformers ``model.generate`` with the model's generation_config
     defaults (Gemma: sampling with top_k=64, top_p=0.95);
   - ``llama_cpp``: llama.cpp on the model's GGUF, when ``llama_cpp`` (llama-cpp-python) imports;
   - ``levers``: unmerged vs merged LoRA in the decode loop, torch threads.

   ``peak_fraction`` = model FLOPs per generated token x tokens/s / the matmul peak of the dtype
   used, the peak measured in the same run (a big square matmul of that dtype, best of several).
   FLOPs per token = 2 x non-embedding parameters (the body's matmuls) + 2 x hidden x vocab (the
   tied LM head) + attention over the context (4 x heads x head_dim x context, per layer; context =
   mean prompt length + half the new tokens, capped at the sliding window on sliding layers).
   ``greedy_identical`` compares before/after fp32 tokens on the real model. The machine is shared:
   ratios within a run are the meaningful numbers.
2. **Scoring** (``--scoring``): ``score_pairs`` (one forward pass per batch, the rubric's KV cache
   shared) vs generate-then-parse (the original Humpback rubric, one pair at a time).

Run::

    SFTFLOW_HOME=/tmp/x python bench/generate.py --model gemma-3-270m
    SFTFLOW_HOME=/tmp/x python bench/generate.py --model gemma-3-270m --scoring

The models must have been pulled (``sftflow models pull <name>``); inputs are real rows of the
repo's data/ (Alpaca-GPT4 instructions, Wikipedia leads).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The original Humpback rubric ends by asking for reasoning and "Score: <rating>" on the last line;
# the naive scorer has to generate that and parse it.
_NAIVE_TAIL = ('Please first provide a brief reasoning you used to derive the rating score, and then write '
               '"Score: <rating>" in the last line.')
_SCORE_RE = re.compile(r"Score:\s*([1-5])")


def _instructions(n: int) -> list[str]:
    rows = json.loads((REPO / "data" / "instruct" / "alpaca_gpt4_300.json").read_text())
    out = [(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")).strip() for r in rows]
    return out[:n]


def _segments(n: int) -> list[tuple[str, str]]:
    leads = json.loads((REPO / "data" / "unlabeled" / "wikipedia_leads_400.json").read_text())
    pairs = []
    for title, entry in leads.items():
        text = entry["extract"] if isinstance(entry, dict) else str(entry)
        if 30 <= len(text.split()) <= 120:
            pairs.append((f"Tell me about {title}.", text))
        if len(pairs) == n:
            break
    return pairs


def matmul_peak(dtype, *, n: int = 2048, reps: int = 6) -> float:
    """Best GFLOP/s of an n x n x n matmul in ``dtype`` (2 n^3 FLOPs each) over ``reps`` runs."""
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def flops_per_token(model, *, context: float) -> dict:
    """Model FLOPs per generated token (see the module docstring for the formula)."""
    cfg = model.config
    embed = model.get_input_embeddings().weight
    vocab, hidden = embed.shape
    body = sum(p.numel() for n, p in model.named_parameters() if p.data_ptr() != embed.data_ptr() and "embed" not in n)
    window = getattr(cfg, "sliding_window", None) or 10 ** 9
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    attn = sum(4 * cfg.num_attention_heads * head_dim * (min(context, window) if t == "sliding_attention" else context)
               for t in types)
    total = 2 * body + 2 * hidden * vocab + attn
    return {"non_embedding_params": body, "hidden": hidden, "vocab": vocab, "mean_context": round(context, 1),
            "body": 2 * body, "lm_head": 2 * hidden * vocab, "attention": int(attn), "total": int(total),
            "formula": "2*non_embedding_params + 2*hidden*vocab + sum_layers 4*heads*head_dim*context"}


def _timed(fn, *, reps: int):
    """(best seconds, last result) of ``reps`` calls."""
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _llama_cpp(gguf, prompts_text: list[str], *, max_new_tokens: int, threads: int) -> dict:
    """llama.cpp tokens/s on the GGUF (one prompt at a time: the Python binding has no batched generate)."""
    try:
        from llama_cpp import Llama  # type: ignore[import-not-found]
    except ImportError as e:
        return {"note": f"llama-cpp-python is not installed: `pip install llama-cpp-python` builds it from source "
                        f"(no wheel for this platform on the package registry) and did not finish within 5 min "
                        f"on this shared 2-core machine ({type(e).__name__})"}
    if gguf is None:
        return {"note": "no GGUF file for this model"}
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, verbose=False)
    toks, t0 = 0, time.perf_counter()
    for q in prompts_text:
        out = llm(q, max_tokens=max_new_tokens, temperature=0.0)
        toks += out["usage"]["completion_tokens"]
    dt = time.perf_counter() - t0
    return {"gguf": Path(gguf).name, "seconds": round(dt, 2), "new_tokens": toks, "tokens_per_s": round(toks / dt, 2),
            "note": "one prompt at a time, greedy"}


def bench_generation(model, tok, template, *, batch_size: int, max_new_tokens: int, reps: int, gguf=None,
                     lora: bool = True) -> dict:
    """The generation comparison (module docstring, part 1) on ``batch_size`` prompts, one batch."""
    import torch

    from sftflow.inference.decode_reference import reference_generate_batch
    from sftflow.inference.formatting import build_generation_prompt, stop_token_ids
    from sftflow.inference.generation import _left_pad, _pad_id, generate_batch

    questions = _instructions(batch_size)
    prompts = [build_generation_prompt(tok, [{"role": "user", "content": q}], template=template) for q in questions]
    stops = stop_token_ids(tok, template)
    n_tok = batch_size * max_new_tokens
    opts = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, batch_size=batch_size, stop_ids=stops,
                seed=0)
    dtypes = ("float32", "bfloat16")
    peaks = {d: round(matmul_peak(getattr(torch, d)), 1) for d in dtypes}
    context = sum(len(p) for p in prompts) / len(prompts) + max_new_tokens / 2
    flops = flops_per_token(model, context=context)

    def rate(seconds: float) -> dict:
        return {"seconds": round(seconds, 3), "tokens_per_s": round(n_tok / seconds, 2)}

    paths: dict = {}
    outputs: dict = {}
    for dtype in dtypes:
        # One copy of the weights at a time (the machine is shared; memory is tight): converted in place.
        m = model.to(getattr(torch, dtype))
        generate_batch(m, tok, prompts[:2], max_new_tokens=2, batch_size=2, stop_ids=stops)  # warm-up
        t, outputs[f"before_{dtype}"] = _timed(lambda: reference_generate_batch(m, tok, prompts, **opts), reps=reps)
        paths[f"before_{dtype}"] = rate(t)
        t, outputs[f"after_{dtype}"] = _timed(lambda: generate_batch(m, tok, prompts, **opts), reps=reps)
        paths[f"after_{dtype}"] = rate(t)
        # transformers generate() with the model's own generation_config (its defaults).
        ids, mask, _ = _left_pad(prompts, _pad_id(tok, stops), torch.device("cpu"))

        def hf_defaults(m=m, ids=ids, mask=mask):
            with torch.inference_mode():
                torch.manual_seed(0)
                return m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens, pad_token_id=_pad_id(tok, stops))
        t, _ = _timed(hf_defaults, reps=reps)
        paths[f"hf_generate_defaults_{dtype}"] = rate(t)
        for key in (f"before_{dtype}", f"after_{dtype}", f"hf_generate_defaults_{dtype}"):
            tps = paths[key]["tokens_per_s"]
            paths[key]["gflop_per_s"] = round(flops["total"] * tps / 1e9, 1)
            paths[key]["peak_fraction"] = round(flops["total"] * tps / (peaks[dtype] * 1e9), 3)

    best = max(dtypes, key=lambda d: paths[f"after_{d}"]["tokens_per_s"])
    model = model.to(getattr(torch, best))
    levers: dict = {}
    levers["dtype"] = {d: {"matmul_peak_gflop_per_s": peaks[d], "after_tokens_per_s": paths[f"after_{d}"]["tokens_per_s"]}
                       for d in dtypes}
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
        t, _ = _timed(lambda: generate_batch(model, tok, prompts, **opts), reps=1)
        torch.set_num_threads(threads)
        levers["threads"] = {f"{threads}": paths[f"after_{best}"]["tokens_per_s"], "1": round(n_tok / t, 2)}
    if lora:
        levers["lora"] = _lora_lever(model, tok, prompts, opts, reps=reps, n_tok=n_tok)
    before_best = max(paths["before_float32"]["tokens_per_s"], paths["before_bfloat16"]["tokens_per_s"])
    return {
        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "reps": reps, "timing": "best of reps",
        "dtype": best,
        "peak_fraction": paths[f"after_{best}"]["peak_fraction"],
        "matmul_peak_gflop_per_s": peaks,
        "flops_per_token": flops,
        "tokens_per_s": {k: v["tokens_per_s"] for k, v in paths.items()},
        "paths": paths,
        "speedup_after_vs_before_same_dtype": {d: round(paths[f"after_{d}"]["tokens_per_s"]
                                                        / paths[f"before_{d}"]["tokens_per_s"], 2) for d in dtypes},
        "speedup_after_best_vs_before_best": round(paths[f"after_{best}"]["tokens_per_s"] / before_best, 2),
        "speedup_after_vs_hf_generate_defaults": round(paths[f"after_{best}"]["tokens_per_s"]
                                                       / paths[f"hf_generate_defaults_{best}"]["tokens_per_s"], 2),
        "greedy_identical": {d: f"{sum(a == b for a, b in zip(outputs[f'before_{d}'], outputs[f'after_{d}']))}"
                                f"/{batch_size}" for d in dtypes},
        "llama_cpp": _llama_cpp(gguf, questions, max_new_tokens=max_new_tokens, threads=threads),
        "levers": levers,
    }


def _lora_lever(model, tok, prompts, opts, *, reps: int, n_tok: int) -> dict:
    """Tokens/s of the decode loop with an unmerged LoRA adapter (r=16 on every linear) vs merged.
    Runs last: it merges the adapter into ``model`` (the weights change)."""
    from peft import LoraConfig, get_peft_model

    from sftflow.inference.generation import generate_batch

    lm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    t_unmerged, _ = _timed(lambda: generate_batch(lm, tok, prompts, **opts), reps=reps)
    merged = lm.merge_and_unload()
    t_merged, _ = _timed(lambda: generate_batch(merged, tok, prompts, **opts), reps=reps)
    return {"unmerged_tokens_per_s": round(n_tok / t_unmerged, 2), "merged_tokens_per_s": round(n_tok / t_merged, 2),
            "merged_vs_unmerged": round(t_unmerged / t_merged, 2)}


def bench_scoring(model, tok, template, *, n: int, batch_size: int, naive_max_new_tokens: int) -> dict:
    import torch

    from sftflow.inference.formatting import build_generation_prompt, stop_token_ids
    from sftflow.inference.rubric import DEFAULT_RUBRIC, _score_left_padded, rubric_prompt_ids, score_pairs, score_token_ids

    pairs = _segments(n)
    t0 = time.perf_counter()
    scores = score_pairs(model, tok, pairs, template=template, batch_size=batch_size)
    t_fast = time.perf_counter() - t0

    # The same one-forward scoring without the shared rubric cache (full left-padded prompts).
    rows = [rubric_prompt_ids(tok, q, a, template=template) for q, a in pairs]
    t0 = time.perf_counter()
    full = _score_left_padded(model, tok, rows, score_token_ids(tok)[1], batch_size=batch_size)
    t_full = time.perf_counter() - t0
    max_diff = max(abs(a - b) for s, f in zip(scores, full) for a, b in zip(s.probs, f.probs))

    # Naive: generate a reasoning + "Score: n" per pair, one at a time, then parse.
    naive_rubric = DEFAULT_RUBRIC.replace('Answer with the score only, as "Score: <rating>".', _NAIVE_TAIL)
    stops = stop_token_ids(tok, template)
    stop_set = set(stops)
    parsed, unparseable = [], 0
    t0 = time.perf_counter()
    for q, a in pairs:
        ids = build_generation_prompt(tok, [{"role": "user", "content": naive_rubric.format(instruction=q, response=a)}],
                                      template=template)
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=naive_max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        new = out[0, len(ids):].tolist()
        cut = next((k for k, t in enumerate(new) if t in stop_set), len(new))
        m = _SCORE_RE.findall(tok.decode(new[:cut], skip_special_tokens=True))
        if m:
            parsed.append(int(m[-1]))
        else:
            unparseable += 1
    t_naive = time.perf_counter() - t0

    return {
        "pairs": n, "batch_size": batch_size,
        "one_forward_shared_prefix": {"seconds": round(t_fast, 2), "pairs_per_s": round(n / t_fast, 3),
                                      "unparseable": 0,
                                      "mean_expected": round(sum(s.expected for s in scores) / n, 3),
                                      "argmax_histogram": {str(k): sum(s.argmax == k for s in scores) for k in range(1, 6)}},
        "one_forward_full_prompts": {"seconds": round(t_full, 2), "pairs_per_s": round(n / t_full, 3),
                                     "max_prob_diff_vs_shared": round(max_diff, 6)},
        "generate_then_parse": {"seconds": round(t_naive, 2), "pairs_per_s": round(n / t_naive, 3),
                                "max_new_tokens": naive_max_new_tokens, "unparseable": unparseable,
                                "unparseable_rate": round(unparseable / n, 3)},
        "speedup": round(t_naive / t_fast, 2),
        "speedup_without_shared_prefix": round(t_naive / t_full, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="embedded model name or model directory")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=1, help="timed runs per path (the best is kept)")
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA merged/unmerged lever")
    p.add_argument("--scoring", action="store_true", help="also run the scoring benchmark")
    p.add_argument("--pairs", type=int, default=16, help="pairs for the scoring benchmark")
    p.add_argument("--score-batch-size", type=int, default=8)
    p.add_argument("--naive-score-tokens", type=int, default=96, help="token bound of generate-then-parse")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = p.parse_args(argv)

    import torch

    from sftflow.inference.formatting import resolve_template
    from sftflow.inference.models import load_model, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    ref = resolve_model(args.model)
    t0 = time.perf_counter()
    model, tok = load_model(ref, dtype="float32")
    load_s = time.perf_counter() - t0
    template = resolve_template(tok, None)
    ggufs = sorted(Path(ref.path).glob("**/*.gguf")) if getattr(ref, "path", None) else []
    report = {"model": args.model, "template": template, "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "load_seconds": round(load_s, 2)}
    report["generation"] = bench_generation(model, tok, template, batch_size=args.batch_size,
                                            max_new_tokens=args.max_new_tokens, reps=args.reps,
                                            gguf=ggufs[0] if ggufs else None, lora=not args.no_lora)
    print(json.dumps({"partial": report}), file=sys.stderr, flush=True)
    if args.scoring:
        report["scoring"] = bench_scoring(model.float(), tok, template, n=args.pairs, batch_size=args.score_batch_size,
                                          naive_max_new_tokens=args.naive_score_tokens)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

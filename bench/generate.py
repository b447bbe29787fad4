"""Benchmark: batched KV-cache generation and one-forward-pass scoring vs the naive ways. Prints JSON.

Two comparisons, each on the same model, the same inputs and in the same process run (so the
ratios are meaningful on a shared machine even when the absolute numbers are not):

1. **Generation** (what backtranslation does for candidate instructions): ``generate_batch``
   (length-sorted, left-padded batches with the KV cache) vs calling ``model.generate`` one prompt
   at a time. Greedy, so both produce the same tokens; tokens/s counts the new tokens each returns
   up to the stop token. Target: >= 5x.
2. **Scoring** (self-curation): ``score_pairs`` (one forward pass per batch, the rubric's KV cache
   shared, rating read from the logits of "1".."5") vs generate-then-parse (the original Humpback
   rubric: the model writes a brief reasoning then "Score: <n>", one pair at a time, parsed with a
   regex). Target: >= 20x pairs/s. The parse-failure rate of the naive way is reported too.

Run::

    SFTFLOW_HOME=/work/main/.sftflow python bench/generate.py --model smollm2-135m-instruct
    SFTFLOW_HOME=/work/main/.sftflow python bench/generate.py --model gemma-3-270m --prompts 16

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


def bench_generation(model, tok, template, *, n: int, max_new_tokens: int, batch_size: int) -> dict:
    import torch

    from sftflow.inference.formatting import build_generation_prompt, stop_token_ids
    from sftflow.inference.generation import generate_batch

    prompts = [build_generation_prompt(tok, [{"role": "user", "content": q}], template=template) for q in _instructions(n)]
    stops = stop_token_ids(tok, template)

    t0 = time.perf_counter()
    batched = generate_batch(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             stop_ids=stops, seed=0)
    t_batched = time.perf_counter() - t0

    # Naive: model.generate on each prompt alone (KV cache on, no padding, greedy).
    t0 = time.perf_counter()
    naive_tokens, naive_texts = 0, []
    stop_set = set(stops)
    for p in prompts:
        ids = torch.tensor([p])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        new = out[0, len(p):].tolist()
        cut = next((k for k, t in enumerate(new) if t in stop_set), len(new))
        naive_tokens += cut
        naive_texts.append(tok.decode(new[:cut], skip_special_tokens=True))
    t_naive = time.perf_counter() - t0

    batched_tokens = sum(g.num_tokens for g in batched)
    same = sum(g.text == t for g, t in zip(batched, naive_texts))
    return {
        "prompts": n, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "batched": {"seconds": round(t_batched, 2), "new_tokens": batched_tokens,
                    "tokens_per_s": round(batched_tokens / t_batched, 2)},
        "one_at_a_time": {"seconds": round(t_naive, 2), "new_tokens": naive_tokens,
                          "tokens_per_s": round(naive_tokens / t_naive, 2)},
        "speedup": round((batched_tokens / t_batched) / (naive_tokens / t_naive), 2),
        "identical_outputs": f"{same}/{n}",
    }


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


def _warm_up(model, tok, template) -> None:
    """One small call down each path first, so one-time costs (kernel selection, allocator
    growth) are charged to neither side of a comparison."""
    from sftflow.inference.formatting import build_generation_prompt, stop_token_ids
    from sftflow.inference.generation import generate_batch
    from sftflow.inference.rubric import score_pairs

    ids = build_generation_prompt(tok, [{"role": "user", "content": "Hello there."}], template=template)
    generate_batch(model, tok, [ids, ids[1:]], max_new_tokens=2, batch_size=2, stop_ids=stop_token_ids(tok, template),
                   seed=0)
    score_pairs(model, tok, [("Say hi.", "Hi!"), ("Say bye.", "Bye!")], template=template, batch_size=2)
    score_pairs(model, tok, [("Say hi.", "Hi!")], template=template, batch_size=1, share_prefix=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name or model directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=32, help="prompts for the generation benchmark")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pairs", type=int, default=16, help="pairs for the scoring benchmark")
    p.add_argument("--score-batch-size", type=int, default=8)
    p.add_argument("--naive-score-tokens", type=int, default=96, help="token bound of generate-then-parse")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--skip", choices=["generation", "scoring"], default=None)
    args = p.parse_args(argv)

    import torch

    from sftflow.inference.formatting import resolve_template
    from sftflow.inference.models import load_model, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    ref = resolve_model(args.model)
    t0 = time.perf_counter()
    model, tok = load_model(ref, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    template = resolve_template(tok, None)
    report = {"model": args.model, "dtype": args.dtype, "template": template, "torch_threads": torch.get_num_threads(),
              "load_seconds": round(load_s, 2)}
    _warm_up(model, tok, template)
    if args.skip != "generation":
        report["generation"] = bench_generation(model, tok, template, n=args.prompts, max_new_tokens=args.max_new_tokens,
                                                batch_size=args.batch_size)
        print(json.dumps({"partial": report}), file=sys.stderr, flush=True)
    if args.skip != "scoring":
        report["scoring"] = bench_scoring(model, tok, template, n=args.pairs, batch_size=args.score_batch_size,
                                          naive_max_new_tokens=args.naive_score_tokens)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: k=4 samples for 16 prompts (one shared prefill per prompt) vs 16 greedy responses.

Both arms decode exactly ``max_new_tokens`` per row (``min_new_tokens`` = ``max_new_tokens``: no
early stop), so the ratio compares equal lengths. Target (issue 16): ratio <= 2.0. Prints JSON.

The peer runs beside them: plain transformers ``model.generate(do_sample=True, num_return_sequences=k)``
on the same left-padded batch (it expands the batch to 16*k rows before the prefill, so every copy
prefills the prompt again), reported as ``peer_hf_seconds`` and ``sample_k_vs_peer``.

    nice -n 19 .venv/bin/python bench/rejection.py [--max-new-tokens 32] [--k 4] [--prompts 16]

Uses the real ``gemma-3-270m`` when it is under $SFTFLOW_HOME/models, else ``tiny-gemma``.
"""

from __future__ import annotations

import argparse
import json
import time

PROMPTS = [
    "Give three tips for staying healthy.", "What is the capital of Australia?",
    "Explain photosynthesis to a child.", "Write a haiku about autumn.",
    "How do I reverse a list in Python?", "Why is the sky blue?", "Name the planets of the solar system.",
    "What causes earthquakes?", "Suggest a name for a coffee shop.", "Summarise the plot of Hamlet in two sentences.",
    "What is the difference between weather and climate?", "How many legs does a spider have?",
    "Translate 'good morning' into French.", "What is 17 times 23?", "Describe a rainbow.",
    "Give an example of a renewable energy source.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()

    import torch

    from sftflow import layout
    from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids
    from sftflow.inference.generation import generate_batch, sample_k
    from sftflow.inference.models import load_model, resolve_model
    from sftflow.inference.tiny import build_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    name = "gemma-3-270m" if (layout.models_dir() / "gemma-3-270m").exists() else "tiny-gemma"
    ref = resolve_model(name) if name != "tiny-gemma" else build_tiny_model(name)
    model, tok = load_model(ref, dtype="float32")
    template = resolve_template(tok, None)
    qs = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    ids = [build_generation_prompt(tok, [{"role": "user", "content": q}], template=template) for q in qs]
    stops = stop_token_ids(tok, template)
    n, k = args.max_new_tokens, args.k
    kw = dict(max_new_tokens=n, min_new_tokens=n, batch_size=len(ids), stop_ids=stops, seed=0)

    # Warm-up (first-call allocations, kernels), then the timed arms, interleaved twice.
    generate_batch(model, tok, ids[:2], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
    sample_k(model, tok, ids[:2], num_samples=2, temperature=0.8, top_p=0.95,
             **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
    def peer() -> None:
        # transformers' own best-of-k: num_return_sequences copies each prompt before the prefill.
        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else stops[-1]
        inp = torch.tensor([[pad] * (width - len(r)) + list(r) for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(input_ids=inp, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.95,
                                 num_return_sequences=k, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
        assert out.shape == (len(ids) * k, width + n), out.shape

    greedy_s, sample_s, peer_s = [], [], []
    for _ in range(2):
        t = time.perf_counter()
        g = generate_batch(model, tok, ids, **kw)
        greedy_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        s = sample_k(model, tok, ids, num_samples=k, temperature=0.8, top_p=0.95, **kw)
        sample_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        peer()
        peer_s.append(time.perf_counter() - t)
    assert all(x.num_tokens == n for x in g) and all(x.num_tokens == n for row in s for x in row)
    greedy, sampled, peer_best = min(greedy_s), min(sample_s), min(peer_s)
    print(json.dumps({
        "bench": "rejection_sampling", "model": name, "prompts": len(ids), "k": k, "max_new_tokens": n,
        "prompt_tokens_mean": round(sum(map(len, ids)) / len(ids), 1), "torch_threads": torch.get_num_threads(),
        "greedy_seconds": round(greedy, 3), "sample_k_seconds": round(sampled, 3),
        "ratio": round(sampled / greedy, 3), "target_ratio": 2.0, "meets_target": sampled / greedy <= 2.0,
        "peer_hf_seconds": round(peer_best, 3), "peer_ratio_vs_greedy": round(peer_best / greedy, 3),
        "sample_k_vs_peer": round(sampled / peer_best, 3),
        "runs_seconds": {"greedy": [round(x, 3) for x in greedy_s], "sample_k": [round(x, 3) for x in sample_s],
                         "peer_hf": [round(x, 3) for x in peer_s]},
        "greedy_tokens": n * len(ids), "sampled_tokens": n * len(ids) * k,
        "distinct_samples_per_prompt_mean": round(sum(len({x.text for x in row}) for row in s) / len(s), 2),
    }, indent=2))


if __name__ == "__main__":
    main()

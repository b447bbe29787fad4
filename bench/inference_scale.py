"""Benchmark: batch generation and rubric scoring, local engine vs Ray Data actors. Prints JSON.

``sftflow.inference.batch.generate_texts`` / ``score_texts`` over N prompts, first with the local
engine (one model in this process), then on a private local Ray cluster (``--actors`` CPUs, one
actor and one model per CPU). Every row decodes exactly ``--max-new-tokens`` (``min_new_tokens``)
so both arms do the same work; the greedy outputs of the two arms are compared (must be equal).
Ray's times include starting the actors and loading one model per actor.

    nice -n 19 .venv/bin/python bench/inference_scale.py [--prompts 64] [--max-new-tokens 16] [--actors 2]
        [--model tiny-gemma|gemma-3-270m] [--backend hf]

On a GPU cluster, ``--backend auto`` runs vLLM in each actor when it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

WORDS = ("river", "planet", "garden", "engine", "winter", "market", "music", "bridge", "forest", "letter")


def _questions(n: int) -> list[str]:
    """N prompts of varied length (so the length-sorted batching matters)."""
    return [f"Question {i}: tell me about the {' and the '.join(WORDS[: 1 + i % len(WORDS)])}." for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--actors", type=int, default=2, help="CPUs of the local Ray cluster (= actors)")
    ap.add_argument("--model", default="tiny-gemma", help="tiny-gemma, tiny-chatml, or a model name/path")
    ap.add_argument("--backend", default="hf", choices=("auto", "hf", "vllm"))
    args = ap.parse_args()

    from sftflow.config_sections import ExecutionConfig
    from sftflow.inference.batch import ModelHandle, generate_texts, score_texts
    from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids
    from sftflow.inference.models import resolve_model
    from sftflow.inference.tiny import TINY_MODELS, build_tiny_model
    from sftflow import engine as engines

    ref = build_tiny_model(args.model) if args.model in TINY_MODELS else resolve_model(args.model)
    questions = _questions(args.prompts)
    handle = ModelHandle(ref, dtype="float32")
    tok = handle.tokenizer
    template = resolve_template(tok, None)
    prompts = [build_generation_prompt(tok, [{"role": "user", "content": q}], template=template) for q in questions]
    gen_kw = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                  batch_size=args.batch_size, stop_ids=stop_token_ids(tok, template), seed=0)
    pairs = [(q, "An answer about " + q.split("about the ", 1)[-1]) for q in questions]

    result: dict[str, object] = {"model": args.model, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                                 "batch_size": args.batch_size, "backend": args.backend,
                                 "machine_cpus": os.cpu_count()}
    t0 = time.perf_counter()
    local = generate_texts(handle, prompts, engine=engines.LocalEngine(), backend=args.backend, **gen_kw)
    t1 = time.perf_counter()
    score_texts(handle, pairs, template=None, batch_size=args.batch_size, engine=engines.LocalEngine())
    t2 = time.perf_counter()
    handle.close()
    result.update(local_generate_seconds=round(t1 - t0, 3), local_generate_rows_per_s=round(len(prompts) / (t1 - t0), 2),
                  local_score_seconds=round(t2 - t1, 3), local_score_rows_per_s=round(len(pairs) / (t2 - t1), 2))

    with engines.engine_session(ExecutionConfig(engine="ray", num_cpus=args.actors,
                                                generation_backend=args.backend)) as engine:
        t0 = time.perf_counter()
        on_ray = generate_texts(ref, prompts, dtype="float32", engine=engine, **gen_kw)
        t1 = time.perf_counter()
        score_texts(ref, pairs, template=None, batch_size=args.batch_size, dtype="float32", engine=engine)
        t2 = time.perf_counter()
    result.update(ray_actors=args.actors, ray_generate_seconds=round(t1 - t0, 3),
                  ray_generate_rows_per_s=round(len(prompts) / (t1 - t0), 2),
                  ray_score_seconds=round(t2 - t1, 3), ray_score_rows_per_s=round(len(pairs) / (t2 - t1), 2),
                  greedy_outputs_equal=on_ray == local)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

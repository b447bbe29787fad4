"""vLLM as the generation engine (``execution.generation_backend: vllm``, or ``auto`` on a CUDA machine).

Same contract as ``sftflow.inference.generation.generate_batch``: token-id prompts in, one
``Generated(text, num_tokens, finished)`` per prompt out, in input order, with the same sampling
semantics:

* greedy when ``temperature == 0``; otherwise temperature + nucleus (``top_p``) with top-k off and
  repetition penalty 1 (``generate_batch`` overrides the model's generation_config the same way);
* generation ends at the first of ``stop_ids`` only (``ignore_eos``: the HF path passes
  ``eos_token_id=stop_ids``, so a model's own eos that is not a stop id does not end it either);
* the text is decoded by THIS module with the HF tokenizer, from the new tokens up to (not
  including) the first stop id, ``skip_special_tokens=True``: exactly ``generate_batch``'s decoding,
  whatever vLLM's detokenizer would do; ``finished`` is True when a stop id ended the row (vLLM's
  ``finish_reason == "stop"``), False when it ran into ``max_new_tokens``.

Sampling is seeded per row (``seed + row index``), so a row's sample does not depend on which other
rows share its batch or its actor. Samples are not the HF path's samples (another RNG), greedy
outputs agree up to kernel numerics. k samples per prompt (``num_samples``, rejection sampling) are
one request with ``SamplingParams(n=k)``: vLLM prefills the prompt once and forks its KV cache for
the k sequences (as ``sample_k`` does on transformers); a greedy request asks for one sequence and
repeats it k times (the k greedy samples are identical, as ``sample_k``'s are).

The rubric scorer (``score_pairs``) stays on transformers: it reads the probabilities of the five
digit tokens at one position, and vLLM's ``logprobs`` only returns the top-k tokens of the
*sampled* position, so the digits' mass (``Score.mass``) would be lost whenever a digit falls out of
the top k. Nothing here imports vLLM at import time; it is imported when an engine is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from sftflow.data.refs import ModelRef
from sftflow.inference.generation import Generated

# Share of GPU memory vLLM may take for weights + KV cache. Below vLLM's 0.9 default because an
# HF model of the same stage can sit on the same GPU (evaluation's loss pass, a judge).
GPU_MEMORY_UTILIZATION = 0.6


def sampling_kwargs(
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int],
    seed: int | None = None,
    min_new_tokens: int = 0,
    num_samples: int = 1,
) -> dict[str, Any]:
    """The ``vllm.SamplingParams`` keyword arguments that match ``generate_batch``'s settings.

    Args:
        max_new_tokens: bound on new tokens (``max_tokens``).
        temperature: 0 is greedy (vLLM treats 0 as greedy and ignores top_p); > 0 samples.
        top_p: nucleus mass (sampling only; 1.0 when greedy).
        stop_ids: token ids that end a row (``stop_token_ids``; ``ignore_eos`` when non-empty).
        seed: per-request sampling seed (None when greedy: nothing is random).
        min_new_tokens: stop ids are suppressed before this many tokens (``min_tokens``).
        num_samples: sequences per prompt (``n``); greedy asks for one (the caller repeats it).

    Returns:
        A dict for ``SamplingParams(**kwargs)``.

    Raises:
        ValueError: non-positive ``max_new_tokens`` or ``num_samples``, a negative temperature, or
            ``top_p`` outside (0, 1].
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0 (got {max_new_tokens})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
    sample = temperature > 0
    stops = [int(s) for s in stop_ids]
    return {
        "max_tokens": int(max_new_tokens),
        "min_tokens": int(min_new_tokens),
        "temperature": float(temperature) if sample else 0.0,
        "top_p": float(top_p) if sample else 1.0,
        "top_k": -1,  # off, as in generate_batch (top_k=0 there), whatever generation_config says
        "repetition_penalty": 1.0,
        "stop_token_ids": stops,
        # HF stops on eos_token_id=stop_ids only; without stop ids it falls back to the model's eos.
        "ignore_eos": bool(stops),
        "seed": int(seed) if sample and seed is not None else None,
        "skip_special_tokens": True,
        # Greedy sequences are all the same: one is decoded and repeated (some vLLM versions refuse n > 1 greedy).
        "n": int(num_samples) if sample else 1,
    }


def cut_at_stop(token_ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """``(content, finished)``: the tokens before the first stop id, and whether one was found."""
    stop_set = {int(s) for s in stop_ids}
    toks = [int(t) for t in token_ids]
    cut = next((k for k, t in enumerate(toks) if t in stop_set), None)
    return (toks if cut is None else toks[:cut]), cut is not None


def engine_kwargs(ref: ModelRef, *, dtype: str | None, trust_remote_code: bool) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments for a ``ModelRef`` (an adapter serves its base with LoRA on).

    Args:
        ref: the model (``kind == "adapter"``: ``base`` is the model, the adapter a LoRA request).
        dtype: ``float32``/``bfloat16``/``float16``/``auto`` (None: float32, as ``load_model``).
        trust_remote_code: passed to vLLM.
    """
    path = Path(ref.path)
    base = Path(ref.base) if ref.kind == "adapter" else path
    tok_dir = path if (path / "tokenizer_config.json").exists() else base
    kwargs: dict[str, Any] = {"model": str(base), "tokenizer": str(tok_dir), "dtype": dtype or "float32",
                              "trust_remote_code": bool(trust_remote_code),
                              "gpu_memory_utilization": GPU_MEMORY_UTILIZATION, "seed": 0}
    if ref.kind == "adapter":
        cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        kwargs.update(enable_lora=True, max_lora_rank=max(8, int(cfg.get("r", 8))))
    return kwargs


_engines: dict[tuple[str, str, str | None], Any] = {}


def _engine(ref: ModelRef, *, dtype: str | None, trust_remote_code: bool) -> Any:
    """One ``vllm.LLM`` per (model, dtype), kept until ``release()`` (building one takes seconds to minutes)."""
    key = (ref.path, ref.sha256, dtype)
    llm = _engines.get(key)
    if llm is None:
        release()  # one engine at a time: each reserves a share of the GPU
        from vllm import LLM

        llm = _engines[key] = LLM(**engine_kwargs(ref, dtype=dtype, trust_remote_code=trust_remote_code))
    return llm


def release() -> None:
    """Drop the cached vLLM engine (its GPU memory returns when the object is collected)."""
    _engines.clear()
    from sftflow.inference.models import release_memory

    release_memory()


def generate(
    ref: ModelRef,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    rows: Sequence[int] | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int],
    seed: int = 0,
    min_new_tokens: int = 0,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    num_samples: int | None = None,
) -> list[Generated] | list[list[Generated]]:
    """Generate with vLLM; same contract as ``generate_batch`` (``sample_k`` with ``num_samples``).

    Args:
        ref: the model.
        tokenizer: its HF tokenizer (decodes the new tokens exactly as ``generate_batch`` does).
        prompts: token ids of each prompt (non-empty).
        rows: each prompt's row index in the whole job (its sampling seed is ``seed + row``;
            default ``range(len(prompts))``), so a row's sample does not depend on how rows are split.
        max_new_tokens: bound on new tokens per prompt.
        temperature: 0 greedy; > 0 sampling.
        top_p: nucleus mass (sampling only).
        stop_ids: token ids that end a generation.
        seed: base sampling seed.
        min_new_tokens: stop ids are suppressed before this many new tokens.
        dtype: weights dtype for vLLM.
        trust_remote_code: passed to vLLM.
        num_samples: k sequences per prompt (``SamplingParams(n=k)``); None: one, returned unwrapped.

    Returns:
        One ``Generated`` per prompt, in input order; with ``num_samples``, a list of k per prompt.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if not prompts:
        return []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token id")
    rows = list(range(len(prompts))) if rows is None else [int(r) for r in rows]
    k = 1 if num_samples is None else int(num_samples)
    params = [SamplingParams(**sampling_kwargs(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                               stop_ids=stop_ids, seed=seed + r, min_new_tokens=min_new_tokens,
                                               num_samples=k))
              for r in rows]
    llm = _engine(ref, dtype=dtype, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {}
    if ref.kind == "adapter":
        from vllm.lora.request import LoRARequest

        kwargs["lora_request"] = LoRARequest("adapter", 1, str(ref.path))
    outs = llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts], params,
                        use_tqdm=False, **kwargs)
    results: list[Any] = []
    for out in outs:  # vLLM returns the outputs in prompt order
        seqs = []
        for seq in out.outputs:  # n sequences (sampled), or one greedy sequence
            content, finished = cut_at_stop(seq.token_ids, stop_ids)
            seqs.append(Generated(text=tokenizer.decode(content, skip_special_tokens=True),
                                  num_tokens=len(content), finished=finished))
        if num_samples is None:
            results.append(seqs[0])
        elif temperature > 0:
            if len(seqs) != k:
                raise RuntimeError(f"vLLM returned {len(seqs)} sequences for a prompt, {k} were requested (n={k})")
            results.append(seqs)
        else:
            results.append([seqs[0]] * k)  # greedy: the k samples are the one greedy sequence
    return results


__all__ = ["GPU_MEMORY_UTILIZATION", "cut_at_stop", "engine_kwargs", "generate", "release", "sampling_kwargs"]

"""The lean decode loop (``sftflow.inference.decode``) against the ``model.generate`` reference path.

Greedy output must be token-identical in fp32, seeded sampling must draw the same tokens, on the
tiny random models (Gemma 3 and Llama architectures), with left padding, per-row stopping,
``min_new_tokens`` and sample_k's shared prefill; a LoRA-wrapped (peft) model decodes the same way.
The real-model check (gemma-3-270m) is in ``bench/generate.py`` (key ``greedy_identical``).
"""

from __future__ import annotations

import math

import pytest
import torch

from sftflow.inference.decode_reference import reference_generate_batch, reference_sample_k
from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids
from sftflow.inference.generation import generate_batch, hf_sample, nucleus_logits, sample_k
from sftflow.inference.models import load_model
from sftflow.inference.tiny import build_tiny_model

QUESTIONS = [
    "What is the capital of France?",
    "hi",
    "Write a short poem about the sea, the sky and the river, in the style of a sailor.",
    "Explain why the sky is blue.",
    "List the planets.",
]


@pytest.fixture(scope="module", params=["tiny-gemma", "tiny-chatml"])
def tiny(request, tiny_models_home):
    """(model, tokenizer, prompts, stop ids) of a tiny random model; the stop ids include a token
    that greedy decoding of some rows emits mid-way, so rows stop at different steps."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SFTFLOW_HOME", str(tiny_models_home))
    try:
        model, tok = load_model(build_tiny_model(request.param), dtype="float32")
    finally:
        mp.undo()
    template = resolve_template(tok, None)
    prompts = [build_generation_prompt(tok, [{"role": "user", "content": q}], template=template) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1, "prompts must differ in length so left padding happens"
    stops = list(stop_token_ids(tok, template))
    # A token the model really emits for the first prompt but never for another one becomes a stop
    # id, so some rows stop mid-way and others run to the end.
    # (Sampled at temperature 1.3: tiny-chatml's greedy output is the same token for every row.)
    probe = reference_generate_batch(model, tok, prompts, max_new_tokens=10, batch_size=2, stop_ids=[], seed=5,
                                     temperature=1.3)
    emitted = [set(tok(g.text, add_special_tokens=False)["input_ids"]) for g in probe]
    pick = next((t for t in sorted(emitted[0]) if any(t not in e for e in emitted[1:])), None)
    if pick is not None:
        stops.append(int(pick))
    return model, tok, prompts, stops


def test_greedy_token_identical_to_generate(tiny):
    model, tok, prompts, stops = tiny
    for bs in (1, 2, 5):
        ref = reference_generate_batch(model, tok, prompts, max_new_tokens=12, batch_size=bs, stop_ids=stops, seed=0)
        new = generate_batch(model, tok, prompts, max_new_tokens=12, batch_size=bs, stop_ids=stops, seed=0)
        assert new == ref, f"batch_size={bs}"


def test_min_new_tokens_and_no_stops_match_generate(tiny):
    model, tok, prompts, stops = tiny
    ref = reference_generate_batch(model, tok, prompts, max_new_tokens=8, batch_size=3, stop_ids=stops, seed=0,
                                   min_new_tokens=8)
    new = generate_batch(model, tok, prompts, max_new_tokens=8, batch_size=3, stop_ids=stops, seed=0, min_new_tokens=8)
    assert new == ref
    assert all(g.num_tokens == 8 for g in new)
    ref = reference_generate_batch(model, tok, prompts, max_new_tokens=6, batch_size=5, stop_ids=[], seed=0)
    assert generate_batch(model, tok, prompts, max_new_tokens=6, batch_size=5, stop_ids=[], seed=0) == ref


def test_sampling_draws_the_same_tokens_as_generate(tiny):
    """Same seed, same draws: generate_batch samples exactly as generate(do_sample, top_k=0) did."""
    model, tok, prompts, stops = tiny
    for temperature, top_p in ((0.7, 0.9), (1.3, 1.0)):
        ref = reference_generate_batch(model, tok, prompts, max_new_tokens=10, batch_size=2, stop_ids=stops, seed=5,
                                       temperature=temperature, top_p=top_p)
        new = generate_batch(model, tok, prompts, max_new_tokens=10, batch_size=2, stop_ids=stops, seed=5,
                             temperature=temperature, top_p=top_p)
        assert new == ref, (temperature, top_p)
    assert any(g.finished for g in ref) and not all(g.finished for g in ref), \
        "the probe stop id should stop some rows and not others (per-row stopping)"
    other = generate_batch(model, tok, prompts, max_new_tokens=10, batch_size=2, stop_ids=stops, seed=6,
                           temperature=1.3, top_p=1.0)
    assert other != new, "another seed must draw other tokens (else the comparison above proves nothing)"


def test_sample_k_matches_generate_path(tiny):
    """sample_k (shared prefill, nucleus_sample): greedy and seeded samples equal the generate path's."""
    model, tok, prompts, stops = tiny
    for temperature in (0.0, 0.8):
        ref = reference_sample_k(model, tok, prompts, num_samples=3, max_new_tokens=9, batch_size=2, stop_ids=stops,
                                 seed=1, temperature=temperature, top_p=0.9)
        new = sample_k(model, tok, prompts, num_samples=3, max_new_tokens=9, batch_size=2, stop_ids=stops, seed=1,
                       temperature=temperature, top_p=0.9)
        assert new == ref, temperature
    greedy = generate_batch(model, tok, prompts, max_new_tokens=9, batch_size=2, stop_ids=stops, seed=0)
    assert sample_k(model, tok, prompts, num_samples=2, max_new_tokens=9, batch_size=2, stop_ids=stops,
                    temperature=0.0) == [[g, g] for g in greedy]


def test_lora_wrapped_model_decodes_like_generate(tiny):
    """A peft model (unmerged LoRA, the cache keyword found on the base model) decodes identically."""
    from peft import LoraConfig, get_peft_model

    model, tok, prompts, stops = tiny
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    try:
        ref = reference_generate_batch(lora, tok, prompts, max_new_tokens=8, batch_size=5, stop_ids=stops, seed=0)
        assert generate_batch(lora, tok, prompts, max_new_tokens=8, batch_size=5, stop_ids=stops, seed=0) == ref
    finally:
        lora.unload()  # gives the module-scoped base model back without the adapter


def test_hf_sample_distribution_is_the_nucleus():
    """hf_sample on a fixed small distribution: chi-square against the exact nucleus probabilities."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.7]])
    target = torch.softmax(nucleus_logits(logits, temperature=0.8, top_p=0.9), dim=-1)[0]
    n = 20000
    draws = hf_sample(logits.expand(n, -1).clone(), temperature=0.8, top_p=0.9)
    counts = torch.bincount(draws, minlength=logits.shape[1]).double()
    assert counts[target == 0].sum() == 0, "a token outside the nucleus was drawn"
    kept = target > 0
    expected = target[kept].double() * n
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    # p = 0.001 critical value, Wilson-Hilferty approximation.
    crit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < crit, (chi2, crit, counts.tolist(), expected.tolist())

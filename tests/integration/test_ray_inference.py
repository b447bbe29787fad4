"""Generation and rubric scoring over Ray Data actors (2 CPUs, 2 actors) give what the local engine gives.

``execution.engine=ray`` starts a private local Ray cluster with 2 CPUs; ``generate_texts`` and
``score_texts`` then send the length-sorted inference batches to two actors, each loading the tiny
model once. Greedy AND seeded sampled generations must be identical to the local engine's (each
batch runs with the same rows and seed), and scores equal up to float rounding.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")

from sftflow.config_sections import ExecutionConfig  # noqa: E402
from sftflow.inference import batch as batch_inference  # noqa: E402
from sftflow.inference.batch_ray import actor_plan  # noqa: E402
from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids  # noqa: E402
from sftflow.inference.generation import generate_batch  # noqa: E402
from sftflow.inference.models import load_for_inference  # noqa: E402
from sftflow.inference.tiny import build_tiny_model  # noqa: E402
from sftflow.inference.rubric import score_pairs  # noqa: E402
from sftflow import engine as engines  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

QUESTIONS = [
    "What is the capital of France?", "hi", "Explain why the sky is blue.", "List the planets.",
    "Write a short poem about the sea, the sky and the river, in the style of a sailor.",
    "What is 2 + 2?", "Name three colours.", "Translate 'good morning' into French, please.",
    "Why do cats purr?", "Give me a word that rhymes with moon.",
]


def test_ray_data_generation_and_scoring_equal_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    ref = build_tiny_model("tiny-chatml")
    model, tok = load_for_inference(ref, dtype="float32")
    template = resolve_template(tok, None)
    prompts = [build_generation_prompt(tok, [{"role": "user", "content": q}], template=template) for q in QUESTIONS]
    stops = stop_token_ids(tok, template)
    greedy_kw = dict(max_new_tokens=12, batch_size=3, stop_ids=stops, seed=0)
    sampled_kw = dict(max_new_tokens=12, batch_size=3, stop_ids=stops, seed=5, temperature=0.8, top_p=0.9)
    # The local engine is exactly the in-process functions, one model, all rows.
    direct = generate_batch(model, tok, prompts, **greedy_kw)
    direct_sampled = generate_batch(model, tok, prompts, **sampled_kw)
    pairs = [(q, g.text or "an answer") for q, g in zip(QUESTIONS, direct)]
    direct_scores = score_pairs(model, tok, pairs, template=template, batch_size=3)
    assert batch_inference.generate_texts(ref, prompts, **greedy_kw, engine=engines.LocalEngine()) == direct

    engine = engines.activate(ExecutionConfig(engine="ray", num_cpus=2, generation_backend="hf"))
    try:
        assert isinstance(engine, engines.RayEngine) and int(ray.cluster_resources()["CPU"]) == 2
        assert actor_plan(ray.cluster_resources(), batches=4)["actors"] == 2
        seen: list[tuple[int, int]] = []
        on_ray = batch_inference.generate_texts(ref, prompts, **greedy_kw, on_progress=lambda d, t: seen.append((d, t)))
        on_ray_sampled = batch_inference.generate_texts(ref, prompts, **sampled_kw)
        ray_scores = batch_inference.score_texts(ref, pairs, template=None, batch_size=3)
    finally:
        engines.release()
    assert not ray.is_initialized()

    assert on_ray == direct
    assert on_ray_sampled == direct_sampled and on_ray_sampled != direct
    assert seen[-1] == (len(prompts), len(prompts)) and len(seen) == 4  # 10 rows in batches of 3
    assert len(ray_scores) == len(direct_scores)
    for got, want in zip(ray_scores, direct_scores):
        assert got.argmax == want.argmax
        assert math.isclose(got.expected, want.expected, rel_tol=0, abs_tol=1e-5)
        assert math.isclose(got.mass, want.mass, rel_tol=1e-5, abs_tol=1e-7)
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(got.probs, want.probs))


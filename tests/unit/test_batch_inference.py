"""Batch inference (``sftflow.inference.batch``) on the local engine, the backend choice, and the vLLM mapping.

The local engine must be exactly the in-process ``generate_batch`` / ``score_pairs`` (the default
path is unchanged); the vLLM backend cannot run here (no CUDA), so its pure parts are checked:
the SamplingParams mapping, the stop cut, the engine arguments, and when ``auto`` picks it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftflow.config_sections import ExecutionConfig
from sftflow.data.refs import ModelRef
from sftflow.inference import batch as batch_inference
from sftflow.inference import vllm_backend
from sftflow.inference.batch import ModelHandle, choose_backend, generate_texts, score_texts
from sftflow.inference.batch_ray import actor_plan
from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids
from sftflow.inference.generation import generate_batch
from sftflow.inference.rubric import score_pairs
from sftflow.inference.models import load_for_inference, load_model
from sftflow.inference.tiny import build_tiny_model
from sftflow.engine import LocalEngine, engine_session

QUESTIONS = ["What is the capital of France?", "hi", "Explain why the sky is blue.", "List the planets.",
             "Write a short poem about the sea, the sky and the river, in the style of a sailor."]


@pytest.fixture(scope="module", params=["tiny-gemma", "tiny-chatml"])
def tiny(request, tiny_models_home):
    """(ref, model, tokenizer, template, prompts) of a tiny random model, built once per module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SFTFLOW_HOME", str(tiny_models_home))
    try:
        ref = build_tiny_model(request.param)
        model, tok = load_for_inference(ref, dtype="float32")
    finally:
        mp.undo()
    template = resolve_template(tok, None)
    prompts = [build_generation_prompt(tok, [{"role": "user", "content": q}], template=template) for q in QUESTIONS]
    return ref, model, tok, template, prompts


def test_local_generation_is_generate_batch(tiny):
    ref, model, tok, template, prompts = tiny
    stops = stop_token_ids(tok, template)
    for kw in (dict(max_new_tokens=10, batch_size=2, stop_ids=stops, seed=0),
               dict(max_new_tokens=10, batch_size=2, stop_ids=stops, seed=3, temperature=0.9, top_p=0.8)):
        want = generate_batch(model, tok, prompts, **kw)
        # From a ref (loaded here, freed after), and from a handle holding the caller's model.
        assert generate_texts(ref, prompts, dtype="float32", engine=LocalEngine(), **kw) == want
        handle = ModelHandle(ref, loaded=(model, tok))
        seen: list[tuple[int, int]] = []
        assert generate_texts(handle, prompts, engine=LocalEngine(), on_progress=lambda d, t: seen.append((d, t)),
                              **kw) == want
        assert seen == [(2, 5), (4, 5), (5, 5)]
        handle.close()
        assert handle.model_and_tokenizer()[0] is model  # a caller's model is the caller's to free


def test_local_scoring_is_score_pairs(tiny):
    ref, model, tok, template, _ = tiny
    pairs = [(q, f"answer {i}") for i, q in enumerate(QUESTIONS)]
    want = score_pairs(model, tok, pairs, template=template, batch_size=2)
    assert score_texts(ref, pairs, template=None, batch_size=2, dtype="float32", engine=LocalEngine()) == want
    assert score_texts(ModelHandle(ref, loaded=(model, tok)), pairs, template=template, batch_size=2,
                       engine=LocalEngine()) == want
    assert score_texts(ref, [], template=None, batch_size=2) == []


def test_handle_loads_once_on_the_local_engine(tiny, tiny_models_home, monkeypatch):
    ref, *_ = tiny
    calls = []
    real = batch_inference._load

    def counting(*args, **kwargs):
        calls.append(kwargs.get("merge_adapter"))
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_inference, "_load", counting)
    handle = ModelHandle(ref, dtype="float32", merge_adapter=False)
    tok = handle.tokenizer  # the local engine loads the model together with its tokenizer
    lm, tok2 = handle.model_and_tokenizer()
    assert tok is tok2 and calls == [False] and not hasattr(lm, "merge_and_unload")
    handle.close()
    assert handle._model is None


def test_bad_inputs_name_the_problem(tiny):
    ref, *_ = tiny
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_texts(ref, [[1, 2], []], max_new_tokens=4, batch_size=2, stop_ids=[], engine=LocalEngine())
    with pytest.raises(ValueError, match="batch_size"):
        generate_texts(ref, [[1, 2]], max_new_tokens=4, batch_size=0, stop_ids=[], engine=LocalEngine())
    with pytest.raises(ValueError, match="batch_size"):
        score_texts(ref, [("q", "a")], template=None, batch_size=0, engine=LocalEngine())
    assert generate_texts(ref, [], max_new_tokens=4, batch_size=2, stop_ids=[], engine=LocalEngine()) == []


# --------------------------------------------------------------------------- backend choice
def test_backend_choice():
    assert choose_backend("auto", cuda=True, vllm=True) == "vllm"
    assert choose_backend("auto", cuda=True, vllm=False) == "hf"
    assert choose_backend("auto", cuda=False, vllm=True) == "hf"
    assert choose_backend("hf", cuda=True, vllm=True) == "hf"
    assert choose_backend("vllm", cuda=True, vllm=True) == "vllm"
    with pytest.raises(RuntimeError, match="needs a CUDA device where the model runs"):
        choose_backend("vllm", cuda=False, vllm=True)
    with pytest.raises(RuntimeError, match=r"needs a CUDA device and the vllm package"):
        choose_backend("vllm", cuda=False, vllm=False)
    with pytest.raises(ValueError, match="generation_backend"):
        choose_backend("tgi", cuda=True, vllm=True)


def test_this_machine_resolves_to_hf_and_vllm_is_refused(tiny):
    """No CUDA here: auto is hf, and an explicit vllm fails with the reason before any model loads."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: auto may pick vllm")
    ref, _, tok, template, prompts = tiny
    assert batch_inference.resolve_backend("auto") == "hf"
    with pytest.raises(RuntimeError, match="generation_backend=vllm needs a CUDA device"):
        generate_texts(ref, prompts, max_new_tokens=4, batch_size=2, stop_ids=[], engine=LocalEngine(),
                       backend="vllm")


def test_execution_config_carries_the_backend_to_the_engine():
    assert ExecutionConfig().generation_backend == "auto"
    with pytest.raises(ValueError, match="generation_backend"):
        ExecutionConfig(generation_backend="tgi")
    with engine_session(ExecutionConfig(generation_backend="hf")) as eng:
        assert eng.generation_backend == "hf"


def test_actor_plan():
    assert actor_plan({"CPU": 2.0}, batches=4) == {"actors": 2, "num_cpus": 1, "num_gpus": 0}
    assert actor_plan({"CPU": 8.0}, batches=3) == {"actors": 3, "num_cpus": 2, "num_gpus": 0}
    assert actor_plan({"CPU": 16.0, "GPU": 4.0}, batches=10) == {"actors": 4, "num_cpus": 1, "num_gpus": 1}
    assert actor_plan({"CPU": 16.0, "GPU": 4.0}, batches=2)["actors"] == 2


# --------------------------------------------------------------------------- vLLM mapping
def test_sampling_kwargs_greedy_and_sampled():
    greedy = vllm_backend.sampling_kwargs(max_new_tokens=32, temperature=0.0, top_p=0.5, stop_ids=[7, 9], seed=3)
    assert greedy == {"max_tokens": 32, "min_tokens": 0, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                      "repetition_penalty": 1.0, "stop_token_ids": [7, 9], "ignore_eos": True, "seed": None,
                      "skip_special_tokens": True, "n": 1}
    sampled = vllm_backend.sampling_kwargs(max_new_tokens=8, temperature=0.7, top_p=0.9, stop_ids=[], seed=11,
                                           min_new_tokens=8)
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9 and sampled["seed"] == 11
    assert sampled["min_tokens"] == 8 and sampled["ignore_eos"] is False  # no stop ids: the model's eos ends it
    for bad, match in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                       (dict(top_p=0.0), "top_p")):
        kw = dict(max_new_tokens=4, temperature=1.0, top_p=1.0, stop_ids=[1]) | bad
        with pytest.raises(ValueError, match=match):
            vllm_backend.sampling_kwargs(**kw)


def test_stop_cut_matches_generate_batch(tiny):
    """The vLLM backend decodes its tokens the way generate_batch does: up to the first stop id."""
    _, model, tok, template, prompts = tiny
    out = generate_batch(model, tok, prompts[:1], max_new_tokens=8, batch_size=1, stop_ids=[], seed=0)[0]
    raw = tok.encode(out.text, add_special_tokens=False) if out.text else [5, 6, 7]
    stop = raw[len(raw) // 2]
    content, finished = vllm_backend.cut_at_stop(raw + [stop], [stop])
    assert finished and content == raw[: raw.index(stop)]
    assert vllm_backend.cut_at_stop([1, 2, 3], [9]) == ([1, 2, 3], False)


def test_engine_kwargs_for_base_and_adapter(tmp_path: Path):
    base = ModelRef(path=str(tmp_path / "base"), sha256="x")
    kw = vllm_backend.engine_kwargs(base, dtype="bfloat16", trust_remote_code=False)
    assert kw["model"] == kw["tokenizer"] == str(tmp_path / "base") and kw["dtype"] == "bfloat16"
    assert "enable_lora" not in kw and 0 < kw["gpu_memory_utilization"] < 1
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"r": 32}))
    (adapter_dir / "tokenizer_config.json").write_text("{}")
    adapter = ModelRef(path=str(adapter_dir), sha256="y", kind="adapter", base=str(tmp_path / "base"))
    kw = vllm_backend.engine_kwargs(adapter, dtype=None, trust_remote_code=True)
    assert kw["model"] == str(tmp_path / "base") and kw["tokenizer"] == str(adapter_dir)
    assert kw["enable_lora"] is True and kw["max_lora_rank"] == 32 and kw["dtype"] == "float32"


def test_vllm_is_not_imported_by_the_modules():
    import sys

    assert "vllm" not in sys.modules


def test_load_tokenizer_is_load_models_tokenizer(tiny, tiny_models_home, monkeypatch):
    ref, _, tok, _, _ = tiny
    alone = batch_inference.load_tokenizer(ref)
    _, with_model = load_model(ref)
    assert alone.encode("Score: 3 hello") == with_model.encode("Score: 3 hello") == tok.encode("Score: 3 hello")
    assert alone.pad_token_id == with_model.pad_token_id

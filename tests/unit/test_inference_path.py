"""One inference path and one scorer resolver (issue 21, item 1).

* every generation and scoring in every stage goes through ``sftflow.inference.batch`` (a static
  check over the source), and rejection sampling on a real local Ray cluster keeps the same samples
  as in this process;
* ``sftflow.inference.judges.resolve_scorer`` decides the scorer of curation, rejection and
  evaluation: a judge that cannot be loaded is an error naming the config key and the path, never
  the model under test; the judge's content is in the evaluation's keys and in the gate's evidence.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config_sections import EvaluationConfig, PromotionConfig, RejectionSamplingConfig, TrainingConfig
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import ModelRef, write_parquet
from sftflow.errors import UserError
from sftflow.inference.judges import ScorerUnavailable, resolve_scorer, scorer_digest
from sftflow.inference.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- one inference path
# The primitives only the batch inference API (and the backends it dispatches to) may call.
PRIMITIVES = frozenset({"generate_batch", "score_pairs", "sample_k", "token_logprobs"})
# Where they are defined, dispatched to, or where transformers/vLLM ``.generate`` is driven.
ALLOWED = frozenset({"sftflow/inference/batch.py", "sftflow/inference/batch_ray.py",
                     "sftflow/inference/generation.py", "sftflow/inference/rubric.py",
                     "sftflow/inference/loglik.py", "sftflow/inference/vllm_backend.py",
                     # The transformers-generate() reference the lean decode loop is checked against (tests,
                     # bench/generate.py); no product module may use it (test below).
                     "sftflow/inference/decode_reference.py"})


GENERATION = "sftflow.inference.generation"
PRIMITIVE_MODULES = frozenset({GENERATION, "sftflow.inference.rubric", "sftflow.inference.loglik"})


def bypasses(source: str) -> list[str]:
    """Lines of ``source`` that reach an inference primitive directly, or drive ``<model>.generate(...)``.

    A primitive is reached by importing it from one of ``PRIMITIVE_MODULES`` (then calling it),
    or by calling it as an attribute (``generation.sample_k(...)``). A module's own function that
    happens to share a name (a wrapper of ``score_texts`` called ``score_pairs``) is not a bypass.
    """
    tree = ast.parse(source)
    hits, imported = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in PRIMITIVE_MODULES:
            for a in node.names:
                if a.name in PRIMITIVES:
                    imported.add(a.asname or a.name)
                    hits.append(f"{node.lineno}: imports {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in imported:
                hits.append(f"{node.lineno}: calls {f.id}")
            elif isinstance(f, ast.Attribute) and (f.attr in PRIMITIVES or f.attr == "generate"):
                hits.append(f"{node.lineno}: calls {f.attr}")
    return sorted(hits, key=lambda h: int(h.split(":")[0]))


def test_the_check_finds_a_bypass():
    # The checker itself: each way of reaching a primitive directly is caught, a batch call is not.
    assert bypasses("from sftflow.inference.generation import sample_k\nsample_k(m, t, p, num_samples=2)") == [
        "1: imports sample_k", "2: calls sample_k"]
    assert bypasses("from sftflow.inference.rubric import score_pairs as sp\nsp(m, t, [])") == [
        "1: imports score_pairs", "2: calls sp"]
    assert bypasses("import sftflow.inference.rubric as r\nr.score_pairs(m, t, [])") == ["2: calls score_pairs"]
    assert bypasses("out = model.generate(input_ids=x)") == ["1: calls generate"]
    assert bypasses("from sftflow.inference.batch import generate_texts\ngenerate_texts(h, p)") == []
    assert bypasses("def score_pairs(ref, rows):\n    return score_texts(ref, rows)\nscore_pairs(r, [])") == []


def test_no_stage_or_library_module_bypasses_the_batch_api():
    files = sorted(p for d in ("tasks", "flows", "sftflow") for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 30  # the walk found the project
    offenders = {}
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        hits = bypasses(path.read_text(encoding="utf-8"))
        if hits:
            offenders[rel] = hits
    assert offenders == {}, f"generate/score outside sftflow/inference/batch.py: {offenders}"


# --------------------------------------------------------------------------- k samples per prompt
def test_k_samples_through_the_batch_api_are_sample_k_draws(tiny_models_home: Path, monkeypatch: pytest.MonkeyPatch):
    """generate_texts(num_samples=k) on the local engine is sample_k: same seeded draws, same order."""
    from sftflow.engine import LocalEngine
    from sftflow.inference.batch import ModelHandle, generate_texts
    from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids
    from sftflow.inference.generation import sample_k
    from sftflow.inference.models import load_for_inference

    monkeypatch.setenv("SFTFLOW_HOME", str(tiny_models_home))
    ref = build_tiny_model("tiny-gemma")
    model, tok = load_for_inference(ref, dtype="float32")
    template = resolve_template(tok, None)
    prompts = [build_generation_prompt(tok, [{"role": "user", "content": q}], template=template)
               for q in ("hi", "List the planets.", "Why is the sky blue?")]
    kw = dict(max_new_tokens=5, temperature=1.0, top_p=0.95, batch_size=2, stop_ids=stop_token_ids(tok, template),
              seed=3)
    direct = sample_k(model, tok, prompts, num_samples=3, **kw)
    handle = ModelHandle(ref, dtype="float32", loaded=(model, tok))
    got = generate_texts(handle, prompts, num_samples=3, engine=LocalEngine(), backend="hf", **kw)
    assert got == direct and [len(g) for g in got] == [3, 3, 3]
    assert len({g.text for gens in got for g in gens}) > 1  # really sampled
    with pytest.raises(ValueError, match="num_samples"):
        generate_texts(handle, prompts, num_samples=0, engine=LocalEngine(), backend="hf", **kw)


def test_vllm_asks_for_k_sequences_per_prompt():
    from sftflow.inference.vllm_backend import sampling_kwargs

    sampled = sampling_kwargs(max_new_tokens=8, temperature=0.8, top_p=0.9, stop_ids=[1], seed=4, num_samples=4)
    assert sampled["n"] == 4 and sampled["seed"] == 4
    # Greedy: one sequence (the caller repeats it k times, as sample_k's greedy samples are identical).
    assert sampling_kwargs(max_new_tokens=8, stop_ids=[1], num_samples=4)["n"] == 1
    assert sampling_kwargs(max_new_tokens=8, stop_ids=[1])["n"] == 1
    with pytest.raises(ValueError, match="num_samples"):
        sampling_kwargs(max_new_tokens=8, temperature=0.8, stop_ids=[1], num_samples=0)


# --------------------------------------------------------------------------- rejection sampling on Ray
def _pool_records() -> list[dict]:
    qs = ["What is the capital of France?", "hi", "Write a short poem about the sea and the sky.",
          "List the planets.", "Explain why the sky is blue in two sentences.", "Name three colours."]
    rows = [make_record([{"role": "user", "content": q}, {"role": "assistant", "content": "A short answer."}],
                        source="dolly") for q in qs]
    rows.append(make_record([{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"},
                             {"role": "assistant", "content": "3 + 4 = 7\n#### 7"}], source="gsm8k", answer="7"))
    return rows


@pytest.mark.timeout(600)
def test_rejection_sampling_on_ray_keeps_what_local_keeps(sftflow_home: Path):
    """engine=ray (a real local Ray cluster, 2 CPUs, 2 actors) samples and scores the same batches as local."""
    ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")
    from sftflow.config_sections import ExecutionConfig
    from sftflow import engine as engines
    from tasks.rejection import rejection_sample

    base = build_tiny_model("tiny-gemma")
    train = write_parquet(records_to_frame(_pool_records()), sftflow_home / "train.parquet", name="train")
    # Batches of 2 prompts (4 sampling batches) and of 3 pairs (several scoring batches): the actors get work.
    # The threshold sits between the random model's rubric scores, so selection depends on them.
    cfg = RejectionSamplingConfig(enabled=True, k=3, max_new_tokens=6, batch_size=2, score_batch_size=3,
                                  threshold=2.95, require_finished=False, temperature=1.0, top_p=0.95)
    kw = dict(train=train, heldout=None, model=base, cfg=cfg, training=TrainingConfig(), base=base)
    local = pd.read_parquet(rejection_sample(out_dir=sftflow_home / "local", **kw).candidates.path)

    engine = engines.activate(ExecutionConfig(engine="ray", num_cpus=2, generation_backend="hf"))
    try:
        assert isinstance(engine, engines.RayEngine) and int(ray.cluster_resources()["CPU"]) == 2
        on_ray = rejection_sample(out_dir=sftflow_home / "ray", **kw)
    finally:
        engines.release()
    remote = pd.read_parquet(on_ray.candidates.path)

    cols = ["prompt_index", "sample_index", "response", "num_tokens", "finished", "scorer", "best", "kept", "reason"]
    assert len(local) == 7 * 3 and local["response"].str.len().gt(0).any()
    pd.testing.assert_frame_equal(local[cols], remote[cols])
    # Rubric scores: equal up to float rounding (a Ray batch may share a few more prefix tokens).
    pd.testing.assert_series_equal(local["score"], remote["score"], atol=1e-4, rtol=0)
    assert 0 < int(local["kept"].sum()) < local.prompt_index.nunique()  # the threshold really decided
    assert on_ray.selected.num_rows == int(local["kept"].sum())


# --------------------------------------------------------------------------- one resolver
def _copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_missing_judge_is_an_error_naming_the_key_and_path(sftflow_home: Path, tmp_path: Path):
    from sftflow.evaluation.judge import resolve_judge

    base = build_tiny_model("tiny-gemma")
    missing = tmp_path / "no-such-judge"
    with pytest.raises(ScorerUnavailable, match="evaluation.judge_model") as err:
        resolve_scorer(configured=str(missing), base=base, role="judge")
    assert str(missing) in str(err.value) and isinstance(err.value, UserError)

    # The old fallback: a tuned model whose base folder is gone was judged by ITSELF. Now an error.
    tuned = ModelRef(path=base.path, sha256=base.sha256, kind="merged", base=str(tmp_path / "deleted-base"))
    cfg = EvaluationConfig(judge=True)
    with pytest.raises(ScorerUnavailable, match="evaluation.judge_model") as err:
        resolve_judge(cfg, tuned)
    assert str(tmp_path / "deleted-base") in str(err.value)
    # With the pipeline's base passed (as the flow does), that base judges base and tuned alike.
    assert resolve_judge(cfg, tuned, base=base) == base
    assert resolve_judge(EvaluationConfig(judge=False), tuned) is None


def test_rejection_and_curation_scorers_resolve_through_the_same_function(sftflow_home: Path, tmp_path: Path):
    base = build_tiny_model("tiny-gemma")
    tuned = ModelRef(path=_copy_model(base.path, tmp_path / "round1").as_posix(), sha256="r1", kind="merged",
                     base=base.path)
    assert resolve_scorer(configured="tuned", base=base, role="rejection", model=tuned) == tuned
    assert resolve_scorer(configured="base", base=base, role="rejection", model=tuned) == base
    assert resolve_scorer(configured="base", base=base, role="curation") == base
    named = resolve_scorer(configured=str(tmp_path / "round1"), base=base, role="curation")
    assert named.path == str((tmp_path / "round1").resolve()) and named.sha256
    with pytest.raises(ScorerUnavailable, match="rejection_sampling.scorer_model"):
        resolve_scorer(configured="base", base=None, role="rejection", model=tuned)
    # "tuned" is rejection's explicit self choice only; elsewhere it is just an unknown model name.
    with pytest.raises(ScorerUnavailable, match="augmentation.curation.model"):
        resolve_scorer(configured="tuned", base=base, role="curation", model=tuned)
    with pytest.raises(ScorerUnavailable, match="rejection_sampling.scorer_model: .*no-model"):
        resolve_scorer(configured=str(tmp_path / "no-model"), base=base, role="rejection", model=tuned)


def test_rejection_with_an_unloadable_scorer_fails_before_sampling(sftflow_home: Path, tmp_path: Path):
    import re

    from tasks.rejection import rejection_sample

    base = build_tiny_model("tiny-gemma")
    train = write_parquet(records_to_frame(_pool_records()[:2]), tmp_path / "train.parquet", name="train")
    cfg = RejectionSamplingConfig(enabled=True, k=2, max_new_tokens=4, batch_size=2, threshold=1.0,
                                  require_finished=False, scorer="rubric", scorer_model=str(tmp_path / "gone"))
    progress: list[tuple[int, int]] = []
    with pytest.raises(ScorerUnavailable, match=re.escape(f"rejection_sampling.scorer_model: {tmp_path / 'gone'}")):
        rejection_sample(train=train, heldout=None, model=base, cfg=cfg, training=TrainingConfig(),
                         out_dir=tmp_path / "rs", base=base, on_progress=lambda d, t: progress.append((d, t)))
    assert progress == [] and not (tmp_path / "rs" / "candidates.parquet").exists()  # nothing was sampled


def test_judge_content_is_in_the_eval_key_and_the_stage_cache_key(sftflow_home: Path, tmp_path: Path):
    from sftflow.ops.cachekeys import input_digests
    from sftflow.evaluation.judge import resolve_judge
    from sftflow.evaluation.sets import eval_key
    from tasks.evaluate import evaluate

    base = build_tiny_model("tiny-gemma")
    judge_dir = _copy_model(base.path, tmp_path / "judge")
    recs = [make_record([{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}], source="t")
            for w in ("yes", "no", "maybe")]
    held = write_parquet(records_to_frame(recs), tmp_path / "heldout.parquet", name="heldout")
    cfg = EvaluationConfig(max_new_tokens=4, batch_size=3, judge=True, judge_model=str(judge_dir))

    judge1 = resolve_judge(cfg, base)
    key1 = eval_key(heldout=held, cfg=cfg, template="gemma", max_seq_len=64, judge=judge1)
    cache1 = input_digests({"judge": judge1})
    result = evaluate(model=base, heldout=held, cfg=cfg, label="base", template=None, out_dir=tmp_path / "ev",
                      max_seq_len=64, judge=judge1)
    assert result.judge == judge1 and result.judge_sha256 == scorer_digest(judge1) != ""
    assert result.eval_key == eval_key(heldout=held, cfg=cfg, template="gemma", max_seq_len=64, judge=judge1)
    assert pd.read_parquet(result.samples.path)["judge"].between(1, 5).all()

    # Same name, other bytes: another judge. Both the comparability key and the stage's cache key move.
    (judge_dir / "generation_config.json").write_text('{"note": "retrained judge"}\n')
    judge2 = resolve_judge(cfg, base)
    assert judge2.path == judge1.path and scorer_digest(judge2) != scorer_digest(judge1)
    assert eval_key(heldout=held, cfg=cfg, template="gemma", max_seq_len=64, judge=judge2) != key1
    assert input_digests({"judge": judge2}) != cache1
    # Without evaluation.judge the key is what it always was (recorded champions stay comparable).
    off = EvaluationConfig(max_new_tokens=4, batch_size=3)
    assert eval_key(heldout=held, cfg=off, template="gemma", max_seq_len=64, judge=judge2) == \
        eval_key(heldout=held, cfg=off, template="gemma", max_seq_len=64)


def test_gate_refuses_base_and_tuned_scored_by_different_judges(sftflow_home: Path, tmp_path: Path):
    from mlflow import MlflowClient

    from sftflow.gate import judge_mismatch
    from sftflow.results import EvalResult
    from sftflow.tracking.runs import configure, resolve_tracking_uri
    from tasks.promote import promote

    samples = write_parquet(pd.DataFrame({"set": ["heldout"] * 3, "id": ["a", "b", "c"], "rougeL": [0.1, 0.2, 0.3]}),
                            tmp_path / "s.parquet", name="s")
    judge_a = ModelRef(path="/judges/a", sha256="a" * 64, name="judge-a")
    base = EvalResult(label="base", metrics=(("rougeL", 0.1),), samples=samples, eval_key="kb", judge=judge_a,
                      judge_sha256=judge_a.sha256)
    tuned = EvalResult(label="tuned", metrics=(("rougeL", 0.9),), samples=samples, eval_key="kt",
                       judge=ModelRef(path="/m/tuned", sha256="b" * 64), judge_sha256="b" * 64)
    assert judge_mismatch(base, base) is None
    why = judge_mismatch(base, tuned)
    assert why is not None and "different judges" in why and "aaaaaaaaaaaa (judge-a)" in why
    uri = resolve_tracking_uri()
    configure(uri)
    decision, champion = promote(base=base, tuned=tuned, registered_name="m", registered_version="1",
                                 cfg=PromotionConfig(metric="rougeL"), heldout=None, evaluation=EvaluationConfig(),
                                 training=TrainingConfig(), out_dir=tmp_path / "gate", client=MlflowClient(uri))
    assert not decision.promoted and "different judges" in decision.reason and champion is None
    assert decision.judge_sha256 == "b" * 64 and decision.summary()["judge_sha256"] == "b" * 64


def test_backtranslation_curation_model_uses_the_resolver(sftflow_home: Path, tmp_path: Path):
    from sftflow.augment.humpback import curation_model
    from sftflow.config_sections import AugmentationConfig

    base = build_tiny_model("tiny-gemma")
    kw = dict(base=base, seed=None, forward_cfg=TrainingConfig(), work_root=tmp_path / "work")
    assert curation_model(cfg=AugmentationConfig(curation={"model": "base"}), **kw) == (base, [])
    named = _copy_model(base.path, tmp_path / "curator")
    ref, trained = curation_model(cfg=AugmentationConfig(curation={"model": str(named)}), **kw)
    assert ref.path == str(named.resolve()) and trained == []
    with pytest.raises(ScorerUnavailable, match="augmentation.curation.model"):
        curation_model(cfg=AugmentationConfig(curation={"model": str(tmp_path / "no-curator")}), **kw)


def test_the_generate_reference_is_only_an_oracle():
    # decode_reference keeps the old model.generate() path for equality tests and the benchmark; a stage
    # or library module that imported it would bypass the batch API's decode loop.
    users = sorted(p.relative_to(ROOT).as_posix() for d in ("tasks", "flows", "sftflow") for p in (ROOT / d).rglob("*.py")
                   if re.search(r"decode_reference import|import .*decode_reference", p.read_text(encoding="utf-8"))
                   and p.name != "decode_reference.py")
    assert users == []

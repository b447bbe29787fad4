"""Evaluation stage: metrics on known strings, the loss against transformers' own, a real run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config_sections import EvaluationConfig, ExtraEvalSet, TrainingConfig
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet
from sftflow.errors import DataError
from sftflow import markers
from sftflow.evaluation.metrics import generation_metrics, rouge_l
from sftflow.evaluation.sets import eval_key, load_eval_set, split_prompt_reference
from sftflow.results import EvalResult
from tasks.evaluate import evaluate

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- pure metrics
def test_rouge_l_known_strings() -> None:
    scores = rouge_l(
        ["the cat sat on the mat", "the cat sat", "", "completely different words"],
        ["the cat sat on the mat", "the cat sat on the mat", "anything", "the cat sat on the mat"],
    )
    assert scores[0] == pytest.approx(1.0)
    # LCS = 3 tokens: precision 3/3, recall 3/6 -> F1 = 2*1*0.5/1.5
    assert scores[1] == pytest.approx(2 / 3)
    assert scores[2] == 0.0
    assert scores[3] == 0.0


def test_rouge_l_stems_and_checks_lengths() -> None:
    # "running" and "runs" stem to "run": stemming is on.
    assert rouge_l(["dogs running"], ["dog runs"])[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 predictions vs 1 references"):
        rouge_l(["a", "b"], ["a"])


def test_generation_metrics_rates() -> None:
    m, per_row = generation_metrics(
        outputs=["the cat sat", "   ", "a b c d", "the cat sat on the mat"],
        references=["the cat sat on the mat"] * 4,
        num_tokens=[3, 0, 4, 6],
        finished=[True, True, False, False],
    )
    assert per_row[1] == 0.0 and per_row[3] == pytest.approx(1.0)
    assert m["rougeL"] == pytest.approx((2 / 3 + 0 + 0 + 1) / 4)
    assert m["empty_rate"] == pytest.approx(0.25)
    assert m["runaway_rate"] == pytest.approx(0.5)
    assert m["mean_new_tokens"] == pytest.approx(13 / 4)
    assert m["mean_words"] == pytest.approx((3 + 0 + 4 + 6) / 4)


def test_generation_metrics_empty_set_is_nan() -> None:
    m, per_row = generation_metrics(outputs=[], references=[], num_tokens=[], finished=[])
    assert per_row == [] and math.isnan(m["rougeL"])


def test_split_prompt_reference() -> None:
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    prompt, ref = split_prompt_reference(msgs)
    assert ref == "a2" and prompt == msgs[:4]
    with pytest.raises(ValueError, match="no assistant turn"):
        split_prompt_reference([{"role": "user", "content": "q"}])
    with pytest.raises(ValueError, match="no user turn"):
        split_prompt_reference([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}])


# --------------------------------------------------------------------------- extra sets
def test_load_real_eval_sets(shared_data: Path) -> None:
    alpaca = load_eval_set(ExtraEvalSet(name="ae", path=str(shared_data / "eval/alpaca_eval_805_gpt4.json"),
                                        format="alpaca_eval"), max_rows=5)
    assert len(alpaca) == 5
    assert alpaca[0]["messages"][0]["content"].startswith("What are the names of some famous actors")
    si = load_eval_set(ExtraEvalSet(name="si", path=str(shared_data / "eval/self_instruct_user_oriented_252.jsonl")),
                       max_rows=3)
    assert len(si) == 3
    # instruction + the first instance's input make the user turn; its output is the reference.
    assert "Rewrite the sentence" in si[0]["messages"][0]["content"]
    assert "If you have any questions about my rate" in si[0]["messages"][0]["content"]
    assert si[0]["messages"][1]["role"] == "assistant"


def test_load_repo_samples_as_eval_sets() -> None:
    # The repository's own samples (data/README.md), so this runs without ../shared.
    alpaca = load_eval_set(ExtraEvalSet(name="a", path=str(REPO / "data/instruct/alpaca_gpt4_300.json"),
                                        format="alpaca_eval"), max_rows=4)
    first = json.loads((REPO / "data/instruct/alpaca_gpt4_300.json").read_text())[0]
    assert len(alpaca) == 4 and alpaca[0]["messages"][-1] == {"role": "assistant", "content": first["output"].strip()}
    assert alpaca[0]["messages"][0]["content"].startswith(first["instruction"].strip())
    # The smoke file's deliberate defects (a malformed line, a blank answer) are skipped; its
    # duplicates are kept (an eval set is not deduplicated).
    dolly = load_eval_set(ExtraEvalSet(name="d", path=str(REPO / "data/smoke/dolly_smoke.jsonl")))
    assert len(dolly) == 42 and all(m["messages"][-1]["role"] == "assistant" for m in dolly)
    capped = load_eval_set(ExtraEvalSet(name="d", path=str(REPO / "data/smoke/dolly_smoke.jsonl"), max_rows=5),
                           max_rows=30)
    assert [r["id"] for r in capped] == [r["id"] for r in dolly[:5]]  # the set's own max_rows wins


def test_eval_sets_use_ingests_converters(tmp_path: Path) -> None:
    # ShareGPT rows with from/value and human/gpt roles: every turn is kept; the reference is the
    # last assistant turn and the prompt holds the turns before it.
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]}]))
    [row] = load_eval_set(ExtraEvalSet(name="sg", path=str(sharegpt)))
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]
    prompt, ref = split_prompt_reference(row["messages"])
    assert ref == "Blue." and prompt[-1] == {"role": "user", "content": "Name a colour."}


def test_load_eval_set_names_file_and_rows(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "", "output": "x"}) + "\n" + json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match=r"extra_sets\[bad\]: 2 of 2 rows in \S*bad\.jsonl are unusable: "
                                        r"row 1: empty instruction.*row 2: missing required field 'instruction'"):
        load_eval_set(ExtraEvalSet(name="bad", path=str(bad), format="alpaca"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{not json\n{not json either\n')
    with pytest.raises(DataError, match=r"2 of 3 rows in \S*broken\.jsonl are unusable: row 2: malformed JSON"):
        load_eval_set(ExtraEvalSet(name="broken", path=str(broken)))
    # One bad row of two is skipped, not fatal.
    broken.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    assert [r["messages"][0]["content"] for r in load_eval_set(ExtraEvalSet(name="broken", path=str(broken)))] == ["a"]
    with pytest.raises(DataError, match="extra_sets\\[gone\\]"):
        load_eval_set(ExtraEvalSet(name="gone", path=str(tmp_path / "nope.json")))


# --------------------------------------------------------------------------- model passes (tiny model)
@pytest.fixture()
def tiny(sftflow_home: Path):
    from sftflow.inference.tiny import build_tiny_model

    return build_tiny_model("tiny-gemma")


def _heldout(tmp: Path, n: int = 4):
    recs = [
        make_record([{"role": "user", "content": f"What is {i} plus {i}?"},
                     {"role": "assistant", "content": f"It is {2 * i}."}], source="t:x")
        for i in range(n)
    ]
    return write_parquet(records_to_frame(recs), tmp / "heldout.parquet", name="heldout")


def _reference_loss(model, tok, convs, *, template: str, max_seq_len: int) -> tuple[float, int]:
    """transformers' own shifted, masked mean loss, token-weighted over rows cut to their first
    ``max_seq_len`` tokens (training's truncation)."""
    import torch

    from sftflow.inference.formatting import encode_for_training

    total, count = 0.0, 0
    for c in convs:
        ids, labels = encode_for_training(tok, c, template=template, max_len=None)
        ids, labels = list(ids)[:max_seq_len], list(labels)[:max_seq_len]
        n = sum(1 for x in labels[1:] if x != -100)
        if n == 0:
            continue
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        total += float(out.loss) * n
        count += n
    return total / count, count


def test_eval_loss_is_trainings_heldout_loss(tiny, tmp_path: Path) -> None:
    from sftflow.inference.formatting import resolve_template
    from sftflow.inference.models import load_model
    from sftflow.training.loss import heldout_loss

    model, tok = load_model(tiny)
    tmpl = resolve_template(tok, None)
    long_answer = "One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve. " * 3
    convs = [
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "Count to three please."}, {"role": "assistant", "content": "One, two, three."}],
        [{"role": "user", "content": "Count to twelve, three times."}, {"role": "assistant", "content": long_answer}],
    ]
    heldout = write_parquet(records_to_frame([make_record(c, source="t:x") for c in convs]), tmp_path / "h.parquet",
                            name="heldout")
    cfg = EvaluationConfig(max_new_tokens=2, batch_size=2)
    for max_seq_len in (128, 40):  # 40 tokens cut the long row: evaluation truncates as training does
        want, count = _reference_loss(model, tok, convs, template=tmpl, max_seq_len=max_seq_len)
        got = heldout_loss(model, tok, convs, template=tmpl, max_seq_len=max_seq_len)
        assert got.tokens == count and got.loss == pytest.approx(want, rel=1e-4)
        m = evaluate(model=tiny, heldout=heldout, cfg=cfg, label=f"l{max_seq_len}", template=None,
                     out_dir=tmp_path, max_seq_len=max_seq_len).metrics_dict()
        assert m["eval_tokens"] == count
        assert m["eval_loss"] == pytest.approx(want, rel=1e-4)
        assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-9)
    # overlong="drop" (training.overlong) drops the long row instead of cutting it.
    m = evaluate(model=tiny, heldout=heldout, cfg=cfg, label="drop", template=None, out_dir=tmp_path,
                 max_seq_len=40, overlong="drop").metrics_dict()
    assert m["eval_loss"] == pytest.approx(_reference_loss(model, tok, convs[:2], template=tmpl, max_seq_len=40)[0],
                                           rel=1e-4)


def test_evaluate_task_logs_to_stage_and_parent(tiny, sftflow_home: Path, tmp_path: Path, stage_ctx) -> None:
    import mlflow
    from mlflow import MlflowClient

    from tasks.evaluate import evaluate_task

    heldout = _heldout(tmp_path)
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi!"},
                                 {"instruction": "Say bye.", "output": "Bye!"}]))
    cfg = EvaluationConfig(max_new_tokens=6, batch_size=3, judge=True,
                           extra_sets=[ExtraEvalSet(name="extra", path=str(extra), format="alpaca_eval")])
    ctx = stage_ctx
    uri, exp, parent = ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id
    client = MlflowClient(uri)

    result = evaluate_task.fn(tiny, heldout, cfg, label="base", ctx=ctx, training=TrainingConfig(max_seq_len=64))

    assert isinstance(result, EvalResult) and result.label == "base"
    m = result.metrics_dict()
    for k in ("eval_loss", "perplexity", "rougeL", "mean_new_tokens", "empty_rate", "runaway_rate", "judge_score",
              "extra/rougeL", "extra/eval_loss", "extra/judge_score"):
        assert k in m, k
    assert m["num_examples"] == 4 and m["extra/num_examples"] == 2
    assert 0 <= m["runaway_rate_all"] <= 1 and 0 <= m["rougeL"] <= 1 and 1 <= m["judge_score"] <= 5
    # No reference fits in 6 new tokens: a cut-off answer is not a runaway, so the rate is undefined.
    assert m["fit_fraction"] == 0 and math.isnan(m["runaway_rate"])
    assert m["mean_new_tokens"] <= 6
    assert result.metric("base/rougeL") == m["rougeL"]
    assert result.heldout_sha256 == heldout.sha256
    # The judge (the base model itself: tiny is a base model) is part of the key (issue 21).
    assert result.judge == tiny and result.judge_sha256 == tiny.sha256
    assert result.eval_key == eval_key(heldout=heldout, cfg=cfg, template="gemma", max_seq_len=64, judge=tiny)

    samples = pd.read_parquet(result.samples.path)
    assert len(samples) == 6 and set(samples["set"]) == {"heldout", "extra"}
    assert list(samples.columns[:6]) == ["set", "id", "prompt", "reference", "output", "rougeL"]
    assert samples["judge"].between(1, 5).all()

    # Metrics with the label prefix in the stage run AND the parent run.
    assert client.get_run(parent).data.metrics["base/rougeL"] == pytest.approx(m["rougeL"])
    stage_runs = mlflow.search_runs([exp], filter_string="tags.`sftflow.stage` = 'evaluate.base'", output_format="list")
    assert len(stage_runs) == 1
    stage = stage_runs[0]
    assert stage.data.tags["mlflow.parentRunId"] == parent
    assert stage.data.metrics["base/eval_loss"] == pytest.approx(m["eval_loss"])
    assert {d.dataset.name for d in stage.inputs.dataset_inputs} == {"heldout", "eval_samples_base"}
    files = {f.path for f in client.list_artifacts(stage.info.run_id, "eval")}
    assert {"eval/samples_base.json", "eval/metrics_base.json", "eval/samples_base.parquet"} <= files
    # The completion marker records every output's digest; a damaged output fails the check a cache hit makes.
    assert markers.check_outputs(result) == []
    Path(result.samples.path).write_bytes(Path(result.samples.path).read_bytes()[:64])
    assert "samples_base.parquet changed on disk" in markers.describe(markers.check_outputs(result))


def test_eval_key_changes_with_settings(tmp_path: Path) -> None:
    h = _heldout(tmp_path, n=2)
    a = eval_key(heldout=h, cfg=EvaluationConfig(), template=None, max_seq_len=512)
    assert a == eval_key(heldout=h, cfg=EvaluationConfig(), template=None, max_seq_len=512)
    assert a != eval_key(heldout=h, cfg=EvaluationConfig(max_new_tokens=64), template=None, max_seq_len=512)
    h2 = _heldout(tmp_path / "other", n=3)
    assert a != eval_key(heldout=h2, cfg=EvaluationConfig(), template=None, max_seq_len=512)

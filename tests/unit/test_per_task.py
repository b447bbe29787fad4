"""Per-task metrics (source, category), final-answer accuracy, format robustness, the per-task gate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sftflow.breakdown import per_task_metrics, task_groups, task_name
from sftflow.config_sections import EvaluationConfig, PromotionConfig
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet
from sftflow.data.wrappers import WRAPPER_NAMES
from sftflow.gate import decide, gate_evidence
from sftflow.results import EvalResult
from sftflow.evaluation.metrics import answer_accuracy
from sftflow.evaluation.sets import eval_key
from tasks.evaluate import evaluate
from tasks.promote import metrics_markdown, per_task_markdown

SOURCES = ("dolly:dolly.jsonl", "gsm8k:gsm8k_alpaca_200.json", "tools:toolformer.json")
CATEGORIES = ("open_qa", "math", "")


def _check_sums(metrics: dict[str, float], overall: dict[str, float]) -> None:
    """Each breakdown's groups, weighted by their weights, give back the overall metric."""
    for prefix, names in task_groups(metrics).items():
        n = sum(metrics[f"{prefix}/{g}/num_examples"] for g in names)
        assert n == overall["num_examples"]
        rouge = sum(metrics[f"{prefix}/{g}/rougeL"] * metrics[f"{prefix}/{g}/num_examples"] for g in names)
        assert rouge / n == pytest.approx(overall["rougeL"], rel=1e-9)
        if "eval_loss" in overall:
            tok = sum(metrics[f"{prefix}/{g}/eval_tokens"] for g in names)
            assert tok == overall["eval_tokens"]
            loss = sum(metrics[f"{prefix}/{g}/eval_loss"] * metrics[f"{prefix}/{g}/eval_tokens"] for g in names
                       if metrics[f"{prefix}/{g}/eval_tokens"])
            assert loss / tok == pytest.approx(overall["eval_loss"], rel=1e-5)
        if "accuracy" in overall:
            k = sum(metrics.get(f"{prefix}/{g}/accuracy_examples", 0.0) for g in names)
            assert k == overall["accuracy_examples"]
            acc = sum(metrics[f"{prefix}/{g}/accuracy"] * metrics[f"{prefix}/{g}/accuracy_examples"] for g in names
                      if f"{prefix}/{g}/accuracy" in metrics)
            assert acc / k == pytest.approx(overall["accuracy"], rel=1e-9)


def test_breakdown_sums_to_the_overall() -> None:
    rng = np.random.default_rng(0)
    n = 50
    df = pd.DataFrame({
        "source": [SOURCES[i % 3] for i in range(n)],
        "category": [CATEGORIES[(i // 3) % 3] for i in range(n)],
        "rougeL": rng.uniform(0, 1, n),
        "correct": [float(rng.integers(0, 2)) if i % 3 == 1 else math.nan for i in range(n)],
        "loss": rng.uniform(0.5, 3, n),
        "loss_tokens": rng.integers(1, 40, n).astype(float),
    })
    m = per_task_metrics(df)
    assert task_groups(m) == {"by_category": ["math", "none", "open_qa"], "by_source": ["dolly", "gsm8k", "tools"]}
    overall = {"num_examples": float(n), "rougeL": df["rougeL"].mean(),
               "eval_loss": float((df["loss"] * df["loss_tokens"]).sum() / df["loss_tokens"].sum()),
               "eval_tokens": float(df["loss_tokens"].sum()), "accuracy": df["correct"].mean(),
               "accuracy_examples": float(df["correct"].notna().sum())}
    _check_sums(m, overall)
    assert m["by_source/gsm8k/num_examples"] == 17 and "by_source/dolly/accuracy" not in m
    assert task_name("a b:c/d.json", column="source") == "a b" and task_name("x/y?z") == "x_y_z"
    assert task_name(None) == task_name("") == task_name(math.nan) == "none"


def test_answer_accuracy_on_worked_solutions() -> None:
    outputs = ["48/2 = 24, so 48+24 = 72 clips.", "The answer is $1,200.50.", "#### -3", "no idea", "7"]
    answers = ["72", "1200.5", "-3", "5", ""]
    metrics, preds, correct = answer_accuracy(outputs=outputs, answers=answers)
    assert preds == ["72", "1200.5", "-3", None, "7"]
    assert correct[:4] == [1.0, 1.0, 1.0, 0.0] and math.isnan(correct[4])
    assert metrics == {"accuracy": 0.75, "accuracy_examples": 4.0}
    assert answer_accuracy(outputs=["1"], answers=[""])[0] == {}
    with pytest.raises(ValueError, match="1 outputs vs 2 answers"):
        answer_accuracy(outputs=["1"], answers=["1", "2"])


# --------------------------------------------------------------------------- the real evaluation (tiny model)
def _heldout(tmp: Path) -> object:
    recs = []
    for i in range(9):
        src, cat = SOURCES[i % 3], CATEGORIES[i % 3]
        answer = str(2 * i) if src.startswith("gsm8k") else ""
        recs.append(make_record([{"role": "user", "content": f"What is {i} plus {i}?"},
                                 {"role": "assistant", "content": f"{i} + {i} = {2 * i}.\n#### {2 * i}"}],
                                source=src, category=cat, answer=answer))
    return write_parquet(records_to_frame(recs), tmp / "heldout.parquet", name="heldout")


def test_evaluate_reports_per_task_accuracy_and_format_spread(sftflow_home: Path, tmp_path: Path) -> None:
    from sftflow.inference.tiny import build_tiny_model

    tiny = build_tiny_model("tiny-gemma")
    heldout = _heldout(tmp_path)
    cfg = EvaluationConfig(max_new_tokens=6, batch_size=4, format_robustness={"wrappers": 3})
    res = evaluate(model=tiny, heldout=heldout, cfg=cfg, label="base", template=None, out_dir=tmp_path)
    m = res.metrics_dict()
    df = pd.read_parquet(res.samples.path)
    assert {"source", "category", "answer", "pred_answer", "correct"} <= set(df.columns)
    assert df["correct"].notna().sum() == 3 and m["accuracy_examples"] == 3
    assert m["accuracy"] == pytest.approx(df["correct"].mean())
    _check_sums(m, m)
    assert m["by_source/gsm8k/accuracy_examples"] == 3 and m["by_category/math/num_examples"] == 3
    # Format robustness: plain is the ordinary run; the others answer wrapped prompts.
    names = WRAPPER_NAMES[:3]
    values = [m[f"format/{w}/rougeL"] for w in names]
    assert m["format/plain/rougeL"] == pytest.approx(m["rougeL"])
    assert m["format_spread"] == pytest.approx(max(values) - min(values))
    assert m["format_std"] == pytest.approx(float(np.std(values)))
    assert m["format_wrappers"] == 3 and all(f"format/{w}/accuracy" in m for w in names)
    fr = pd.read_parquet(tmp_path / "format_base.parquet")
    assert fr.groupby("wrapper").size().to_dict() == {w: 9 for w in names}
    # The setting is part of what makes two evaluations comparable (and absent when off).
    off = EvaluationConfig(max_new_tokens=6, batch_size=4)
    assert eval_key(heldout=heldout, cfg=cfg, template="gemma", max_seq_len=512) != \
        eval_key(heldout=heldout, cfg=off, template="gemma", max_seq_len=512)
    # The side-by-side output shows the per-task table and the spread.
    md = per_task_markdown(res, res)
    assert "| by_source/gsm8k | 3 |" in md and "accuracy base" in md
    assert "| format_spread |" in metrics_markdown(res, res) and "| format/qa/rougeL |" in metrics_markdown(res, res)


# --------------------------------------------------------------------------- the per-task gate
def _eval(tmp: Path, label: str, rouge: np.ndarray) -> EvalResult:
    n = len(rouge)
    df = pd.DataFrame({"set": "heldout", "id": [f"id{i}" for i in range(n)], "output": "o", "rougeL": rouge,
                       "finished": True, "source": [SOURCES[i % 2] for i in range(n)],
                       "category": [CATEGORIES[i % 2] for i in range(n)]})
    metrics = {"rougeL": float(np.mean(rouge)), "num_examples": float(n), **per_task_metrics(df)}
    ref = write_parquet(df, tmp / f"samples_{label}.parquet", name=f"eval_samples_{label}")
    return EvalResult(label=label, metrics=tuple(sorted(metrics.items())), samples=ref, eval_key="k")


def _decide(base: EvalResult, tuned: EvalResult, cfg: PromotionConfig):
    ev = gate_evidence(base=base, tuned=tuned, champion=None, cfg=cfg, direction="maximize")
    out = decide(metric="rougeL", direction="maximize", min_improvement=cfg.min_improvement,
                 base=base.metric("rougeL"), candidate=tuned.metric("rougeL"), champion=None,
                 over_base=ev.over_base, over_champion=ev.over_champion,
                 max_task_regression=cfg.max_task_regression, tasks=ev.tasks)
    return out, ev


def test_gate_refuses_a_task_that_regresses_beyond_the_margin(tmp_path: Path) -> None:
    n = 64
    base = np.random.default_rng(0).uniform(0.1, 0.3, n)
    # A big gain on dolly (even rows), a 0.05 loss on gsm8k (odd rows): overall clearly better.
    tuned = base + np.where(np.arange(n) % 2 == 0, 0.3, -0.05)
    b, t = _eval(tmp_path, "base", base), _eval(tmp_path, "tuned", tuned)
    out, ev = _decide(b, t, PromotionConfig(min_improvement=0.01))
    assert out.promote  # without the option: promoted on the overall gain
    tasks = ev.tasks.set_index("task")
    assert tasks.loc["by_source/gsm8k", "gain_over_base"] == pytest.approx(-0.05)
    assert tasks.loc["by_source/dolly", "n"] == 32
    # Per task, weighted by rows, the gains sum back to the overall gain.
    src = tasks.loc[["by_source/dolly", "by_source/gsm8k"]]
    assert (src["gain_over_base"] * src["weight"]).sum() / src["weight"].sum() == pytest.approx(ev.over_base.gain)
    out, _ = _decide(b, t, PromotionConfig(min_improvement=0.01, max_task_regression=0.02))
    assert not out.promote and "task by_source/gsm8k regresses" in out.reason
    assert "2 tasks regress: by_source/gsm8k, by_category/math" in out.reason
    out, _ = _decide(b, t, PromotionConfig(min_improvement=0.01, max_task_regression=0.1))
    assert out.promote and "no task regresses by more than 0.1000" in out.reason
    # Without per-task values the check cannot pass.
    refused = decide(metric="rougeL", direction="maximize", min_improvement=0.0, base=0.1, candidate=0.5,
                     champion=None, allow_point_estimate=True, max_task_regression=0.1, tasks=None)
    assert not refused.promote and "no per-task values" in refused.reason


def test_gate_on_accuracy_uses_rows_with_an_answer(tmp_path: Path) -> None:
    def ev(label: str, correct: list[float]) -> EvalResult:
        df = pd.DataFrame({"set": "heldout", "id": [f"i{k}" for k in range(len(correct))], "rougeL": 0.0,
                           "correct": correct, "source": "gsm8k:x", "category": "math"})
        acc = float(pd.Series(correct).mean())
        ref = write_parquet(df, tmp_path / f"s_{label}.parquet", name=label)
        return EvalResult(label=label, metrics=(("accuracy", acc),), samples=ref, eval_key="k")

    nan = math.nan
    b = ev("base", [0.0] * 20 + [nan] * 5)
    t = ev("tuned", [1.0] * 15 + [0.0] * 5 + [nan] * 5)
    cfg = PromotionConfig(metric="accuracy", min_improvement=0.1, max_task_regression=0.0)
    evidence = gate_evidence(base=b, tuned=t, champion=None, cfg=cfg, direction="maximize")
    assert evidence.over_base.n == 20 and evidence.over_base.gain == pytest.approx(0.75)
    assert evidence.tasks.set_index("task").loc["by_source/gsm8k", "n"] == 20
    out = decide(metric="accuracy", direction="maximize", min_improvement=0.1, base=b.metric("accuracy"),
                 candidate=t.metric("accuracy"), champion=None, over_base=evidence.over_base,
                 max_task_regression=0.0, tasks=evidence.tasks)
    assert out.promote, out.reason

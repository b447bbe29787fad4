"""Promotion gate: the pure decision, and the gate against a real SQLite model registry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config_sections import ConfigError, EvaluationConfig, PromotionConfig, TrainingConfig
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet
from sftflow.results import EvalResult, TrainResult
from sftflow.tracking.registry import CHAMPION
from sftflow.gate import decide as gate_decide
from sftflow.gate import metric_name
from tasks.promote import (
    TAG_CI,
    TAG_DECISION,
    TAG_EVAL_KEY,
    TAG_EVAL_METRICS,
    deltas,
    promote,
    record_decision,
    side_by_side,
)


# --------------------------------------------------------------------------- pure decision (point rule)
# These check the point-estimate rule (used without per-example values, when it is allowed); the
# interval rule is tested in test_gate.py.
def decide(**kw):
    return gate_decide(allow_point_estimate=True, **kw)


def test_better_than_base_no_champion_is_promoted() -> None:
    out = decide(metric="rougeL", direction="maximize", min_improvement=0.01, base=0.20, candidate=0.25, champion=None)
    assert out.promote and "no champion yet" in out.reason
    assert out.gain_over_base == pytest.approx(0.05) and out.gain_over_champion is None


def test_worse_than_base_is_rejected() -> None:
    out = decide(metric="rougeL", direction="maximize", min_improvement=0.0, base=0.30, candidate=0.25, champion=None)
    assert not out.promote and out.gain_over_base == pytest.approx(-0.05)


def test_equal_to_base_is_rejected_even_with_zero_margin() -> None:
    out = decide(metric="rougeL", direction="maximize", min_improvement=0.0, base=0.3, candidate=0.3, champion=None)
    assert not out.promote


def test_within_margin_is_rejected() -> None:
    out = decide(metric="rougeL", direction="maximize", min_improvement=0.05, base=0.20, candidate=0.22, champion=None)
    assert not out.promote and "within the margin" in out.reason


def test_minimize_direction() -> None:
    good = decide(metric="eval_loss", direction="minimize", min_improvement=0.1, base=2.5, candidate=2.0, champion=2.2)
    assert good.promote and good.gain_over_base == pytest.approx(0.5) and good.gain_over_champion == pytest.approx(0.2)
    bad = decide(metric="eval_loss", direction="minimize", min_improvement=0.1, base=2.5, candidate=2.45, champion=None)
    assert not bad.promote


def test_champion_better_blocks_promotion() -> None:
    out = decide(metric="rougeL", direction="maximize", min_improvement=0.0, base=0.2, candidate=0.3, champion=0.35)
    assert not out.promote and "not the champion" in out.reason
    tie = decide(metric="rougeL", direction="maximize", min_improvement=0.0, base=0.2, candidate=0.3, champion=0.3)
    assert not tie.promote


def test_champion_worse_is_replaced() -> None:
    out = decide(metric="rougeL", direction="maximize", min_improvement=0.0, base=0.2, candidate=0.3, champion=0.25)
    assert out.promote and out.gain_over_champion == pytest.approx(0.05)


def test_nan_is_never_promoted() -> None:
    assert not decide(metric="m", direction="maximize", min_improvement=0, base=0.1, candidate=math.nan,
                      champion=None).promote
    assert not decide(metric="m", direction="maximize", min_improvement=0, base=0.1, candidate=0.2,
                      champion=math.nan).promote
    with pytest.raises(ValueError, match="direction"):
        decide(metric="m", direction="up", min_improvement=0, base=0.1, candidate=0.2, champion=None)


def test_metric_name_strips_label_prefix() -> None:
    assert metric_name(PromotionConfig(metric="tuned/rougeL")) == "rougeL"
    assert metric_name(PromotionConfig(metric="eval_loss", direction="minimize")) == "eval_loss"


# --------------------------------------------------------------------------- helpers for registry tests
def _samples(tmp: Path, label: str, outputs: list[str], rouge: list[float], loss: list[float] | None = None,
             ids: list[str] | None = None):
    df = pd.DataFrame({"set": "heldout", "id": ids or [f"id{i}" for i in range(len(outputs))],
                       "prompt": [f"p{i}" for i in range(len(outputs))],
                       "reference": [f"r{i}" for i in range(len(outputs))],
                       "output": outputs, "rougeL": rouge, "num_tokens": 3, "finished": True, "judge": math.nan})
    if loss is not None:  # per-example answer loss, as the evaluation is to write it
        df["loss"], df["loss_tokens"] = loss, 1
    return write_parquet(df, tmp / f"samples_{label}.parquet", name=f"eval_samples_{label}")


def _result(tmp: Path, label: str, rouge: float, *, key: str = "key-A", heldout_sha: str = "h") -> EvalResult:
    s = _samples(tmp, label, [f"{label} out 0", f"{label} out 1"], [rouge, rouge])
    return EvalResult(label=label, metrics=(("eval_loss", 2.0 - rouge), ("rougeL", rouge)), samples=s,
                      heldout_sha256=heldout_sha, eval_key=key)


def _register(client, name: str, *, model_path: str = "") -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass
    from sftflow.tracking.runs import ensure_experiment, resolve_tracking_uri

    exp = ensure_experiment("sftflow-registry-test", uri=resolve_tracking_uri())
    run = client.create_run(exp, tags={"sftflow.model_path": model_path} if model_path else None)
    mv = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "candidate", mv.version)
    return str(mv.version)


@pytest.fixture()
def client(sftflow_home: Path):
    from mlflow import MlflowClient

    from sftflow.tracking.runs import configure, resolve_tracking_uri

    uri = resolve_tracking_uri()
    configure(uri)
    return MlflowClient(uri)


def test_side_by_side_and_deltas(tmp_path: Path) -> None:
    base = _result(tmp_path, "base", 0.2)
    tuned = _result(tmp_path, "tuned", 0.5)
    table = side_by_side(base, tuned)
    assert list(table["base_output"]) == ["base out 0", "base out 1"]
    assert list(table["tuned_output"]) == ["tuned out 0", "tuned out 1"]
    assert table["delta_rougeL"].tolist() == pytest.approx([0.3, 0.3])
    d = deltas(base, tuned)
    assert d["rougeL"] == pytest.approx(0.3) and d["eval_loss"] == pytest.approx(-0.3)


def _gate(client, *, run_id: str = "run", **kw):
    """What promote_task does with the registry: decide (read only), then apply the decision."""
    decision, reeval = promote(client=client, **kw)
    record_decision(client, decision, tuned=kw["tuned"], run_id=run_id)
    return decision, reeval


def test_plain_promote_decides_without_writing_to_the_registry(client, tmp_path: Path) -> None:
    name = "sftflow-readonly"
    v1 = _register(client, name)
    d, _ = promote(base=_result(tmp_path, "base", 0.2), tuned=_result(tmp_path, "tuned", 0.4), registered_name=name,
                   registered_version=v1, cfg=PromotionConfig(metric="rougeL"), heldout=None,
                   evaluation=EvaluationConfig(), training=TrainingConfig(), out_dir=tmp_path, client=client)
    assert d.promoted
    assert str(client.get_model_version_by_alias(name, "candidate").version) == v1
    assert CHAMPION not in (client.get_registered_model(name).aliases or {})  # the alias did not move
    assert TAG_DECISION not in (client.get_model_version(name, v1).tags or {})
    record_decision(client, d, tuned=_result(tmp_path, "tuned", 0.4), run_id="r")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v1


def test_gate_first_version_becomes_champion_then_worse_does_not(client, tmp_path: Path) -> None:
    cfg = PromotionConfig(metric="rougeL", min_improvement=0.05)
    name = "sftflow-gate"
    v1 = _register(client, name)
    base = _result(tmp_path, "base", 0.20)
    d1, reeval = _gate(client, base=base, tuned=_result(tmp_path, "tuned", 0.40), registered_name=name,
                       registered_version=v1, cfg=cfg, heldout=None, evaluation=EvaluationConfig(),
                       training=TrainingConfig(), out_dir=tmp_path, run_id="run-1")
    assert d1.promoted and d1.champion_value is None and reeval is None
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v1
    mv1 = client.get_model_version(name, v1)
    assert mv1.tags[TAG_DECISION] == "promoted" and mv1.tags[TAG_EVAL_KEY] == "key-A"
    assert json.loads(mv1.tags[TAG_EVAL_METRICS])["rougeL"] == pytest.approx(0.40)
    assert "PROMOTED" in mv1.description and "0.4000" in mv1.description

    # v2 beats the base by the margin but not the champion (same eval key: recorded value used).
    v2 = _register(client, name)
    d2, reeval = _gate(client, base=base, tuned=_result(tmp_path, "tuned2", 0.30), registered_name=name,
                       registered_version=v2, cfg=cfg, heldout=None, evaluation=EvaluationConfig(),
                       training=TrainingConfig(), out_dir=tmp_path, run_id="run-2")
    assert not d2.promoted and reeval is None
    assert d2.champion_value == pytest.approx(0.40) and d2.champion_version == v1
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v1
    assert client.get_model_version(name, v2).tags[TAG_DECISION] == "rejected"
    assert str(client.get_model_version_by_alias(name, "candidate").version) == v2

    # v3 within the margin over the base: rejected before looking at the champion.
    v3 = _register(client, name)
    d3, _ = _gate(client, base=base, tuned=_result(tmp_path, "tuned3", 0.22), registered_name=name,
                  registered_version=v3, cfg=cfg, heldout=None, evaluation=EvaluationConfig(),
                  training=TrainingConfig(), out_dir=tmp_path, run_id="run-3")
    assert not d3.promoted and "lower bound +0.0200 <= required 0.0500" in d3.reason

    # v4 beats both: champion moves.
    v4 = _register(client, name)
    d4, _ = _gate(client, base=base, tuned=_result(tmp_path, "tuned4", 0.55), registered_name=name,
                  registered_version=v4, cfg=cfg, heldout=None, evaluation=EvaluationConfig(),
                  training=TrainingConfig(), out_dir=tmp_path, run_id="run-4")
    assert d4.promoted and d4.champion_version == v1
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v4

    # A re-run with v4 already champion: promoted, nothing moves, its record is refreshed.
    d5, _ = _gate(client, base=base, tuned=_result(tmp_path, "tuned5", 0.55), registered_name=name,
                  registered_version=v4, cfg=cfg, heldout=None, evaluation=EvaluationConfig(),
                  training=TrainingConfig(), out_dir=tmp_path, run_id="run-5")
    assert d5.promoted and "already holds champion" in d5.reason
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v4
    assert client.get_model_version(name, v4).tags["sftflow.gate.run_id"] == "run-5"


def test_gate_without_registered_version(tmp_path: Path) -> None:
    d, _ = promote(base=_result(tmp_path, "base", 0.1), tuned=_result(tmp_path, "tuned", 0.9), registered_name="",
                   registered_version="", cfg=PromotionConfig(), heldout=None, evaluation=EvaluationConfig(),
                   training=TrainingConfig(), out_dir=tmp_path, client=object())
    assert not d.promoted and "no registered model version" in d.reason


def test_champion_on_other_heldout_is_reevaluated(client, sftflow_home: Path, tmp_path: Path) -> None:
    """The champion's recorded eval key differs: it is loaded offline and evaluated on this held-out set."""
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.evaluation.sets import eval_key

    import mlflow

    from sftflow.data.refs import ModelRef
    from sftflow.tracking.registry import log_model, model_version_ref
    from sftflow.evaluation.judge import resolve_judge
    from tasks.evaluate import evaluate

    tiny = build_tiny_model("tiny-gemma")
    name = "sftflow-reeval"
    # Register the champion exactly as the train stage does: a pyfunc wrapping the merged safetensors.
    merged = ModelRef(path=tiny.path, sha256=tiny.sha256, kind="merged", name="tiny")
    from sftflow.tracking.runs import ensure_experiment, resolve_tracking_uri

    # An experiment of ours: its artifacts live under $SFTFLOW_HOME (Default's would go to ./mlruns).
    exp = ensure_experiment("sftflow-reeval", uri=resolve_tracking_uri())
    with mlflow.start_run(experiment_id=exp):
        _, _, v1 = log_model(model=merged, template="gemma", metrics=(("train_loss", 1.0),), register_as=name)
    client.set_registered_model_alias(name, CHAMPION, v1)
    ref = model_version_ref(client, client.get_model_version(name, v1), download_dir=tmp_path / "dl")
    assert ref.kind == "merged" and ref.meta_dict()["template"] == "gemma"
    assert (Path(ref.path) / "config.json").exists() and ref.path != tiny.path  # the logged copy, not the source
    # Recorded on another held-out set: must not be trusted.
    client.set_model_version_tag(name, v1, TAG_EVAL_KEY, "some-other-heldout")
    client.set_model_version_tag(name, v1, TAG_EVAL_METRICS, json.dumps({"eval_loss": -100.0}))

    recs = [make_record([{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}], source="t:x")
            for w in ("yes", "no", "maybe")]
    heldout = write_parquet(records_to_frame(recs), tmp_path / "heldout.parquet", name="heldout")
    ids = heldout.read()["id"].astype(str).tolist()  # the held-out rows' real ids: they join the champion's
    evaluation = EvaluationConfig(max_new_tokens=4, batch_size=3)
    training = TrainingConfig(max_seq_len=64)
    key = eval_key(heldout=heldout, cfg=evaluation, template="gemma", max_seq_len=64)
    base = EvalResult(label="base", metrics=(("eval_loss", 50.0),),
                      samples=_samples(tmp_path, "b", ["x"] * 3, [0.0] * 3, loss=[50.0, 49.0, 51.0], ids=ids),
                      heldout_sha256=heldout.sha256, eval_key=key)
    tuned = EvalResult(label="tuned", metrics=(("eval_loss", 1.0),),
                       samples=_samples(tmp_path, "t", ["y"] * 3, [0.0] * 3, loss=[1.0, 0.9, 1.1], ids=ids),
                       heldout_sha256=heldout.sha256, eval_key=key)
    v2 = _register(client, name)
    cfg = PromotionConfig(metric="eval_loss", direction="minimize", min_improvement=0.5)
    gate = dict(base=base, tuned=tuned, registered_name=name, registered_version=v2, cfg=cfg, heldout=heldout,
                evaluation=evaluation, training=training, out_dir=tmp_path / "gate")
    with pytest.raises(ValueError, match="evaluate_champion"):  # never compared with numbers from another set
        promote(client=client, **gate)

    def evaluate_champion(*, model, heldout, evaluation, training, template, out_dir, judge=None):
        # What the flow passes (the evaluation stage's champion evaluator).
        return evaluate(model=model, heldout=heldout, cfg=evaluation, label="champion", template=template,
                        out_dir=out_dir, max_seq_len=training.max_seq_len, judge=resolve_judge(evaluation, model))

    d, champ = _gate(client, evaluate_champion=evaluate_champion, **gate)
    assert champ is not None and d.champion_reevaluated
    # A random tiny model's loss is about ln(vocab) (> 1.0), so the candidate wins; -100 was ignored.
    assert d.champion_value == pytest.approx(champ.metric("eval_loss")) and d.champion_value > 1.0
    assert champ.heldout_sha256 == heldout.sha256 and champ.eval_key == key
    assert d.promoted and str(client.get_model_version_by_alias(name, CHAMPION).version) == v2
    assert "re-evaluated" in client.get_model_version(name, v2).description
    # The champion's re-evaluation scored the same held-out rows (ids join): the comparison is per
    # example, with an interval, not a point comparison of two means.
    champ_ids = set(pd.read_parquet(champ.samples.path)["id"].astype(str))
    assert champ_ids == set(ids)
    assert "point comparison" not in d.reason and "95% CI" in d.reason, d.reason


def _train_result(name: str, version: str) -> TrainResult:
    from sftflow.data.refs import ModelRef

    return TrainResult(model=ModelRef(path="/m", sha256="s", kind="merged"), run_id="r", model_uri="models:/m",
                       registered_name=name, registered_version=version, metrics=())


def test_promote_task_records_table_deltas_and_decision(client, sftflow_home: Path, tmp_path: Path) -> None:
    import mlflow

    from sftflow.tracking.runs import StageContext, ensure_experiment, resolve_tracking_uri
    from tasks.promote import promote_task

    uri = resolve_tracking_uri()
    exp = ensure_experiment("sftflow-promote-test", uri=uri)
    parent = client.create_run(exp, run_name="parent").info.run_id
    ctx = StageContext(pipeline="t", run_id="r1", run_dir=str(sftflow_home / "runs/t/r1"), tracking_uri=uri,
                       experiment_id=exp, parent_run_id=parent)
    name = "sftflow-task"
    v1 = _register(client, name)
    decision = promote_task.fn(_result(tmp_path, "base", 0.2), _result(tmp_path, "tuned", 0.3),
                               _train_result(name, v1), PromotionConfig(), ctx=ctx, heldout=None,
                               evaluation=EvaluationConfig(), training=TrainingConfig())
    assert decision.promoted
    assert decision.summary()["deltas"]["rougeL"] == pytest.approx(0.1)
    pr = client.get_run(parent)
    assert pr.data.metrics["delta/rougeL"] == pytest.approx(0.1)
    assert pr.data.tags["sftflow.gate.decision"] == "promoted"
    parent_files = {f.path for f in client.list_artifacts(parent, "eval")}
    assert {"eval/side_by_side.json", "eval/side_by_side.html", "eval/side_by_side.md"} <= parent_files
    stage = mlflow.search_runs([exp], filter_string="tags.`sftflow.stage` = 'promote'", output_format="list")[0]
    assert {f.path for f in client.list_artifacts(stage.info.run_id, "promotion")} == {
        "promotion/decision.json", "promotion/per_example.json", "promotion/per_example.md"}
    assert {"promotion/per_example.json", "promotion/per_example.md"} <= {
        f.path for f in client.list_artifacts(parent, "promotion")}
    mv = client.get_model_version(name, v1)
    assert mv.tags[TAG_CI].startswith("+0.1000 [95% CI +0.1000, +0.1000], n=2")
    assert "Per example (rougeL)" in mv.description and "| id0 | 0.2000 | 0.3000 | 0.1000 |" in mv.description
    md = Path(client.download_artifacts(parent, "eval/side_by_side.md", str(tmp_path / "dl2"))).read_text()
    assert md.startswith("**Promotion gate: promoted.**") and "95% CI" in md
    table = json.loads(Path(client.download_artifacts(parent, "eval/side_by_side.json", str(tmp_path / "dl"))).read_text())
    assert "tuned_output" in table["columns"] and len(table["data"]) == 2
    assert client.get_model_version(name, v1).tags["sftflow.gate.run_id"] == stage.info.run_id


def test_promote_task_rejects_a_wrong_train_argument(client, sftflow_home: Path, tmp_path: Path) -> None:
    """A wiring mistake (not a TrainResult) is an error, not a silent "no model to promote"."""
    from sftflow.tracking.runs import StageContext, ensure_experiment, resolve_tracking_uri
    from tasks.promote import promote_task

    uri = resolve_tracking_uri()
    exp = ensure_experiment("sftflow-promote-test", uri=uri)
    ctx = StageContext(pipeline="t", run_id="r2", run_dir=str(sftflow_home / "runs/t/r2"), tracking_uri=uri,
                       experiment_id=exp, parent_run_id="")
    args = (_result(tmp_path, "base", 0.2), _result(tmp_path, "tuned", 0.3))
    kw = dict(ctx=ctx, heldout=None, evaluation=EvaluationConfig(), training=TrainingConfig())
    with pytest.raises(TypeError, match="TrainResult or None, got dict"):
        promote_task.fn(*args, {"registered_name": "m", "registered_version": "1"}, PromotionConfig(), **kw)
    none = promote_task.fn(*args, None, PromotionConfig(), **kw)
    assert not none.promoted and "no registered model version" in none.reason


# --------------------------------------------------------------------------- direction and bootstrap through promote
def _seq_result(tmp: Path, label: str, rouge: list[float], loss: list[float]) -> EvalResult:
    s = _samples(tmp, label, [f"{label} {i}" for i in range(len(rouge))], rouge, loss=loss)
    return EvalResult(label=label, metrics=(("eval_loss", sum(loss) / len(loss)), ("rougeL", sum(rouge) / len(rouge))),
                      samples=s, heldout_sha256="h", eval_key="key-A")


def test_contradictory_direction_is_refused_before_any_work(tmp_path: Path) -> None:
    base = _seq_result(tmp_path, "base", [0.2] * 4, [2.5] * 4)
    tuned = _seq_result(tmp_path, "tuned", [0.3] * 4, [2.0] * 4)
    kw = dict(base=base, tuned=tuned, registered_name="m", registered_version="1", heldout=None,
              evaluation=EvaluationConfig(), training=TrainingConfig(), out_dir=tmp_path,
              client=object())  # never touched: the check comes first
    contradiction = r"promotion\.direction: 'maximize' contradicts promotion\.metric 'eval_loss'"
    with pytest.raises(ConfigError, match=contradiction):
        promote(cfg=PromotionConfig(metric="eval_loss", direction="maximize"), **kw)
    with pytest.raises(ConfigError, match=r"promotion\.direction"):
        promote(cfg=PromotionConfig(metric="mean_words"), **kw)


def test_direction_implied_by_eval_loss_promotes_lower_loss(client, tmp_path: Path) -> None:
    name = "sftflow-implied"
    base = _seq_result(tmp_path, "base", [0.2] * 8, [2.5, 2.6, 2.4, 2.5, 2.7, 2.3, 2.5, 2.6])
    lower = _seq_result(tmp_path, "lower", [0.2] * 8, [2.1, 2.2, 2.0, 2.1, 2.3, 1.9, 2.1, 2.2])
    higher = _seq_result(tmp_path, "higher", [0.2] * 8, [2.9, 3.0, 2.8, 2.9, 3.1, 2.7, 2.9, 3.0])
    cfg = PromotionConfig(metric="eval_loss")  # direction None: minimize
    kw = dict(heldout=None, evaluation=EvaluationConfig(), training=TrainingConfig(), out_dir=tmp_path, client=client)
    v1 = _register(client, name)
    d_bad, _ = promote(base=base, tuned=higher, registered_name=name, registered_version=v1, cfg=cfg, **kw)
    assert not d_bad.promoted and d_bad.direction == "minimize" and "lower is better" in d_bad.reason
    d, _ = promote(base=base, tuned=lower, registered_name=name, registered_version=v1, cfg=cfg, **kw)
    assert d.promoted and d.direction == "minimize" and "95% CI +0.4000, +0.4000" in d.reason


def test_noisy_gain_is_not_promoted_through_promote(client, tmp_path: Path) -> None:
    name = "sftflow-noise"
    v1 = _register(client, name)
    base = _seq_result(tmp_path, "base", [0.2] * 8, [2.0] * 8)
    noisy = _seq_result(tmp_path, "noisy", [0.3, 0.1, 0.35, 0.05, 0.3, 0.1, 0.25, 0.16], [2.0] * 8)  # mean +0.0013
    d, _ = promote(base=base, tuned=noisy, registered_name=name, registered_version=v1, cfg=PromotionConfig(),
                   heldout=None, evaluation=EvaluationConfig(), training=TrainingConfig(), out_dir=tmp_path,
                   client=client)
    assert d.tuned_value > d.base_value and not d.promoted and "noise" in d.reason

"""augmentation.keep_if_helps (issue 24): seed+curated vs seed-only at equal steps, the paired bootstrap
interval of their difference, the better one registered, the model version saying which and why.

The evaluations are real samples Parquet files (what tasks/evaluate.py writes: set, id, rougeL ...),
built with chosen per-example values so that the winner is known; the registry is MLflow's embedded
SQLite store under a temporary SFTFLOW_HOME, the model a real logged MLflow model.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config_sections import EvaluationConfig, PromotionConfig, TrainingConfig
from sftflow.data.refs import ModelRef, write_parquet
from sftflow.gate import CURATED, SEED_ONLY, ablation_choice
from sftflow.results import EvalResult, TrainResult
from sftflow.tagnames import TAG_TRAIN_KEY, TAG_TRAIN_SHA256

N = 24


def _eval(tmp: Path, label: str, rouge: list[float], *, loss: list[float] | None = None) -> EvalResult:
    df = pd.DataFrame({"set": "heldout", "id": [f"q{i}" for i in range(len(rouge))],
                       "prompt": [f"p{i}" for i in range(len(rouge))], "reference": "r",
                       "output": [f"{label} {i}" for i in range(len(rouge))], "rougeL": rouge, "finished": True})
    metrics = [("rougeL", sum(rouge) / len(rouge))]
    if loss is not None:
        df["loss"], df["loss_tokens"] = loss, 1
        metrics.append(("eval_loss", sum(loss) / len(loss)))
    ref = write_parquet(df, tmp / f"samples_{label}.parquet", name=f"eval_samples_{label}")
    return EvalResult(label=label, metrics=tuple(metrics), samples=ref, heldout_sha256="h", eval_key="k")


def _rouge(level: float) -> list[float]:
    # Per-example spread, so the interval has width; the same spread for both models (paired).
    return [round(level + 0.1 * ((i * 7) % 5) / 4, 4) for i in range(N)]


def test_seed_only_wins_when_curated_pairs_hurt(tmp_path: Path) -> None:
    curated, seed_only = _eval(tmp_path, "tuned", _rouge(0.15)), _eval(tmp_path, "seed_only", _rouge(0.20))
    choice = ablation_choice(curated=curated, seed_only=seed_only, cfg=PromotionConfig())
    assert choice.keep == SEED_ONLY
    assert choice.curated == pytest.approx(curated.metric("rougeL"))
    assert choice.seed_only == pytest.approx(seed_only.metric("rougeL"))
    d = choice.difference
    assert d is not None and d.n == N and d.gain == pytest.approx(-0.05) and d.high < 0
    assert "seed-only rougeL" in choice.reason and "keep_if_helps" in choice.reason and "n=24" in choice.reason
    md = choice.markdown()
    assert f"| {CURATED} | {choice.curated:.4f} |" in md and f"| {SEED_ONLY} | {choice.seed_only:.4f} |" in md
    assert "Registered: **seed-only**" in md and "95% CI" in md
    tags = choice.tags()
    assert tags["sftflow.ablation.kept"] == SEED_ONLY and tags["sftflow.ablation.difference"].startswith("-0.0500")


def test_curated_is_kept_when_it_helps_or_ties(tmp_path: Path) -> None:
    better = ablation_choice(curated=_eval(tmp_path, "a", _rouge(0.3)), seed_only=_eval(tmp_path, "b", _rouge(0.2)),
                             cfg=PromotionConfig())
    assert better.keep == CURATED and better.difference.low > 0 and "helped" in better.reason
    tie = ablation_choice(curated=_eval(tmp_path, "c", _rouge(0.2)), seed_only=_eval(tmp_path, "d", _rouge(0.2)),
                          cfg=PromotionConfig())
    assert tie.keep == CURATED and "did not hurt" in tie.reason  # a tie keeps the configured recipe
    s = tie.summary()
    assert s["kept"] == CURATED and s["difference"]["gain"] == 0.0 and s["difference"]["n"] == N


def test_a_loss_metric_keeps_the_lower_loss(tmp_path: Path) -> None:
    cfg = PromotionConfig(metric="eval_loss")
    curated = _eval(tmp_path, "e", _rouge(0.3), loss=[2.0 + 0.01 * i for i in range(N)])
    seed_only = _eval(tmp_path, "f", _rouge(0.1), loss=[1.5 + 0.01 * i for i in range(N)])
    choice = ablation_choice(curated=curated, seed_only=seed_only, cfg=cfg)
    assert choice.direction == "minimize" and choice.keep == SEED_ONLY
    assert choice.difference.gain == pytest.approx(-0.5)  # positive = curation helped, here it hurt


@pytest.fixture()
def client(sftflow_home: Path):
    from mlflow import MlflowClient

    from sftflow.tracking.runs import configure, resolve_tracking_uri

    uri = resolve_tracking_uri()
    configure(uri)
    return MlflowClient(uri)


def _logged_model(client, exp: str, name: str) -> TrainResult:
    """A real MLflow model logged (not registered) in its own run, as train_task(register_as=None) leaves it."""
    import mlflow

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):  # noqa: ARG002 (the pyfunc signature)
            return model_input

    with mlflow.start_run(experiment_id=exp, run_name=name) as run:
        mlflow.set_tags({TAG_TRAIN_KEY: f"key-{name}", TAG_TRAIN_SHA256: f"data-{name}"})
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
    return TrainResult(model=ModelRef(path=f"/models/{name}", sha256=f"sha-{name}", kind="merged"),
                       run_id=run.info.run_id, model_uri=info.model_uri, registered_name="", registered_version="",
                       metrics=(("train_loss", 1.25), ("eval_loss", 1.5)))


def test_the_better_model_is_registered_once_and_the_version_says_why(client, sftflow_home: Path,
                                                                     tmp_path: Path) -> None:
    from sftflow.tracking.runs import StageContext, ensure_experiment, resolve_tracking_uri
    from tasks.promote import promote_task
    from tasks.train import register_task

    uri = resolve_tracking_uri()
    exp = ensure_experiment("sftflow-keep-if-helps", uri=uri)
    _logged_model(client, exp, "curated")
    seed_only = _logged_model(client, exp, "seed_only")
    base = _eval(tmp_path, "base", _rouge(0.05))
    curated_eval, seed_eval = _eval(tmp_path, "tuned", _rouge(0.15)), _eval(tmp_path, "seed_only", _rouge(0.2))
    choice = ablation_choice(curated=curated_eval, seed_only=seed_eval, cfg=PromotionConfig())
    assert choice.keep == SEED_ONLY

    name = "sftflow-ablation"
    registered = register_task.fn(seed_only, name, tags=choice.tags(), stage="train.seed_only")
    assert (registered.registered_name, registered.registered_version) == (name, "1")
    again = register_task.fn(seed_only, name, tags=choice.tags(), stage="train.seed_only")
    assert again.registered_version == "1"  # idempotent: a cached rerun registers nothing new
    mv = client.get_model_version_by_alias(name, "candidate")
    assert str(mv.version) == "1" and mv.tags["sftflow.ablation.kept"] == SEED_ONLY
    assert mv.tags["sftflow.train.source_run"] == seed_only.run_id and mv.tags["train_loss"] == "1.25"
    assert mv.tags["sftflow.model.sha256"] == "sha-seed_only" and mv.tags[TAG_TRAIN_KEY] == "key-seed_only"
    assert mv.tags[TAG_TRAIN_SHA256] == "data-seed_only"

    parent = client.create_run(exp, run_name="parent").info.run_id
    ctx = StageContext(pipeline="t", run_id="r1", run_dir=str(sftflow_home / "runs/t/r1"), tracking_uri=uri,
                       experiment_id=exp, parent_run_id=parent)
    note = ("Curation method: pmi (auto: highest held-out AUC 0.907 on 32 true vs mismatched pairs; loglik 0.710)\n"
            "curator pmi (iteration 1): held-out AUC 0.907 on 32 true vs mismatched pairs >= "
            "augmentation.curation.min_auc 0.6")
    decision = promote_task.fn(base, seed_eval, registered, PromotionConfig(), ctx=ctx, heldout=None,
                               evaluation=EvaluationConfig(), training=TrainingConfig(),
                               others=(curated_eval,), ablation=choice, note=note)
    assert decision.registered_version == "1" and decision.promoted  # the gate: kept model vs base, as usual
    mv = client.get_model_version(name, "1")
    assert "Registered: **seed-only**" in mv.description and "Seed+curated minus seed-only: -0.0500" in mv.description
    assert "Curation method: pmi (auto" in mv.description and mv.tags["sftflow.data.note"] == note
    metrics = client.get_run(parent).data.metrics
    assert metrics["ablation/kept_seed_only"] == 1.0 and metrics["ablation/difference"] == pytest.approx(-0.05)
    assert math.isclose(metrics["ablation/seed_only"], choice.seed_only)

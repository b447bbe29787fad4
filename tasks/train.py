"""SFT training stage: the Prefect task around the recipe in ``sftflow.training``.

``train_task`` trains through the one training entry (``sftflow.training.entry.run_training``:
content-keyed folder, resume, one process or torchrun; LoRA / DoRA / rsLoRA / QLoRA / full), logs
per-step metrics, the loss curve and the model cards to the stage's MLflow run, and registers the
model as a new version with alias ``candidate`` (``sftflow.tracking.registry``).

The flow calls ``train_task``; to train without Prefect or MLflow (also under torchrun /
accelerate launch), use ``python -m sftflow.training --help``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from sftflow.config_sections import TrainingConfig
from sftflow.data.refs import DatasetRef, ModelRef
from sftflow.ops.cachekeys import (
    TAG_BASE_SHA256,
    TAG_CACHE_KEY,
    TAG_CODE_DIGEST,
    TAG_HELDOUT_SHA256,
    TAG_TRAIN_KEY,
    TAG_TRAIN_SHA256,
)
from sftflow.ops.orchestration import markdown_artifact, stage_cache_policy
from sftflow.results import TrainResult
from sftflow.tracking.registry import log_model
from sftflow.tracking.runs import StageContext, log_dataset, log_json, stage_run
from sftflow.tracking.train_logging import log_training_summary, step_logger
from sftflow.training.export import OUTPUT_FILE, TrainOutput  # noqa: F401  (OUTPUT_FILE: re-exported)
from sftflow.training.entry import pipeline_work_root, run_training
from sftflow.training.model import learning_rate

# Whether the train stage returned the finished output of an earlier run with the same key.
TAG_REUSED = "sftflow.train.reused_output"


@task(name="train", task_run_name="{stage}", cache_policy=stage_cache_policy(), persist_result=True)  # no retries: training resumes instead
def train_task(train: DatasetRef, heldout: DatasetRef | None, base: ModelRef, cfg: TrainingConfig, *,
               ctx: StageContext, register_as: str | None, stage: str = "train") -> TrainResult:
    """The SFT stage of the flow: train, log to the stage's MLflow run, register the candidate.

    Not retried on failure: when the flow runs again with the same inputs (bytes of the data and
    base model, config, code, library versions), training resumes from the last checkpoint in
    ``runs/<pipeline>/_train/<key>``. Under ``--no-cache`` a finished output there is discarded
    and the model is trained again.

    Args:
        train / heldout: the training rows and the held-out rows (eval loss, early stopping).
        base: the model to fine-tune.
        cfg: the ``training`` section.
        ctx: the flow's tracking context (parent run, run folder).
        register_as: registered model name (None: log the model without registering it).
        stage: the stage name (MLflow run, run folder); e.g. ``train.seed_only`` for the ablation.

    Returns:
        ``TrainResult``: the model (with its MLflow run and model URI), the registered version, metrics.
    """
    import mlflow

    with stage_run(ctx, stage) as run:
        log_dataset(train, context="training")
        if heldout is not None:
            log_dataset(heldout, context="heldout")
        mlflow.log_params({**_flat_params(cfg.model_dump(mode="json")), "base_model": base.path,
                           "learning_rate_effective": learning_rate(cfg)})
        # The one training entry: a folder keyed by the content of the inputs and by the code (not
        # by the run id), so a new flow run after a crash (same data, model, config and code)
        # resumes where the killed one stopped; one process or torchrun per training.num_processes
        # (the workers never touch MLflow: their per-step metrics are logged here as they arrive).
        from sftflow.ops.cachekeys import current_stage_key, refresh_cache_requested

        trained = run_training(train=train, heldout=heldout, base=base, cfg=cfg, work_root=pipeline_work_root(ctx.run_dir),
                               on_metrics=step_logger(), module=Path(__file__),
                               discard_finished=refresh_cache_requested(), pointer=ctx.stage_dir(stage) / "work_dir.txt")
        output, key, comps, finished = trained.output, trained.key, trained.components, trained.reused
        if not finished:  # a reused output's numbers are in the run that trained it
            log_training_summary(output)
        lineage_tags = _lineage_tags(comps, key=key, stage_key=current_stage_key())
        mlflow.set_tags({**lineage_tags, TAG_REUSED: str(finished).lower(),
                         "sftflow.train.resumed_from_step": str(output.resumed_from_step)})
        log_json(comps, "train/cache_key.json")
        model_uri, name, version = log_model(model=output.model, template=output.template, metrics=output.metrics,
                                             register_as=register_as, lineage_tags=lineage_tags)
        for card in {output.model.path, output.adapter.path if output.adapter else output.model.path}:
            mlflow.log_artifact(str(Path(card) / "README.md"), artifact_path=f"model_card/{Path(card).name}")
        metrics = output.metrics_dict()
        markdown_artifact(stage.replace(".", "-").replace("_", "-") + "-summary", _summary_markdown(output, model_uri=model_uri, name=name, version=version))
        # The stage's completion marker is the training folder's (export.save_outputs): a cache hit verifies it.
        meta = output.model.meta + (("mlflow_run_id", run.info.run_id), ("model_uri", model_uri))
        model = ModelRef(path=output.model.path, sha256=output.model.sha256, kind=output.model.kind,
                         base=output.model.base, name=output.model.name, meta=meta)
        return TrainResult(model=model, run_id=run.info.run_id, model_uri=model_uri, registered_name=name,
                           registered_version=version, metrics=tuple(sorted(metrics.items())))


# Never cached: it reads the registry. Idempotent instead: a version registered from the same training
# run (tag TAG_SOURCE_RUN) is reused, so a cached rerun of the flow does not register it again.
@task(name="register", task_run_name="register.{stage}", cache_policy=NO_CACHE, persist_result=True)
def register_task(trained: TrainResult, name: str, *, stage: str = "train",
                  tags: dict[str, str] | None = None) -> TrainResult:
    """Register a model that ``train_task`` logged without registering (``register_as=None``).

    Used by ``augmentation.keep_if_helps``: seed+curated and seed-only are both trained, evaluated,
    and only the better one is registered. The version gets the alias ``candidate`` and the tags a
    version registered by ``train_task`` gets (final losses, model sha256, the training run's
    lineage tags), plus ``tags`` (e.g. ``AblationChoice.tags``).

    Args:
        trained: the train stage's result (``model_uri`` of its logged model, ``run_id``).
        name: the registered model name.
        stage: the train stage it came from (names the task run).
        tags: extra version tags.

    Returns:
        ``trained`` with ``registered_name`` / ``registered_version`` set.
    """
    import dataclasses

    import mlflow

    from sftflow.tagnames import TAG_MODEL_SHA256
    from sftflow.tracking.registry import CANDIDATE, LOSS_TAGS, set_alias, set_version_tags

    client = mlflow.MlflowClient()  # the tracking and registry URIs the flow set (start_pipeline_run)
    version = ""
    try:
        for mv in client.search_model_versions(f"name='{name}'"):
            if (mv.tags or {}).get(TAG_SOURCE_RUN) == trained.run_id:
                version = str(max(int(version or 0), int(mv.version)))
    except Exception:  # no such registered model yet
        version = ""
    if not version:
        version = str(mlflow.register_model(trained.model_uri, name).version)
    run_tags = client.get_run(trained.run_id).data.tags
    lineage = {k: v for k, v in run_tags.items() if k in LINEAGE_TAGS}
    set_alias(client, name=name, alias=CANDIDATE, version=version)
    set_version_tags(client, name=name, version=version, tags={
        **{k: f"{v:.6g}" for k, v in trained.metrics if k in LOSS_TAGS},
        **dict(sorted({TAG_MODEL_SHA256: trained.model.sha256, **lineage}.items())),
        TAG_SOURCE_RUN: trained.run_id, "sftflow.train.stage": stage, **(tags or {})})
    return dataclasses.replace(trained, registered_name=name, registered_version=version)


# The training run a version registered by register_task came from.
TAG_SOURCE_RUN = "sftflow.train.source_run"
LINEAGE_TAGS = (TAG_TRAIN_SHA256, TAG_HELDOUT_SHA256, TAG_BASE_SHA256, TAG_TRAIN_KEY, TAG_CODE_DIGEST, TAG_CACHE_KEY)


def _lineage_tags(comps: dict[str, Any], *, key: str,
                  stage_key: tuple[str, dict[str, Any]] | None) -> dict[str, str]:
    """Tags naming the bytes a training run read: train/held-out sha256, base model digest, keys.

    Digests come from the key components, i.e. the files as they were on disk when this run
    started (the datasets are re-verified against them when read).
    """
    inputs = comps["inputs"]
    tags = {
        TAG_TRAIN_SHA256: inputs["train"]["DatasetRef"]["content"],
        TAG_HELDOUT_SHA256: inputs["heldout"]["DatasetRef"]["content"] if inputs.get("heldout") else "",
        TAG_BASE_SHA256: inputs["base"]["ModelRef"]["content"].removeprefix("dir:"),
        TAG_TRAIN_KEY: key,
        TAG_CODE_DIGEST: comps["code"]["digest"],
    }
    if stage_key is not None:  # the Prefect cache key of this task run
        tags[TAG_CACHE_KEY] = stage_key[0]
    return {k: v for k, v in tags.items() if v}


def _flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _summary_markdown(output: TrainOutput, *, model_uri: str, name: str, version: str) -> str:
    m = output.metrics_dict()
    lines = ["# Training", "", f"- model: `{output.model.path}` ({output.model.kind})", f"- MLflow model: `{model_uri}`"]
    if name:
        lines.append(f"- registered: `{name}` version {version} (alias `candidate`)")
    if output.resumed_from_step:
        lines.append(f"- resumed from checkpoint step {output.resumed_from_step}")
    lines += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in sorted(m.items())]
    return "\n".join(lines)

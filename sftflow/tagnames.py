"""Every ``sftflow.*`` MLflow tag name the product writes on runs and model versions (one table).

Runs and registered versions carry them; ``sftflow lineage`` and ``sftflow runs`` read them back.
No imports: any layer (tracking, ops, stages) may use these names.
"""

from __future__ import annotations

# Written on every run sftflow creates (parent pipeline runs and stage runs).
TAG_PIPELINE = "sftflow.pipeline"
TAG_STAGE = "sftflow.stage"
TAG_FLOW_RUN = "sftflow.prefect_flow_run_id"
TAG_CONFIG_HASH = "sftflow.config_hash"
TAG_GIT = "sftflow.git_commit"
TAG_RUN_DIR = "sftflow.run_dir"
TAG_SOURCES = "sftflow.sources_digest"
TAG_KIND = "sftflow.kind"  # "pipeline" on parent runs

# What a stage run computed its cache key from (stage runs).
TAG_CACHE_KEY = "sftflow.cache_key"  # the Prefect cache key of a stage's task run
TAG_CODE_DIGEST = "sftflow.code_digest"  # digest of the stage's code closure

# The bytes a training run read (train stage run and registered model version), as sftflow.digests values.
TAG_TRAIN_SHA256 = "sftflow.train.sha256"  # file_sha256 of the training Parquet
TAG_HELDOUT_SHA256 = "sftflow.heldout.sha256"  # file_sha256 of the held-out Parquet
TAG_BASE_SHA256 = "sftflow.base.sha256"  # dir_sha256 of the base model folder
TAG_MODEL_SHA256 = "sftflow.model.sha256"  # dir_sha256 (ModelRef.sha256) of the registered model's folder
TAG_TRAIN_KEY = "sftflow.train_key"  # names the work folder runs/<pipeline>/_train/<key[:16]>

"""Train from the command line: ``python -m sftflow.training`` (the flow calls ``tasks.train.train_task``).

::

    python -m sftflow.training --train train.parquet --heldout heldout.parquet --base gemma-3-270m \\
        --out /tmp/sft --set max_steps=30 --set lora.r=8

Data parallel on several GPUs (or CPU processes) with the same code::

    torchrun --nproc_per_node 4 -m sftflow.training --train ... --base ... --out ...
    accelerate launch --num_processes 4 -m sftflow.training --train ... --base ... --out ...

Each rank takes every ``world_size``-th batch; gradients are averaged by DDP; rank 0 writes
checkpoints and outputs. A killed run resumes from its last checkpoint when run again with the
same ``--out``. Nothing is logged to MLflow here; the final output is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from sftflow.config import TrainingConfig, apply_overrides
from sftflow.data.refs import DatasetRef
from sftflow.training.loop import LOGGER_NAME, train
from sftflow.training.model import dist_info


def cli_config(pipeline: str | None, sets: list[str]) -> TrainingConfig:
    """TrainingConfig from a pipeline's ``training:`` section (or defaults) plus ``key=value`` overrides."""
    from sftflow.config import resolve_pipeline

    base = resolve_pipeline(pipeline).training.model_dump(mode="json") if pipeline else {}
    raw = apply_overrides(base, sets, prefix="training")
    return TrainingConfig.model_validate(raw)


def main(argv: list[str] | None = None) -> int:
    """``python -m sftflow.training`` (also under torchrun / accelerate launch)."""
    from sftflow.data.refs import sha256_file
    from sftflow.inference.models import resolve_model

    p = argparse.ArgumentParser(prog="python -m sftflow.training", description="Supervised fine-tuning of a causal LM.")
    p.add_argument("--train", required=True, help="canonical Parquet dataset (messages column)")
    p.add_argument("--heldout", help="held-out Parquet dataset for eval loss / early stopping")
    p.add_argument("--base", required=True, help="model name (embedded, tiny-*, local dir or hub id)")
    p.add_argument("--out", required=True, help="output folder (re-run with the same folder to resume)")
    p.add_argument("--pipeline", help="take the training section of this pipeline in pipelines.yaml")
    p.add_argument("--set", dest="sets", action="append", default=[], help="override, e.g. max_steps=20 (repeatable)")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    # Progress lines on stdout, whatever a library configured on the root logger.
    log = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    def ref(path: str, name: str) -> DatasetRef:
        import pyarrow.parquet as pq

        return DatasetRef(path=str(Path(path).resolve()), sha256=sha256_file(path),
                          num_rows=pq.ParquetFile(path).metadata.num_rows, name=name)

    cfg = cli_config(args.pipeline, args.sets)
    out = train(train=ref(args.train, "train"), heldout=ref(args.heldout, "heldout") if args.heldout else None,
                base=resolve_model(args.base, trust_remote_code=args.trust_remote_code), cfg=cfg,
                out_dir=Path(args.out).resolve(), trust_remote_code=args.trust_remote_code)
    if dist_info()[0] == 0:
        print(json.dumps({"model": out.model.path, "kind": out.model.kind, "metrics": out.metrics_dict(),
                          "resumed_from_step": out.resumed_from_step}, indent=1))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

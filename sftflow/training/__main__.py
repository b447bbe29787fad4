"""Train from the command line: ``python -m sftflow.training`` (the flow trains through
``sftflow.training.entry.run_training``: a content-keyed folder, resume, torchrun by ``num_processes``).

::

    python -m sftflow.training --train train.parquet --heldout heldout.parquet --base gemma-3-270m \\
        --out /tmp/sft --set max_steps=30 --set lora.r=8

Data parallel on several GPUs (or CPU processes) with the same code::

    torchrun --nproc_per_node 4 -m sftflow.training --train ... --base ... --out ...
    accelerate launch --num_processes 4 -m sftflow.training --train ... --base ... --out ...

Each rank takes every ``world_size``-th batch; gradients are averaged by DDP; rank 0 writes
checkpoints and outputs. A killed run resumes from its last checkpoint when run again with the
same ``--out``. Nothing is logged to MLflow here; the final output is printed as JSON.

``--job FILE`` is how the train stage runs this under torchrun (``sftflow.training.launch``): the
inputs come from a JSON file, each rank writes its output to ``rank-<r>.log`` in the job's log
folder, and rank 0 appends every step's metrics to a JSONL file the stage replays into MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import torch

from sftflow.config import apply_overrides
from sftflow.config_sections import TrainingConfig
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
    p.add_argument("--job", help="JSON file with every input (written by sftflow.training.launch); "
                                 "replaces --train/--heldout/--base/--out/--set")
    p.add_argument("--train", help="canonical Parquet dataset (messages column)")
    p.add_argument("--heldout", help="held-out Parquet dataset for eval loss / early stopping")
    p.add_argument("--base", help="model name (embedded, tiny-*, local dir or hub id)")
    p.add_argument("--out", help="output folder (re-run with the same folder to resume)")
    p.add_argument("--pipeline", help="take the training section of this pipeline in pipelines.yaml")
    p.add_argument("--set", dest="sets", action="append", default=[], help="override, e.g. max_steps=20 (repeatable)")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    if args.job:
        return run_job(Path(args.job))
    if not (args.train and args.base and args.out):
        p.error("--train, --base and --out are required (or --job)")
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


def run_job(job_file: Path) -> int:
    """One rank of a launched job (``sftflow.training.launch.write_job``); returns the exit status.

    The rank's stdout and stderr (progress lines, warnings, a traceback) go to ``rank-<r>.log`` in
    the job's ``log_dir``, its pid to ``rank-<r>.pid`` (so the launcher can reap it), and a failure
    leaves ``rank-<r>.failed`` with the error, so the launcher names the rank that failed. Rank 0
    appends ``{"step": n, "metrics": {...}}`` lines to ``metrics_file`` after every optimizer step.
    """
    job = json.loads(job_file.read_text())
    rank = dist_info()[0]
    log_dir = Path(job["log_dir"])
    _die_with_parent()
    with open(log_dir / f"rank-{rank}.log", "ab", buffering=0) as f:  # our fds 1/2, children's too
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    (log_dir / f"rank-{rank}.pid").write_text(f"{os.getpid()}\n")
    log = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        from sftflow.data.refs import DatasetRef, ModelRef

        def model_ref(d: dict) -> ModelRef:
            return ModelRef(**{**d, "meta": tuple(tuple(x) for x in d.get("meta", ()))})

        metrics_file = Path(job["metrics_file"])

        def on_metrics(step: int, metrics: dict[str, float]) -> None:
            with open(metrics_file, "a") as m:  # one line per step, flushed at close
                m.write(json.dumps({"step": step, "metrics": metrics}) + "\n")

        out = train(train=DatasetRef(**job["train"]), heldout=DatasetRef(**job["heldout"]) if job["heldout"] else None,
                    base=model_ref(job["base"]), cfg=TrainingConfig.model_validate(job["cfg"]),
                    out_dir=Path(job["out_dir"]), trust_remote_code=bool(job.get("trust_remote_code")),
                    on_metrics=on_metrics if rank == 0 else None)
        if rank == 0:
            log.info("finished: %s (resumed from step %d)", out.model.path, out.resumed_from_step)
    except BaseException as e:
        traceback.print_exc()
        sys.stderr.flush()
        (log_dir / f"rank-{rank}.failed").write_text(f"{type(e).__name__}: {e}\n")
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent (torchrun's agent) dies, even by SIGKILL:
    no rank keeps training as an orphan. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    raise SystemExit(main())

"""THE way the pipeline trains a model: ``run_training``.

Every model the pipeline fine-tunes goes through here: the train stage (``tasks.train``),
backtranslation's backward model M_yx and its curation models M0 / M_k (``sftflow.augment``),
and ``bench/train.py``. It does three things the recipe (``sftflow.training.loop.train``) alone
does not:

* **a content-keyed work folder**: ``<work_root>/<key[:16]>``, where the key
  (``loop.training_key``) covers the bytes of the train/held-out files and of the base model, the
  config, the code closure and the library versions. The flow's work root is
  ``runs/<pipeline>/_train`` (``pipeline_work_root``), outside any one run's folder, so a new
  flow run after a crash finds the same folder;
* **resume**: in that folder the recipe resumes from its last checkpoint (or returns the finished
  output as is) when the inputs are the same; a file lock keeps two concurrent runs with
  identical inputs from sharing it; ``discard_finished`` (``sftflow run --no-cache``) retrains
  a finished output but still resumes an unfinished one;
* **one process or torchrun**, from ``training.num_processes``: one process runs the recipe
  here; more run it data parallel under torchrun (``sftflow.training.launch``), with the same
  global batch ``batch_size x grad_accum x num_processes``.

It logs nowhere but the ``sftflow.train`` logger; ``on_metrics`` receives every optimizer step,
in this process, in both modes (e.g. the train stage's MLflow step logger).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sftflow.config_sections import TrainingConfig
from sftflow.data.refs import DatasetRef, ModelRef
from sftflow.training.export import OUTPUT_FILE, TrainOutput

WORK_FOLDER = "_train"  # runs/<pipeline>/_train/<key[:16]>: the flow's content-keyed training folders
OnMetrics = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainingRun:
    """What ``run_training`` did.

    Attributes:
        output: the recipe's output (model, metrics, loss curve, ``resumed_from_step``).
        work_dir: the content-keyed folder it trained in (``<work_root>/<key[:16]>``).
        key: the full training key (``loop.training_key``).
        components: what the key covers (inputs' digests, code digest, library versions).
        reused: True when a finished output of an earlier run with the same key came back as is
            (nothing was trained; its per-step metrics are in the run that trained it).
    """

    output: TrainOutput
    work_dir: Path
    key: str
    components: dict[str, Any] = field(compare=False, hash=False)
    reused: bool = False


def pipeline_work_root(run_dir: str | Path) -> Path:
    """The flow's work root for a run folder ``runs/<pipeline>/<run-id>``: ``runs/<pipeline>/_train``
    (shared by the pipeline's runs, so a rerun after a crash resumes)."""
    return Path(run_dir).parent / WORK_FOLDER


def run_training(
    *,
    train: DatasetRef,
    heldout: DatasetRef | None,
    base: ModelRef,
    cfg: TrainingConfig,
    work_root: Path,
    trust_remote_code: bool = False,
    on_metrics: OnMetrics | None = None,
    module: str | Path | None = None,
    discard_finished: bool = False,
    pointer: Path | None = None,
    logger: Any = None,
) -> TrainingRun:
    """Train ``base`` on ``train`` in the content-keyed folder below ``work_root``, resuming there.

    Args:
        train / heldout / base / cfg / trust_remote_code: as for ``sftflow.training.loop.train``.
        work_root: where the keyed folders live (the flow: ``pipeline_work_root(run_dir)``).
        on_metrics: called in this process with ``(step, metrics)`` of every optimizer step trained
            now (steps before a resumed checkpoint are not repeated; none for a reused output).
        module: the code whose import closure is part of the key (default: this module, i.e. the
            recipe; the train stage passes its own module).
        discard_finished: delete a finished output with this key first and train again (what
            ``--no-cache`` asks for); the checkpoints of an unfinished run are still resumed.
        pointer: a file that gets the work folder's path before training starts (the stage
            folder's ``work_dir.txt``, so a crashed run shows where its checkpoints are).
        logger: where progress goes (default the ``sftflow.train`` run logger).

    Returns:
        ``TrainingRun``: the output, the folder, the key and whether a finished output was reused.

    Raises:
        ValueError: more processes than GPUs on a CUDA machine; malformed rows (from the recipe).
        sftflow.training.launch.WorkerError: a torchrun worker failed (naming its rank).
    """
    from filelock import FileLock

    from sftflow.progress import run_logger
    from sftflow.training.loop import LOGGER_NAME, training_key

    logger = logger or run_logger(LOGGER_NAME)
    key, comps = training_key(train=train, heldout=heldout, base=base, cfg=cfg,
                              module=Path(module) if module is not None else Path(__file__))
    work_dir = Path(work_root) / key[:16]
    if pointer is not None:
        Path(pointer).parent.mkdir(parents=True, exist_ok=True)
        Path(pointer).write_text(str(work_dir) + "\n")
    work_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(work_dir) + ".lock"):
        done_file = work_dir / OUTPUT_FILE
        if done_file.exists() and discard_finished:
            logger.info("--no-cache: discarding the finished training output in %s", work_dir)
            shutil.rmtree(work_dir)
        before = done_file.stat().st_mtime_ns if done_file.exists() else None
        work_dir.mkdir(parents=True, exist_ok=True)
        if cfg.num_processes > 1:
            from sftflow.training.launch import launch_training

            # Data parallel under torchrun; the workers' per-step metrics come back to this process.
            output = launch_training(train=train, heldout=heldout, base=base, cfg=cfg, out_dir=work_dir,
                                     trust_remote_code=trust_remote_code, on_metrics=on_metrics, logger=logger)
        else:
            from sftflow.training.loop import train as train_in_process

            output = train_in_process(train=train, heldout=heldout, base=base, cfg=cfg, out_dir=work_dir,
                                      trust_remote_code=trust_remote_code, on_metrics=on_metrics)
            # The trained model, its optimizer and peft wrappers form reference cycles: without a
            # collection and a malloc_trim their ~2 GB stay resident into whatever runs next in
            # this process (backtranslation trains M_yx then M0, then generates and scores).
            from sftflow.inference.models import release_memory

            release_memory()
        reused = before is not None and done_file.exists() and done_file.stat().st_mtime_ns == before
    return TrainingRun(output=output, work_dir=work_dir, key=key, components=comps, reused=reused)

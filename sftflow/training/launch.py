"""Data-parallel training from the flow: the recipe in ``num_processes`` processes under torchrun.

Called by the one training entry (``sftflow.training.entry.run_training``) when
``training.num_processes`` > 1; the pipeline never calls it directly.

``launch_training`` has the signature and result of ``sftflow.training.loop.train`` but runs it as
``python -m torch.distributed.run --standalone --nproc_per_node N -m sftflow.training --job FILE``
(DDP; gloo on CPU, NCCL with one GPU per process; see ``loop.train`` for how the global batch
``batch_size x grad_accum x N`` is split between the ranks). The inputs travel in a JSON file in
the training folder; rank 0 writes the outputs there (``export.finished_output``), and appends each
step's metrics to a JSONL file that this process tails while the workers run, so an ``on_metrics``
callback (the train stage's MLflow logger) sees every step live, in the calling process: the
workers never talk to MLflow. Checkpoints and resume are the recipe's own: launching again with the
same folder and inputs resumes from the last checkpoint (of a run with the same number of
processes: the world size is part of the run's fingerprint).

A failed worker surfaces as one ``WorkerError`` naming the rank and quoting the end of its log
(``launch/rank-<r>.log`` in the training folder). No worker outlives the launch: torchrun runs in
its own process group and is stopped with it; each rank asks the kernel to end it when torchrun
dies; and leftover ranks are killed by pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from sftflow.config_sections import TrainingConfig
from sftflow.data.refs import DatasetRef, ModelRef

LAUNCH_DIR = "launch"  # inside the training folder: job.json, torchrun.log, rank-<r>.log, metrics.jsonl
OnMetrics = Callable[[int, dict[str, float]], None]


class WorkerError(RuntimeError):
    """A training worker failed (the message names the rank and quotes its last log lines)."""


def write_job(*, train: DatasetRef, heldout: DatasetRef | None, base: ModelRef, cfg: TrainingConfig, out_dir: Path,
              trust_remote_code: bool = False) -> Path:
    """Write the inputs of a launched run to ``<out_dir>/launch/job.json`` (read by ``python -m
    sftflow.training --job``) in a fresh launch folder; returns the file."""
    launch_dir = Path(out_dir) / LAUNCH_DIR
    shutil.rmtree(launch_dir, ignore_errors=True)  # the logs and metrics of an earlier attempt
    launch_dir.mkdir(parents=True)
    job = {"train": asdict(train), "heldout": asdict(heldout) if heldout is not None else None,
           "base": asdict(base), "cfg": cfg.model_dump(mode="json"), "out_dir": str(Path(out_dir).resolve()),
           "trust_remote_code": trust_remote_code, "log_dir": str(launch_dir.resolve()),
           "metrics_file": str((launch_dir / "metrics.jsonl").resolve())}
    path = launch_dir / "job.json"
    path.write_text(json.dumps(job, indent=1, default=list))
    return path


def torchrun_command(job_file: Path, *, num_processes: int) -> list[str]:
    """The command line that runs ``job_file`` in ``num_processes`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
            "--max_restarts", "0", "-m", "sftflow.training", "--job", str(job_file)]


def worker_env(*, num_processes: int) -> dict[str, str]:
    """The workers' environment: ours, with the code importable, a fair share of CPU threads each
    (torch's intra-op threads across processes would otherwise oversubscribe the cores), and no
    MLflow run to attach to (only the launching process logs)."""
    import sftflow

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID",)}
    root = str(Path(sftflow.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // num_processes)))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch_training(*, train: DatasetRef, heldout: DatasetRef | None, base: ModelRef, cfg: TrainingConfig,
                    out_dir: Path, trust_remote_code: bool = False, on_metrics: OnMetrics | None = None,
                    num_processes: int | None = None, logger: Any = None, poll_s: float = 0.5) -> Any:
    """``sftflow.training.loop.train`` in ``num_processes`` data-parallel processes (torchrun).

    Args:
        train / heldout / base / cfg / out_dir / trust_remote_code: as for ``loop.train``.
        on_metrics: called here, in this process, with ``(step, metrics)`` of every optimizer step
            rank 0 trained (steps before a resumed checkpoint are not repeated), while the run goes.
        num_processes: processes (default ``cfg.num_processes``).
        logger: where rank 0's progress lines are forwarded (default the ``sftflow.train`` logger).
        poll_s: seconds between looks at the workers' metrics and logs.

    Returns:
        The ``TrainOutput`` rank 0 wrote (or the finished output of an earlier identical run).

    Raises:
        ValueError: more processes than GPUs on a CUDA machine.
        WorkerError: a worker failed or was killed (the message names the rank, with its last log lines).
    """
    import torch

    from sftflow.progress import run_logger
    from sftflow.training.export import finished_output
    from sftflow.training.loop import LOGGER_NAME, _fingerprint

    n = num_processes or cfg.num_processes
    logger = logger or run_logger(LOGGER_NAME)
    out_dir = Path(out_dir)
    fingerprint = _fingerprint(train=train, heldout=heldout, base=base, cfg=cfg, world=n)
    done = finished_output(out_dir, fingerprint)
    if done is not None:  # no need to start N interpreters to find that out
        logger.info("training output in %s is complete for this config and data; reusing it", out_dir)
        return done
    if torch.cuda.is_available() and n > torch.cuda.device_count():
        raise ValueError(f"training.num_processes={n} but this machine has {torch.cuda.device_count()} GPU(s): "
                         "data-parallel training runs one process per GPU")
    out_dir.mkdir(parents=True, exist_ok=True)
    job = write_job(train=train, heldout=heldout, base=base, cfg=cfg, out_dir=out_dir,
                    trust_remote_code=trust_remote_code)
    launch_dir = job.parent
    logger.info("training in %d processes (torchrun, %s); logs in %s", n,
                "nccl" if torch.cuda.is_available() else "gloo", launch_dir)
    metrics = _Tail(launch_dir / "metrics.jsonl")
    progress = _Tail(launch_dir / "rank-0.log")

    def pump() -> None:
        for line in metrics.lines():
            rec = json.loads(line)
            if on_metrics is not None:
                on_metrics(int(rec["step"]), {k: float(v) for k, v in rec["metrics"].items()})
        for line in progress.lines():
            if LOGGER_NAME in line:  # the recipe's progress lines, not library warnings
                logger.info(line.split(f"{LOGGER_NAME} ", 1)[-1])

    with open(launch_dir / "torchrun.log", "wb") as agent_log:
        proc = subprocess.Popen(torchrun_command(job, num_processes=n), env=worker_env(num_processes=n),
                                stdout=agent_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                pump()
                time.sleep(poll_s)
            pump()
        finally:
            _stop(proc, launch_dir)
    if proc.returncode != 0:
        raise WorkerError(failure_message(launch_dir, returncode=proc.returncode, num_processes=n))
    output = finished_output(out_dir, fingerprint)
    if output is None:
        raise WorkerError(f"the {n} training processes exited cleanly but left no finished output in {out_dir} "
                          f"(see {launch_dir})")
    return output


class _Tail:
    """New complete lines of a file that another process appends to."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.rest = path, 0, b""

    def lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            chunk = f.read()
        self.pos += len(chunk)
        *done, self.rest = (self.rest + chunk).split(b"\n")
        return [x.decode(errors="replace") for x in done if x.strip()]


def _stop(proc: subprocess.Popen, launch_dir: Path, *, grace_s: float = 10.0) -> None:
    """Stop torchrun (if still running) and every rank it started; a no-op after a clean exit."""
    if proc.poll() is None:
        # SIGTERM first: torchrun's agent then stops its workers itself.
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Ranks run in sessions of their own (torchrun starts them so): reap any left by pid.
    for pid_file in launch_dir.glob("rank-*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path("/proc").exists() else b"sftflow.training"
        except (ValueError, OSError):
            continue  # gone (or never written)
        if b"sftflow.training" in cmdline:  # still our worker, not a recycled pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def failure_message(launch_dir: Path, *, returncode: int, num_processes: int, tail: int = 25) -> str:
    """One error for a failed launch: which rank failed, how, and the last lines of its log.

    The culprit is a rank killed by a signal (torchrun's summary), else the rank whose error came
    first (``rank-<r>.failed``: the others' errors are usually the collective breaking after it).
    """
    agent_log = launch_dir / "torchrun.log"
    agent = agent_log.read_text(errors="replace") if agent_log.exists() else ""
    exits = [(int(r), int(c)) for r, c in re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", agent)]
    # (SIGTERM last: it is what torchrun sends the surviving ranks once one has died)
    killed = sorted(((r, c) for r, c in exits if c < 0), key=lambda rc: rc[1] == -signal.SIGTERM)
    failed = sorted(launch_dir.glob("rank-*.failed"), key=lambda p: p.stat().st_mtime_ns)
    rank: int | None = None
    how = ""
    if killed:
        rank, code = killed[0]
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        how = f"killed by {name}"
    elif failed:
        rank = int(failed[0].name.split("-")[1].split(".")[0])
        how = failed[0].read_text().strip()
    elif exits:
        rank, code = exits[0]
        how = f"exit code {code}"
    if rank is None:
        lines = agent.splitlines()[-tail:]
        return (f"multi-process training ({num_processes} processes) failed: torchrun exited with {returncode}; "
                f"last lines of {agent_log}:\n" + "\n".join(lines))
    log = launch_dir / f"rank-{rank}.log"
    lines = log.read_text(errors="replace").splitlines()[-tail:] if log.exists() else ["(no log)"]
    return (f"multi-process training ({num_processes} processes) failed in rank {rank}: {how}; "
            f"last lines of {log}:\n" + "\n".join(lines))

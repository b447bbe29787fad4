"""Data-parallel training in 2 CPU processes (torchrun, DDP over gloo) on a tiny random model:
same loss curve as one process at the same global batch, resume after a kill, rank-0-only outputs
and MLflow logging from the stage's process, a killed worker named in one error and no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sftflow.data.records import records_to_frame
from sftflow.data.refs import write_parquet

from test_train import _cfg, _records


@pytest.fixture()
def data(sftflow_home: Path, monkeypatch: pytest.MonkeyPatch):
    # 22 rows: with 4 rows per optimizer step the epoch's last global batch is partial (2 rows),
    # and 8 steps run into the second epoch.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per worker on a small box
    train = write_parquet(records_to_frame(_records(22)), sftflow_home / "data" / "train.parquet", name="train")
    heldout = write_parquet(records_to_frame(_records(8, 100)), sftflow_home / "data" / "heldout.parquet", name="heldout")
    return train, heldout


def _assert_same_curve(a: list[dict], b: list[dict]) -> None:
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "eval_loss", "label_tokens"):
            assert (key in x) == (key in y), key
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _pids(launch_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(launch_dir.glob("rank-*.pid"))]


def test_global_batches_do_not_depend_on_the_split() -> None:
    """batch 4 x 1 process = batch 2 x 2 processes = batch 2 x grad_accum 2: the same rows per step."""
    import numpy as np

    from sftflow.training.data import epoch_batches

    lengths = np.random.default_rng(0).integers(10, 300, size=23).tolist()

    def steps(cfg, world: int) -> list[set[int]]:
        b = epoch_batches(lengths, cfg=cfg, epoch=0, world=world)
        per = cfg.grad_accum * world
        return [set(i for part in b[s : s + per] for i in part) for s in range(0, len(b), per)]

    one = steps(_cfg(batch_size=4), 1)
    assert steps(_cfg(batch_size=2), 2) == one == steps(_cfg(batch_size=2, grad_accum=2), 1)
    assert steps(_cfg(batch_size=1, grad_accum=2), 2) == one
    assert sorted(i for s in one for i in s) == list(range(23))  # every row once per epoch
    assert epoch_batches(lengths, cfg=_cfg(batch_size=4), epoch=0, world=1) == \
        [sorted(s, key=lambda i: -lengths[i]) for s in one]  # 1 process, no accumulation: plain batches


def test_two_processes_match_one_process_and_only_the_stage_logs(sftflow_home: Path, data) -> None:
    """The train stage with num_processes=2, batch 2 trains the loss curve of 1 process, batch 4;
    rank 0 alone writes outputs; metrics and the model reach MLflow from the stage's process."""
    import mlflow

    from sftflow.inference.tiny import build_tiny_model
    from sftflow.tracking.runs import StageContext, default_tracking_uri, ensure_experiment
    from sftflow.training.loop import train
    from tasks.train import train_task

    base = build_tiny_model("tiny-gemma")
    one = train(train=data[0], heldout=data[1], base=base, cfg=_cfg(batch_size=4, max_steps=8, eval_every=4),
                out_dir=sftflow_home / "one")

    uri = default_tracking_uri()
    exp = ensure_experiment("sftflow-unit", uri=uri)
    ctx = StageContext(pipeline="unit", run_id="r1", run_dir=str(sftflow_home / "runs" / "unit" / "r1"),
                       tracking_uri=uri, experiment_id=exp, parent_run_id="")
    cfg2 = _cfg(batch_size=2, max_steps=8, eval_every=4, num_processes=2)
    result = train_task.fn(data[0], data[1], base, cfg2, ctx=ctx, register_as="sftflow-mp")
    work_dir = Path((sftflow_home / "runs" / "unit" / "r1" / "train" / "work_dir.txt").read_text().strip())
    two = json.loads((work_dir / "history.json").read_text())
    _assert_same_curve(one.history(), two)

    # Rank 0 wrote the outputs and the metrics; rank 1 trained (its log exists) but wrote neither.
    launch = work_dir / "launch"
    assert (work_dir / "train_output.json").exists() and (work_dir / "merged").is_dir()
    assert [json.loads(x)["step"] for x in (launch / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
    assert "step 8/8" in (launch / "rank-0.log").read_text()
    assert (launch / "rank-1.log").exists() and "step 1/8" not in (launch / "rank-1.log").read_text()
    assert not list(launch.glob("rank-*.failed"))
    assert not any(_alive(p) for p in _pids(launch))

    # MLflow: one run (the stage's), every step once, values as trained, one registered version.
    client = mlflow.MlflowClient()
    runs = client.search_runs([exp])
    assert [r.info.run_id for r in runs] == [result.run_id]
    hist = sorted(client.get_metric_history(result.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(1, 9))
    assert [m.value for m in hist] == pytest.approx([h["loss"] for h in two], rel=1e-12)
    evals = client.get_metric_history(result.run_id, "eval_loss")
    assert sorted(m.step for m in evals if m.step) == [4, 8]  # (step 0: the run summary's final eval loss)
    assert result.registered_version == "1" and dict(result.metrics)["steps"] == 8.0
    assert runs[0].data.params["num_processes"] == "2"


def test_two_processes_resume_after_a_kill(sftflow_home: Path, data) -> None:
    """Kill torchrun (SIGKILL) after a checkpoint: its ranks die with it, and launching again
    resumes and ends on the loss curve of an uninterrupted run."""
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.launch import launch_training, torchrun_command, worker_env, write_job
    from sftflow.training.loop import train

    base = build_tiny_model("tiny-gemma")
    ref = train(train=data[0], heldout=data[1], base=base,
                cfg=_cfg(batch_size=4, max_steps=10, eval_every=5, checkpoint_every=3), out_dir=sftflow_home / "ref")
    cfg = _cfg(batch_size=2, max_steps=10, eval_every=5, checkpoint_every=3, num_processes=2)
    out = sftflow_home / "two"
    job = write_job(train=data[0], heldout=data[1], base=base, cfg=cfg, out_dir=out)
    proc = subprocess.Popen(torchrun_command(job, num_processes=2), env=worker_env(num_processes=2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any((p / "state.json").exists() for p in (out / "checkpoints").glob("step-*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    pids = _pids(job.parent)
    assert len(pids) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "ranks outlived their torchrun"
    assert not (out / "train_output.json").exists()

    steps: list[int] = []
    resumed = launch_training(train=data[0], heldout=data[1], base=base, cfg=cfg, out_dir=out,
                              on_metrics=lambda s, m: steps.append(s))
    assert resumed.resumed_from_step in (3, 6, 9)
    assert steps == list(range(resumed.resumed_from_step + 1, 11))  # only what this launch trained
    _assert_same_curve(ref.history(), resumed.history())
    # Launching a finished run again returns its output without starting workers.
    stamp = (out / "train_output.json").stat().st_mtime_ns
    again = launch_training(train=data[0], heldout=data[1], base=base, cfg=cfg, out_dir=out)
    assert again == resumed and (out / "train_output.json").stat().st_mtime_ns == stamp


def test_a_killed_worker_is_one_error_naming_its_rank(sftflow_home: Path, data) -> None:
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.launch import WorkerError, launch_training

    base = build_tiny_model("tiny-gemma")
    out = sftflow_home / "killed"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            launch_training(train=data[0], heldout=None, base=base, out_dir=out,
                            cfg=_cfg(batch_size=2, max_steps=2000, num_processes=2, checkpoint_every=None))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    launch = out / "launch"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and t.is_alive():
        if (launch / "metrics.jsonl").exists() and (launch / "metrics.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    pids = _pids(launch)
    assert len(pids) == 2 and t.is_alive()
    os.kill(int((launch / "rank-1.pid").read_text()), signal.SIGKILL)
    t.join(120)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], WorkerError), errors
    msg = str(errors[0])
    assert "failed in rank 1" in msg and "SIGKILL" in msg and "rank-1.log" in msg
    assert not any(_alive(p) for p in pids)
    assert not (out / "train_output.json").exists()

"""The one training entry (``sftflow.training.entry.run_training``) on the tiny random model, real training:

(a) backtranslation's backward and curation models train through it, in content-keyed folders
    below the pipeline's work root, in ``training.num_processes`` processes, and a second run of the
    stage (a new flow run) finds them finished instead of retraining;
(b) a training killed (SIGKILL, a real subprocess) after a checkpoint resumes from it, and ends on
    the loss curve of an uninterrupted run;
(c) ``num_processes: 2`` goes through torchrun (rank logs, metrics back in this process) with the
    global batch of one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from sftflow.config_sections import AugmentationConfig, CorpusConfig, TrainingConfig
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet

REPO = Path(__file__).resolve().parents[2]
LEADS = REPO / "data" / "unlabeled" / "wikipedia_leads_400.json"


def _cfg(**kw) -> TrainingConfig:
    base = {"batch_size": 4, "max_steps": 4, "learning_rate": 3e-3, "precision": "fp32", "checkpoint_every": None,
            "max_seq_len": 128, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    return TrainingConfig.model_validate({**base, **kw})


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [make_record([{"role": "user", "content": f"What is {i} plus {i}? Explain briefly."},
                         {"role": "assistant", "content": f"The answer is {2 * i}, since {i} and {i} make {2 * i}."}],
                        source="unit:entry") for i in range(offset, offset + n)]


@pytest.fixture()
def train_ref(sftflow_home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per torchrun worker on a small box
    return write_parquet(records_to_frame(_rows(16)), sftflow_home / "data" / "train.parquet", name="train")


def _same_curve(a: list[dict], b: list[dict]) -> None:
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), x["step"]


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- (a) backtranslation
def test_backtranslation_models_train_through_the_entry_in_keyed_folders(sftflow_home: Path, train_ref) -> None:
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training import entry
    from sftflow.training.loop import training_key
    from tasks.backtranslate import backtranslate

    base = build_tiny_model("tiny-gemma")
    corpus = sftflow_home / "leads.json"
    corpus.write_text(json.dumps(dict(list(json.loads(LEADS.read_text()).items())[:6])))
    cfg = AugmentationConfig(
        enabled=True, corpus=CorpusConfig(name="wiki", path=str(corpus)), max_segments=3, min_words=10,
        max_words=120, reject_truncated=False, backward_training={"max_steps": 2}, forward_training={"max_steps": 2},
        generation={"max_new_tokens": 6, "batch_size": 4}, curation={"threshold": 1.0, "batch_size": 4},
    )
    # Two processes at batch 1: the global batch of the pipeline's training section (2 x 1 = 2).
    training = _cfg(batch_size=1, num_processes=2)
    runs = sftflow_home / "runs" / "p"
    work_root = entry.pipeline_work_root(runs / "r1")
    assert work_root == runs / "_train"

    out = backtranslate(seed=train_ref, base=base, cfg=cfg, training=training, out_dir=runs / "r1" / "backtranslate",
                        work_root=work_root)
    backward, curation = out.helpers
    key, _ = training_key(train=out.reversed, heldout=None, base=base, cfg=cfg.backward(training),
                          module=Path(entry.__file__))
    assert backward.run.key == key and backward.run.work_dir == work_root / key[:16]
    assert Path(out.backward_model.path).parent == backward.run.work_dir and not backward.run.reused
    assert Path(out.curation_model.path).parent == curation.run.work_dir != backward.run.work_dir
    for helper in (backward, curation):
        # training.num_processes=2 reached the helper models: they trained under torchrun, 2 ranks.
        launch = helper.run.work_dir / "launch"
        assert (launch / "rank-0.log").exists() and (launch / "rank-1.log").exists(), helper.run_name
        assert [json.loads(x)["step"] for x in (launch / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    # A new flow run (another run folder) after the first: same content, same folders, nothing retrained,
    # the same candidates.
    again = backtranslate(seed=train_ref, base=base, cfg=cfg, training=training,
                          out_dir=runs / "r2" / "backtranslate", work_root=work_root)
    assert [h.run.work_dir for h in again.helpers] == [h.run.work_dir for h in out.helpers]
    assert all(h.run.reused for h in again.helpers)
    assert _sha(again.candidates.path) == _sha(out.candidates.path) and _sha(again.curated.path) == _sha(out.curated.path)


# --------------------------------------------------------------------------- (b) resume after a kill
_CHILD = """
import json, sys, time
from pathlib import Path
from sftflow.config_sections import TrainingConfig
from sftflow.data.refs import DatasetRef, ModelRef
from sftflow.training.entry import run_training

job = json.loads(sys.argv[1])
base = ModelRef(**{**job["base"], "meta": tuple(tuple(x) for x in job["base"].get("meta", ()))})
# Slow steps, so the parent can kill the run between its first checkpoint and its end.
run_training(train=DatasetRef(**job["train"]), heldout=None, base=base, cfg=TrainingConfig.model_validate(job["cfg"]),
             work_root=Path(job["work_root"]), on_metrics=lambda step, metrics: time.sleep(0.4))
"""


def test_a_killed_training_resumes_from_its_checkpoint(sftflow_home: Path, train_ref) -> None:
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.entry import run_training

    base = build_tiny_model("tiny-gemma")
    cfg = _cfg(max_steps=10, checkpoint_every=2)
    ref = run_training(train=train_ref, heldout=None, base=base, cfg=cfg, work_root=sftflow_home / "uninterrupted")

    work_root = sftflow_home / "runs" / "p" / "_train"
    job = {"train": asdict(train_ref), "base": asdict(base), "cfg": cfg.model_dump(mode="json"),
           "work_root": str(work_root)}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(job, default=list)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any((p / "state.json").exists() for p in work_root.glob("*/checkpoints/step-*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    [work_dir] = [p for p in work_root.iterdir() if p.is_dir()]
    assert not (work_dir / "train_output.json").exists()  # killed mid-run

    steps: list[int] = []
    resumed = run_training(train=train_ref, heldout=None, base=base, cfg=cfg, work_root=work_root,
                           on_metrics=lambda step, metrics: steps.append(step))
    assert resumed.work_dir == work_dir and not resumed.reused  # the same keyed folder, the lock released
    assert resumed.output.resumed_from_step in (2, 4, 6, 8)
    assert steps == list(range(resumed.output.resumed_from_step + 1, 11))  # only the steps after the checkpoint
    _same_curve(ref.output.history(), resumed.output.history())

    # Finished: the same call returns the output as is; discard_finished (--no-cache) trains again.
    assert run_training(train=train_ref, heldout=None, base=base, cfg=cfg, work_root=work_root).reused
    fresh = run_training(train=train_ref, heldout=None, base=base, cfg=cfg, work_root=work_root, discard_finished=True)
    assert not fresh.reused and fresh.output.resumed_from_step == 0
    _same_curve(ref.output.history(), fresh.output.history())


# --------------------------------------------------------------------------- (c) torchrun
def test_two_processes_go_through_torchrun_with_the_same_global_batch(sftflow_home: Path, train_ref) -> None:
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.entry import run_training

    base = build_tiny_model("tiny-gemma")
    one = run_training(train=train_ref, heldout=None, base=base, cfg=_cfg(batch_size=4), work_root=sftflow_home / "w")
    assert not (one.work_dir / "launch").exists()  # one process: in this process, no torchrun

    steps: list[int] = []
    two = run_training(train=train_ref, heldout=None, base=base, cfg=_cfg(batch_size=2, num_processes=2),
                       work_root=sftflow_home / "w", on_metrics=lambda step, metrics: steps.append(step))
    assert two.work_dir.parent == one.work_dir.parent and two.key != one.key  # num_processes is in the key
    launch = two.work_dir / "launch"
    # launch_training's job file and torchrun's agent log, and a log per rank (ranks 0 and 1).
    assert (launch / "job.json").exists() and (launch / "torchrun.log").exists()
    assert (launch / "rank-0.log").exists() and (launch / "rank-1.log").exists()
    assert steps == [1, 2, 3, 4]  # rank 0's metrics, back in this process while it ran
    _same_curve(one.output.history(), two.output.history())  # 2 x batch 2 trains what 1 x batch 4 trains

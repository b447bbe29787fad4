"""The SFT recipe (sftflow.training) and stage (tasks.train) on tiny random models: loss, batching,
the shared held-out loss, resume after SIGKILL, MLflow registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftflow.config_sections import TrainingConfig
from sftflow.inference.formatting import IGNORE_INDEX, encode_for_training
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet
from sftflow import markers

REPO = Path(__file__).resolve().parents[2]


def _records(n: int, offset: int = 0) -> list[dict]:
    words = ["red", "green", "blue", "yellow", "black", "white"]
    out = []
    for i in range(offset, offset + n):
        q = f"What is {i} plus {i}?" + (" Explain briefly." * (i % 5))
        a = f"The answer is {2 * i}. " + " ".join(words[(i + k) % 6] for k in range(i % 7))
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 4 == 0:
            msgs = [{"role": "system", "content": "Answer tersely."}] + msgs
        out.append(make_record(msgs, source="unit:synthetic"))
    return out


@pytest.fixture()
def data(sftflow_home: Path):
    train = write_parquet(records_to_frame(_records(24)), sftflow_home / "data" / "train.parquet", name="train")
    heldout = write_parquet(records_to_frame(_records(8, 100)), sftflow_home / "data" / "heldout.parquet", name="heldout")
    return train, heldout


def _cfg(**kw) -> TrainingConfig:
    base = {"batch_size": 4, "max_steps": 6, "learning_rate": 3e-3, "precision": "fp32", "checkpoint_every": None,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    return TrainingConfig.model_validate({**base, **kw})


# ----------------------------------------------------------------------------- loss
def test_fused_cross_entropy_matches_reference() -> None:
    from sftflow.training.loss import FusedLinearCrossEntropy

    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    for softcap in (None, 5.0):
        ours = FusedLinearCrossEntropy.apply(h, w, b, t, softcap, torch.float32, 8)
        gh, gw, gb = torch.autograd.grad(ours * 0.5, (h, w, b))
        logits = h @ w.T + b
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        ref = torch.nn.functional.cross_entropy(logits, t, reduction="sum")
        rh, rw, rb = torch.autograd.grad(ref * 0.5, (h, w, b))
        assert torch.allclose(ours, ref, rtol=1e-5)
        for a, r in ((gh, rh), (gw, rw), (gb, rb)):
            assert torch.allclose(a, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-chatml"])
def test_label_position_loss_equals_model_loss(sftflow_home: Path, name: str) -> None:
    """The head-only loss equals transformers' own masked loss on the same batch."""
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.data import collate
    from sftflow.training.loss import CausalLMLoss

    model, tok = load_model(build_tiny_model(name))
    rows = [encode_for_training(tok, r["messages"], template="gemma", max_len=None) for r in _records(3)]
    batch = collate(rows, [0, 1, 2], packed=False, pad_id=tok.pad_token_id, max_len=512)
    loss_sum, n = CausalLMLoss(model, compute_dtype=torch.float32)(
        batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(loss_sum / n, ref, rtol=1e-4)


def test_packing_isolates_examples(sftflow_home: Path) -> None:
    """A packed example sees only itself: its hidden states equal those of the example alone."""
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.data import collate

    model, tok = load_model(build_tiny_model("tiny-gemma"))
    rows = [encode_for_training(tok, r["messages"], template="gemma", max_len=None) for r in _records(3, 7)]
    packed = collate(rows, [[0, 1, 2]], packed=True, pad_id=tok.pad_token_id, max_len=512)
    la, lb = len(rows[0][0]), len(rows[1][0])
    assert packed["position_ids"][0, la].item() == 0 and packed["position_ids"][0, la + lb].item() == 0
    # The first token of each packed example is never a target of the previous example.
    assert packed["labels"][0, la].item() == IGNORE_INDEX
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([rows[1][0]]), use_cache=False).logits[0]
    assert torch.allclose(out[la : la + lb], alone, atol=1e-4)


def test_length_grouping_cuts_padding() -> None:
    import numpy as np

    from sftflow.training.data import collate, epoch_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 400, size=256).tolist()
    rows = [([1] * n, [1] * n) for n in lengths]
    cfg = _cfg(batch_size=8)

    def pad_fraction(batches) -> float:
        ts = [collate(rows, b, packed=cfg.packing, pad_id=0, max_len=512) for b in batches]
        return 1 - sum(int(t["n_tokens"]) for t in ts) / sum(t["input_ids"].numel() for t in ts)

    grouped = epoch_batches(lengths, cfg=cfg, epoch=0, world=1)
    shuffled = [list(range(k, k + 8)) for k in range(0, 256, 8)]
    assert sorted(i for b in grouped for i in b) == list(range(256))  # every row once per epoch
    assert pad_fraction(grouped) < 0.05 < pad_fraction(shuffled)
    assert epoch_batches(lengths, cfg=cfg, epoch=0, world=1) == grouped  # deterministic (resumable)
    assert epoch_batches(lengths, cfg=cfg, epoch=1, world=1) != grouped  # reshuffled per epoch
    packed_cfg = _cfg(batch_size=2, packing=True, max_seq_len=512)
    packed = epoch_batches(lengths, cfg=packed_cfg, epoch=0, world=1)
    assert sorted(i for b in packed for bin_ in b for i in bin_) == list(range(256))
    assert all(sum(lengths[i] for i in bin_) <= 512 for b in packed for bin_ in b)


def test_overlong_truncate_and_drop_are_counted(sftflow_home: Path, data) -> None:
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.data import encode_dataset

    train, _ = data
    _, tok = load_model(build_tiny_model("tiny-gemma"))
    full = encode_dataset(train, tok, template="gemma", cfg=_cfg(max_seq_len=4096))
    limit = sorted(len(ids) for ids, _ in full.rows)[len(full.rows) // 2]
    longer = sum(len(ids) > limit for ids, _ in full.rows)
    trunc = encode_dataset(train, tok, template="gemma", cfg=_cfg(max_seq_len=limit, overlong="truncate"))
    drop = encode_dataset(train, tok, template="gemma", cfg=_cfg(max_seq_len=limit, overlong="drop"))
    assert trunc.truncated + trunc.dropped_no_labels == longer and drop.dropped_overlong == longer
    assert len(drop.rows) == 24 - longer and all(len(ids) <= limit for ids, _ in trunc.rows)


def test_malformed_row_names_the_row(sftflow_home: Path) -> None:
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.data import encode_dataset

    rec = make_record([{"role": "user", "content": "only a question"}], source="unit:bad")
    ref = write_parquet(records_to_frame([rec]), sftflow_home / "bad.parquet", name="train")
    _, tok = load_model(build_tiny_model("tiny-gemma"))
    with pytest.raises(ValueError, match=rf"bad.parquet: row id='{rec['id']}'.*assistant"):
        encode_dataset(ref, tok, template="gemma", cfg=_cfg())


def test_qlora_without_cuda_is_a_clear_error(sftflow_home: Path, data) -> None:
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.loop import train

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="qlora needs a CUDA GPU"):
        train(train=data[0], heldout=None, base=build_tiny_model("tiny-gemma"), cfg=_cfg(method="qlora"),
              out_dir=sftflow_home / "q")


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["dora", "rslora", "full"])
def test_methods_train_and_lower_the_loss(sftflow_home: Path, data, method: str) -> None:
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.loop import train

    out = train(train=data[0], heldout=data[1], base=build_tiny_model("tiny-gemma"),
                cfg=_cfg(method=method, max_steps=8, eval_every=8, learning_rate=3e-3, packing=method == "full"),
                out_dir=sftflow_home / method)
    hist = json.loads((Path(out.out_dir) / "history.json").read_text())
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert out.model.kind == "merged" and (Path(out.model.path) / "model.safetensors").exists()
    assert (out.adapter is None) == (method == "full")
    if out.adapter is not None:
        cfg = json.loads((Path(out.adapter.path) / "adapter_config.json").read_text())
        assert cfg["use_dora"] == (method == "dora") and cfg["use_rslora"] == (method == "rslora")
    # The merged model is the base architecture: every parameter of the trained model but the adapter's.
    model, _ = load_model(out.model)
    m = out.metrics_dict()
    adapter_params = 0 if method == "full" else m["trainable_params"]
    if method != "full":
        assert 0 < adapter_params < m["total_params"]
    assert sum(p.numel() for p in model.parameters()) == m["total_params"] - adapter_params


def test_early_stopping_stops_when_eval_loss_stalls(sftflow_home: Path, data) -> None:
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.loop import train

    # A learning rate of 1e-12 leaves the eval loss flat: every eval after the first is "no improvement".
    out = train(train=data[0], heldout=data[1], base=build_tiny_model("tiny-gemma"),
                cfg=_cfg(max_steps=20, eval_every=1, early_stopping_patience=2, learning_rate=1e-12, warmup_ratio=0),
                out_dir=sftflow_home / "es")
    m = out.metrics_dict()
    assert m["stopped_early"] == 1.0 and m["steps"] == 3.0


def _cli(home: Path, out: Path, data, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sftflow.training", "--train", data[0].path, "--heldout", data[1].path,
            "--base", "tiny-gemma", "--out", str(out), *extra]


def test_resume_after_sigkill_matches_uninterrupted_run(sftflow_home: Path, data) -> None:
    """Kill a real training process after a checkpoint; re-running it ends where an uninterrupted run ends."""
    from sftflow.inference.tiny import build_tiny_model

    build_tiny_model("tiny-gemma")  # once, before the subprocesses
    sets = ["--set", "max_steps=24", "--set", "checkpoint_every=4", "--set", "eval_every=10", "--set", "batch_size=4",
            "--set", "lora.dropout=0.1", "--set", "neftune_alpha=5", "--set", "precision=fp32",
            "--set", "learning_rate=2e-3", "--set", "log_every=1"]
    env = {**os.environ, "SFTFLOW_HOME": str(sftflow_home), "PYTHONPATH": str(REPO)}
    ref_out, cut_out = sftflow_home / "uninterrupted", sftflow_home / "interrupted"
    subprocess.run(_cli(sftflow_home, ref_out, data, *sets), env=env, cwd=REPO, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_cli(sftflow_home, cut_out, data, *sets), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any((p / "state.json").exists() for p in (cut_out / "checkpoints").glob("step-*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut_out / "train_output.json").exists()
    ckpt = sorted((cut_out / "checkpoints").glob("step-*"))
    assert ckpt and int(ckpt[-1].name.split("-")[1]) < 24

    res = subprocess.run(_cli(sftflow_home, cut_out, data, *sets), env=env, cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=300)
    resumed = json.loads(res.stdout[res.stdout.index("{\n"):])
    assert resumed["resumed_from_step"] >= 4
    a, b = (json.loads((o / "history.json").read_text()) for o in (ref_out, cut_out))
    assert [h["step"] for h in b] == list(range(1, 25))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(o / "adapter" / "adapter_model.safetensors")) for o in (ref_out, cut_out))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    assert "resumed from" in res.stdout and "step 24/24" in res.stdout  # progress lines
    # A third run finds the finished output and does not train again.
    stamp = (cut_out / "train_output.json").stat().st_mtime_ns
    again = subprocess.run(_cli(sftflow_home, cut_out, data, *sets), env=env, cwd=REPO, check=True,
                           capture_output=True, text=True, timeout=300)
    assert "reusing it" in again.stdout and (cut_out / "train_output.json").stat().st_mtime_ns == stamp


def test_train_task_logs_registers_and_loads_back(sftflow_home: Path, data) -> None:
    """The stage logs metrics + loss curve, registers a `candidate` version, and it loads offline and generates."""
    import mlflow
    import pandas as pd

    from sftflow.inference.tiny import build_tiny_model
    from sftflow.tracking.runs import StageContext, default_tracking_uri, ensure_experiment
    from tasks.train import train_task

    uri = default_tracking_uri()
    exp = ensure_experiment("sftflow-unit", uri=uri)
    run_dir = sftflow_home / "runs" / "unit" / "r1"
    ctx = StageContext(pipeline="unit", run_id="r1", run_dir=str(run_dir), tracking_uri=uri, experiment_id=exp,
                       parent_run_id="")
    result = train_task.fn(data[0], data[1], build_tiny_model("tiny-gemma"), _cfg(max_steps=4, eval_every=2),
                           ctx=ctx, register_as="sftflow-unit")
    assert markers.check_outputs(result) == []  # the training folder's marker records the weights' digests
    client = mlflow.MlflowClient()
    hist = client.get_metric_history(result.run_id, "loss")
    assert [m.step for m in hist] == [1, 2, 3, 4]
    for key in ("lr", "grad_norm", "tokens_per_s", "pad_fraction", "eval_loss"):
        assert client.get_metric_history(result.run_id, key), key
    arts = [a.path for a in client.list_artifacts(result.run_id, "plots")]
    assert "plots/loss_curve.png" in arts
    mv = client.get_model_version_by_alias("sftflow-unit", "candidate")
    assert str(mv.version) == result.registered_version == "1" and result.registered_name == "sftflow-unit"
    assert result.model.kind == "merged" and dict(result.metrics)["steps"] == 4.0
    # Load back through the registry alias and generate (offline: weights are artifacts).
    loaded = mlflow.pyfunc.load_model("models:/sftflow-unit@candidate")
    # The transformers chat flavor: OpenAI-style chat requests in, chat completions out.
    out = [loaded.predict({"messages": [{"role": "user", "content": p}], "max_tokens": 5})[0]
           for p in ("What is 2 plus 2?", "Name a colour.")]
    assert all(isinstance(x["choices"][0]["message"]["content"], str) for x in out)
    # Truncated weights: the finished output in the training folder is not reused; it is trained again.
    weights = Path(result.model.path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "model.safetensors changed on disk" in markers.describe(markers.check_outputs(result))
    # A second run of the stage registers version 2 and moves `candidate` to it.
    result2 = train_task.fn(data[0], data[1], build_tiny_model("tiny-gemma"), _cfg(max_steps=4, eval_every=2),
                            ctx=ctx, register_as="sftflow-unit")
    assert result2.registered_version == "2"
    assert [m.step for m in client.get_metric_history(result2.run_id, "loss")] == [1, 2, 3, 4]
    assert markers.check_outputs(result2) == [] and result2.model.path == result.model.path
    assert str(client.get_model_version_by_alias("sftflow-unit", "candidate").version) == "2"


def test_bf16_weight_cast_changes_no_number_and_is_undone(sftflow_home: Path) -> None:
    """Pre-casting frozen linears to bf16 gives the autocast loss exactly, and restore brings fp32 back."""
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.data import collate
    from sftflow.training.loss import CausalLMLoss
    from sftflow.training.model import apply_method, cast_frozen_linears, restore_weights

    model, tok = load_model(build_tiny_model("tiny-gemma"))
    model = apply_method(model, _cfg())
    rows = [encode_for_training(tok, r["messages"], template="gemma", max_len=None) for r in _records(4)]
    b = collate(rows, [0, 1, 2, 3], packed=False, pad_id=tok.pad_token_id, max_len=512)
    loss_mod = CausalLMLoss(model, compute_dtype=torch.bfloat16)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = loss_mod(b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
        originals = cast_frozen_linears(model, torch.bfloat16)
        cast, _ = loss_mod(b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
    assert originals and model.get_input_embeddings().weight.dtype == torch.float32
    assert torch.allclose(ref, cast, rtol=1e-3)
    restore_weights(model, originals)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

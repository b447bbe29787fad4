"""What a finished training run leaves behind, and how a later run recognises it.

The adapter and/or merged float32 safetensors with the tokenizer and a model card, the loss curve,
``history.json``, then ``train_output.json`` and the completion marker ``_SUCCESS`` (the sha256 of
every weight/tokenizer file, ``sftflow.markers``) last: their presence (with the run's
fingerprint) means the run finished, and a re-run returns it instead of training again, as long as
the files still have the recorded bytes (a truncated or replaced weight file is trained again).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sftflow import markers
from sftflow.config_sections import TrainingConfig
from sftflow.data.refs import ModelRef
from sftflow.training.checkpoint import CKPT_DIR
from sftflow.training.model import learning_rate

OUTPUT_FILE = "train_output.json"  # written last: its presence means the run finished


@dataclass(frozen=True)
class TrainOutput:
    """What ``sftflow.training.loop.train`` produced.

    Attributes:
        model: the model to use downstream: merged weights (``kind="merged"``) when
            ``cfg.merge`` or full fine-tuning, else the adapter (``kind="adapter"``, ``base`` set).
        adapter: the peft adapter (None for full fine-tuning).
        merged: the merged/full weights (None when not merged).
        metrics: ``(name, value)`` pairs: final/eval losses, tokens/s, pad fraction, counts.
        out_dir: the training folder (checkpoints, history, loss curve).
        loss_curve: PNG of train/eval loss per step.
        template: the prompt template used (``gemma``/``chatml``/``native``).
        resumed_from_step: the checkpoint step this run resumed from (0 = fresh).
    """

    model: ModelRef
    adapter: ModelRef | None
    merged: ModelRef | None
    metrics: tuple[tuple[str, float], ...]
    out_dir: str
    loss_curve: str
    template: str
    resumed_from_step: int = 0

    def metrics_dict(self) -> dict[str, float]:
        """``metrics`` as a dict."""
        return dict(self.metrics)

    def history(self) -> list[dict[str, Any]]:
        """The per-step records (``history.json``: loss, lr, grad_norm, eval_loss...)."""
        p = Path(self.out_dir) / "history.json"
        return json.loads(p.read_text()) if p.exists() else []


def finished_output(out_dir: Path, fingerprint: str) -> TrainOutput | None:
    """The output of a finished run with this fingerprint, or None."""
    p = Path(out_dir) / OUTPUT_FILE
    if not p.exists():
        return None
    data = json.loads(p.read_text())
    if data.get("fingerprint") != fingerprint:
        return None

    def ref(d: dict[str, Any] | None) -> ModelRef | None:
        return None if d is None else ModelRef(**{**d, "meta": tuple(tuple(x) for x in d.get("meta", ()))})

    o = data["output"]
    if not Path(o["model"]["path"]).exists():
        return None
    out = TrainOutput(model=ref(o["model"]), adapter=ref(o["adapter"]), merged=ref(o["merged"]),
                      metrics=tuple((k, float(v)) for k, v in o["metrics"]), out_dir=o["out_dir"],
                      loss_curve=o["loss_curve"], template=o["template"], resumed_from_step=o["resumed_from_step"])
    # Reused only while its weights are the bytes that were written (the folder's completion marker).
    problems = markers.check_outputs(out)
    if problems:
        markers.report(logging.getLogger("sftflow.train"), f"training output in {out_dir}: "
                       f"{markers.describe(problems)}; training again", problems=problems)
        return None
    return out


def save_outputs(model: Any, tokenizer: Any, *, base: ModelRef, cfg: TrainingConfig, out_dir: Path, template: str,
                  metrics: dict[str, float], state: dict[str, Any], fingerprint: str, resumed_from: int) -> TrainOutput:
    """Adapter, merged weights, tokenizer, model cards, loss curve, then ``train_output.json`` last."""
    from sftflow.digests import dir_sha256

    model.eval()
    meta = (("template", template), ("train_fingerprint", fingerprint))
    adapter = merged = None
    if cfg.method != "full":
        adir = out_dir / "adapter"
        shutil.rmtree(adir, ignore_errors=True)
        model.save_pretrained(str(adir))
        tokenizer.save_pretrained(str(adir))
        write_model_card(adir, base=base, cfg=cfg, template=template, metrics=metrics, kind="adapter")
        adapter = ModelRef(path=str(adir), sha256=dir_sha256(adir), kind="adapter", base=base.path,
                           name=f"{base.name or Path(base.path).name}-sft-adapter", meta=meta)
    if cfg.merge or cfg.method == "full":
        mdir = out_dir / "merged"
        shutil.rmtree(mdir, ignore_errors=True)
        # float32 on purpose: rounding merged weights to bf16 (2^-9 relative) would swamp small
        # LoRA deltas, undoing part of the fine-tune.
        full = (model.merge_and_unload() if cfg.method != "full" else model).to(torch.float32)
        full.config.dtype = "float32"
        full.save_pretrained(str(mdir), safe_serialization=True)
        tokenizer.save_pretrained(str(mdir))
        write_model_card(mdir, base=base, cfg=cfg, template=template, metrics=metrics, kind="merged")
        merged = ModelRef(path=str(mdir), sha256=dir_sha256(mdir), kind="merged", base=base.path,
                          name=f"{base.name or Path(base.path).name}-sft", meta=meta)
    curve = plot_loss(state["history"], out_dir / "loss_curve.png")
    (out_dir / "history.json").write_text(json.dumps(state["history"], indent=1))
    out = TrainOutput(model=merged or adapter, adapter=adapter, merged=merged, metrics=tuple(sorted(metrics.items())),
                      out_dir=str(out_dir), loss_curve=str(curve), template=template, resumed_from_step=resumed_from)
    doc = {"fingerprint": fingerprint, "output": {**asdict(out), "metrics": list(out.metrics)}}
    tmp = out_dir / (OUTPUT_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=list))
    os.replace(tmp, out_dir / OUTPUT_FILE)
    shutil.rmtree(out_dir / CKPT_DIR, ignore_errors=True)  # finished: the output supersedes checkpoints
    markers.write_marker(out_dir, outputs=out, stage="train")  # last: the digests a reuse is checked against
    return out


def write_model_card(path: Path, *, base: ModelRef, cfg: TrainingConfig, template: str, metrics: dict[str, float],
                      kind: str) -> None:
    """A README.md model card: what was trained, from what, how, and how well."""
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()))
    lora = "" if cfg.method == "full" else f" (r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, targets={cfg.lora.target_modules})"
    card = f"""---
library_name: {"peft" if kind == "adapter" else "transformers"}
base_model: {base.name or base.path}
tags: [sftflow, sft, {cfg.method}]
---
# {base.name or Path(base.path).name} — supervised fine-tune ({kind})

Trained by sftflow's training recipe (`sftflow/training/loop.py`).

- base model: `{base.path}` (sha256 `{base.sha256[:16]}`)
- method: **{cfg.method}**{lora}
- prompt template: `{template}` (`sftflow.inference.formatting`; loss on assistant turns only)
- lr {learning_rate(cfg)} ({cfg.lr_scheduler}, warmup {cfg.warmup_ratio}), batch {cfg.batch_size} x accum {cfg.grad_accum},
  max_seq_len {cfg.max_seq_len} ({cfg.overlong}), packing {cfg.packing}, precision {cfg.precision}, seed {cfg.seed}

## Metrics

| metric | value |
|---|---|
{rows}

## Use

```python
from sftflow.inference.models import resolve_model, load_model
from sftflow.inference.formatting import build_generation_prompt, stop_token_ids
model, tok = load_model(resolve_model("{path}"))
ids = build_generation_prompt(tok, [{{"role": "user", "content": "Hi!"}}], template="{template}")
```
"""
    (path / "README.md").write_text(card)


def plot_loss(history: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in worker threads
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    ev = [h for h in history if "eval_loss" in h]
    if ev:
        ax.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

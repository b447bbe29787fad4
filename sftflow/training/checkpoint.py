"""Checkpoints a killed run resumes from: trainable weights, optimizer, scheduler, every rank's RNG
streams and the loop state (step, history, data position), written atomically.

A checkpoint is written to ``step-N.tmp`` and renamed when complete (``state.json`` last), so a
crash never leaves one half-trusted; it is reused only by a run with the same fingerprint
(same data bytes, base model, config, code, library versions and world size).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("sftflow.train")

CKPT_DIR = "checkpoints"


def barrier(world: int) -> None:
    """Wait for every rank (no-op on one process)."""
    if world > 1:
        torch.distributed.barrier()


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """A CPU copy of the parameters that train (the adapter, or everything for full fine-tuning)."""
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy ``trainable_state`` back into ``model``.

    Raises:
        RuntimeError: the state names parameters the model does not have.
    """
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise RuntimeError(f"checkpoint does not match the model (unknown parameters, e.g. {missing[:3]})")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: readers never see a partial file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (``step-N`` folders; ``*.tmp`` ones are half written)."""
    root = out_dir / CKPT_DIR
    done = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / "state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(out_dir: Path, *, step: int, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                    rank: int, world: int, keep: int) -> None:
    """Write a checkpoint to ``step-N.tmp`` and rename it: a crash never leaves a checkpoint half-trusted."""
    root = out_dir / CKPT_DIR
    tmp, final = root / f"step-{step:07d}.tmp", root / f"step-{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    torch.save(_rng_state(), tmp / f"rng-{rank}.pt")  # each rank's own dropout/noise stream
    if rank == 0:
        torch.save(trainable_state(model), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    barrier(world)
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps(state, indent=1))  # last file in: marks it complete
        os.replace(tmp, final)
        old = sorted((p for p in root.glob("step-*") if not p.name.endswith(".tmp")), key=lambda p: p.name)
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    barrier(world)


def resume(out_dir: Path, *, fingerprint: str, model: Any, optimizer: Any, scheduler: Any, device: torch.device,
           rank: int, world: int, total_steps: int, logger: Any = log) -> dict[str, Any] | None:
    """Restore the newest checkpoint of this run into model, optimizer, scheduler and RNGs.

    Checkpoints of another run (a different fingerprint) are deleted, so they are never mixed in.

    Returns:
        The saved loop state (``step``, ``history``...), or None when starting afresh.
    """
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        return None
    saved = json.loads((ckpt / "state.json").read_text())
    if saved.get("fingerprint") != fingerprint:
        logger.warning("checkpoints in %s belong to another config/dataset; starting afresh", out_dir)
        if rank == 0:
            shutil.rmtree(out_dir / CKPT_DIR, ignore_errors=True)
        barrier(world)
        return None
    load_trainable(model, torch.load(ckpt / "trainable.pt", map_location=device))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    _set_rng_state(torch.load(ckpt / f"rng-{rank}.pt", weights_only=False))
    logger.info("resumed from %s (step %d of %d)", ckpt, saved["step"], total_steps)
    return saved

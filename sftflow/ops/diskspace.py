"""Free space on ``$SFTFLOW_HOME``'s filesystem against what a run will write, checked before any work.

A run that fills its disk half-way leaves a broken store and thousands of traceback lines; this
module refuses it up front, in one line naming the filesystem (its mount point), the free and the
needed space, and what to do::

    sftflow: not enough disk space: /mnt/small (the filesystem of $SFTFLOW_HOME=/mnt/small/home) has
    18.0 MiB free, this run needs about 96.3 MiB (...); free space there, point SFTFLOW_HOME at a larger
    filesystem, or set SFTFLOW_DISK_NEEDED=<size> (e.g. 500M; 0 skips the check)

The need is an estimate (``estimate_need``), an upper bound for a run that computes every stage:
the provisioned model (bf16) when it is not on disk yet, per training its merged float32 weights
and, for the registered one, MLflow's copy, adapters and checkpoints (full fine-tuning keeps
float32 weights + two Adam states per checkpoint), the data stages' Parquet copies of the sources,
and a fixed allowance for the MLflow / Prefect databases and logs. ``SFTFLOW_DISK_NEEDED``
replaces the estimate (a size such as ``750M`` or ``2G``; ``0`` turns the check off).
"""

from __future__ import annotations

import glob as globlib
import importlib.metadata
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sftflow import layout
from sftflow.config import PipelineConfig
from sftflow.errors import HomeError

ENV_NEEDED = "SFTFLOW_DISK_NEEDED"
MiB = 1 << 20
# MLflow's SQLite store, Prefect's database, GX data docs, logs, plots: measured ~30 MiB on the smoke run.
FIXED_BYTES = 64 * MiB
# Each data stage writes its rows again as Parquet (ingest, validate, dedup, split, quarantine...).
DATA_COPIES = 20
# Parameters per byte of an embedded GGUF (4-6 bit quantisation; Gemma 3 270M: 1.06, SmolLM2-135M: 1.37):
# an upper bound on the parameter count.
GGUF_PARAMS_PER_BYTE = 1.4


class DiskSpaceError(HomeError):
    """The filesystem of ``$SFTFLOW_HOME`` has less free space than the run needs (exit code 5)."""

    label = "not enough disk space"


@dataclass(frozen=True)
class Need:
    """What a run is expected to write, in bytes, and how the number was made (one line)."""

    bytes: int
    detail: str


def format_size(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_size(text: str) -> int:
    """``"500M"``, ``"2G"``, ``"1.5GiB"``, ``"123"`` (bytes) -> bytes (binary units).

    Raises:
        ValueError: not a size.
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", text.strip().lower())
    if not m:
        raise ValueError(f"expected a size like 500M or 2G, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds ``path`` (or would: its nearest existing parent)."""
    p = existing_parent(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest parent that exists."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem of ``path``."""
    st = os.statvfs(existing_parent(path))
    return st.f_bavail * st.f_frsize


# --------------------------------------------------------------------------- the estimate
def _model_params(cfg: PipelineConfig) -> tuple[int | None, bool, dict[str, tuple[int, int]]]:
    """``(parameters, on disk already, linear layers)`` of the base model (params None when unknown)."""
    from sftflow.ops.model_limits import linear_layers, local_model_dir, read_config, weight_shapes

    model_dir = local_model_dir(cfg.base_model)
    if model_dir is not None:
        try:
            shapes = weight_shapes(model_dir)
            layers = linear_layers(model_dir, read_config(model_dir))
        except (OSError, ValueError):
            return None, True, {}
        return sum(math.prod(s) for s in shapes.values()), True, layers
    from sftflow.inference.gguf import EMBEDDED_MODELS
    from sftflow.inference.tiny import TINY_MODELS

    if cfg.base_model in TINY_MODELS:
        return 200_000, False, {}
    spec = EMBEDDED_MODELS.get(cfg.base_model)
    if spec is None:
        return None, False, {}
    size = 0
    for pkg in spec.packages:  # the installed wheels' GGUF files (sizes from their RECORD)
        try:
            files = importlib.metadata.distribution(pkg.split("==")[0]).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        size += sum(f.size or 0 for f in files if ".gguf" in f.name)
    return (int(size * GGUF_PARAMS_PER_BYTE) or None), False, {}


def _source_bytes(cfg: PipelineConfig) -> int:
    paths: list[str] = [s.path for s in cfg.sources if s.path]
    if cfg.augmentation.enabled and cfg.augmentation.corpus is not None:
        paths.append(cfg.augmentation.corpus.path)
    total = 0
    for p in paths:
        for f in (globlib.glob(os.path.expanduser(p), recursive=True) if any(c in p for c in "*?[") else [p]):
            path = Path(f).expanduser()
            try:
                total += path.stat().st_size if path.is_file() else sum(
                    x.stat().st_size for x in path.rglob("*") if x.is_file())
            except OSError:
                continue
    return total


def estimate_need(cfg: PipelineConfig) -> Need:
    """Bytes a run of ``cfg`` may write under ``$SFTFLOW_HOME`` when no stage is cached (an upper bound)."""
    from sftflow.ops.model_limits import LORA_METHODS, targeted, training_configs
    from sftflow.tracking.runs import is_local_store, resolve_tracking_uri

    params, on_disk, layers = _model_params(cfg)
    parts: list[str] = []
    total = FIXED_BYTES
    if params is None:
        parts.append("model size unknown")
        params = 0
    elif not on_disk:
        total += 3 * params  # bf16 safetensors + the GGUF assembled beside it while converting
        parts.append(f"provisioning {format_size(3 * params)}")

    def adapter_bytes(r: int, targets: list[str] | str) -> int:
        hit = targeted(layers, targets) if layers else {}
        return sum(r * (i + o) for i, o in hit.values()) * 4

    registered = 1 + int(cfg.rejection_sampling.enabled)  # round 1 is an unregistered merged model
    ablation = int(cfg.augmentation.enabled and cfg.augmentation.ablation)
    aux = 2 * cfg.augmentation.iterations if cfg.augmentation.enabled else 0  # backward + curation models
    train_bytes = 0
    settings = {where: t for where, t, _ in training_configs(cfg)}
    main = settings["training"]
    for count, t, merged, logged in (
        (registered + ablation, main, True, True),
        (aux, settings.get("augmentation.backward_training", main), False, False),
    ):
        if not count:
            continue
        full = t.method not in LORA_METHODS
        one = adapter_bytes(t.lora.r, t.lora.target_modules) if not full else 0
        if full or (merged and t.merge):
            one += 4 * params  # float32 merged / fully trained weights
        ckpt = (12 * params if full else 3 * adapter_bytes(t.lora.r, t.lora.target_modules)) * t.keep_checkpoints
        train_bytes += count * (one + ckpt)
    if is_local_store(resolve_tracking_uri(cfg.tracking.tracking_uri)):
        train_bytes += registered * 4 * params  # the registered version's copy in MLflow's artifact store
    total += train_bytes
    parts.append(f"trainings {format_size(train_bytes)}")
    data = DATA_COPIES * _source_bytes(cfg)
    total += data
    parts.append(f"data {format_size(data)}")
    parts.append(f"stores and logs {format_size(FIXED_BYTES)}")
    return Need(bytes=int(total), detail=", ".join(parts))


# --------------------------------------------------------------------------- the check
def check_free_space(cfg: PipelineConfig, *, home: Path | None = None) -> None:
    """Refuse the run when ``$SFTFLOW_HOME``'s filesystem has less free space than it needs.

    ``$SFTFLOW_DISK_NEEDED`` replaces the estimate (``0`` skips the check).

    Raises:
        DiskSpaceError: one line: the mount point, free vs needed, and what to do.
        ConfigError: ``$SFTFLOW_DISK_NEEDED`` is not a size.
    """
    from sftflow.config_sections import ConfigError

    home = Path(home) if home is not None else layout.sftflow_home()
    override = os.environ.get(ENV_NEEDED, "").strip()
    if override:
        try:
            need = Need(bytes=parse_size(override), detail=f"${ENV_NEEDED}={override}")
        except ValueError as e:
            raise ConfigError(f"${ENV_NEEDED}: {e} (0 skips the check)") from None
        if need.bytes == 0:
            return
    else:
        need = estimate_need(cfg)
    free = free_bytes(home)
    if free >= need.bytes:
        return
    how = f"$SFTFLOW_HOME={home}" if os.environ.get("SFTFLOW_HOME") else f"{home} (the default $SFTFLOW_HOME)"
    raise DiskSpaceError(
        f"{mount_point(home)} (the filesystem of {how}) has {format_size(free)} free, this run needs about "
        f"{format_size(need.bytes)} ({need.detail}); free space there, point SFTFLOW_HOME at a larger "
        f"filesystem, or set {ENV_NEEDED}=<size> (e.g. 500M; 0 skips the check)")

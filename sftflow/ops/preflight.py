"""Checks that fail a run before any work: impossible sizes, contradictory settings, an unusable
``$SFTFLOW_HOME``.

``preflight(cfg, pipeline=name)`` runs after the schema validated the config and before the flow
creates anything (no MLflow run, no model, no folder). It counts the rows each local source can
provide *cheaply* (line counts, Parquet metadata, a JSON parse; never the whole ingestion) and
respects each source's ``max_rows`` and the weighted mixture, which gives an upper bound on the
rows that reach the split: validation and dedup only ever remove rows. When the bound cannot be
known (a hub source, a ``save_to_disk`` folder, a file that does not parse) the size checks are
skipped and the stages report what they find.

Run it::

    from sftflow.config import resolve_pipeline
    from sftflow.ops.preflight import preflight
    warnings = preflight(resolve_pipeline("smoke"), pipeline="smoke")   # raises ConfigError

``sftflow run`` and ``sftflow validate-config`` call it; so does the flow (runs started from the
Prefect UI do not go through the CLI). Nothing here imports Prefect, MLflow or torch.
"""

from __future__ import annotations

import csv
import glob as globlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sftflow import layout
from sftflow.config import PipelineConfig, resolve_paths
from sftflow.config_sections import ConfigError, SourceConfig
from sftflow.errors import HomeError

# Files larger than this are not parsed whole to count their rows (JSON) / instances (JSONL).
_PARSE_LIMIT = 256 << 20
# What the evaluation stage reports for every set (sftflow/evaluation/metrics.py: GENERATION_METRICS,
# LOSS_METRICS, num_examples); judge_score only with `evaluation.judge`. A unit test keeps them equal.
EVAL_METRICS = ("rougeL", "mean_new_tokens", "mean_words", "empty_rate", "runaway_rate", "runaway_rate_all",
                "fit_fraction", "eval_loss", "perplexity", "eval_tokens", "answer_loss", "end_prob", "num_examples")
# Metrics an evaluation has only for some data (rows with a reference answer: GSM8K-style sources).
DATA_DEPENDENT_METRICS = ("accuracy",)


# --------------------------------------------------------------------------- $SFTFLOW_HOME
def check_home(home: Path | None = None) -> Path:
    """Make sure ``$SFTFLOW_HOME`` is (or can become) a folder this process can write; creates nothing.

    Raises:
        HomeError: it is a file, it or its nearest existing parent is not writable.
    """
    home = Path(home) if home is not None else layout.sftflow_home()
    how = f"$SFTFLOW_HOME={home}" if os.environ.get("SFTFLOW_HOME") else f"{home} (the default $SFTFLOW_HOME)"
    if home.exists():
        if not home.is_dir():
            raise HomeError(f"{how} is not a folder; point SFTFLOW_HOME at a writable folder")
        if not os.access(home, os.R_OK | os.X_OK):
            raise HomeError(f"{how} is not readable; point SFTFLOW_HOME at a folder you own or fix its permissions")
        try:  # a real write, so ACLs, read-only mounts and root's privileges all count
            with tempfile.NamedTemporaryFile(dir=home, prefix=".sftflow-write-check-"):
                pass
        except OSError as e:
            raise HomeError(f"{how} is not writable ({e.strerror or e}); point SFTFLOW_HOME at a writable "
                            "folder or fix its permissions") from None
        return home
    parent = home.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise HomeError(f"{how} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HomeError(f"{how} cannot be created: {parent} is not writable; point SFTFLOW_HOME at a writable folder")
    return home


# --------------------------------------------------------------------------- row counting
@dataclass(frozen=True)
class SourceRows:
    """Upper bound on the records one source can contribute (None: unknown).

    Attributes:
        name: the source name.
        rows: records its files hold (None when they cannot be counted cheaply).
        bound: ``min(rows, max_rows)`` (None when both are unknown / unset).
        detail: human-readable origin of the number, for error messages.
    """

    name: str
    rows: int | None
    bound: int | None
    detail: str


def _instances(obj: object) -> int:
    """Records one raw object yields (Self-Instruct tasks: one per instance)."""
    if isinstance(obj, dict) and isinstance(obj.get("instances"), list) and obj["instances"]:
        return len(obj["instances"])
    return 1


def _count_jsonl(path: Path, *, expand: bool) -> int | None:
    if not expand:
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    if path.stat().st_size > _PARSE_LIMIT:
        return None
    n = 0
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                n += _instances(json.loads(line))
            except ValueError:
                n += 1  # a malformed line is one (quarantined) row
    return n


def _count_json(path: Path, *, expand: bool) -> int | None:
    if path.stat().st_size > _PARSE_LIMIT:
        return None
    try:
        data = json.loads(path.read_bytes())
    except ValueError as e:
        if getattr(e, "msg", "") == "Extra data":  # JSONL named .json (ingest reads it as JSONL)
            return _count_jsonl(path, expand=expand)
        return None  # not our job: ingest names the line/column
    if isinstance(data, dict):
        lists = [k for k in ("data", "rows", "records", "examples", "train") if isinstance(data.get(k), list)]
        if lists:
            data = data[lists[0]]
        elif data and all(isinstance(v, dict) for v in data.values()):
            data = list(data.values())
    if not isinstance(data, list):
        return None
    return sum(_instances(o) for o in data) if expand else len(data)


def _count_csv(path: Path) -> int | None:
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        try:
            next(reader)
            return sum(1 for row in reader if any(c.strip() for c in row))
        except (StopIteration, csv.Error):
            return None


def _count_parquet(path: Path, *, expand: bool) -> int | None:
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path)
    except Exception:  # noqa: BLE001 - a corrupt file is ingest's to report
        return None
    if expand and "instances" in meta.schema_arrow.names:
        return None
    return int(meta.metadata.num_rows)


def count_file_rows(path: Path, *, fmt: str = "auto") -> int | None:
    """Upper bound on the records ``path`` yields, read cheaply; None when unknown."""
    expand = fmt in ("auto", "self_instruct")
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            return None
        if suffix in (".jsonl", ".ndjson"):
            return _count_jsonl(path, expand=expand)
        if suffix == ".json":
            return _count_json(path, expand=expand)
        if suffix == ".csv":
            return _count_csv(path)
        if suffix == ".parquet":
            return _count_parquet(path, expand=expand)
    except OSError:
        return None  # unreadable: ingest says so, naming the file
    return None


def source_rows(src: SourceConfig) -> SourceRows:
    """How many records ``src`` can contribute at most (its files' rows, capped by ``max_rows``)."""
    cap = src.max_rows
    rows: int | None = None
    detail = "hub dataset" if src.hub else ""
    if src.path:
        files = resolve_paths(src.path)  # THE path-setting resolver (sftflow.config)
        counts = [count_file_rows(f, fmt=src.format) for f in files if f.exists()]
        if counts and all(c is not None for c in counts):
            rows = sum(counts)  # type: ignore[arg-type]
            detail = f"{rows} row(s) in {src.path}"
        else:
            detail = f"{src.path} (not counted)"
    bound = rows if cap is None else (cap if rows is None else min(rows, cap))
    if cap is not None and (rows is None or cap < rows):
        detail += f", capped by max_rows={cap}"
    return SourceRows(name=src.name, rows=rows, bound=bound, detail=detail)


def mixture_bound(bounds: list[int], weights: list[float | None]) -> int:
    """Upper bound on the mixed dataset: every row without weights, else the largest mixture with
    the configured shares (the same rule as ``tasks.ingest.mixture_counts``, which is monotone in
    the available rows, so bounds in give a bound out)."""
    if all(w is None for w in weights):
        return sum(bounds)
    total_w = sum(w for w in weights if w is not None)
    shares = [(w or 0.0) / total_w for w in weights]
    size = min(b / s for b, s in zip(bounds, shares) if s > 0)
    return sum(min(b, int(math.floor(s * size + 1e-9))) for b, s in zip(bounds, shares))


# --------------------------------------------------------------------------- the checks
def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~"))


def _installed(package: str) -> bool:
    """``package`` is importable here (found on the path; not imported: preflight stays light)."""
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


def preflight(cfg: PipelineConfig, *, pipeline: str = "<pipeline>", disk: bool = True) -> list[str]:
    """Refuse settings that cannot work, before any MLflow run, model or folder is created.

    Besides the config alone, it checks the base model's shape when the model is on disk already
    (``sftflow.ops.model_limits``: LoRA rank, context length, the template's minimum length) and
    the free space of ``$SFTFLOW_HOME``'s filesystem (``sftflow.ops.diskspace``).

    Args:
        cfg: a validated pipeline (``resolve_pipeline``).
        pipeline: its name, for the key paths in messages.
        disk: also check the free space (off for ``validate-config``, which runs nothing).

    Returns:
        Warnings (settings that work but not as the user may think), one line each.

    Raises:
        ConfigError: one line per problem, naming ``pipelines.<name>.<key path>``, e.g. a
            ``split.heldout_size`` that leaves no training rows.
        DiskSpaceError: the filesystem of ``$SFTFLOW_HOME`` has less free space than the run needs.
    """
    p = f"pipelines.{pipeline}"
    problems: list[str] = []
    warnings: list[str] = []

    # Weights are relative shares: all sources or none (ingest refuses a mix, after the run started).
    weighted = [s.weight is not None for s in cfg.sources]
    if any(weighted) and not all(weighted):
        missing = [f"{p}.sources.{i}.weight" for i, s in enumerate(cfg.sources) if s.weight is None]
        problems.append(f"{', '.join(missing)}: missing; give every source a `weight`, or none")

    for i, src in enumerate(cfg.sources):
        if src.path and not any(ch in src.path for ch in "*?["):
            path = Path(src.path).expanduser()
            if path.is_dir() and not any((path / n).exists() for n in ("dataset_info.json", "state.json",
                                                                         "dataset_dict.json")):
                problems.append(f"{p}.sources.{i}.path: {path} is a folder, not a data file or a "
                                "`datasets.save_to_disk` folder")

    # Model names that are paths must exist (a hub id or embedded name is resolved by the stages).
    models = [("base_model", cfg.base_model), ("evaluation.judge_model", cfg.evaluation.judge_model)]
    if cfg.augmentation.enabled and cfg.augmentation.curation.model not in ("forward", "base"):
        models.append(("augmentation.curation.model", cfg.augmentation.curation.model))
    for key, name in models:
        if name and _looks_like_path(name) and not Path(name).expanduser().exists():
            problems.append(f"{p}.{key}: model folder not found: {name}")

    # Sizes: the rows that can reach the split are at most what the sources hold (after max_rows
    # and the weighted mixture); validation and dedup only remove rows.
    per_source = [source_rows(s) for s in cfg.sources]
    total: int | None = None
    if not any(weighted) or all(weighted):
        bounds = [r.bound for r in per_source]
        if all(b is not None for b in bounds):
            total = mixture_bound(bounds, [s.weight for s in cfg.sources])  # type: ignore[arg-type]
    if total is not None:
        where = "; ".join(f"{r.name}: {r.detail}" for r in per_source)
        if cfg.split.heldout_size is not None and cfg.split.heldout_size >= total:
            fix = f"use a heldout_size of at most {total - 1}" if total >= 2 else "the split needs at least 2"
            problems.append(
                f"{p}.split.heldout_size={cfg.split.heldout_size} leaves no rows for training: the sources provide "
                f"at most {total} row(s) ({where}); {fix} or add data")
        elif total < 2:
            problems.append(f"{p}.sources: at most {total} row(s) ({where}); the split needs at least 2")

    t = cfg.training
    if t.early_stopping_patience and not t.eval_every:
        problems.append(f"{p}.training.early_stopping_patience={t.early_stopping_patience}: needs "
                        "training.eval_every (early stopping watches the held-out loss measured every "
                        "eval_every steps)")

    if cfg.evaluation.enabled and cfg.promotion.enabled:
        from sftflow.stats import strip_label

        metric = strip_label(cfg.promotion.metric)
        per_set = list(EVAL_METRICS) + list(DATA_DEPENDENT_METRICS) + (["judge_score"] if cfg.evaluation.judge else [])
        available = per_set + [f"{s.name}/{m}" for s in cfg.evaluation.extra_sets for m in per_set]
        if metric not in available:
            hint = " (set evaluation.judge: true)" if metric.endswith("judge_score") else ""
            problems.append(f"{p}.promotion.metric: {cfg.promotion.metric!r} is not a metric the evaluation "
                            f"reports{hint}; expected one of {', '.join(per_set)} (or <extra set>/<metric>)")
        from sftflow.stats import direction_problem

        problem = direction_problem(metric=cfg.promotion.metric, direction=cfg.promotion.direction)
        if problem:
            problems.append(f"{p}.{problem}")

    # The engine's packages, here where the run starts (not an unexpected error mid-run). Joining a
    # cluster (execution.address) needs Ray here too; vLLM on a cluster lives on its GPU workers.
    ex = cfg.execution
    if ex.engine == "ray" and not _installed("ray"):
        problems.append(f"{p}.execution.engine: ray needs the `ray` extra (pip install -e '.[ray]'), not installed "
                        "in this environment; or set execution.engine=local")
    if ex.generation_backend == "vllm" and (ex.engine == "local" or ex.address is None) \
            and not _installed("vllm"):
        problems.append(f"{p}.execution.generation_backend: vllm needs the `vllm` extra and a CUDA GPU "
                        "(pip install -e '.[vllm]'), not installed in this environment; or set it to auto/hf")

    problems += _training_problems(cfg, p=p)
    warnings += _conflicts(cfg, p=p)

    # The base model's shape, where it is on disk already (the flow checks again after provisioning).
    from sftflow.ops.model_limits import local_model_dir, model_problems

    model_dir = local_model_dir(cfg.base_model)
    if model_dir is not None:
        problems += model_problems(cfg, pipeline=pipeline, model_dir=model_dir)

    if problems:
        raise ConfigError("\n".join(problems))
    if disk:
        from sftflow.ops.diskspace import check_free_space

        check_free_space(cfg)
    return warnings


def check_provisioned_model(cfg: PipelineConfig, *, pipeline: str, model_dir: str | Path) -> None:
    """The model checks of ``preflight`` once the base model is on disk (the flow, right after
    provisioning, before any data stage), and the free space with the model's real size.

    Raises:
        ConfigError: one line per problem, naming the key path (``training.lora.r``, ``training.max_seq_len``...).
        DiskSpaceError: not enough free space for the run.
    """
    from sftflow.ops.diskspace import check_free_space
    from sftflow.ops.model_limits import local_model_dir, model_problems

    # An adapter folder's shape is its base model's.
    problems = model_problems(cfg, pipeline=pipeline, model_dir=local_model_dir(str(model_dir)) or model_dir)
    if problems:
        raise ConfigError("\n".join(problems))
    check_free_space(cfg)


def _cuda_present() -> bool:
    """An NVIDIA driver is loaded (cheap; torch is not imported here)."""
    return Path("/proc/driver/nvidia/version").exists() or bool(globlib.glob("/dev/nvidia[0-9]*"))


def _training_problems(cfg: PipelineConfig, *, p: str) -> list[str]:
    """Training settings that fail only when training starts, after every data stage."""
    from sftflow.ops.model_limits import training_configs

    problems = []
    for where, t, _ in training_configs(cfg):
        if t.method == "qlora":
            if not _installed("bitsandbytes"):
                problems.append(f"{p}.{where}.method: qlora needs the bitsandbytes package (pip install "
                                "bitsandbytes), not installed in this environment; or use lora")
            elif not _cuda_present():
                problems.append(f"{p}.{where}.method: qlora needs a CUDA GPU (4-bit kernels) and this machine "
                                "has none; use lora")
            break
    return problems


def _conflicts(cfg: PipelineConfig, *, p: str) -> list[str]:
    """Settings that run but not as the user may think (warnings, one line each)."""
    warnings = []
    ev, t = cfg.evaluation, cfg.training
    # Only an explicit heldout_size: with heldout_fraction, the default max_examples would warn on any small data.
    heldout = cfg.split.heldout_size
    if ev.enabled and heldout is not None:
        for key, n in (("evaluation.max_examples", ev.max_examples),
                       ("evaluation.format_robustness.max_examples", ev.format_robustness.max_examples)):
            if n is not None and n > heldout:
                warnings.append(f"{p}.{key}={n} > split.heldout_size={heldout}: evaluation uses at most {heldout} "
                                "held-out rows")
    known = {s.name for s in cfg.sources} | ({cfg.augmentation.corpus.name} if cfg.augmentation.corpus else set())
    unknown = [n for n in cfg.dedup.source_priority if n not in known]
    if cfg.dedup.keep == "source_priority" and unknown:
        warnings.append(f"{p}.dedup.source_priority: {unknown} name no source (sources: {', '.join(sorted(known))}); "
                        "rows of unlisted sources rank last")
    if cfg.promotion.enabled and not ev.enabled:
        warnings.append(f"{p}.promotion.enabled is true but evaluation.enabled is false: the gate needs the "
                        "evaluation, so nothing is promoted (the new version stays a candidate)")
    if t.eval_every and t.max_steps and t.eval_every > t.max_steps:
        what = "early stopping never triggers and " if t.early_stopping_patience else ""
        warnings.append(f"{p}.training.eval_every={t.eval_every} > training.max_steps={t.max_steps}: {what}the "
                        "held-out loss is measured only at the end")
    return warnings

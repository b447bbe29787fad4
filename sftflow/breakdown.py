"""Per-task breakdown of held-out metrics: by source and by category of the held-out rows.

A mixture of sources (Dolly, Alpaca, GSM8K, tool calls …) can gain on one task and lose on
another while the overall mean moves little. Evaluation (``tasks/evaluate.py``) reports each
held-out metric per group as ``by_source/<name>/<metric>`` and ``by_category/<name>/<metric>``
(with ``num_examples`` and the weight each metric is averaged with); the promotion gate
(``sftflow.gate``) compares base and tuned per group for ``promotion.max_task_regression``.

Every group metric is the same weighted mean as the overall one, restricted to the group's rows,
so the groups' values weighted by their weights sum back to the overall value:

* ``rougeL``: row mean (weight ``num_examples``);
* ``accuracy``: mean over the rows with a reference answer (weight ``accuracy_examples``);
* ``eval_loss``: token-weighted mean of the per-row losses (weight ``eval_tokens``).
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import numpy as np
import pandas as pd

# The columns of the samples Parquet a breakdown groups by, and the prefix of their metric names.
BREAKDOWNS: tuple[tuple[str, str], ...] = (("source", "by_source"), ("category", "by_category"))
# Metric name prefixes of a breakdown (kept out of places that want the overall metrics only).
BREAKDOWN_PREFIXES: tuple[str, ...] = tuple(f"{p}/" for _, p in BREAKDOWNS)
NO_TASK = "none"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- ]+")


def task_name(value: object, *, column: str = "category") -> str:
    """The name a group has in metric names.

    A source (``"<dataset name>:<file name>"``) is named by its dataset name; anything MLflow does
    not allow in a metric name becomes ``_``; an empty or missing value is ``none``.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NO_TASK
    text = str(value)
    if column == "source":
        text = text.split(":", 1)[0]
    text = _UNSAFE.sub("_", text.strip()).strip("_ ")
    return text or NO_TASK


def weighted_mean(values: Iterable[float], weights: Iterable[float]) -> tuple[float, float]:
    """(sum(w * v) / sum(w), sum(w)) over the finite values with a positive weight; (NaN, 0) when none."""
    v = np.asarray(list(values), dtype=float)
    w = np.asarray(list(weights), dtype=float)
    ok = np.isfinite(v) & np.isfinite(w) & (w > 0)
    total = float(w[ok].sum())
    return (float((v[ok] * w[ok]).sum() / total) if total > 0 else math.nan), total


def _set_metrics(df: pd.DataFrame) -> dict[str, float]:
    """The breakdown metrics of one group of sample rows (the columns it lacks are left out)."""
    out = {"num_examples": float(len(df))}
    if "rougeL" in df:
        out["rougeL"] = weighted_mean(df["rougeL"], np.ones(len(df)))[0]
    if "correct" in df:
        acc, n = weighted_mean(df["correct"], np.ones(len(df)))
        if n:
            out["accuracy"], out["accuracy_examples"] = acc, n
    if {"loss", "loss_tokens"} <= set(df.columns):
        loss, tokens = weighted_mean(df["loss"], df["loss_tokens"])
        out["eval_loss"], out["eval_tokens"] = loss, tokens
    return out


def per_task_metrics(samples: pd.DataFrame) -> dict[str, float]:
    """``by_source/<name>/<metric>`` and ``by_category/<name>/<metric>`` of one set's sample rows.

    Args:
        samples: one evaluated set's rows with ``source``/``category`` (a breakdown whose column is
            missing is skipped) and the per-row metric columns (``rougeL``, ``correct``, ``loss`` +
            ``loss_tokens``).

    Returns:
        A flat dict of metrics (empty for an empty frame).
    """
    out: dict[str, float] = {}
    if not len(samples):
        return out
    for column, prefix in BREAKDOWNS:
        if column not in samples:
            continue
        names = samples[column].map(lambda v: task_name(v, column=column))
        for name, grp in samples.groupby(names, sort=True):
            out.update({f"{prefix}/{name}/{k}": v for k, v in _set_metrics(grp).items()})
    return out


def task_groups(metrics: dict[str, float]) -> dict[str, list[str]]:
    """``{"by_source": [names], "by_category": [names]}`` present in an evaluation's metrics."""
    out: dict[str, list[str]] = {}
    for key in metrics:
        prefix, _, rest = key.partition("/")
        if f"{prefix}/" in BREAKDOWN_PREFIXES and "/" in rest:
            name = rest.rsplit("/", 1)[0]
            if name not in out.setdefault(prefix, []):
                out[prefix].append(name)
    return {k: sorted(v) for k, v in out.items()}

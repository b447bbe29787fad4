"""MLflow logging of a training run (the recipe itself logs nowhere; its callers log with these).

``step_logger`` is the ``on_metrics`` callback of ``sftflow.training.loop.train``;
``log_training_summary`` logs a finished run's metrics, loss curve and history. Both write to the
*active* run, so a caller opens the run (the train stage's, or a backtranslation helper model's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from sftflow.tracking.runs import log_json


def step_logger(*, prefix: str = "") -> Callable[[int, dict[str, float]], None]:
    """An ``on_metrics(step, metrics)`` callback logging each step's metrics as ``<prefix><name>``."""

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        import mlflow

        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()}, step=int(step))

    return on_metrics


def log_training_summary(output: Any, *, prefix: str = "") -> None:
    """Log a finished run's summary metrics, ``plots/loss_curve.png`` and ``history.json``.

    Args:
        output: a ``sftflow.training.export.TrainOutput``.
        prefix: prefix of metric names and artifact folders (e.g. ``backward/``).
    """
    import mlflow

    mlflow.log_metrics({f"{prefix}{k}": v for k, v in output.metrics})
    if output.loss_curve and Path(output.loss_curve).exists():
        mlflow.log_artifact(output.loss_curve, artifact_path=f"{prefix}plots".strip("/"))
    log_json(output.history(), f"{prefix}history.json")

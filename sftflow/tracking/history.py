"""Recent runs of each pipeline, read from MLflow: ``sftflow runs [PIPELINE] [--limit N] [--json]``.

One experiment per pipeline, one parent run per flow run (tag ``sftflow.kind=pipeline``, see
``sftflow.tracking.runs``): each parent run gives its status, start, duration and the key metrics
the flow logged on it (``base/…``, ``tuned/…``, ``promotion/promoted``); the registered model gives
the versions that hold the ``champion`` and ``candidate`` aliases, and which version each run
registered. Only reads the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sftflow.tracking.runs import TAG_FLOW_RUN, TAG_KIND, TAG_PIPELINE, TAG_STAGE, mask_uri

# Metrics of the parent run shown per run: (column, metric key).
KEY_METRICS: tuple[tuple[str, str], ...] = (
    ("base_rougeL", "base/rougeL"),
    ("tuned_rougeL", "tuned/rougeL"),
    ("eval_loss", "tuned/eval_loss"),
)
ALIASES = ("champion", "candidate")


@dataclass(frozen=True)
class PipelineTarget:
    """Where a pipeline's runs live: its experiment and registered model names.

    Attributes:
        pipeline: the pipeline name.
        experiment: MLflow experiment name.
        model: registered model name.
    """

    pipeline: str
    experiment: str
    model: str


def targets_from_config(pipes: dict[str, Any]) -> list[PipelineTarget]:
    """The experiment and model name of each configured pipeline (defaults ``sftflow-<pipeline>``)."""
    return [PipelineTarget(pipeline=name, experiment=cfg.tracking.experiment or f"sftflow-{name}",
                           model=cfg.promotion.model_name or f"sftflow-{name}") for name, cfg in pipes.items()]


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def _aliases(client: Any, model: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for alias in ALIASES:
        try:
            out[alias] = str(client.get_model_version_by_alias(model, alias).version)
        except Exception:  # noqa: BLE001 - no such model / alias: nothing holds it
            out[alias] = None
    return out


def _versions_by_parent(client: Any, model: str, experiment_id: str) -> dict[str, str]:
    """{parent run id: version it registered}: versions point at the train stage run."""
    try:
        versions = client.search_model_versions(f"name = '{model}'")
    except Exception:  # noqa: BLE001
        return {}
    if not versions:
        return {}
    train_runs = client.search_runs([experiment_id], max_results=1000,
                                    filter_string=f"tags.`{TAG_STAGE}` = 'train'")
    parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId", "") for r in train_runs}
    out: dict[str, str] = {}
    for mv in versions:
        parent = parent_of.get(mv.run_id or "")
        if parent:
            out[parent] = str(mv.version)
    return out


def recent_runs(targets: list[PipelineTarget], *, tracking_uri: str, limit: int = 10) -> list[dict[str, Any]]:
    """Recent flow runs of each pipeline, newest first.

    Args:
        targets: the pipelines to list (``targets_from_config``).
        tracking_uri: the MLflow store.
        limit: runs per pipeline.

    Returns:
        One JSON-able dict per pipeline: ``pipeline``, ``experiment``, ``model``, ``champion``,
        ``candidate`` (versions or None) and ``runs`` (``run_id``, ``flow_run_id``, ``start_time``
        (ISO, UTC), ``status``, ``duration_s``, ``base_rougeL``, ``tuned_rougeL``, ``eval_loss``,
        ``promoted`` (True/False/None when the gate did not run), ``model_version``).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    out = []
    for t in targets:
        entry: dict[str, Any] = {"pipeline": t.pipeline, "experiment": t.experiment, "model": t.model,
                                 "champion": None, "candidate": None, "runs": []}
        exp = client.get_experiment_by_name(t.experiment)
        if exp is None:
            out.append(entry)
            continue
        parents = client.search_runs([exp.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"],
                                     filter_string=f"tags.`{TAG_KIND}` = 'pipeline' and "
                                                   f"tags.`{TAG_PIPELINE}` = '{t.pipeline}'")
        entry.update(_aliases(client, t.model))
        versions = _versions_by_parent(client, t.model, exp.experiment_id) if parents else {}
        for r in parents:
            m = r.data.metrics
            info = r.info
            promoted = m.get("promotion/promoted")
            row: dict[str, Any] = {
                "run_id": info.run_id,
                "flow_run_id": r.data.tags.get(TAG_FLOW_RUN),
                "start_time": _iso(info.start_time),
                "status": info.status,
                "duration_s": round((info.end_time - info.start_time) / 1000, 1)
                if info.end_time and info.start_time else None,
            }
            for col, key in KEY_METRICS:
                row[col] = m.get(key)
            row["promoted"] = None if promoted is None else bool(promoted >= 0.5)
            row["model_version"] = versions.get(info.run_id)
            entry["runs"].append(row)
        out.append(entry)
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def fmt_seconds(s: float | None, *, decimals: int = 1) -> str:
    """A duration for people: ``12.3s`` (``decimals`` below a minute), ``4m05s``, ``1h02m``; ``-``
    when unknown. The one formatter of the run table here and the stage summary (``ops.summary``)."""
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.{decimals}f}s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{sec:02d}s"


def format_runs(entries: list[dict[str, Any]], *, tracking_uri: str | None = None) -> str:
    """``recent_runs`` as a compact aligned table per pipeline."""
    lines: list[str] = []
    if tracking_uri:
        lines.append(f"MLflow store: {mask_uri(tracking_uri)}")
    for e in entries:
        lines.append("")
        lines.append(f"{e['pipeline']}  (experiment {e['experiment']}; model {e['model']}: "
                     f"champion {e['champion'] or '-'}, candidate {e['candidate'] or '-'})")
        if not e["runs"]:
            lines.append("  no runs yet")
            continue
        header = ["run id", "started (UTC)", "status", "duration", "base rougeL", "tuned rougeL", "eval_loss",
                  "promoted", "version"]
        rows = []
        for r in e["runs"]:
            started = (r["start_time"] or "-").replace("T", " ").removesuffix("+00:00")
            rows.append([r["run_id"][:12], started, r["status"], fmt_seconds(r["duration_s"], decimals=0), _cell(r["base_rougeL"]),
                         _cell(r["tuned_rougeL"]), _cell(r["eval_loss"]), _cell(r["promoted"]),
                         _cell(r["model_version"])])
        widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
        right = {3, 4, 5, 6}
        for x in [header, *rows]:
            lines.append("  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                          for i, (c, w) in enumerate(zip(x, widths))).rstrip())
    return "\n".join(lines).lstrip("\n")

"""The closing summary of ``sftflow run`` (pure functions, no I/O): one :class:`StageRow` per stage
built from the metrics its MLflow run logged (:func:`stage_row`), the summary table with stage times,
rows in/out, base vs tuned metrics and the gate decision (:func:`summary_table`), and what to run
next (:func:`next_commands`). ``sftflow.ops.console.RunConsole`` builds the rows while the run goes
and prints the table at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from sftflow.tracking.history import fmt_seconds  # noqa: F401  (the console imports it from here too)

# Metrics shown in the base-vs-tuned table (those present, in this order; the gate's metric first).
TABLE_METRICS = ("rougeL", "eval_loss", "perplexity", "runaway_rate", "empty_rate", "judge_score")


@dataclass(frozen=True)
class StageRow:
    """One stage of a run, as the summary table shows it.

    Attributes:
        name: stage name (the MLflow ``sftflow.stage`` tag when known, else Prefect's task name).
        state: Prefect's final state name (Completed, Cached, Failed ...).
        seconds: wall time of the stage (MLflow run duration when known), None if unknown.
        rows_in: rows the stage read, None when it reads no rows / unknown.
        rows_out: rows it produced (text: a split shows ``72 + 8``), None when unknown.
        note: a few words (quarantined / removed counts, steps, the gate decision ...).
        peak_rss_mb: the stage's own peak resident memory (its ``peak_rss_mb`` metric), None if unknown.
    """

    name: str
    state: str = "Completed"
    seconds: float | None = None
    rows_in: int | None = None
    rows_out: str | None = None
    note: str = ""
    peak_rss_mb: float | None = None


def _int(metrics: dict[str, float], *keys: str) -> int | None:
    for k in keys:
        v = metrics.get(k)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            return int(round(v))
    return None


def stage_row(stage: str, metrics: dict[str, float], *, state: str = "Completed",
              seconds: float | None = None) -> StageRow:
    """Build the table row of ``stage`` from the metrics its MLflow run logged.

    Args:
        stage: the ``sftflow.stage`` tag (``ingest``, ``validate_augmented``, ``evaluate.tuned`` ...).
        metrics: the stage run's metrics (``rows_read``, ``rows_kept`` ...); may be empty.
        state: Prefect's final state name.
        seconds: the stage's wall time.

    Returns:
        The row; counts the stage did not log stay None (shown as ``-``).
    """
    m = metrics
    kind = stage.split(".")[0].split("_")[0]
    rin: int | None = None
    rout: str | None = None
    note = ""

    def out(*keys: str) -> str | None:
        v = _int(m, *keys)
        return None if v is None else str(v)

    if kind == "ingest":
        # Out = the rows the mixture took (``mixed``); kept-but-not-sampled rows are said, not hidden.
        rin, rout = _int(m, "rows_read"), out("rows_mixed", "rows_kept")
        notes = [f"{_int(m, k)} {k.removeprefix('rows_').replace('_', ' ')}"
                 for k in ("rows_quarantined", "rows_not_sampled") if _int(m, k)]
        note = ", ".join(notes)
    elif kind == "validate":
        rin, rout = _int(m, "rows_read"), out("rows_valid")
        if _int(m, "rows_quarantined"):
            note = f"{_int(m, 'rows_quarantined')} quarantined"
    elif kind == "dedup":
        rin, rout = _int(m, "rows_in"), out("rows_kept")
        if _int(m, "rows_removed"):
            parts = [f"{_int(m, k)} {k.removeprefix('removed_')}" for k in
                     ("removed_exact", "removed_near", "removed_semantic", "removed_leak") if _int(m, k)]
            note = f"{_int(m, 'rows_removed')} removed" + (f" ({', '.join(parts)})" if parts else "")
    elif kind == "split":
        rin = _int(m, "rows_in")
        train, held = _int(m, "rows_train"), _int(m, "rows_heldout")
        if train is not None and held is not None:
            rout = f"{train} + {held}"
            note = "train + held-out"
        leaks = _int(m, "leaks_moved")
        if leaks:
            note += f", {leaks} leaks moved"
    elif kind == "backtranslate":
        rin, rout = _int(m, "bt_segments_in"), out("bt_kept")
        if _int(m, "bt_generated") is not None:
            note = f"{_int(m, 'bt_generated')} generated, {_int(m, 'bt_kept') or 0} curated"
    elif kind == "rejection":
        rin, rout = _int(m, "rs_prompts_in"), out("rs_kept")
        if _int(m, "rs_samples") is not None:
            note = f"{_int(m, 'rs_samples')} samples, {_int(m, 'rs_kept') or 0} prompts kept"
    elif kind == "train":
        rin = _int(m, "train_rows")
        bits = []
        if _int(m, "steps") is not None:
            bits.append(f"{_int(m, 'steps')} steps")
        for k in ("train_loss", "eval_loss"):
            if m.get(k) is not None:
                bits.append(f"{k} {m[k]:.4f}")
        note = ", ".join(bits)
    elif kind == "evaluate":
        label = stage.partition(".")[2]
        prefix = f"{label}/" if label else ""
        rin = _int(m, f"{prefix}num_examples", "num_examples")
        for key in ("rougeL", "eval_loss"):
            v = m.get(f"{prefix}{key}", m.get(key))
            if v is not None:
                note += (", " if note else "") + f"{key} {v:.4f}"
    elif kind == "promote":
        promoted = m.get("promotion/promoted")
        if promoted is not None:
            note = "promoted" if promoted >= 0.5 else "not promoted"
    else:
        rin, rout = _int(m, "rows_in", "rows_read"), out("rows_out", "rows_kept")
    if state != "Completed" and not note:
        note = "served from cache" if state == "Cached" else ""
    return StageRow(name=stage, state=state, seconds=seconds, rows_in=rin, rows_out=rout, note=note,
                    peak_rss_mb=m.get("peak_rss_mb"))


def _fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _table(header: list[str], rows: list[list[str]], *, right: Iterable[int] = ()) -> list[str]:
    """Aligned columns (two spaces apart); column indexes in ``right`` are right-aligned."""
    right = set(right)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def next_commands(summary: dict[str, Any]) -> list[str]:
    """What to run after this run: the lineage of the champion when the gate promoted this
    run's model, else of the candidate version this run registered (``MODEL/VERSION``).

    Args:
        summary: the dict the flow returned.

    Returns:
        Command lines (may be empty when the run registered no model).
    """
    model = summary.get("model") or {}
    name, version = model.get("name"), model.get("version")
    promotion = summary.get("promotion") or {}
    cmds = []
    if name and promotion.get("promoted"):
        cmds.append(f"sftflow lineage {name}@champion")
    elif name and version:
        cmds.append(f"sftflow lineage {name}/{version}")
    cmds.append(f"sftflow runs {summary.get('pipeline', '')}".rstrip())
    return cmds


def summary_table(summary: dict[str, Any], stages: list[StageRow], *, total_seconds: float | None = None,
                  log_path: str | None = None) -> str:
    """The closing summary of ``sftflow run``, as text.

    Args:
        summary: the dict the flow returned (``pipeline``, ``model``, ``metrics``, ``promotion``,
            ``mlflow_run_id``, ``mlflow``, ``run_dir``; missing keys are skipped).
        stages: the stages in the order they ran.
        total_seconds: wall time of the whole run.
        log_path: the run's log file (warnings, progress bars, detail lines).

    Returns:
        Lines joined by newlines (no trailing newline).
    """
    lines: list[str] = []
    pipe = summary.get("pipeline", "?")
    took = f" in {fmt_seconds(total_seconds)}" if total_seconds is not None else ""
    if summary.get("skipped"):
        lines.append(f"Pipeline {pipe}: skipped{took}: {summary.get('reason', '')}")
        if log_path:
            lines.append(f"Log:            {log_path}")
        return "\n".join(lines)
    lines.append(f"Pipeline {pipe} finished{took}")
    if stages:
        lines.append("")
        rows = [[s.name, s.state, fmt_seconds(s.seconds), "-" if s.rows_in is None else str(s.rows_in),
                 s.rows_out or "-", "-" if s.peak_rss_mb is None else f"{s.peak_rss_mb / 1024:.1f} GB", s.note]
                for s in stages]
        lines += _table(["stage", "state", "time", "rows in", "rows out", "peak RSS", "note"], rows, right=(2, 3, 4, 5))

    metrics = summary.get("metrics") or {}
    base, tuned = metrics.get("base") or {}, metrics.get("tuned") or {}
    promotion = summary.get("promotion") or {}
    if base or tuned:
        gate_metric = str(promotion.get("metric") or "")
        bare = gate_metric.split("/")[-1]
        names = [bare] if bare and (bare in base or bare in tuned) else []
        names += [k for k in TABLE_METRICS if k not in names and (k in base or k in tuned)]
        rows = []
        for k in names:
            b, t = base.get(k), tuned.get(k)
            numeric = all(isinstance(v, (int, float)) and not math.isnan(v) for v in (b, t))
            delta = f"{t - b:+.4f}" if numeric else "-"
            rows.append([k + (" (gate)" if k == bare else ""), _fmt_value(b), _fmt_value(t), delta])
        lines.append("")
        lines += _table(["metric", "base", "tuned", "delta"], rows, right=(1, 2, 3))
    if promotion:
        verdict = "PROMOTED to champion" if promotion.get("promoted") else "not promoted (champion unchanged)"
        lines.append("")
        lines.append(f"Gate:           {verdict}")
        if promotion.get("reason"):
            lines.append(f"                {promotion['reason']}")
    lines.append("")
    model = summary.get("model") or {}
    if model.get("name"):
        alias = "champion" if promotion.get("promoted") else "candidate"
        lines.append(f"Model:          {model['name']} version {model.get('version')} (@{alias}; {model.get('uri', '')})")
    if summary.get("mlflow_run_id"):
        lines.append(f"MLflow run:     {summary['mlflow_run_id']}")
    if summary.get("run_dir"):
        lines.append(f"Run directory:  {summary['run_dir']}")
    if log_path:
        lines.append(f"Log:            {log_path}  (warnings, progress bars, stage details)")
    cmds = next_commands(summary)
    if cmds:
        lines.append("Next:           " + cmds[0])
        lines += [" " * 16 + c for c in cmds[1:]]
        lines.append(" " * 16 + "sftflow ui  (Prefect and MLflow UIs)")
    return "\n".join(lines)

"""The console of `sftflow run` (sftflow/ops/console.py): the summary table, the stage rows built
from MLflow metrics, what to run next, and how log records become console lines."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from typing import Iterator

from sftflow.ops.console import RunConsole
from sftflow.ops.progress_report import Progress
from sftflow.ops.summary import StageRow, next_commands, stage_row, summary_table
from sftflow.progress import EVENT_ATTR, CountEvent, StepEvent, event_of
from sftflow.tracking.history import format_runs

SUMMARY = {
    "pipeline": "smoke",
    "run_dir": "/h/runs/smoke/abc",
    "mlflow_run_id": "ce14",
    "model": {"name": "sftflow-smoke", "version": "3", "uri": "models:/m-1"},
    "metrics": {"base": {"rougeL": 0.1, "eval_loss": 2.5, "eval_seconds": 1.0, "runaway_rate": float("nan")},
                "tuned": {"rougeL": 0.2, "eval_loss": 2.0, "eval_seconds": 1.1, "runaway_rate": float("nan")}},
    "promotion": {"promoted": False, "metric": "rougeL", "reason": "lower bound -0.01 <= required 0.0"},
}


def test_stage_rows_from_metrics() -> None:
    assert stage_row("ingest", {"rows_read": 89.0, "rows_kept": 84.0, "rows_quarantined": 5.0}) == StageRow(
        name="ingest", rows_in=89, rows_out="84", note="5 quarantined")
    # A capped mixture: out is what was mixed, the rest is said.
    assert stage_row("ingest", {"rows_read": 1200.0, "rows_kept": 1200.0, "rows_mixed": 550.0, "rows_quarantined": 0.0,
                                "rows_not_sampled": 650.0}) == StageRow(
        name="ingest", rows_in=1200, rows_out="550", note="650 not sampled")
    r = stage_row("dedup_augmented", {"rows_in": 84.0, "rows_kept": 80.0, "rows_removed": 4.0, "removed_exact": 4.0})
    assert (r.rows_in, r.rows_out, r.note) == (84, "80", "4 removed (4 exact)")
    r = stage_row("split", {"rows_in": 80.0, "rows_train": 72.0, "rows_heldout": 8.0})
    assert (r.rows_in, r.rows_out) == (80, "72 + 8")
    r = stage_row("evaluate.tuned", {"tuned/num_examples": 8.0, "tuned/rougeL": 0.25})
    assert r.rows_in == 8 and "rougeL 0.2500" in r.note
    assert stage_row("promote", {"promotion/promoted": 1.0}).note == "promoted"
    r = stage_row("rejection", {"rs_prompts_in": 16.0, "rs_kept": 11.0, "rs_samples": 32.0})
    assert (r.rows_in, r.rows_out, r.note) == (16, "11", "32 samples, 11 prompts kept")
    assert stage_row("train", {}, state="Cached").note == "served from cache"


def test_next_command_names_the_champion_only_when_promoted() -> None:
    assert next_commands(SUMMARY)[0] == "sftflow lineage sftflow-smoke/3"
    promoted = {**SUMMARY, "promotion": {**SUMMARY["promotion"], "promoted": True}}
    assert next_commands(promoted)[0] == "sftflow lineage sftflow-smoke@champion"
    assert next_commands({"pipeline": "smoke"}) == ["sftflow runs smoke"]


def test_summary_table() -> None:
    stages = [StageRow(name="ingest", seconds=1.25, rows_in=89, rows_out="84", note="5 quarantined"),
              StageRow(name="train", state="Cached", seconds=0.4)]
    text = summary_table(SUMMARY, stages, total_seconds=125.0, log_path="/h/runs/smoke/abc/sftflow.log")
    lines = text.splitlines()
    assert lines[0] == "Pipeline smoke finished in 2m05s"
    header = next(ln for ln in lines if ln.startswith("stage"))
    ingest = next(ln for ln in lines if ln.startswith("ingest"))
    # aligned: the numbers end where their right-aligned headers end
    assert ingest.index("89") + 2 == header.index("rows in") + len("rows in")
    assert "Cached" in next(ln for ln in lines if ln.startswith("train"))
    gate = next(ln for ln in lines if ln.startswith("rougeL (gate)"))
    assert gate.split()[-3:] == ["0.1000", "0.2000", "+0.1000"]
    assert next(ln for ln in lines if ln.startswith("runaway_rate")).split()[-1] == "-"  # nan: no delta
    assert not any(ln.startswith("eval_seconds") for ln in lines)
    assert "not promoted" in text and "lower bound -0.01" in text
    assert "Model:          sftflow-smoke version 3 (@candidate" in text
    assert "Next:           sftflow lineage sftflow-smoke/3" in text
    assert "MLflow run:     ce14" in text and "Run directory:  /h/runs/smoke/abc" in text
    assert "@champion" not in text.split("Next:")[1]


def test_summary_of_a_skipped_run() -> None:
    text = summary_table({"pipeline": "demo", "skipped": True, "reason": "sources unchanged"}, [])
    assert text == "Pipeline demo: skipped: sources unchanged"


def _record(msg: str, *, task_run: str | None = None, level: int = logging.INFO, name: str | None = None,
            flow_run_id: str = "", event: object = None) -> logging.LogRecord:
    rec = logging.LogRecord(name or ("prefect.task_runs" if task_run else "prefect.flow_runs"), level, __file__, 1,
                            msg, None, None)
    if event is not None:
        setattr(rec, EVENT_ATTR, event)
    if task_run:
        rec.task_run_name = task_run
    if flow_run_id:
        rec.flow_run_id, rec.flow_run_name = flow_run_id, "happy-run"
    return rec


def test_records_become_one_line_per_stage_and_throttled_progress() -> None:
    out = io.StringIO()
    console = RunConsole(pipeline="smoke", out=out, tty=False)  # no tracking URI: no MLflow reads
    feed = console._on_record
    feed(_record("Beginning flow run", flow_run_id="f-1"))
    feed(_record("Finished in state Completed()", task_run="provision-05b"))
    feed(_record("source dolly: detected as format alpaca", task_run="train-233"))
    for i in range(1, 40):
        feed(_record(f"step {i}/40", task_run="train-233",
                     event=StepEvent(step=i, total=40, loss=6.9 + i / 100, seconds_per_step=1.0)))
    feed(_record("Self-curation kept no candidate pairs", task_run="train-233", level=logging.WARNING))
    feed(_record("some UserWarning from a library", name="py.warnings", level=logging.WARNING))
    feed(_record("Finished in state Cached(type=COMPLETED)", task_run="train-233"))
    lines = out.getvalue().splitlines()
    assert lines[0] == "  flow run happy-run (f-1)"
    assert "ok provision" in lines[1] and "Completed" in lines[1]
    assert "train running" in lines[2]
    assert not any("step" in ln for ln in lines)  # within 30 s of the start line: throttled
    assert lines[3] == "  warning train: Self-curation kept no candidate pairs"
    assert "ok train" in lines[4] and "Cached" in lines[4] and "served from cache" in lines[4]
    assert len(lines) == 5  # the detail line and the third-party warning stay out
    assert [s.name for s in console.stages] == ["provision", "train"]


def test_live_progress_line_on_a_terminal() -> None:
    out = io.StringIO()
    console = RunConsole(pipeline="smoke", out=out, tty=True)
    # The event, not the text, drives the line: a reworded log message changes nothing.
    ev = StepEvent(step=3, total=4, loss=6.92081, seconds_per_step=1.4)
    console._on_record(_record("whatever the recipe prints", task_run="train-233", event=ev))
    text = out.getvalue()
    assert "\n" not in text and text.endswith("train: step 3/4 [###############.....]  75% loss 6.9208 eta 0m01s")
    console._on_record(_record("Finished in state Completed()", task_run="train-233"))
    assert out.getvalue().count("\n") == 1 and "\r\x1b[2K" in out.getvalue()


@contextlib.contextmanager
def _captured(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records logged to logger ``name`` at INFO inside the block (level restored after)."""
    logger = logging.getLogger(name)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    h = Keep()
    old = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        logger.removeHandler(h)
        logger.setLevel(old)


def test_progress_events_reach_the_console() -> None:
    with _captured("test.progress") as seen:
        p = Progress("generate", total=10, every_s=3600, logger=logging.getLogger("test.progress"))
        for _ in range(10):
            p.advance()
    assert len(seen) == 2 and seen[-1].getMessage().startswith("progress generate 10/10 |")
    events = [event_of(r) for r in seen]
    assert [(e.what, e.done, e.total) for e in events] == [("generate", 1, 10), ("generate", 10, 10)]
    assert isinstance(events[-1], CountEvent) and events[-1].eta_s == 0.0
    out = io.StringIO()
    console = RunConsole(pipeline="smoke", out=out, tty=True)
    seen[0].task_run_name = "evaluate-base"  # as Prefect's run logger adds it inside a task run
    seen[0].name = "prefect.task_runs"
    console._on_record(seen[0])
    assert "evaluate-base: generate 1/10" in out.getvalue()


def test_runs_table_is_aligned() -> None:
    entries = [{"pipeline": "smoke", "experiment": "sftflow-smoke", "model": "sftflow-smoke", "champion": None,
                "candidate": "2", "runs": [
                    {"run_id": "a" * 32, "start_time": "2026-01-02T03:04:05+00:00", "status": "FINISHED",
                     "duration_s": 78.2, "base_rougeL": 0.1, "tuned_rougeL": 0.25, "eval_loss": None,
                     "promoted": False, "model_version": "2"},
                    {"run_id": "b" * 32, "start_time": None, "status": "FAILED", "duration_s": None,
                     "base_rougeL": None, "tuned_rougeL": None, "eval_loss": None, "promoted": None,
                     "model_version": None}]},
               {"pipeline": "demo", "experiment": "sftflow-demo", "model": "sftflow-demo", "champion": None,
                "candidate": None, "runs": []}]
    lines = format_runs(entries).splitlines()
    assert lines[0] == "smoke  (experiment sftflow-smoke; model sftflow-smoke: champion -, candidate 2)"
    header, first, second = lines[1], lines[2], lines[3]
    assert first.split()[:5] == ["aaaaaaaaaaaa", "2026-01-02", "03:04:05", "FINISHED", "1m18s"]
    assert first.index("0.2500") + 6 == header.index("tuned rougeL") + len("tuned rougeL")
    assert "FAILED" in second and second.split()[-1] == "-"
    assert lines[-1] == "  no runs yet"


def test_progress_callback_labels_with_spaces_reach_the_console() -> None:
    """Generation loops report cumulative counts; labels such as 'evaluate.base heldout' are parsed whole."""
    from sftflow.ops.progress_report import progress_callback

    with _captured("sftflow.progress") as seen:  # run_logger's name outside a Prefect run
        cb = progress_callback("evaluate.base heldout")
        time.sleep(1.2)  # the first batch takes a while: the first line's ETA must not be 0
        for done in (4, 8, 12):
            cb(done, 12)
    events = [e for e in map(event_of, seen) if e is not None]
    assert events[0].what == "evaluate.base heldout" and (events[0].done, events[0].total) == (4, 12)
    assert events[0].eta_s > 0  # the clock started with the work, not at its first report
    assert (events[-1].done, events[-1].total) == (12, 12)
    out = io.StringIO()
    console = RunConsole(pipeline="smoke", out=out, tty=True)
    console._on_record(_record("reworded", task_run="evaluate-base", event=events[-1]))
    assert "evaluate.base heldout 12/12" in out.getvalue()


def test_the_real_training_loop_reports_progress_to_the_console(sftflow_home, monkeypatch) -> None:
    """The recipe (tiny model, 3 steps) emits StepEvents; the console shows them, whatever the text says."""
    from sftflow.config_sections import TrainingConfig
    from sftflow.data.records import make_record, records_to_frame
    from sftflow.data.refs import write_parquet
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.ops.console import _RecordHandler
    from sftflow.training import loop

    rows = [make_record([{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"The answer is {2 * i}."}], source="unit:console")
            for i in range(8)]
    data = write_parquet(records_to_frame(rows), sftflow_home / "train.parquet", name="train")
    cfg = TrainingConfig.model_validate({"batch_size": 4, "max_steps": 3, "log_every": 1, "precision": "fp32",
                                         "checkpoint_every": None, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    # A reworded progress line must not silence the console: it reads the event only.
    monkeypatch.setattr(loop, "_progress_line", lambda rec, state, total: "training is going fine")
    out = io.StringIO()
    console = RunConsole(pipeline="smoke", out=out, tty=True)
    logger = logging.getLogger(loop.LOGGER_NAME)  # run_logger's logger outside a Prefect run
    handler, old = _RecordHandler(console), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with _captured(loop.LOGGER_NAME) as seen:
            loop.train(train=data, heldout=None, base=build_tiny_model("tiny-gemma"), cfg=cfg,
                       out_dir=sftflow_home / "run")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    steps = [e for e in map(event_of, seen) if isinstance(e, StepEvent)]
    assert [(e.step, e.total) for e in steps] == [(1, 3), (2, 3), (3, 3)]
    assert all(e.loss > 0 and e.seconds_per_step > 0 for e in steps)
    shown = out.getvalue()
    assert "train: step 3/3 [####################] 100% loss " in shown, shown
    assert f"loss {steps[-1].loss:.4f}" in shown

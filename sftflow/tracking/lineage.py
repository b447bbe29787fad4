"""Lineage of a registered model version: ``sftflow lineage MODEL[@alias|/version]``.

Walks MLflow from the model version back to its inputs::

    model version (tags: sha256 of the train / held-out files and base model it was trained from,
    │              training key, code digest)
    └─► training run ─► parent pipeline run (Prefect flow-run id, config hash, git, sources digest)
                                      ├─ config/resolved.yaml (the resolved config artifact)
                                      └─ every stage run: datasets logged as inputs
                                         (name, digest, source file, context), artifacts
                                         (GX validation result, dedup report,
                                          backtranslation candidates, eval samples ...)

Use::

    from sftflow.tracking.lineage import lineage, format_lineage
    print(format_lineage(lineage("sftflow-demo@champion")))

Every digest is printed in full, so it can be compared with ``sha256sum`` of the files; a
disagreement between the version's tags and the datasets its training run logged is reported as
``MISMATCH``. ``lineage`` only reads the tracking store (default: ``$MLFLOW_TRACKING_URI`` or the SQLite store
under ``$SFTFLOW_HOME``).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from sftflow.errors import NotFoundError
from sftflow.tagnames import (
    TAG_BASE_SHA256,
    TAG_CACHE_KEY,
    TAG_CODE_DIGEST,
    TAG_HELDOUT_SHA256,
    TAG_MODEL_SHA256,
    TAG_TRAIN_KEY,
    TAG_TRAIN_SHA256,
)
from sftflow.tracking.runs import (
    TAG_CONFIG_HASH,
    TAG_FLOW_RUN,
    TAG_GIT,
    TAG_PIPELINE,
    TAG_RUN_DIR,
    TAG_SOURCES,
    TAG_STAGE,
    configure,
    resolve_tracking_uri,
)

TAG_PARENT = "mlflow.parentRunId"
# Artifacts the lineage report names explicitly: (key, stage prefix, file-name pattern).
NAMED_ARTIFACTS: tuple[tuple[str, str, str], ...] = (
    ("config", "", r"(^|/)config/.*\.(ya?ml|json)$"),
    ("validation_result", "validate", r"(gx_result|great_expectations|validation|summary).*\.json$"),
    ("data_docs", "validate", r"(^|/)data_docs/$"),
    ("dedup_report", "dedup", r"report.*\.(json|md|html)$"),
    ("backtranslation_candidates", "backtranslate", r"candidates.*\.(parquet|json|jsonl|csv)$"),
    ("eval_samples", "evaluate", r"samples.*\.(parquet|json)$"),
    ("side_by_side", "promote", r"side_by_side\.(json|html|md)$"),
)
_MAX_ARTIFACTS_PER_RUN = 300
# Folders whose content is model weights/checkpoints: listed as one entry, not walked.
# GX Data Docs (hundreds of static files) are one entry too; their index.html is what people open.
_OPAQUE_DIRS = re.compile(r"(^|/)(checkpoints?|checkpoint-\d+|model|merged|adapter|weights|data_docs)$")


class LineageError(NotFoundError):
    """The model version (or something it points to) cannot be found; the message says what."""


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``name@alias`` / ``name/version`` / ``name`` (also with a ``models:/`` prefix) -> (name, alias, version)."""
    s = spec.strip().removeprefix("models:/")
    if not s:
        raise LineageError("empty model spec; expected MODEL, MODEL@alias or MODEL/version")
    if "@" in s:
        name, _, alias = s.rpartition("@")
        if not name or not alias:
            raise LineageError(f"bad model spec {spec!r}; expected MODEL@alias")
        return name, alias, None
    head, sep, tail = s.rpartition("/")
    if sep and tail.isdigit() and head:
        return head, None, tail
    return s, None, None


def _ts(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _source_uri(raw: str) -> str:
    """Dataset sources are JSON (``{"uri": ...}``, ``{"path": ...}``...); return the location."""
    try:
        d = json.loads(raw)
    except (TypeError, ValueError):
        return raw or ""
    if isinstance(d, dict):
        for k in ("uri", "url", "path", "source", "file"):
            if d.get(k):
                return str(d[k])
    return raw


def _datasets(run: Any) -> list[dict[str, Any]]:
    out = []
    inputs = getattr(run, "inputs", None)
    for di in getattr(inputs, "dataset_inputs", None) or []:
        tags = {t.key: t.value for t in (di.tags or [])}
        ds = di.dataset
        out.append(
            {
                "name": ds.name,
                "digest": ds.digest,
                "source": _source_uri(ds.source),
                "source_type": ds.source_type,
                "context": tags.get("mlflow.data.context", ""),
                "sha256": tags.get("sftflow.sha256", ""),
                "rows": int(tags["sftflow.rows"]) if tags.get("sftflow.rows", "").isdigit() else None,
                "path": tags.get("sftflow.path", ""),
            }
        )
    return out


def _artifacts(client: Any, run_id: str, artifact_uri: str) -> list[dict[str, Any]]:
    """Every artifact file of a run (weights folders as one entry), with its full URI."""
    out: list[dict[str, Any]] = []
    stack: list[str | None] = [None]
    while stack and len(out) < _MAX_ARTIFACTS_PER_RUN:
        path = stack.pop()
        try:
            items = client.list_artifacts(run_id, path)
        except Exception:  # an unreachable artifact store must not hide the rest of the lineage
            return out
        for fi in sorted(items, key=lambda f: f.path, reverse=True):
            if fi.is_dir and not _OPAQUE_DIRS.search(fi.path):
                stack.append(fi.path)
            else:
                out.append({"path": fi.path + ("/" if fi.is_dir else ""), "uri": f"{artifact_uri.rstrip('/')}/{fi.path}",
                            "size": fi.file_size})
    return sorted(out, key=lambda a: a["path"])


def _run_summary(client: Any, run: Any, *, with_artifacts: bool = True) -> dict[str, Any]:
    tags = run.data.tags
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "stage": tags.get(TAG_STAGE, ""),
        "status": run.info.status,
        "start": _ts(run.info.start_time),
        "end": _ts(run.info.end_time),
        "experiment_id": run.info.experiment_id,
        "artifact_uri": run.info.artifact_uri,
        "parent_run_id": tags.get(TAG_PARENT, ""),
        "cache_key": tags.get(TAG_CACHE_KEY, ""),
        "code_digest": tags.get(TAG_CODE_DIGEST, ""),
        "datasets": _datasets(run),
        "artifacts": _artifacts(client, run.info.run_id, run.info.artifact_uri) if with_artifacts else [],
        "metrics": dict(sorted(run.data.metrics.items())),
    }


def _children(client: Any, run: Any) -> list[Any]:
    """Every run below ``run`` (stages, and runs nested inside stages), in start order."""
    found, frontier = [], [run.info.run_id]
    while frontier:
        kids = []
        for rid in frontier:  # tag filters support `=` only (no IN)
            kids.extend(client.search_runs([run.info.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{rid}'",
                                           max_results=1000))
        found.extend(kids)
        frontier = [k.info.run_id for k in kids]
    return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def lineage(spec: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """The lineage of one registered model version as a JSON-able dict.

    Args:
        spec: ``MODEL``, ``MODEL@alias`` or ``MODEL/version`` (``models:/`` prefix allowed).
            A bare name means the latest version.
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI`` or the SQLite store under
            ``$SFTFLOW_HOME``).

    Returns:
        ``{"model", "training_run", "pipeline_run", "config", "stages", "datasets", "named", "digests"}``:
        ``stages`` lists every run of the pipeline run (datasets + artifact URIs), ``datasets`` every
        dataset logged as an input (with its stage), ``named`` the artifacts lineage cares about
        (``config``, ``validation_result``, ``dedup_report``, ``backtranslation_candidates``...),
        ``digests`` the sha256 of the sources, the train/held-out datasets, the base model and the
        model version, plus the cache/code keys (see ``_digests``).

    Raises:
        LineageError: unknown model, version, alias, or a version without a training run.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from sftflow.tracking.registry import ModelVersionNotFound, resolve_version

    uri = resolve_tracking_uri(tracking_uri)
    configure(uri)
    client = MlflowClient(uri)
    name, alias, version = parse_spec(spec)
    try:
        mv = resolve_version(client, name, alias=alias, version=version)
    except ModelVersionNotFound as e:
        raise LineageError(str(e)) from None

    run_id = mv.run_id or ""
    if not run_id and getattr(mv, "model_id", None):  # MLflow 3: versions point at a LoggedModel
        try:
            run_id = client.get_logged_model(mv.model_id).source_run_id or ""
        except MlflowException:
            run_id = ""
    model = {
        "name": mv.name,
        "version": str(mv.version),
        "aliases": sorted(mv.aliases or []),
        "source": mv.source,
        "model_id": getattr(mv, "model_id", None) or "",
        "run_id": run_id,
        "status": mv.status,
        "created": _ts(mv.creation_timestamp),
        "description": mv.description or "",
        "tags": dict(sorted((mv.tags or {}).items())),
    }
    if not run_id:
        raise LineageError(f"model version {mv.name}/{mv.version} has no training run recorded (source {mv.source})")
    try:
        train_run = client.get_run(run_id)
    except MlflowException as e:
        # Only "no such run" means it was deleted (gc'ed); a store that fails to read (a damaged
        # database, a server error) is that error, not a deleted run.
        if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LineageError(f"model version {mv.name}/{mv.version}: its training run {run_id} was deleted "
                           f"from the store (mlflow gc)") from None

    # Climb to the pipeline's parent run (the one without a parent, tagged by the flow).
    top = train_run
    seen = {top.info.run_id}
    while top.data.tags.get(TAG_PARENT) and top.data.tags[TAG_PARENT] not in seen:
        try:
            top = client.get_run(top.data.tags[TAG_PARENT])
        except MlflowException:
            break
        seen.add(top.info.run_id)

    result: dict[str, Any] = {"spec": spec, "tracking_uri": uri, "model": model,
                              "training_run": _run_summary(client, train_run)}
    if top.info.run_id == train_run.info.run_id:
        result["pipeline_run"] = None
        runs = [train_run]
    else:
        t = top.data.tags
        result["pipeline_run"] = {
            **_run_summary(client, top),
            "pipeline": t.get(TAG_PIPELINE, ""),
            "prefect_flow_run_id": t.get(TAG_FLOW_RUN, ""),
            "config_hash": t.get(TAG_CONFIG_HASH, ""),
            "git_commit": t.get(TAG_GIT, ""),
            "run_dir": t.get(TAG_RUN_DIR, ""),
            "sources_digest": t.get(TAG_SOURCES, ""),
        }
        runs = [top] + _children(client, top)

    stages = []
    for r in runs:
        if r.info.run_id == train_run.info.run_id:
            stages.append(result["training_run"])
        elif r.info.run_id == top.info.run_id:
            stages.append(result["pipeline_run"])
        else:
            stages.append(_run_summary(client, r))
    result["stages"] = stages
    result["datasets"] = [{**d, "stage": s["stage"] or s["name"], "run_id": s["run_id"]}
                          for s in stages for d in s["datasets"]]
    named: dict[str, list[str]] = {k: [] for k, _, _ in NAMED_ARTIFACTS}
    for s in stages:
        stage = s["stage"] or ""
        for key, prefix, pattern in NAMED_ARTIFACTS:
            if prefix and not stage.startswith(prefix):
                continue
            uris = [a["uri"] for a in s["artifacts"] if re.search(pattern, a["path"])]
            named[key].extend(u + "/index.html" if key == "data_docs" else u for u in uris)
    # Files a stage wrote in the run directory but recorded only as a tag (e.g. local GX results).
    for s in stages:
        run_tags = {}
        try:
            run_tags = client.get_run(s["run_id"]).data.tags
        except MlflowException:
            pass
        for k, v in run_tags.items():
            for key, prefix, pattern in NAMED_ARTIFACTS:
                if prefix and (s["stage"] or "").startswith(prefix) and k.startswith("sftflow.") \
                        and isinstance(v, str) and re.search(pattern, v) and v not in named[key]:
                    named[key].append(v)
    result["config"] = {"hash": (result["pipeline_run"] or {}).get("config_hash", ""), "artifacts": named["config"]}
    result["named"] = named
    result["digests"] = _digests(result, train_tags=train_run.data.tags)
    return result


def _digests(result: dict[str, Any], *, train_tags: dict[str, str]) -> dict[str, Any]:
    """The sha256 of the bytes behind the model version, from every place they are recorded.

    Sources come from the parent run's tag and the ingest run's per-file inputs; the train and
    held-out digests from the model version's tags (written by the train stage from the files it
    read), falling back to the training run's tags. ``mismatches`` lists any disagreement between
    the version's tags and the datasets its training run logged (empty when lineage is consistent).
    """
    mtags = result["model"]["tags"]

    def tag(name: str) -> str:
        return mtags.get(name) or train_tags.get(name, "")

    train_id = result["training_run"]["run_id"]
    logged = {d["context"]: d["sha256"] for d in result["datasets"] if d["run_id"] == train_id}
    out = {
        "sources": (result.get("pipeline_run") or {}).get("sources_digest", ""),
        "source_files": [{"name": d["name"], "path": d["source"], "sha256": d["sha256"] or d["digest"],
                          "run_id": d["run_id"]}
                         for d in result["datasets"] if d["context"] == "ingest.source"],
        "train": tag(TAG_TRAIN_SHA256),
        "heldout": tag(TAG_HELDOUT_SHA256),
        "base_model": tag(TAG_BASE_SHA256),
        "model": tag(TAG_MODEL_SHA256),
        "train_key": tag(TAG_TRAIN_KEY),
        "code": tag(TAG_CODE_DIGEST),
        "cache_key": tag(TAG_CACHE_KEY),
        "stage_keys": {s["stage"] or s["name"]: s["cache_key"] for s in result["stages"] if s.get("cache_key")},
        "mismatches": [],
    }
    for key, context in (("train", "training"), ("heldout", "heldout")):
        if out[key] and logged.get(context) and out[key] != logged[context]:
            out["mismatches"].append(f"{key}: model version says {out[key]}, its training run logged {logged[context]}")
    return out


def format_lineage(d: dict[str, Any]) -> str:
    """Human-readable text of ``lineage(...)``'s dict (what ``sftflow lineage`` prints)."""
    m = d["model"]
    lines = [
        f"Model {m['name']} version {m['version']}" + (f"  aliases: {', '.join(m['aliases'])}" if m["aliases"] else ""),
        f"  source: {m['source']}",
        f"  created: {m['created']}  status: {m['status']}",
    ]
    gate = m["tags"].get("sftflow.gate.decision")
    if gate:
        lines.append(f"  promotion gate: {gate} — {m['tags'].get('sftflow.gate.reason', '')}")
    tr = d["training_run"]
    lines += ["", f"Training run {tr['run_id']} ({tr['name']}, {tr['status']})", f"  artifacts: {tr['artifact_uri']}"]
    pr = d.get("pipeline_run")
    if pr:
        lines += [
            f"Pipeline run {pr['run_id']} ({pr['name']}, {pr['status']}, {pr['start']})",
            f"  pipeline: {pr['pipeline']}",
            f"  Prefect flow run: {pr['prefect_flow_run_id']}",
            f"  config hash: {pr['config_hash']}",
            f"  code version: {pr['git_commit']}",
            f"  run directory: {pr['run_dir']}",
        ]
    else:
        lines.append("Pipeline run: none (the training run has no parent run)")
    dg = d.get("digests") or {}
    lines += ["", "Digests (sha256 of the bytes read):"]
    if dg.get("sources"):
        lines.append(f"  sources (parent run)   {dg['sources']}")
    for f in dg.get("source_files", []):
        lines.append(f"  source file            {f['sha256']}  {f['path']}")
    for key, title in (("train", "train dataset"), ("heldout", "held-out dataset"), ("base_model", "base model (dir)"),
                       ("model", "model (dir)"), ("train_key", "training key"), ("code", "code (train closure)"),
                       ("cache_key", "train cache key")):
        if dg.get(key):
            lines.append(f"  {title:<22} {dg[key]}")
    for stage, key in (dg.get("stage_keys") or {}).items():
        lines.append(f"  cache key {stage:<12} {key}")
    for m in dg.get("mismatches", []):
        lines.append(f"  MISMATCH: {m}")
    lines.append("")
    lines.append("Config:")
    lines += [f"  {u}" for u in d["config"]["artifacts"]] or ["  (no config artifact)"]
    lines.append("")
    lines.append("Datasets (stage  context  name  rows  sha256  source):")
    if not d["datasets"]:
        lines.append("  (none logged)")
    for ds in d["datasets"]:
        rows = "" if ds["rows"] is None else str(ds["rows"])
        digest = ds["sha256"] or ds["digest"]
        lines.append(f"  {ds['stage']:<22} {ds['context']:<20} {ds['name']:<18} {rows:>7}  {digest}  {ds['source']}")
    titles = {
        "validation_result": "Validation result (GX)",
        "data_docs": "Data Docs",
        "dedup_report": "Dedup report",
        "backtranslation_candidates": "Backtranslation candidates",
        "eval_samples": "Evaluation samples",
        "side_by_side": "Side-by-side table",
    }
    for key, title in titles.items():
        uris = d["named"].get(key) or []
        lines.append("")
        lines.append(f"{title}:")
        lines += [f"  {u}" for u in uris] or ["  (none)"]
    lines.append("")
    lines.append("Stage runs:")
    for s in d["stages"]:
        lines.append(f"  {s['stage'] or s['name']:<22} {s['run_id']}  {s['status']}  {len(s['artifacts'])} artifacts")
    return "\n".join(lines)

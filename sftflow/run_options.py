"""The typed run options of a pipeline: the knobs people change when they start a run by hand.

The Prefect deployment of a pipeline (flows/serve.py) shows these as a form; the flow
(flows/pipeline.py) turns them into override key paths of pipelines.yaml and merges them with
the free-form ``overrides`` (which win). One table, ``OPTIONS``, says which knobs exist, their
key path, type and description; ``options_model`` builds the pydantic model from it, either
generic (every value ``None``: "as in pipelines.yaml"; the flow's parameter type) or for one
pipeline (each default the pipeline's current value; the form of that pipeline's deployment).

Semantics of a value:

* ``None`` (an empty field): keep the pipeline's value.
* ``sources.max_rows``: rows read from every source; then each ``sources.per_source.<name>`` that
  differs from that source's value in pipelines.yaml wins for that source. (The form pre-fills
  each source with its current value, so an untouched source takes the all-sources value.)
* anything else: set when it differs from the pipeline's value (equal values are no change).

Usage::

    cfg = resolve_run_config("demo", options={"training": {"max_steps": 5}})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from sftflow.config import PipelineConfig, resolve_pipeline
from sftflow.config_sections import ConfigError

TrainingMethod = Literal["lora", "dora", "rslora", "full", "qlora"]

# section -> field -> (type, pydantic constraints, description). The key path of a field is
# ``<section>.<field>`` (``base_model`` is top-level); types and constraints mirror sftflow/config.py.
OPTIONS: dict[str, dict[str, tuple[Any, dict[str, Any], str]]] = {
    "training": {
        "method": (TrainingMethod, {}, "lora / dora / rslora / qlora adapters, or full fine-tuning"),
        "max_steps": (int, {"gt": 0}, "optimizer steps (training.max_steps)"),
        "learning_rate": (float, {"gt": 0}, "peak learning rate (empty: 2e-4 for adapters, 2e-5 for full)"),
        "max_seq_len": (int, {"gt": 8}, "tokens per training example; longer ones are truncated or dropped"),
    },
    "augmentation": {
        "enabled": (bool, {}, "backtranslate the unlabeled corpus into extra curated pairs"),
        "max_segments": (int, {"gt": 0}, "unlabeled segments backtranslated per iteration"),
    },
    "evaluation": {
        "max_examples": (int, {"gt": 0}, "held-out examples generated and scored for base and tuned"),
    },
    "promotion": {
        "metric": (str, {}, "metric the gate compares (rougeL, eval_loss, judge, ...)"),
        "min_improvement": (float, {"ge": 0}, "the gain's bootstrap lower bound must exceed this"),
    },
}
SECTION_TITLES = {"sources": "Sources", "training": "Training", "augmentation": "Augmentation",
                  "evaluation": "Evaluation", "promotion": "Promotion gate"}
BASE_MODEL_DESCRIPTION = "embedded model name (gemma-3-270m, smollm2-135m-instruct...), local model dir, or hub id"


def _field(type_: Any, constraints: dict[str, Any], description: str, default: Any) -> tuple[Any, Any]:
    # A pipeline's set value is a plain typed input in the form (no "int | None" switch); a field
    # the pipeline leaves unset (None) stays optional.
    return (Optional[type_] if default is None else type_, Field(default, description=description, **constraints))


def _model(name: str, fields: dict[str, tuple[Any, Any]], *, title: str) -> type[BaseModel]:
    # extra="forbid": a misspelt option is an error, not a silently ignored key.
    return create_model(name, __config__=ConfigDict(extra="forbid", title=title), **fields)


def options_model(cfg: PipelineConfig | None = None, *, pipeline: str | None = None) -> type[BaseModel]:
    """The pydantic model of the run options: generic (``cfg=None``) or with one pipeline's defaults.

    Args:
        cfg: the pipeline whose current values become the defaults (None: every default is None).
        pipeline: its name, used in the model's title.

    Returns:
        A model with ``base_model`` and one nested model per section (``sources``, ``training``,
        ``augmentation``, ``evaluation``, ``promotion``).
    """
    suffix = "".join(p.capitalize() for p in (pipeline or "").replace("-", "_").split("_"))
    sections: dict[str, tuple[Any, Any]] = {}
    for section, spec in OPTIONS.items():
        current = getattr(cfg, section) if cfg is not None else None
        fields = {name: _field(t, c, d, getattr(current, name) if current is not None else None)
                  for name, (t, c, d) in spec.items()}
        model = _model(f"{section.capitalize()}Options{suffix}", fields, title=SECTION_TITLES[section])
        sections[section] = (model, Field(default_factory=model, description=f"{SECTION_TITLES[section]} settings"))

    all_rows = (Optional[int], Field(None, gt=0, description="rows read from EVERY source (empty: each source's "
                                                                "own value below)"))
    if cfg is None:
        # The flow's generic type: any source name (checked against the pipeline when resolved).
        per_source: tuple[Any, Any] = (dict[str, Optional[int]], Field(
            default_factory=dict, description="rows read from each source, by source name (empty: all rows)"))
    else:
        rows = {s.name: (Optional[int] if s.max_rows is None else int,
                         Field(s.max_rows, gt=0, description=f"{s.path} (empty: all rows)"))
                for s in cfg.sources}
        per = _model(f"SourceRows{suffix}", rows, title="Rows per source")
        per_source = (per, Field(default_factory=per, description="rows read from each source (empty: all rows)"))
    sources = _model(f"SourcesOptions{suffix}", {"max_rows": all_rows, "per_source": per_source}, title="Sources")
    sections = {"sources": (sources, Field(default_factory=sources, description="how many rows each source "
                                                                                   "contributes")), **sections}
    base = (Optional[str], Field(cfg.base_model if cfg is not None else None, description=BASE_MODEL_DESCRIPTION))
    title = f"Run options ({pipeline})" if pipeline else "Run options"
    return _model(f"RunOptions{suffix}", {"base_model": base, **sections}, title=title)


RunOptions = options_model()
"""The flow's ``options`` parameter type (every value None = as in pipelines.yaml)."""


def _as_dict(options: BaseModel | dict[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return {}
    if isinstance(options, BaseModel):
        return options.model_dump()
    # A dict (the API, a form): validated by the generic model so errors name the option.
    return RunOptions.model_validate(options).model_dump()


def options_overrides(options: BaseModel | dict[str, Any] | None, *, cfg: PipelineConfig,
                      pipeline: str = "<pipeline>") -> dict[str, Any]:
    """The override key paths (``{"training.max_steps": 5, "sources.0.max_rows": 10}``) that the
    options change in ``cfg`` (see the module docstring for the rules).

    Raises:
        ConfigError: ``sources.per_source`` names a source the pipeline does not have.
    """
    opts = _as_dict(options)
    out: dict[str, Any] = {}
    if opts.get("base_model") is not None and opts["base_model"] != cfg.base_model:
        out["base_model"] = opts["base_model"]
    for section, spec in OPTIONS.items():
        current = getattr(cfg, section)
        for name in spec:
            value = (opts.get(section) or {}).get(name)
            if value is not None and value != getattr(current, name):
                out[f"{section}.{name}"] = value
    src = opts.get("sources") or {}
    index = {s.name: i for i, s in enumerate(cfg.sources)}
    per = {k: v for k, v in (src.get("per_source") or {}).items() if v is not None}
    unknown = sorted(set(per) - set(index))
    if unknown:
        raise ConfigError(f"options.sources.per_source.{unknown[0]}: pipelines.{pipeline} has no such source "
                          f"(have: {', '.join(index)})")
    for s in cfg.sources:
        value = src.get("max_rows")
        if per.get(s.name) is not None and per[s.name] != s.max_rows:
            value = per[s.name]
        if value is not None and value != s.max_rows:
            out[f"sources.{index[s.name]}.max_rows"] = value
    return out


def resolve_run_config(pipeline: str, *, options: BaseModel | dict[str, Any] | None = None,
                       overrides: list[str] | dict[str, Any] | None = None,
                       path: str | Path | None = None) -> PipelineConfig:
    """The pipeline's config with the typed ``options`` and then the free-form ``overrides`` applied.

    Overrides win over options (they are applied last); errors name the key path.
    """
    changes = (options_overrides(options, cfg=resolve_pipeline(pipeline, path=path), pipeline=pipeline)
               if options is not None else {})
    if not changes:
        return resolve_pipeline(pipeline, overrides=overrides, path=path)
    merged = dict(changes)
    if isinstance(overrides, dict):
        merged.update(overrides)
    elif overrides:
        from sftflow.config import parse_override

        # `--set` strings: the parsed value, so options and overrides merge by key path.
        merged.update({".".join(keys): value for keys, value in map(parse_override, overrides)})
    return resolve_pipeline(pipeline, overrides=merged, path=path)

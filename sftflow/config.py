"""The one typed schema of ``pipelines.yaml``.

``load_pipelines(path)`` reads the file and validates every pipeline before any work starts.
Errors name the YAML key path and what was expected, e.g.::

    pipelines.demo.training.lora.r: must be > 0 (got 0)

``resolve_pipeline(name, overrides=[...])`` applies ``key.path=value`` overrides (the CLI's
``--set`` and the Prefect flow's ``overrides`` parameter) and re-validates.

Relative paths in the file are relative to the file's own folder, so the repo runs from any cwd.

The per-stage sections (``TrainingConfig``, ``DedupConfig`` ...), ``ConfigError`` and the error-line
format live in ``sftflow.config_sections``; this module holds the pipeline (``PipelineConfig``) and
its loading: YAML (duplicate keys refused), ``key.path=value`` overrides, path resolution
(``resolve_paths``), file checks, ``config_hash``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from sftflow.config_sections import (AugmentationConfig, ConfigError, DedupConfig, EvaluationConfig, ExecutionConfig,
                                     IngestConfig, PromotionConfig, RejectionSamplingConfig, ScheduleConfig, Section,
                                     SourceConfig, SplitConfig, TrackingConfig, TrainingConfig, ValidationConfig,
                                     format_errors, merge_training, name_problem)
from sftflow.masking import mask_uri


class PipelineConfig(Section):
    """One named pipeline of pipelines.yaml."""

    description: str = ""
    base_model: str = Field("gemma-3-270m", description="embedded model name, local model dir, or hub id")
    trust_remote_code: bool = False
    seed: int = 0
    sources: list[SourceConfig] = Field(min_length=1)
    ingest: IngestConfig = IngestConfig()
    validation: ValidationConfig = ValidationConfig()
    dedup: DedupConfig = DedupConfig()
    split: SplitConfig = SplitConfig()
    augmentation: AugmentationConfig = AugmentationConfig()
    rejection_sampling: RejectionSamplingConfig = RejectionSamplingConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    promotion: PromotionConfig = PromotionConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    tracking: TrackingConfig = TrackingConfig()
    execution: ExecutionConfig = ExecutionConfig()

    @model_validator(mode="after")
    def _unique_source_names(self) -> "PipelineConfig":
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {dup}")
        sets = [s.name for s in self.evaluation.extra_sets]
        dup = sorted({n for n in sets if sets.count(n) > 1})
        if dup:  # their metrics (<set>/rougeL ...) would overwrite each other
            raise ValueError(f"evaluation.extra_sets names must be unique; repeated: {dup}")
        uri = self.tracking.tracking_uri
        if uri and mask_uri(uri) != uri:
            # The resolved config travels as Prefect flow-run parameters and MLflow artifacts: a
            # password (or a token given as the user name) would be stored there. MLflow reads
            # credentials from the environment instead.
            raise ValueError("tracking.tracking_uri: holds credentials (user:password@); give the URI without them and put the "
                             "credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or the whole "
                             "URI in $MLFLOW_TRACKING_URI), which are never stored")
        return self

# --------------------------------------------------------------------------- loading
def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Make the file paths in one raw pipeline dict absolute (relative to pipelines.yaml)."""

    def fix(p: Any) -> Any:
        if isinstance(p, str) and p and not Path(p).expanduser().is_absolute():
            return str((base_dir / p).resolve())
        return p

    raw = copy.deepcopy(raw)
    for src in raw.get("sources") or []:
        if isinstance(src, dict) and "path" in src:
            src["path"] = fix(src["path"])
    aug = raw.get("augmentation") or {}
    if isinstance(aug, dict) and isinstance(aug.get("corpus"), dict) and "path" in aug["corpus"]:
        aug["corpus"]["path"] = fix(aug["corpus"]["path"])
    ev = raw.get("evaluation") or {}
    if isinstance(ev, dict):
        for s in ev.get("extra_sets") or []:
            if isinstance(s, dict) and "path" in s:
                s["path"] = fix(s["path"])
    rs = raw.get("rejection_sampling") or {}
    if isinstance(rs, dict) and rs.get("prompts") not in (None, "train"):
        rs["prompts"] = fix(rs["prompts"])
    bm = raw.get("base_model")
    if isinstance(bm, str) and (bm.startswith("./") or bm.startswith("../")):
        raw["base_model"] = fix(bm)
    return raw


def _check_files(name: str, cfg: PipelineConfig) -> None:
    """Refuse missing input files before any work, naming the key path."""
    problems = []
    for i, src in enumerate(cfg.sources):
        if src.path and not _exists_or_glob(src.path):
            problems.append(f"pipelines.{name}.sources.{i}.path: file not found: {src.path}")
    if cfg.augmentation.enabled and cfg.augmentation.corpus and not _exists_or_glob(cfg.augmentation.corpus.path):
        problems.append(f"pipelines.{name}.augmentation.corpus.path: file not found: {cfg.augmentation.corpus.path}")
    for i, s in enumerate(cfg.evaluation.extra_sets):
        if not _exists_or_glob(s.path):
            problems.append(f"pipelines.{name}.evaluation.extra_sets.{i}.path: file not found: {s.path}")
    rs = cfg.rejection_sampling
    if rs.enabled and rs.prompts != "train" and not Path(rs.prompts).exists():
        problems.append(f"pipelines.{name}.rejection_sampling.prompts: file not found: {rs.prompts} "
                        "(expected `train` or a prompt file)")
    if problems:
        raise ConfigError("\n".join(problems))


def resolve_paths(path: str | Path) -> list[Path]:
    """THE resolver of a ``path`` setting (sources, the backtranslation corpus, extra evaluation sets).

    Ingest, these file checks, preflight, the cache keys and the corpus reader all expand a path
    here, so they agree on the files it names: ``~`` is the home folder; a glob (``*``, ``?``, ``[``)
    matches recursively (``**`` crosses folders; ``*`` skips dot-files, as in the shell) and comes
    back sorted, possibly empty; anything else comes back as ``[the path]``, whether or not it exists.
    """
    import glob

    expanded = Path(path).expanduser()
    if any(ch in str(path) for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(str(expanded), recursive=True))
    return [expanded]


def _exists_or_glob(p: str) -> bool:
    return any(x.exists() for x in resolve_paths(p))


def default_pipelines_path() -> Path:
    """``$SFTFLOW_PIPELINES`` or ``pipelines.yaml`` in the cwd, else the one next to the package."""
    import os

    env = os.environ.get("SFTFLOW_PIPELINES")
    if env:
        return Path(env).expanduser().resolve()
    cwd = Path.cwd() / "pipelines.yaml"
    if cwd.exists():
        return cwd.resolve()
    return (Path(__file__).resolve().parent.parent / "pipelines.yaml").resolve()


def load_raw(path: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Read pipelines.yaml as plain data (no validation); returns (data, absolute path)."""
    p = Path(path).expanduser().resolve() if path else default_pipelines_path()
    if not p.exists():
        raise ConfigError(f"{p}: pipelines file not found (give an existing YAML file with -f / $SFTFLOW_PIPELINES)")
    if p.is_dir():
        hint = " (did you mean -f " + str(p / "pipelines.yaml") + "?)" if (p / "pipelines.yaml").is_file() else ""
        raise ConfigError(f"{p}: is a folder; expected a pipelines YAML file{hint}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); expected a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the pipelines file: {e.strerror or e}") from None
    try:
        data = load_yaml(text, source=str(p))
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(p, e)) from None
    if not isinstance(data, dict) or "pipelines" not in data:
        raise ConfigError(f"{p}: expected a mapping with a top-level `pipelines:` key")
    return data, p


def _duplicate_keys(node: yaml.Node, path: list[str], *, source: str) -> list[str]:
    """One line per key given twice in one mapping below ``node``: key path and both line numbers.

    YAML itself keeps the last value silently (a second ``training:`` block replaces the first
    whole), so a repeated key is refused. Keys brought in by a merge (``<<: *anchor``) may be
    overridden on purpose and are not counted.
    """
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, yaml.Mark] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "<complex key>"
            mark = key_node.start_mark
            if key in first:
                a, b = first[key], mark
                at = (f"line {a.line + 1}, again at line {b.line + 1}" if a.line != b.line else
                      f"line {a.line + 1} column {a.column + 1}, again at column {b.column + 1}")
                where = f"{source}:{b.line + 1}: " if source else ""
                problems.append(f"{where}{'.'.join([*path, key])}: duplicate key (first at {at}); "
                                "YAML would silently keep only the last one: merge them into one")
            else:
                first[key] = mark
            problems += _duplicate_keys(value_node, [*path, key], source=source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, [*path, str(i)], source=source)
    return problems


def load_yaml(text: str, *, source: str = "", prefix: str = "") -> Any:
    """``yaml.safe_load`` that refuses duplicate keys instead of keeping the last one silently.

    Args:
        text: the YAML document.
        source: file name, for messages (``file:line:`` before the key path; none when empty).
        prefix: key path of the document's root (``pipelines.smoke.training`` for an override value).

    Raises:
        ConfigError: a key is given twice in one mapping (names its key path and both lines).
        yaml.YAMLError: the text is not valid YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problems = _duplicate_keys(node, [prefix] if prefix else [], source=source)
        if problems:
            raise ConfigError("\n".join(problems))
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """``file:line:col: not valid YAML: <problem> (<context>)`` on one line."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    cmark = getattr(e, "context_mark", None)
    if context and cmark is not None and cmark is not mark:
        context += f" started at line {cmark.line + 1}, column {cmark.column + 1}"
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value as YAML: numbers, bools, lists work) into (keys, value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    key, _, value = item.partition("=")
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {item!r}: empty key path")
    return keys, parse_value(value, key=".".join(keys))


def parse_value(value: str, *, key: str = "") -> Any:
    """An override's value as YAML (``8`` -> int, ``true`` -> bool, ``[a, b]`` -> list); text that
    is not valid YAML, and the empty string, stay as they are. A mapping with a key given twice
    (``training={batch_size: 1, batch_size: 2}``) is refused, naming ``key``."""
    try:
        return load_yaml(value, prefix=key) if value.strip() else ""
    except yaml.YAMLError:
        return value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any] | None, *, prefix: str) -> dict[str, Any]:
    """Return a copy of ``raw`` with overrides applied (list of ``k=v`` strings or dict of path->value)."""
    raw = copy.deepcopy(raw)
    if not overrides:
        return raw
    items: list[tuple[list[str], Any]]
    if isinstance(overrides, dict):
        # String values (the Prefect UI's form, the CLI) are parsed like `--set` values, once.
        items = [(k.split("."), (parse_value(v, key=k) if isinstance(v, str) else v)) for k, v in overrides.items()]
    else:
        items = [parse_override(o) for o in overrides]
    for keys, value in items:
        node: Any = raw
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                try:
                    node = node[int(k)]
                except (ValueError, IndexError):
                    raise ConfigError(f"{prefix}.{'.'.join(keys[: i + 1])}: no such list item") from None
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"{prefix}.{'.'.join(keys[:i])}: is not a mapping, cannot set {'.'.join(keys)}")
            node = node.setdefault(k, {})
        last = keys[-1]
        if isinstance(node, list):
            try:
                node[int(last)] = value
            except (ValueError, IndexError):
                raise ConfigError(f"{prefix}.{'.'.join(keys)}: no such list item") from None
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"{prefix}.{'.'.join(keys[:-1])}: is not a mapping, cannot set {'.'.join(keys)}")
    return raw


def training_override_errors(training: TrainingConfig, overrides: dict[str, Any], *, prefix: str) -> list[str]:
    """Problems of a partial TrainingConfig override (``augmentation.backward_training`` ...), one
    line each naming ``<prefix>.<key path>``: keys must be TrainingConfig fields, and the pipeline's
    ``training`` with the override merged in must validate."""
    if not overrides:
        return []
    try:
        TrainingConfig.model_validate(merge_training(training, overrides))
    except ValidationError as e:
        return format_errors(e, prefix, model=TrainingConfig).splitlines()
    return []


def validate_pipeline(name: str, raw: dict[str, Any], *, base_dir: Path, check_files: bool = True) -> PipelineConfig:
    """Validate one raw pipeline dict; errors name ``pipelines.<name>.<key path>``."""
    prefix = f"pipelines.{name}"
    problem = name_problem(name)
    if problem:  # the name is a folder (runs/<name>/) and part of the default model / experiment names
        raise ConfigError(f"{prefix}: pipeline name {problem} (got {name!r})")
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping")
    try:
        cfg = PipelineConfig.model_validate(_resolve_paths(raw, base_dir))
    except ValidationError as e:
        raise ConfigError(format_errors(e, prefix, model=PipelineConfig)) from None
    problems = [line for key in ("backward_training", "forward_training")
                for line in training_override_errors(cfg.training, getattr(cfg.augmentation, key),
                                                     prefix=f"{prefix}.augmentation.{key}")]
    problems += training_override_errors(cfg.training, cfg.rejection_sampling.round2_training,
                                         prefix=f"{prefix}.rejection_sampling.round2_training")
    if problems:
        raise ConfigError("\n".join(problems))
    if check_files:
        _check_files(name, cfg)
    return cfg


def load_pipelines(path: str | Path | None = None, *, check_files: bool = True) -> dict[str, PipelineConfig]:
    """Load and validate every pipeline in the file. Raises ConfigError naming the key path."""
    data, p = load_raw(path)
    unknown = sorted(set(data) - {"pipelines"})
    if unknown:
        raise ConfigError("\n".join(f"{k}: unknown top-level key (expected only `pipelines`)" for k in unknown))
    pipes = data["pipelines"]
    if not isinstance(pipes, dict) or not pipes:
        raise ConfigError("pipelines: expected a non-empty mapping of pipeline name -> settings")
    errors, out = [], {}
    for name, raw in pipes.items():
        try:
            out[str(name)] = validate_pipeline(str(name), raw, base_dir=p.parent, check_files=check_files)
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError("\n".join(errors))
    return out


def resolve_pipeline(
    name: str,
    *,
    overrides: list[str] | dict[str, Any] | None = None,
    path: str | Path | None = None,
) -> PipelineConfig:
    """Load one pipeline by name with overrides applied, validated; errors name the key path."""
    data, p = load_raw(path)
    pipes = data.get("pipelines") or {}
    if name not in pipes:
        raise ConfigError(f"pipelines.{name}: no such pipeline (have: {', '.join(sorted(pipes)) or 'none'})")
    raw = apply_overrides(pipes[name], overrides, prefix=f"pipelines.{name}")
    return validate_pipeline(name, raw, base_dir=p.parent)


def config_hash(cfg: PipelineConfig) -> str:
    """sha256 of the resolved config (what a run is tagged with)."""
    from sftflow.digests import json_sha256 as sha256_json

    return sha256_json(cfg.model_dump(mode="json"))

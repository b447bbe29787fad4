"""Checks of a pipeline against its base model's shape, before any data stage runs.

What the schema cannot know, the model's ``config.json``, its safetensors headers and its
tokenizer can, without loading a single weight:

* ``training.lora.r`` must not exceed ``min(in, out)`` of the smallest layer it targets (a rank
  above that adds parameters and disk, never capacity: ``r=100000`` on a tiny model wrote a
  782 MB adapter); ``training.lora.target_modules`` must name layers the model has.
* ``training.max_seq_len`` (and ``max_new_tokens`` of generation) must fit the model's context
  (``max_position_embeddings``). Gemma 3's ``sliding_window`` bounds only what its local layers
  attend to; its global layers see the whole context, so the bound stays
  ``max_position_embeddings``.
* ``training.max_seq_len`` must hold the chat template's overhead for a minimal conversation plus
  a few answer tokens, measured with the model's real tokenizer and template; below that no row
  keeps a single learned token (it used to fail only after every data stage had run).

``model_problems(cfg, pipeline=, model_dir=)`` returns one line per problem, naming the key path.
``local_model_dir(name)`` finds a model that is already on disk (provisioned, a local folder, a
hub snapshot in the cache) and creates nothing; preflight runs the checks when it finds one, and
the flow runs them again right after provisioning (a first run of an embedded model).
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path
from typing import Any, Iterable

from sftflow import layout
from sftflow.config import PipelineConfig
from sftflow.config_sections import TrainingConfig

# peft's method names that put LoRA matrices on linear layers.
LORA_METHODS = ("lora", "dora", "rslora", "qlora")
# Fewest answer tokens a training row must be able to keep (after the template's prompt part).
MIN_ANSWER_TOKENS = 4
# config.json keys that hold the context length, in the order transformers' architectures use them.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Layers that are never LoRA targets under "all-linear" (peft skips the output layer; embeddings
# are not linear layers).
_NOT_LINEAR = ("embed", "lm_head", "wte", "wpe")


# --------------------------------------------------------------------------- finding the model
def local_model_dir(name: str) -> Path | None:
    """The folder of model ``name`` when it is already on disk (nothing is created or fetched).

    Embedded and tiny models: ``$SFTFLOW_HOME/models/<name>`` once provisioned; a local folder
    (an adapter folder resolves to its base); a hub id: its snapshot in ``$SFTFLOW_HOME/cache/hub``.
    """
    from sftflow.inference.gguf import EMBEDDED_MODELS
    from sftflow.inference.model_store import DONE_MARKER
    from sftflow.inference.tiny import TINY_MODELS

    if name in EMBEDDED_MODELS or name in TINY_MODELS:
        d = layout.models_dir() / layout.safe_name(name)
        return d if (d / DONE_MARKER).exists() and (d / "config.json").is_file() else None
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        adapter = path / "adapter_config.json"
        if adapter.is_file():
            try:
                base = json.loads(adapter.read_text()).get("base_model_name_or_path")
            except (OSError, ValueError):
                return None
            return local_model_dir(base) if isinstance(base, str) and base else None
        return None
    if "/" in name:  # a hub id: huggingface_hub's cache layout models--org--name/snapshots/<rev>/
        snaps = layout.cache_dir() / "hub" / ("models--" + name.replace("/", "--")) / "snapshots"
        found = sorted((d for d in snaps.glob("*") if (d / "config.json").is_file()),
                       key=lambda d: d.stat().st_mtime) if snaps.is_dir() else []
        return found[-1] if found else None
    return None


def read_config(model_dir: Path) -> dict[str, Any]:
    """The text model's settings from ``config.json`` (a multimodal config's ``text_config``)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text = cfg.get("text_config")
    return {**cfg, **text} if isinstance(text, dict) else cfg


def weight_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Every tensor's shape from the safetensors headers (the JSON at each file's start; no weights read)."""
    shapes: dict[str, list[int]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100 << 20:  # not a safetensors header
                continue
            header = json.loads(fh.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)})
    return shapes


def linear_layers(model_dir: Path, config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``module name -> (in_features, out_features)`` of the model's linear layers (from the headers).

    A 2-D ``.weight`` is a linear layer unless it is an embedding / the output head (by name, or
    because one side is the vocabulary).
    """
    vocab = config.get("vocab_size")
    out: dict[str, tuple[int, int]] = {}
    for name, shape in weight_shapes(model_dir).items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        leaf = module.rsplit(".", 1)[-1]
        if any(tag in leaf for tag in _NOT_LINEAR) or (vocab is not None and vocab in shape):
            continue
        out[module] = (int(shape[1]), int(shape[0]))
    return out


def context_limit(config: dict[str, Any]) -> tuple[int, str] | None:
    """``(tokens, config key)`` of the model's context length, or None when the config has none."""
    for key in _CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def targeted(layers: dict[str, tuple[int, int]], targets: list[str] | str) -> dict[str, tuple[int, int]]:
    """The layers peft adapts for ``target_modules`` ("all-linear", or names matched as peft does:
    the full module name or its last dotted parts)."""
    if targets == "all-linear":
        return dict(layers)
    return {m: s for m, s in layers.items() if any(m == t or m.endswith("." + t) for t in targets)}


# --------------------------------------------------------------------------- the template's overhead
# Files whose bytes decide the overhead: the tokenizer's, the model's config (its template name) and
# the code that formats a conversation. A change to any of them invalidates a remembered value.
_OVERHEAD_INPUTS = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


@functools.lru_cache(maxsize=16)
def template_overhead(model_dir: str, *, template: str | None, system: str | None) -> tuple[int, str]:
    """Tokens the prompt template spends on a minimal conversation before the answer, and the
    resolved template name (the real tokenizer and template of ``model_dir``).

    Remembered in ``$SFTFLOW_HOME/cache/template_overhead.json`` under a key of the tokenizer files'
    sizes and mtimes, the formatting code and the transformers version: measuring needs transformers
    and torch (10-20 s of imports), which a warm home's ``sftflow run`` should not pay before the
    first stage starts.
    """
    key = _overhead_key(model_dir, template=template, system=system)
    remembered = _overhead_cache().get(key)
    if isinstance(remembered, list) and len(remembered) == 2:
        return int(remembered[0]), str(remembered[1])
    measured = _measure_template_overhead(model_dir, template=template, system=system)
    _remember_overhead(key, measured)
    return measured


def _overhead_key(model_dir: str, *, template: str | None, system: str | None) -> str:
    import hashlib
    import importlib.metadata

    from sftflow.inference import formatting

    parts: list[Any] = [str(Path(model_dir).resolve()), template, system,
                        importlib.metadata.version("transformers"),
                        hashlib.sha256(Path(formatting.__file__).read_bytes()).hexdigest()]
    for name in _OVERHEAD_INPUTS:
        f = Path(model_dir) / name
        st = f.stat() if f.is_file() else None
        parts.append([name, st.st_size, st.st_mtime_ns] if st else [name, None])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _overhead_cache_path() -> Path:
    return layout.cache_dir() / "template_overhead.json"


def _overhead_cache() -> dict[str, Any]:
    try:
        data = json.loads(_overhead_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember_overhead(key: str, value: tuple[int, str]) -> None:
    # Only in an existing home (preflight creates nothing); a lost write is only a slower next start.
    if not layout.sftflow_home().is_dir():
        return
    import os
    import tempfile

    path = _overhead_cache_path()
    try:
        path.parent.mkdir(exist_ok=True)
        data = _overhead_cache()
        data[key] = list(value)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".overhead-")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except OSError:
        pass


def _measure_template_overhead(model_dir: str, *, template: str | None, system: str | None) -> tuple[int, str]:
    from transformers import AutoTokenizer

    from sftflow.inference.formatting import IGNORE_INDEX, encode_for_training, resolve_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    resolved = resolve_template(tokenizer, template)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "OK"}]
    _, labels = encode_for_training(tokenizer, messages, template=resolved)
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return first, resolved


# --------------------------------------------------------------------------- the checks
def training_configs(cfg: PipelineConfig) -> list[tuple[str, TrainingConfig, dict[str, Any] | None]]:
    """Every training the pipeline runs: ``(key path of its settings, settings, the partial
    override it merges into ``training``, None for ``training`` itself)``."""
    out: list[tuple[str, TrainingConfig, dict[str, Any] | None]] = [("training", cfg.training, None)]
    aug = cfg.augmentation
    if aug.enabled:
        for key, settings in (("backward_training", aug.backward), ("forward_training", aug.forward)):
            override = dict(getattr(aug, key))
            if override:
                out.append((f"augmentation.{key}", settings(cfg.training), override))
    rs = cfg.rejection_sampling
    if rs.enabled and rs.round2_training:
        out.append(("rejection_sampling.round2_training", rs.round2(cfg.training), dict(rs.round2_training)))
    return out


def _sets(override: dict[str, Any] | None, leaf: str) -> bool:
    """True for ``training`` itself, or when the partial override sets ``leaf`` (a dotted path):
    an inherited value was already reported under ``training``."""
    node: Any = override
    if override is None:
        return True
    for part in leaf.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def model_problems(cfg: PipelineConfig, *, pipeline: str, model_dir: Path | str) -> list[str]:
    """Problems of ``cfg`` against the model in ``model_dir``, one line each naming the key path.

    Args:
        cfg: a validated pipeline.
        pipeline: its name (for ``pipelines.<name>.<key>``).
        model_dir: the base model's folder (``config.json``, safetensors, tokenizer).
    """
    p = f"pipelines.{pipeline}"
    model_dir = Path(model_dir)
    try:
        config = read_config(model_dir)
    except (OSError, ValueError) as e:
        return [f"{p}.base_model: {model_dir / 'config.json'} is unreadable ({e})"]
    who = f"{cfg.base_model} ({model_dir / 'config.json'})"
    problems: list[str] = []
    limit = context_limit(config)
    try:
        layers = linear_layers(model_dir, config)
    except (OSError, ValueError, struct.error):
        layers = {}
    trainings = training_configs(cfg)
    checked_overhead: dict[tuple[str | None, str | None], tuple[int, str]] = {}
    system = cfg.augmentation.seed_system_prompt if cfg.augmentation.enabled else None
    for where, t, override in trainings:
        if t.method in LORA_METHODS and layers and (_sets(override, "lora") or _sets(override, "method")):
            hit = targeted(layers, t.lora.target_modules)
            if not hit:
                leaves = sorted({m.rsplit(".", 1)[-1] for m in layers})
                problems.append(f"{p}.{where}.lora.target_modules: {t.lora.target_modules} matches no "
                                f"linear layer of {who}; its layers: {', '.join(leaves)} (or all-linear)")
            else:
                module, (fan_in, fan_out) = min(hit.items(), key=lambda kv: min(kv[1]))
                bound = min(fan_in, fan_out)
                if t.lora.r > bound:
                    problems.append(
                        f"{p}.{where}.lora.r={t.lora.r}: larger than the smallest targeted layer of {who} "
                        f"({module}: {fan_in} -> {fan_out}); a LoRA rank above min(in, out) adds size, not "
                        f"capacity: use r <= {bound}")
        if not _sets(override, "max_seq_len") and not _sets(override, "template"):
            continue
        if limit is not None and t.max_seq_len > limit[0]:
            problems.append(f"{p}.{where}.max_seq_len={t.max_seq_len}: longer than the context of {who} "
                            f"({limit[1]}={limit[0]}): use at most {limit[0]}")
        key = (t.template, system)
        if key not in checked_overhead:
            try:
                checked_overhead[key] = template_overhead(str(model_dir), template=t.template, system=system)
            except Exception:  # noqa: BLE001 - no tokenizer / template: the training stage reports it
                checked_overhead[key] = (-1, "")
        overhead, template = checked_overhead[key]
        if overhead >= 0 and t.max_seq_len < overhead + MIN_ANSWER_TOKENS:
            prompt = "a system prompt, " if system else ""
            problems.append(
                f"{p}.{where}.max_seq_len={t.max_seq_len}: too short for any answer: the {template} template "
                f"of {cfg.base_model} spends {overhead} tokens on {prompt}a one-word prompt before the answer; "
                f"use at least {overhead + MIN_ANSWER_TOKENS} (room for {MIN_ANSWER_TOKENS} answer tokens), "
                "in practice a few hundred")
    if limit is not None:
        for key_path, value in _generation_lengths(cfg):
            if value >= limit[0]:
                problems.append(f"{p}.{key_path}={value}: no room for a prompt in the context of {who} "
                                f"({limit[1]}={limit[0]}): use less than {limit[0]}")
    return problems


def _generation_lengths(cfg: PipelineConfig) -> Iterable[tuple[str, int]]:
    """``(key path, max_new_tokens)`` of every generation the pipeline runs."""
    ev = cfg.evaluation
    if ev.enabled:
        yield ("evaluation.max_new_tokens", ev.max_new_tokens) if isinstance(ev.max_new_tokens, int) else \
            ("evaluation.auto_max_new_tokens", ev.auto_max_new_tokens)
    if cfg.augmentation.enabled:
        yield "augmentation.generation.max_new_tokens", cfg.augmentation.generation.max_new_tokens
    if cfg.rejection_sampling.enabled:
        yield "rejection_sampling.max_new_tokens", cfg.rejection_sampling.max_new_tokens

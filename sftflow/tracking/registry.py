"""The MLflow model registry, in one place: log and register a trained model, read versions and
aliases back (as loadable ``ModelRef``s), move aliases, and the command that serves a version.

Used by the train stage (log + register, alias ``candidate``), the promotion gate (read the
``champion``, move it) and lineage (resolve ``MODEL@alias`` / ``MODEL/version``).

The registered model is MLflow's ``transformers`` flavor with the ``llm/v1/chat`` task (OpenAI-style
chat request and response): merged safetensors, the tokenizer with the chat template the model was
trained with, and a generation config that stops at that template's end-of-turn token. It loads
and serves with mlflow + transformers + torch alone, offline: this repository need not be
importable (``tests/integration/test_serve_model.py`` proves it). Versions logged before as the
``SFTChatModel`` pyfunc (``chat_model.py``) are still read back by ``model_version_ref``.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any, Iterable

from sftflow.data.refs import ModelRef
from sftflow.digests import dir_sha256
from sftflow.errors import NotFoundError
from sftflow.tagnames import TAG_MODEL_SHA256

CANDIDATE = "candidate"  # every newly registered version
CHAMPION = "champion"  # moved by the promotion gate only
# Version tags copied from the training metrics (a quick look in the registry UI).
LOSS_TAGS = ("train_loss", "eval_loss", "best_eval_loss")


class ModelVersionNotFound(NotFoundError):
    """A registered model, version or alias does not exist; the message lists what does."""


# ============================================================================ the served model
# MLflow's own LLM convention: the transformers flavor with the OpenAI-compatible chat task. The
# version then loads (and `mlflow models serve` answers /invocations) with mlflow + transformers +
# torch alone: nothing of this repository is pickled or imported, unlike a custom pyfunc.
CHAT_TASK = "llm/v1/chat"
# Greedy by default, like the evaluation stage; a request's max_tokens / temperature override these.
DEFAULT_MAX_NEW_TOKENS = 64
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "Give me one tip for writing clear emails."}],
                 "max_tokens": 32}

# Jinja renderings of the built-in templates (``sftflow.inference.formatting``) for the served
# tokenizer: transformers' pipeline renders messages with ``apply_chat_template``. The test
# ``test_serving_template_matches_training_prompt`` checks that the ids equal
# ``build_generation_prompt``'s. Newlines are written as ``{{ '\n' }}`` so whitespace control
# never eats them; ``{bos}`` is filled in per tokenizer.
_GEMMA_JINJA = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set sys = messages[0]['content'] -%}"
    "{%- set msgs = messages[1:] -%}{%- else -%}{%- set sys = '' -%}{%- set msgs = messages -%}{%- endif -%}"
    "{bos}{%- for m in msgs -%}{%- set c = m['content'] -%}"
    "{%- if loop.first and sys -%}{%- set c = sys + '\\n\\n' + c -%}{%- endif -%}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}{{ '\\n' }}{{ c }}<end_of_turn>{{ '\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}<start_of_turn>model{{ '\\n' }}{%- endif -%}"
)
_CHATML_JINJA = (
    "{bos}{%- for m in messages -%}<|im_start|>{{ m['role'] }}{{ '\\n' }}{{ m['content'] }}<|im_end|>{{ '\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)


def serving_chat_template(tokenizer: Any, template: str) -> str:
    """The Jinja chat template that renders ``template`` exactly as training/evaluation encode it.

    The served pipeline tokenizes the rendered text with ``add_special_tokens=False`` (set in the
    model's inference config), so a BOS the prompt needs is part of the template: always for
    ``gemma``, for ``chatml`` only where the tokenizer adds one itself (as ``formatting`` does).
    A ``native`` template is the tokenizer's own.

    Raises:
        ValueError: unknown template, or ``native`` on a tokenizer without a chat template.
    """
    from sftflow.inference.formatting import resolve_template

    resolved = resolve_template(tokenizer, template)
    if resolved == "native":
        return str(tokenizer.chat_template)
    bos = "{{ bos_token }}" if tokenizer.bos_token_id is not None else ""
    if resolved == "chatml" and bos:
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = bos if probe and probe[0] == tokenizer.bos_token_id else ""
    return (_GEMMA_JINJA if resolved == "gemma" else _CHATML_JINJA).replace("{bos}", bos)


def _servable(model: ModelRef, template: str) -> tuple[Any, Any, list[int]]:
    """``(model, tokenizer, stop_ids)`` ready to save: merged weights, the training chat template,
    and every end-of-turn id in the generation config's eos (so generation stops at the turn end)."""
    from sftflow.inference.formatting import stop_token_ids
    from sftflow.inference.models import load_model, release_memory

    # The model that was just trained (peft wrappers hold reference cycles) is garbage by now but
    # still resident until the cyclic GC runs: free it before a second copy is loaded.
    release_memory()
    # An adapter is merged here: a served version must not depend on a base folder elsewhere.
    lm, tokenizer = load_model(model, dtype="auto")
    if model.kind == "adapter":
        lm = lm.merge_and_unload()
    tokenizer.chat_template = serving_chat_template(tokenizer, template)
    stops = stop_token_ids(tokenizer, template)
    eos = lm.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    lm.generation_config.eos_token_id = list(dict.fromkeys([*(int(i) for i in eos_ids), *stops]))
    if lm.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
    return lm, tokenizer, stops


def _model_card(model: ModelRef) -> Any:
    """The model's README.md as a ModelCard; a card is always given so MLflow never asks the hub."""
    from huggingface_hub import ModelCard

    readme = Path(model.path) / "README.md"
    if readme.exists():
        return ModelCard.load(str(readme), ignore_metadata_errors=True)
    return ModelCard(f"# {model.name or Path(model.path).name}\n\nFine-tuned by sftflow.\n")


def log_model(*, model: ModelRef, template: str, metrics: Iterable[tuple[str, float]] = (),
              register_as: str | None, lineage_tags: dict[str, str] | None = None) -> tuple[str, str, str]:
    """Log a trained model to the active MLflow run as a servable chat model (transformers flavor).

    The version is MLflow's ``transformers`` flavor with task ``llm/v1/chat``: merged weights (an
    adapter is merged first), the tokenizer carrying the chat template the model was trained with,
    and a generation config that stops at the template's end-of-turn token. MLflow sets the
    OpenAI-compatible chat signature; an input example is logged with it. It loads and serves
    (``mlflow models serve -m models:/NAME@ALIAS --env-manager local``) without this repository
    and without any hub. When ``register_as`` is given, a new version is registered and gets the
    alias ``candidate``, tagged with its final losses (``LOSS_TAGS`` found in ``metrics``), the
    sha256 of the model it holds and ``lineage_tags``.

    Args:
        model: the trained model (``TrainOutput.model``).
        template: the prompt template it was trained with.
        metrics: the training metrics (``TrainOutput.metrics``).
        register_as: registered model name; None logs without registering.
        lineage_tags: extra version tags.

    Returns:
        ``(model_uri, registered_name, registered_version)`` (name/version empty when not registered).
    """
    import mlflow

    lm, tokenizer, stops = _servable(model, template)
    info = mlflow.transformers.log_model(
        transformers_model={"model": lm, "tokenizer": tokenizer},
        name="model",
        task=CHAT_TASK,
        input_example=INPUT_EXAMPLE,
        # add_special_tokens=False: the chat template already holds every control token (BOS included).
        model_config={"add_special_tokens": False, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS},
        model_card=_model_card(model),
        # Explicit requirements: inferring them would load the model in a subprocess.
        pip_requirements=[_req("torch"), _req("transformers"), _req("mlflow")],
        registered_model_name=register_as,
        metadata={"kind": "merged", "template": template, "base_path": model.base,
                  "sftflow_source_kind": model.kind, "stop_token_ids": stops},
    )
    del lm
    version = ""
    if register_as:
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        set_alias(client, name=register_as, alias=CANDIDATE, version=version)
        tags = {k: f"{v:.6g}" for k, v in metrics if k in LOSS_TAGS}
        set_version_tags(client, name=register_as, version=version, tags=tags)
        set_version_tags(client, name=register_as, version=version,
                         tags=dict(sorted({TAG_MODEL_SHA256: model.sha256, **(lineage_tags or {})}.items())))
    return info.model_uri, register_as or "", version


def _req(dist: str) -> str:
    # The local build suffix (torch 2.x+cpu) is not a version pip can install.
    return f"{dist}=={importlib.metadata.version(dist).split('+')[0]}"


# ============================================================================ versions and aliases
def version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    """The model version holding ``alias`` (None when the alias or the model is absent)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(client: Any, *, name: str, alias: str, version: str) -> None:
    """Point ``alias`` of model ``name`` at ``version`` (moving it from wherever it was)."""
    client.set_registered_model_alias(name, alias, str(version))


def set_version_tags(client: Any, *, name: str, version: str, tags: dict[str, str]) -> None:
    """Write ``tags`` on one model version, in the given order."""
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)


def resolve_version(client: Any, name: str, *, alias: str | None = None, version: str | None = None) -> Any:
    """The model version named by ``alias`` or ``version``, else the latest one.

    Raises:
        ModelVersionNotFound: no such model, alias or version; the message lists the existing ones.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        raise ModelVersionNotFound(f"no registered model {name!r}; registered models: {known or 'none'}") from None
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version:
            return client.get_model_version(name, version)
    except MlflowException:
        versions = client.search_model_versions(f"name='{name}'")
        # search_model_versions leaves `aliases` empty; the registered model holds them.
        aliases = sorted(getattr(client.get_registered_model(name), "aliases", None) or {})
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ModelVersionNotFound(
            f"model {name!r} has no {what}; versions: {sorted(int(v.version) for v in versions)}, aliases: {aliases}"
        ) from None
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise ModelVersionNotFound(f"model {name!r} has no versions")
    return max(versions, key=lambda v: int(v.version))


# ============================================================================ a version as a ModelRef
def _find_model_dir(root: Path) -> Path | None:
    """The transformers model folder below ``root`` (config.json + weights, or a peft adapter)."""
    for cfg in sorted(root.rglob("config.json"), key=lambda p: len(p.parts)):
        if any(cfg.parent.glob("*.safetensors")):
            return cfg.parent
    for cfg in sorted(root.rglob("adapter_config.json"), key=lambda p: len(p.parts)):
        return cfg.parent
    return None


def _pyfunc_model_config(model_root: Path) -> dict[str, Any]:
    """What the train stage recorded about a logged model folder (``kind``, ``template``, ``base_path``).

    Read from the ``MLmodel`` file: its ``metadata`` (the transformers-flavor versions) updated with
    the pyfunc ``config`` (where the older ``SFTChatModel`` versions kept them). ``{}`` when the
    folder has no ``MLmodel``.
    """
    import yaml

    mlmodel = model_root / "MLmodel"
    if not mlmodel.exists():
        return {}
    meta = yaml.safe_load(mlmodel.read_text()) or {}
    pyfunc = (meta.get("flavors") or {}).get("python_function") or {}
    # MLflow stores a pyfunc's model_config under `config`; `metadata` is the fallback.
    out = dict(meta.get("metadata") or {})
    out.update(pyfunc.get("config") or pyfunc.get("model_config") or {})
    return out


def _local_model_root(client: Any, mv: Any) -> Path | None:
    """The version's logged model folder (holding ``MLmodel``) when the artifact store is a local
    directory (no copy needed); None otherwise."""
    from urllib.parse import unquote, urlparse

    locations = []
    if getattr(mv, "model_id", None):
        try:
            locations.append(client.get_logged_model(mv.model_id).artifact_location)
        except Exception:  # an older version without a LoggedModel
            pass
    locations.append(mv.source or "")
    for loc in locations:
        u = urlparse(loc or "")
        if u.scheme in ("file", "") and loc and Path(unquote(u.path)).is_dir():
            return Path(unquote(u.path))
    return None


def _with_tokenizer(model_dir: Path, root: Path, *, view: Path) -> Path:
    """``model_dir`` when it holds its tokenizer, else ``view``: links to the weights and to the
    transformers flavor's ``components/tokenizer`` files, so one folder loads as model + tokenizer."""
    tok_dir = root / "components" / "tokenizer"
    if (model_dir / "tokenizer_config.json").exists() or not (tok_dir / "tokenizer_config.json").exists():
        return model_dir
    view.mkdir(parents=True, exist_ok=True)
    for src_dir in (model_dir, tok_dir):
        for src in sorted(x for x in src_dir.iterdir() if x.is_file()):
            dst = view / src.name
            if dst.is_symlink() or dst.exists():
                dst.unlink()  # a view left by an earlier call: re-point it at this version's files
            dst.symlink_to(src.resolve())
    return view


def model_version_ref(client: Any, mv: Any, *, download_dir: Path) -> ModelRef:
    """A loadable ModelRef of a registered version, offline.

    The train stage logs the transformers flavor: weights under ``model/``, the tokenizer under
    ``components/tokenizer/``; the ref then points at ``download_dir/v<N>-model``, a folder of
    links to both (nothing is copied). Older versions are a pyfunc whose artifacts are the merged
    safetensors (or an adapter plus the local path of its base, in ``model_config``). Looked up in
    order: a ``sftflow.model_path`` tag on the version, the local artifact folder (file stores), a
    download of the version. ``meta`` carries the ``template`` the model was trained with.
    """
    import mlflow

    local = (mv.tags or {}).get("sftflow.model_path")
    root: Path | None = Path(local) if local and Path(local).is_dir() else None
    root = root or _local_model_root(client, mv)
    if root is None or _find_model_dir(root) is None:
        dst = download_dir / f"v{mv.version}"
        dst.mkdir(parents=True, exist_ok=True)
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                        dst_path=str(dst)))
    model_dir = _find_model_dir(root)
    if model_dir is None:
        raise FileNotFoundError(
            f"model version {mv.name}/{mv.version}: no transformers model (config.json + *.safetensors "
            f"or adapter_config.json) in its artifacts at {root}"
        )
    model_dir = _with_tokenizer(model_dir, root, view=download_dir / f"v{mv.version}-model")
    cfg = _pyfunc_model_config(root)
    kind, base = "merged", ""
    if cfg.get("kind") == "adapter" or (
        (model_dir / "adapter_config.json").exists() and not any(model_dir.glob("model*.safetensors"))
    ):
        kind = "adapter"
        base = cfg.get("base_path") or json.loads((model_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path", "")
    meta = (("template", str(cfg["template"])),) if cfg.get("template") else ()
    return ModelRef(path=str(model_dir), sha256=dir_sha256(model_dir), kind=kind, base=base,
                    name=f"{mv.name}/{mv.version}", meta=meta)


# ============================================================================ serving
def registered_model_uri(name_alias: str) -> str:
    """``models:/`` URI of ``NAME@ALIAS``, ``NAME/VERSION`` or a bare ``NAME`` (its champion).

    Raises:
        ValueError: an empty name, alias or version.
    """
    spec = name_alias.strip().removeprefix("models:/")
    if "@" in spec:
        name, _, alias = spec.partition("@")
        ref = f"{name}@{alias}"
        ok = bool(name and alias)
    elif "/" in spec:
        name, _, version = spec.rpartition("/")
        ref = f"{name}/{version}"
        ok = bool(name and version.isdigit())
    else:
        name, ref, ok = spec, f"{spec}@{CHAMPION}", bool(spec)
    if not ok:
        raise ValueError(f"model spec {name_alias!r}: expected NAME@ALIAS, NAME/VERSION or NAME")
    return f"models:/{ref}"


def serve_command(name_alias: str, *, host: str = "127.0.0.1", port: int = 5001) -> list[str]:
    """The command that serves a registered version as an OpenAI-style chat endpoint.

    ``mlflow models serve`` in the current environment (``--env-manager local``: no virtualenv is
    built, nothing is downloaded); it needs ``MLFLOW_TRACKING_URI`` pointing at the store. POST
    ``{"messages": [{"role": "user", "content": "..."}], "max_tokens": 64}`` to
    ``http://HOST:PORT/invocations``.

    Args:
        name_alias: ``NAME@ALIAS``, ``NAME/VERSION`` or ``NAME`` (its ``champion``).
        host: interface to bind (loopback by default).
        port: TCP port.
    """
    import shutil
    import sys

    exe = Path(sys.executable).with_name("mlflow")
    mlflow_cmd = [str(exe)] if exe.exists() else [shutil.which("mlflow") or "mlflow"]
    return [*mlflow_cmd, "models", "serve", "-m", registered_model_uri(name_alias), "--env-manager", "local",
            "--host", host, "--port", str(port)]

"""The MLflow model registry, in one place: log and register a trained model, read versions and
aliases back (as loadable ``ModelRef``s), move aliases.

Used by the train stage (log + register, alias ``candidate``), the promotion gate (read the
``champion``, move it) and lineage (resolve ``MODEL@alias`` / ``MODEL/version``).

The registered model is an MLflow pyfunc (``SFTChatModel``) whose artifacts are the merged
safetensors (or the adapter, with the absolute path of its local base), so it loads offline. MLflow
pickles the class by reference to this module, so this module must import without Prefect or any
stage: a model then loads wherever ``sftflow`` is installed.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any, Iterable

import mlflow.pyfunc

from sftflow.data.refs import ModelRef, sha256_dir
from sftflow.errors import NotFoundError
from sftflow.ops.cachekeys import TAG_MODEL_SHA256

CANDIDATE = "candidate"  # every newly registered version
CHAMPION = "champion"  # moved by the promotion gate only
# Version tags copied from the training metrics (a quick look in the registry UI).
LOSS_TAGS = ("train_loss", "eval_loss", "best_eval_loss")


class ModelVersionNotFound(NotFoundError):
    """A registered model, version or alias does not exist; the message lists what does."""


# ============================================================================ the pyfunc model
def log_model(*, model: ModelRef, template: str, metrics: Iterable[tuple[str, float]] = (),
              register_as: str | None, lineage_tags: dict[str, str] | None = None) -> tuple[str, str, str]:
    """Log a trained model to the active MLflow run as a pyfunc that loads offline.

    The merged weights (or the adapter, with the absolute path of its local base recorded) are
    the model's artifacts, so no hub is ever contacted to load it. When ``register_as`` is given,
    a new version is registered and gets the alias ``candidate``, tagged with its final losses
    (``LOSS_TAGS`` found in ``metrics``), the sha256 of the model it holds and ``lineage_tags``
    (the train stage passes the digests of the data and base model it trained from, and its keys).

    Args:
        model: the trained model (``TrainOutput.model``).
        template: the prompt template it was trained with.
        metrics: the training metrics (``TrainOutput.metrics``).
        register_as: registered model name; None logs without registering.
        lineage_tags: extra version tags.

    Returns:
        ``(model_uri, registered_name, registered_version)`` (name/version empty when not registered).
    """
    from sftflow.tracking.chat_model import SFTChatModel

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64), ParamSpec("temperature", "double", 0.0)]),
    )
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=SFTChatModel(),
        artifacts={"model": model.path},
        model_config={"kind": model.kind, "template": template, "base_path": model.base},
        signature=signature,
        # Explicit requirements: inferring them would load the model in a subprocess.
        pip_requirements=[_req("torch"), _req("transformers"), _req("peft"), _req("mlflow")],
        registered_model_name=register_as,
        metadata={"sftflow_kind": model.kind, "base_model": model.base, "template": template},
    )
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
    """``model_config`` of an MLflow pyfunc folder (the train stage records kind/template/base_path)."""
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
    """The version's pyfunc folder when the artifact store is a local directory (no copy needed)."""
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


def model_version_ref(client: Any, mv: Any, *, download_dir: Path) -> ModelRef:
    """A loadable ModelRef of a registered version, offline.

    The train stage logs a pyfunc whose artifacts are the merged safetensors (or an adapter plus
    the local path of its base, in ``model_config``). Looked up in order: a ``sftflow.model_path``
    tag on the version, the local artifact folder (file stores), a download of the version.
    ``meta`` carries the ``template`` the model was trained with.
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
    cfg = _pyfunc_model_config(root)
    kind, base = "merged", ""
    if cfg.get("kind") == "adapter" or (
        (model_dir / "adapter_config.json").exists() and not any(model_dir.glob("model*.safetensors"))
    ):
        kind = "adapter"
        base = cfg.get("base_path") or json.loads((model_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path", "")
    meta = (("template", str(cfg["template"])),) if cfg.get("template") else ()
    return ModelRef(path=str(model_dir), sha256=sha256_dir(model_dir), kind=kind, base=base,
                    name=f"{mv.name}/{mv.version}", meta=meta)

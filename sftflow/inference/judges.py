"""Which model scores or judges: ONE resolver for every stage that rates (instruction, response) pairs.

Three settings pick a rating model, and all three are resolved here by ``resolve_scorer``:

======================  ==================================  =========================================
role                    config key                          values
======================  ==================================  =========================================
``curation``            ``augmentation.curation.model``     ``forward`` (M0: trained by the stage
                                                            itself, never resolved here), ``base``,
                                                            a model name/path
``rejection``           ``rejection_sampling.scorer_model`` ``tuned`` (the round-1 model scores its
                                                            own samples), ``base``, a name/path
``judge``               ``evaluation.judge_model``          unset (the pipeline's base model), a
                                                            name/path
======================  ==================================  =========================================

A scorer that cannot be loaded is an error (``ScorerUnavailable``, a user error naming the config
key and the missing path), never silently the model under test: an evaluation judged by the tuned
model itself would reward the tuned model for agreeing with itself, and the gate would compare it
with a base-judged base. ``scorer_digest`` is the content digest a judge contributes to the
evaluation's comparability key (``sftflow.evaluation.sets.eval_key``) and to the gate's evidence.

Example::

    judge = resolve_scorer(configured=cfg.evaluation.judge_model, base=base_ref, role="judge")
    scorer = resolve_scorer(configured=cfg.rejection_sampling.scorer_model, base=base_ref,
                            role="rejection", model=round1_ref)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from sftflow.data.refs import ModelRef
from sftflow.errors import NotFoundError

Role = Literal["curation", "rejection", "judge"]

# The config key each role's choice comes from (named in every error).
CONFIG_KEYS: dict[str, str] = {
    "curation": "augmentation.curation.model",
    "rejection": "rejection_sampling.scorer_model",
    "judge": "evaluation.judge_model",
}
# The choice that means "the model under test scores itself": only rejection sampling has one, and
# only as an explicit setting (its default), never as a fallback.
SELF_CHOICE = {"rejection": "tuned"}


class ScorerUnavailable(NotFoundError):
    """The configured scorer / judge model cannot be loaded (the message names the config key and path)."""

    label = "scorer model not found"


def _check_loadable(ref: ModelRef, *, key: str, what: str) -> ModelRef:
    """``ref`` when its folder (and an adapter's base folder) is there, else ``ScorerUnavailable``."""
    for label, path in ((what, ref.path), (f"{what}'s base model", ref.base if ref.kind == "adapter" else "")):
        if label.endswith("base model") and not path:
            continue
        if not path or not Path(path).is_dir():
            raise ScorerUnavailable(f"{key}: the {label} folder {path or '(none)'} does not exist; the scorer must be "
                                    "loadable (it is never replaced by the model under test)")
    return ref


def base_model_of(model: ModelRef, *, role: Role = "judge", trust_remote_code: bool = False) -> ModelRef:
    """The base model ``model`` was fine-tuned from (``model`` itself when it is a base model).

    Used when no pipeline base model is at hand (an evaluation run alone): a merged model or an
    adapter records its base's folder in ``ModelRef.base`` (or its meta ``base_path``/``base``).

    Raises:
        ScorerUnavailable: the recorded base folder is missing or none is recorded (naming the key).
    """
    if model.kind == "base":
        return model
    key = CONFIG_KEYS[role]
    meta = model.meta_dict()
    base = model.base or meta.get("base_path") or meta.get("base") or ""
    if not base:
        raise ScorerUnavailable(f"{key} is unset, so the scorer is the base model of {model.path}, but that "
                                f"{model.kind} model records no base model; set {key} to a model name or path")
    if not Path(base).is_dir():
        raise ScorerUnavailable(f"{key} is unset, so the scorer is the base model of {model.path}, whose folder "
                                f"{base} does not exist; set {key} or restore that folder")
    from sftflow.inference.models import resolve_model

    return resolve_model(str(base), trust_remote_code=trust_remote_code)


def resolve_scorer(
    *,
    configured: str | None,
    base: ModelRef | None,
    role: Role,
    model: ModelRef | None = None,
    trust_remote_code: bool = False,
) -> ModelRef:
    """The model that scores (curation, rejection) or judges (evaluation), per the role's config key.

    Args:
        configured: the setting (``CONFIG_KEYS[role]``): ``None`` or ``base`` -> ``base``;
            ``tuned`` (rejection only) -> ``model``; anything else is a model name or path
            (``sftflow.inference.models.resolve_model``: embedded, tiny, local folder, hub id).
        base: the pipeline's base model (None where there is none: ``base``/unset is then an error).
        role: ``curation``, ``rejection`` or ``judge`` (names the key in errors).
        model: the model under test / the sampler; used ONLY for the explicit self choice
            (``rejection_sampling.scorer_model: tuned``).
        trust_remote_code: passed to ``resolve_model``.

    Returns:
        The scorer's ``ModelRef``; its folder exists.

    Raises:
        ScorerUnavailable: the model cannot be found or loaded; the message names the config key and
            the path (a user error: exit code 2).
        ValueError: ``role`` is unknown, or ``curation.model: forward`` (the stage trains M0 itself).
    """
    if role not in CONFIG_KEYS:
        raise ValueError(f"role must be one of {sorted(CONFIG_KEYS)} (got {role!r})")
    key = CONFIG_KEYS[role]
    choice = (configured or "").strip() or None
    if role == "curation" and choice == "forward":
        raise ValueError(f"{key}: forward is the model the stage trains on the seed (M0); it is not resolved here")
    if choice is not None and choice == SELF_CHOICE.get(role):
        if model is None:
            raise ValueError(f"{key}: {choice} needs the model under test (pass model=...)")
        return _check_loadable(model, key=key, what=f"{choice} model")
    if choice is None or choice == "base":
        if base is None:
            raise ScorerUnavailable(f"{key}: {'base' if choice else 'unset (the base model)'} needs the pipeline's "
                                    "base model, and none was given; set it to a model name or path")
        return _check_loadable(base, key=key, what="base model")
    from sftflow.inference.model_store import ModelError
    from sftflow.inference.models import resolve_model

    try:
        ref = resolve_model(choice, trust_remote_code=trust_remote_code)
    except ModelError as e:
        raise ScorerUnavailable(f"{key}: {choice}: {e}") from e
    return _check_loadable(ref, key=key, what=f"model {choice}")


def scorer_digest(ref: ModelRef | None) -> str:
    """The content digest a scorer contributes to keys and evidence ("" for none).

    ``ModelRef.sha256`` (the folder's digest, taken when the ref was resolved) and, for an adapter,
    its base folder's digest: two judges are the same judge only when these agree.
    """
    if ref is None:
        return ""
    if ref.kind != "adapter" or not ref.base:
        return ref.sha256
    from sftflow.data.refs import sha256_json
    from sftflow.digests import dir_sha256

    base = dir_sha256(ref.base) if Path(ref.base).is_dir() else "missing"
    return sha256_json({"adapter": ref.sha256, "base": base})


__all__ = ["CONFIG_KEYS", "Role", "ScorerUnavailable", "base_model_of", "resolve_scorer", "scorer_digest"]

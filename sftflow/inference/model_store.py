"""Model directories this package writes, and the model errors.

Every directory (a converted embedded model, a tiny test model) is assembled under a temporary name
by :func:`build_atomically`, gets a ``manifest.json`` (source digest, per-file sizes + sha256,
parameter count, dtype) and a completion marker (``_SUCCESS``) written last, and is renamed into
place, so concurrent builds from several processes are safe; :func:`complete_ref` trusts a directory
only when its marker exists and its manifest matches. Also here: the generation stop ids both
builders give their models (:func:`add_end_of_turn_eos`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from sftflow import layout
from sftflow.data.refs import ModelRef
from sftflow.digests import dir_sha256, file_sha256
from sftflow.errors import EXIT_CONFIG, UserError

MANIFEST = "manifest.json"
DONE_MARKER = layout.STAGE_DONE_MARKER
# Bumped when the conversion recipe changes, so old pulled directories are rebuilt.
RECIPE_VERSION = 2


class ModelError(RuntimeError):
    """A model could not be provisioned or loaded (the message says which and what to do)."""


class ModelNotFoundError(ModelError, UserError):
    """A name is neither embedded, tiny, a local model directory, nor a reachable hub id."""

    exit_code = EXIT_CONFIG
    label = "model not found"


def build_atomically(
    out: Path, *, name: str, build: Callable[[Path], dict[str, Any]], keep_if: dict[str, Any] | None
) -> ModelRef:
    """Run ``build`` in a private temporary dir, write manifest + marker, rename it to ``out``.

    Why: an interrupted build must never look complete, and two processes pulling the same
    model at once must not write into one directory. When ``keep_if`` is given and another
    process completed a matching directory meanwhile, that one is kept (it may be in use) and
    ours is dropped; ``keep_if=None`` (force) always replaces.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        facts = build(tmp)
        files = {}
        for p in sorted(x for x in tmp.rglob("*") if x.is_file()):
            rel = str(p.relative_to(tmp))
            files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
        # No folder digest here: a ModelRef's sha256 is dir_sha256 of the finished folder (manifest
        # and marker included), taken when the ref is made; the per-file digests are the evidence.
        manifest = {"name": name, **facts, "files": files,
                    "size_bytes": sum(f["size"] for f in files.values())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (tmp / DONE_MARKER).write_text("ok\n")  # last: the directory is now complete
        theirs = complete_ref(out, name=name, expect=keep_if) if keep_if is not None else None
        if theirs is not None:
            # Another process finished the same build meanwhile: keep its directory (a reader
            # may be loading from it) and drop ours.
            shutil.rmtree(tmp, ignore_errors=True)
            return theirs
        if out.exists():
            # Incomplete leftovers (or a forced rebuild): move aside, then delete.
            trash = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            out.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:
            # Another process finished first; its directory is as good as ours.
            if not (out / DONE_MARKER).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ref = complete_ref(out, name=name, expect={})
    if ref is None:
        raise ModelError(f"{out}: model directory is incomplete right after building it")
    print(f"[sftflow.inference.models] {name}: ready at {out} ({manifest['size_bytes'] / 2**20:.1f} MiB)", flush=True)
    return ref


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The ``manifest.json`` of a model directory this module wrote, or None."""
    p = Path(path) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{p}: corrupt manifest ({err}); delete the directory or pass force=True") from err


def complete_ref(out: Path, *, name: str, expect: dict[str, Any]) -> ModelRef | None:
    """A ref to ``out`` when it is complete and its manifest matches ``expect``; else None.

    The completeness check is cheap (the marker must exist, the manifest must match, and every
    listed file must exist with its recorded size); the ref's sha256 is ``dir_sha256`` of the
    folder, which reads the weights once per process (``sftflow.digests`` memoizes big files).
    """
    if not (out / DONE_MARKER).exists():
        return None
    manifest = read_manifest(out)
    if manifest is None or any(manifest.get(k) != v for k, v in expect.items()):
        return None
    for rel, info in manifest.get("files", {}).items():
        f = out / rel
        if not f.is_file() or f.stat().st_size != info["size"]:
            print(f"[sftflow.inference.models] {name}: {f} is missing or changed size; rebuilding", flush=True)
            return None
    meta = {"source": manifest.get("source", {}).get("kind", ""), "dtype": str(manifest.get("dtype", "")),
            "architecture": str(manifest.get("architecture", "")), "num_params": str(manifest.get("num_params", ""))}
    return ModelRef(path=str(out), sha256=dir_sha256(out), kind="base", name=name,
                    meta=tuple(sorted(meta.items())))


def add_end_of_turn_eos(model: Any, tokenizer: Any) -> None:
    """Add ``<end_of_turn>`` (when it is a single token) to the generation config's eos ids."""
    eot = tokenizer.get_vocab().get("<end_of_turn>")
    if eot is None:
        return
    eos = model.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if eot not in eos_ids:
        model.generation_config.eos_token_id = eos_ids + [eot]

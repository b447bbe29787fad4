"""Content-addressed cache keys (pure): a stage is served from cache only when everything it reads is unchanged.

A stage's key is the sha256 of three components (``stage_key_components`` returns them, so a
test or a stage run can show exactly what went into its key):

* **inputs** — every argument except ``ctx``, walked recursively:

  - ``DatasetRef`` -> sha256 of the file *as it is on disk now* (``missing:`` when it is gone),
    plus its name and row count; the path itself is not part of the key (content addressing);
  - ``ModelRef`` -> digest of the model directory's contents now (and of its base model's
    directory for an adapter), plus kind, name and the meta entries that shape behaviour
    (the run identifiers ``mlflow_run_id``/``model_uri`` are left out);
  - pydantic models (``SourceConfig``, ``AugmentationConfig.corpus``, ``EvaluationConfig``
    with ``extra_sets``...) -> ``model_dump(mode="json")`` plus, for every ``path`` field found
    while walking them, the content digest of each file it resolves to (a glob, a directory or a
    file; ``missing:`` when nothing is there), and for any other string that names an existing
    file or folder (e.g. ``curation.model: /models/x``) that path's content digest; hub ids
    stay plain strings;
  - dataclasses, lists, tuples, dicts -> walked; numbers, strings, bools, None -> as they are.

* **code** — the *per-stage import closure*: the stage module's file plus every module of the
  project packages (``sftflow``, ``tasks``, ``flows``) it imports, transitively, found by parsing
  the source with ``ast`` (imports inside functions count; package ``__init__`` files count),
  hashed as relative path + bytes. Editing ``sftflow/data/minhash.py`` therefore recomputes dedup
  (which imports it) and not ingest (which does not).

* **libraries** — the versions of the libraries that shape outputs (``LIBRARIES``) and of Python.

Content digests are ``sftflow.digests`` (``file_sha256``/``dir_sha256``/``path_sha256``, the same
values lineage shows): files of 16 MiB or more (model weights) are read once per process and then
memoized on their stat signature; smaller files are always hashed.

This module does no I/O beyond reading digests (input files, model folders, the project's source
files) and never imports Prefect at module level, so every layer that needs a key (the training
recipe's work-folder key, the stages' cache policy) computes it the same way. The Prefect cache
policy built on it is ``sftflow.ops.cachekeys.StageCachePolicy``; it records each task run's key
here (``record_stage_key``) and ``current_stage_key()`` gives it back, so the stage's MLflow run
can carry it (``sftflow.tracking.runs.stage_run``).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from sftflow.data.refs import DatasetRef, ModelRef
from sftflow.digests import dir_sha256, file_sha256, path_sha256

# Bump when the meaning of a key changes, so keys computed by older code never match.
KEY_VERSION = 1
PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES: tuple[str, ...] = ("sftflow", "tasks", "flows")
# Libraries whose versions shape a stage's output (tokenization, numerics, file formats, GX).
LIBRARIES: tuple[str, ...] = (
    "torch", "transformers", "peft", "datasets", "pandas", "pyarrow", "numpy", "great_expectations",
    "tokenizers", "accelerate", "safetensors",
)
# ModelRef meta entries that identify a run rather than describe the model: not part of keys.
_RUN_IDENTITY_META = frozenset({"mlflow_run_id", "model_uri"})

_code_memo: dict[tuple[str, str], dict[str, Any]] = {}
_stage_keys: dict[str, tuple[str, dict[str, Any]]] = {}
_lock = threading.Lock()


# ============================================================================ content digests
# One definition, in sftflow.digests (memoized per process for big files); these names are the
# ones cache-key code and its tests have always used.
file_digest = file_sha256
dir_digest = dir_sha256
path_digest = path_sha256


def resolve_location(location: str) -> dict[str, str]:
    """Content digests of every file a ``path`` setting names (glob, directory or file).

    Returns:
        ``{absolute path: digest}``; a glob matching nothing or a missing path maps to ``missing``.
    """
    from sftflow.config import resolve_paths  # THE path-setting resolver

    expanded = str(Path(location).expanduser())
    if any(ch in location for ch in "*?["):
        hits = [str(h) for h in resolve_paths(location)]
        return {h: path_digest(h) for h in hits} or {expanded: "missing"}
    return {expanded: path_digest(expanded)}


def _looks_like_path(s: str) -> bool:
    return (os.sep in s or s.startswith("~")) and len(s) < 4096 and "\n" not in s


def _walk_pydantic(obj: Any, files: dict[str, str]) -> None:
    """Collect content digests of the files a pydantic config names (``path`` fields and path-like strings)."""
    from pydantic import BaseModel

    if isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            if name == "path" and isinstance(value, str) and value:
                files.update(resolve_location(value))
            else:
                _walk_pydantic(value, files)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk_pydantic(v, files)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk_pydantic(v, files)
    elif isinstance(obj, str) and _looks_like_path(obj):
        p = Path(obj).expanduser()
        if p.exists():  # e.g. curation.model / judge_model given as a local model folder
            files[str(p)] = path_digest(p)


def describe_input(value: Any) -> Any:
    """The JSON-able, content-addressed description of one task argument (see the module docstring).

    Raises:
        TypeError: a value of a type the key cannot describe (the stage then runs uncached).
    """
    from pydantic import BaseModel

    if isinstance(value, DatasetRef):
        p = Path(value.path)
        return {"DatasetRef": {"name": value.name, "num_rows": value.num_rows,
                               "content": file_digest(p) if p.is_file() else "missing"}}
    if isinstance(value, ModelRef):
        meta = {k: v for k, v in value.meta if k not in _RUN_IDENTITY_META}
        return {"ModelRef": {"kind": value.kind, "name": value.name, "meta": meta,
                             "content": path_digest(value.path),
                             "base_content": path_digest(value.base) if value.base else ""}}
    if isinstance(value, BaseModel):
        files: dict[str, str] = {}
        _walk_pydantic(value, files)
        return {type(value).__name__: value.model_dump(mode="json"), "files": dict(sorted(files.items()))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {type(value).__name__: {f.name: describe_input(getattr(value, f.name))
                                       for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {"dict": [[describe_input(k), describe_input(v)] for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))]}
    if isinstance(value, (list, tuple)):
        return [describe_input(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return {"Path": str(value), "content": path_digest(value)}
    raise TypeError(f"cache key: cannot describe an argument of type {type(value).__name__}")


def input_digests(inputs: dict[str, Any], *, exclude: Iterable[str] = ("ctx",)) -> dict[str, Any]:
    """``describe_input`` of every argument not in ``exclude`` (``ctx`` changes every run)."""
    skip = set(exclude)
    return {k: describe_input(v) for k, v in sorted(inputs.items()) if k not in skip}


# ============================================================================ code closure
def _module_file(name: str, root: Path) -> Optional[Path]:
    parts = name.split(".")
    base = root.joinpath(*parts)
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module name a file imports (top-level and inside functions), absolute (the cache keys' code
    closure and the architecture test both read the import graph through this)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    try:
        own = _module_name(path, root)
    except ValueError:  # a file outside the project (e.g. a test module elsewhere)
        own = ""
    is_pkg = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = own.split(".") if is_pkg else own.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                mod = ".".join([*pkg, node.module] if node.module else pkg)
            else:
                mod = node.module or ""
            if mod:
                names.add(mod)
                # `from pkg import sub` may name a submodule
                names.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
    return names


def code_closure(start: str | Path, *, root: str | Path | None = None,
                 packages: tuple[str, ...] = PROJECT_PACKAGES) -> list[Path]:
    """The files of the project that ``start`` runs: itself plus its transitive project imports.

    Args:
        start: a module name (``tasks.dedup``) or a source file path.
        root: the project root holding the packages (default: this checkout).
        packages: top-level packages that count as project code.

    Returns:
        Sorted absolute paths (package ``__init__.py`` files included).
    """
    root = Path(root or PROJECT_ROOT).resolve()
    if isinstance(start, Path) or str(start).endswith(".py"):
        first = Path(start).resolve()
    else:
        first = _module_file(str(start), root)
        if first is None:
            raise FileNotFoundError(f"module {start!r} not found under {root}")
    seen: set[Path] = set()
    todo = [first]
    try:  # importing the start module runs its packages' __init__ files too
        pkg = _module_name(first, root).split(".")[:-1]
    except ValueError:
        pkg = []
    for i in range(1, len(pkg) + 1):
        mf = _module_file(".".join(pkg[:i]), root)
        if mf is not None and pkg[0] in packages:
            todo.append(mf.resolve())
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for name in imported_modules(f, root):
            parts = name.split(".")
            if parts[0] not in packages:
                continue
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                mf = _module_file(".".join(parts[:i]), root)
                if mf is not None and mf.resolve() not in seen:
                    todo.append(mf.resolve())
    return sorted(seen)


def code_digest(start: str | Path, *, root: str | Path | None = None,
                packages: tuple[str, ...] = PROJECT_PACKAGES) -> dict[str, Any]:
    """sha256 over the relative path + bytes of every file in ``code_closure(start)``.

    For this checkout the result is memoized per process: a running process executes the code it
    imported, so the first digest is the honest one. Other roots (tests) are always recomputed.

    Returns:
        ``{"digest": hex, "files": [relative paths]}``.
    """
    root_p = Path(root or PROJECT_ROOT).resolve()
    memo_key = (str(start), str(root_p))
    if root_p == PROJECT_ROOT:
        with _lock:
            hit = _code_memo.get(memo_key)
        if hit is not None:
            return hit
    files = code_closure(start, root=root_p, packages=packages)
    h = hashlib.sha256()
    rels = []
    for f in files:
        try:
            rel = str(f.relative_to(root_p))
        except ValueError:
            rel = f.name
        rels.append(rel)
        h.update(rel.encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).hexdigest().encode() + b"\n")
    out = {"digest": h.hexdigest(), "files": rels}
    if root_p == PROJECT_ROOT:
        with _lock:
            _code_memo[memo_key] = out
    return out


def library_versions() -> dict[str, str]:
    """Versions of ``LIBRARIES`` (``absent`` when not installed) and of Python."""
    out = {"python": platform.python_version()}
    for dist in LIBRARIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


# ============================================================================ stage keys
def _source_of(fn: Callable[..., Any]) -> str | Path:
    import inspect

    f = inspect.getsourcefile(fn)
    if f is None:
        raise FileNotFoundError(f"no source file for {fn!r}")
    return Path(f)


def stage_key_components(inputs: dict[str, Any], *, fn: Callable[..., Any] | None = None,
                         module: str | Path | None = None, exclude: Iterable[str] = ("ctx",),
                         root: str | Path | None = None) -> dict[str, Any]:
    """Everything a stage's cache key covers, as JSON-able data.

    Args:
        inputs: the task's arguments by name.
        fn: the stage function (its module file starts the code closure), or
        module: a module name / file to start the code closure from instead.
        exclude: argument names left out of the key.
        root: project root (default: this checkout).

    Returns:
        ``{"version", "inputs", "code": {"digest", "files"}, "libraries"}``.
    """
    if module is None:
        if fn is None:
            raise ValueError("give fn or module")
        module = _source_of(fn)
    return {"version": KEY_VERSION, "inputs": input_digests(inputs, exclude=exclude),
            "code": code_digest(module, root=root), "libraries": library_versions()}


def key_of(components: dict[str, Any]) -> str:
    """The hex sha256 of a canonical JSON dump of ``components``."""
    return hashlib.sha256(json.dumps(components, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stage_key(inputs: dict[str, Any], **kwargs: Any) -> str:
    """``key_of(stage_key_components(inputs, **kwargs))``."""
    return key_of(stage_key_components(inputs, **kwargs))


def record_stage_key(task_run_id: str, key: str, components: dict[str, Any]) -> None:
    """Remember the key the cache policy computed for one task run (``current_stage_key`` reads it)."""
    with _lock:
        _stage_keys[str(task_run_id)] = (key, components)


def current_stage_key() -> tuple[str, dict[str, Any]] | None:
    """``(key, components)`` the cache policy computed for the running task, or None outside one."""
    try:
        from prefect.context import TaskRunContext

        ctx = TaskRunContext.get()
    except Exception:
        return None
    if ctx is None:
        return None
    with _lock:
        return _stage_keys.get(str(ctx.task_run.id))

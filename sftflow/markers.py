"""Completion markers: what a finished stage wrote, with digests, checked before it is reused.

A stage writes its marker (``layout.STAGE_DONE_MARKER``, ``_SUCCESS``) last, in its folder,
with ``write_marker(folder, outputs=result)``: a JSON document naming every output file the
result refers to and that file's sha256, size and (for a dataset) row count::

    {"marker": 1, "stage": "dedup", "files": {"/…/dedup/kept.parquet":
        {"sha256": "…", "size": 5321, "rows": 40}, …}}

The outputs are the ``DatasetRef`` files and the files below every ``ModelRef`` folder that is
not a base model (a provisioned or user-given base model is an input, checked by its own
manifest) found while walking the result (dataclasses, tuples, lists, dicts). The training
folder ``_train/<key>`` gets one too (``sftflow.training.export.save_outputs``), so a finished
training is only reused when its weights still are the bytes that were written.

``check_outputs(result)`` is what a cache hit reads (``sftflow.ops.cachekeys``; and the training
folder's reuse): for every output file of the result it finds the nearest marker in the file's
folder or its parents (at most ``_SEARCH_UP`` levels up) that records it, and compares the file
now with the record: gone, another size, other bytes, or a ``DatasetRef`` whose sha256 is not
the recorded one (the folder was rewritten by another run) is a problem; so is a result whose
files no marker records (the marker was deleted, or the stage was interrupted before writing
it). An empty list means "intact": the cached result may be used as is.

Digests are ``sftflow.digests.file_sha256`` (the same value lineage records). It reads every
file's bytes on first sight in a process; files of 16 MiB or more are then memoized on their
stat signature (path, inode, size, mtime_ns, ctime_ns), so a check right after the stage wrote
them (or a cache key that hashed them) does not read a model twice. A same-size rewrite inside
one clock tick of the file system right after a memoized read is the known edge of that memo
(documented in ``sftflow.digests``); a new process always reads the bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from sftflow.data.refs import DatasetRef, ModelRef
from sftflow.digests import file_sha256
from sftflow.layout import STAGE_DONE_MARKER

MARKER_FORMAT = 1
_SEARCH_UP = 5  # runs/<p>/_train/<key>/merged/model.safetensors -> runs/<p>/_train/<key>/_SUCCESS: 2
_log = logging.getLogger("sftflow.markers")
# Problems already said once in this process (a cache hit and the training folder may both see one).
_reported: set[str] = set()
_reported_lock = threading.Lock()


# --------------------------------------------------------------------------- what a result wrote
def output_refs(result: Any) -> list[DatasetRef | ModelRef]:
    """The ``DatasetRef``s and non-base ``ModelRef``s inside ``result`` (walked recursively), in order."""
    found: list[DatasetRef | ModelRef] = []
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, DatasetRef):
            found.append(obj)
        elif isinstance(obj, ModelRef):
            if obj.kind != "base":  # a base model is an input of the stage, not one of its outputs
                found.append(obj)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name))
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(result)
    return found


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _abs(path: str | Path) -> str:
    return os.path.abspath(os.fspath(path))


def output_files(result: Any) -> dict[str, dict[str, Any]]:
    """``{absolute path: {"sha256", "size"[, "rows"]}}`` of every output file of ``result`` now.

    Raises:
        FileNotFoundError: an output the result names is not there (a stage must not mark itself
            done over a missing output).
    """
    files: dict[str, dict[str, Any]] = {}
    for ref in output_refs(result):
        if isinstance(ref, DatasetRef):
            p = Path(ref.path)
            files[_abs(p)] = {"sha256": file_sha256(p), "size": p.stat().st_size, "rows": ref.num_rows}
        else:
            folder = Path(ref.path)
            if not folder.is_dir():
                raise FileNotFoundError(f"model folder {folder} of the stage's result is missing")
            for p in _model_files(folder):
                if p.name == STAGE_DONE_MARKER:
                    continue
                files[_abs(p)] = {"sha256": file_sha256(p), "size": p.stat().st_size}
    return files


# --------------------------------------------------------------------------- writing
def write_marker(folder: str | Path, *, outputs: Any, stage: str = "") -> Path:
    """Write ``folder/_SUCCESS`` recording the digests of ``outputs``' files; call it last.

    Written atomically (a temporary file in ``folder``, fsync, rename), so a reader sees either
    no marker or a whole one.

    Args:
        folder: the stage's folder (or the training folder).
        outputs: the stage's result (any dataclass/tuple/dict holding ``DatasetRef``/``ModelRef``).
        stage: the stage's name, for people reading the marker.

    Returns:
        The marker's path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"marker": MARKER_FORMAT, "stage": stage, "files": output_files(outputs)}
    path = folder / STAGE_DONE_MARKER
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{STAGE_DONE_MARKER}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_marker(folder: str | Path) -> dict[str, dict[str, Any]] | None:
    """The ``files`` a marker in ``folder`` records; None when there is no marker.

    Raises:
        ValueError: the marker is not one this module wrote (empty, garbled, an old ``ok``).
    """
    path = Path(folder) / STAGE_DONE_MARKER
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
        files = doc["files"]
        if doc.get("marker") != MARKER_FORMAT or not isinstance(files, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"completion marker {path} is unreadable (no digests recorded)") from None
    return files


# --------------------------------------------------------------------------- checking
def _ancestors(start: Path) -> Iterator[Path]:
    folder = start
    for _ in range(_SEARCH_UP):
        yield folder
        if folder.parent == folder:
            return
        folder = folder.parent


class _Markers:
    """The markers met while checking one result (each read once)."""

    def __init__(self) -> None:
        self.cache: dict[Path, dict[str, dict[str, Any]] | None] = {}
        self.unreadable: dict[Path, str] = {}

    def files_of(self, folder: Path) -> dict[str, dict[str, Any]] | None:
        if folder not in self.cache:
            try:
                self.cache[folder] = read_marker(folder)
            except ValueError as e:
                self.unreadable[folder] = str(e)
                self.cache[folder] = None
        return self.cache[folder]

    def records(self, path: Path, *, folder: bool) -> tuple[Path | None, dict[str, dict[str, Any]], str]:
        """(marker folder, what it records of ``path``, "") for the nearest marker recording the
        file ``path`` (or, for a ``folder``, files below it); ``(None, {}, why)`` when none does."""
        key = _abs(path)
        unreadable = ""
        for where in _ancestors(path if folder else path.parent):
            files = self.files_of(where)
            if files is None:
                unreadable = unreadable or self.unreadable.get(where, "")
                continue
            mine = {k: v for k, v in files.items() if k == key or k.startswith(key + os.sep)}
            if mine:
                return where, mine, ""
        what = f"model {path.name}" if folder else path.name
        return None, {}, unreadable or f"completion marker missing for {what} (in {path.parent})"


def _short(path: str, base: Path | None) -> str:
    if base is not None:
        try:
            return str(Path(path).relative_to(base))
        except ValueError:
            pass
    return Path(path).name


def _compare(path: str, rec: dict[str, Any], *, base: Path | None) -> str:
    """A problem phrase for one recorded file, or "" when its bytes are the recorded ones."""
    p = Path(path)
    name = _short(path, base)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return f"{name} is missing"
    if size != rec.get("size"):
        return f"{name} changed on disk (size {size} != {rec.get('size')} bytes)"
    digest = file_sha256(p)
    if digest != rec.get("sha256"):
        return f"{name} changed on disk (sha256 {digest[:12]}… != {str(rec.get('sha256'))[:12]}…)"
    return ""


def check_outputs(result: Any) -> list[str]:
    """What is wrong with the outputs ``result`` refers to, against their completion markers.

    Returns:
        One short phrase per problem (``"kept.parquet changed on disk (sha256 … != …)"``,
        ``"completion marker missing for dataset.parquet"``); an empty list when every output file
        is there with the recorded bytes.
    """
    markers = _Markers()
    problems: list[str] = []
    for ref in output_refs(result):
        p = Path(ref.path)
        is_model = isinstance(ref, ModelRef)
        folder, recs, missing = markers.records(p, folder=is_model)
        if folder is None:
            problems.append(missing)
            continue
        if is_model:
            why = next((w for w in (_compare(k, v, base=folder) for k, v in sorted(recs.items())) if w), "")
        else:
            rec = recs[_abs(p)]
            if rec.get("sha256") != ref.sha256:
                why = (f"{_short(_abs(p), folder)} is not the file the result describes (the marker records "
                       f"sha256 {str(rec.get('sha256'))[:12]}…, the result {ref.sha256[:12]}…)")
            else:
                why = _compare(_abs(p), rec, base=folder)
        if why:
            problems.append(why)
    return list(dict.fromkeys(problems))


def describe(problems: list[str]) -> str:
    """The problems as one clause: the first, and how many more."""
    if not problems:
        return ""
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def report(logger: Any, message: str, *, problems: list[str]) -> None:
    """Log ``message`` as a warning once per process for these problems (an info line after that),
    so one damaged file is one console line even when two checks meet it."""
    key = "\n".join(problems)
    with _reported_lock:
        first = key not in _reported
        _reported.add(key)
    (logger or _log).log(logging.WARNING if first else logging.INFO, "%s", message)

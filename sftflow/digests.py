"""THE content digests: every "sha256" sftflow records, keys on or shows in lineage comes from here.

Definitions (stable; changing one changes every cache key and every recorded digest):

* ``file_sha256(path)``: hex sha256 of the file's bytes.
* ``dir_sha256(path)``: hex sha256 over the folder's regular files (symlinks followed, as
  ``Path.rglob`` + ``is_file`` see them), taken in sorted order of their relative POSIX name
  (``sub/model.safetensors``); for each file the bytes ``name + b"\\0" + file_sha256 + b"\\n"`` are
  fed to the hash. Names and contents both count; file times and permissions do not. An empty
  folder hashes the empty input.
* ``path_sha256(path)``: ``file_sha256`` for a file, ``"dir:" + dir_sha256`` for a folder,
  ``"missing"`` when nothing is there (the form cache keys use for a path a setting names).
* ``json_sha256(obj)``: sha256 of a canonical JSON dump (sorted keys, ``default=str``).

Files of ``MEMO_MIN_BYTES`` or more (model weights) are read once per process: the digest is
memoized on ``(resolved path, device, inode, size, mtime_ns, ctime_ns)`` after it was computed
from the bytes. The stat signature never stands in for content on first sight; it only says
"this is the same file we already read". Smaller files are always re-read, because an in-place
edit within one clock tick of the file system can keep size and mtime. Pure stdlib, no sftflow
imports: the bottom layer.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

__all__ = ["MEMO_MIN_BYTES", "dir_sha256", "file_sha256", "json_sha256", "path_sha256"]

MEMO_MIN_BYTES = 16 * 1024 * 1024
_CHUNK = 1 << 20
_memo: dict[tuple[Any, ...], str] = {}
_lock = threading.Lock()


def _hash_bytes(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (memoized per process for files of ``MEMO_MIN_BYTES`` or more).

    Raises:
        FileNotFoundError / IsADirectoryError: ``path`` is not a readable file.
    """
    p = Path(path)
    st = p.stat()
    if st.st_size < MEMO_MIN_BYTES:
        return _hash_bytes(p)
    sig = (str(p.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _lock:
        hit = _memo.get(sig)
    if hit is None:
        hit = _hash_bytes(p)
        with _lock:
            _memo[sig] = hit
    return hit


def dir_sha256(path: str | Path) -> str:
    """Hex sha256 of a folder: sorted (relative POSIX name, ``file_sha256``) pairs (module docstring).

    Raises:
        NotADirectoryError: ``path`` is not a folder (a missing folder would otherwise hash as empty).
    """
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"dir_sha256: {root} is not a folder")
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for name, p in files:
        h.update(name.encode() + b"\0" + file_sha256(p).encode() + b"\n")
    return h.hexdigest()


def path_sha256(path: str | Path) -> str:
    """``file_sha256`` of a file, ``"dir:" + dir_sha256`` of a folder, ``"missing"`` when absent (``~`` expanded)."""
    p = Path(path).expanduser()
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        return "dir:" + dir_sha256(p)
    return "missing"


def json_sha256(obj: Any) -> str:
    """Hex sha256 of ``json.dumps(obj, sort_keys=True, default=str)`` (e.g. a resolved config)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

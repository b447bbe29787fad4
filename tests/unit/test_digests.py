"""THE content digests (sftflow/digests.py): definition, memo, and one value everywhere lineage shows one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import sftflow.digests as digests
from sftflow.digests import dir_sha256, file_sha256, json_sha256, path_sha256


def test_dir_sha256_is_the_documented_definition(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"bee")
    (tmp_path / "sub" / "a.bin").write_bytes(b"\x00ay")
    want = hashlib.sha256()
    for name, data in sorted([("b.txt", b"bee"), ("sub/a.bin", b"\x00ay")]):
        want.update(name.encode() + b"\0" + hashlib.sha256(data).hexdigest().encode() + b"\n")
    assert dir_sha256(tmp_path) == want.hexdigest()
    assert path_sha256(tmp_path) == "dir:" + want.hexdigest()
    assert path_sha256(tmp_path / "b.txt") == file_sha256(tmp_path / "b.txt") == hashlib.sha256(b"bee").hexdigest()
    assert path_sha256(tmp_path / "nope") == "missing"
    # A rename changes the digest; a touch does not.
    os.utime(tmp_path / "b.txt", ns=(1, 1))
    assert dir_sha256(tmp_path) == want.hexdigest()
    (tmp_path / "b.txt").rename(tmp_path / "c.txt")
    assert dir_sha256(tmp_path) != want.hexdigest()
    with pytest.raises(NotADirectoryError, match="nope"):
        dir_sha256(tmp_path / "nope")
    assert json_sha256({"b": 1, "a": [1]}) == json_sha256({"a": [1], "b": 1})


def test_big_files_are_read_once_and_a_rewrite_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digests, "MEMO_MIN_BYTES", 10)
    reads: list[Path] = []
    real = digests._hash_bytes
    monkeypatch.setattr(digests, "_hash_bytes", lambda p: reads.append(p) or real(p))
    big = tmp_path / "w.bin"
    big.write_bytes(b"x" * 100)
    first = file_sha256(big)
    assert first == hashlib.sha256(b"x" * 100).hexdigest()  # first sight: the bytes, never the stat
    assert file_sha256(big) == first and len(reads) == 1  # memoized
    st = big.stat()
    big.write_bytes(b"y" * 100)
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime; ctime moved
    assert file_sha256(big) == hashlib.sha256(b"y" * 100).hexdigest() and len(reads) == 2
    small = tmp_path / "s.txt"
    small.write_bytes(b"abc")
    file_sha256(small), file_sha256(small)
    assert len(reads) == 4  # small files are always re-read


def test_every_sha256_lineage_shows_is_this_digest(sftflow_home: Path, tmp_path: Path) -> None:
    # The three former definitions (cache keys, model refs, dataset/folder refs) now agree.
    from sftflow.data import refs
    from sftflow.inference.models import resolve_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.ops import cachekeys

    ref = build_tiny_model("tiny-gemma")
    assert ref.sha256 == dir_sha256(ref.path) == cachekeys.dir_digest(ref.path) == refs.dir_sha256(ref.path)
    assert resolve_model(ref.path).sha256 == ref.sha256
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n')
    assert refs.sha256_file(f) == cachekeys.file_digest(f) == file_sha256(f)

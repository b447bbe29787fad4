"""One resolver for every ``path`` setting (``sftflow.config.resolve_paths``), and backtranslation's
corpus read through the shared reader (``sftflow.data.readers.read_file``).

Ingest, the config's file checks, preflight, the cache keys and the corpus must name the same
files for the same setting: ``~`` expanded, globs recursive (``**``), dot-files skipped, sorted.
(The corpus reader used to glob non-recursively without ``~``: the same pattern meant other files.)
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from sftflow.augment.corpus import corpus_files, corpus_format, load_corpus
from sftflow.config import resolve_paths
from sftflow.config_sections import ConfigError, CorpusConfig, SourceConfig
from sftflow.errors import DataError


@pytest.fixture()
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[Path]]:
    """``~/data/**/*.jsonl`` over files at two depths and a dot-file, with $HOME in tmp_path."""
    home = tmp_path / "userhome"
    monkeypatch.setenv("HOME", str(home))
    files = [home / "data" / "a" / "x.jsonl", home / "data" / "b" / "c" / "y.jsonl"]
    for i, p in enumerate(files):
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}.",
                                 "text": f"Document {i} about a river."}) + "\n")
    (home / "data" / ".hidden.jsonl").write_text('{"text": "never read"}\n')
    return "~/data/**/*.jsonl", files


def test_every_user_of_a_path_setting_names_the_same_files(tree, tmp_path: Path) -> None:
    from sftflow.keys import resolve_location
    from sftflow.ops.preflight import source_rows
    from tasks.ingest import resolve_files

    pattern, files = tree
    assert resolve_paths(pattern) == files  # ~ expanded, recursive, no dot-file, sorted
    src = SourceConfig(name="s", path=pattern)
    assert resolve_files(src) == files                                     # ingest
    assert sorted(resolve_location(pattern)) == [str(p) for p in files]    # cache keys
    assert source_rows(src).rows == 2                                      # preflight counts both files
    assert corpus_files(pattern) == files                                  # the backtranslation corpus
    segs = load_corpus(CorpusConfig(name="c", path=pattern, format="jsonl_text"), max_words=50)
    assert [s.source for s in segs] == ["c:x.jsonl", "c:y.jsonl"]
    # A plain path is the path (whether or not it exists); a glob matching nothing is empty.
    assert resolve_paths("~/nothing.json") == [Path(tmp_path / "userhome" / "nothing.json")]
    assert resolve_paths("~/data/**/*.csv") == []


def test_config_file_checks_use_the_same_resolver(tree, tmp_path: Path) -> None:
    from sftflow.config import validate_pipeline

    pattern, _ = tree
    raw = {"sources": [{"name": "s", "path": pattern}], "base_model": "tiny-gemma",
           "augmentation": {"enabled": True, "corpus": {"name": "c", "path": pattern, "format": "jsonl_text"}}}
    validate_pipeline("p", raw, base_dir=tmp_path)  # ~ and ** resolve: no error
    raw["augmentation"]["corpus"]["path"] = "~/data/**/*.txt"
    with pytest.raises(ConfigError, match=r"pipelines\.p\.augmentation\.corpus\.path: file not found"):
        validate_pipeline("p", raw, base_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="augmentation.corpus.path: file not found"):
        corpus_files("~/data/**/*.txt")


# --------------------------------------------------------------------------- the corpus on the shared reader
def test_jsonl_corpus_with_bom_and_crlf_reads_like_plain(tmp_path: Path) -> None:
    rows = [{"text": "First document."}, {"text": "Second document."}]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(codecs.BOM_UTF8 + "".join(json.dumps(r) + "\r\n" for r in rows).encode())
    got = [[(s.id.split(":")[1], s.text) for s in load_corpus(CorpusConfig(path=str(p)), max_words=50)]
           for p in (plain, bom)]
    assert got[0] == got[1] == [("1", "First document."), ("2", "Second document.")]


def test_corpus_row_errors_name_the_file_and_row(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: no string field 'text'"):
        load_corpus(CorpusConfig(path=str(bad)), max_words=50)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON \(malformed JSON"):
        load_corpus(CorpusConfig(path=str(broken)), max_words=50)
    dupes = tmp_path / "dupes.json"
    dupes.write_text('{"Paris": {"extract": "One."}, "Paris": {"extract": "Two."}}')
    with pytest.raises(DataError, match=r"duplicate key"):  # the shared reader refuses repeated titles
        load_corpus(CorpusConfig(path=str(dupes)), max_words=50)
    nostr = tmp_path / "nostr.json"
    nostr.write_text('{"Paris": {"title": "Paris"}}')
    with pytest.raises(DataError, match=r"entry 'Paris' has no string `extract`"):
        load_corpus(CorpusConfig(path=str(nostr)), max_words=50)


def test_wikipedia_leads_keep_titles_and_take_plain_strings(tmp_path: Path) -> None:
    leads = tmp_path / "leads.json"
    leads.write_text(json.dumps({"Paris": {"extract": "Paris is a city."}, "Rome": "Rome is a city too."}))
    segs = load_corpus(CorpusConfig(name="w", path=str(leads)), max_words=50)
    assert [(s.id, s.text, s.source) for s in segs] == [("Paris", "Paris is a city.", "w:leads.json"),
                                                       ("Rome", "Rome is a city too.", "w:leads.json")]
    # jsonl_text also reads a JSON list of objects (the reader's container), rows numbered from 1.
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps([{"body": "One."}, {"body": "Two."}]))
    segs = load_corpus(CorpusConfig(path=str(lst), format="jsonl_text", text_field="body"), max_words=50)
    assert [(s.id, s.text) for s in segs] == [("list.json:1", "One."), ("list.json:2", "Two.")]
    assert [corpus_format(Path(p)) for p in ("a.json", "a.JSONL", "a.ndjson", "a.txt")] == \
        ["wikipedia_leads", "jsonl_text", "jsonl_text", "text_lines"]

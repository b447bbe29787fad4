"""Malformed inputs, class by class: each becomes a quarantined row or a clear file error.

Every case checks the accounting (rows read = kept + quarantined, and read = the non-blank rows of
the file), and every error names the file (and line/row/byte) and what was expected.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config_sections import DedupConfig, IngestConfig, SourceConfig, SplitConfig, ValidationConfig
from sftflow.data.records import is_blank, make_record, records_to_frame, visible_text
from sftflow.data.refs import write_parquet
from sftflow.data.readers import MAX_JSON_DEPTH, IngestError
from tasks.ingest import ingest
from tasks.validate import validate

GOOD = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def _good(i: int) -> dict:
    return {"instruction": f"Question number {i}?", "input": "", "output": f"Answer number {i}."}


def _run(tmp_path: Path, path: Path, *, fraction: float = 1.0, **src):
    res = ingest(sources=[SourceConfig(name="src", path=str(path), **src)],
                 cfg=IngestConfig(max_quarantine_fraction=fraction), out_dir=tmp_path / "out")
    df, q = res.dataset.read(), pd.read_parquet(res.quarantine.path)
    c = res.counts[0]
    assert c.read == c.kept + c.quarantined == len(df) + len(q), "row accounting must balance"
    assert sum(f.rows for f in res.files) == c.read
    return res, df, q


def _lines(*rows: str | dict | bytes, sep: bytes = b"\n") -> bytes:
    out = []
    for r in rows:
        if isinstance(r, dict):
            out.append(json.dumps(r, ensure_ascii=False).encode())
        elif isinstance(r, str):
            out.append(r.encode())
        else:
            out.append(r)
    return sep.join(out) + sep


def _fails(tmp_path: Path, name: str, content: bytes, pattern: str, **src) -> str:
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(IngestError, match=pattern) as e:
        _run(tmp_path, f, **src)
    assert str(f) in str(e.value) or f"{f.name}" in str(e.value), "the error names the file"
    return str(e.value)


# --------------------------------------------------------------------------- 1. deep nesting
def test_deeply_nested_jsonl_line_is_a_quarantined_row(tmp_path: Path) -> None:
    deep = '{"instruction": "x", "output": "y", "meta": ' + "[" * 50_000 + "]" * 50_000 + "}"
    medium = '{"instruction": "x", "output": "y", "meta": ' + "[" * (MAX_JSON_DEPTH + 5) + "]" * (MAX_JSON_DEPTH + 5) + "}"
    f = tmp_path / "deep.jsonl"
    f.write_bytes(_lines(_good(1), deep, _good(2), medium, _good(3)))
    res, df, q = _run(tmp_path, f)
    assert len(df) == 3 and res.counts[0].read == 5
    reasons = dict(zip(q["source_row"], q["reason"]))
    assert reasons[2].startswith("JSON nested too deeply to parse")
    assert reasons[4] == f"JSON nested more than {MAX_JSON_DEPTH} levels deep (expected a flat record)"
    assert sorted(df["source_row"]) == [1, 3, 5]


def test_deeply_nested_json_document_is_a_file_error(tmp_path: Path) -> None:
    _fails(tmp_path, "deep.json", b"[" * 100_000 + b"]" * 100_000,
           r"deep.json: JSON nested too deeply to parse .* expected a JSON list of records")


def test_deep_element_of_a_json_list_is_quarantined_alone(tmp_path: Path) -> None:
    depth = MAX_JSON_DEPTH + 1
    f = tmp_path / "list.json"
    f.write_text("[" + json.dumps(_good(1)) + ', {"instruction": "a", "output": "b", "x": '
                 + "[" * depth + "]" * depth + "}, " + json.dumps(_good(2)) + "]")
    _, df, q = _run(tmp_path, f)
    assert len(df) == 2 and list(q["row"]) == [2] and "nested more than" in q.iloc[0]["reason"]


# --------------------------------------------------------------------------- 2. line splitting
@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c"])
def test_unicode_line_separators_inside_rows_do_not_split_them(tmp_path: Path, sep: str) -> None:
    # The characters are written raw into the file (json.dumps would escape the control ones).
    text = "".join(f'{{"instruction": "Line one{sep}line two {i}", "output": "Answer{sep}continued {i}"}}\n'
                   for i in range(3))
    assert text.count(sep) == 6 and len(text.splitlines()) > 3  # str.splitlines() would break these rows
    f = tmp_path / "seps.jsonl"
    f.write_bytes(text.encode())
    res, df, q = _run(tmp_path, f)
    assert len(q) == 0 and len(df) == 3 and list(df["source_row"]) == [1, 2, 3]
    assert df.iloc[2]["messages"][0]["content"] == f"Line one{sep}line two 2"
    assert df.iloc[2]["messages"][1]["content"] == f"Answer{sep}continued 2"


def test_crlf_line_endings(tmp_path: Path) -> None:
    f = tmp_path / "crlf.jsonl"
    f.write_bytes(_lines(_good(1), "", _good(2), '{"instruction": "broken"', _good(3), sep=b"\r\n"))
    _, df, q = _run(tmp_path, f)
    assert list(df["source_row"]) == [1, 3, 5] and list(q["row"]) == [4]
    assert not any("\r" in m["content"] for msgs in df["messages"] for m in msgs)
    c = tmp_path / "crlf.csv"
    c.write_bytes(b"instruction,input,output\r\nQ one,,A one\r\n\"Q\r\ntwo\",,A two\r\n")
    _, df, _ = _run(tmp_path, c)
    assert [m[1]["content"] for m in df["messages"]] == ["A one", "A two"] and list(df["source_row"]) == [2, 3]


# --------------------------------------------------------------------------- 4. trailing garbage
@pytest.mark.parametrize(("tail", "line", "col"), [(b"\n]", 4, 1), (b"]", 3, 2), (b"\ngarbage", 4, 1),
                                                   (b'\n{"instruction": "a", "output": "b"}', 4, 1)])
def test_valid_json_then_trailing_garbage_reports_line_and_column(tmp_path: Path, tail: bytes, line: int,
                                                                   col: int) -> None:
    body = b"[\n" + json.dumps(GOOD).encode() + b"\n]"
    _fails(tmp_path, "trail.json", body + tail,
           rf"trail.json: not valid JSON at line {line} column {col}: unexpected data after the end of the JSON "
           r"value; expected a JSON list of records")


def test_broken_json_document_reports_line_and_column(tmp_path: Path) -> None:
    _fails(tmp_path, "broken.json", b'[\n  {"instruction": "a",\n   "output": }\n]',
           r"broken.json: not valid JSON at line 3 column 14: Expecting value")


def test_jsonl_named_json_still_reads_per_line(tmp_path: Path) -> None:
    f = tmp_path / "lines.json"
    f.write_bytes(_lines(_good(1), "{not json", _good(2)))
    _, df, q = _run(tmp_path, f)
    assert len(df) == 2 and list(q["row"]) == [2] and q.iloc[0]["reason"].startswith("malformed JSON")


# --------------------------------------------------------------------------- 7. lineage digests
def test_ingest_result_carries_sha256_of_the_bytes_read(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    a.write_bytes(_lines(_good(1), _good(2), "{bad"))
    b.write_text("instruction,output\nQ,A\n")
    res = ingest(sources=[SourceConfig(name="a", path=str(a)), SourceConfig(name="b", path=str(b))],
                 cfg=IngestConfig(max_quarantine_fraction=0.5), out_dir=tmp_path / "out")
    sums = {line.split()[1]: line.split()[0]
            for line in subprocess.run(["sha256sum", str(a), str(b)], capture_output=True, text=True,
                                       check=True).stdout.splitlines()}
    assert [(f.source, f.path, f.sha256, f.rows) for f in res.files] == [
        ("a", str(a), sums[str(a)], 3), ("b", str(b), sums[str(b)], 1)]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [f["sha256"] for f in report["files"]] == [sums[str(a)], sums[str(b)]]
    # Edit in place: the next ingest sees (and reports) the new bytes and row count.
    a.write_bytes(_lines(_good(1)))
    res2 = ingest(sources=[SourceConfig(name="a", path=str(a))], cfg=IngestConfig(), out_dir=tmp_path / "out2")
    assert res2.files[0].sha256 == hashlib.sha256(a.read_bytes()).hexdigest() != sums[str(a)]
    assert res2.files[0].rows == 1


def test_ingest_task_logs_the_digests_it_parsed(stage_ctx, tmp_path: Path) -> None:
    import mlflow

    from tasks.ingest import ingest_task

    f = tmp_path / "src.jsonl"
    f.write_bytes(_lines(_good(1), _good(2)))
    res = ingest_task.fn([SourceConfig(name="s", path=str(f))], IngestConfig(), ctx=stage_ctx)
    run = mlflow.search_runs([stage_ctx.experiment_id], filter_string="tags.`sftflow.stage` = 'ingest'",
                             output_format="list")[0]
    tags = [{t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs]
    src_tags = [t for t in tags if t.get("mlflow.data.context") == "ingest.source"]
    assert [t["sftflow.sha256"] for t in src_tags] == [hashlib.sha256(f.read_bytes()).hexdigest()]
    assert res.files[0].sha256 == src_tags[0]["sftflow.sha256"]


# --------------------------------------------------------------------------- 8. more classes
@pytest.mark.parametrize(("name", "content", "pattern"), [
    ("empty.jsonl", b"", r"empty.jsonl: file is empty \(expected JSONL records\)"),
    ("empty.json", b"", r"empty.json: file is empty \(expected JSON records\)"),
    ("empty.csv", b"", r"empty.csv: file is empty \(expected CSV records\)"),
    ("empty.parquet", b"", r"empty.parquet: file is empty \(expected PARQUET records\)"),
    ("blank.jsonl", b"\n\n   \n\t\r\n\n", r"blank.jsonl: file is empty \(expected JSONL records\) \(only blank lines\)"),
    ("bom_only.jsonl", codecs.BOM_UTF8 + b"\n", r"bom_only.jsonl: file is empty"),
    ("int.json", b"42", r"int.json: expected a JSON list of records, got int"),
    ("str.json", b'"text"', r"str.json: expected a JSON list of records, got str"),
    ("null.json", b"null", r"null.json: expected a JSON list of records, got null"),
    ("bool.json", b"true", r"bool.json: expected a JSON list of records, got bool"),
    ("nan.json", b"NaN", r"nan.json: expected a JSON list of records, got float nan"),
    ("dupkeys.json", b'{"data": [], "data": []}', r"dupkeys.json: duplicate key\(s\) \['data'\] in the top-level"),
    ("dupcol.csv", b"instruction,output,output\nq,a,b\n",
     r"dupcol.csv: duplicate column\(s\) \['output'\] in the CSV header; expected each column once"),
    ("nocol.csv", b"question,answer\nq,a\n", r"nocol.csv: unknown format \(keys \['answer', 'question'\]\); expected one of"),
    ("arrays.jsonl", b"[1, 2]\n[3]\n", r"arrays.jsonl: unknown format \(rows that are not objects: \['list'\]\)"),
])
def test_whole_file_errors(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    _fails(tmp_path, name, content, pattern)


def test_csv_unclosed_quote_says_which_lines_it_swallowed(tmp_path: Path) -> None:
    c = tmp_path / "quote.csv"
    c.write_text('instruction,output\nQ one,A one\n"Q two,A two\nQ three,A three\nQ four,A four\n')
    _, df, q = _run(tmp_path, c)
    assert len(df) == 1 and list(q["row"]) == [3]
    assert q.iloc[0]["reason"] == ("malformed CSV: expected 2 fields, got 1 (the row runs from line 3 to 5: an "
                                   "unclosed quote swallows the lines after it)")
    assert "Q four" in q.iloc[0]["raw"]  # the swallowed rows are visible in the quarantine, not lost


def test_csv_and_parquet_missing_a_required_column_of_a_forced_format(tmp_path: Path) -> None:
    _fails(tmp_path, "q.csv", b"instruction,answer\nq,a\n",
           r"q.csv: no column 'output' for format 'alpaca' \(columns: \['answer', 'instruction'\]\); expected alpaca "
           r"columns, or map yours with `columns:`", format="alpaca")
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_parquet(tmp_path / "w.parquet")
    with pytest.raises(IngestError, match=r"w.parquet: no column 'messages or conversations' for format 'messages'"):
        _run(tmp_path, tmp_path / "w.parquet", format="messages")
    with pytest.raises(IngestError, match=r"w.parquet: unknown format \(keys \['a', 'b'\]\)"):
        _run(tmp_path, tmp_path / "w.parquet")
    # The column mapping fixes it.
    _, df, _ = _run(tmp_path, tmp_path / "q.csv", format="alpaca", columns={"answer": "output"})
    assert len(df) == 1


def test_parquet_with_wrong_value_types_quarantines_rows(tmp_path: Path) -> None:
    pd.DataFrame({"instruction": ["q1", "q2", "q3"], "output": [1, 2, 3]}).to_parquet(tmp_path / "t.parquet")
    _, df, q = _run(tmp_path, tmp_path / "t.parquet")
    assert len(df) == 0 and list(q["reason"]) == ["field 'output' must be a string, got int"] * 3
    assert list(q["row"]) == [1, 2, 3]


def test_directory_without_matching_files(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    with pytest.raises(IngestError, match=r"glob .*\*\.jsonl matches no file \(expected files ending in .json/.jsonl"):
        _run(tmp_path, d / "*.jsonl")
    with pytest.raises(IngestError, match=r"is a folder but not a `datasets.save_to_disk` folder .*holds \['notes.txt'\]"):
        _run(tmp_path, d)
    with pytest.raises(IngestError, match=r"notes.txt: unknown file type '.txt'"):
        _run(tmp_path, d / "*")


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_bom_prefixed_files(tmp_path: Path, kind: str) -> None:
    rows = [_good(1), _good(2)]
    if kind == "jsonl":
        body = _lines(*rows)
    elif kind == "json":
        body = json.dumps(rows).encode()
    else:
        body = b"instruction,input,output\n" + b"".join(f"{r['instruction']},,{r['output']}\n".encode() for r in rows)
    f = tmp_path / f"bom.{kind}"
    f.write_bytes(codecs.BOM_UTF8 + body)
    res, df, q = _run(tmp_path, f)
    assert len(df) == 2 and len(q) == 0 and res.counts[0].formats == "alpaca"
    assert df.iloc[0]["messages"][0]["content"] == "Question number 1?"  # no U+FEFF glued to the first key/value
    assert res.files[0].sha256 == hashlib.sha256(f.read_bytes()).hexdigest()  # digest of the bytes as stored


def test_utf16_with_bom_is_decoded(tmp_path: Path) -> None:
    f = tmp_path / "u16.jsonl"
    f.write_bytes(codecs.BOM_UTF16_LE + _lines(_good(1), {"instruction": "Café?", "output": "Oui."}).decode().encode("utf-16-le"))
    _, df, _ = _run(tmp_path, f)
    assert df.iloc[1]["messages"][0]["content"] == "Café?"


def test_invalid_utf8_quarantines_jsonl_lines_and_csv_rows(tmp_path: Path) -> None:
    f = tmp_path / "bytes.jsonl"
    bad = b'{"instruction": "Bad \xc3\x28 bytes", "output": "ok"}'
    f.write_bytes(_lines(_good(1), bad, _good(2)))
    offset = f.read_bytes().index(b"\xc3\x28")
    _, df, q = _run(tmp_path, f)
    assert len(df) == 2 and list(q["row"]) == [2]
    start = f.read_bytes().index(bad)
    assert q.iloc[0]["reason"].startswith(f"invalid UTF-8 at byte {offset} of the file (line 2, byte "
                                          f"{offset - start + 1} of the line); expected UTF-8 text")
    assert "\ufffd" in q.iloc[0]["raw"]
    c = tmp_path / "bytes.csv"
    c.write_bytes(b"instruction,output,category\nQ one,A one,x\nQ two,A two,caf\xe9\nQ three,A three,y\n")
    _, df, q = _run(tmp_path, c)
    assert len(df) == 2 and list(q["row"]) == [3]
    assert q.iloc[0]["reason"].startswith("invalid UTF-8 at byte 57 of the file (line 3, byte 16 of the line); "
                                          "expected UTF-8 text") and "(CSV line 3, column 'category')" in q.iloc[0]["reason"]


def test_nan_and_infinity_literals(tmp_path: Path) -> None:
    f = tmp_path / "nan.jsonl"
    f.write_bytes(_lines('{"instruction": "q", "output": NaN}', '{"instruction": "q2", "output": "a", "score": Infinity}',
                         '{"instruction": -Infinity, "output": "a"}'))
    _, df, q = _run(tmp_path, f)
    assert list(df["source_row"]) == [2]  # a NaN in a field the format does not read is harmless
    assert dict(zip(q["row"], q["reason"])) == {
        1: "field 'output' must be a string, got float nan (a NaN/Infinity literal)",
        3: "field 'instruction' must be a string, got float -inf (a NaN/Infinity literal)",
    }


def test_lone_surrogate_escapes_and_huge_numbers(tmp_path: Path) -> None:
    f = tmp_path / "odd.jsonl"
    f.write_bytes(_lines('{"instruction": "q", "output": "half a pair \\ud83d"}',
                         '{"instruction": "q", "output": "a", "n": ' + "9" * 5000 + "}",
                         '{"instruction": "q", "output": "paired \\ud83d\\ude00 ok"}'))
    _, df, q = _run(tmp_path, f)
    assert list(df["source_row"]) == [3] and df.iloc[0]["messages"][1]["content"] == "paired \U0001f600 ok"
    reasons = dict(zip(q["row"], q["reason"]))
    assert reasons[1].startswith("invalid text in the assistant turn: a lone UTF-16 surrogate")
    assert reasons[2].startswith("malformed JSON: Exceeds the limit (4300 digits)")
    _fails(tmp_path, "huge.json", b'[{"instruction": "q", "output": ' + b"9" * 5000 + b"}]",
           r"huge.json: not valid JSON \(Exceeds the limit \(4300 digits\)")


def test_non_string_content_values(tmp_path: Path) -> None:
    f = tmp_path / "types.jsonl"
    f.write_bytes(_lines(
        {"instruction": "q", "output": 3.5},
        {"instruction": "q", "output": None},
        {"instruction": ["q"], "output": "a"},
        {"instruction": "q", "output": {"text": "a"}},
        {"instruction": "q", "output": True},
        _good(6),
    ))
    _, df, q = _run(tmp_path, f)
    assert list(df["source_row"]) == [6]
    assert list(q["reason"]) == [
        "field 'output' must be a string, got float",
        "field 'output' is null (expected a string)",
        "field 'instruction' must be a string, got list",
        "field 'output' must be a string, got dict",
        "field 'output' must be a string, got bool",
    ]
    m = tmp_path / "msg.jsonl"
    m.write_bytes(_lines(
        {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [1, 2]}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ))
    _, df, q = _run(tmp_path, m)
    assert list(df["source_row"]) == [4]
    assert list(q["reason"]) == [
        "turn 0: content must be a string or a list of text parts, got int",
        "turn 0: missing `content`/`value`",
        "turn 1: unsupported content part of type 'int' (only text, reasoning and tool_call parts are supported)",
    ]


def test_duplicate_keys_are_quarantined_not_silently_resolved(tmp_path: Path) -> None:
    f = tmp_path / "dup.jsonl"
    f.write_bytes(_lines('{"instruction": "q", "output": "first", "output": "second"}',
                         '{"messages": [{"role": "user", "content": "q", "content": "q2"}, {"role": "assistant", "content": "a"}]}',
                         _good(3)))
    _, df, q = _run(tmp_path, f)
    assert list(df["source_row"]) == [3]
    assert list(q["reason"]) == [
        "duplicate key(s) ['output'] in one JSON object (which value is meant is ambiguous; keep each key once)",
        "duplicate key(s) ['content'] in one JSON object (which value is meant is ambiguous; keep each key once)",
    ]
    j = tmp_path / "dup.json"
    j.write_text('[{"instruction": "q", "instruction": "q", "output": "a"}, ' + json.dumps(_good(2)) + "]")
    _, df, q = _run(tmp_path, j)
    assert list(df["source_row"]) == [2] and list(q["row"]) == [1]


def test_lines_longer_than_the_limit(tmp_path: Path) -> None:
    cfg_chars = 100  # max_line_chars = 4 * max_record_chars + 1024
    long_row = {"instruction": "q", "output": "z" * (4 * cfg_chars + 2000)}
    f = tmp_path / "long.jsonl"
    f.write_bytes(_lines(_good(1), long_row, _good(3)))
    res = ingest(sources=[SourceConfig(name="s", path=str(f))],
                 cfg=IngestConfig(max_record_chars=cfg_chars, max_quarantine_fraction=0.5), out_dir=tmp_path / "o")
    q = pd.read_parquet(res.quarantine.path)
    assert res.counts[0].kept == 2 and list(q["row"]) == [2]
    n = len(json.dumps(long_row))
    assert q.iloc[0]["reason"] == f"record too long: line has {n} chars (> {4 * cfg_chars + 1024})"
    # CSV: a field beyond csv's own 128 KiB field limit is a quarantined row, and the next rows still read.
    c = tmp_path / "long.csv"
    c.write_text("instruction,output\nQ one,A one\nQ two," + "w" * 300_000 + "\nQ three,A three\n")
    res = ingest(sources=[SourceConfig(name="s", path=str(c))], cfg=IngestConfig(max_quarantine_fraction=0.5),
                 out_dir=tmp_path / "o2")
    q = pd.read_parquet(res.quarantine.path)
    assert res.counts[0].kept == 2 and list(q["row"]) == [3]
    assert q.iloc[0]["reason"].startswith("record too long: row has 300006 chars (> 201024)")


def test_a_file_whose_rows_all_fail_to_parse_is_all_quarantine(tmp_path: Path) -> None:
    f = tmp_path / "junk.jsonl"
    f.write_bytes(_lines("not json", "{also not", "[1,"))
    with pytest.raises(IngestError, match=r"src: 3/3 rows quarantined .*malformed JSON") as e:
        _run(tmp_path, f, fraction=0.2)
    assert f"First bad rows: {f} row 1: malformed JSON: Expecting value at column 1; {f} row 2: " in str(e.value)
    q = pd.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert list(q["row"]) == [1, 2, 3] and set(q["file"]) == {str(f)}


# --------------------------------------------------------------------------- 3. invisible-only text
INVISIBLE = ["\u200b", "\u200c\u200d", "\u2060\ufeff", "\u00ad", "\ufe0f\ufe0e", "\u202e\u2066\u2069",
             " \u200b\n\t\u3000", "\u034f\u180e", "\U000e0020\U000e007f", "\u3164", "\u2800"]


@pytest.mark.parametrize("text", INVISIBLE)
def test_invisible_only_text_is_blank(text: str) -> None:
    assert is_blank(text) and visible_text(text) == ""
    assert not is_blank("a" + text) and visible_text("a" + text + "b") == "ab"
    assert not is_blank("👍\ufe0f") and not is_blank("\u05d0")  # emoji + variation selector, Hebrew letter


def test_ingest_quarantines_invisible_only_turns(tmp_path: Path) -> None:
    rows = [{"instruction": "q", "output": t} for t in INVISIBLE] + [{"instruction": t, "output": "a"} for t in INVISIBLE]
    rows += [{"instruction": "q", "output": "a", "system": "\u200b\u200b"}, _good(1)]
    f = tmp_path / "zw.jsonl"
    f.write_bytes(_lines(*rows))
    _, df, q = _run(tmp_path, f)
    assert list(df["source_row"]) == [len(rows)]
    assert q["reason"].str.startswith("empty response (blank, whitespace-only or invisible").sum() == len(INVISIBLE)
    assert q["reason"].str.startswith("empty instruction").sum() == len(INVISIBLE)
    assert q.set_index("row").loc[len(rows) - 1, "reason"].startswith("empty system prompt")


def _rec(q: str, a: str, *, system: str | None = None, row: int = 0) -> dict:
    msgs = ([{"role": "system", "content": system}] if system is not None else [])
    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return make_record(msgs, source="s:file.jsonl", source_row=row)


def test_gx_suite_quarantines_invisible_only_turns(tmp_path: Path) -> None:
    good = [_rec(f"What is {i} plus {i}?", f"It is {2 * i}.", row=i + 1) for i in range(40)]
    bad = ([_rec("Visible question?", t, row=100 + k) for k, t in enumerate(INVISIBLE)]
           + [_rec(t, "Visible answer.", row=200 + k) for k, t in enumerate(INVISIBLE)]
           + [_rec("Question?", "Answer.", system="\u200b\u2060", row=300)])
    ref = write_parquet(records_to_frame(good + bad), tmp_path / "in.parquet", name="in")
    res = validate(dataset=ref, cfg=ValidationConfig(max_suite_failure_fraction=0.5, max_non_printable_fraction=1.0),
                   out_dir=tmp_path / "v")
    q = pd.read_parquet(res.quarantine.path).set_index("source_row")
    assert res.valid.num_rows == 40 and len(q) == len(bad)
    for k in range(len(INVISIBLE)):
        assert q.loc[100 + k, "reason"] == "expect_column_values_to_be_between(min_assistant_chars >= 1)"
        assert q.loc[200 + k, "reason"] == "expect_column_values_to_be_between(min_user_chars >= 1)"
    assert q.loc[300, "reason"] == "expect_column_values_to_be_between(min_system_chars >= 1)"
    # The GX result itself records the failures (GX runs for real, it is not bypassed).
    gx = json.loads(Path(res.gx_result).read_text())
    failed = {r["expectation_config"]["kwargs"].get("column") for r in gx["results"] if not r["success"]}
    assert {"min_assistant_chars", "min_user_chars", "min_system_chars"} <= failed


def test_failed_suite_names_the_source_rows(tmp_path: Path) -> None:
    from tasks.validate import ValidationFailed

    recs = [_rec(f"Q {i}?", f"A {i}.", row=i + 1) for i in range(3)] + [_rec("Q?", "\u200b", row=42)]
    ref = write_parquet(records_to_frame(recs), tmp_path / "in.parquet", name="in")
    with pytest.raises(ValidationFailed, match=r"First quarantined rows:\n  - s:file.jsonl row 42: "
                                               r"expect_column_values_to_be_between\(min_assistant_chars >= 1\)"):
        validate(dataset=ref, cfg=ValidationConfig(max_suite_failure_fraction=0.1), out_dir=tmp_path / "v")


# --------------------------------------------------------------------------- 5. provenance to the source row
def test_validation_quarantine_points_at_the_source_line_through_dedup_and_split(tmp_path: Path) -> None:
    from tasks.dedup import dedup
    from tasks.split import split

    lines: list = []
    for i in range(30):
        lines.append(_good(i))
        if i % 7 == 0:
            lines.append("")  # blank lines shift line numbers away from record indices
    lines.insert(12, {"instruction": "Tell me everything.", "output": "x" * 3000})  # passes ingest, fails validation
    lines.append(_good(0))  # an exact duplicate of line 1, removed by dedup
    f = tmp_path / "prov.jsonl"
    f.write_bytes(_lines(*lines))
    raw = f.read_bytes().split(b"\n")
    res, df, _ = _run(tmp_path, f)
    # Each record's source_row is its line in the file.
    for rec_msgs, row in zip(df["messages"], df["source_row"]):
        assert json.loads(raw[row - 1])["output"] == rec_msgs[1]["content"]
    v = validate(dataset=res.dataset, cfg=ValidationConfig(max_chars=2000), out_dir=tmp_path / "v")
    q = pd.read_parquet(v.quarantine.path)
    assert len(q) == 1
    long_line = next(k + 1 for k, b in enumerate(raw) if b"Tell me everything" in b)
    assert (q.iloc[0]["source"], q.iloc[0]["source_row"]) == ("src:prov.jsonl", long_line)
    assert long_line != q.iloc[0]["row"]  # row = position in the intermediate Parquet, kept apart
    assert q.iloc[0]["file"] == res.dataset.path
    # dedup and split keep the column (and its values).
    d = dedup(datasets=[v.valid], cfg=DedupConfig(near={"enabled": False}), out_dir=tmp_path / "dedup")
    kept, removed = d.kept.read(), d.removed.read()
    assert "source_row" in kept.columns and "source_row" in removed.columns
    assert list(removed["source_row"]) == [len(raw) - 1]  # the duplicate, on the file's last line
    sp = split(dataset=d.kept, cfg=SplitConfig(heldout_size=5), dedup=DedupConfig(near={"enabled": False}),
               out_dir=tmp_path / "split")
    both = pd.concat([sp.train.read(), sp.heldout.read()])
    assert both["source_row"].dtype == "int64"
    assert sorted(both["source_row"]) == sorted(kept["source_row"])


def test_validate_accepts_frames_without_source_row(tmp_path: Path) -> None:
    df = records_to_frame([_rec(f"Q {i}?", f"A {i}.") for i in range(5)]).drop(columns=["source_row"])
    ref = write_parquet(df, tmp_path / "old.parquet", name="old")
    res = validate(dataset=ref, cfg=ValidationConfig(), out_dir=tmp_path / "v")
    assert res.valid.num_rows == 5 and list(res.valid.read()["source_row"]) == [0] * 5

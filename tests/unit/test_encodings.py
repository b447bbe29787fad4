"""Text encodings at ingestion (issue 22, class 5): real files through ``tasks.ingest.ingest``.

* an invalid UTF-8 byte inside a JSON list quarantines that record (with its byte offset), not the file;
* UTF-16/32, LE and BE, with and without a byte-order mark, in JSON, JSONL and CSV: decoded;
* a UTF-8 BOM, Latin-1 files (the byte offset and a re-encoding hint), CRLF line endings and a
  JSONL whose last line was cut off.

Row accounting (read = kept + quarantined) is checked for every file.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config_sections import IngestConfig, SourceConfig
from sftflow.data.formats import load_records
from sftflow.data.readers import IngestError, sniff_utf16_32
from tasks.ingest import ingest

# 20 records with ASCII, Latin, CJK and astral (surrogate pairs in UTF-16) text.
RECORDS = [{"instruction": f"Question {i}: café, 日本語, {'😀' * (i % 3)}?", "input": "",
            "output": f"Answer {i}: naïve 한국어 {'👍🏽' if i % 2 else 'ok'}."} for i in range(20)]


def _run(tmp_path: Path, f: Path, **cfg) -> tuple:
    res = ingest(sources=[SourceConfig(name="enc", path=str(f))], cfg=IngestConfig(**cfg), out_dir=tmp_path / "out")
    df, q = res.dataset.read(), pd.read_parquet(res.quarantine.path)
    c = res.counts[0]
    assert c.read == c.kept + c.quarantined == len(df) + len(q)
    return res, df, q


def _text(kind: str, *, newline: str = "\n") -> str:
    if kind == "json":
        return json.dumps(RECORDS, ensure_ascii=False, indent=1).replace("\n", newline)
    if kind == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + newline for r in RECORDS)
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator=newline)
    w.writerow(["instruction", "input", "output"])
    for r in RECORDS:
        w.writerow([r["instruction"], r["input"], r["output"]])
    return buf.getvalue()


def _pairs(df: pd.DataFrame) -> list[tuple[str, str]]:
    return [(m[0]["content"], m[1]["content"]) for m in df["messages"]]


WANT = [(r["instruction"], r["output"]) for r in RECORDS]
BOMS = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
        "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE}


# --------------------------------------------------------------------------- UTF-16/32
@pytest.mark.parametrize("kind", ["json", "jsonl", "csv"])
@pytest.mark.parametrize("codec", list(BOMS))
@pytest.mark.parametrize("bom", [True, False], ids=["bom", "no-bom"])
def test_utf16_and_utf32_are_decoded(tmp_path: Path, kind: str, codec: str, bom: bool) -> None:
    f = tmp_path / f"data.{kind}"
    f.write_bytes((BOMS[codec] if bom else b"") + _text(kind).encode(codec))
    res, df, q = _run(tmp_path, f)
    assert len(q) == 0 and _pairs(df) == WANT  # 20 records in, the same 20 out
    assert res.files[0].sha256 == hashlib.sha256(f.read_bytes()).hexdigest()  # the bytes as stored
    enc = load_records(f).encoding
    assert enc == f"{codec} (byte-order mark)" if bom else enc == f"{codec} (no byte-order mark)"


def test_sniffing_leaves_utf8_alone_and_refuses_odd_lengths() -> None:
    assert sniff_utf16_32(_text("jsonl").encode("utf-8")) is None
    assert sniff_utf16_32("日本語のテキスト".encode("utf-8")) is None
    assert sniff_utf16_32(_text("jsonl").encode("utf-16-le")) == "utf-16-le"
    assert sniff_utf16_32(_text("jsonl").encode("utf-16-le") + b"x") is None  # not whole code units


def test_cjk_heavy_utf16_without_bom(tmp_path: Path) -> None:
    rows = [{"instruction": "请用一句话介绍长城。" * 3, "output": "长城是中国古代的军事防御工程。" * 3}] * 3
    for codec in ("utf-16-le", "utf-16-be"):
        f = tmp_path / f"cjk-{codec}.json"
        f.write_bytes(json.dumps(rows, ensure_ascii=False).encode(codec))
        got = load_records(f)
        assert got.read == 3 and not got.rejected and got.encoding == f"{codec} (no byte-order mark)"


def test_invalid_utf16_names_the_encoding_and_byte(tmp_path: Path) -> None:
    f = tmp_path / "bad16.jsonl"
    body = _text("jsonl").encode("utf-16-le")
    f.write_bytes(codecs.BOM_UTF16_LE + body[:40] + b"\x00\xdc" + body[40:])  # a lone low surrogate
    with pytest.raises(IngestError, match=r"bad16.jsonl: invalid UTF-16-LE at byte 40; expected text in the "
                                          r"encoding its byte-order mark announces \(UTF-16-LE\), or UTF-8"):
        _run(tmp_path, f)


def test_utf16_cut_mid_character(tmp_path: Path) -> None:
    # An interrupted copy: whole characters are kept, the last row is named as truncated.
    f = tmp_path / "cut16.jsonl"
    f.write_bytes(_text("jsonl").encode("utf-16-le")[:-3])
    res, df, q = _run(tmp_path, f)
    assert len(df) == 19 and list(q["row"]) == [20]
    assert q.iloc[0]["reason"].endswith("(the last line has no line end: the file looks truncated)")
    g = tmp_path / "cut16.json"
    g.write_bytes(_text("json").encode("utf-16-be")[:-5])
    with pytest.raises(IngestError, match=r"cut16.json: not valid JSON at line \d+ column \d+: .*\(the file was "
                                          r"decoded as UTF-16-BE \(no byte-order mark\)\)$"):
        _run(tmp_path, g)


# --------------------------------------------------------------------------- invalid UTF-8
def test_bad_byte_in_a_json_list_quarantines_only_its_record(tmp_path: Path) -> None:
    f = tmp_path / "list.json"
    good = _text("json").encode("utf-8")
    # Record 8 (1-based) gets a Latin-1 'é' (0xE9) where UTF-8 has c3 a9.
    at = good.index("Answer 7: naïve".encode()) + len("Answer 7: na")
    data = good[:at] + b"\xe9" + good[at + 2:]
    f.write_bytes(data)
    res, df, q = _run(tmp_path, f)
    assert len(df) == 19 and list(q["row"]) == [8]
    line = data.count(b"\n", 0, at) + 1
    col = at - data.rfind(b"\n", 0, at)
    assert q.iloc[0]["reason"] == (
        f"invalid UTF-8 at byte {at} of the file (line {line}, byte {col} of the line); expected UTF-8 text "
        "(byte 0xe9 is 'é' in Windows-1252/Latin-1: if the file is in that encoding, re-encode it as UTF-8, "
        "e.g. iconv -f cp1252 -t utf-8)")
    assert "\ufffd" in q.iloc[0]["raw"]
    assert _pairs(df) == WANT[:7] + WANT[8:]


def test_bad_bytes_in_several_json_records(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    data = json.dumps(rows).encode().replace(b'"a1"', b'"a1\xff"').replace(b'"q3"', b'"q3\x80\x80"')
    f = tmp_path / "two.json"
    f.write_bytes(data)
    res, df, q = _run(tmp_path, f, max_quarantine_fraction=0.5)
    assert list(q["row"]) == [2, 4] and len(df) == 3
    ff, x80 = data.index(b"\xff"), data.index(b"\x80")
    assert q.iloc[0]["reason"].startswith(f"invalid UTF-8 at byte {ff} of the file")
    assert q.iloc[1]["reason"].startswith(f"invalid UTF-8 at byte {x80} of the file")


def test_bad_byte_in_an_object_layout_is_a_file_error(tmp_path: Path) -> None:
    # {"data": [...]} or {key: record}: the record holding the byte is not located; the file error names it.
    data = json.dumps({"data": [{"instruction": "q", "output": "caf"}]}).encode().replace(b"caf", b"caf\xe9")
    f = tmp_path / "obj.json"
    f.write_bytes(data)
    at = data.index(b"\xe9")
    with pytest.raises(IngestError, match=rf"obj.json: invalid UTF-8 at byte {at} of the file "
                                          r"\(line 1, byte \d+ of the line\); expected UTF-8 text \(byte 0xe9 is 'é'"):
        _run(tmp_path, f)


def test_latin1_jsonl_and_csv(tmp_path: Path) -> None:
    f = tmp_path / "latin1.jsonl"
    lines = ['{"instruction": "Say hi", "output": "hi"}', '{"instruction": "Café?", "output": "Oui, café."}',
             '{"instruction": "Plain", "output": "ascii"}']
    data = "\n".join(lines).encode("latin-1") + b"\n"
    f.write_bytes(data)
    res, df, q = _run(tmp_path, f, max_quarantine_fraction=0.5)
    assert len(df) == 2 and list(q["row"]) == [2]
    at, nl = data.index(b"\xe9"), data.index(b"\n")
    assert q.iloc[0]["reason"] == (
        f"invalid UTF-8 at byte {at} of the file (line 2, byte {at - nl} of the "
        "line); expected UTF-8 text (byte 0xe9 is 'é' in Windows-1252/Latin-1: if the file is in that encoding, "
        "re-encode it as UTF-8, e.g. iconv -f cp1252 -t utf-8)")
    c = tmp_path / "latin1.csv"
    data = "instruction,output\nSay hi,hi\n\"Multi\nline é\",x\nPlain,ascii\n".encode("latin-1")
    c.write_bytes(data)
    res, df, q = _run(tmp_path, c, max_quarantine_fraction=0.5)
    assert len(df) == 2 and list(q["row"]) == [3]
    at = data.index(b"\xe9")
    assert q.iloc[0]["reason"].startswith(f"invalid UTF-8 at byte {at} of the file (line 4, byte 6 of the line); "
                                          "expected UTF-8 text (byte 0xe9 is 'é'")
    assert q.iloc[0]["reason"].endswith("(CSV line 3, column 'instruction')")


def test_windows_1252_quote_hint(tmp_path: Path) -> None:
    f = tmp_path / "cp1252.jsonl"
    f.write_bytes(b'{"instruction": "It\x92s?", "output": "yes"}\n{"instruction": "q", "output": "a"}\n')
    _, df, q = _run(tmp_path, f, max_quarantine_fraction=0.5)
    assert len(df) == 1 and "byte 0x92 is '\u2019' in Windows-1252/Latin-1" in q.iloc[0]["reason"]


# --------------------------------------------------------------------------- BOM, CRLF, truncation
@pytest.mark.parametrize("kind", ["json", "jsonl", "csv"])
def test_utf8_bom_and_crlf(tmp_path: Path, kind: str) -> None:
    f = tmp_path / f"crlf.{kind}"
    f.write_bytes(codecs.BOM_UTF8 + _text(kind, newline="\r\n").encode("utf-8"))
    res, df, q = _run(tmp_path, f)
    assert len(q) == 0 and _pairs(df) == WANT  # no U+FEFF glued to the first key, no '\r' in any text
    assert load_records(f).encoding == "utf-8"


def test_crlf_inside_a_quoted_csv_field_is_kept(tmp_path: Path) -> None:
    f = tmp_path / "multi.csv"
    f.write_bytes(b'instruction,output\r\n"Line one\r\nline two",ok\r\nq,a\r\n')
    _, df, q = _run(tmp_path, f)
    assert len(q) == 0 and _pairs(df) == [("Line one\r\nline two", "ok"), ("q", "a")]


def test_truncated_last_jsonl_line(tmp_path: Path) -> None:
    f = tmp_path / "cut.jsonl"
    full = _text("jsonl").encode("utf-8")
    f.write_bytes(full[: len(full) - 25])  # the last record cut mid-string, no final newline
    res, df, q = _run(tmp_path, f)
    assert len(df) == 19 and list(q["row"]) == [20]
    assert q.iloc[0]["reason"].startswith("malformed JSON: Unterminated string starting at column ")
    assert q.iloc[0]["reason"].endswith("(the last line has no line end: the file looks truncated)")
    # A malformed line that is not the last one gets no such note.
    g = tmp_path / "mid.jsonl"
    g.write_bytes(b'{"instruction": "q", "output": "a\n{"instruction": "q2", "output": "a2"}\n')
    _, df, q = _run(tmp_path, g, max_quarantine_fraction=0.5)
    assert len(df) == 1 and "truncated" not in q.iloc[0]["reason"]


# --------------------------------------------------------------------------- plain text (corpus text_lines)
LINES = ["The Danube flows through ten countries.", "Der Donaudampfschiffahrtskapitän grüßt.", "長江は中国最長の川です。 🌊"]


@pytest.mark.parametrize("codec,bom", [("utf-8", b""), ("utf-8", codecs.BOM_UTF8)]
                         + [(c, b) for c in BOMS for b in (BOMS[c], b"")])
def test_text_lines_corpus_in_any_unicode_encoding(tmp_path: Path, codec: str, bom: bytes) -> None:
    from sftflow.augment.corpus import documents

    f = tmp_path / "corpus.txt"
    f.write_bytes(bom + "\r\n".join(LINES * 300).encode(codec) + "\r\n".encode(codec))  # UTF-16/32: longer than the 64 KiB sniffed
    got = [text.rstrip("\r\n") for _, text in documents(f, "text_lines", "text")]
    assert got == LINES * 300  # no NUL bytes, no U+FEFF glued to the first line

"""Source formats (sftflow.data.formats): one converter per format, one entry point for any reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftflow.data.format_rows import RowError
from sftflow.data.formats import FORMATS, convert_row, detect_format, load_records
from sftflow.data.readers import IngestError


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_sharegpt_aliases_and_every_turn_are_kept(tmp_path: Path) -> None:
    row = {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"},
                             {"from": "human", "value": "How are you?"},
                             {"from": "gpt", "value": [{"type": "text", "text": "Fine."}]}]}
    got = load_records(_jsonl(tmp_path / "s.jsonl", [row]))
    assert got.format == "messages" and got.detected and got.read == 1 and not got.rejected
    assert got.records[0].messages == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}]
    assert len(got.sha256) == 64


def test_human_assistant_keeps_every_turn(tmp_path: Path) -> None:
    text = "### Human: one ### Assistant: uno ### Human: two ### Assistant: dos"
    got = load_records(_jsonl(tmp_path / "h.jsonl", [{"text": text}]), format="human_assistant")
    assert [m["content"] for m in got.records[0].messages] == ["one", "uno", "two", "dos"]


def test_alpaca_eval_alias_dolly_category_and_self_instruct_instances(tmp_path: Path) -> None:
    got = load_records(_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "output": "hi"}]), format="alpaca_eval")
    assert got.format == "alpaca" and got.records[0].messages[-1] == {"role": "assistant", "content": "hi"}
    dolly = load_records(_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Q?", "context": "ctx", "response": "A.", "category": "open_qa"}]))
    assert dolly.records[0].category == "open_qa" and dolly.records[0].messages[0]["content"] == "Q?\n\nctx"
    si = load_records(_jsonl(tmp_path / "si.jsonl", [
        {"instruction": "Add", "instances": [{"input": "1+1", "output": "2"}, {"input": "x"}]}]))
    assert si.format == "self_instruct" and si.read == 2
    assert [r.row for r in si.records] == [1] and si.rejected[0].reason == "instance 1: missing required field 'output'"


def test_bad_rows_come_back_with_reasons_not_exceptions(tmp_path: Path) -> None:
    rows = [{"instruction": "ok", "output": "fine"}, {"instruction": "no answer"},
            {"instruction": "   ", "output": "x"}, {"messages": [{"role": "wizard", "content": "?"}]}]
    got = load_records(_jsonl(tmp_path / "b.jsonl", rows), format="auto")
    assert got.format == "alpaca" and got.read == 4 and len(got.records) == 1
    reasons = [r.reason for r in got.rejected]
    assert reasons[0] == "missing required field 'output'"
    assert reasons[1].startswith("empty instruction")
    assert [r.row for r in got.rejected] == [2, 3, 4]
    assert json.loads(got.rejected[0].raw) == rows[1]


def test_file_errors_name_the_file_and_the_config_entry(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"missing.jsonl: file not found \(evaluation.extra_sets\[x\]\)"):
        load_records(tmp_path / "missing.jsonl", where="evaluation.extra_sets[x]")
    odd = _jsonl(tmp_path / "odd.jsonl", [{"question": "?", "answer": "!"}])
    with pytest.raises(IngestError, match=r"unknown format .*in evaluation.extra_sets\[x\]\."):
        load_records(odd, where="evaluation.extra_sets[x]")
    with pytest.raises(ValueError, match="unknown format 'yaml'"):
        load_records(odd, format="yaml")


def test_convert_row_and_detection() -> None:
    assert convert_row({"instruction": "a", "output": "b"}, "alpaca") == [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
    [err] = convert_row({"instruction": "a", "output": "b" * 50}, "alpaca", max_record_chars=10)
    assert isinstance(err, RowError) and "record too long" in str(err)
    assert detect_format([{"instruction": "a", "response": "b"}] * 3 + [{"text": "x"}]) == "dolly"
    assert detect_format([{"q": 1}]) is None
    assert set(FORMATS) == {"alpaca", "dolly", "human_assistant", "messages", "self_instruct", "gsm8k"}

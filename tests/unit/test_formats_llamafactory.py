"""LLaMA-Factory's own demo sets, read as they are (issue 22, class 8).

Fixtures (``tests/fixtures/llamafactory``, see its README): the whole ``reason_tool_use_demo_50.jsonl``
(assistant turns made of ``reasoning`` + ``tool_call`` content parts) and the first 20 rows of
``v1_sft_demo.jsonl`` (per-turn ``loss_weight``).

* ``tool_call`` parts become the canonical ``tool_calls`` (the same shape as ShareGPT
  ``function_call`` turns, e.g. glaive); ``reasoning`` parts are kept as ``<think>…</think>`` in
  the assistant content (``reasoning: drop`` drops them);
* ``loss_weight`` 0 on an assistant turn survives ingestion, validation and Parquet into the
  canonical record and gives that turn's tokens label -100 in training; 1 is the default; any
  other value is refused naming the row and turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config_sections import IngestConfig, SourceConfig, ValidationConfig
from sftflow.data.formats import load_records
from sftflow.data.records import frame_to_records, make_record, records_to_frame
from sftflow.data.refs import write_parquet
from sftflow.inference.formatting import IGNORE_INDEX, encode_for_training, resolve_template
from tasks.ingest import ingest
from tasks.validate import validate

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "llamafactory"
REASON_TOOL_USE = FIXTURES / "reason_tool_use_demo_50.jsonl"
V1_SFT = FIXTURES / "v1_sft_demo_20.jsonl"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _ingest(tmp_path: Path, f: Path, **src) -> tuple:
    res = ingest(sources=[SourceConfig(name="lf", path=str(f), **src)], cfg=IngestConfig(max_quarantine_fraction=1.0),
                 out_dir=tmp_path / "ingest")
    c = res.counts[0]
    assert c.read == c.kept + c.quarantined
    return res, res.dataset.read(), pd.read_parquet(res.quarantine.path)


@pytest.fixture(scope="module")
def tiny_toks(tiny_models_home: Path):
    """Tokenizers of both tiny models (gemma: built-in template; chatml: native chat template)."""
    from transformers import AutoTokenizer

    from sftflow.inference.tiny import build_tiny_model

    mp = pytest.MonkeyPatch()
    mp.setenv("SFTFLOW_HOME", str(tiny_models_home))
    try:
        return {n: AutoTokenizer.from_pretrained(build_tiny_model(n).path) for n in ("tiny-gemma", "tiny-chatml")}
    finally:
        mp.undo()


# --------------------------------------------------------------------------- reason_tool_use
def test_reason_tool_use_all_50_kept_and_valid(tmp_path: Path) -> None:
    res, df, q = _ingest(tmp_path, REASON_TOOL_USE)
    c = res.counts[0]
    assert (c.read, c.kept, c.quarantined) == (50, 50, 0) and c.unknown_keys == ()
    raw = [json.loads(line) for line in REASON_TOOL_USE.read_text().splitlines()]
    n_calls = 0
    for row, rec in zip(raw, frame_to_records(df)):
        assert len(rec["messages"]) == len(row["messages"])
        assert [t["name"] for t in json.loads(rec["tools"] or "[]")] == [
            t["function"]["name"] for t in json.loads(row["tools"] or "[]")]
        for turn, m in zip(row["messages"], rec["messages"]):
            parts = {p["type"]: [] for p in turn["content"]}
            for p in turn["content"]:
                parts[p["type"]].append(p["value"])
            assert m["role"] == turn["role"]
            if "tool_call" in parts:  # the canonical shape: [{"name", "arguments": {...}}], in order
                want = [json.loads(v) for v in parts["tool_call"]]
                assert json.loads(m["tool_calls"]) == [{"name": w["name"], "arguments": w["arguments"]} for w in want]
                n_calls += len(want)
            else:
                assert "tool_calls" not in m
            if "reasoning" in parts:  # kept as chain-of-thought before the answer
                assert m["content"].startswith("<think>\n" + parts["reasoning"][0].strip() + "\n</think>")
                assert m["content"].endswith("</think>" if "text" not in parts else parts["text"][0].strip())
    assert n_calls == 41 + 9 * 2 + 3 * 3
    tools = json.loads(df.iloc[0]["tools"])
    assert {t["name"] for t in tools} == {"get_device_asset_by_identifier", "getwebsite", "user_by_id"}
    val = validate(dataset=res.dataset, cfg=ValidationConfig(), out_dir=tmp_path / "validate")
    assert val.valid.num_rows == 50 and val.quarantine.num_rows == 0


def test_reason_tool_use_reasoning_drop(tmp_path: Path) -> None:
    got = load_records(REASON_TOOL_USE, reasoning="drop")
    assert got.read == 50 and not got.rejected
    turns = [m for r in got.records for m in r.messages if m["role"] == "assistant"]
    assert not any("<think>" in m["content"] for m in turns)
    assert sum(1 for m in turns if m.get("tool_calls") and m["content"] == "") == 41 + 9 + 3


def test_tool_call_parts_and_function_call_turns_share_one_shape() -> None:
    call = {"name": "get_movie_details", "arguments": {"title": "Inception"}}
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "value": "Inception?"}]},
                          {"role": "assistant", "content": [{"type": "tool_call", "value": json.dumps(call)}]},
                          {"role": "tool", "content": [{"type": "text", "value": "{\"rating\": 8.8}"}]},
                          {"role": "assistant", "content": [{"type": "text", "value": "Rated 8.8."}]}]}
    sharegpt = {"conversations": [{"from": "human", "value": "Inception?"},
                                  {"from": "function_call", "value": json.dumps(call)},
                                  {"from": "observation", "value": "{\"rating\": 8.8}"},
                                  {"from": "gpt", "value": "Rated 8.8."}]}
    from sftflow.data.formats import convert_row

    a, b = convert_row(parts, "messages"), convert_row(sharegpt, "messages")
    assert a == b and json.loads(a[0][1]["tool_calls"]) == [call]
    assert make_record(a[0], source="x:y")["id"] == make_record(b[0], source="x:y")["id"]


def test_tool_call_part_outside_an_assistant_turn_is_refused(tmp_path: Path) -> None:
    bad = {"messages": [{"role": "user", "content": [{"type": "tool_call", "value": "{\"name\": \"f\"}"}]},
                        {"role": "assistant", "content": "a"}]}
    nameless = {"messages": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": [{"type": "tool_call", "value": "{\"arguments\": {}}"}]},
                             {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]}
    got = load_records(_jsonl(tmp_path / "bad.jsonl", [bad, nameless]))
    assert [r.reason for r in got.rejected] == [
        "turn 0: a tool_call part is only allowed in an assistant turn (got a user turn)",
        "turn 1: tool call 0 needs a string `name`, got dict"]


# --------------------------------------------------------------------------- v1 loss_weight
def test_v1_sft_defaults_are_read_not_ignored(tmp_path: Path) -> None:
    res, df, q = _ingest(tmp_path, V1_SFT)
    c = res.counts[0]
    assert (c.read, c.kept, c.quarantined) == (20, 20, 0) and c.unknown_keys == ()  # no "ignored" warning
    # 0 on user turns and 1 on assistant turns are the defaults: the records are those without weights.
    plain = [{"messages": [{k: v for k, v in t.items() if k != "loss_weight"} for t in json.loads(line)["messages"]]}
             for line in V1_SFT.read_text().splitlines()]
    res2, df2, _ = _ingest(tmp_path / "plain", _jsonl(tmp_path / "plain.jsonl", plain))
    assert list(df["id"]) == list(df2["id"])
    assert all("loss_weight" not in m for rec in frame_to_records(df) for m in rec["messages"])


def _weighted_rows() -> list[dict]:
    rows = [json.loads(line) for line in V1_SFT.read_text().splitlines()[:4]]
    # Row 1 becomes a two-exchange conversation whose first answer is context only (two answers
    # that share no text, so the learned text tells them apart).
    first, second = rows[3]["messages"], rows[0]["messages"]
    rows[0]["messages"] = [first[0], {**first[1], "loss_weight": 0.0}, second[0], second[1]]
    return rows


def test_loss_weight_zero_survives_into_the_canonical_record(tmp_path: Path) -> None:
    res, df, q = _ingest(tmp_path, _jsonl(tmp_path / "w.jsonl", _weighted_rows()))
    assert (res.counts[0].kept, len(q)) == (4, 0)
    recs = frame_to_records(df)
    assert [m.get("loss_weight") for m in recs[0]["messages"]] == [None, 0.0, None, None]
    assert all("loss_weight" not in m for r in recs[1:] for m in r["messages"])
    # The weight is part of what the example is: the same text learned on both answers is another id.
    unweighted = [{k: v for k, v in m.items() if k != "loss_weight"} for m in recs[0]["messages"]]
    assert make_record(unweighted, source="x:y")["id"] != recs[0]["id"]
    val = validate(dataset=res.dataset, cfg=ValidationConfig(), out_dir=tmp_path / "validate")
    assert val.valid.num_rows == 4 and val.quarantine.num_rows == 0
    assert [m.get("loss_weight") for m in frame_to_records(val.valid.read())[0]["messages"]] == [None, 0.0, None, None]


@pytest.mark.parametrize("name,template", [("tiny-gemma", "gemma"), ("tiny-chatml", "native"), ("tiny-chatml", "chatml")])
def test_loss_weight_zero_turn_gets_no_labels(tmp_path: Path, tiny_toks, name: str, template: str) -> None:
    from sftflow.training.data import encode_records

    tok = tiny_toks[name]
    _, df, _ = _ingest(tmp_path, _jsonl(tmp_path / "w.jsonl", _weighted_rows()))
    rec = frame_to_records(df)[0]  # read back from Parquet, as training reads it
    enc = encode_records([rec], tok, template=resolve_template(tok, template), max_seq_len=4096)
    ids, labels = enc.rows[0]
    learned = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    first, second = rec["messages"][1]["content"], rec["messages"][3]["content"]
    assert second in learned and first not in learned
    # Without the weight both answers are learned, on the very same token ids.
    plain = [{k: v for k, v in m.items() if k != "loss_weight"} for m in rec["messages"]]
    ids2, labels2 = encode_for_training(tok, plain, template=resolve_template(tok, template))
    assert ids2 == ids and first in tok.decode([i for i, lab in zip(ids2, labels2) if lab != IGNORE_INDEX])
    assert sum(lab != IGNORE_INDEX for lab in labels) < sum(lab != IGNORE_INDEX for lab in labels2)


def test_loss_weight_zero_on_a_tool_call_turn(tiny_toks) -> None:
    tok = tiny_toks["tiny-gemma"]
    call = json.dumps([{"name": "lookup", "arguments": {"q": "x"}}])
    msgs = [{"role": "user", "content": "Look x up."},
            {"role": "assistant", "content": "", "tool_calls": call, "loss_weight": 0.0},
            {"role": "tool", "content": "x is 42"}, {"role": "assistant", "content": "It is 42."}]
    ids, labels = encode_for_training(tok, msgs, template="gemma")
    learned = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert "It is 42." in learned and "lookup" not in learned


@pytest.mark.parametrize("weights,reason", [
    ((0.0, 0.5), "turn 1: loss_weight 0.5 is not supported (expected 0 = no loss on this turn or 1 = learned; "
                 "whole turns are masked, weights in between cannot be honoured)"),
    ((1.0, 1.0), "turn 0: loss_weight 1.0 on a user turn: only assistant turns are learned (expected 0 or no "
                 "loss_weight on it)"),
    ((0.0, 0.0), "every assistant turn has loss_weight 0: the conversation has nothing to learn (give at least "
                 "one assistant turn loss_weight 1)"),
    ((0.0, "1"), "turn 1: loss_weight '1' is not supported (expected 0 = no loss on this turn or 1 = learned; "
                 "whole turns are masked, weights in between cannot be honoured)"),
    ((0.0, True), "turn 1: loss_weight True is not supported (expected 0 = no loss on this turn or 1 = learned; "
                  "whole turns are masked, weights in between cannot be honoured)"),
])
def test_unsupported_loss_weights_are_refused_with_row_and_turn(tmp_path: Path, weights, reason: str) -> None:
    rows = [json.loads(line) for line in V1_SFT.read_text().splitlines()[:3]]
    for t, w in zip(rows[1]["messages"], weights):
        t["loss_weight"] = w
    res, df, q = _ingest(tmp_path, _jsonl(tmp_path / "w.jsonl", rows))
    assert len(df) == 2 and list(q["row"]) == [2] and list(q["reason"]) == [reason]


def test_validation_and_encoding_refuse_bad_weights_from_elsewhere(tmp_path: Path, tiny_toks) -> None:
    # Records written by other code (not ingestion) get the same rules from the GX suite and the encoder.
    good = make_record([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], source="x:y")
    half = make_record([{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "loss_weight": 0.5}],
                       source="x:y")
    none = make_record([{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3", "loss_weight": 0}],
                       source="x:y")
    ref = write_parquet(records_to_frame([good, half, none]), tmp_path / "in.parquet", name="in")
    val = validate(dataset=ref, cfg=ValidationConfig(max_suite_failure_fraction=1.0), out_dir=tmp_path / "v")
    q = pd.read_parquet(val.quarantine.path)
    assert list(q["row"]) == [2, 3] and val.valid.num_rows == 1
    assert all(r.startswith("expect_column_values_to_be_in_set(messages_shape in ['ok'])") for r in q["reason"])
    tok = tiny_toks["tiny-gemma"]
    with pytest.raises(ValueError, match=r"messages\[1\]\.loss_weight: expected 0 or 1, got 0.5"):
        encode_for_training(tok, half["messages"], template="gemma")
    with pytest.raises(ValueError, match="every assistant turn has loss_weight 0"):
        encode_for_training(tok, none["messages"], template="gemma")


def test_weights_and_tool_calls_survive_sharded_validation(tmp_path: Path) -> None:
    # Shards of 2 rows: the first holds only plain turns (no tool_calls / loss_weight fields of its own).
    from sftflow.engine import LocalEngine

    plain = [make_record([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                         source="x:y") for i in range(3)]
    weighted = make_record([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_weight": 0},
                            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}], source="x:y")
    call = make_record([{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "tool_calls": json.dumps([{"name": "f", "arguments": {}}])},
                        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "b"}], source="x:y")
    ref = write_parquet(records_to_frame(plain + [weighted, call]), tmp_path / "in.parquet", name="in")
    res = validate(dataset=ref, cfg=ValidationConfig(), out_dir=tmp_path / "v", engine=LocalEngine(shard_rows=2))
    got = frame_to_records(res.valid.read())
    assert [r["id"] for r in got] == [r["id"] for r in plain + [weighted, call]]
    assert [m.get("loss_weight") for m in got[3]["messages"]] == [None, 0.0, None, None]
    assert got[4]["messages"][1]["tool_calls"] == call["messages"][1]["tool_calls"]

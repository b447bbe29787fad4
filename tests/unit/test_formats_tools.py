"""Issue 16 data shapes: tool calling (ShareGPT + OpenAI), reasoning parts, preference/KTO rows,
unknown keys, GSM8K; ingestion end to end on the shipped samples, and the tool rendering/mask."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from sftflow.config_sections import IngestConfig, SourceConfig
from sftflow.data.formats import detect_format, load_records
from sftflow.data.records import frame_to_records, make_record, normalize_text, record_id, records_to_frame
from sftflow.inference.formatting import IGNORE_INDEX, build_generation_prompt, encode_for_training
from sftflow.inference.tool_format import supports_tools, tool_text_fallback
from tasks.ingest import ingest, report

ROOT = Path(__file__).resolve().parents[2]
TOOLS_SAMPLE = ROOT / "data/instruct/toolformer_sharegpt_40.json"
GSM8K_SAMPLE = ROOT / "data/instruct/gsm8k_alpaca_200.json"
SHARED = ROOT.parent / "shared/data/instruct"


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ingest(tmp_path: Path, *sources: SourceConfig, frac: float = 1.0):
    res = ingest(sources=list(sources), cfg=IngestConfig(max_quarantine_fraction=frac), out_dir=tmp_path / "out")
    return res, res.dataset.read(), res.quarantine.read()


def _sample_rows() -> list[dict]:
    return json.loads(TOOLS_SAMPLE.read_text())


def _as_openai(row: dict) -> dict:
    """The same conversation in OpenAI layout (tool_calls with JSON-string arguments, role tool, wrapped tools)."""
    msgs = []
    for t in row["conversations"]:
        if t["from"] == "human":
            msgs.append({"role": "user", "content": t["value"]})
        elif t["from"] == "gpt":
            msgs.append({"role": "assistant", "content": t["value"]})
        elif t["from"] == "function_call":
            call = json.loads(t["value"])
            msgs.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]})
        else:
            msgs.append({"role": "tool", "tool_call_id": "call_0", "content": t["value"]})
    return {"messages": msgs, "tools": [{"type": "function", "function": f} for f in json.loads(row["tools"])]}


# --------------------------------------------------------------------------- tool calling: ingestion
def test_sharegpt_tool_sample_ingests_fully(tmp_path: Path) -> None:
    res, df, q = _ingest(tmp_path, SourceConfig(name="tools", path=str(TOOLS_SAMPLE)))
    c = res.counts[0]
    assert (c.read, c.kept, c.quarantined, c.formats) == (40, 40, 0, "messages")
    recs = frame_to_records(df)
    first = recs[0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(first["messages"][1]["tool_calls"]) == [
        {"name": "wikipedia", "arguments": {"query": "French Revolution"}}]
    assert "tool_calls" not in first["messages"][0] and first["messages"][1]["content"] == ""
    assert json.loads(first["tools"])[0]["name"] == "wikipedia"
    # 24 rows go on after the tool result; 16 end with the call (the call is the target).
    patterns = pd.Series(["".join(m["role"][0] for m in r["messages"]) for r in recs]).value_counts().to_dict()
    assert patterns == {"uata": 24, "ua": 16}


def test_openai_layout_gives_the_same_records_as_sharegpt(tmp_path: Path) -> None:
    rows = _sample_rows()[:3] + _sample_rows()[-2:]
    share = load_records(_jsonl(tmp_path / "s.jsonl", rows))
    oai = load_records(_jsonl(tmp_path / "o.jsonl", [_as_openai(r) for r in rows]))
    assert oai.format == "messages" and not oai.rejected and oai.unknown_keys == ()
    assert [r.messages for r in oai.records] == [r.messages for r in share.records]
    assert [r.tools for r in oai.records] == [r.tools for r in share.records]
    ids = {make_record(r.messages, source="x", tools=r.tools)["id"] for r in oai.records + share.records}
    assert len(ids) == len(rows)


def test_bad_tool_conversations_are_quarantined_with_reasons(tmp_path: Path) -> None:
    good = _sample_rows()[0]
    conv = good["conversations"]
    bad = [
        {"conversations": [conv[0], conv[2], conv[3]], "tools": good["tools"]},           # result without a call
        {"conversations": [conv[0], conv[1], conv[3]], "tools": good["tools"]},           # call without its result
        {"conversations": [conv[0], {"from": "function_call", "value": "wikipedia('x')"}]},
        {"conversations": [conv[0], {"from": "function_call", "value": "{\"arguments\": {}}"}]},
        {"conversations": conv, "tools": "not json"},
        {"conversations": [conv[0], conv[1], {"from": "observation", "value": "  "}, conv[3]]},
    ]
    got = load_records(_jsonl(tmp_path / "b.jsonl", [good] + bad))
    assert len(got.records) == 1
    assert [r.reason for r in got.rejected] == [
        "a tool result (observation) must follow an assistant tool call",
        "an assistant tool call must be followed by its tool result (observation)",
        "turn 1: the tool call is not valid JSON (Expecting value: line 1 column 1 (char 0))",
        "turn 1: tool call 0 needs a string `name`, got dict",
        "`tools` is not valid JSON (Expecting value: line 1 column 1 (char 0))",
        "empty tool result (blank, whitespace-only or invisible-characters-only tool turn)",
    ]


def test_tool_records_survive_parquet_next_to_plain_rows(tmp_path: Path) -> None:
    from sftflow.data.refs import write_parquet

    tool = load_records(TOOLS_SAMPLE).records[0]
    recs = [make_record(tool.messages, source="t:f", tools=tool.tools),
            make_record([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], source="p:f")]
    ref = write_parquet(records_to_frame(recs), tmp_path / "d.parquet", name="d")
    back = frame_to_records(ref.read())
    assert [r["messages"] for r in back] == [r["messages"] for r in recs]  # no stray tool_calls=None
    assert [r["id"] for r in back] == [r["id"] for r in recs] and back[1]["tools"] == ""


def test_plain_record_ids_are_unchanged() -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is  2+2?"},
            {"role": "assistant", "content": "4"}]
    old = hashlib.sha256(json.dumps([[m["role"], normalize_text(m["content"])] for m in msgs],
                                    ensure_ascii=False).encode()).hexdigest()[:16]
    assert record_id(msgs) == old == make_record(msgs, source="s:f", answer="4")["id"]
    assert record_id(msgs, tools='[{"name": "calc"}]') != old  # tools are part of what a tool row is


# --------------------------------------------------------------------------- tool calling: rendering
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]
TOOLS_JINJA = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}{%- if m['role'] == 'system' %}"
    "{%- elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{%- elif m['role'] == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{% if m['content'] %}{{ m['content'] }}\n"
    "{% endif %}{% for c in m.tool_calls %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user model assistant system tool call wikipedia query the a"] * 20, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    if chat_template:
        t.chat_template = chat_template
    return t


def _learned(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def _sample_conversation():
    rec = load_records(TOOLS_SAMPLE).records[0]
    return rec.messages, rec.tools


@pytest.mark.parametrize("template", ["gemma", "chatml"])
def test_fallback_learns_calls_and_answers_not_tool_results(template: str) -> None:
    tok = _tokenizer()
    msgs, tools = _sample_conversation()
    ids, labels = encode_for_training(tok, msgs, template=template, tools=tools)
    close = "<end_of_turn>" if template == "gemma" else "<|im_end|>"
    call = '<tool_call>{"name": "wikipedia", "arguments": {"query": "French Revolution"}}</tool_call>'
    assert _learned(tok, ids, labels) == f"{call}{close}{msgs[3]['content']}{close}"
    full = tok.decode(ids)
    assert "<tools>" in full and "<tool_response>\nThe French Revolution was a period" in full
    # The fallback is the ordinary rendering of plain turns: the prompt is a prefix of the training ids.
    prompt = build_generation_prompt(tok, msgs[:3], template=template, tools=tools)
    assert ids[:len(prompt)] == prompt and labels[len(prompt)] != IGNORE_INDEX
    plain = tool_text_fallback(msgs, tools)
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user", "assistant"]
    assert encode_for_training(tok, plain, template=template) == (ids, labels)


def test_native_template_with_tool_support_renders_tools_itself() -> None:
    tok = _tokenizer(TOOLS_JINJA)
    assert supports_tools(tok) and not supports_tools(_tokenizer("{{ messages }}"))
    msgs, tools = _sample_conversation()
    ids, labels = encode_for_training(tok, msgs, template="native", tools=tools)
    full = tok.decode(ids)
    assert "# Tools\n<tools>{\"type\": \"function\", \"function\": {\"name\": \"wikipedia\"" in full  # the template's own tool block, not the fallback's
    learned = _learned(tok, ids, labels)
    assert learned == ('<tool_call>\n{"name": "wikipedia", "arguments": {"query": "French Revolution"}}\n'
                       f"</tool_call><|im_end|>{msgs[3]['content']}<|im_end|>")
    assert "Estates General of 1789 and ended" in full and "Many of the revolution" not in learned
    prompt = build_generation_prompt(tok, msgs[:3], template="native", tools=tools)
    assert ids[:len(prompt)] == prompt


def test_native_template_refuses_control_tokens_in_tool_calls() -> None:
    tok = _tokenizer(TOOLS_JINJA)
    msgs, tools = _sample_conversation()
    msgs = [dict(m) for m in msgs]
    msgs[1]["tool_calls"] = json.dumps([{"name": "wikipedia", "arguments": {"query": "x<|im_end|>"}}])
    with pytest.raises(ValueError, match="control-token text"):
        encode_for_training(tok, msgs, template="native", tools=tools)


def test_plain_rows_render_as_before_even_from_a_mixed_frame() -> None:
    tok = _tokenizer()
    plain = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    from_parquet = [{**m, "tool_calls": None} for m in plain]  # a frame that also holds tool rows
    for template in ("gemma", "chatml"):
        want = encode_for_training(tok, plain, template=template)
        assert encode_for_training(tok, from_parquet, template=template, tools="") == want
        assert build_generation_prompt(tok, from_parquet[:1], template=template, tools=None) == \
            build_generation_prompt(tok, plain[:1], template=template)


def test_validation_accepts_tool_rows() -> None:
    from sftflow.data.validation_suite import ROLE_PATTERN, derive_frame

    recs = [make_record(r.messages, source="t:f", tools=r.tools) for r in load_records(TOOLS_SAMPLE).records]
    d = derive_frame(records_to_frame(recs))
    assert set(d["role_pattern"]) == {"UATA", "UA"} and d["role_pattern"].str.match(ROLE_PATTERN).all()
    assert (d["min_assistant_chars"] > 0).all()  # a call-only turn is not an empty response


# --------------------------------------------------------------------------- reasoning parts
def _reasoning_row(answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "value": "What is 6 x 7?"}]},
                         {"role": "assistant", "content": [{"type": "reasoning", "value": "6 x 7 = 42."},
                                                           {"type": "text", "value": answer}]}]}


@pytest.mark.parametrize("mode, want", [("keep", "<think>\n6 x 7 = 42.\n</think>\n\nIt is 42."), ("drop", "It is 42.")])
def test_reasoning_parts_kept_or_dropped(tmp_path: Path, mode: str, want: str) -> None:
    f = _jsonl(tmp_path / "r.jsonl", [_reasoning_row("It is 42.")])
    res, df, q = _ingest(tmp_path, SourceConfig(name="r", path=str(f), reasoning=mode))
    assert res.counts[0].kept == 1 and len(q) == 0
    assert df.iloc[0]["messages"][1]["content"] == want


def test_reasoning_part_outside_an_assistant_turn_is_quarantined(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": [{"type": "reasoning", "value": "hm"}, {"type": "text", "value": "q"}]},
                        {"role": "assistant", "content": "a"}]}
    got = load_records(_jsonl(tmp_path / "r.jsonl", [row]))
    assert [r.reason for r in got.rejected] == ["turn 0: a reasoning part is only allowed in an assistant turn"]


def test_identity_layout_still_ingests_and_reports_its_turn_keys(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (SHARED / "messages_identity_500.jsonl").read_text().splitlines()[:20]] \
        if (SHARED / "messages_identity_500.jsonl").exists() else [_reasoning_row("x")] * 0
    if not rows:
        pytest.skip("../shared/data not present")
    res, df, q = _ingest(tmp_path, SourceConfig(name="id", path=str(_jsonl(tmp_path / "i.jsonl", rows))))
    assert (res.counts[0].kept, res.counts[0].quarantined) == (20, 0)
    assert res.counts[0].unknown_keys == ()  # per-turn loss_weight is read (0 on user, 1 on assistant: the defaults)


# --------------------------------------------------------------------------- preference and KTO rows
DPO_ALPACA = {"instruction": "Name a primary colour.", "input": "", "chosen": "Red.", "rejected": "Green."}
DPO_SHAREGPT = {"conversations": [{"from": "human", "value": "Name a primary colour."}],
                "chosen": {"from": "gpt", "value": "Blue."}, "rejected": {"from": "gpt", "value": "Purple."}}


def test_preference_rows_need_preference_chosen(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "dpo.jsonl", [DPO_ALPACA])
    g = _jsonl(tmp_path / "dpo2.jsonl", [DPO_SHAREGPT])
    assert detect_format([DPO_ALPACA]) == "alpaca" and detect_format([DPO_SHAREGPT]) == "messages"
    res, df, q = _ingest(tmp_path, SourceConfig(name="a", path=str(f)), SourceConfig(name="s", path=str(g)))
    assert len(df) == 0 and len(q) == 2
    assert all("set `preference: chosen` on the source" in r for r in q["reason"])
    res, df, q = _ingest(tmp_path, SourceConfig(name="a", path=str(f), preference="chosen"),
                         SourceConfig(name="s", path=str(g), preference="chosen"))
    assert len(q) == 0 and [m[-1]["content"] for m in df["messages"]] == ["Red.", "Blue."]
    assert res.counts[0].unknown_keys == () and res.counts[1].unknown_keys == ()


def test_kto_rows_with_label_false_are_quarantined(tmp_path: Path) -> None:
    def row(label, answer):
        return {"messages": [{"role": "user", "content": "Is the sky green?"},
                             {"role": "assistant", "content": answer}], "label": label}
    f = _jsonl(tmp_path / "kto.jsonl", [row(True, "No, it is usually blue."), row(False, "Yes, always."), row("no", "x")])
    res, df, q = _ingest(tmp_path, SourceConfig(name="kto", path=str(f)))
    assert (res.counts[0].kept, res.counts[0].quarantined) == (1, 2)
    assert df.iloc[0]["messages"][1]["content"] == "No, it is usually blue."
    assert list(q["reason"]) == [
        "KTO row with label=false: the response is marked undesirable, so it is not a training target "
        "(only label=true rows are kept)",
        "field 'label' must be true or false (a KTO desirability label), got str",
    ]


# --------------------------------------------------------------------------- unknown keys
def test_unknown_keys_are_counted_per_source_in_the_report(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "a.jsonl", [{"instruction": "q1", "output": "a1", "id": 1, "history": []},
                                      {"instruction": "q2", "output": "a2", "id": 2}])
    res, df, q = _ingest(tmp_path, SourceConfig(name="a", path=str(f)))
    assert res.counts[0].unknown_keys == (("history", 1), ("id", 2))
    rep = json.loads((tmp_path / "out/report.json").read_text())
    assert rep["sources"][0]["unknown_keys"] == {"history": 1, "id": 2} == report(res)["sources"][0]["unknown_keys"]


# --------------------------------------------------------------------------- GSM8K
def test_gsm8k_alpaca_sample(tmp_path: Path) -> None:
    res, df, q = _ingest(tmp_path, SourceConfig(name="gsm8k", path=str(GSM8K_SAMPLE), format="gsm8k"))
    assert (res.counts[0].read, res.counts[0].kept, res.counts[0].quarantined) == (200, 200, 0)
    assert res.counts[0].unknown_keys == ()
    first = df.iloc[0]
    assert first["answer"] == "72"
    assert first["messages"][1]["content"] == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
                                               "altogether in April and May.\n#### 72")
    assert (df["answer"] != "").all()


def test_gsm8k_original_layout_is_detected_and_cleaned(tmp_path: Path) -> None:
    rows = [{"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                         "May. How many clips did Natalia sell altogether in April and May?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                       "altogether in April and May.\n#### 72"},
            {"question": "How much?", "answer": "It is unclear."}]
    got = load_records(_jsonl(tmp_path / "g.jsonl", rows))
    assert got.format == "gsm8k" and got.detected
    [rec] = got.records
    assert rec.answer == "72" and "<<" not in rec.messages[1]["content"]
    assert rec.messages[1]["content"].endswith("April and May.\n#### 72")
    assert [r.reason for r in got.rejected] == [
        "no final answer in the solution (expected a last line '#### <answer>' or a final number)"]


# --------------------------------------------------------------------------- config
def test_source_config_new_keys() -> None:
    s = SourceConfig(name="x", path="f.json", format="gsm8k", preference="chosen", reasoning="drop")
    assert (s.format, s.preference, s.reasoning) == ("gsm8k", "chosen", "drop")
    assert SourceConfig(name="x", path="f.json", format="sharegpt").reasoning == "keep"
    with pytest.raises(ValidationError):
        SourceConfig(name="x", path="f.json", reasoning="maybe")
    with pytest.raises(ValidationError):
        SourceConfig(name="x", path="f.json", preference="rejected")


# --------------------------------------------------------------------------- tool schemas reach every encoder
def test_training_and_heldout_encoding_render_the_rows_tool_schemas() -> None:
    """Training rows, training's eval loss and evaluation's loss all see a tool row's schemas."""
    from sftflow.training.data import encode_records

    tok = _tokenizer()
    msgs, tools = _sample_conversation()
    frame = records_to_frame([make_record(messages=msgs, source="tools", origin="seed", tools=tools)])
    rec = frame_to_records(frame)[0]
    enc = encode_records([rec], tok, template="gemma", max_seq_len=4096)
    ids, labels = enc.rows[0]
    assert (ids, labels) == tuple(encode_for_training(tok, msgs, template="gemma", tools=tools))
    assert "<tools>" in tok.decode(ids) and '"name": "wikipedia"' in tok.decode(ids)
    without = encode_records([{**rec, "tools": ""}], tok, template="gemma", max_seq_len=4096).rows[0][0]
    assert len(without) < len(ids) and "<tools>" not in tok.decode(without)


def test_heldout_loss_takes_tools_aligned_with_conversations() -> None:
    from sftflow.training.loss import _aligned_tools

    assert _aligned_tools(None, 2) == [None, None]
    assert _aligned_tools(["[]", ""], 2) == ["[]", ""]
    with pytest.raises(ValueError, match="1 entries for 2 conversations"):
        _aligned_tools([""], 2)


def test_evaluation_reference_of_a_tool_call_turn_is_the_call() -> None:
    from sftflow.evaluation.sets import split_prompt_reference

    msgs, tools = _sample_conversation()
    prompt, ref = split_prompt_reference(msgs[:2])  # the last assistant turn only calls a tool
    assert ref == '<tool_call>{"name": "wikipedia", "arguments": {"query": "French Revolution"}}</tool_call>'
    prompt, ref = split_prompt_reference(msgs)
    assert ref == msgs[3]["content"] and len(prompt) == 3
    tok = _tokenizer()
    ids = build_generation_prompt(tok, prompt, template="gemma", tools=tools)
    assert "<tools>" in tok.decode(ids)

"""Multilingual text is text, junk is junk (issue 22, class 4).

Real ingestion (``tasks.ingest.ingest``) and the real GX suite (``tasks.validate.validate``) on rows
in Persian (ZWNJ), Arabic (ALM, RLM, number signs), Hebrew (LRM/RLM, isolates), Hindi (ZWJ/ZWNJ in
Devanagari), Thai, Chinese, Japanese, Korean (precomposed and conjoining jamo), German (soft hyphen)
and emoji (ZWJ families, flags, tag-sequence flags, keycaps, skin tones, variation selectors): all
kept, their token lengths counted with a real (tiny) tokenizer. Control junk is quarantined with a
reason naming the field and the code points; CSV null markers and responses made only of
combining marks or whitespace-like characters are quarantined with a reason.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config_sections import IngestConfig, SourceConfig, ValidationConfig
from sftflow.data.records import is_blank, is_junk_char, make_record, records_to_frame
from sftflow.data.refs import write_parquet
from tasks.ingest import ingest
from sftflow.data.validation_suite import derive_frame, non_printable_detail
from tasks.validate import validate

# (name, prompt, response): short rows, so one format character is > 1% of the text (the old bound
# quarantined every one of them).
MULTILINGUAL: list[tuple[str, str, str]] = [
    ("persian_zwnj", "Translate: I want", "می\u200cخواهم"),
    ("persian_zwnj_plural", "کتاب\u200cها کجا هستند؟", "کتاب\u200cها روی میز هستند."),
    ("arabic_alm_rlm", "ما عاصمة مصر؟", "القاهرة\u200f (Cairo)"),
    ("arabic_number_sign", "اكتب الرقم", "\u0600\u0661\u0662\u0663 \u061c-5"),
    ("hebrew_marks_isolates", "מה זה HTML\u200e?", "\u2067שפת סימון\u2069 ל\u200f-web"),
    ("hindi_zwj_zwnj", "क्\u200dष या क्\u200cष?", "दोनों सही हैं: क्\u200dष और क्\u200cष।"),
    ("thai", "ภาษาไทยมีวรรณยุกต์กี่รูป?", "มีสี่รูป: ไม้เอก ไม้โท ไม้ตรี ไม้จัตวา"),
    ("chinese", "请用一句话介绍长城。", "长城是中国古代的军事防御工程。"),
    ("japanese_ivs", "「葛」の異体字は？", "葛\U000e0100 と 葛\U000e0101 です。"),
    ("korean", "안녕하세요를 영어로?", "Hello. (\u1100\u1161\u11a8 = 각)"),
    ("korean_jamo", "\u1112\u1161\u11ab\u1100\u1173\u11af?", "\u1112\u1161\u11ab\u1100\u1173\u11af = 한글"),
    ("german_soft_hyphen", "Ein langes Wort?", "Donau\u00addampf\u00adschiff"),
    ("emoji_zwj_family", "Family emoji?", "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"),
    ("emoji_flags", "Flags?", "\U0001f1ef\U0001f1f5 \U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
                              " \U0001f3f3\ufe0f\u200d\U0001f308"),
    ("emoji_keycap_skin", "Keycap and thumbs?", "1\ufe0f\u20e3 \U0001f44d\U0001f3fd \u2764\ufe0f"),
    ("word_joiner_bom", "Join?", "no\u2060break and zero\ufeffwidth"),
]

# (name, response, code points the reason must name)
JUNK: list[tuple[str, str, str]] = [
    ("bell", "ok\x07\x07\x07", "messages[1].content: U+0007 x3"),
    ("nul_and_esc", "a\x00b\x1bc", "messages[1].content: U+0000 x1, U+001B x1"),
    ("c1_control", "text\x85\x9b", "messages[1].content: U+0085 x1, U+009B x1"),
    ("private_use", "logo \ue000\uf8ff", "messages[1].content: U+E000 x1, U+F8FF x1"),
    ("replacement", "caf\ufffd \ufffd", "messages[1].content: U+FFFD x2"),
    ("noncharacter", "x\ufffe\U0010ffff", "messages[1].content: U+FFFE x1, U+10FFFF x1"),
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tiny_models_home: Path):
    """The tiny Gemma tokenizer (byte-level BPE: every code point has tokens)."""
    from transformers import AutoTokenizer

    from sftflow.inference.tiny import build_tiny_model

    mp = pytest.MonkeyPatch()
    mp.setenv("SFTFLOW_HOME", str(tiny_models_home))
    try:
        return AutoTokenizer.from_pretrained(build_tiny_model("tiny-gemma").path)
    finally:
        mp.undo()


def test_junk_table() -> None:
    for ch in "\u200c\u200d\u200e\u200f\u061c\u2066\u2067\u2068\u2069\u202a\u202e\u00ad\u2060\ufeff\U000e0067\u0600":
        assert not is_junk_char(ch), f"U+{ord(ch):04X} is a format character that scripts need"
    for ch in "\ufe0f\U000e0100\U0001f3fd\u0301\t\n\r ":
        assert not is_junk_char(ch), f"U+{ord(ch):04X}"
    for ch in "\x00\x07\x1b\x7f\x85\x9b\ue000\U000f0000\ufffd\ufffe\uffff\ufdd0\U0001fffe":
        assert is_junk_char(ch), f"U+{ord(ch):04X} is junk"


def test_multilingual_rows_are_kept_by_ingest_and_gx(tmp_path: Path, tok) -> None:
    rows = [{"instruction": p, "output": a} for _, p, a in MULTILINGUAL]
    src = _jsonl(tmp_path / "multi.jsonl", rows)
    ing = ingest(sources=[SourceConfig(name="multi", path=str(src))], cfg=IngestConfig(), out_dir=tmp_path / "i")
    c = ing.counts[0]
    assert (c.read, c.kept, c.quarantined) == (len(rows), len(rows), 0)
    df = ing.dataset.read()
    got = [(r["source_row"], r["messages"][0]["content"], r["messages"][1]["content"]) for _, r in df.iterrows()]
    assert got == [(i, p, a) for i, (_, p, a) in enumerate(MULTILINGUAL, 1)]  # not one code point lost or changed

    res = validate(dataset=ing.dataset, cfg=ValidationConfig(max_tokens=4096), out_dir=tmp_path / "v", tokenizer=tok)
    q = pd.read_parquet(res.quarantine.path)
    assert res.valid.num_rows == len(rows) and len(q) == 0, list(q["reason"])

    derived = derive_frame(df, tokenizer=tok)
    assert (derived["non_printable_fraction"] == 0).all()
    joined = ["\n".join(m["content"] for m in msgs) for msgs in df["messages"]]
    want = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in joined]
    assert derived["n_tokens"].tolist() == want and min(want) > 0
    # The token bound works on them: the longest row(s) fail a bound one token below their length.
    bound = max(want) - 1
    res = validate(dataset=ing.dataset, cfg=ValidationConfig(max_tokens=bound), out_dir=tmp_path / "v2",
                   tokenizer=tok)
    q = pd.read_parquet(res.quarantine.path)
    longest = {i + 1 for i, n in enumerate(want) if n > bound}
    assert set(q["row"]) == longest and set(q["reason"]) == {
        f"expect_column_values_to_be_between(n_tokens <= {bound})"}
    assert res.valid.num_rows + len(q) == len(rows)


def test_control_junk_is_quarantined_naming_field_and_code_points(tmp_path: Path) -> None:
    good = [{"instruction": p, "output": a} for _, p, a in MULTILINGUAL]
    bad = [{"instruction": f"Junk {name}?", "output": a} for name, a, _ in JUNK]
    src = _jsonl(tmp_path / "mixed.jsonl", good + bad)
    ing = ingest(sources=[SourceConfig(name="mixed", path=str(src))], cfg=IngestConfig(), out_dir=tmp_path / "i")
    assert ing.counts[0].kept == len(good) + len(bad)  # ingestion keeps them: junk is validation's call
    res = validate(dataset=ing.dataset, cfg=ValidationConfig(max_suite_failure_fraction=0.5), out_dir=tmp_path / "v")
    q = pd.read_parquet(res.quarantine.path).sort_values("source_row")
    assert list(q["source_row"]) == list(range(len(good) + 1, len(good) + len(bad) + 1))
    for (_, _, names), reason in zip(JUNK, q["reason"]):
        assert reason == f"expect_column_values_to_be_between(non_printable_fraction <= 0.01) [{names}]"
    assert res.valid.num_rows + len(q) == len(good) + len(bad)


def test_detail_names_every_field() -> None:
    msgs = [{"role": "system", "content": "s\x01"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a" + "\x02" * 3 + "\x03"}]
    assert non_printable_detail(msgs) == "messages[0].content: U+0001 x1; messages[2].content: U+0002 x3, U+0003 x1"


COMBINING_ONLY = ["\u0301\u0301\u0301", "\u0300\u0316\u0317\u0318\u0319\u031a", "\u20dd\u20de", " \u0903\u093c "]
WHITESPACE_LIKE = ["\u3164\u3164", "\u2800\u2800\u2800", "\u115f\u1160", "\uffa0", "\u180e\u2063\u200b",
                   "\u3000\u2003\u00a0", "\U000e0020\U000e0021", "\u034f\u17b4"]


@pytest.mark.parametrize("text", COMBINING_ONLY + WHITESPACE_LIKE)
def test_blank_texts(text: str) -> None:
    assert is_blank(text)


def test_combining_and_whitespace_only_responses_are_quarantined(tmp_path: Path) -> None:
    good = [{"instruction": p, "output": a} for _, p, a in MULTILINGUAL]
    bad = [{"instruction": f"Question {i}?", "output": t} for i, t in enumerate(COMBINING_ONLY + WHITESPACE_LIKE)]
    src = _jsonl(tmp_path / "blank.jsonl", good + bad)
    ing = ingest(sources=[SourceConfig(name="blank", path=str(src))], cfg=IngestConfig(max_quarantine_fraction=0.5),
                 out_dir=tmp_path / "i")
    c = ing.counts[0]
    assert (c.read, c.kept, c.quarantined) == (len(good) + len(bad), len(good), len(bad))
    q = pd.read_parquet(ing.quarantine.path)
    assert set(q["reason"]) == {"empty response (blank, whitespace-only or invisible-characters-only assistant turn)"}
    # Rows that reach validation another way (e.g. generated ones) are caught by the GX suite too.
    recs = [make_record([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": t}], source="g:gen")
            for t in COMBINING_ONLY] + [make_record([{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                                                    source="g:gen") for _, p, a in MULTILINGUAL]
    ref = write_parquet(records_to_frame(recs), tmp_path / "gen.parquet", name="gen")
    res = validate(dataset=ref, cfg=ValidationConfig(), out_dir=tmp_path / "v")
    vq = pd.read_parquet(res.quarantine.path)
    assert sorted(vq["row"]) == [1, 2, 3, 4]
    assert set(vq["reason"]) == {"expect_column_values_to_be_between(min_assistant_chars >= 1)"}


def test_hindi_and_thai_with_combining_marks_are_not_blank() -> None:
    for text in ("कि", "ไม้", "שָׁלוֹם", "مَرْحَبًا", "e\u0301"):
        assert not is_blank(text)


NULLS = ["NaN", "nan", "NULL", "None", "null", "N/A", "#N/A", "<NA>", "-nan", " NaN "]


def test_csv_null_markers_are_quarantined_naming_the_column(tmp_path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["instruction", "input", "output"])
    w.writerow(["Say hello.", "", "Hello!"])
    for v in NULLS:
        w.writerow([f"Answer with {v.strip()}?", "", v])
    w.writerow(["nan", "", "A response to a missing instruction."])
    w.writerow(["Translate.", "NULL", "A response to a missing input."])
    w.writerow(["Abbreviation for 'not applicable'?", "", "NA"])  # an ordinary word: kept
    w.writerow(["Which is None of these? (answer in a sentence)", "", "None of these is prime."])
    f = tmp_path / "nulls.csv"
    f.write_text(buf.getvalue(), encoding="utf-8")
    res = ingest(sources=[SourceConfig(name="csv", path=str(f))], cfg=IngestConfig(max_quarantine_fraction=0.9),
                 out_dir=tmp_path / "i")
    c = res.counts[0]
    assert (c.read, c.kept, c.quarantined) == (len(NULLS) + 5, 3, len(NULLS) + 2)
    q = pd.read_parquet(res.quarantine.path).sort_values("row")
    want = [f"column 'output' holds {v.strip()!r}, a missing-value marker, not text (expected text; fill the cell "
            "or drop the row)" for v in NULLS]
    want += [r.replace("'output' holds 'NaN'", "'instruction' holds 'nan'") for r in want[:1]]
    want += [r.replace("'output' holds 'NaN'", "'input' holds 'NULL'") for r in want[:1]]
    assert list(q["reason"]) == want
    kept = [m[1]["content"] for m in res.dataset.read()["messages"]]
    assert kept == ["Hello!", "NA", "None of these is prime."]

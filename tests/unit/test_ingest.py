"""Ingestion: every format, every container, every bad-input case, accounting and mixing."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config_sections import IngestConfig, SourceConfig
from sftflow.data.formats import detect_format
from sftflow.data.readers import IngestError
from sftflow import markers
from tasks.ingest import ingest, ingest_task, mixture_counts

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "data" / "smoke"


def _run(tmp_path: Path, *sources: SourceConfig, **cfg) -> tuple:
    res = ingest(sources=list(sources), cfg=IngestConfig(**cfg), out_dir=tmp_path / "out")
    return res, res.dataset.read(), pd.read_parquet(res.quarantine.path)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _roles(df: pd.DataFrame, i: int = 0) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in df.iloc[i]["messages"]]


# --------------------------------------------------------------------------- formats
def test_alpaca_with_and_without_input(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_text(json.dumps([
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a prime.", "input": "", "output": "7", "system": "Be brief."},
    ]))
    res, df, q = _run(tmp_path, SourceConfig(name="alp", path=str(f)))
    assert res.counts[0].formats == "alpaca"
    assert _roles(df, 0) == [("user", "Translate to French.\n\nGood morning"), ("assistant", "Bonjour")]
    assert _roles(df, 1) == [("system", "Be brief."), ("user", "Name a prime."), ("assistant", "7")]
    assert set(df["source"]) == {"alp:a.json"} and set(df["origin"]) == {"seed"}
    assert df["id"].str.fullmatch(r"[0-9a-f]{16}").all() and len(q) == 0


def test_dolly_keeps_category_and_context(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Who wrote it?", "context": "Hamlet was written by Shakespeare.", "response": "Shakespeare",
         "category": "closed_qa"},
        {"instruction": "Say hi", "response": "hi", "category": "open_qa"},
    ])
    res, df, _ = _run(tmp_path, SourceConfig(name="dolly", path=str(f)))
    assert res.counts[0].formats == "dolly"
    assert list(df["category"]) == ["closed_qa", "open_qa"]
    assert df.iloc[0]["messages"][0]["content"] == "Who wrote it?\n\nHamlet was written by Shakespeare."


def test_human_assistant_single_and_multi_turn(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "h.jsonl", [
        {"text": "### Human: Why is the sky blue? ### Assistant: Rayleigh scattering."},
        {"text": "### Human: Hi ### Assistant: Hello! ### Human: Bye ### Assistant: Goodbye."},
    ])
    res, df, _ = _run(tmp_path, SourceConfig(name="ha", path=str(f), category="open_qa"))
    assert res.counts[0].formats == "human_assistant"
    assert _roles(df, 0) == [("user", "Why is the sky blue?"), ("assistant", "Rayleigh scattering.")]
    assert [r for r, _ in _roles(df, 1)] == ["user", "assistant", "user", "assistant"]
    assert set(df["category"]) == {"open_qa"}  # the source's category fills rows that carry none


def test_messages_nested_parts_and_sharegpt(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "text", "value": "hi"}], "loss_weight": 0.0},
                      {"role": "assistant", "content": [{"type": "text", "value": "Hello!"}], "loss_weight": 1.0}]},
        {"conversations": [{"from": "system", "value": "You are kind."}, {"from": "human", "value": "2+2?"},
                           {"from": "gpt", "value": "4"}]},
        {"messages": [{"role": "user", "content": "plain"}, {"role": "assistant", "content": "string"}]},
    ])
    res, df, q = _run(tmp_path, SourceConfig(name="msg", path=str(f)))
    assert res.counts[0].formats == "messages" and len(q) == 0
    assert _roles(df, 0) == [("user", "hi"), ("assistant", "Hello!")]
    assert _roles(df, 1) == [("system", "You are kind."), ("user", "2+2?"), ("assistant", "4")]
    assert _roles(df, 2) == [("user", "plain"), ("assistant", "string")]


def test_self_instruct_one_record_per_instance(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "s.jsonl", [
        {"id": "t0", "instruction": "Add the numbers.", "instances": [{"input": "1 2", "output": "3"},
                                                                     {"input": "2 2", "output": "4"},
                                                                     {"input": "x", "output": "  "}]},
        {"id": "t1", "instruction": "Greet.", "instances": [{"input": "", "output": "Hello"}]},
    ])
    res, df, q = _run(tmp_path, SourceConfig(name="si", path=str(f)), max_quarantine_fraction=0.5)
    c = res.counts[0]
    assert c.formats == "self_instruct" and (c.read, c.kept, c.quarantined) == (4, 3, 1)
    assert _roles(df, 1) == [("user", "Add the numbers.\n\n2 2"), ("assistant", "4")]
    assert q.iloc[0]["reason"].startswith("instance 2: empty response") and q.iloc[0]["row"] == 1


def test_detect_format_and_forced_format(tmp_path: Path) -> None:
    assert detect_format([{"instruction": "a", "output": "b"}]) == "alpaca"
    assert detect_format([{"instruction": "a", "response": "b"}]) == "dolly"
    assert detect_format([{"instruction": "a", "instances": []}]) == "self_instruct"
    assert detect_format([{"conversations": []}]) == "messages"
    assert detect_format([{"text": "### Human: a ### Assistant: b"}]) == "human_assistant"
    assert detect_format([{"text": "plain web text"}]) is None
    # A forced format that does not fit quarantines every row with the missing field named.
    f = _write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "response": "b"}])
    _, _, q = _run(tmp_path, SourceConfig(name="x", path=str(f), format="alpaca"), max_quarantine_fraction=1.0)
    assert list(q["reason"]) == ["missing required field 'output'"]


def test_column_mapping(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "c.jsonl", [{"question": "Capital of France?", "answer": "Paris"}])
    res, df, _ = _run(tmp_path, SourceConfig(name="qa", path=str(f), columns={"question": "instruction",
                                                                               "answer": "output"}))
    assert res.counts[0].formats == "alpaca"
    assert _roles(df) == [("user", "Capital of France?"), ("assistant", "Paris")]


# --------------------------------------------------------------------------- containers
def test_csv_parquet_glob_and_json_named_jsonl(tmp_path: Path) -> None:
    rows = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(4)]
    pd.DataFrame(rows[:2]).to_csv(tmp_path / "p1.csv", index=False)
    pd.DataFrame(rows[2:]).to_parquet(tmp_path / "p2.parquet", index=False)
    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "sub" / "lines.json", rows)  # JSONL content in a .json file
    res, df, _ = _run(tmp_path, SourceConfig(name="g", path=str(tmp_path / "p*.*")),
                      SourceConfig(name="j", path=str(tmp_path / "sub" / "lines.json")))
    g, j = res.counts
    assert (g.files, g.kept, j.kept) == (2, 4, 4)
    assert set(df["source"]) == {"g:p1.csv", "g:p2.parquet", "j:lines.json"}


def test_parquet_nested_messages(tmp_path: Path) -> None:
    pd.DataFrame({"messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]}).to_parquet(
        tmp_path / "m.parquet")
    _, df, _ = _run(tmp_path, SourceConfig(name="pq", path=str(tmp_path / "m.parquet")))
    assert _roles(df) == [("user", "q"), ("assistant", "a")]


def test_save_to_disk_folder(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([{"instruction": "Say yes", "response": "yes", "category": "x"}]).save_to_disk(
        str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"instruction": "a", "output": "b"}])}).save_to_disk(
        str(tmp_path / "saved_dict"))
    res, df, _ = _run(tmp_path, SourceConfig(name="ds", path=str(tmp_path / "saved")),
                      SourceConfig(name="dd", path=str(tmp_path / "saved_dict")))
    assert [c.formats for c in res.counts] == ["dolly", "alpaca"] and len(df) == 2


def test_hub_unreachable_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants

    # This sandbox has no hub; offline mode makes the failure instant instead of a network timeout.
    # (The flags are read at import time, so set both the env and the imported constants.)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(IngestError, match=r"source 'hub': cannot load hub dataset 'nobody/no-such-set'.*save_to_disk"):
        _run(tmp_path, SourceConfig(name="hub", hub="nobody/no-such-set"))


# --------------------------------------------------------------------------- bad rows → quarantine
def test_every_bad_row_is_quarantined_with_reason_and_accounting(tmp_path: Path) -> None:
    good = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    lines = [
        json.dumps(good).encode(),
        b'{"instruction": "broken", "output": ',                                            # 2 malformed JSON
        json.dumps({"instruction": "No answer"}).encode(),                                  # 3 missing field
        json.dumps({"instruction": "Typed", "output": 42}).encode(),                        # 4 wrong type
        json.dumps({"instruction": "   ", "output": "x"}).encode(),                         # 5 blank instruction
        json.dumps({"instruction": "Empty", "output": " \n\t"}).encode(),                   # 6 blank response
        b'{"instruction": "Bad bytes \xff\xfe here", "input": "", "output": "ok"}',         # 7 invalid UTF-8
        json.dumps({"instruction": "Long", "output": "y" * 500}).encode(),                  # 8 absurdly long
        b"[1, 2]",                                                                          # 9 not an object
        json.dumps({**good, "instruction": "Another colour?"}).encode(),
    ]
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    res, df, q = _run(tmp_path, SourceConfig(name="bad", path=str(f)), max_quarantine_fraction=0.9,
                      max_record_chars=200)
    c = res.counts[0]
    assert (c.read, c.kept, c.quarantined) == (10, 2, 8) and c.read == c.kept + c.quarantined
    reasons = dict(zip(q["row"], q["reason"]))
    assert reasons[2].startswith("malformed JSON")
    assert reasons[3] == "missing required field 'output'"
    assert reasons[4] == "field 'output' must be a string, got int"
    assert reasons[5].startswith("empty instruction")
    assert reasons[6].startswith("empty response")
    bad_at = f.read_bytes().index(b"\xff")
    line7_at = f.read_bytes().index(b'{"instruction": "Bad bytes')
    assert reasons[7] == (f"invalid UTF-8 at byte {bad_at} of the file (line 7, byte {bad_at - line7_at + 1} of the "
                          "line); expected UTF-8 text")
    assert reasons[8].startswith("record too long: 504 chars > max_record_chars=200")
    assert reasons[9] == "expected a JSON object, got list"
    assert set(q["stage"]) == {"ingest"} and set(q["source"]) == {"bad:bad.jsonl"} and set(q["file"]) == {str(f)}
    assert "\ufffd" in q.set_index("row").loc[7, "raw"]  # raw text kept, undecodable bytes shown as U+FFFD
    assert len(df) == 2


def test_messages_bad_turns(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "value": "x.png"}]},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        {"messages": "not a list"},
    ])
    res, _, q = _run(tmp_path, SourceConfig(name="m", path=str(f)), max_quarantine_fraction=1.0)
    assert res.counts[0].kept == 1
    assert list(q["reason"]) == [
        "conversation must end with an assistant turn",
        "conversation must start with a user turn",
        "turn 0: unsupported content part of type 'image' (only text, reasoning and tool_call parts are supported)",
        "conversation must start with a user turn",
        "`messages` must be a list of turns, got str",
    ]


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text('instruction,input,output\n"Q one",,"A one"\n"Q two",,"A two",extra\n"Q three",,"A three"\n')
    res, _, q = _run(tmp_path, SourceConfig(name="csv", path=str(f)), max_quarantine_fraction=0.5)
    assert (res.counts[0].kept, res.counts[0].quarantined) == (2, 1)
    assert q.iloc[0]["row"] == 3 and q.iloc[0]["reason"] == "malformed CSV: expected 3 fields, got 4"


def test_max_quarantine_fraction_fails_with_clear_message(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "b.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": ""}])
    with pytest.raises(IngestError, match=r"max_quarantine_fraction=0.2.*b: 1/2 rows quarantined \(50.0%\).*empty response"):
        _run(tmp_path, SourceConfig(name="b", path=str(f)))
    assert (tmp_path / "out" / "quarantine.parquet").exists()  # bad rows still written for inspection


# --------------------------------------------------------------------------- whole-file errors
@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.jsonl", b"", r"empty.jsonl: file is empty \(expected JSONL records\)"),
        ("blank.json", b"  \n", r"blank.json: file is empty"),
        ("broken.json", b'[{"instruction": "a"', r"broken.json: not valid JSON .* expected a JSON list of records"),
        ("scalar.json", b"42", r"scalar.json: expected a JSON list of records, got int"),
        ("empty_list.json", b"[]", r"empty_list.json: the JSON list is empty"),
        ("data.txt", b"hello", r"data.txt: unknown file type '.txt'; expected one of .json"),
        ("web.jsonl", b'{"text": "just web text"}\n', r"web.jsonl: unknown format \(keys \['text'\]\); expected one of alpaca"),
        ("bad.parquet", b"not parquet at all", r"bad.parquet: not a readable Parquet file"),
        ("head.csv", b"instruction,output\n", r"head.csv: CSV has a header but no rows"),
    ],
)
def test_unreadable_file_names_the_file(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(IngestError, match=pattern):
        _run(tmp_path, SourceConfig(name="f", path=str(tmp_path / name)))


def test_missing_path_folder_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="file not found"):
        _run(tmp_path, SourceConfig(name="f", path=str(tmp_path / "nope.json")))
    (tmp_path / "folder").mkdir()
    with pytest.raises(IngestError, match="is a folder but not a `datasets.save_to_disk` folder"):
        _run(tmp_path, SourceConfig(name="f", path=str(tmp_path / "folder")))
    with pytest.raises(IngestError, match="matches no file"):
        _run(tmp_path, SourceConfig(name="f", path=str(tmp_path / "*.json")))


# --------------------------------------------------------------------------- mixing
def test_mixture_counts() -> None:
    assert mixture_counts([100, 50], [None, None]) == [100, 50]
    assert mixture_counts([100, 50], [1.0, 1.0]) == [50, 50]
    assert mixture_counts([1000, 60], [0.7, 0.3]) == [140, 60]
    assert mixture_counts([10, 1000], [0.5, 0.5]) == [10, 10]


def test_weights_and_caps_are_reported_and_seeded(tmp_path: Path) -> None:
    def mk(n: int, tag: str) -> Path:
        return _write_jsonl(tmp_path / f"{tag}.jsonl", [{"instruction": f"{tag} {i}", "output": "ok"} for i in range(n)])

    a, b = mk(40, "a"), mk(20, "b")
    res, df, _ = _run(tmp_path, SourceConfig(name="a", path=str(a), weight=3), SourceConfig(name="b", path=str(b), weight=1))
    ca, cb = res.counts
    assert (ca.mixed, cb.mixed) == (40, 13) and (ca.not_sampled, cb.not_sampled) == (0, 7)
    assert res.mixture()["a"] == pytest.approx(40 / 53)
    assert cb.kept == cb.mixed + cb.not_sampled
    res2, df2, _ = _run(tmp_path, SourceConfig(name="a", path=str(a), weight=3), SourceConfig(name="b", path=str(b), weight=1))
    assert list(df["id"]) == list(df2["id"])  # seeded
    res3, _, _ = _run(tmp_path, SourceConfig(name="a", path=str(a), max_rows=5), SourceConfig(name="b", path=str(b)))
    assert [c.mixed for c in res3.counts] == [5, 20]
    with pytest.raises(IngestError, match=r"sources \['b'\]: give every source a `weight`, or none"):
        _run(tmp_path, SourceConfig(name="a", path=str(a), weight=3), SourceConfig(name="b", path=str(b)))


# --------------------------------------------------------------------------- repo smoke data
def test_smoke_data_accounting(tmp_path: Path) -> None:
    res, df, q = _run(tmp_path, SourceConfig(name="dolly", path=str(SMOKE / "dolly_smoke.jsonl")),
                      SourceConfig(name="alpaca", path=str(SMOKE / "alpaca_smoke.json")))
    d, a = res.counts
    assert (d.formats, d.read, d.kept, d.quarantined) == ("human_assistant", 44, 42, 2)
    assert (a.formats, a.read, a.kept, a.quarantined) == ("alpaca", 45, 42, 3)
    assert sorted(q["reason"].str.split(":").str[0].str.split(" (", regex=False).str[0]) == [
        "empty instruction", "empty response", "field 'output' must be a string, got int",
        "malformed JSON", "missing required field 'output'"]
    # The exact copies (and the case-only copy: ids are on normalized text) survive to dedup.
    assert len(df) == 84 and df["id"].duplicated().sum() == 3


# --------------------------------------------------------------------------- the Prefect task + MLflow
def test_ingest_task_logs_to_mlflow(stage_ctx) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    ctx = stage_ctx
    uri, exp, parent, lay = ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, ctx.layout
    srcs = [SourceConfig(name="dolly", path=str(SMOKE / "dolly_smoke.jsonl"))]
    res = ingest_task.fn(srcs, IngestConfig(), ctx=ctx)
    assert Path(res.dataset.path).parent == lay.root / "ingest"
    runs = mlflow.search_runs([exp], filter_string="tags.`sftflow.stage` = 'ingest'", output_format="list")
    run = runs[0]
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.metrics["dolly.read"] == 44 and run.data.metrics["dolly.quarantined"] == 2
    digests = {d.dataset.digest for d in run.inputs.dataset_inputs}
    assert res.dataset.sha256[:36] in digests
    arts = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "ingest")}
    assert {"ingest/report.json", "ingest/quarantine.parquet"} <= arts
    # The completion marker records every output's digest; a damaged output fails the check a cache hit makes.
    assert markers.check_outputs(res) == []
    Path(res.dataset.path).write_bytes(Path(res.dataset.path).read_bytes()[:64])
    assert "dataset.parquet changed on disk" in markers.describe(markers.check_outputs(res))


def test_bad_data_is_not_retried_but_io_errors_are() -> None:
    from prefect.states import Failed

    from sftflow.ops.orchestration import retry_unless

    cond = retry_unless(IngestError)
    assert cond(None, None, Failed(data=IngestError("too many bad rows"))) is False
    assert cond(None, None, Failed(data=OSError("disk hiccup"))) is True
    assert ingest_task.retries == 2 and ingest_task.retry_condition_fn is not None

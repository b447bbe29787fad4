"""Preflight: cheap row bounds per source (max_rows, weights), impossible sizes and contradictory
settings refused with the key path, and the $SFTFLOW_HOME check (which creates nothing)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config import load_pipelines
from sftflow.config_sections import ConfigError
from sftflow.errors import EXIT_CONFIG, EXIT_HOME, HomeError
from sftflow.ops.preflight import EVAL_METRICS, check_home, count_file_rows, mixture_bound, preflight, source_rows

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, body: str):
    p = tmp_path / "pipelines.yaml"
    p.write_text(textwrap.dedent(body))
    return load_pipelines(p)["p"]


def test_row_counts_per_file_type(tmp_path: Path) -> None:
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"instruction": "a", "output": "b"}\n\n{"broken\n{"instruction": "c", "output": "d"}\n')
    assert count_file_rows(jl) == 3  # a malformed line is one (quarantined) row; blank lines are not rows
    si = tmp_path / "si.jsonl"
    si.write_text(json.dumps({"instruction": "x", "instances": [{"input": "", "output": "1"}] * 4}) + "\n")
    assert count_file_rows(si, fmt="self_instruct") == 4 and count_file_rows(si, fmt="alpaca") == 1
    js = tmp_path / "a.json"
    js.write_text(json.dumps({"data": [{"instruction": "q", "output": "a"}] * 7}))
    assert count_file_rows(js) == 7
    jsonl_named_json = tmp_path / "b.json"
    jsonl_named_json.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "r", "output": "b"}\n')
    assert count_file_rows(jsonl_named_json) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "q" "output": "a"}]')
    assert count_file_rows(bad) is None  # unknown: the ingest stage names the line / column
    csv = tmp_path / "a.csv"
    csv.write_text("instruction,output\nq,a\n\n\"multi\nline\",b\n")
    assert count_file_rows(csv) == 2
    pq = tmp_path / "a.parquet"
    pd.DataFrame({"instruction": ["q"] * 5, "output": ["a"] * 5}).to_parquet(pq)
    assert count_file_rows(pq) == 5
    assert count_file_rows(tmp_path / "x.txt") is None and count_file_rows(tmp_path) is None


def test_source_bounds_respect_max_rows_globs_and_weights(tmp_path: Path) -> None:
    for name, n in (("a1.jsonl", 4), ("a2.jsonl", 6), ("b.jsonl", 10)):
        (tmp_path / name).write_text('{"instruction": "q", "output": "a"}\n' * n)
    cfg = _cfg(tmp_path, """
        pipelines:
          p:
            sources:
              - {name: a, path: "a*.jsonl", max_rows: 8}
              - {name: b, path: b.jsonl}
              - {name: h, hub: some/dataset, max_rows: 3}
              - {name: u, hub: some/other}
    """)
    rows = [source_rows(s) for s in cfg.sources]
    assert [(r.rows, r.bound) for r in rows] == [(10, 8), (10, 10), (None, 3), (None, None)]
    assert "capped by max_rows=8" in rows[0].detail
    # weights: the scarcest source relative to its weight is taken whole (tasks.ingest.mixture_counts)
    assert mixture_bound([10, 10], [None, None]) == 20
    assert mixture_bound([10, 100], [1.0, 1.0]) == 20
    assert mixture_bound([10, 100], [1.0, 3.0]) == 40


def test_eval_metric_names_match_the_evaluation_stage() -> None:
    from sftflow.evaluation.metrics import GENERATION_METRICS, LOSS_METRICS

    assert set(EVAL_METRICS) == set(GENERATION_METRICS) | set(LOSS_METRICS) | {"num_examples"}


def test_repo_pipelines_pass(tmp_path: Path) -> None:
    for name, cfg in load_pipelines(REPO / "pipelines.yaml").items():
        assert preflight(cfg, pipeline=name) == []


BASE = """
pipelines:
  p:
    sources:
      - {name: a, path: a.jsonl}
      - {name: b, path: b.jsonl, max_rows: 2}
"""


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ("    split: {heldout_size: 5}\n",
         "pipelines.p.split.heldout_size=5 leaves no rows for training: the sources provide at most 5 row(s) "
         "(a: 3 row(s) in"),
        ("    split: {heldout_size: 9}\n", "use a heldout_size of at most 4 or add data"),
        ("    training: {early_stopping_patience: 2}\n",
         "pipelines.p.training.early_stopping_patience=2: needs training.eval_every"),
        ("    promotion: {metric: judge_score}\n",
         "pipelines.p.promotion.metric: 'judge_score' is not a metric the evaluation reports (set evaluation.judge"),
        ("    base_model: ./no/such/model\n", "pipelines.p.base_model: model folder not found"),
        ("    dedup: {keep: first}\n    sources:\n      - {name: a, path: a.jsonl, weight: 1}\n"
         "      - {name: b, path: b.jsonl}\n", "pipelines.p.sources.1.weight: missing"),
    ],
)
def test_impossible_settings_name_the_key(tmp_path: Path, patch: str, expected: str) -> None:
    (tmp_path / "a.jsonl").write_text('{"instruction": "q", "output": "a"}\n' * 3)
    (tmp_path / "b.jsonl").write_text('{"instruction": "q", "output": "a"}\n' * 10)
    body = BASE + patch
    if "    sources:\n      - {name: a, path: a.jsonl, weight" in patch:
        body = "pipelines:\n  p:\n" + patch
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(tmp_path, body), pipeline="p")
    assert expected in str(e.value), str(e.value)
    assert e.value.exit_code == EXIT_CONFIG


def test_judge_metric_and_extra_sets_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"instruction": "q", "output": "a"}\n' * 3)
    (tmp_path / "b.jsonl").write_text('{"instruction": "q", "output": "a"}\n' * 3)
    for patch in ("    evaluation: {judge: true}\n    promotion: {metric: tuned/judge_score}\n",
                  "    evaluation: {extra_sets: [{name: x, path: a.jsonl}]}\n    promotion: {metric: x/rougeL}\n",
                  "    split: {heldout_size: 4}\n    evaluation: {max_examples: 64}\n"):
        warnings = preflight(_cfg(tmp_path, BASE + patch), pipeline="p")
        assert warnings == ([] if "heldout_size" not in patch else
                            ["pipelines.p.evaluation.max_examples=64 > split.heldout_size=4: evaluation uses at "
                             "most 4 held-out rows"])


@pytest.mark.parametrize(
    ("patch", "missing", "expected"),
    [
        ("    execution: {engine: ray}\n", "ray", "pipelines.p.execution.engine: ray needs the `ray` extra"),
        ("    execution: {engine: ray, address: auto}\n", "ray", "pipelines.p.execution.engine: ray needs"),
        ("    execution: {generation_backend: vllm}\n", "vllm",
         "pipelines.p.execution.generation_backend: vllm needs the `vllm` extra"),
    ],
)
def test_engine_packages_are_checked_before_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patch: str,
                                                    missing: str, expected: str) -> None:
    """An engine whose package is not installed fails here, naming the key, not as a crash mid-run."""
    import importlib.util

    (tmp_path / "a.jsonl").write_text('{"instruction": "q", "output": "a"}\n' * 3)
    (tmp_path / "b.jsonl").write_text('{"instruction": "q", "output": "a"}\n' * 3)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(tmp_path, BASE + patch), pipeline="p")
    assert expected in str(e.value) and e.value.exit_code == EXIT_CONFIG
    # vLLM on a cluster it joins lives on the cluster's GPU workers: not checked here.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert preflight(_cfg(tmp_path, BASE + "    execution: {engine: ray, address: auto, generation_backend: vllm}\n"),
                     pipeline="p") == []


def test_check_home_creates_nothing(tmp_path: Path) -> None:
    assert check_home(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    (tmp_path / "keep.txt").write_text("x")
    assert check_home(tmp_path) == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]  # the write probe leaves nothing behind
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(HomeError, match="is not a folder") as e:
        check_home(f)
    assert e.value.exit_code == EXIT_HOME
    with pytest.raises(HomeError, match=f"cannot be created: {f} is not a folder"):
        check_home(f / "sub")

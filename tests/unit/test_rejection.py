"""Rejection sampling (RFT / best-of-n): k samples from one prefill, selection, accounting, the stage end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from sftflow.config import PipelineConfig
from sftflow.config_sections import DedupConfig, RejectionSamplingConfig, TrainingConfig
from sftflow.data.records import AccountingError, make_record, records_to_frame
from sftflow.data.refs import write_parquet
from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids
from sftflow.inference.generation import generate_batch, nucleus_logits, nucleus_sample, sample_k
from sftflow.inference.models import load_model
from sftflow.inference.tiny import build_tiny_model
from sftflow.rejection.pool import PoolPrompt, pool_from_records, read_prompt_file, screen_prompts
from sftflow.rejection.selection import (
    BELOW,
    DUP_HELDOUT,
    DUP_PROMPT,
    EMPTY,
    UNFINISHED,
    WRONG,
    accounting,
    answer_score,
    select_best,
)
from tasks.rejection import rejection_sample, rejection_task

QUESTIONS = ["What is the capital of France?", "hi", "Write a short poem about the sea and the sky.",
             "List the planets.", "Explain why the sky is blue in two sentences."]


@pytest.fixture(scope="module")
def tiny(tiny_models_home):
    mp = pytest.MonkeyPatch()
    mp.setenv("SFTFLOW_HOME", str(tiny_models_home))
    try:
        ref = build_tiny_model("tiny-gemma")
        model, tok = load_model(ref)
    finally:
        mp.undo()
    return model, tok, resolve_template(tok, None)


def _prompts(tok, template):
    return [build_generation_prompt(tok, [{"role": "user", "content": q}], template=template) for q in QUESTIONS]


# --------------------------------------------------------------------------- k samples, one prefill
def test_k_samples_share_one_prefill_and_greedy_equals_generate_batch(tiny):
    model, tok, template = tiny
    prompts, stops = _prompts(tok, template), stop_token_ids(tok, template)
    calls: list[tuple[int, int]] = []

    def hook(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(tuple(ids.shape))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ks = sample_k(model, tok, prompts, num_samples=3, max_new_tokens=6, temperature=0, batch_size=2,
                      stop_ids=stops)
    finally:
        handle.remove()
    # One multi-token forward per batch of prompts (3 batches of <= 2), with the prompts' batch size,
    # never the k-times-expanded one; every other forward is a one-token decode step.
    prefills = [c for c in calls if c[1] > 1]
    assert [c[0] for c in prefills] == [2, 2, 1]
    assert all(c[1] == 1 for c in calls if c not in prefills)
    assert all(c[0] in (6, 3) for c in calls if c[1] == 1)
    # Greedy: every sample equals the plain batched generator's output (the expanded cache is right).
    greedy = generate_batch(model, tok, prompts, max_new_tokens=6, batch_size=2, stop_ids=stops)
    assert [len(s) for s in ks] == [3] * len(prompts)
    assert all(all(x == g for x in s) for g, s in zip(greedy, ks))


def test_sampling_is_seeded_and_reports_progress(tiny):
    model, tok, template = tiny
    prompts, stops = _prompts(tok, template), stop_token_ids(tok, template)
    seen = []
    kw = dict(num_samples=4, max_new_tokens=8, temperature=1.0, top_p=0.95, batch_size=2, stop_ids=stops)
    a = sample_k(model, tok, prompts, seed=3, on_progress=lambda d, t: seen.append((d, t)), **kw)
    b = sample_k(model, tok, prompts, seed=3, **kw)
    c = sample_k(model, tok, prompts, seed=4, **kw)
    assert a == b
    assert a != c
    assert any(len({g.text for g in s}) > 1 for s in a), "k samples of a prompt should differ when sampling"
    assert seen == [(2, 5), (4, 5), (5, 5)]
    done = []
    generate_batch(model, tok, prompts, max_new_tokens=4, batch_size=4, stop_ids=stops,
                   on_progress=lambda d, t: done.append((d, t)))
    assert done == [(4, 5), (5, 5)]


def test_min_new_tokens_decodes_the_full_length(tiny):
    model, tok, template = tiny
    prompts, stops = _prompts(tok, template), stop_token_ids(tok, template)
    outs = sample_k(model, tok, prompts, num_samples=2, max_new_tokens=7, min_new_tokens=7, temperature=1.0,
                    batch_size=5, stop_ids=stops)
    assert all(g.num_tokens == 7 for s in outs for g in s)
    greedy = generate_batch(model, tok, prompts, max_new_tokens=7, min_new_tokens=7, batch_size=5, stop_ids=stops)
    assert all(g.num_tokens == 7 for g in greedy)


def test_nucleus_logits_equals_a_full_sort():
    torch.manual_seed(0)
    peaked = torch.randn(4, 5000) * 6
    flat = torch.randn(2, 5000) * 0.01  # the nucleus is wider than the candidate set: falls back
    for scores in (peaked, flat, torch.cat([peaked, flat])):
        for top_p in (0.5, 0.9, 1.0):
            got = nucleus_logits(scores, temperature=0.7, top_p=top_p, candidates=64)
            s = scores / 0.7
            srt, idx = s.sort(-1, descending=True)
            p = (srt - torch.logsumexp(s, -1, keepdim=True)).exp()
            keep_sorted = (p.cumsum(-1) - p) < top_p if top_p < 1 else torch.ones_like(p, dtype=torch.bool)
            keep = torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted)
            assert torch.equal(torch.isfinite(got), keep)
            assert torch.allclose(got[keep], s[keep])
            assert bool(keep.any(-1).all())
            if top_p < 1 and scores is peaked:
                assert int(keep.sum()) < keep.numel() // 10  # a real cut, not everything


def test_nucleus_sample_draws_from_the_nucleus_distribution():
    """The exponential-race draw has nucleus sampling's distribution: frequencies over many draws
    match softmax(nucleus_logits), on the candidate path and on the full-sort fallback alike."""
    torch.manual_seed(1)
    vocab, draws = 40, 40_000
    peaked = torch.randn(1, vocab) * 2.5
    flat = torch.randn(1, vocab) * 0.05  # wider than 8 candidates at top_p 0.9: the fallback path
    for row in (peaked, flat):
        for top_p in (0.6, 0.9, 1.0):
            want = torch.softmax(nucleus_logits(row, temperature=0.8, top_p=top_p, candidates=8), -1)[0]
            got = nucleus_sample(row.expand(draws, vocab), temperature=0.8, top_p=top_p, candidates=8)
            freq = torch.bincount(got, minlength=vocab).float() / draws
            assert bool((freq[want == 0] == 0).all()), "drew a token outside the nucleus"
            # 4 standard errors of a binomial frequency, per token.
            tol = 4 * (want * (1 - want) / draws).sqrt() + 1e-9
            assert bool(((freq - want).abs() <= tol).all()), (top_p, (freq - want).abs().max())


# --------------------------------------------------------------------------- selection
def _s(score, finished=True, response="an answer"):
    return {"score": score, "finished": finished, "response": response}


def test_select_best_picks_the_highest_score_and_respects_the_threshold():
    samples = [_s(3.1), _s(4.6), _s(4.2), _s(4.6)]
    assert select_best(samples, method="rubric", threshold=4.0)[:3] == (1, True, "")  # tie: lowest index
    best, kept, reason, detail = select_best(samples, method="rubric", threshold=4.7)
    assert (best, kept, reason) == (1, False, BELOW)
    assert "4.60 < threshold 4.7" in detail
    # Exactly at the threshold passes.
    assert select_best([_s(4.0)], method="rubric", threshold=4.0)[1] is True
    # An unfinished sample is never selected, however high its score.
    assert select_best([_s(4.9, finished=False), _s(4.1)], method="rubric", threshold=4.0)[:2] == (1, True)
    assert select_best([_s(4.9, finished=False)], method="rubric", threshold=1.0)[2] == UNFINISHED
    assert select_best([_s(4.9, finished=False)], method="rubric", threshold=1.0,
                       require_finished=False)[:2] == (0, True)
    assert select_best([_s(math.nan, response=" \u200b")] * 2, method="rubric", threshold=1.0)[2] == EMPTY
    # Answers: a correct sample wins; none correct is a wrong answer.
    assert select_best([_s(0.0), _s(1.0), _s(1.0)], method="answer", threshold=5.0)[:3] == (1, True, "")
    assert select_best([_s(0.0), _s(0.0)], method="answer", threshold=1.0)[1:3] == (False, WRONG)


def test_answer_scoring_on_gsm8k_rows():
    ref = "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72"
    assert answer_score("48 + 24 = 72, so the answer is 72.", ref) == 1.0
    assert answer_score("She sold 72 clips in total.\n#### 72", "72") == 1.0
    assert answer_score("She sold $1,024.00 worth.\n#### 1,024", "1024") == 1.0
    assert answer_score("48 + 24 = 70\n#### 70", ref) == 0.0
    assert answer_score("I am not sure.", ref) == 0.0
    assert math.isnan(answer_score("72", ""))


def _cand(prompt_index, sample_index, kept=False, reason="", finished=True):
    return {"prompt_index": prompt_index, "sample_index": sample_index, "kept": kept, "reason": reason,
            "finished": finished}


def test_accounting_balances_and_catches_a_lost_row():
    rows = [_cand(0, 0, kept=True), _cand(0, 1)]  # prompt 0 kept (its best sample)
    rows += [_cand(1, 0, reason=BELOW), _cand(1, 1, reason=BELOW)]
    rows += [_cand(2, -1, reason=DUP_HELDOUT, finished=False)]
    counts = accounting(pd.DataFrame(rows), k=2)
    assert counts["prompts_in"] == 3 and counts["kept"] == 1 and counts[BELOW] == 1 and counts[DUP_HELDOUT] == 1
    assert counts["samples"] == 4 and counts["prompts_sampled"] == 2
    # A prompt that lost one of its k samples breaks the samples identity.
    with pytest.raises(AccountingError, match="samples"):
        accounting(pd.DataFrame([r for r in rows if (r["prompt_index"], r["sample_index"]) != (1, 1)]), k=2)
    with pytest.raises(AccountingError, match="unknown reasons"):
        accounting(pd.DataFrame([_cand(0, 0, reason="mystery")]), k=1)


def test_screening_rejects_heldout_and_pool_duplicates(tmp_path: Path):
    held = [make_record([{"role": "user", "content": "What is the boiling point of water at sea level?"},
                         {"role": "assistant", "content": "100 C"}], source="s")]
    heldout = write_parquet(records_to_frame(held), tmp_path / "heldout.parquet")
    pool = [PoolPrompt("a", (("user", "Name three primary colours."),)),
            PoolPrompt("b", (("user", "what is the boiling point of water at sea level"),)),
            PoolPrompt("c", (("user", "Name three  primary colours."),))]
    out = screen_prompts(pool, heldout=heldout, dedup=DedupConfig())
    assert out[1][0] == DUP_HELDOUT and held[0]["id"] in out[1][1]
    assert out[2][0] == DUP_PROMPT
    assert 0 not in out


def test_prompt_file_errors_name_the_row(tmp_path: Path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"question": "What is 2+3?", "answer": "5"}) + "\n\n"
                    + json.dumps({"instruction": "Summarise", "input": "A long text."}) + "\n")
    items = read_prompt_file(good)
    assert [i.text for i in items] == ["What is 2+3?", "Summarise\n\nA long text."]
    assert items[0].answer == "5" and items[0].source == "p"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt key"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 2: no prompt"):
        read_prompt_file(bad)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        read_prompt_file(tmp_path / "broken.jsonl")
    assert [i.text for i in read_prompt_file(_write(tmp_path / "t.txt", "one\n\n two \n"))] == ["one", "two"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- config
def test_config_section_defaults_off_and_round2_overrides(tmp_path: Path):
    cfg = PipelineConfig.model_validate({"sources": [{"name": "s", "path": "x.jsonl"}]})
    assert cfg.rejection_sampling.enabled is False
    rs = RejectionSamplingConfig(round2_training={"max_steps": 3, "lora": {"r": 4}})
    t2 = rs.round2(TrainingConfig(max_steps=10))
    assert t2.max_steps == 3 and t2.lora.r == 4 and t2.lora.alpha == TrainingConfig().lora.alpha
    from sftflow.config_sections import ConfigError

    with pytest.raises(ConfigError, match="rejection_sampling.round2_training"):
        RejectionSamplingConfig(round2_training={"max_stepz": 3}).round2(TrainingConfig())


# --------------------------------------------------------------------------- the stage end to end
def _records():
    rows = [make_record([{"role": "user", "content": q}, {"role": "assistant", "content": "A short answer."}],
                        source="dolly", category="qa") for q in QUESTIONS]
    rows.append(make_record([{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"},
                             {"role": "assistant", "content": "3 + 4 = 7\n#### 7"}], source="gsm8k", answer="7"))
    rows.append(make_record([{"role": "user", "content": "What is the boiling point of water?"},
                             {"role": "assistant", "content": "100 C"}], source="dolly"))
    return rows


def test_rejection_stage_end_to_end(sftflow_home: Path, stage_ctx):
    import mlflow

    base = build_tiny_model("tiny-gemma")
    rows = _records()
    train = write_parquet(records_to_frame(rows), sftflow_home / "train.parquet", name="train")
    held = [make_record([{"role": "user", "content": "What is the boiling point of water?"},
                         {"role": "assistant", "content": "It is 100 degrees."}], source="dolly")]
    heldout = write_parquet(records_to_frame(held), sftflow_home / "heldout.parquet", name="heldout")
    # Threshold 1.0 keeps every scored best sample; require_finished off so the random tiny model's
    # cut-off samples are eligible (what stays to decide is the held-out leak and the maths answer).
    cfg = RejectionSamplingConfig(enabled=True, k=3, max_new_tokens=6, batch_size=4, threshold=1.0,
                                  require_finished=False, temperature=1.0, top_p=0.95)
    result = rejection_task.fn(train, heldout, base, cfg, TrainingConfig(), ctx=stage_ctx, base=base)
    counts = dict(result.counts)
    assert counts["prompts_in"] == len(rows)
    assert counts[DUP_HELDOUT] == 1
    assert counts["samples"] == (len(rows) - 1) * 3
    assert counts["kept"] + sum(counts[r] for r in (BELOW, WRONG, EMPTY, UNFINISHED, DUP_PROMPT, DUP_HELDOUT,
                                                    "bad_prompt")) == len(rows)
    # The random model never writes "#### 7": the maths prompt is rejected by answer, the rest kept.
    assert counts[WRONG] == 1
    assert counts["kept"] == len(QUESTIONS) - counts[EMPTY]
    cand = pd.read_parquet(result.candidates.path)
    assert set(cand.loc[cand.source == "gsm8k", "scorer"]) == {"answer"}
    assert set(cand.loc[(cand.source == "dolly") & (cand.sample_index >= 0), "scorer"]) == {"rubric"}
    # Each kept prompt's kept sample is its highest-scored one.
    for _, g in cand[cand.sample_index >= 0].groupby("prompt_index"):
        if g.kept.any():
            assert g.loc[g.kept, "score"].iloc[0] == g.score.max()
    sel = result.selected.read()
    assert len(sel) == counts["kept"] and set(sel.origin) == {"rejection_sampled"}
    assert result.train_round2.num_rows == len(rows) + len(sel)
    # Rerunning the plain function gives the same samples (seeded).
    again = rejection_sample(train=train, heldout=heldout, model=base, cfg=cfg, training=TrainingConfig(),
                             out_dir=sftflow_home / "again", base=base)
    assert pd.read_parquet(again.candidates.path).response.tolist() == cand.response.tolist()

    run = mlflow.MlflowClient(stage_ctx.tracking_uri).search_runs(
        [stage_ctx.experiment_id], filter_string="tags.mlflow.runName = 'rejection'")[0]
    assert run.data.metrics["rs_prompts_in"] == len(rows)
    assert run.data.metrics["rs_duplicate_of_heldout"] == 1
    arts = {a.path for a in mlflow.MlflowClient(stage_ctx.tracking_uri).list_artifacts(run.info.run_id, "rejection")}
    assert {"rejection/candidates.json", "rejection/score_histogram.png", "rejection/summary.md"} <= arts


def test_tool_conversation_prompts_keep_their_calls_and_are_sampled(tiny):
    """A train-pool prompt that is a tool conversation (user, call, tool result) renders and samples."""
    import json

    from sftflow.data.records import frame_to_records

    model, tok, template = tiny
    call = json.dumps([{"name": "wikipedia", "arguments": {"query": "Paris"}}])
    tools = json.dumps([{"name": "wikipedia", "description": "Search", "parameters": {"type": "object"}}])
    rec = make_record([{"role": "user", "content": "What is Paris?"},
                       {"role": "assistant", "content": "", "tool_calls": call},
                       {"role": "tool", "content": "Paris is the capital of France."},
                       {"role": "assistant", "content": "The capital of France."}], source="tools", tools=tools)
    pool = pool_from_records(frame_to_records(records_to_frame([rec])))
    turns = pool[0].turns()
    assert [t["role"] for t in turns] == ["user", "assistant", "tool"] and turns[1]["tool_calls"] == call
    assert screen_prompts(pool, heldout=None) == {}
    ids = build_generation_prompt(tok, turns, template=template, tools=pool[0].tools)
    text = tok.decode(ids)
    assert "<tools>" in text and "<tool_call>" in text and "<tool_response>" in text
    samples = sample_k(model, tok, [ids], num_samples=2, max_new_tokens=4, temperature=1.0, top_p=0.95,
                       batch_size=1, stop_ids=stop_token_ids(tok, template), seed=0)
    assert len(samples[0]) == 2

"""Instruction backtranslation: corpus, filters, reversal, tagging, threshold, accounting, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from sftflow.config_sections import AugmentationConfig, ConfigError, CorpusConfig, DedupConfig, TrainingConfig
from sftflow.data.records import AccountingError, frame_to_records, make_record, records_to_frame
from sftflow.data.refs import write_parquet
from sftflow.augment.corpus import Segment, load_corpus, split_into_segments
from sftflow.augment.filters import (
    instruction_filter_reason,
    salvage_instruction,
    seed_duplicate_rule,
    seed_duplicates,
    segment_filter_reason,
    select_segments,
)
from sftflow.augment.pairs import (
    BELOW,
    FILTERED,
    KEPT,
    NOT_CURATED,
    REJECTED,
    accounting,
    curated_records,
    reverse_records,
    select_by_threshold,
    tag_seed,
)
from sftflow.augment.report import unparseable_scores
from sftflow.data.tags import tag_records
from sftflow import markers
from tasks.backtranslate import backtranslate

REPO = Path(__file__).resolve().parents[2]
# The first 400 leads of ../shared/data's wikipedia_leads_10033.json, in the repository (data/README.md),
# so the end-to-end tests never depend on ../shared.
REPO_LEADS = REPO / "data" / "unlabeled" / "wikipedia_leads_400.json"

WIKI = {
    "Photosynthesis": "Photosynthesis is the process by which green plants and some other organisms use sunlight "
                      "to synthesize foods from carbon dioxide and water. It generally involves the green pigment "
                      "chlorophyll and generates oxygen as a byproduct.",
    "Paris": "Paris is the capital and most populous city of France. Since the 17th century Paris has been one of "
             "the major centres of finance, diplomacy, commerce, culture, fashion and gastronomy.",
}


def _seed_records():
    return [
        make_record([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
                     {"role": "assistant", "content": "The capital of France is Paris."}], source="s:a.json"),
        make_record([{"role": "user", "content": "Who wrote Hamlet?"},
                     {"role": "assistant", "content": "Hamlet was written by William Shakespeare around 1600."}],
                    source="s:a.json", category="open_qa"),
    ]


# --------------------------------------------------------------------------- corpus
def test_load_corpus_formats(tmp_path: Path):
    wiki = tmp_path / "leads.json"
    wiki.write_text(json.dumps({t: {"title": t, "extract": x, "description": ""} for t, x in WIKI.items()}))
    segs = load_corpus(CorpusConfig(name="wiki", path=str(wiki)), max_words=300)
    assert [s.id for s in segs] == ["Photosynthesis", "Paris"] and segs[0].source == "wiki:leads.json"

    jl = tmp_path / "c4.jsonl"
    jl.write_text(json.dumps({"body": "first doc text"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    segs = load_corpus(CorpusConfig(name="c4", path=str(jl), text_field="body"), max_words=300)
    assert [s.text for s in segs] == ["first doc text", "second"] and segs[1].id == "c4.jsonl:3"
    with pytest.raises(ValueError, match=r"c4.jsonl:1: no string field 'text'"):
        load_corpus(CorpusConfig(name="c4", path=str(jl)), max_words=300)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_corpus(CorpusConfig(name="b", path=str(bad)), max_words=300)

    txt = tmp_path / "articles.txt"
    txt.write_text("One article here.\n\nAnother one.\n")
    segs = load_corpus(CorpusConfig(name="t", path=str(txt), format="text_lines"), max_words=300)
    assert [s.text for s in segs] == ["One article here.", "Another one."]
    with pytest.raises(FileNotFoundError, match="augmentation.corpus.path"):
        load_corpus(CorpusConfig(name="t", path=str(tmp_path / "missing.json")), max_words=300)


def test_split_into_segments_packs_paragraphs_and_cuts_sentences():
    para = " ".join(f"Sentence number {i} is here." for i in range(30))  # 150 words, one paragraph
    segs = split_into_segments(para + "\n\nShort tail.", max_words=40)
    assert all(len(s.split()) <= 40 for s in segs)
    assert " ".join(segs) == para + " Short tail."
    assert split_into_segments("a b c\nd e", max_words=10) == ["a b c d e"]


def test_repo_wikipedia_leads_samples():
    smoke = load_corpus(CorpusConfig(name="wiki", path=str(REPO / "data" / "smoke" / "wikipedia_leads_20.json")),
                        max_words=300)
    assert len(smoke) >= 20 and all(s.text and s.source == "wiki:wikipedia_leads_20.json" for s in smoke)
    demo = load_corpus(CorpusConfig(name="wiki", path=str(REPO_LEADS), format="wikipedia_leads"), max_words=120)
    assert len(demo) >= 400 and {s.source for s in demo} == {"wiki:wikipedia_leads_400.json"}


def test_real_wikipedia_leads_sample(shared_data: Path):
    path = shared_data / "unlabeled" / "wikipedia_leads_10033.json"
    segs = load_corpus(CorpusConfig(name="wiki", path=str(path), format="wikipedia_leads"), max_words=300)
    assert len(segs) >= 10033 and all(s.text for s in segs)


# --------------------------------------------------------------------------- segment filters
@pytest.mark.parametrize("text,reason", [
    ("too few words here", "too_short"),
    (" ".join(["word"] * 50), "too_long"),
    ("Please accept our cookie policy to continue reading this fine article about gardening today", "boilerplate"),
    ("See https://a.example and https://b.example for all the details you need about the topic now", "url_heavy"),
    ("12 34 56 78 90 11 22 33 44 55 66 77 88 99 00 a1 b2 c3 d4 e5", "non_prose"),
])
def test_segment_filter_reasons(text, reason):
    assert segment_filter_reason(text, min_words=10, max_words=40)[0] == reason


def test_select_segments_dedups_and_stops_at_max(tmp_path: Path):
    good = [f"Topic {i} is a subject people write about for many good reasons in many places worldwide." for i in range(6)]
    seed_resp = "The capital of France is Paris, a city known for its museums, art and food and many other things."
    segments = [Segment(id=str(i), text=t, source="c") for i, t in enumerate(good)]
    segments += [Segment(id="dup", text=good[0].upper(), source="c"), Segment(id="seed", text=seed_resp, source="c"),
                 Segment(id="short", text="tiny", source="c")]
    cfg = AugmentationConfig(max_segments=100, min_words=5, max_words=60)
    accepted, rejected = select_segments(segments, seed_responses=[seed_resp], cfg=cfg, shuffle_seed=0)
    assert sorted(s.id for s in accepted) == [str(i) for i in range(6)]
    reasons = {seg.id: reason for seg, reason, _ in rejected}
    assert reasons == {"dup": "duplicate_segment", "seed": "seed_duplicate", "short": "too_short"} or \
        (reasons.get("0") == "duplicate_segment" and reasons["seed"] == "seed_duplicate")
    # max_segments: stops once enough passed; the examined ones are all accounted for.
    capped, rej = select_segments(segments, seed_responses=[seed_resp], cfg=cfg.model_copy(update={"max_segments": 2}),
                                  shuffle_seed=0)
    assert len(capped) == 2 and len(capped) + len(rej) <= len(segments)
    # no dedup against the seed when disabled
    off = cfg.model_copy(update={"dedup_against_seed": False})
    acc, _ = select_segments(segments, seed_responses=[seed_resp], cfg=off, shuffle_seed=0)
    assert "seed" in {s.id for s in acc}


def test_seed_check_is_the_shared_near_duplicate_rule():
    from sftflow.data.neardup import find_cross_duplicates

    seed_resp = "The capital of France is Paris, a city known for its museums, art and food and many other things."
    near = seed_resp.replace("many other things", "a great deal more")  # most word 5-grams shared
    far = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the cells of green plants."
    segs = [Segment(id="near", text=near, source="c"), Segment(id="far", text=far, source="c")]
    cfg = AugmentationConfig(max_segments=10, min_words=5, max_words=60)
    accepted, rejected = select_segments(segs, seed_responses=[seed_resp], cfg=cfg, shuffle_seed=0)
    assert [s.id for s in accepted] == ["far"]
    [(seg, reason, detail)] = rejected
    assert seg.id == "near" and reason == "seed_duplicate" and "5-gram Jaccard" in detail
    # The rule is the pipeline's dedup section with the seed check's key and threshold (LSH retuned).
    rule = seed_duplicate_rule(DedupConfig(near={"threshold": 0.9, "bands": 4, "rows": 2, "key": "prompt"}))
    assert (rule.near.key, rule.near.threshold, rule.near.ngram, rule.near.bands) == ("response", 0.5, 5, None)
    assert [p.query for p in find_cross_duplicates([near, far], [seed_resp], cfg=rule)] == [0]
    # Exact normalisation comes from dedup.exact: with punctuation kept, a copy that differs only in
    # punctuation is no longer an *exact* copy (it is still a near one).
    loose = seed_duplicates([seed_resp.replace(",", ";")], [seed_resp], rule=seed_duplicate_rule())
    strict = seed_duplicates([seed_resp.replace(",", ";")], [seed_resp],
                             rule=seed_duplicate_rule(DedupConfig(exact={"strip_punctuation": False})))
    assert loose[0].exact and not strict[0].exact and strict[0].similarity >= 0.5


def test_select_segments_in_windows_equals_one_by_one():
    # 700 segments (more than one examination window): mostly too short, some good, some copies of
    # a seed response. Windows must pick exactly what examining one segment at a time picks.
    seed_resp = "Seed answer about the history of the river and the mills that were built along its banks long ago."
    segs = []
    for i in range(700):
        text = (f"Segment {i} describes a subject that people write about for many good reasons in many places."
                if i % 50 == 0 else seed_resp if i % 97 == 0 else f"short {i}")
        segs.append(Segment(id=str(i), text=text, source="c"))
    cfg = AugmentationConfig(max_segments=10, min_words=5, max_words=60)
    accepted, rejected = select_segments(segs, seed_responses=[seed_resp], cfg=cfg, shuffle_seed=3)

    import random

    order = list(range(len(segs)))
    random.Random(3).shuffle(order)
    want_acc, want_rej, seen = [], [], set()
    rule = seed_duplicate_rule()
    for i in order:
        if len(want_acc) >= cfg.max_segments:
            break
        seg = segs[i]
        why = segment_filter_reason(seg.text, min_words=cfg.min_words, max_words=cfg.max_words)
        why = why[0] if why else None
        if why is None and seg.text.lower() in seen:
            why = "duplicate_segment"
        elif why is None:
            seen.add(seg.text.lower())
            if seed_duplicates([seg.text], [seed_resp], rule=rule):
                why = "seed_duplicate"
        (want_acc.append(seg.id) if why is None else want_rej.append((seg.id, why)))
    assert [s.id for s in accepted] == want_acc and len(accepted) == 10
    assert [(s.id, r) for s, r, _ in rejected] == want_rej
    assert len(want_rej) > 256 - 10  # the examination really crossed a window boundary


# --------------------------------------------------------------------------- reversal / overrides
def test_reverse_records_swaps_roles_and_drops_system():
    rev = reverse_records(_seed_records() + [{"messages": [{"role": "user", "content": "q"}], "source": "x"}])
    assert len(rev) == 2
    assert rev[0]["messages"] == [{"role": "user", "content": "The capital of France is Paris."},
                                  {"role": "assistant", "content": "What is the capital of France?"}]
    assert rev[1]["category"] == "open_qa" and rev[1]["source"] == "s:a.json"
    assert rev[0]["id"] != _seed_records()[0]["id"]
    cut = reverse_records(_seed_records(), max_response_words=4)
    assert cut[1]["messages"][0]["content"] == "Hamlet was written by" and cut[1]["messages"][1]["content"] == "Who wrote Hamlet?"


def test_training_overrides_merge_and_validate():
    base = TrainingConfig(max_steps=100, lora={"r": 16, "alpha": 32})
    # Derived in sftflow/config.py (AugmentationConfig.backward / .forward), like rejection's round2().
    cfg = AugmentationConfig(backward_training={"max_steps": 5, "lora": {"r": 4}}).backward(base)
    assert cfg.max_steps == 5 and cfg.lora.r == 4 and cfg.lora.alpha == 32 and cfg.merge is False
    assert AugmentationConfig(forward_training={"merge": True}).forward(base).merge is True
    with pytest.raises(ConfigError, match=r"augmentation\.backward_training\.lora\.r"):
        AugmentationConfig(backward_training={"lora": {"r": 0}}).backward(base)
    with pytest.raises(ConfigError, match=r"augmentation\.forward_training\.max_stepz: unknown key"):
        AugmentationConfig(forward_training={"max_stepz": 3}).forward(base)


# --------------------------------------------------------------------------- instruction filters
SEGMENT = ("Paris is the capital and most populous city of France. Since the 17th century Paris has been one of "
           "the major centres of finance, diplomacy, commerce, culture, fashion and gastronomy.")


@pytest.mark.parametrize("instruction,finished,reason", [
    ("", True, "empty"),
    ("  ?!  ", True, "empty"),
    ("What is the capital of France and why is it", False, "truncated"),
    ("Paris?", True, "too_short"),
    ("Tell me tell me tell me tell me about Paris", True, "repetitive"),
    ("What is Paris known for? 𒉊𒄲", True, "garbled"),
    ("ClClJ P\ufffd Hav enoughanced R", True, "garbled"),
    ("What is Paris \x17 known for?", True, "garbled"),
    ("What is Paris what is Paris what is Paris known for", True, "repetitive"),
    ("Paris is the capital and most populous city of France.", True, "copies_segment"),
    ("This text describes the city of Paris.", True, "meta_instruction"),
    ("The passage is about the history of Paris.", True, "meta_instruction"),
    ("Write a short paragraph about Paris.", True, "meta_instruction"),
    ("Summarize the following text about the capital of France.", True, "meta_instruction"),
    ("According to the passage, what is Paris known for?", True, "meta_instruction"),
    ("This is a description of Paris and its history.", True, "meta_instruction"),
    ("A summary of the history of Paris.", True, "meta_instruction"),
    ("Here is a paragraph about Paris.", True, "meta_instruction"),
])
def test_instruction_filter_reasons(instruction, finished, reason):
    why = instruction_filter_reason(instruction, SEGMENT, finished=finished)
    assert why is not None and why[0] == reason, why


@pytest.mark.parametrize("instruction", [
    "What is the capital of France, and what is it known for?",
    "Tell me about Paris.",
    "Why has Paris been important since the 17th century?",
    "Write a poem about the river Seine.",
    "Give me an overview of Paris as a centre of fashion and gastronomy.",
])
def test_good_instructions_pass(instruction):
    assert instruction_filter_reason(instruction, SEGMENT, finished=True) is None


def test_salvage_first_question_of_a_runaway_generation():
    assert salvage_instruction("What is ballet?What is ballet?𒌠calupcounter") == "What is ballet?"
    assert salvage_instruction("Describe the city of Paris\nmodel junk junk") == "Describe the city of Paris"
    assert salvage_instruction("Why?What else") is None  # too short to keep
    assert salvage_instruction("no end in sight at all") is None
    # Accented Latin and scripts the segment itself uses are not noise.
    assert instruction_filter_reason("What is a café in Paris?", "A café is a restaurant.", finished=True) is None
    assert instruction_filter_reason("Qu'est-ce que Москва?", "Москва is a city in Russia.", finished=True) is None


def test_truncated_can_be_allowed():
    assert instruction_filter_reason("What is the capital of France and", SEGMENT, finished=False,
                                     reject_truncated=False) is None


# --------------------------------------------------------------------------- threshold / tagging / accounting
def test_select_by_threshold():
    assert select_by_threshold([4.0, 3.999, 5.0, math.nan, 1.0], 4.0) == [True, False, True, False, False]
    assert select_by_threshold([], 3.0) == []


def test_tagging(sftflow_home: Path):
    recs = _seed_records()
    tagged = tag_records(recs, "Answer in the style of an AI Assistant.", origin="seed")
    assert tagged[0]["messages"][0] == {"role": "system", "content": "Answer in the style of an AI Assistant.\n\nBe brief."}
    assert tagged[1]["messages"][0] == {"role": "system", "content": "Answer in the style of an AI Assistant."}
    assert [r["origin"] for r in tagged] == ["seed", "seed"] and tagged[1]["id"] != recs[1]["id"]
    # tagging twice does not stack the tag
    assert tag_records(tagged, "Answer in the style of an AI Assistant.")[0]["messages"] == tagged[0]["messages"]
    assert tag_records(recs, None)[1]["messages"] == recs[1]["messages"]

    ref = write_parquet(records_to_frame(recs), sftflow_home / "seed.parquet", name="seed")
    out = tag_seed(ref, "TAG", sftflow_home / "tagged.parquet")
    rows = frame_to_records(out.read())
    assert out.num_rows == 2 and all(r["messages"][0]["content"].startswith("TAG") for r in rows)

    cur = curated_records([{"instruction": " What is Paris? ", "segment": SEGMENT, "source": "wiki:x.json",
                            "expected": 4.5}], system_prompt="Answer with knowledge from web search.")
    assert cur[0]["origin"] == "backtranslated" and cur[0]["score"] == 4.5
    assert [m["role"] for m in cur[0]["messages"]] == ["system", "user", "assistant"]
    assert cur[0]["messages"][1]["content"] == "What is Paris?" and cur[0]["messages"][2]["content"] == SEGMENT


def test_accounting_identities_and_unknown_status():
    frame = pd.DataFrame({"status": [FILTERED, FILTERED, REJECTED, BELOW, KEPT, KEPT]})
    assert accounting(frame) == {"segments_in": 6, "segments_filtered": 2, "generated": 4, "rejected": 1,
                                 "scored": 3, "kept": 2, "below_threshold": 1, "not_curated": 0}
    # Accepted segments a curator below min_auc never curated (below_min_auc: skip) still count.
    skipped = pd.concat([frame, pd.DataFrame({"status": [NOT_CURATED, NOT_CURATED]})], ignore_index=True)
    assert accounting(skipped)["segments_in"] == 8 and accounting(skipped)["not_curated"] == 2
    with pytest.raises(AccountingError, match="unknown candidate statuses"):
        accounting(pd.DataFrame({"status": [KEPT, "lost"]}))


def test_unparseable_scores_counts_low_rating_mass():
    frame = pd.DataFrame({"status": [FILTERED, REJECTED, BELOW, KEPT, KEPT, BELOW],
                          "mass": [math.nan, math.nan, 0.01, 0.97, 0.49, 0.5]})
    # Only scored rows count: 2 of 4 put less than half their probability on the ratings.
    assert unparseable_scores(frame) == pytest.approx(0.5)
    assert unparseable_scores(frame.assign(mass=[math.nan, math.nan, 0.9, 0.9, 0.6, 1.0])) == 0.0
    assert unparseable_scores(frame[frame.status == FILTERED]) == 0.0  # nothing scored, nothing lost


# --------------------------------------------------------------------------- end to end (tiny model, real training)
@pytest.mark.parametrize("threshold,iterations", [(1.0, 2), (5.0, 1)])
def test_backtranslate_end_to_end_tiny(sftflow_home: Path, threshold: float, iterations: int,
                                       monkeypatch: pytest.MonkeyPatch):
    import mlflow

    from sftflow.inference.tiny import build_tiny_model

    def no_logging(*_args, **_kwargs):
        raise AssertionError("the plain backtranslate() must not log to MLflow (its task does)")

    for name in ("start_run", "log_metric", "log_metrics", "log_param", "log_params", "log_artifact", "log_input",
                 "log_text", "log_dict", "set_tag", "set_tags"):
        monkeypatch.setattr(mlflow, name, no_logging)
    monkeypatch.setattr(mlflow.pyfunc, "log_model", no_logging)

    base = build_tiny_model("tiny-gemma")
    leads = json.loads(REPO_LEADS.read_text())
    corpus = sftflow_home / "leads.json"
    corpus.write_text(json.dumps(dict(list(leads.items())[:14])))
    seed_ref = write_parquet(records_to_frame(_seed_records() * 2), sftflow_home / "seed.parquet", name="seed")
    cfg = AugmentationConfig(
        enabled=True, corpus=CorpusConfig(name="wiki", path=str(corpus)), max_segments=6, min_words=20,
        max_words=120, reject_truncated=False, iterations=iterations,
        backward_training={"max_steps": 2}, forward_training={"max_steps": 2},
        generation={"max_new_tokens": 8, "batch_size": 4}, curation={"method": "rubric", "threshold": threshold, "batch_size": 4},
    )
    training = TrainingConfig(batch_size=2, max_seq_len=128, lora={"r": 4, "alpha": 8}, precision="fp32",
                              checkpoint_every=None, learning_rate=1e-3)
    out = backtranslate(seed=seed_ref, base=base, cfg=cfg, training=training, out_dir=sftflow_home / "bt")
    assert mlflow.active_run() is None
    counts = dict(out.counts)
    frame = pd.read_parquet(out.candidates.path)
    assert counts["segments_in"] == len(frame) == counts["segments_filtered"] + counts["generated"]
    assert counts["generated"] == counts["rejected"] + counts["scored"] <= 6
    assert counts["scored"] == counts["kept"] + counts["below_threshold"] > 0
    assert (frame.reason[frame.status != KEPT] != "").all()
    scored = frame[frame.status.isin([KEPT, BELOW])]
    assert scored.expected.between(1, 5).all() and scored.probs.map(lambda p: abs(sum(p) - 1) < 1e-4).all()
    assert len(out.iteration_kept) == iterations
    # The curation model is the last one trained (M_2 with two iterations, else M0), in its
    # content-keyed training folder (sftflow.training.entry), not a folder named after its role.
    assert out.helpers[-1].run_name == ("backtranslate.curation_iter2" if iterations == 2 else "backtranslate.curation")
    assert Path(out.curation_model.path).parent == out.helpers[-1].run.work_dir
    if iterations == 2:
        assert "expected_iter2" in frame.columns
    curated = frame_to_records(out.curated.read())
    assert len(curated) == counts["kept"] == (counts["scored"] if threshold == 1.0 else 0)
    for r in curated:
        assert r["origin"] == "backtranslated" and r["messages"][0]["content"] == cfg.augmented_system_prompt
    seed_rows = frame_to_records(out.seed.read())
    assert all(r["messages"][0]["content"].startswith(cfg.seed_system_prompt) for r in seed_rows)
    rev = frame_to_records(out.reversed.read())
    assert rev[0]["messages"][1]["content"] == "What is the capital of France?"
    assert out.backward_model.kind == "adapter" and Path(out.backward_model.path).is_dir()
    # Every trained model comes back for the task to log, in training order.
    names = ["backtranslate.backward", "backtranslate.curation"] + (["backtranslate.curation_iter2"] if iterations == 2 else [])
    assert [h.run_name for h in out.helpers] == names
    assert out.helpers[0].output.model == out.backward_model and out.helpers[-1].output.model == out.curation_model
    # A random tiny model puts almost no probability on "1".."5": every rating is one a parser would lose.
    assert (scored["mass"] < 0.01).all() and unparseable_scores(frame) == 1.0


def test_backtranslate_task_logs_runs_models_and_artifacts(sftflow_home: Path, stage_ctx):
    import mlflow
    from mlflow import MlflowClient

    from sftflow.inference.tiny import build_tiny_model
    from tasks.backtranslate import AugmentResult, backtranslate_task

    base = build_tiny_model("tiny-chatml")
    leads = json.loads(REPO_LEADS.read_text())
    corpus = sftflow_home / "leads.json"
    corpus.write_text(json.dumps(dict(list(leads.items())[100:106])))
    seed_ref = write_parquet(records_to_frame(_seed_records() * 2), sftflow_home / "seed.parquet", name="seed")
    cfg = AugmentationConfig(
        enabled=True, corpus=CorpusConfig(name="wiki", path=str(corpus)), max_segments=4, min_words=10,
        reject_truncated=False, backward_training={"max_steps": 1}, forward_training={"max_steps": 1},
        generation={"max_new_tokens": 6, "batch_size": 4}, curation={"method": "rubric", "threshold": 1.0, "batch_size": 4},
    )
    training = TrainingConfig(batch_size=2, max_seq_len=96, lora={"r": 4, "alpha": 8}, precision="fp32",
                              checkpoint_every=None)
    ctx = stage_ctx
    uri, exp, parent = ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id
    client = MlflowClient(uri)

    heldout = write_parquet(records_to_frame(_seed_records()), sftflow_home / "heldout.parquet", name="heldout")
    result = backtranslate_task.fn(seed_ref, base, cfg, training, ctx=ctx, heldout=heldout)

    assert isinstance(result, AugmentResult) and result.seed is not None
    counts = dict(result.counts)
    assert result.candidates.num_rows == counts["segments_in"] and result.curated.num_rows == counts["kept"]
    runs = {r.data.tags["sftflow.stage"]: r for r in
            mlflow.search_runs([exp], filter_string="tags.`sftflow.stage` LIKE 'backtranslate%'", output_format="list")}
    assert set(runs) == {"backtranslate", "backtranslate.backward", "backtranslate.curation"}
    stage = runs["backtranslate"]
    assert stage.data.tags["mlflow.parentRunId"] == parent
    assert stage.data.metrics["bt_kept"] == counts["kept"]
    frame = pd.read_parquet(result.candidates.path)
    assert stage.data.metrics["bt_unparseable_scores"] == pytest.approx(unparseable_scores(frame))
    assert stage.data.metrics["bt_unparseable_scores"] == 1.0  # a random model never expects a rating
    files = {f.path for f in client.list_artifacts(stage.info.run_id, "backtranslate")}
    assert {"backtranslate/candidates.parquet", "backtranslate/score_histogram.png", "backtranslate/summary.md",
            "backtranslate/report.json"} <= files
    # Every curation method's held-out AUC is a metric; the chosen one (rubric) also as curation/auc.
    m = stage.data.metrics
    assert {"curation/auc/rubric", "curation/auc/pmi", "curation/auc/loglik", "curation/auc",
            "curation/below_min_auc", "curation/min_auc"} <= set(m)
    assert m["curation/auc"] == m["curation/auc/rubric"] == m["bt_curator_auc"]
    assert m["curation/below_min_auc"] == float(m["curation/auc"] < 0.6)
    # Each helper model is the logged model of its own run, nested under the stage run.
    for name in ("backtranslate.backward", "backtranslate.curation"):
        run = runs[name]
        assert run.data.tags["mlflow.parentRunId"] == stage.info.run_id
        models = mlflow.search_logged_models(experiment_ids=[exp], filter_string=f"source_run_id = '{run.info.run_id}'",
                                             output_format="list")
        assert len(models) == 1
        assert run.data.params["train_rows"] == "4" and "loss" in run.data.metrics and "train_loss" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 1  # one step per helper (max_steps 1)
    # The completion marker records every output's digest; a damaged output fails the check a cache hit makes.
    assert markers.check_outputs(result) == []
    Path(result.curated.path).write_bytes(Path(result.curated.path).read_bytes()[:64])
    assert "curated.parquet changed on disk" in markers.describe(markers.check_outputs(result))

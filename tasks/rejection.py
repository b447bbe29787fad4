"""Rejection-sampling fine-tuning (RFT / best-of-n): sample k answers per prompt from the round-1
model, keep the best one when it is good enough, and train round 2 on seed + selected.

Reads top to bottom as the method:

1. **Prompt pool.** The train split's prompts (``prompts: train``: each record's turns before its
   last assistant turn, system tag included) or a prompt file (``.jsonl``/``.json`` rows with
   ``prompt``/``instruction``/``question`` and an optional ``answer``, or ``.txt``, one prompt a
   line); shuffled with ``seed`` and capped at ``max_prompts``.
2. **Screening.** A prompt that repeats an earlier pool prompt (``duplicate_prompt``) or duplicates
   a held-out prompt (``duplicate_of_heldout``: ``sftflow.data.neardup.find_cross_duplicates``, the
   leak rule dedup and split use) is not sampled: training on it would leak the evaluation.
3. **Sampling.** ``k`` samples per prompt from the round-1 model with the batch inference API
   (``sftflow.inference.batch.generate_texts(num_samples=k)``): on transformers each prompt is
   prefilled ONCE and its KV cache repeated k times for decoding (``generation.sample_k``,
   temperature/top-p, seeded); ``execution.engine: ray`` runs the same batches on Ray Data actors
   (same samples), ``execution.generation_backend: vllm`` uses vLLM's ``SamplingParams(n=k)``.
4. **Scoring.** Every sample gets a score: answer correctness (1.0/0.0, ``sftflow.data.answers``)
   for verifiable rows (a non-empty ``answer``; ``scorer: auto`` or ``answer``), else the logit
   1-5 rubric score of self-curation (``batch.score_texts``; expected rating) from ``scorer_model``,
   resolved by ``sftflow.inference.judges.resolve_scorer`` (a scorer that cannot be loaded is an
   error naming the key, never silently another model).
5. **Selection.** Per prompt, the best eligible sample (non-empty; finished unless
   ``require_finished`` is off; ties: the lowest sample index) is kept when it is correct (answer)
   or its score is >= ``threshold`` (rubric). Otherwise the prompt is rejected with its reason.
6. **Outputs.** ``candidates.parquet`` (one row per sample; a prompt screened out in step 2 has one
   row with ``sample_index`` -1), ``selected.parquet`` (canonical records,
   ``origin=rejection_sampled``) and ``train_round2.parquet`` (round-1 training data + selected).

Accounting, checked before anything is returned::

    prompts in = kept + duplicate_prompt + duplicate_of_heldout + bad_prompt
                 + empty + unfinished + below_threshold + wrong_answer
    samples = prompts sampled * k

``rejection_sample`` only computes and writes files; ``rejection_task`` logs it to MLflow
(params, ``rs_*`` metrics, the candidate table via ``mlflow.log_table``, datasets, a histogram).

Run it alone::

    from tasks.rejection import rejection_sample
    out = rejection_sample(train=train_ref, heldout=heldout_ref, model=round1_ref, base=base_ref,
                           cfg=cfg.rejection_sampling, training=cfg.training, out_dir=Path(".../rejection"))
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
from prefect import task

from sftflow import layout
from sftflow.config_sections import DedupConfig, RejectionSamplingConfig, TrainingConfig
from sftflow.data.answers import answers_match, extract_final_answer
from sftflow.ops.console import progress_callback
from sftflow.data.neardup import find_cross_duplicates, strongest_matches
from sftflow.data.records import (
    check_accounting,
    frame_to_records,
    is_blank,
    make_record,
    normalize_text,
    prompt_text,
    records_to_frame,
)
from sftflow.data.refs import DatasetRef, ModelRef, write_parquet
from sftflow.inference.batch import ModelHandle, generate_texts, score_texts
from sftflow.inference.judges import resolve_scorer
from sftflow.ops.orchestration import markdown_with_image, stage_cache_policy, table_artifact
from sftflow.markers import write_marker
from sftflow.results import RejectionResult
from sftflow.tracking.runs import StageContext, log_dataset, log_json, stage_run

STAGE = "rejection"
ORIGIN = "rejection_sampled"

# Reasons a prompt yields no selected sample (each prompt gets exactly one: kept or one of these).
DUP_PROMPT = "duplicate_prompt"  # repeats an earlier prompt of the pool (not sampled)
DUP_HELDOUT = "duplicate_of_heldout"  # duplicates a held-out prompt (not sampled: a leak)
BAD_PROMPT = "bad_prompt"  # the prompt cannot be rendered for generation (not sampled)
EMPTY = "empty"  # every sample was empty
UNFINISHED = "unfinished"  # no non-empty sample ended before max_new_tokens
BELOW = "below_threshold"  # best rubric score < threshold
WRONG = "wrong_answer"  # no finished sample has the reference's final answer
REASONS = (DUP_PROMPT, DUP_HELDOUT, BAD_PROMPT, EMPTY, UNFINISHED, BELOW, WRONG)
SCREENED = (DUP_PROMPT, DUP_HELDOUT, BAD_PROMPT)  # decided before sampling

CANDIDATE_COLUMNS = (
    "prompt_id", "prompt_index", "sample_index", "source", "prompt", "response", "num_tokens", "finished",
    "scorer", "score", "reference_answer", "predicted_answer", "best", "kept", "reason", "detail",
)
_PROMPT_KEYS = ("prompt", "instruction", "question", "input_text")


# =========================================================================== data
@dataclass(frozen=True)
class PoolPrompt:
    """One prompt of the pool.

    Attributes:
        prompt_id: the source record's id (train) or a stable hash of the prompt (file).
        messages: the turns before the answer (system/user/...; never ending with an assistant turn), as
            ``(role, content)`` pairs, or ``(role, content, tool_calls JSON)`` for an assistant turn that
            calls tools (a tool conversation's prompt keeps its calls, or it cannot be rendered).
        answer: the reference final answer of a verifiable task ('' when none).
        source: the source name (train rows keep theirs; file rows get the file's stem).
        category: the category ('' when none).
        tools: JSON tool schemas ('' when none).
    """

    prompt_id: str
    messages: tuple[tuple[str, ...], ...]
    answer: str = ""
    source: str = ""
    category: str = ""
    tools: str = ""

    def turns(self) -> list[dict[str, str]]:
        """``messages`` as role/content dicts (with ``tool_calls`` where a turn has them)."""
        return [{"role": m[0], "content": m[1], **({"tool_calls": m[2]} if len(m) > 2 and m[2] else {})}
                for m in self.messages]

    @property
    def text(self) -> str:
        """The user turns joined (the key of the duplicate checks)."""
        return prompt_text(self.turns())


@dataclass(frozen=True)
class RejectionOutput:
    """What ``rejection_sample`` produced.

    Attributes:
        selected: kept samples as canonical records (``origin=rejection_sampled``).
        candidates: one row per sample (and per screened prompt), with score, keep flag and reason.
        train_round2: the round-1 training data + ``selected``.
        counts: the accounting, as sorted (name, value) pairs.
    """

    selected: DatasetRef
    candidates: DatasetRef
    train_round2: DatasetRef
    counts: tuple[tuple[str, int], ...]


def _prompt_turns(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The turns before the last assistant turn (all turns when there is none), tool calls kept."""
    msgs = []
    for m in messages:
        turn = {"role": str(m["role"]), "content": str(m["content"])}
        calls = m.get("tool_calls")
        if isinstance(calls, str) and calls.strip():
            turn["tool_calls"] = calls
        msgs.append(turn)
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    return msgs if last is None else msgs[:last]


def _pool_from_records(records: Sequence[dict[str, Any]]) -> list[PoolPrompt]:
    out = []
    for r in records:
        turns = _prompt_turns(r["messages"])
        out.append(PoolPrompt(prompt_id=str(r["id"]),
                              messages=tuple((m["role"], m["content"], *([m["tool_calls"]] if "tool_calls" in m else []))
                                             for m in turns),
                              answer=str(r.get("answer") or ""), source=str(r.get("source") or ""),
                              category=str(r.get("category") or ""), tools=str(r.get("tools") or "")))
    return out


def read_prompt_file(path: str | Path) -> list[PoolPrompt]:
    """Prompts of an unlabeled prompt file.

    ``.txt``: one prompt a line (blank lines skipped). ``.jsonl``: one JSON object a line;
    ``.json``: a list of objects. An object gives its prompt in ``prompt``, ``instruction``,
    ``question`` or ``input_text`` (an ``input`` field is appended as context) and may carry a
    reference ``answer``.

    Raises:
        ValueError: naming the file and line/row, for malformed JSON or a row without a prompt.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"rejection_sampling.prompts: file not found: {p}")
    source = p.stem
    rows: list[tuple[int, Any]] = []
    if p.suffix == ".txt":
        rows = [(i, {"prompt": line.strip()}) for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                if line.strip()]
    elif p.suffix == ".jsonl":
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: line {i}: not valid JSON ({e.msg})") from None
    elif p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of objects, got {type(data).__name__}")
        rows = list(enumerate(data, 1))
    else:
        raise ValueError(f"{p}: unsupported prompt file type {p.suffix!r} (expected .jsonl, .json or .txt)")
    out = []
    for i, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{p}: row {i}: expected an object with one of {list(_PROMPT_KEYS)}, "
                             f"got {type(row).__name__}")
        text = next((str(row[k]) for k in _PROMPT_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
        if text is None:
            raise ValueError(f"{p}: row {i}: no prompt (expected a non-empty string in one of {list(_PROMPT_KEYS)})")
        if isinstance(row.get("input"), str) and row["input"].strip():
            text = f"{text.strip()}\n\n{row['input'].strip()}"
        answer = row.get("answer", "")
        turns = [{"role": "user", "content": text.strip()}]
        rec = make_record(turns, source=source, answer=str(answer) if answer is not None else "")
        out.append(PoolPrompt(prompt_id=rec["id"], messages=(("user", text.strip()),), answer=rec["answer"],
                              source=source, category=str(row.get("category") or "")))
    return out


def load_pool(cfg: RejectionSamplingConfig, *, train: DatasetRef) -> list[PoolPrompt]:
    """The prompt pool per ``cfg.prompts``, shuffled with ``cfg.seed`` and capped at ``cfg.max_prompts``."""
    if cfg.prompts == "train":
        pool = _pool_from_records(frame_to_records(train.read()))
    else:
        pool = read_prompt_file(cfg.prompts)
    random.Random(cfg.seed).shuffle(pool)
    return pool[: cfg.max_prompts] if cfg.max_prompts else pool


# =========================================================================== screening
def screen_prompts(pool: Sequence[PoolPrompt], *, heldout: DatasetRef | None,
                   dedup: DedupConfig | None = None) -> dict[int, tuple[str, str]]:
    """Prompts not to sample, by pool position: ``(reason, detail)``.

    A prompt whose normalised text repeats an earlier pool prompt is a ``duplicate_prompt``; one
    that duplicates a held-out prompt (exactly or nearly, under the pipeline's ``dedup`` rule on
    the prompt key, as dedup's held-out pass) is a ``duplicate_of_heldout``.
    """
    out: dict[int, tuple[str, str]] = {}
    first: dict[str, int] = {}
    for i, item in enumerate(pool):
        key = normalize_text(item.text + "\x00" + "\x00".join(f"{r}:{c}" for r, c, *_ in item.messages if r == "system"))
        if key in first:
            out[i] = (DUP_PROMPT, f"same prompt as pool row {first[key]}")
        else:
            first[key] = i
    if heldout is not None and heldout.num_rows:
        ref = heldout.read()
        pairs = strongest_matches(find_cross_duplicates([p.text for p in pool], ref, cfg=dedup or DedupConfig(),
                                                        key="prompt"))
        ids = ref["id"].tolist() if "id" in ref.columns else []
        for q, pair in pairs.items():
            if q not in out:
                what = "exact" if pair.exact else f"jaccard {pair.similarity:.2f}"
                match = ids[pair.match] if pair.match < len(ids) else pair.match
                out[q] = (DUP_HELDOUT, f"{what} duplicate of held-out row {match}")
    return out


# =========================================================================== scoring and selection
def scorer_for(item: PoolPrompt, scorer: str) -> str:
    """``answer`` or ``rubric`` for one prompt under ``cfg.scorer`` (auto: answer when the row has one)."""
    if scorer == "auto":
        return "answer" if item.answer.strip() else "rubric"
    return scorer


def answer_score(response: str, reference: str) -> float:
    """1.0 when the response's final answer equals the reference's, else 0.0 (no reference: NaN)."""
    if not reference.strip():
        return math.nan
    return 1.0 if answers_match(response, reference) else 0.0


def select_best(samples: Sequence[dict[str, Any]], *, method: str, threshold: float,
                require_finished: bool = True) -> tuple[int | None, bool, str, str]:
    """Pick the best sample of one prompt and decide whether it is kept.

    Args:
        samples: the prompt's samples in sample order, each with ``response``, ``finished`` and
            ``score`` (NaN: unscored).
        method: ``answer`` (kept when correct: score 1.0) or ``rubric`` (kept when score >= threshold).
        threshold: the rubric threshold.
        require_finished: only samples that ended with a stop token are eligible.

    Returns:
        (best sample index or None when none is eligible, kept, reason ('' when kept), detail).
    """
    nonblank = [i for i, s in enumerate(samples) if not is_blank(str(s["response"]))]
    if not nonblank:
        return None, False, EMPTY, f"all {len(samples)} samples empty"
    eligible = [i for i in nonblank if samples[i]["finished"] or not require_finished]
    if not eligible:
        return None, False, UNFINISHED, f"none of {len(nonblank)} non-empty samples ended before max_new_tokens"
    scored = [i for i in eligible if not math.isnan(float(samples[i]["score"]))]
    if not scored:
        return eligible[0], False, (WRONG if method == "answer" else BELOW), "no sample could be scored"
    # Highest score; ties go to the lowest sample index (max keeps the first maximum).
    best = max(scored, key=lambda i: float(samples[i]["score"]))
    score = float(samples[best]["score"])
    if method == "answer":
        ok = score >= 1.0
        return best, ok, "" if ok else WRONG, (f"{sum(float(samples[i]['score']) >= 1 for i in scored)} of "
                                               f"{len(scored)} eligible samples correct")
    ok = score >= threshold
    return best, ok, "" if ok else BELOW, f"best score {score:.2f} {'>=' if ok else '<'} threshold {threshold}"


def accounting(candidates: pd.DataFrame, *, k: int) -> dict[str, int]:
    """Counts of the candidate table, checked: prompts in = kept + rejected by reason; samples = sampled * k.

    Raises:
        AccountingError: a broken identity or an unknown reason (a bug, never bad data).
    """
    from sftflow.data.records import AccountingError

    per_prompt = candidates.groupby("prompt_index", sort=True).agg(kept=("kept", "any"), reason=("reason", "first"),
                                                                 sampled=("sample_index", "max"))
    unknown = set(per_prompt.loc[~per_prompt.kept, "reason"]) - set(REASONS)
    if unknown:
        raise AccountingError(f"rejection sampling accounting: unknown reasons {sorted(unknown)}")
    counts = {"prompts_in": int(len(per_prompt)), "kept": int(per_prompt.kept.sum())}
    for r in REASONS:
        counts[r] = int(((~per_prompt.kept) & (per_prompt.reason == r)).sum())
    check_accounting("rejection sampling", counts["prompts_in"], kept=counts["kept"],
                     **{r: counts[r] for r in REASONS})
    sampled = int((per_prompt.sampled >= 0).sum())
    samples = int((candidates.sample_index >= 0).sum())
    check_accounting("rejection sampling samples", samples, **{f"prompts_sampled_x{k}": sampled * k})
    counts.update(prompts_sampled=sampled, samples=samples,
                  samples_finished=int(candidates.loc[candidates.sample_index >= 0, "finished"].astype(bool).sum()))
    return counts


# =========================================================================== the stage
def _rubric_scores(rows: list[dict[str, Any]], *, scorer: ModelRef | None, sampler: ModelHandle, model: ModelRef,
                   cfg: RejectionSamplingConfig, training: TrainingConfig, trust_remote_code: bool) -> list[float]:
    """Expected 1-5 rubric scores of (prompt, response) rows by ``scorer`` (batch ``score_texts``).

    The sampler's own model (``scorer_model: tuned``) reuses the sampler's handle (loaded once);
    another scorer is loaded as the sampler is (adapter merged, ``cfg.dtype``).
    """
    if not rows:
        return []
    if scorer is None:
        raise ValueError("rejection sampling: rubric rows to score but no scorer was resolved (a bug)")
    ref = scorer
    own = ref != model
    handle = ModelHandle(ref, dtype=cfg.dtype, trust_remote_code=trust_remote_code) if own else sampler
    try:
        scores = score_texts(handle, [(r["prompt"], r["response"]) for r in rows], template=training.template,
                             batch_size=cfg.score_batch_size)
    finally:
        if own:
            handle.close()
    return [float(s.expected) for s in scores]


def _sample_and_score(pool: Sequence[PoolPrompt], screened: dict[int, tuple[str, str]], *, model: ModelRef,
                      base: ModelRef | None, cfg: RejectionSamplingConfig, training: TrainingConfig,
                      trust_remote_code: bool, on_progress: Callable[[int, int], None] | None
                      ) -> dict[int, list[dict[str, Any]]]:
    """k samples of every pool prompt not ``screened`` (a prompt that cannot be rendered is added to
    it as ``bad_prompt``), each scored; ``{pool position: its k candidate rows}``.

    Sampling and rubric scoring go through the batch inference API (engine and backend apply).
    """
    from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids

    # The sampler, as batch inference loads it: here (local engine) or once per Ray Data actor / vLLM.
    sampler = ModelHandle(model, dtype=cfg.dtype, trust_remote_code=trust_remote_code)
    try:
        tok = sampler.tokenizer
        template = resolve_template(tok, training.template)
        to_sample: list[int] = []
        prompt_ids: list[list[int]] = []
        for i, item in enumerate(pool):
            if i in screened:
                continue
            try:
                ids = build_generation_prompt(tok, item.turns(), template=template, tools=item.tools or None)
            except ValueError as e:
                screened[i] = (BAD_PROMPT, str(e)[:300])
                continue
            to_sample.append(i)
            prompt_ids.append(list(ids))
        # The rubric scorer is resolved before any sampling: a scorer that cannot be loaded fails fast.
        scorer = resolve_scorer(configured=cfg.scorer_model, base=base, role="rejection", model=model,
                                trust_remote_code=trust_remote_code) \
            if any(scorer_for(pool[i], cfg.scorer) == "rubric" for i in to_sample) else None
        samples = generate_texts(sampler, prompt_ids, num_samples=cfg.k, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size,
                                 stop_ids=stop_token_ids(tok, template), seed=cfg.seed, on_progress=on_progress) \
            if prompt_ids else []

        sampled_rows: dict[int, list[dict[str, Any]]] = {}
        for i, gens in zip(to_sample, samples):
            item = pool[i]
            method = scorer_for(item, cfg.scorer)
            sampled_rows[i] = [{
                "prompt_id": item.prompt_id, "prompt_index": i, "sample_index": s, "source": item.source,
                "prompt": item.text, "response": g.text, "num_tokens": g.num_tokens, "finished": g.finished,
                "scorer": method, "score": math.nan, "reference_answer": item.answer,
                "predicted_answer": (extract_final_answer(g.text) or "") if method == "answer" else "",
                "best": False, "kept": False, "reason": "", "detail": "",
            } for s, g in enumerate(gens)]

        # Score every non-empty sample: answers by comparison, the rest with the rubric in one pass.
        rubric_rows = []
        for rs in sampled_rows.values():
            for r in rs:
                if is_blank(r["response"]):
                    continue
                if r["scorer"] == "answer":
                    r["score"] = answer_score(r["response"], r["reference_answer"])
                else:
                    rubric_rows.append(r)
        got = _rubric_scores(rubric_rows, scorer=scorer, sampler=sampler, model=model, cfg=cfg, training=training,
                             trust_remote_code=trust_remote_code)
    finally:
        sampler.close()
    for r, score in zip(rubric_rows, got):
        r["score"] = score
    return sampled_rows


def rejection_sample(
    *,
    train: DatasetRef,
    heldout: DatasetRef | None,
    model: ModelRef,
    cfg: RejectionSamplingConfig,
    training: TrainingConfig,
    out_dir: Path,
    base: ModelRef | None = None,
    dedup: DedupConfig | None = None,
    trust_remote_code: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> RejectionOutput:
    """Run rejection sampling end to end (see the module docstring).

    Args:
        train: the round-1 training data (the prompt pool with ``prompts: train``; round 2 trains on it + selected).
        heldout: the held-out set; pool prompts duplicating it are never sampled.
        model: the round-1 tuned model (the sampler; also the rubric scorer with ``scorer_model: tuned``).
        cfg: the ``rejection_sampling`` section.
        training: the ``training`` section (its template renders prompts).
        out_dir: the stage folder.
        base: the base model (for ``scorer_model: base``).
        dedup: the pipeline's ``dedup`` section (the held-out duplicate rule; None: its defaults).
        trust_remote_code: passed to model loading.
        on_progress: ``(prompts_done, prompts_total)`` after each sampling batch.

    Returns:
        The refs and counts (``RejectionOutput``); nothing is logged to MLflow here.

    Raises:
        ValueError: a malformed prompt file (naming file and row) or an empty pool.
        AccountingError: a broken accounting identity (a bug).
    """
    out_dir = layout.ensure(Path(out_dir))
    pool = load_pool(cfg, train=train)
    if not pool:
        raise ValueError(f"rejection_sampling.prompts: the prompt pool ({cfg.prompts}) is empty")
    screened = screen_prompts(pool, heldout=heldout, dedup=dedup)

    sampled_rows = _sample_and_score(pool, screened, model=model, base=base, cfg=cfg, training=training,
                                     trust_remote_code=trust_remote_code, on_progress=on_progress)
    rows: list[dict[str, Any]] = []
    for i, (reason, detail) in sorted(screened.items()):
        item = pool[i]
        rows.append({"prompt_id": item.prompt_id, "prompt_index": i, "sample_index": -1, "source": item.source,
                     "prompt": item.text, "response": "", "num_tokens": 0, "finished": False, "scorer": "",
                     "score": math.nan, "reference_answer": item.answer, "predicted_answer": "", "best": False,
                     "kept": False, "reason": reason, "detail": detail})

    selected = []
    for i, rs in sampled_rows.items():
        best, kept, reason, detail = select_best(rs, method=rs[0]["scorer"], threshold=cfg.threshold,
                                                 require_finished=cfg.require_finished)
        for r in rs:
            r.update(reason=reason, detail=detail)
        if best is not None:
            rs[best]["best"] = True
            rs[best]["kept"] = kept
        if kept and best is not None:
            item = pool[i]
            selected.append(make_record(item.turns() + [{"role": "assistant", "content": rs[best]["response"]}],
                                        source=item.source or "rejection", origin=ORIGIN, category=item.category,
                                        score=float(rs[best]["score"]), tools=item.tools, answer=item.answer))
        rows.extend(rs)

    frame = pd.DataFrame(rows, columns=list(CANDIDATE_COLUMNS)).sort_values(["prompt_index", "sample_index"],
                                                                           ignore_index=True)
    frame["score"] = frame["score"].astype(float)
    counts = accounting(frame, k=cfg.k)
    check_accounting("rejection sampling selected", counts["kept"], selected=len(selected))
    candidates_ref = write_parquet(frame, out_dir / "candidates.parquet", name="rejection_candidates")
    selected_frame = records_to_frame(selected)
    selected_ref = write_parquet(selected_frame, out_dir / "selected.parquet", name="rejection_selected")
    round2 = pd.concat([records_to_frame(frame_to_records(train.read())), selected_frame], ignore_index=True)
    round2_ref = write_parquet(round2, out_dir / "train_round2.parquet", name="train_round2")
    check_accounting("rejection sampling round-2 data", round2_ref.num_rows, round1=train.num_rows,
                     selected=selected_ref.num_rows)
    return RejectionOutput(selected=selected_ref, candidates=candidates_ref, train_round2=round2_ref,
                           counts=tuple(sorted(counts.items())))


# =========================================================================== reporting
def score_histogram_png(frame: pd.DataFrame, path: Path, *, threshold: float) -> Path:
    """Histogram of sample scores (rubric: expected 1-5, kept best vs others; answer: correct vs wrong) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = frame[(frame.sample_index >= 0) & frame.score.notna()]
    rubric, answer = scored[scored.scorer == "rubric"], scored[scored.scorer == "answer"]
    panels = [p for p in (("rubric", rubric), ("answer", answer)) if len(p[1])] or [("rubric", rubric)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, (kind, part) in zip(axes[0], panels):
        if kind == "rubric":
            bins = [1 + 0.25 * i for i in range(17)]
            ax.hist([part.loc[part.kept, "score"], part.loc[~part.kept, "score"]], bins=bins, stacked=True,
                    label=["kept (best of its prompt)", "not kept"], color=["#2a9d8f", "#e76f51"])
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold}")
            ax.set_xlabel("rubric expected score (1-5)")
        else:
            correct = int((part.score >= 1).sum())
            ax.bar(["correct", "wrong"], [correct, len(part) - correct], color=["#2a9d8f", "#e76f51"])
            ax.set_xlabel("final answer")
        ax.set_ylabel("samples")
        ax.set_title(f"Rejection sampling: {len(part)} {kind}-scored samples")
        if kind == "rubric":
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _metrics(counts: dict[str, int], frame: pd.DataFrame) -> dict[str, float]:
    m = {f"rs_{k}": float(v) for k, v in counts.items()}
    sampled = frame[frame.sample_index >= 0]
    m["rs_keep_rate"] = counts["kept"] / counts["prompts_in"] if counts["prompts_in"] else 0.0
    if len(sampled):
        m["rs_finished_rate"] = float(sampled.finished.astype(bool).mean())
        rub = sampled[(sampled.scorer == "rubric") & sampled.score.notna()]
        if len(rub):
            m["rs_mean_score"] = float(rub.score.mean())
            m["rs_mean_best_score"] = float(rub[rub.best].score.mean()) if rub.best.any() else math.nan
        ans = sampled[(sampled.scorer == "answer") & sampled.score.notna()]
        if len(ans):
            m["rs_sample_accuracy"] = float((ans.score >= 1).mean())
            per = ans.groupby("prompt_index").score.max()
            m["rs_pass_at_k"] = float((per >= 1).mean())
    return {k: v for k, v in m.items() if not math.isnan(v)}


def _markdown_summary(counts: dict[str, int], metrics: dict[str, float], cfg: RejectionSamplingConfig) -> str:
    lines = [f"## Rejection sampling: {counts['kept']} of {counts['prompts_in']} prompts kept "
             f"(best of k={cfg.k})", "", "| outcome | prompts |", "|---|---|", f"| kept | {counts['kept']} |"]
    lines += [f"| {r} | {counts[r]} |" for r in REASONS if counts.get(r)]
    lines += ["", f"Samples: {counts['samples']} ({counts['samples_finished']} finished); "
              f"temperature {cfg.temperature}, top_p {cfg.top_p}, max_new_tokens {cfg.max_new_tokens}; "
              f"rubric threshold {cfg.threshold}"]
    lines += [f"- {k}: {v:.3f}" for k, v in sorted(metrics.items()) if k in (
        "rs_mean_score", "rs_mean_best_score", "rs_sample_accuracy", "rs_pass_at_k", "rs_finished_rate")]
    return "\n".join(lines)




@task(name=STAGE, cache_policy=stage_cache_policy(), persist_result=True)
def rejection_task(
    train: DatasetRef,
    heldout: DatasetRef | None,
    model: ModelRef,
    cfg: RejectionSamplingConfig,
    training: TrainingConfig,
    *,
    ctx: StageContext,
    base: ModelRef | None = None,
    dedup: DedupConfig | None = None,
    trust_remote_code: bool = False,
) -> RejectionResult:
    """Prefect task: ``rejection_sample`` in its own MLflow run.

    The run gets the settings, the accounting and score metrics (``rs_*``), the candidate table
    (``mlflow.log_table``, and the Parquet file), the datasets (candidates, selected, round-2
    data), a score histogram and a summary. No retries: it runs models (cached when unchanged).

    Args:
        train: the round-1 training data.
        heldout: the held-out split (prompts duplicating it are not sampled).
        model: the round-1 tuned model.
        cfg: the ``rejection_sampling`` section.
        training: the ``training`` section.
        ctx: the flow's stage context.
        base: the base model (for ``scorer_model: base``).
        dedup: the pipeline's ``dedup`` section.
        trust_remote_code: passed to model loading.
    """
    import mlflow

    out_dir = ctx.stage_dir(STAGE)
    with stage_run(ctx, STAGE):
        mlflow.log_params({"prompts": cfg.prompts, "max_prompts": cfg.max_prompts, "k": cfg.k,
                           "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                           "threshold": cfg.threshold, "scorer": cfg.scorer, "scorer_model": cfg.scorer_model,
                           "require_finished": cfg.require_finished, "seed": cfg.seed, "sampler_model": model.path})
        log_dataset(train, context="rejection.round1_train")
        out = rejection_sample(train=train, heldout=heldout, model=model, cfg=cfg, training=training, out_dir=out_dir,
                               base=base, dedup=dedup, trust_remote_code=trust_remote_code,
                               on_progress=progress_callback(f"{STAGE} prompts"))
        counts = dict(out.counts)
        frame = pd.read_parquet(out.candidates.path)
        metrics = _metrics(counts, frame)
        mlflow.log_metrics(metrics)
        mlflow.log_table(data=frame, artifact_file="rejection/candidates.json")
        for ref, context in ((out.candidates, "rejection.candidates"), (out.selected, "rejection.selected"),
                             (out.train_round2, "rejection.train_round2")):
            log_dataset(ref, context=context)
        mlflow.log_artifact(out.candidates.path, artifact_path="rejection")
        png = score_histogram_png(frame, out_dir / "score_histogram.png", threshold=cfg.threshold)
        mlflow.log_artifact(str(png), artifact_path="rejection")
        summary = _markdown_summary(counts, metrics, cfg)
        mlflow.log_text(summary, "rejection/summary.md")
        log_json({"counts": counts, "metrics": metrics, "sampler_model": model.path}, "rejection/summary.json")
        best = frame[frame.best].sort_values("score", ascending=False)
        table_artifact(f"{ctx.pipeline}-rejection-examples",
                       [{"prompt": r.prompt[:200], "response": r.response[:240], "score": round(float(r.score), 3),
                         "kept": bool(r.kept), "reason": r.reason} for r in best.head(10).itertuples()],
                       description="Rejection sampling: best sample of each prompt")
        markdown_with_image(f"{ctx.pipeline}-rejection-summary", summary, png, alt="score histogram",
                            description="Rejection sampling accounting and score histogram")
    write_marker(ctx.layout.stage_dir(STAGE), outputs=out, stage=STAGE)  # last: what a cache hit verifies
    return RejectionResult(selected=out.selected, candidates=out.candidates, train_round2=out.train_round2,
                           counts=out.counts)

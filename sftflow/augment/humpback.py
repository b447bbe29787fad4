"""The Humpback driver (Li et al. 2023, "Self-Alignment with Instruction Backtranslation"), top to bottom.

1. **Corpus**: segments of the unlabeled corpus (``sftflow.augment.corpus``), pre-filtered
   (``sftflow.augment.filters.select_segments``); every rejected segment keeps its reason.
2. **Backward model M_yx**: the seed reversed (``pairs.reverse_records``: the response is the user
   turn, the instruction the answer), trained through the one training entry
   (``sftflow.training.entry.run_training``: a content-keyed folder below ``work_root``, resumed
   after a crash, torchrun when ``training.num_processes`` > 1).
3. **Self-augmentation**: M_yx writes one instruction per segment (``sftflow.inference.batch.
   generate_texts``: in process or Ray Data actors, vLLM per ``execution.generation_backend``);
   a generation cut at the token bound keeps its first question (``filters.salvage_instruction``),
   and ``filters.instruction_filter_reason`` rejects the unusable ones.
4. **Self-curation**: the curation model (``curation.model``: ``forward`` = M0 trained on the seed,
   ``base``, or a model name/path) scores each pair with ``curation.method``
   (``sftflow.augment.curation``: ``rubric`` = the paper's 1-5 rating from digit logits, ``pmi`` =
   per-token PMI of answer and instruction, ``loglik``); ``curation.keep_decision`` keeps them.
   Before it curates, the curator is measured on held-out rows (AUC of true vs mismatched answers,
   every method); ``method: auto`` (the default) curates with the method of highest AUC
   (``curation.choose_method``, the reason in ``report.json``); the chosen method is checked
   against ``curation.min_auc`` (``below_min_auc``: warn, skip, fail);
   the check of M0 runs before any instruction is generated, so ``fail``/``skip`` cost no generation.
5. **Iterations** (``iterations`` > 1): M_k trained on tagged seed + curated pairs, measured and
   checked the same way (with the method chosen at iteration 1), rescores (a ``skip`` there keeps
   the previous iteration's pairs); ``report.json`` has AUC, kept count and mean scores per iteration.
6. **Quality and outputs**: backward-model finished rate, curator AUCs; the candidate table
   (``candidates.parquet``, accounting checked), the tagged curated records and ``report.json``.

It writes files below ``out_dir`` (models below ``work_root``) and logs nothing:
``tasks.backtranslate`` logs the stage, each trained model in its own nested run
(``HelperModel``), and reports with ``sftflow.augment.report``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from sftflow import layout
from sftflow.augment.corpus import load_corpus
from sftflow.augment.curation import (
    METHODS,
    CuratorCheck,
    MethodChoice,
    check_curator,
    choose_method,
    curator_auc,
    keep_decision,
    method_scores,
    resolved,
    with_chosen,
)
from sftflow.augment.filters import instruction_filter_reason, salvage_instruction, select_segments
from sftflow.augment.pairs import (
    BELOW,
    CANDIDATE_COLUMNS,
    FILTERED,
    KEPT,
    NOT_CURATED,
    REJECTED,
    accounting,
    candidate_row,
    curated_records,
    reverse_records,
    tag_seed,
)
from sftflow.config_sections import AugmentationConfig, ConfigError, DedupConfig, TrainingConfig
from sftflow.data.records import frame_to_records, records_to_frame, response_text
from sftflow.data.refs import DatasetRef, ModelRef, write_parquet
from sftflow.data.tags import tag_dataset
from sftflow.inference.batch import ModelHandle, generate_texts
from sftflow.progress import run_logger
from sftflow.training.entry import TrainingRun, run_training

# label -> on_progress(done, total) (e.g. ``sftflow.ops.progress_report.progress_callback``); None: silent.
Progress = Callable[[str], Callable[[int, int], None]] | None


@dataclass(frozen=True)
class HelperModel:
    """A model backtranslation fine-tuned (M_yx, M0, M_k), kept so the stage can log it in its own run.

    Attributes:
        run_name: the nested MLflow run it belongs in (``backtranslate.backward`` ...).
        data: what it was trained on.
        cfg: the training settings it was trained with.
        run: what the training entry did (output, keyed work folder, key, whether reused).
    """

    run_name: str
    data: DatasetRef
    cfg: TrainingConfig
    run: TrainingRun

    @property
    def output(self) -> Any:
        """The ``TrainOutput`` (model, metrics, loss curve, training folder)."""
        return self.run.output


@dataclass(frozen=True)
class AugmentOutput:
    """What backtranslation produced.

    Attributes:
        curated: kept pairs as canonical records (``origin=backtranslated``, tagged).
        candidates: every segment examined with its instruction, scores, status and reason.
        seed: the seed data tagged with ``seed_system_prompt``.
        reversed: the backward model's training data (response -> instruction).
        backward_model: the backward model M_yx.
        curation_model: the model that gave the final scores (M0, base, a named model, or M_k).
        counts: the accounting, as sorted (name, value) pairs.
        iteration_kept: pairs kept after each curation iteration.
        helpers: every model trained here, in training order (for the stage to log).
        heldout: the held-out set tagged like the seed (evaluation prompts = training prompts), or None.
        quality: curator and backward-model quality figures (``curator_auc``, ``curator_auc_<method>``,
            ``curator_below_min_auc`` (1.0: the chosen curator was below ``min_auc``), ``backward_finished_rate``...).
        checks: the min_auc check of each iteration's curator (``curation.CuratorCheck``).
        report: ``report.json`` in the stage folder (counts, quality, curation: method, keep rule, AUCs, checks).
        choice: the method that curated and why (``curation.method: auto`` picks it by held-out AUC).
        per_iteration: per curation iteration: ``iteration``, ``kept``, ``scored``, the chosen method's
            ``auc``, ``kept_mean_score`` / ``scored_mean_score`` (what the kept pairs look like to that curator).
    """

    curated: DatasetRef
    candidates: DatasetRef
    seed: DatasetRef
    reversed: DatasetRef
    backward_model: ModelRef
    curation_model: ModelRef
    counts: tuple[tuple[str, int], ...]
    iteration_kept: tuple[int, ...]
    helpers: tuple[HelperModel, ...] = ()
    heldout: DatasetRef | None = None
    quality: tuple[tuple[str, float], ...] = ()
    checks: tuple[CuratorCheck, ...] = ()
    report: str = ""
    choice: MethodChoice | None = None
    per_iteration: tuple[dict[str, Any], ...] = ()

    def curation_config(self, cfg: AugmentationConfig) -> AugmentationConfig:
        """``cfg`` with the method that curated in place of ``auto`` (for reports that read the method)."""
        if self.choice is None:
            return cfg
        return cfg.model_copy(update={"curation": resolved(cfg.curation, self.choice.method)})


def _silent(_label: str) -> None:
    return None


def train_helper(*, run_name: str, data: DatasetRef, base: ModelRef, cfg: TrainingConfig, work_root: Path,
                 trust_remote_code: bool = False, retrain: bool = False) -> HelperModel:
    """Fine-tune a helper model through the one training entry (no MLflow: the stage logs it).

    Args:
        run_name: the nested run the stage logs it in.
        data / base / cfg: what to train on, from what, how.
        work_root: where the content-keyed training folders live.
        trust_remote_code: passed to model loading.
        retrain: discard a finished output with the same key (``--no-cache``).
    """
    run = run_training(train=data, heldout=None, base=base, cfg=cfg, work_root=work_root,
                       trust_remote_code=trust_remote_code, discard_finished=retrain)
    return HelperModel(run_name=run_name, data=data, cfg=cfg, run=run)


def curation_model(*, cfg: AugmentationConfig, base: ModelRef, seed: DatasetRef, forward_cfg: TrainingConfig,
                   work_root: Path, trust_remote_code: bool = False, retrain: bool = False,
                   stage: str = "backtranslate") -> tuple[ModelRef, list[HelperModel]]:
    """M0 per ``curation.model``: ``forward`` trains it on the seed; ``base`` or a model name/path is
    resolved by the one scorer resolver (``sftflow.inference.judges.resolve_scorer``).

    Returns:
        (the curation model, the models trained for it: [M0] for ``forward``, else []).

    Raises:
        ScorerUnavailable: the configured model cannot be loaded (naming ``augmentation.curation.model``).
    """
    choice = cfg.curation.model
    if choice == "forward":
        m0 = train_helper(run_name=f"{stage}.curation", data=seed, base=base, cfg=forward_cfg, work_root=work_root,
                          trust_remote_code=trust_remote_code, retrain=retrain)
        return m0.output.model, [m0]
    # base / a name or path: the one scorer resolver (an unloadable model is an error naming the key).
    from sftflow.inference.judges import resolve_scorer

    return resolve_scorer(configured=choice, base=base, role="curation", trust_remote_code=trust_remote_code), []


def generate_candidates(backward: ModelRef, accepted: Sequence[Any], *, cfg: AugmentationConfig,
                        template_setting: str, trust_remote_code: bool = False, progress: Progress = None,
                        label: str = "backtranslate generate instructions") -> list[dict[str, Any]]:
    """One candidate instruction per accepted segment from M_yx, filtered: candidate-table rows
    with status ``below_threshold`` (to be scored) or ``rejected_instruction`` with the reason."""
    from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids

    # The local engine loads M_yx here; execution.engine=ray loads only its tokenizer here and
    # the model once per Ray Data actor (vLLM where execution.generation_backend selects it).
    handle = ModelHandle(backward, dtype=cfg.generation.dtype, trust_remote_code=trust_remote_code)
    tok = handle.tokenizer
    template = resolve_template(tok, template_setting)
    prompts = [build_generation_prompt(tok, [{"role": "user", "content": s.text}], template=template) for s in accepted]
    g = cfg.generation
    try:
        outs = generate_texts(handle, prompts, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                              top_p=g.top_p, batch_size=g.batch_size, stop_ids=stop_token_ids(tok, template),
                              seed=g.seed, on_progress=(progress or _silent)(label))
    finally:
        handle.close()
    rows = []
    for seg, out in zip(accepted, outs):
        text, salvaged = out.text, False
        if not out.finished:
            cut = salvage_instruction(out.text)
            if cut is not None:
                text, salvaged = cut, True
        why = instruction_filter_reason(text, seg.text, finished=out.finished or salvaged,
                                        reject_truncated=cfg.reject_truncated)
        row = candidate_row(seg, status=REJECTED if why else BELOW, reason=why[0] if why else "",
                            detail=why[1] if why else "")
        row.update(instruction=text.strip(), raw_output=out.text, num_tokens=out.num_tokens,
                   finished=out.finished, salvaged=salvaged)
        rows.append(row)
    return rows


def _iteration_summary(it: int, scores: Sequence[dict[str, Any]], keep: Sequence[bool],
                       check: CuratorCheck) -> dict[str, Any]:
    """One curation iteration in figures: how many pairs were scored and kept, the curator's AUC, and the
    mean score (chosen method's units) of the kept and of all scored pairs."""
    import math

    def mean(vals: list[float]) -> float:
        vals = [v for v in vals if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    values = [float(sc["score"]) for sc in scores]
    return {"iteration": it, "method": check.method, "auc": check.auc, "check": check.status,
            "scored": len(values), "kept": int(sum(keep)),
            "kept_mean_score": mean([v for v, k in zip(values, keep) if k]), "scored_mean_score": mean(values)}


def write_report(path: Path, *, counts: dict[str, int], quality: dict[str, float], cfg: AugmentationConfig,
                 checks: Sequence[CuratorCheck], per_iteration: Sequence[dict[str, float]],
                 iteration_kept: Sequence[int], skipped: bool, choice: MethodChoice | None = None,
                 iterations: Sequence[dict[str, Any]] = ()) -> Path:
    """``report.json`` of the stage: accounting, quality, and the curation (method configured and chosen
    with the reason, keep rule, every method's AUC per iteration, the min_auc checks and what they did,
    per iteration: AUC, kept count and mean scores). Non-finite numbers are null."""
    import json
    import math

    def num(v: float) -> float | None:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    cur = cfg.curation if choice is None else resolved(cfg.curation, choice.method)
    doc = {
        "counts": counts,
        "iteration_kept": list(iteration_kept),
        "quality": {k: num(v) for k, v in sorted(quality.items())},
        "curation": {
            "method": cur.method, "configured_method": cfg.curation.method,
            "why": choice.reason if choice is not None else "", "keep": cur.keep_rule, "threshold": cur.threshold, "top_fraction": cur.top_fraction,
            "min_score": cur.min_score, "min_auc": cur.min_auc, "below_min_auc": cur.below_min_auc,
            "auc": {m: num(per_iteration[-1].get(f"curator_auc_{m}", math.nan)) for m in METHODS}
            if per_iteration and per_iteration[-1] else {},
            "auc_per_iteration": [{m: num(q.get(f"curator_auc_{m}", math.nan)) for m in METHODS} for q in per_iteration],
            "auc_pairs": int(per_iteration[-1].get("curator_auc_pairs", 0)) if per_iteration else 0,
            "checks": [{"iteration": c.iteration, "method": c.method, "auc": num(c.auc), "status": c.status,
                        "action": c.action if c.below else "", "message": c.message()} for c in checks],
            "skipped": skipped,
            "iterations": [{k: num(v) for k, v in row.items()} for row in iterations],
        },
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path


def humpback(
    *,
    seed: DatasetRef,
    base: ModelRef,
    cfg: AugmentationConfig,
    backward_cfg: TrainingConfig,
    forward_cfg: TrainingConfig,
    out_dir: Path,
    work_root: Path,
    trust_remote_code: bool = False,
    dedup: DedupConfig | None = None,
    heldout: DatasetRef | None = None,
    retrain: bool = False,
    progress: Progress = None,
    stage: str = "backtranslate",
) -> AugmentOutput:
    """Instruction backtranslation end to end (see the module docstring).

    Args:
        seed: the seed instruction data (canonical records; the clean train split).
        base: the base model the backward and curation models are fine-tuned from.
        cfg: the ``augmentation`` section (needs ``corpus``).
        backward_cfg / forward_cfg: M_yx's and the curation models' training settings
            (``AugmentationConfig.backward`` / ``.forward``).
        out_dir: the stage folder: every data file goes below it.
        work_root: where the trained models' content-keyed folders go (``run_training``).
        trust_remote_code: passed to model loading.
        dedup: the pipeline's ``dedup`` section, for the seed near-duplicate check (None: its defaults).
        heldout: the held-out split: returned tagged with ``seed_system_prompt`` (what the seed trains
            with, so evaluation sees the prompts training saw); its first ``curation.auc_examples``
            rows also check the curator (``curator_auc``).
        retrain: discard finished helper models with the same key (``--no-cache``).
        progress: label -> ``on_progress(done, total)`` for generation and scoring (None: silent).
        stage: prefix of the helper models' run names and progress labels.

    Raises:
        ConfigError: no corpus.
        ValueError: a malformed corpus file (naming file and row) or an empty seed.
    """
    if cfg.corpus is None:
        raise ConfigError("augmentation.corpus: required to backtranslate")
    out_dir = layout.ensure(Path(out_dir))
    seed_records = frame_to_records(seed.read())
    if not seed_records:
        raise ValueError(f"seed dataset {seed.path} is empty: nothing to learn a backward model from")

    # 1. corpus -> filtered segments
    segments = load_corpus(cfg.corpus, max_words=cfg.max_words)
    accepted, filtered = select_segments(
        segments, seed_responses=[response_text(r["messages"]) for r in seed_records], cfg=cfg,
        shuffle_seed=cfg.generation.seed, dedup=dedup,
    )
    rows: list[dict[str, Any]] = [candidate_row(seg, status=FILTERED, reason=reason, detail=detail)
                                  for seg, reason, detail in filtered]

    # 2. backward model M_yx on reversed seed data. Responses are cut to fit: at most max_words
    # (what M_yx sees at inference) and about half the training context (~1.3 tokens a word),
    # leaving room for the template and the instruction.
    words_cap = min(cfg.max_words, max(16, backward_cfg.max_seq_len // 2))
    reversed_ref = write_parquet(records_to_frame(reverse_records(seed_records, max_response_words=words_cap)),
                                 out_dir / "reversed.parquet", name="reversed_seed")
    helpers = [train_helper(run_name=f"{stage}.backward", data=reversed_ref, base=base, cfg=backward_cfg,
                            work_root=work_root, trust_remote_code=trust_remote_code, retrain=retrain)]
    backward = helpers[0].output.model

    # 3. the curation model (M0, base or a named model), measured before any instruction is
    #    generated: every method's AUC on held-out true vs mismatched pairs (rows never trained on),
    #    the chosen method's checked against min_auc (fail stops here, skip curates nothing).
    seed_tagged = tag_seed(seed, cfg.seed_system_prompt, out_dir / "seed_tagged.parquet")
    curation, trained = curation_model(cfg=cfg, base=base, seed=seed, forward_cfg=forward_cfg, work_root=work_root,
                                       trust_remote_code=trust_remote_code, retrain=retrain, stage=stage)
    helpers += trained
    heldout_tagged = None
    auc_records: list[dict[str, Any]] = []
    if heldout is not None:
        heldout_tagged = tag_dataset(heldout, cfg.seed_system_prompt, out_dir / "heldout_tagged.parquet",
                                     name="heldout_tagged")
        if cfg.curation.auc_examples:
            auc_records = frame_to_records(heldout.read())[: cfg.curation.auc_examples]
    on_score = (progress or _silent)(f"{stage} score")
    per_iteration: list[dict[str, float]] = []
    checks: list[CuratorCheck] = []
    choice: MethodChoice | None = None
    cur = cfg.curation  # the curation settings with the chosen method (auto resolved after the first measure)

    def measure(model: ModelRef, it: int) -> CuratorCheck:
        nonlocal choice, cur
        q = curator_auc(model, auc_records, cfg=cfg, training=forward_cfg, methods=METHODS,
                        trust_remote_code=trust_remote_code, on_progress=on_score) if auc_records else {}
        if choice is None:  # auto picks by the first curator's AUCs and keeps its pick for later iterations
            choice = choose_method(q, cfg.curation)
            cur = resolved(cfg.curation, choice.method)
        q = with_chosen(q, cur.method)
        per_iteration.append(q)
        check = check_curator(q, cur, iteration=it)  # raises CuratorBelowMinAuc with fail
        checks.append(check)
        if check.status != "ok":
            run_logger("sftflow.backtranslate").warning("%s", check.message())
        return check

    skipped = measure(curation, 1).below and cur.below_min_auc == "skip"

    # 4. self-augmentation: one candidate instruction per segment, batched (none when skipped)
    if skipped:
        rows += [candidate_row(seg, status=NOT_CURATED, reason="curator_below_min_auc", detail=checks[0].message())
                 for seg in accepted]
        generated: list[dict[str, Any]] = []
    else:
        generated = generate_candidates(backward, accepted, cfg=cfg, template_setting=backward_cfg.template,
                                        trust_remote_code=trust_remote_code, progress=progress,
                                        label=f"{stage} generate instructions") if accepted else []
    to_score = [r for r in generated if r["status"] != REJECTED]

    # 5. self-curation with the chosen method, optional iterations with M_k
    iteration_kept: list[int] = []
    iteration_rows: list[dict[str, Any]] = []
    rule = cur.keep_rule
    for it in range(1, (0 if skipped else cfg.iterations) + 1):
        if it > 1:
            # M_k: seed + the pairs curated so far, both tagged, as in the paper's iteration.
            kept_rows = [r for r in to_score if r["status"] == KEPT]
            mix = pd.concat([seed_tagged.read(), records_to_frame(
                curated_records(kept_rows, system_prompt=cfg.augmented_system_prompt))], ignore_index=True)
            mix_ref = write_parquet(mix, out_dir / f"train_iter{it}.parquet", name=f"curation_train_iter{it}")
            helpers.append(train_helper(run_name=f"{stage}.curation_iter{it}", data=mix_ref, base=base,
                                        cfg=forward_cfg, work_root=work_root, trust_remote_code=trust_remote_code,
                                        retrain=retrain))
            if measure(helpers[-1].output.model, it).below and cur.below_min_auc == "skip":
                break  # M_k does not curate: the pairs M_(k-1) kept stay (its check passed or warned)
            curation = helpers[-1].output.model
        scores = method_scores(curation, [(r["instruction"], r["segment"]) for r in to_score],
                               method=cur.method, cfg=cfg, training=forward_cfg,
                               trust_remote_code=trust_remote_code, on_progress=on_score) if to_score else []
        keep, details = keep_decision(scores, cur)
        for r, sc, k, detail in zip(to_score, scores, keep, details):
            r.update(sc, status=KEPT if k else BELOW, detail=detail,
                     reason="" if k else ("below_top_fraction" if rule == "top_fraction" else "below_threshold"))
            if cur.method == "rubric":
                r[f"expected_iter{it}"] = sc["expected"]
            r[f"score_iter{it}"] = sc["score"]
        iteration_kept.append(sum(keep))
        iteration_rows.append(_iteration_summary(it, scores, keep, checks[-1]))

    # 6. quality of the helpers: does M_yx end its instructions, can the curator (the last one that
    #    curated, or the one that was refused) tell a true answer from another question's answer?
    # Logged here, not when chosen: a module logger created before the training stack configures
    # logging (dictConfig disables existing loggers) would swallow the min_auc warnings above.
    if choice is not None:
        run_logger("sftflow.backtranslate").info("curation method: %s", choice.reason)
    quality: dict[str, float] = {}
    if generated:
        quality["backward_finished_rate"] = sum(bool(r["finished"]) for r in generated) / len(generated)
    final = checks[-1]
    quality.update(per_iteration[-1])
    if final.status != "unmeasured":
        quality.update(curator_min_auc=final.min_auc, curator_below_min_auc=float(final.below))
    if len(per_iteration) > 1:
        for it, q in enumerate(per_iteration, start=1):
            quality.update({f"{k}_iter{it}": v for k, v in q.items() if k.startswith("curator_auc_")})

    # 7. outputs: the audit table, the tagged curated records
    frame = pd.DataFrame(rows + generated)
    for col in CANDIDATE_COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    extra = sorted(c for c in frame.columns if c not in CANDIDATE_COLUMNS)
    frame = frame[list(CANDIDATE_COLUMNS) + extra]
    counts = accounting(frame)
    candidates_ref = write_parquet(frame, out_dir / "candidates.parquet", name="backtranslation_candidates")
    kept_rows = [r for r in generated if r["status"] == KEPT]
    curated_ref = write_parquet(records_to_frame(curated_records(kept_rows, system_prompt=cfg.augmented_system_prompt)),
                                out_dir / "curated.parquet", name="curated")
    report = write_report(out_dir / "report.json", counts=counts, quality=quality, cfg=cfg, checks=checks,
                          per_iteration=per_iteration, iteration_kept=iteration_kept, skipped=skipped,
                          choice=choice, iterations=iteration_rows)
    return AugmentOutput(curated=curated_ref, candidates=candidates_ref, seed=seed_tagged, reversed=reversed_ref,
                         backward_model=backward, curation_model=curation, counts=tuple(sorted(counts.items())),
                         iteration_kept=tuple(iteration_kept), helpers=tuple(helpers), heldout=heldout_tagged,
                         quality=tuple(sorted(quality.items())), checks=tuple(checks), report=str(report),
                         choice=choice, per_iteration=tuple(iteration_rows))

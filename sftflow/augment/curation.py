"""Self-curation: how a pair is scored, how well the scorer discriminates, what is kept, and the min_auc check.

Methods (``augmentation.curation.method``), each a score per (instruction x, answer y) pair:

* ``rubric``: the Humpback paper's 1-5 rating prompt, read from the digit logits after ``Score:``
  (``sftflow.inference.batch.score_texts``); the score is the expected rating.
* ``pmi``: per-token pointwise mutual information of the answer and the instruction under the
  curation model, ``mean_t [log p(y_t | x, y_<t) - log p(y_t | y_<t)]`` in nats per answer token.
  ``log p(y_t | y_<t)`` is the same answer after an EMPTY user turn in the same chat template
  (same template tokens, same answer tokens, no instruction): what the model expects of an
  assistant answer in general, so the difference is what the instruction adds. A generic,
  fluent segment that any prompt would make likely scores near 0; a segment the instruction
  really asks for scores high.
* ``loglik``: ``mean_t log p(y_t | x, y_<t)`` (raw conditional likelihood; favours predictable
  text whatever the instruction, kept for comparison).

Both likelihood methods come from ``sftflow.inference.batch.loglik_texts`` (in process or Ray
Data actors); the answer's end-of-turn marker is not scored.

Quality: ``curator_auc`` scores each held-out row's true pair and a mismatched pair (the next
row's answer) with EVERY method and reports each method's AUC, so a user can choose; the chosen
method's AUC is checked against ``min_auc`` (``check_curator``): below it, ``below_min_auc``
warns (curate anyway, loudly), skips (curate nothing) or fails (``CuratorBelowMinAuc``).

``auto`` (the default) measures every method first and curates with the one of highest held-out AUC
(``choose_method``; its reason goes in the report); min_auc then applies to the chosen one.

Keep rule (``curation.keep_rule``): ``threshold`` (rubric: expected >= ``threshold``; pmi/loglik:
score >= ``min_score``), ``score5`` (rubric: most likely rating 5, the paper's rule) or
``top_fraction`` (the best ``top_fraction`` of scored pairs: the paper's "keep the top-rated"
for scores without a fixed scale; the default for pmi/loglik).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sftflow.augment.pairs import select_at_least, select_pairs, select_top_fraction
from sftflow.config_sections import AugmentationConfig, CurationConfig, TrainingConfig
from sftflow.data.refs import ModelRef
from sftflow.errors import UserError
from sftflow.inference.batch import ModelHandle, loglik_texts, score_texts

METHODS = ("rubric", "pmi", "loglik")
LIKELIHOOD = ("pmi", "loglik")
# Candidate-table columns each method fills ("score" is always the chosen method's score).
METHOD_COLUMNS = {"rubric": ("probs", "expected", "argmax", "mass"), "pmi": ("loglik", "pmi", "answer_tokens"),
                  "loglik": ("loglik", "pmi", "answer_tokens")}
SCORE_UNITS = {"rubric": "expected rating (1-5)", "pmi": "PMI (nats per answer token)",
               "loglik": "log p(answer | instruction) (nats per token)"}

OnProgress = Callable[[int, int], None] | None


class CuratorBelowMinAuc(UserError):
    """The curator's held-out AUC is below ``augmentation.curation.min_auc`` and ``below_min_auc`` is ``fail``."""

    label = "curator below min_auc"


@dataclass(frozen=True)
class CuratorCheck:
    """The chosen method's held-out AUC against ``min_auc``, and what was done about it.

    Attributes:
        method: the chosen method.
        auc: its AUC on held-out true vs mismatched pairs (NaN: not measured).
        pairs: held-out rows it was measured on.
        min_auc / action: ``curation.min_auc`` / ``curation.below_min_auc``.
        status: ``ok`` (auc >= min_auc), ``below`` or ``unmeasured`` (no held-out rows: not checked).
        iteration: the curation iteration the curator belongs to (1: M0 / base / a named model).
    """

    method: str
    auc: float
    pairs: int
    min_auc: float
    action: str
    status: str
    iteration: int = 1

    @property
    def below(self) -> bool:
        """The AUC was measured and is below ``min_auc``."""
        return self.status == "below"

    def message(self) -> str:
        """One line for the log, the summary and the report."""
        if self.status == "unmeasured":
            return (f"curator ({self.method}, iteration {self.iteration}) not checked: no held-out rows to measure "
                    f"its AUC (augmentation.curation.auc_examples / a held-out split); min_auc {self.min_auc} "
                    "was not applied")
        rel = ">=" if self.status == "ok" else "<"
        text = (f"curator {self.method} (iteration {self.iteration}): held-out AUC {self.auc:.3f} on {self.pairs} "
                f"true vs mismatched pairs {rel} augmentation.curation.min_auc {self.min_auc}")
        if self.status == "below":
            what = {"warn": "curating anyway (below_min_auc: warn): the kept pairs are close to a random pick",
                    "skip": "no pair curated (below_min_auc: skip)",
                    "fail": "stopping (below_min_auc: fail)"}[self.action]
            text += f"; {what}"
        return text


def _mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if not math.isnan(float(v))]
    return float(sum(vals) / len(vals)) if vals else math.nan


def likelihood_scores(model: ModelRef | ModelHandle, pairs: Sequence[tuple[str, str]], *, cfg: AugmentationConfig,
                      training: TrainingConfig, trust_remote_code: bool = False,
                      on_progress: OnProgress = None) -> list[dict[str, float]]:
    """``loglik``, ``pmi`` (nats per answer token) and ``answer_tokens`` of each (instruction, answer) pair.

    Two passes through ``loglik_texts``: the pairs, and each distinct answer after an empty user
    turn (the PMI reference; a repeated answer, as in true vs mismatched pairs, is scored once).
    An empty answer has NaN scores.
    """
    pairs = [(str(q), str(a)) for q, a in pairs]
    if not pairs:
        return []
    kw = dict(template=training.template, batch_size=cfg.curation.batch_size, dtype=cfg.generation.dtype,
              trust_remote_code=trust_remote_code)
    answers = list(dict.fromkeys(a for _, a in pairs))
    total = len(pairs) + len(answers)

    def part(offset: int) -> OnProgress:
        return None if on_progress is None else (lambda done, _n: on_progress(offset + done, total))

    cond = loglik_texts(model, pairs, on_progress=part(0), **kw)
    ref = dict(zip(answers, loglik_texts(model, [("", a) for a in answers], on_progress=part(len(pairs)), **kw)))
    out = []
    for (_, a), c in zip(pairs, cond):
        u = ref[a]
        if len(u) != len(c):  # the same answer tokens under both prompts, by construction (loglik.answer_row)
            raise RuntimeError(f"answer tokenised differently with and without its instruction ({len(c)} vs {len(u)})")
        n = len(c)
        out.append({"loglik": sum(c) / n if n else math.nan,
                    "pmi": (sum(c) - sum(u)) / n if n else math.nan, "answer_tokens": float(n)})
    return out


def method_scores(model: ModelRef | ModelHandle, pairs: Sequence[tuple[str, str]], *, method: str,
                  cfg: AugmentationConfig, training: TrainingConfig, trust_remote_code: bool = False,
                  on_progress: OnProgress = None) -> list[dict[str, Any]]:
    """Candidate-table columns of each pair under ``method``: ``score`` plus ``METHOD_COLUMNS[method]``.

    Raises:
        ValueError: an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"augmentation.curation.method: {method!r} is not one of {list(METHODS)}")
    if not pairs:
        return []
    if method == "rubric":
        scores = score_texts(model, [(str(q), str(a)) for q, a in pairs], template=training.template,
                             batch_size=cfg.curation.batch_size, dtype=cfg.generation.dtype,
                             trust_remote_code=trust_remote_code, on_progress=on_progress)
        return [{"probs": list(s.probs), "expected": s.expected, "argmax": s.argmax, "mass": s.mass,
                 "score": s.expected} for s in scores]
    rows = likelihood_scores(model, pairs, cfg=cfg, training=training, trust_remote_code=trust_remote_code,
                             on_progress=on_progress)
    return [{**r, "score": r[method]} for r in rows]


def all_method_scores(model: ModelRef | ModelHandle, pairs: Sequence[tuple[str, str]], *, methods: Sequence[str],
                      cfg: AugmentationConfig, training: TrainingConfig, trust_remote_code: bool = False,
                      on_progress: OnProgress = None) -> dict[str, list[float]]:
    """The score of every pair under each of ``methods`` (pmi and loglik share their passes)."""
    out: dict[str, list[float]] = {}
    if "rubric" in methods:
        out["rubric"] = [r["score"] for r in method_scores(model, pairs, method="rubric", cfg=cfg, training=training,
                                                              trust_remote_code=trust_remote_code,
                                                              on_progress=on_progress)]
    if any(m in LIKELIHOOD for m in methods):
        rows = likelihood_scores(model, pairs, cfg=cfg, training=training, trust_remote_code=trust_remote_code,
                                 on_progress=on_progress)
        for m in LIKELIHOOD:
            if m in methods:
                out[m] = [r[m] for r in rows]
    return {m: out[m] for m in methods}


def curator_auc(curation: ModelRef, records: Sequence[dict[str, Any]], *, cfg: AugmentationConfig,
                training: TrainingConfig, methods: Sequence[str] = METHODS, trust_remote_code: bool = False,
                on_progress: OnProgress = None) -> dict[str, float]:
    """How well each method separates a row's true answer from another row's answer.

    Each held-out row gives a true pair (its instruction, its answer) and a mismatched pair (its
    instruction, the next row's answer); every method in ``methods`` scores both sets with the
    curation model (loaded once). A method's AUC is the chance that a true pair outscores a
    mismatched one: 0.5 is a curator that cannot tell them apart.

    Returns:
        Per method ``m``: ``curator_auc_<m>``, ``curator_true_mean_<m>``, ``curator_mismatched_mean_<m>``;
        for the chosen method (``curation.method``, when in ``methods``) also ``curator_auc``,
        ``curator_true_mean``, ``curator_mismatched_mean``; and ``curator_auc_pairs``. Empty with
        fewer than two usable rows.
    """
    from sftflow.data.records import prompt_text, response_text
    from sftflow.stats import auc

    rows = [(prompt_text(r["messages"]), response_text(r["messages"])) for r in records]
    rows = [(q, a) for q, a in rows if q.strip() and a.strip()]
    if len(rows) < 2:
        return {}
    true = list(rows)
    mismatched = [(q, rows[(i + 1) % len(rows)][1]) for i, (q, _) in enumerate(rows)]
    handle = ModelHandle(curation, dtype=cfg.generation.dtype, trust_remote_code=trust_remote_code)
    try:
        scores = all_method_scores(handle, true + mismatched, methods=list(methods), cfg=cfg, training=training,
                                   trust_remote_code=trust_remote_code, on_progress=on_progress)
    finally:
        handle.close()
    out: dict[str, float] = {"curator_auc_pairs": float(len(rows))}
    for m, s in scores.items():
        pos, neg = s[: len(true)], s[len(true):]
        out.update({f"curator_auc_{m}": auc(pos, neg), f"curator_true_mean_{m}": _mean(pos),
                    f"curator_mismatched_mean_{m}": _mean(neg)})
        if m == cfg.curation.method:
            out.update({"curator_auc": out[f"curator_auc_{m}"], "curator_true_mean": out[f"curator_true_mean_{m}"],
                        "curator_mismatched_mean": out[f"curator_mismatched_mean_{m}"]})
    return out


@dataclass(frozen=True)
class MethodChoice:
    """Which method curates, and why (``curation.method: auto`` picks it from the held-out AUCs).

    Attributes:
        method: the method that scores and keeps pairs.
        configured: ``curation.method`` as configured (``auto`` or the method itself).
        reason: one sentence for the log, the summary and ``report.json``.
    """

    method: str
    configured: str
    reason: str


# With no held-out AUC to choose by, auto curates with per-token PMI: on the demo's held-out pairs it
# separated true from mismatched answers best (bench/curator_auc.py), and it needs no rating prompt.
AUTO_FALLBACK = "pmi"


def choose_method(quality: dict[str, float], cfg: CurationConfig) -> MethodChoice:
    """The curation method: ``cfg.method`` when named, else (``auto``) the method with the highest held-out
    AUC in ``quality`` (``curator_auc`` output); a tie goes to pmi, then loglik, then the rubric (the
    likelihood methods are cheaper), and with no AUC measured the choice is ``AUTO_FALLBACK``."""
    if cfg.method != "auto":
        return MethodChoice(cfg.method, cfg.method, f"{cfg.method} (configured: augmentation.curation.method)")
    measured = {m: float(quality[f"curator_auc_{m}"]) for m in (*LIKELIHOOD, "rubric")
                if not math.isnan(float(quality.get(f"curator_auc_{m}", math.nan)))}
    if not measured:
        return MethodChoice(AUTO_FALLBACK, "auto", f"{AUTO_FALLBACK} (auto: no held-out AUC measured, "
                                                   f"{AUTO_FALLBACK} is the default likelihood curator)")
    best = max(measured, key=lambda m: measured[m])  # max keeps the first of equal values
    others = ", ".join(f"{m} {v:.3f}" for m, v in sorted(measured.items(), key=lambda kv: -kv[1]) if m != best)
    pairs = int(quality.get("curator_auc_pairs", 0))
    return MethodChoice(best, "auto", f"{best} (auto: highest held-out AUC {measured[best]:.3f} on {pairs} true vs "
                                      f"mismatched pairs" + (f"; {others}" if others else "") + ")")


def resolved(cfg: CurationConfig, method: str) -> CurationConfig:
    """``cfg`` with ``method`` in place of ``auto``; auto's keep rule (``top_fraction``) stays whatever is chosen."""
    if cfg.method == method:
        return cfg
    return cfg.model_copy(update={"method": method, "keep": cfg.keep or "top_fraction"})


def with_chosen(quality: dict[str, float], method: str) -> dict[str, float]:
    """``quality`` plus the chosen method's figures under the unsuffixed keys (``curator_auc`` ...)."""
    out = dict(quality)
    for key in ("curator_auc", "curator_true_mean", "curator_mismatched_mean"):
        if f"{key}_{method}" in quality:
            out[key] = quality[f"{key}_{method}"]
    return out


def check_curator(quality: dict[str, float], cfg: CurationConfig, *, iteration: int = 1) -> CuratorCheck:
    """The chosen method's AUC (``quality`` from ``curator_auc``) against ``min_auc``.

    Raises:
        CuratorBelowMinAuc: below ``min_auc`` with ``below_min_auc: fail`` (names the keys and the AUC).
    """
    if cfg.method == "auto":  # the check applies to the method auto chooses from these AUCs
        cfg = resolved(cfg, choose_method(quality, cfg).method)
    value = quality.get(f"curator_auc_{cfg.method}", math.nan)
    pairs = int(quality.get("curator_auc_pairs", 0))
    status = "unmeasured" if math.isnan(value) else ("ok" if value >= cfg.min_auc else "below")
    check = CuratorCheck(method=cfg.method, auc=float(value), pairs=pairs, min_auc=cfg.min_auc,
                         action=cfg.below_min_auc, status=status, iteration=iteration)
    if check.below and cfg.below_min_auc == "fail":
        others = ", ".join(f"{m} {quality[f'curator_auc_{m}']:.3f}" for m in METHODS
                           if m != cfg.method and f"curator_auc_{m}" in quality)
        raise CuratorBelowMinAuc(
            f"augmentation.curation.min_auc: the {cfg.method} curator's held-out AUC is {value:.3f} on {pairs} true "
            f"vs mismatched pairs, below min_auc {cfg.min_auc} (augmentation.curation.below_min_auc: fail)"
            + (f"; other methods: {others}" if others else "")
            + ". Choose another augmentation.curation.method, lower min_auc, or set below_min_auc to warn or skip")
    return check


def keep_decision(rows: Sequence[dict[str, Any]], cfg: CurationConfig) -> tuple[list[bool], list[str]]:
    """The keep flag and its reason in words for each scored row (``method_scores`` columns), per ``keep_rule``."""
    rule = cfg.keep_rule
    scores = [float(r["score"]) for r in rows]
    if cfg.method == "rubric" and rule in ("threshold", "score5"):
        from types import SimpleNamespace

        return select_pairs([SimpleNamespace(expected=float(r["expected"]), argmax=int(r["argmax"])) for r in rows],
                            keep=rule, threshold=cfg.threshold)
    if rule == "top_fraction":
        return select_top_fraction(scores, cfg.top_fraction)
    if rule == "threshold" and cfg.min_score is not None:  # the config requires min_score here
        return select_at_least(scores, cfg.min_score)
    raise ValueError(f"augmentation.curation.keep: {rule} does not apply to method {cfg.method}")

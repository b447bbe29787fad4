"""The typed results stages return to the flow: small, frozen, hashable references + counts.

One light module (no torch, no Prefect, no MLflow) so that the flow, every stage and the tests
share one definition, and so that Prefect can persist and compare them cheaply. Stages fill them;
nothing here does work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sftflow.data.refs import DatasetRef, ModelRef

# The ``set`` of held-out rows in evaluation samples (extra eval sets carry their own names).
HELDOUT_SET = "heldout"


@dataclass(frozen=True)
class SourceCounts:
    """Row accounting of one source: ``read = kept + quarantined``; ``kept = mixed + not_sampled``.

    A Self-Instruct task with several instances counts one row per instance.
    """

    source: str
    formats: str
    files: int
    read: int
    kept: int
    quarantined: int
    mixed: int
    not_sampled: int
    # Keys the rows carried that their format does not read, as (key, rows) pairs (turn keys: ``turn.<key>``).
    unknown_keys: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class SourceFile:
    """One file (or folder, or hub dataset) a source read, for lineage.

    Attributes:
        source: the source's name.
        path: the file path (a hub id for a hub source).
        sha256: sha256 of the exact bytes that were parsed (a folder: ``sftflow.digests.dir_sha256`` of it, taken
            just before loading; a hub dataset: "" as no local bytes exist).
        rows: rows read from it (quarantined ones included; a Self-Instruct task counts one per instance).
    """

    source: str
    path: str
    sha256: str
    rows: int


@dataclass(frozen=True)
class IngestResult:
    """What ingestion wrote.

    Attributes:
        dataset: canonical records of every source, mixed (``ingest/dataset.parquet``).
        quarantine: bad rows with reasons (``ingest/quarantine.parquet``; may have 0 rows).
        counts: one ``SourceCounts`` per source, in config order.
        files: one ``SourceFile`` (source, path, sha256 of the bytes parsed, rows) per file read,
            in reading order: the digests lineage records are these, never a re-read.
    """

    dataset: DatasetRef
    quarantine: DatasetRef
    counts: tuple[SourceCounts, ...] = field(default_factory=tuple)
    files: tuple[SourceFile, ...] = field(default_factory=tuple)

    def mixture(self) -> dict[str, float]:
        """Realised share of each source in the output dataset."""
        total = sum(c.mixed for c in self.counts) or 1
        return {c.source: c.mixed / total for c in self.counts}


@dataclass(frozen=True)
class ValidateResult:
    """What validation wrote.

    Attributes:
        valid: rows that passed every row-level expectation (canonical columns).
        quarantine: rows that failed, with the failed expectation(s) as reason.
        gx_result: path of the GX validation result JSON.
        data_docs: path of the Data Docs ``index.html`` ("" when ``data_docs`` is off).
    """

    valid: DatasetRef
    quarantine: DatasetRef
    gx_result: str
    data_docs: str


@dataclass(frozen=True)
class DedupResult:
    """What the dedup stage hands on.

    Attributes:
        kept: rows that stay (same columns as the input).
        removed: removed rows, with ``cluster_id``, ``kept_id``, ``matched_id``, ``reason``, ``similarity``.
        report: path of the JSON report (also logged to MLflow).
    """

    kept: DatasetRef
    removed: DatasetRef
    report: str


@dataclass(frozen=True)
class SplitResult:
    """The two sides of the split.

    Attributes:
        train: training rows (``split/train.parquet``).
        heldout: held-out rows (``split/heldout.parquet``).
        leaks_moved: held-out rows that leaked into train (exact + near) and were moved or dropped.
        leaks_exact: of those, rows whose normalized prompt equals a training prompt.
        leaks_near: of those, near-duplicate prompts (``sftflow.data.neardup.find_cross_duplicates``).
        dropped: rows removed (``cross_split: drop``), in ``split/leaks.parquet``.
        report: path of ``split/report.json``.
    """

    train: DatasetRef
    heldout: DatasetRef
    leaks_moved: int
    leaks_exact: int = 0
    leaks_near: int = 0
    dropped: int = 0
    report: str = ""


@dataclass(frozen=True)
class AugmentResult:
    """What the flow receives (small, hashable refs).

    Attributes:
        curated: curated pairs (canonical records), to validate and dedup like any data.
        candidates: the candidate audit table (Parquet).
        backward_model: M_yx.
        curation_model: the model that scored the kept pairs.
        seed: the seed data tagged with ``seed_system_prompt`` (train on this + curated).
        counts: the accounting, as (name, value) pairs.
        heldout: the held-out set tagged like the seed: evaluate and train's eval loss use it, so
            their prompts are built exactly as the training rows (None: no held-out was given).
        quality: curator AUC, backward-model finished rate, as (name, value) pairs.
    """

    curated: DatasetRef
    candidates: DatasetRef
    backward_model: ModelRef
    curation_model: ModelRef
    seed: DatasetRef | None = None
    counts: tuple[tuple[str, int], ...] = ()
    heldout: DatasetRef | None = None
    quality: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class RejectionResult:
    """What rejection sampling (``tasks.rejection``) returns to the flow.

    Attributes:
        selected: the selected samples as canonical records (``origin=rejection_sampled``).
        candidates: every sample (prompt id, sample index, response, score, finished, kept, reason).
        train_round2: the round-1 training data + ``selected``: what round 2 trains on.
        counts: the accounting (prompts in = kept + rejected by reason), as (name, value) pairs.
    """

    selected: DatasetRef
    candidates: DatasetRef
    train_round2: DatasetRef
    counts: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class TrainResult:
    """What ``train_task`` returns to the flow (per ARCHITECTURE.md)."""

    model: ModelRef
    run_id: str
    model_uri: str
    registered_name: str
    registered_version: str
    metrics: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class EvalResult:
    """Outcome of one evaluation.

    Attributes:
        label: which model was evaluated (``base``, ``tuned``, ``champion``...).
        metrics: ``(name, value)`` pairs, unprefixed (``rougeL``, ``eval_loss``; extra sets as
            ``<set>/rougeL``); the task logs them as ``<label>/<name>``.
        samples: per-row outputs (``set, id, prompt, reference, output, rougeL, ...``).
        heldout_sha256: digest of the held-out set that was evaluated.
        eval_key: digest of everything that makes two evaluations comparable (held-out digest,
            extra sets, generation settings, template, the judge's digest); the gate re-evaluates a
            champion whose recorded key differs.
        judge: the judge model that scored the outputs (None without ``evaluation.judge``); a
            re-evaluated champion is scored by the same one.
        judge_sha256: the judge's content digest (``sftflow.inference.judges.scorer_digest``; ""
            without a judge); the gate refuses to compare evaluations whose judges differ.
    """

    label: str
    metrics: tuple[tuple[str, float], ...]
    samples: DatasetRef
    heldout_sha256: str = ""
    eval_key: str = ""
    judge: ModelRef | None = None
    judge_sha256: str = ""

    def metrics_dict(self) -> dict[str, float]:
        """``metrics`` as a dict."""
        return dict(self.metrics)

    def metric(self, name: str) -> float:
        """One metric by name; accepts ``<label>/<name>`` too. Raises KeyError naming the known ones."""
        d = self.metrics_dict()
        if name in d:
            return d[name]
        prefix = f"{self.label}/"
        if name.startswith(prefix) and name[len(prefix):] in d:
            return d[name[len(prefix):]]
        raise KeyError(f"metric {name!r} not in the {self.label} evaluation; known: {sorted(d)}")


@dataclass(frozen=True)
class PromotionDecision:
    """What the gate did, with its numbers (returned to the flow, recorded in MLflow).

    Attributes:
        promoted: the candidate version now holds ``champion``.
        reason: the gate's sentence.
        metric / direction / min_improvement: the configured gate.
        base_value / tuned_value: the two evaluations' values.
        champion_value: the previous champion's value on this held-out set (None: no champion).
        champion_version: the previous champion's version ("" when none).
        champion_reevaluated: the champion was evaluated again here (its held-out set differed).
        registered_name / registered_version: the candidate model version.
        deltas: tuned - base for every shared metric.
        judge_sha256: the content digest of the judge that scored base and tuned ("" without one).
    """

    promoted: bool
    reason: str
    metric: str
    direction: str
    min_improvement: float
    base_value: float
    tuned_value: float
    champion_value: float | None
    champion_version: str
    champion_reevaluated: bool
    registered_name: str
    registered_version: str
    deltas: tuple[tuple[str, float], ...] = ()
    ci_low: float | None = None
    ci_high: float | None = None
    confidence: float | None = None
    n_examples: int = 0
    champion_ci_low: float | None = None
    champion_ci_high: float | None = None
    judge_sha256: str = ""

    def summary(self) -> dict[str, Any]:
        """JSON-able dict (for the flow summary and ``promotion/decision.json``)."""
        d = asdict(self)
        d["deltas"] = dict(self.deltas)
        return d

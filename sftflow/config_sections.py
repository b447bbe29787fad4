"""The per-stage sections of ``pipelines.yaml``: one typed pydantic model each (unknown keys refused, frozen).

``sftflow.config`` (the public entry: ``PipelineConfig``, ``load_pipelines``, ``resolve_pipeline``) assembles a
pipeline from them. Also here, as the sections need them: ``ConfigError``, the name rule (``SafeName``), ``format_errors``
(``key.path: expected ... (got ...)`` lines), ``merge_training`` (``AugmentationConfig.backward``, ``.round2``).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Annotated, Union, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sftflow.errors import EXIT_CONFIG, UserError


class ConfigError(UserError, ValueError):
    """pipelines.yaml (or an override) is invalid; the message names the key path.

    A user error: the CLI prints the message without a traceback and exits with ``EXIT_CONFIG`` (2).
    """

    exit_code = EXIT_CONFIG
    label = "invalid configuration"


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# Names that become folder names (runs/<pipeline>/), registered model names (models:/<name>@alias),
# metric prefixes (<extra set>/rougeL) or row tags: one path component, no traversal.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a pipeline / source / model name (None when it can)."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        return (f"must match {NAME_PATTERN} (letters, digits, '.', '_', '-'; starts with a letter or digit; "
                "at most 64 characters; no '..')")
    return None


def _safe_name(name: str) -> str:
    problem = name_problem(name)
    if problem:
        raise ValueError(problem)
    return name


SafeName = Annotated[str, AfterValidator(_safe_name)]


# --------------------------------------------------------------------------- sources / ingest
class SourceConfig(Section):
    """One input dataset."""

    name: SafeName = Field(description="source name, recorded in every row's `source`")
    path: Optional[str] = Field(None, description="file, glob or datasets.save_to_disk folder")
    hub: Optional[str] = Field(None, description="hub dataset id (needs a reachable hub)")
    hub_split: str = "train"
    format: Literal["auto", "alpaca", "dolly", "human_assistant", "messages", "self_instruct", "sharegpt",
                    "gsm8k"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="rename map: file column -> expected column")
    preference: Optional[Literal["chosen"]] = Field(
        None, description="preference (DPO) rows {chosen, rejected}: `chosen` trains on the chosen response; "
                          "unset: such rows are quarantined")
    reasoning: Literal["keep", "drop"] = Field(
        "keep", description="content parts of type `reasoning`: keep as <think>…</think> before the answer, or drop")
    weight: Optional[float] = Field(None, gt=0, description="relative sampling weight in the mixture")
    max_rows: Optional[int] = Field(None, gt=0, description="cap on rows taken from this source")
    category: Optional[str] = Field(None, description="category for rows that carry none")

    @model_validator(mode="after")
    def _one_location(self) -> "SourceConfig":
        if bool(self.path) == bool(self.hub):
            raise ValueError("give exactly one of `path` or `hub`")
        return self


class IngestConfig(Section):
    """Ingestion limits."""

    max_quarantine_fraction: float = Field(0.2, ge=0, le=1)
    max_record_chars: int = Field(50_000, gt=0, description="longer rows are quarantined as absurdly long")
    mixture_seed: int = 0


# --------------------------------------------------------------------------- validation
class ValidationConfig(Section):
    """Bounds of the Great Expectations suite."""

    min_prompt_chars: int = Field(1, ge=0)
    min_response_chars: int = Field(1, ge=0)
    max_chars: int = Field(20_000, gt=0)
    max_tokens: Optional[int] = Field(2048, gt=0, description="token bound, counted with the base model's tokenizer")
    max_non_printable_fraction: float = Field(0.01, ge=0, le=1)
    max_suite_failure_fraction: float = Field(0.2, ge=0, le=1, description="fail the stage above this bad-row fraction")
    data_docs: bool = True


# --------------------------------------------------------------------------- dedup
class ExactDedupConfig(Section):
    enabled: bool = True
    key: Literal["prompt", "prompt_response", "response"] = "prompt_response"
    lowercase: bool = True
    unicode_normalize: bool = True
    strip_punctuation: bool = True
    collapse_whitespace: bool = True


class NearDedupConfig(Section):
    enabled: bool = True
    key: Literal["prompt", "prompt_response", "response"] = "prompt_response"
    shingle: Literal["word", "char"] = "word"
    ngram: int = Field(5, gt=0)
    num_perm: int = Field(128, gt=0)
    threshold: float = Field(0.8, gt=0, le=1)
    bands: Optional[int] = Field(None, gt=0)
    rows: Optional[int] = Field(None, gt=0)
    verify: Literal["exact", "estimate"] = "exact"
    seed: int = 1

    @model_validator(mode="after")
    def _banding_fits(self) -> "NearDedupConfig":
        # The LSH engine refuses it too, but only when the dedup stage starts (after ingest and validation).
        if self.bands is not None and self.rows is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands} x {self.rows} = {self.bands * self.rows} exceeds "
                             f"num_perm = {self.num_perm}; lower them or raise num_perm")
        return self


class SemanticDedupConfig(Section):
    enabled: bool = False
    model: str = "all-MiniLM-L6-v2"
    threshold: float = Field(0.95, gt=0, le=1)


class DedupConfig(Section):
    enabled: bool = True
    exact: ExactDedupConfig = ExactDedupConfig()
    near: NearDedupConfig = NearDedupConfig()
    semantic: SemanticDedupConfig = SemanticDedupConfig()
    keep: Literal["longest_response", "first", "source_priority"] = "longest_response"
    source_priority: list[str] = Field(default_factory=list)
    cross_split: Literal["move", "drop"] = "move"

    @model_validator(mode="after")
    def _priority_when_needed(self) -> "DedupConfig":
        if self.keep == "source_priority" and not self.source_priority:
            raise ValueError("keep is `source_priority` but `source_priority` (a list of source names) is empty")
        return self


# --------------------------------------------------------------------------- split
class SplitConfig(Section):
    heldout_fraction: Optional[float] = Field(0.1, gt=0, lt=1)
    heldout_size: Optional[int] = Field(None, gt=0, description="overrides heldout_fraction when set")
    stratify_by: Optional[Literal["source", "category"]] = None
    seed: int = 0

    @model_validator(mode="after")
    def _a_heldout_size(self) -> "SplitConfig":
        # The split stage refuses it too, but only after ingest, validation and dedup ran.
        if self.heldout_fraction is None and self.heldout_size is None:
            raise ValueError("give heldout_fraction or heldout_size (both are null)")
        return self


# --------------------------------------------------------------------------- training
class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class FormatDiversificationConfig(Section):
    """Render a share of the training rows with varied prompt wrappers (``sftflow.data.wrappers``)."""

    share: float = Field(0.0, ge=0, le=1, description="fraction of training rows whose user turns get a wrapper")
    wrappers: list[str] = Field(
        default_factory=lambda: ["instruction_response", "qa", "human_assistant", "system_line", "alpaca",
                                 "task_colon"],
        min_length=1, description="wrapper names (sftflow/data/wrappers.py WRAPPER_NAMES) the wrapped rows draw from")

    @model_validator(mode="after")
    def _known_wrappers(self) -> "FormatDiversificationConfig":
        from sftflow.data.wrappers import WRAPPER_NAMES

        unknown = [w for w in self.wrappers if w not in WRAPPER_NAMES]
        if unknown:
            raise ValueError(f"unknown wrappers {unknown}; allowed: {list(WRAPPER_NAMES)}")
        return self


class TrainingConfig(Section):
    """SFT hyper-parameters; defaults follow common SFT practice."""

    method: Literal["lora", "dora", "rslora", "full", "qlora"] = "lora"
    lora: LoraConfig = LoraConfig()
    template: Optional[Literal["gemma", "chatml"]] = Field(
        None, description="prompt template for models without a chat template (None: the model's own, else gemma)"
    )
    learning_rate: Optional[float] = Field(
        None, gt=0, description="peak learning rate (None: 2e-4 for lora/dora/rslora/qlora, 2e-5 for full)"
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="overrides epochs when set")
    max_seq_len: int = Field(512, gt=8)
    overlong: Literal["truncate", "drop"] = "truncate"
    packing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    neftune_alpha: Optional[float] = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: Optional[int] = Field(None, gt=0, description="steps between held-out eval losses")
    early_stopping_patience: Optional[int] = Field(None, gt=0)
    checkpoint_every: Optional[int] = Field(50, gt=0)
    keep_checkpoints: int = Field(1, gt=0, description="how many recent checkpoints to keep on disk")
    num_processes: int = Field(
        1, gt=0,
        description="data-parallel training processes (DDP under torchrun; gloo on CPU, NCCL with one GPU per "
                    "process); the global batch is batch_size x grad_accum x num_processes",
    )
    log_every: int = Field(10, gt=0, description="steps between progress log lines")
    merge: bool = True
    seed: int = 0
    trainable_tokens: Union[Literal["auto", "none"], list[Union[str, int]]] = Field(
        "auto",
        description="embedding/output rows trained besides the adapter: 'auto' = the template's control tokens "
                    "whose rows look untrained (e.g. Gemma 3 base's <end_of_turn>), 'none', or a list of tokens/ids",
    )
    trainable_tokens_lr: Optional[float] = Field(
        None, gt=0,
        description="peak learning rate of the trainable token rows (default: 25x the adapter's learning rate; "
                    "an untrained row starts far from where it must go and Adam moves each coordinate ~lr per step)",
    )
    format_diversification: FormatDiversificationConfig = Field(
        FormatDiversificationConfig(),
        description="wrap a share of the training prompts in varied instruction formats, inside the chat template "
                    "(deterministic by seed and row id; the held-out set is never wrapped)",
    )


# --------------------------------------------------------------------------- augmentation
class CorpusConfig(Section):
    name: SafeName = "unlabeled"
    path: str
    format: Literal["auto", "wikipedia_leads", "jsonl_text", "text_lines"] = "auto"
    text_field: str = "text"


class GenerationConfig(Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(48, gt=0, le=1024)
    batch_size: int = Field(16, gt=0)
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the backward/curation models run in for generation and scoring"
    )


class CurationConfig(Section):
    model: Literal["forward", "base"] | str = Field("forward", description="forward (M0), base, or a model name/path")
    # How a pair is scored (sftflow/augment/curation.py): rubric = the paper's 1-5 prompt read from
    # digit logits; pmi = mean over answer tokens of log p(y_t|x,y<t) - log p(y_t|y<t), the reference
    # being the answer after an EMPTY user turn in the same template; loglik = mean log p(y_t|x,y<t).
    method: Literal["auto", "rubric", "pmi", "loglik"] = Field(
        "auto", description="auto (the method with the best held-out AUC), rubric (1-5 rating prompt), pmi "
                            "(per-token PMI of answer and instruction, nats), loglik (mean log p(answer|instruction))")
    threshold: float = Field(4.0, ge=1, le=5, description="rubric: keep pairs whose expected score >= threshold")
    keep: Optional[Literal["threshold", "score5", "top_fraction"]] = Field(
        None, description="threshold: rubric expected score >= threshold, pmi/loglik score >= min_score; score5 (rubric "
                    "only): the paper's rule, the most likely rating is 5; top_fraction: the best top_fraction of "
                    "scored pairs; default: threshold for rubric, top_fraction for pmi/loglik",
    )
    top_fraction: float = Field(0.25, gt=0, le=1, description="keep: top_fraction keeps this share of scored pairs")
    min_score: Optional[float] = Field(None, description="pmi/loglik with keep: threshold: keep pairs whose score "
                                                          "(nats per token) >= min_score")
    batch_size: int = Field(8, gt=0)
    auc_examples: int = Field(32, ge=0, description="held-out rows the curator is checked on (AUC of true vs "
                                                   "mismatched answers; 0: off)")
    min_auc: float = Field(0.6, ge=0, le=1, description="the chosen method's held-out AUC below which below_min_auc acts")
    below_min_auc: Literal["warn", "skip", "fail"] = Field(
        "warn", description="curator AUC < min_auc: warn (curate, say so in log, summary and result), skip (curate "
                            "nothing), fail (stop with an error)")

    @model_validator(mode="after")
    def _keep_fits_method(self) -> "CurationConfig":
        if self.method == "auto" and self.keep in ("threshold", "score5"):  # auto keeps the top fraction
            raise ValueError(f"keep: {self.keep} reads one method's scale; method auto may choose any: use keep: "
                             "top_fraction (or name the method)")
        if self.method != "rubric" and self.keep == "score5":
            raise ValueError(f"keep: score5 reads a 1-5 rating; method {self.method} scores in nats per token: "
                             "use keep: top_fraction or keep: threshold with min_score")
        if self.method != "rubric" and self.keep == "threshold" and self.min_score is None:
            raise ValueError(f"keep: threshold with method {self.method} needs min_score (nats per token)")
        return self

    @property
    def keep_rule(self) -> str:
        """``keep`` as configured, else the method's default (rubric: threshold; auto/pmi/loglik: top_fraction)."""
        return self.keep or ("threshold" if self.method == "rubric" else "top_fraction")


class AugmentationConfig(Section):
    enabled: bool = False
    corpus: Optional[CorpusConfig] = None
    max_segments: int = Field(200, gt=0)
    min_words: int = Field(20, ge=1)
    max_words: int = Field(300, ge=1)
    dedup_against_seed: bool = True
    reject_truncated: bool = Field(True, description="reject candidate instructions that hit "
                                   "generation.max_new_tokens without an end-of-turn")
    # Partial TrainingConfig overrides (checked against TrainingConfig by `training_override_errors`,
    # which names the key path); kept as plain dicts so only the keys given override the pipeline's
    # `training` section.
    backward_training: dict[str, Any] = Field(default_factory=dict, description="training overrides for M_yx")
    forward_training: dict[str, Any] = Field(default_factory=dict, description="training overrides for M0")
    generation: GenerationConfig = GenerationConfig()
    curation: CurationConfig = CurationConfig()
    iterations: int = Field(1, ge=1, le=5)
    ablation: bool = Field(False, description="also train a seed-only model at the same steps and report it beside "
                           "seed+curated (the Humpback ablation; costs one more training and evaluation)")
    keep_if_helps: bool = Field(True, description="with ablation: register the better of seed+curated and seed-only "
                                "on the promotion metric (paired bootstrap of the difference on the model version)")
    seed_system_prompt: Optional[str] = "Answer in the style of an AI Assistant."
    augmented_system_prompt: Optional[str] = "Answer with knowledge from web search."

    @model_validator(mode="after")
    def _corpus_when_enabled(self) -> "AugmentationConfig":
        if self.enabled and self.corpus is None:
            raise ValueError("augmentation.enabled is true but no `corpus` is given")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        return self

    def backward(self, training: "TrainingConfig") -> "TrainingConfig":
        """The backward model M_yx's training settings: ``training`` with ``backward_training`` merged in."""
        return self._helper_training(training, "backward_training")

    def forward(self, training: "TrainingConfig") -> "TrainingConfig":
        """The curation models' (M0, M_k) training settings: ``training`` with ``forward_training`` merged in."""
        return self._helper_training(training, "forward_training")

    def _helper_training(self, training: "TrainingConfig", key: str) -> "TrainingConfig":
        # Nested dicts merge key by key. Helper models are used in memory and logged as adapters:
        # no merged copy of the base weights on disk unless the override asks for one.
        try:
            return TrainingConfig.model_validate(merge_training(training, {"merge": False, **getattr(self, key)}))
        except ValidationError as e:
            raise ConfigError(format_errors(e, f"augmentation.{key}")) from None


class RejectionSamplingConfig(Section):
    """Rejection-sampling fine-tuning (RFT / best-of-n) after a first SFT round (``tasks/rejection.py``)."""

    enabled: bool = False
    prompts: str = Field("train", description="prompt pool: `train` (the train split's prompts) or a file path "
                                               "(.jsonl/.json with prompt/instruction/question [+ answer], or .txt lines)")
    max_prompts: Optional[int] = Field(64, gt=0, description="cap on prompts sampled (first N after a seeded shuffle)")
    k: int = Field(4, ge=1, le=64, description="samples per prompt")
    temperature: float = Field(0.8, gt=0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(128, gt=0, le=2048)
    batch_size: int = Field(8, gt=0, description="prompts per prefill (decode batch = batch_size * k)")
    seed: int = 0
    scorer: Literal["auto", "rubric", "answer"] = Field(
        "auto", description="rubric: logit 1-5 rubric score; answer: final-answer correctness (rows with `answer`); "
                            "auto: answer where the row has one, else rubric",
    )
    scorer_model: Literal["tuned", "base"] | str = Field(
        "tuned", description="the rubric scorer: tuned (the round-1 model), base, or a model name/path")
    threshold: float = Field(3.5, ge=1, le=5, description="keep the best sample when its rubric expected score >= this")
    score_batch_size: int = Field(8, gt=0)
    require_finished: bool = Field(True, description="a sample that ran into max_new_tokens is never selected")
    dtype: Literal["float32", "bfloat16"] = "float32"
    round2_from: Literal["round1", "base"] = Field(
        "round1", description="round 2 starts from the round-1 model (continued training: round2_training can be "
                              "short) or from the base model (the RFT paper's recipe: give it round 1's steps)")
    # Partial TrainingConfig overrides for round 2 (only the keys given replace the pipeline's
    # `training` section; checked by `round2_training`, which names the key path).
    round2_training: dict[str, Any] = Field(default_factory=dict, description="training overrides for round 2")

    def round2(self, training: "TrainingConfig") -> "TrainingConfig":
        """The round-2 training settings: ``training`` with ``round2_training`` merged in (nested dicts merge).

        Raises:
            ConfigError: naming ``rejection_sampling.round2_training.<field>`` for a bad key or value.
        """
        try:
            return TrainingConfig.model_validate(merge_training(training, dict(self.round2_training)))
        except ValidationError as e:
            raise ConfigError(format_errors(e, "rejection_sampling.round2_training")) from None


# --------------------------------------------------------------------------- evaluation / promotion
class ExtraEvalSet(Section):
    name: SafeName
    path: str
    format: Literal["auto", "alpaca", "dolly", "human_assistant", "messages", "self_instruct", "alpaca_eval"] = "auto"
    max_rows: Optional[int] = Field(None, gt=0)


class FormatRobustnessConfig(Section):
    """Answer the held-out prompts under several prompt wrappers and report the spread of ROUGE-L."""

    wrappers: int = Field(0, ge=0, description="evaluate under the first N of sftflow/data/wrappers.py WRAPPER_NAMES "
                                                "('plain' first; 0: off, else >= 2)")
    max_examples: Optional[int] = Field(None, gt=0, description="held-out rows used (default: evaluation.max_examples)")

    @model_validator(mode="after")
    def _enough_wrappers(self) -> "FormatRobustnessConfig":
        from sftflow.data.wrappers import WRAPPER_NAMES

        if self.wrappers == 1 or self.wrappers > len(WRAPPER_NAMES):
            raise ValueError(f"wrappers must be 0 (off) or between 2 and {len(WRAPPER_NAMES)} (got {self.wrappers})")
        return self


class EvaluationConfig(Section):
    enabled: bool = True
    max_examples: Optional[int] = Field(64, gt=0)
    max_new_tokens: Union[Literal["auto"], Annotated[int, Field(gt=0, le=2048)]] = Field(
        128, description="generation bound per answer; 'auto': the held-out references' length quantile "
                         "(auto_quantile) plus the end marker, within auto_max_new_tokens",
    )
    auto_quantile: float = Field(0.9, gt=0, le=1, description="reference-length quantile max_new_tokens: auto covers")
    auto_max_new_tokens: int = Field(384, gt=0, le=2048, description="upper bound of max_new_tokens: auto")
    batch_size: int = Field(8, gt=0)
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0, description="sampling temperature (only when do_sample)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling (only when do_sample)")
    seed: int = 0
    extra_sets: list[ExtraEvalSet] = Field(default_factory=list)
    judge: bool = False
    judge_model: Optional[str] = Field(
        None, description="model that scores responses 1-5 (embedded name or path; default: the pipeline's base model)"
    )
    samples_in_table: int = Field(20, ge=0)
    format_robustness: FormatRobustnessConfig = FormatRobustnessConfig()
    dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16", description="inference dtype (bf16 matmuls are ~4x faster on CPUs with AVX512-BF16/AMX)"
    )


class PromotionConfig(Section):
    enabled: bool = True
    model_name: Optional[SafeName] = Field(None, description="registered model name (default: sftflow-<pipeline>)")
    metric: str = "rougeL"
    direction: Optional[Literal["maximize", "minimize"]] = Field(
        None, description="implied by the metric (loss/perplexity/rates: minimize; rougeL/judge: maximize); "
                          "a contradictory value is refused")
    min_improvement: float = Field(0.0, ge=0, description="the bootstrap lower bound of the gain must exceed this")
    bootstrap_samples: int = Field(1000, ge=100, description="paired bootstrap resamples over held-out examples")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided confidence level of the gain's interval")
    allow_point_estimate: bool = Field(
        False, description="promote on the point gain when the metric has no per-example values (no interval)")
    max_task_regression: Optional[float] = Field(
        None, ge=0, description="refuse promotion when the gated metric of any task (held-out source or category) "
                                "is worse for tuned than for base by more than this (None: not checked)")


class ScheduleConfig(Section):
    cron: Optional[str] = None
    timezone: str = "UTC"
    skip_if_unchanged: bool = True

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        # Checked here, not when `sftflow serve` registers the deployment (or the scheduler first fires).
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone (expected an IANA name such as UTC or Europe/Berlin)") from None
        return value

    @field_validator("cron")
    @classmethod
    def _cron_shape(cls, value: Optional[str]) -> Optional[str]:
        fields = value.split() if value is not None else []
        if value is not None and (len(fields) not in (5, 6)
                                  or not all(re.fullmatch(r"[0-9A-Za-z*/,?#-]+", f) for f in fields)):
            raise ValueError("not a cron expression (expected 5 fields: minute hour day-of-month month "
                             "day-of-week, e.g. '0 3 * * *')")
        return value


class TrackingConfig(Section):
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (default: SQLite under $SFTFLOW_HOME)")
    experiment: Optional[str] = Field(None, description="experiment name (default: sftflow-<pipeline>)")


# --------------------------------------------------------------------------- pipeline
class ExecutionConfig(Section):
    """Where the data stages run (``execution:``): in this process, or as Ray tasks over Parquet shards.

    Results do not depend on it (same kept ids, quarantine and split); only time and memory do.
    """

    engine: Literal["local", "ray"] = Field("local", description="local (this process) or ray (Ray tasks)")
    address: Optional[str] = Field(
        None, description="Ray cluster: 'auto', 'ray://host:10001', or None to start a local cluster")
    num_cpus: Optional[int] = Field(None, gt=0, description="CPUs of a local Ray cluster (None: all)")
    num_gpus: Optional[int] = Field(None, ge=0, description="GPUs of a local Ray cluster (None: detected)")
    shard_rows: int = Field(100_000, gt=0, description="rows per Parquet shard the data stages map over")
    generation_backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="generation engine: hf (transformers), vllm (needs CUDA and the vllm extra), "
                            "auto (vllm when both are present, else hf)")


# --------------------------------------------------------------------------- error lines, training overrides
def _unwrap(tp: Any) -> Any:
    """The model / list / dict inside ``Optional[...]`` or a union (first one found), else ``tp``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if (isinstance(arg, type) and issubclass(arg, BaseModel)) or typing.get_origin(arg) in (list, dict):
                return arg
    return tp


def allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The field names of the section at ``loc`` (a pydantic error location) below ``model``, or None."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return None
            tp = field.annotation
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unknown_key(key: Any, allowed: list[str] | None) -> str:
    if not allowed:
        return "unknown key"
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}allowed: {', '.join(allowed)})"


def format_errors(err: ValidationError, prefix: str, *, model: type[BaseModel] | None = None) -> str:
    """One ``key.path: what was expected (got ...)`` line per error; ``model`` (the validated class)
    adds the allowed keys to "unknown key" errors."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after",))
        path = f"{prefix}.{loc}" if loc else prefix
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = tuple(p for p in e["loc"][:-1] if p not in ("function-after",))
            msg = _unknown_key(e["loc"][-1], allowed_keys(model, parent) if model is not None else None)
        elif e["type"].startswith("literal_error"):
            msg = f"must be one of {msg.removeprefix('Input should be ')}"
        elif e["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            msg = msg.replace("Input should be ", "must be ")
        elif msg.startswith("Input should be "):
            msg = "must be " + msg.removeprefix("Input should be ")
        got = e.get("input")
        if e["type"] not in ("missing", "extra_forbidden") and not isinstance(got, (dict, list)):
            msg += f" (got {got!r})"
        lines.append(f"{path}: {msg}")
    return "\n".join(lines)


def merge_training(training: TrainingConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """``training`` as a dict with ``overrides`` merged in (nested sections merge key by key)."""

    def merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in upd.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return merge(training.model_dump(), dict(overrides))

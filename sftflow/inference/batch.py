"""Generation and rubric scoring as batch inference: in this process, or over Ray Data actors.

THE inference path: every stage that generates or scores (backtranslation's backward generation
and self-curation, rejection sampling's k samples per prompt and rubric scores, evaluation's
generations and judge) calls ``generate_texts`` / ``score_texts`` (``loglik_texts``: per-token
answer log-probabilities, curation's likelihood methods) with a ``ModelHandle`` and the
engine the flow activated (``sftflow.engine.current_engine()``); none calls ``generate_batch``,
``sample_k`` or ``score_pairs`` itself (``tests/unit/test_inference_path.py`` checks it), so
``execution.engine`` and ``execution.generation_backend`` apply everywhere.

``generate_texts(..., num_samples=k)`` draws k samples per prompt (rejection sampling / best-of-n)
and returns a list of k generations per prompt; without ``num_samples`` it returns one generation
per prompt.

* **local** engine: the model is loaded in this process (once per handle) and the call is exactly
  ``generate_batch`` (or ``sample_k`` with ``num_samples``) / ``score_pairs`` over all rows.
* **ray** engine (``sftflow.inference.batch_ray``): the rows are grouped into the SAME
  length-sorted batches the local path makes (``generation._length_sorted_batches``); each batch
  becomes one row of a Ray Data dataset, and ``map_batches`` sends them to a fixed pool of actors
  (``ActorPoolStrategy(size=n)``), each loading the model once (one model per actor; one GPU each
  when the cluster has GPUs, else CPUs). An actor
  runs each batch with ``generate_batch(seed=seed + batch index)`` (``sample_k`` with
  ``num_samples``) / ``score_pairs`` on exactly that batch, so every batch sees the same tensors,
  and the same seed, as in the local run: greedy AND sampled generations (k samples included) are
  identical to local ones, whichever actor runs which batch. Rubric scores
  are identical up to float rounding (``score_pairs`` caches the prefix shared by the rows it is
  given, which a batch may extend by a few tokens).

``execution.generation_backend`` (the engine's ``generation_backend``) picks the generation
engine where the model runs: ``hf`` (transformers, ``generate_batch``), ``vllm``
(``sftflow.inference.vllm_backend``; CUDA and the ``vllm`` extra), or ``auto`` (vllm when both are
present there, else hf); vLLM draws k samples with ``SamplingParams(n=k)``. Scoring always runs on
transformers (logits; see ``vllm_backend``).

Example::

    handle = ModelHandle(ref, dtype="bfloat16")
    ids = [build_generation_prompt(handle.tokenizer, m, template=t) for m in convs]
    outs = generate_texts(handle, ids, max_new_tokens=64, batch_size=8, stop_ids=stops, seed=0)
    scores = score_texts(handle, [(q, o.text) for q, o in zip(qs, outs)], template=None, batch_size=8)
    handle.close()
"""

from __future__ import annotations

import contextlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, overload

from sftflow.data.refs import ModelRef
from sftflow.inference.batch_ray import GenerateActor, LoglikActor, ScoreActor, run_on_ray
from sftflow.inference.generation import Generated, ProgressCallback
from sftflow.inference.rubric import Score

BACKENDS = ("auto", "hf", "vllm")


# --------------------------------------------------------------------------- backend choice
def choose_backend(requested: str, *, cuda: bool, vllm: bool) -> str:
    """The generation engine for ``requested`` on a machine with(out) CUDA and vLLM.

    Args:
        requested: ``auto``, ``hf`` or ``vllm`` (``execution.generation_backend``).
        cuda: a CUDA device is visible here.
        vllm: ``import vllm`` works here.

    Returns:
        ``hf`` or ``vllm``.

    Raises:
        ValueError: an unknown name.
        RuntimeError: ``vllm`` requested where CUDA or vLLM is missing (the message says which).
    """
    if requested not in BACKENDS:
        raise ValueError(f"execution.generation_backend: {requested!r} is not one of {list(BACKENDS)}")
    if requested == "hf":
        return "hf"
    if requested == "vllm":
        missing = [what for what, ok in (("a CUDA device", cuda), ("the vllm package (pip install -e '.[vllm]')", vllm))
                   if not ok]
        if missing:
            raise RuntimeError("execution.generation_backend=vllm needs " + " and ".join(missing)
                               + " where the model runs; set it to hf or auto")
        return "vllm"
    return "vllm" if cuda and vllm else "hf"


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch CUDA runtime: no CUDA
        return False


def _vllm_importable() -> bool:
    try:
        importlib.import_module("vllm")
    except Exception:  # noqa: BLE001 - a broken install counts as absent (auto falls back to hf)
        return False
    return True


def resolve_backend(requested: str = "auto") -> str:
    """``choose_backend`` for this process (vLLM is imported only when CUDA is present)."""
    if requested == "hf":
        return "hf"
    cuda = _cuda_available()
    return choose_backend(requested, cuda=cuda, vllm=cuda and _vllm_importable())


# --------------------------------------------------------------------------- the model
def load_tokenizer(ref: ModelRef, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer ``load_model`` would return for ``ref``, without loading the weights."""
    from transformers import AutoTokenizer

    path = Path(ref.path)
    base = Path(ref.base) if ref.kind == "adapter" else path
    tok_dir = path if (path / "tokenizer_config.json").exists() else base
    tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load(ref: ModelRef, *, dtype: str | None, trust_remote_code: bool, merge_adapter: bool,
          device: str | None = None) -> tuple[Any, Any]:
    from sftflow.inference.models import load_for_inference, load_model

    if merge_adapter:
        model, tok = load_for_inference(ref, dtype=dtype, trust_remote_code=trust_remote_code)  # type: ignore[arg-type]
    else:
        model, tok = load_model(ref, dtype=dtype, trust_remote_code=trust_remote_code)
        model.eval()
    if device:
        model = model.to(device)
    return model, tok


class ModelHandle:
    """A model for batch inference, loaded in this process only when this process runs it.

    Args:
        ref: the model.
        dtype: weights dtype (``float32``/``bfloat16``/...; None: float32).
        trust_remote_code: passed to the loaders.
        merge_adapter: load with ``load_for_inference`` (a LoRA adapter merged) rather than
            ``load_model`` (wrapped, as evaluation loads it).
        loaded: ``(model, tokenizer)`` the caller already loaded (used by the local engine as is;
            ``close`` leaves it to the caller).
    """

    def __init__(self, ref: ModelRef, *, dtype: str | None = None, trust_remote_code: bool = False,
                 merge_adapter: bool = True, loaded: tuple[Any, Any] | None = None) -> None:
        self.ref = ref
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.merge_adapter = merge_adapter
        self._owned = loaded is None
        self._model, self._tok = loaded if loaded is not None else (None, None)
        self._vllm = False

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (the local engine loads the model with it: one load, as before)."""
        if self._tok is None:
            from sftflow.engine import current_engine

            if current_engine().kind == "local":
                self.model_and_tokenizer()
            else:
                self._tok = load_tokenizer(self.ref, trust_remote_code=self.trust_remote_code)
        return self._tok

    def model_and_tokenizer(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` loaded in this process (once)."""
        if self._model is None:
            self._model, self._tok = _load(self.ref, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                                           merge_adapter=self.merge_adapter)
        return self._model, self._tok

    def close(self) -> None:
        """Free what this handle loaded (a caller's ``loaded`` model stays) and any vLLM engine."""
        if self._vllm:
            from sftflow.inference import vllm_backend

            vllm_backend.release()
            self._vllm = False
        if self._owned and self._model is not None:
            from sftflow.inference.models import release_memory

            self._model = None
            release_memory()


def _handle(model: ModelRef | ModelHandle, *, dtype: str | None, trust_remote_code: bool) -> tuple[ModelHandle, bool]:
    if isinstance(model, ModelHandle):
        return model, False
    return ModelHandle(model, dtype=dtype, trust_remote_code=trust_remote_code), True


def _engine(engine: Any) -> Any:
    if engine is not None:
        return engine
    from sftflow.engine import current_engine

    return current_engine()


@dataclass(frozen=True)
class _Session:
    """What scoring and log-likelihood share: the pairs as strings, the engine, the loaded model and
    its tokenizer, and the resolved template."""

    pairs: list[tuple[str, str]]
    engine: Any
    handle: ModelHandle
    tok: Any
    template: str


@contextlib.contextmanager
def _scoring_session(model: ModelRef | ModelHandle, pairs: Sequence[tuple[str, str]], *, template: str | None,
                     batch_size: int, dtype: str | None, trust_remote_code: bool,
                     engine: Any) -> Iterator[_Session | None]:
    """The common prologue of ``score_texts`` and ``loglik_texts``: checks ``batch_size``, loads the
    model (a ``ModelRef``: closed at the end; a ``ModelHandle``: left open) and resolves the template.
    Yields None for no pairs, without loading anything."""
    from sftflow.inference.formatting import resolve_template

    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0 (got {batch_size})")
    as_str = [(str(q), str(a)) for q, a in pairs]
    if not as_str:
        yield None
        return
    engine = _engine(engine)
    handle, own = _handle(model, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        tok = handle.tokenizer
        yield _Session(pairs=as_str, engine=engine, handle=handle, tok=tok, template=resolve_template(tok, template))
    finally:
        if own:
            handle.close()


# --------------------------------------------------------------------------- generation
def _as_generated(g: Sequence[Any]) -> Generated:
    return Generated(text=str(g[0]), num_tokens=int(g[1]), finished=bool(g[2]))


@overload
def generate_texts(model: ModelRef | ModelHandle, prompts: list[list[int]], *, max_new_tokens: int,
                   temperature: float = ..., top_p: float = ..., batch_size: int, stop_ids: Sequence[int],
                   seed: int = ..., min_new_tokens: int = ..., num_samples: None = ..., dtype: str | None = ...,
                   trust_remote_code: bool = ..., engine: Any = ..., backend: str | None = ...,
                   on_progress: ProgressCallback | None = ...) -> list[Generated]: ...


@overload
def generate_texts(model: ModelRef | ModelHandle, prompts: list[list[int]], *, max_new_tokens: int,
                   temperature: float = ..., top_p: float = ..., batch_size: int, stop_ids: Sequence[int],
                   seed: int = ..., min_new_tokens: int = ..., num_samples: int, dtype: str | None = ...,
                   trust_remote_code: bool = ..., engine: Any = ..., backend: str | None = ...,
                   on_progress: ProgressCallback | None = ...) -> list[list[Generated]]: ...


def generate_texts(
    model: ModelRef | ModelHandle,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int,
    stop_ids: Sequence[int],
    seed: int = 0,
    min_new_tokens: int = 0,
    num_samples: int | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    engine: Any = None,
    backend: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[Generated] | list[list[Generated]]:
    """Generate a continuation (or ``num_samples`` of them) of each prompt with the active engine; input order.

    Args:
        model: a ``ModelHandle`` or a ``ModelRef`` (then loaded with ``dtype``/``trust_remote_code``
            and freed again at the end).
        prompts: token ids of each prompt (from ``formatting.build_generation_prompt``).
        max_new_tokens: bound on new tokens per prompt.
        temperature: 0 greedy; > 0 samples (top-p ``top_p``).
        top_p: nucleus mass (sampling only).
        batch_size: prompts per forward pass (length-sorted batches, as ``generate_batch``).
        stop_ids: token ids that end a generation.
        seed: sampling seed (batch ``b`` of the length-sorted batching samples with ``seed + b``).
        min_new_tokens: stop tokens are suppressed before this many new tokens.
        num_samples: k samples per prompt (``sample_k``: one prefill per prompt, the k samples drawn
            from it, seeded per batch like ``generate_batch``; vLLM: ``SamplingParams(n=k)``). None:
            one generation per prompt (``generate_batch``).
        dtype, trust_remote_code: used when ``model`` is a ``ModelRef``.
        engine: the execution engine (None: ``current_engine()``).
        backend: ``auto``/``hf``/``vllm`` (None: the engine's ``generation_backend``).
        on_progress: ``on_progress(prompts done, prompts total)`` after each batch.

    Returns:
        One ``Generated`` per prompt, in input order; with ``num_samples``, one list of
        ``num_samples`` generations (in sample order) per prompt.

    Raises:
        ValueError: an empty prompt, non-positive sizes or ``num_samples`` < 1.
        RuntimeError: ``vllm`` requested where it cannot run.
    """
    from sftflow.inference.generation import _check_prompts, _length_sorted_batches, generate_batch, sample_k

    if max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be > 0")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    if num_samples is not None and int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
    rows = _check_prompts(prompts)
    if not rows:
        return []
    engine = _engine(engine)
    backend = backend or getattr(engine, "generation_backend", "auto")
    handle, own = _handle(model, dtype=dtype, trust_remote_code=trust_remote_code)
    opts: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
                            "top_p": float(top_p), "stop_ids": [int(s) for s in stop_ids],
                            "min_new_tokens": int(min_new_tokens)}
    k = None if num_samples is None else int(num_samples)
    batches = _length_sorted_batches([len(r) for r in rows], batch_size)
    try:
        if engine.kind == "ray" and len(batches) > 1:
            items = [{"b": b, "rows": json.dumps(idx), "prompts": json.dumps([rows[i] for i in idx])}
                     for b, idx in enumerate(batches)]
            out = run_on_ray(GenerateActor, items, handle=handle, engine=engine, backend=backend,
                              options={**opts, "seed": int(seed), "num_samples": k}, total=len(rows),
                              on_progress=on_progress)
            results: list[Any] = [None] * len(rows)
            for b, idx in enumerate(batches):
                for i, g in zip(idx, out[b]):
                    results[i] = _as_generated(g) if k is None else [_as_generated(s) for s in g]
            return [r for r in results if r is not None]
        if resolve_backend(backend) == "vllm":
            from sftflow.inference import vllm_backend

            handle._vllm = True
            got = vllm_backend.generate(handle.ref, handle.tokenizer, rows, seed=seed, dtype=handle.dtype,
                                        trust_remote_code=handle.trust_remote_code, num_samples=k, **opts)
            if on_progress is not None:
                on_progress(len(rows), len(rows))
            return got
        lm, tok = handle.model_and_tokenizer()
        if k is not None:
            return sample_k(lm, tok, rows, num_samples=k, batch_size=batch_size, seed=seed, on_progress=on_progress,
                            **opts)
        return generate_batch(lm, tok, rows, batch_size=batch_size, seed=seed, on_progress=on_progress, **opts)
    finally:
        if own:
            handle.close()


# --------------------------------------------------------------------------- scoring
def score_texts(
    model: ModelRef | ModelHandle,
    pairs: Sequence[tuple[str, str]],
    *,
    template: str | None,
    batch_size: int,
    rubric: str | None = None,
    max_response_tokens: int | None = 768,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    engine: Any = None,
    on_progress: ProgressCallback | None = None,
) -> list[Score]:
    """Rate (instruction, response) pairs 1-5 with the logit rubric scorer (``score_pairs``) on the active engine.

    Args:
        model: a ``ModelHandle`` or a ``ModelRef`` (loaded with ``dtype``/``trust_remote_code``).
        pairs: (instruction, response) tuples.
        template: the configured template (None: the tokenizer's own; resolved with
            ``formatting.resolve_template``).
        batch_size: pairs per forward pass.
        rubric: a rubric with ``{instruction}``/``{response}`` (None: ``DEFAULT_RUBRIC``).
        max_response_tokens: responses are cut to this many tokens.
        dtype, trust_remote_code: used when ``model`` is a ``ModelRef``.
        engine: the execution engine (None: ``current_engine()``).
        on_progress: ``on_progress(done, total)`` as batches finish (Ray engine only).

    Returns:
        One ``Score`` per pair, in input order.
    """
    from sftflow.inference.generation import _length_sorted_batches
    from sftflow.inference.rubric import rubric_prompt_ids, score_pairs

    with _scoring_session(model, pairs, template=template, batch_size=batch_size, dtype=dtype,
                          trust_remote_code=trust_remote_code, engine=engine) as s:
        if s is None:
            return []
        pairs, tok, tmpl = s.pairs, s.tok, s.template
        opts = {"template": tmpl, "rubric": rubric, "max_response_tokens": max_response_tokens}
        if s.engine.kind == "ray" and len(pairs) > batch_size:
            # The batches score_pairs would make here: the prompts' lengths need the tokenizer only.
            lengths = [len(rubric_prompt_ids(tok, q, a, template=tmpl, rubric=rubric,
                                             max_response_tokens=max_response_tokens)) for q, a in pairs]
            batches = _length_sorted_batches(lengths, batch_size)
            items = [{"b": b, "rows": json.dumps(idx), "pairs": json.dumps([pairs[i] for i in idx])}
                     for b, idx in enumerate(batches)]
            out = run_on_ray(ScoreActor, items, handle=s.handle, engine=s.engine, backend="hf", options=opts,
                              total=len(pairs), on_progress=on_progress)
            results: list[Score | None] = [None] * len(pairs)
            for b, idx in enumerate(batches):
                for i, sc in zip(idx, out[b]):
                    results[i] = Score(probs=tuple(float(p) for p in sc[0]), expected=float(sc[1]),  # type: ignore[arg-type]
                                       argmax=int(sc[2]), mass=float(sc[3]))
            return [r for r in results if r is not None]
        lm, tok = s.handle.model_and_tokenizer()
        return score_pairs(lm, tok, pairs, batch_size=batch_size, **opts)


def loglik_texts(
    model: ModelRef | ModelHandle,
    pairs: Sequence[tuple[str, str]],
    *,
    template: str | None,
    batch_size: int,
    max_answer_tokens: int | None = 768,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    engine: Any = None,
    on_progress: ProgressCallback | None = None,
) -> list[list[float]]:
    """Per-token log-probabilities of each answer given its instruction, on the active engine.

    Each (instruction, answer) pair is the user turn + the assistant opener + the answer's tokens
    (``loglik.answer_row``); the values are ``log p(y_t | instruction, y_<t)`` for every answer token
    (``loglik.token_logprobs``; the end-of-turn marker is not scored). An empty instruction gives
    an empty user turn (the reference of per-token PMI). On the Ray engine the length-sorted batches
    the local run makes go to Ray Data actors (one model each), so values equal local ones up to
    float rounding.

    Args:
        model: a ``ModelHandle`` or a ``ModelRef`` (loaded with ``dtype``/``trust_remote_code``).
        pairs: (instruction, answer) tuples.
        template: the configured template (None: the tokenizer's own; ``formatting.resolve_template``).
        batch_size: pairs per forward pass.
        max_answer_tokens: answers are cut to this many tokens (None: whole).
        dtype, trust_remote_code: used when ``model`` is a ``ModelRef``.
        engine: the execution engine (None: ``current_engine()``).
        on_progress: ``on_progress(done, total)`` as batches finish.

    Returns:
        One list of per-token log-probabilities per pair, in input order (empty for an empty answer).
    """
    from sftflow.inference.generation import _length_sorted_batches
    from sftflow.inference.loglik import answer_row, token_logprobs

    with _scoring_session(model, pairs, template=template, batch_size=batch_size, dtype=dtype,
                          trust_remote_code=trust_remote_code, engine=engine) as s:
        if s is None:
            return []
        tok = s.tok
        rows = [answer_row(tok, q, a, template=s.template, max_answer_tokens=max_answer_tokens) for q, a in s.pairs]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if s.engine.kind == "ray" and len(rows) > batch_size:
            batches = _length_sorted_batches([len(r[0]) for r in rows], batch_size)
            items = [{"b": b, "rows": json.dumps(idx), "items": json.dumps([rows[i] for i in idx])}
                     for b, idx in enumerate(batches)]
            out = run_on_ray(LoglikActor, items, handle=s.handle, engine=s.engine, backend="hf",
                              options={"pad_id": int(pad_id)}, total=len(rows), on_progress=on_progress)
            results: list[list[float] | None] = [None] * len(rows)
            for b, idx in enumerate(batches):
                for i, v in zip(idx, out[b]):
                    results[i] = [float(x) for x in v]
            return [r if r is not None else [] for r in results]
        lm, _ = s.handle.model_and_tokenizer()
        return token_logprobs(lm, rows, batch_size=batch_size, pad_id=int(pad_id), on_progress=on_progress)


__all__ = ["BACKENDS", "ModelHandle", "choose_backend", "generate_texts", "load_tokenizer",
           "loglik_texts", "resolve_backend", "score_texts"]

"""Batch inference over Ray Data: a fixed pool of actors, one model each, one inference batch per row.

The ray-engine half of ``sftflow.inference.batch`` (``generate_texts`` / ``score_texts`` /
``loglik_texts`` call ``run_on_ray`` when the flow's engine is ``ray``): ``actor_plan`` sizes the
pool from the cluster's resources, ``run_on_ray`` sends the length-sorted batches to the actors
and puts the results back in batch order. Each actor class runs the same primitive the local
path runs (``generate_batch`` / ``sample_k``, ``score_pairs``, ``token_logprobs``) on exactly one
batch, so results equal the local ones (see ``batch``'s docstring). The actor classes stay
module-level: Ray Data builds them on the workers by reference.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sftflow.data.refs import ModelRef
from sftflow.inference.generation import Generated, ProgressCallback

if TYPE_CHECKING:
    from sftflow.inference.batch import ModelHandle


def actor_plan(resources: dict[str, float], *, batches: int) -> dict[str, Any]:
    """How many actors and what each reserves, from a cluster's resources.

    One model per actor: one GPU each when the cluster has GPUs (as many actors as GPUs), else
    the cluster's CPUs shared out (as many actors as CPUs, at most one per batch).

    Returns:
        ``{"actors": n, "num_cpus": c, "num_gpus": g}``.
    """
    gpus = int(resources.get("GPU", 0) or 0)
    cpus = max(1, int(resources.get("CPU", 1) or 1))
    if gpus > 0:
        return {"actors": max(1, min(gpus, batches)), "num_cpus": 1, "num_gpus": 1}
    actors = max(1, min(cpus, batches))
    return {"actors": actors, "num_cpus": max(1, cpus // actors), "num_gpus": 0}


def run_on_ray(actor_cls: type, items: list[dict[str, Any]], *, handle: ModelHandle, engine: Any, backend: str,
                options: dict[str, Any], total: int, on_progress: ProgressCallback | None) -> dict[int, list[Any]]:
    """Run ``actor_cls`` over ``items`` (one inference batch each) with Ray Data; ``{batch index: results}``.

    ``handle`` gives the model each actor loads (its ref, dtype and adapter merge), ``options`` the
    keyword arguments of the actor's primitive; ``on_progress(done, total)`` follows completed rows.
    """
    import ray
    import ray.data

    # The stage reports progress through on_progress; Ray Data's own bars would write to the console.
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = actor_plan(ray.cluster_resources(), batches=len(items))
    # One block per inference batch, so the actors share the batches out between them. transformers
    # runs one inference batch per call; vLLM (GPU actors, backend not hf) gets several per call,
    # since its continuous batching wants many prompts at once.
    per_call = 1 if plan["num_gpus"] == 0 or backend == "hf" else max(1, -(-len(items) // (4 * plan["actors"])))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        actor_cls,
        batch_size=per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
        num_cpus=plan["num_cpus"],
        num_gpus=plan["num_gpus"],
        # A failed actor fails the stage with its error (like a failed shard task) instead of being
        # restarted; restarts are also what makes Ray print a core-worker error line to the console.
        max_restarts=0,
        fn_constructor_kwargs={"ref": handle.ref, "dtype": handle.dtype,
                               "trust_remote_code": handle.trust_remote_code,
                               "merge_adapter": handle.merge_adapter, "backend": backend,
                               "options": options},
    )
    out: dict[int, list[Any]] = {}
    done = 0
    for row in ds.iter_rows():  # in completion order; the batch index puts each back in place
        got = json.loads(str(row["out"]))
        out[int(row["b"])] = got
        done += len(got)
        if on_progress is not None:
            on_progress(done, total)
    missing = sorted(set(range(len(items))) - set(out))
    if missing:
        raise RuntimeError(f"Ray Data returned no result for inference batches {missing[:10]}")
    return out


class _InferenceActor:
    """One model per Ray actor; ``__call__`` runs one inference batch per dataset row."""

    def __init__(self, *, ref: ModelRef, dtype: str | None, trust_remote_code: bool, merge_adapter: bool,
                 backend: str, options: dict[str, Any]) -> None:
        # Imported here, on the worker: ``batch`` imports this module at load time.
        from sftflow.inference.batch import _cuda_available, _load, load_tokenizer

        self.ref, self.dtype, self.trust_remote_code = ref, dtype, trust_remote_code
        self.options = options
        self.backend = self._backend(backend)
        if self.backend == "vllm":
            self.model, self.tok = None, load_tokenizer(ref, trust_remote_code=trust_remote_code)
        else:
            # A GPU actor (Ray sets CUDA_VISIBLE_DEVICES to its GPU) runs the model there.
            self.model, self.tok = _load(ref, dtype=dtype, trust_remote_code=trust_remote_code,
                                         merge_adapter=merge_adapter, device="cuda" if _cuda_available() else None)

    payload = "prompts"  # the item field with the batch's inputs

    def _backend(self, requested: str) -> str:
        from sftflow.inference.batch import resolve_backend

        return resolve_backend(requested)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        jobs = [(int(b), json.loads(str(r)), json.loads(str(p)))
                for b, r, p in zip(batch["b"], batch["rows"], batch[self.payload])]
        outs = [json.dumps(o) for o in self.run(jobs)]
        return {"b": np.asarray([b for b, _, _ in jobs]), "out": np.asarray(outs, dtype=object)}

    def run(self, jobs: list[tuple[int, list[int], list[Any]]]) -> list[list[Any]]:  # pragma: no cover - abstract
        """Results of each ``(batch index, row indices, inputs)`` job, as JSON-able lists."""
        raise NotImplementedError


class GenerateActor(_InferenceActor):
    """Generations (``generate_batch``, or ``sample_k`` with ``num_samples``; vLLM when chosen) of each batch."""

    payload = "prompts"

    def run(self, jobs: list[tuple[int, list[int], list[Any]]]) -> list[list[Any]]:
        from sftflow.inference.generation import generate_batch, sample_k

        opts = dict(self.options)
        seed = int(opts.pop("seed"))
        k = opts.pop("num_samples", None)

        def enc1(g: Generated) -> list[Any]:
            return [g.text, g.num_tokens, g.finished]

        def enc(got: Any) -> list[Any]:  # one row's result as JSON: [text, tokens, finished] (k: a list of them)
            return enc1(got) if k is None else [enc1(g) for g in got]

        if self.backend == "vllm":
            from sftflow.inference import vllm_backend

            # Every job of the call in one vLLM request list; per-row seeds keep rows independent.
            got = vllm_backend.generate(self.ref, self.tok, [p for _, _, ps in jobs for p in ps],
                                        rows=[r for _, rs, _ in jobs for r in rs], seed=seed, dtype=self.dtype,
                                        trust_remote_code=self.trust_remote_code, num_samples=k, **opts)
            flat = [enc(g) for g in got]
            out, n = [], 0
            for _, _, ps in jobs:
                out.append(flat[n:n + len(ps)])
                n += len(ps)
            return out
        # Each batch exactly as the local run makes it (same rows, same order) with its seed there.
        if k is not None:
            return [[enc(g) for g in sample_k(self.model, self.tok, ps, num_samples=int(k), batch_size=len(ps),
                                              seed=seed + b, **opts)]
                    for b, _, ps in jobs]
        return [[enc(g) for g in generate_batch(self.model, self.tok, ps, batch_size=len(ps), seed=seed + b, **opts)]
                for b, _, ps in jobs]


class ScoreActor(_InferenceActor):
    """Rubric scores (``score_pairs``) of each batch of (question, answer) pairs; always transformers."""

    payload = "pairs"

    def _backend(self, requested: str) -> str:
        return "hf"  # the logit rubric scorer needs the digits' logits (see vllm_backend)

    def run(self, jobs: list[tuple[int, list[int], list[Any]]]) -> list[list[Any]]:
        from sftflow.inference.rubric import score_pairs

        return [[[list(s.probs), s.expected, s.argmax, s.mass]
                 for s in score_pairs(self.model, self.tok, [(q, a) for q, a in ps], batch_size=len(ps),
                                      **self.options)]
                for _, _, ps in jobs]


class LoglikActor(_InferenceActor):
    """Per-token answer log-probabilities (``token_logprobs``) of each batch; always transformers."""

    payload = "items"

    def _backend(self, requested: str) -> str:
        return "hf"  # log-probabilities need the model's logits

    def run(self, jobs: list[tuple[int, list[int], list[Any]]]) -> list[list[Any]]:
        from sftflow.inference.loglik import token_logprobs

        # Each job is one batch exactly as the local run makes it (same rows, same padding).
        return [token_logprobs(self.model, [(ids, start) for ids, start in rows], batch_size=len(rows),
                               pad_id=int(self.options["pad_id"]))
                for _, _, rows in jobs]

"""The judge of an evaluation: which model judges (``resolve_judge``) and the judge pass.

The judge is the logit-based 1-5 rubric scorer of self-curation (``sftflow.inference.generation.
score_pairs``, via ``sftflow.inference.batch.score_texts``), run by one fixed judge model so base and
tuned are scored by the same judge: ``evaluation.judge_model``, else the pipeline's base model,
resolved by ``sftflow.inference.judges.resolve_scorer`` (a judge that cannot be loaded is an error
naming the key, never the model under test). Its digest is part of ``sets.eval_key``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from sftflow.config_sections import EvaluationConfig
from sftflow.data.refs import ModelRef
from sftflow.inference.batch import ModelHandle, score_texts
from sftflow.inference.judges import base_model_of, resolve_scorer
from sftflow.results import HELDOUT_SET


def resolve_judge(cfg: EvaluationConfig, model: ModelRef, *, base: ModelRef | None = None,
                  trust_remote_code: bool = False) -> ModelRef | None:
    """The fixed judge (None without ``evaluation.judge``): ``judges.resolve_scorer`` for role ``judge``.

    ``cfg.judge_model`` when set, else ``base`` (the pipeline's base model: the flow passes it, so
    base and tuned share one judge), else the base model ``model`` records (``judges.base_model_of``).

    Raises:
        sftflow.inference.judges.ScorerUnavailable: the judge cannot be loaded (the message names
            ``evaluation.judge_model`` and the path); never falls back to ``model`` itself.
    """
    if not cfg.judge:
        return None
    if base is None and not cfg.judge_model:
        base = base_model_of(model, role="judge", trust_remote_code=trust_remote_code)
    return resolve_scorer(configured=cfg.judge_model, base=base, role="judge", trust_remote_code=trust_remote_code)


def judge_scores(
    samples_df: pd.DataFrame, judge: ModelRef, *, cfg: EvaluationConfig, template: str | None = None,
    lm: Any = None, tok: Any = None, trust_remote_code: bool = False,
) -> dict[str, float]:
    """Score every (prompt, output) with the rubric scorer; fills ``samples_df.judge`` in place.

    Returns ``judge_score`` per evaluated set (the mean expected rating; ``<set>/judge_score`` for
    an extra set).

    ``lm``/``tok``: the judge already loaded here (None: ``judge`` is loaded by ``score_texts``,
    in this process or once per Ray Data actor).
    """
    handle = ModelHandle(judge, dtype=cfg.dtype, trust_remote_code=trust_remote_code, merge_adapter=False,
                         loaded=None if lm is None else (lm, tok))
    try:
        scores = score_texts(handle, list(zip(samples_df["prompt"], samples_df["output"])), template=template,
                             batch_size=cfg.batch_size)
    finally:
        handle.close()
    samples_df["judge"] = [float(s.expected) for s in scores]
    out = {}
    for set_name, grp in samples_df.groupby("set", sort=False):
        prefix = "" if set_name == HELDOUT_SET else f"{set_name}/"
        out[prefix + "judge_score"] = float(grp["judge"].mean())
    return out


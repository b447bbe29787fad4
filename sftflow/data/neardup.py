"""The one definition of "the same example": key text, exact normalisation, and cross-set duplicates (leaks).

Every place that asks whether a row duplicates another set asks it here, with the same key:

* the split stage (``tasks/split.py``): a held-out row that duplicates a training row leaks;
* the dedup stage's cross-split pass (``tasks/dedup.py`` with ``heldout``): a training row that
  duplicates a held-out row is removed as ``leak``;
* backtranslation's seed check (``tasks/backtranslate.py``): a corpus segment that duplicates a
  seed response is not used.

A pair is a duplicate when the normalised key texts are equal (``exact``: this catches texts too
short to have shingles, e.g. "Hi?") or when the exact Jaccard similarity of their shingle sets
reaches ``cfg.near.threshold`` (MinHash-LSH candidates, verified: ``sftflow/data/minhash.py``).
Leak checks always run: ``cfg.enabled`` and ``cfg.near.enabled`` switch off *deduplication*, never
the check that keeps a held-out set honest.

Every leak check compares the *prompt* (``leak_key``): a held-out prompt that training has seen
(exactly or nearly) makes the held-out score optimistic whatever the answer was, so the rule is
the strict one for every pipeline. ``dedup.exact.key`` / ``dedup.near.key`` stay what *within-set*
dedup compares; callers with another question (backtranslation's seed check compares responses)
pass ``key=`` explicitly.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Iterable, Literal, Mapping, NamedTuple, Sequence

import pandas as pd

from sftflow.config import DedupConfig, ExactDedupConfig, NearDedupConfig
from sftflow.data.minhash import LSHParams, find_near_duplicates
from sftflow.data.records import prompt_text, response_text

KeyName = Literal["prompt", "prompt_response", "response"]
KEYS: tuple[str, ...] = ("prompt", "prompt_response", "response")
_KEY_SEP = "\n\x1e\n"  # between prompt and response, so ("a", "bc") and ("ab", "c") differ
_PUNCT = re.compile(r"[^\w\s]")
_WS = re.compile(r"\s+")


# --------------------------------------------------------------------------- keys
def key_text(messages: Sequence[Mapping[str, str]], key: KeyName) -> str:
    """The text a conversation is compared on: its user turns, its assistant turns, or both.

    Args:
        messages: the conversation (``{role, content}`` turns).
        key: ``prompt`` (user turns), ``response`` (assistant turns) or ``prompt_response``.
    """
    msgs = list(messages)
    if key == "prompt":
        return prompt_text(msgs)
    if key == "response":
        return response_text(msgs)
    if key == "prompt_response":
        return prompt_text(msgs) + _KEY_SEP + response_text(msgs)
    raise ValueError(f"unknown key {key!r}; expected one of {', '.join(KEYS)}")


def key_texts(records: pd.DataFrame | Sequence[Mapping[str, Any]], key: KeyName) -> list[str]:
    """``key_text`` of every row of ``records`` (a frame or a list of canonical records), in order."""
    column = records["messages"] if isinstance(records, pd.DataFrame) else (r["messages"] for r in records)
    return [key_text(m, key) for m in column]


def normalize_for_exact(text: str, cfg: ExactDedupConfig) -> str:
    """Normalise a key for exact matching as ``cfg`` says (NFKC, lower case, punctuation, whitespace)."""
    if cfg.unicode_normalize:
        text = unicodedata.normalize("NFKC", text)
    if cfg.lowercase:
        text = text.lower()
    if cfg.strip_punctuation:
        text = _PUNCT.sub(" " if cfg.collapse_whitespace else "", text)
    if cfg.collapse_whitespace:
        text = _WS.sub(" ", text).strip()
    return text


def exact_keys_shard(args: tuple) -> list[str]:
    """Normalised exact-match keys of one shard of conversations (the per-shard map step of exact dedup; pure).

    ``args`` is ``(messages, cfg)``: a list of conversations and the ``dedup.exact`` section. It lives
    here, in a light module, so an engine worker runs it without importing the stage's dependencies.
    """
    messages, cfg = args
    return [normalize_for_exact(key_text(m, cfg.key), cfg) for m in messages]


def lsh_params(cfg: NearDedupConfig) -> LSHParams:
    """The MinHash-LSH engine's parameters from the ``dedup.near`` section."""
    return LSHParams(threshold=cfg.threshold, shingle=cfg.shingle, ngram=cfg.ngram, num_perm=cfg.num_perm,
                     bands=cfg.bands, rows=cfg.rows, verify=cfg.verify, seed=cfg.seed)


def leak_key(cfg: DedupConfig | None = None) -> KeyName:
    """The key every leak check compares (split's leaks, dedup's held-out pass): always the prompt.

    ``cfg`` is accepted so call sites read the same as the other rules; the key does not depend on it.
    """
    return "prompt"


# --------------------------------------------------------------------------- cross-set duplicates
class CrossPair(NamedTuple):
    """A row of ``queries`` that duplicates a row of ``reference``.

    Attributes:
        query: position of the row in ``queries``.
        match: position of the duplicated row in ``reference``.
        similarity: Jaccard similarity of the shingle sets (1.0 for an exact pair).
        exact: the normalised key texts are equal.
    """

    query: int
    match: int
    similarity: float
    exact: bool


def find_cross_duplicates(
    queries: pd.DataFrame | Sequence[Mapping[str, Any]] | Sequence[str],
    reference: pd.DataFrame | Sequence[Mapping[str, Any]] | Sequence[str],
    *,
    cfg: DedupConfig,
    key: KeyName | None = None,
    map_fn: Any = None,
    shard_docs: int | None = None,
) -> list[CrossPair]:
    """Every row of ``queries`` that duplicates a row of ``reference`` (exactly or nearly).

    Args:
        queries: the rows under test (e.g. held-out rows for split, training rows for dedup):
            canonical records (a DataFrame or a list), or plain strings taken as key texts.
        reference: the rows they must not duplicate (same kinds as ``queries``).
        cfg: the pipeline's ``dedup`` section: ``exact`` normalises keys, ``near`` sets shingles and threshold.
        key: the text compared (default ``leak_key(cfg)``); ignored for plain strings.
        map_fn: runs the MinHash shards (``sftflow.ops.engine.Engine.map``); default: in this process.
        shard_docs: documents per MinHash shard (default: one shard). Neither changes the result.

    Returns:
        Pairs sorted by (query, match): for each query, the first reference row with an equal
        normalised key (``exact``, similarity 1.0), and every reference row whose shingle-set
        Jaccard similarity is at least ``cfg.near.threshold``; a pair found both ways is one pair.
    """
    key = key or leak_key(cfg)
    q_texts, r_texts = _texts(queries, key), _texts(reference, key)
    if not q_texts or not r_texts:
        return []
    best: dict[tuple[int, int], CrossPair] = {}
    first_ref: dict[str, int] = {}
    for j, t in enumerate(r_texts):
        k = normalize_for_exact(t, cfg.exact)
        if k:
            first_ref.setdefault(k, j)
    for i, t in enumerate(q_texts):
        j = first_ref.get(normalize_for_exact(t, cfg.exact))
        if j is not None:
            best[(i, j)] = CrossPair(i, j, 1.0, True)
    nq = len(q_texts)
    res = find_near_duplicates(q_texts + r_texts, lsh_params(cfg.near), pair_filter=lambda i, j: (i < nq) & (j >= nq),
                               map_fn=map_fn, shard_docs=shard_docs)
    for (i, j), s in zip(res.pairs, res.similarity):
        q, r = int(i), int(j) - nq
        old = best.get((q, r))
        best[(q, r)] = CrossPair(q, r, max(float(s), old.similarity if old else 0.0), bool(old and old.exact))
    return sorted(best.values())


def strongest_matches(pairs: Iterable[CrossPair]) -> dict[int, CrossPair]:
    """For each query in ``pairs``, its pair with the highest similarity (ties: the smaller reference position)."""
    out: dict[int, CrossPair] = {}
    for p in sorted(pairs):
        if p.query not in out or p.similarity > out[p.query].similarity:
            out[p.query] = p
    return out


def _texts(rows: pd.DataFrame | Sequence[Any], key: KeyName) -> list[str]:
    if isinstance(rows, pd.DataFrame):
        missing = [c for c in ("messages",) if c not in rows.columns]
        if missing:
            raise ValueError(f"missing column(s) {missing}; expected canonical records (sftflow.data.records)")
        return key_texts(rows, key)
    rows = list(rows)
    if all(isinstance(r, str) for r in rows):
        return rows
    return key_texts(rows, key)

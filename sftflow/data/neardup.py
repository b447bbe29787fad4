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

import numpy as np
import pandas as pd

from sftflow.config_sections import DedupConfig, ExactDedupConfig, NearDedupConfig
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


# --------------------------------------------------------------------------- lazy key texts
class ParquetTexts:
    """A lazy, picklable sequence of key texts: ``head`` (texts in memory), then chosen rows of Parquet files.

    Supports ``len``, slicing (another lazy sequence: only row numbers travel, so an engine task
    gets a few bytes and reads its own texts), integer indexing, ``take(positions)`` (one pass over
    the row groups that hold them) and ``load()`` (every text, as a list). The MinHash engine
    (``sftflow.data.minhash.find_near_duplicates``) uses ``load``/``take`` when they exist, so a corpus
    never has to be held as Python strings.

    Args:
        files: ``(path, num_rows)`` of each file; the global row number runs over them in this order.
        rows: sorted global row numbers whose texts this sequence holds (after ``head``).
        key: which text of a conversation (``key_text``).
        head: texts placed before the file rows.
    """

    def __init__(self, files: Sequence[tuple[str, int]], rows: np.ndarray, *, key: str,
                 head: Sequence[str] = ()) -> None:
        self.files = [(str(p), int(n)) for p, n in files]
        self.rows = np.asarray(rows, dtype=np.int64)
        self.key = key
        self.head = list(head)

    def __len__(self) -> int:
        return len(self.head) + len(self.rows)

    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, slice):
            lo, hi, step = item.indices(len(self))
            if step != 1:
                raise ValueError("ParquetTexts: slices with a step are not supported")
            h = len(self.head)
            return ParquetTexts(self.files, self.rows[max(lo - h, 0) : max(hi - h, 0)], key=self.key,
                                head=self.head[min(lo, h) : min(hi, h)])
        i = int(item) + (len(self) if int(item) < 0 else 0)
        return self.take(np.array([i]))[0]

    def load(self) -> list[str]:
        """Every text, in order."""
        return self.take(np.arange(len(self), dtype=np.int64))

    def take(self, positions: np.ndarray) -> list[str]:
        """The texts at ``positions`` (any order), reading each row group they touch once."""
        from sftflow.data.shards import take_column

        pos = np.asarray(positions, dtype=np.int64)
        out: list[str] = [""] * len(pos)
        h = len(self.head)
        for k in np.flatnonzero(pos < h):
            out[k] = self.head[int(pos[k])]
        at_rows = np.flatnonzero(pos >= h)
        if len(at_rows) == 0:
            return out
        glob = self.rows[pos[at_rows] - h]
        order = np.argsort(glob, kind="stable")
        start = 0
        for path, num in self.files:
            lo, hi = np.searchsorted(glob[order], [start, start + num])
            if hi > lo:
                sel = order[lo:hi]
                local = glob[sel] - start
                uniq, inv = np.unique(local, return_inverse=True)
                msgs = take_column(path, uniq, "messages")
                texts = [key_text(m, self.key) for m in msgs]
                del msgs
                for k, j in zip(at_rows[sel], inv):
                    out[int(k)] = texts[int(j)]
            start += num
        return out


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
        reference: the rows they must not duplicate (same kinds as ``queries``, or a lazy
            ``ParquetTexts`` of ``key`` texts, read block by block).
        cfg: the pipeline's ``dedup`` section: ``exact`` normalises keys, ``near`` sets shingles and threshold.
        key: the text compared (default ``leak_key(cfg)``); ignored for plain strings.
        map_fn: runs the MinHash shards (``sftflow.engine.Engine.map``); default: in this process.
        shard_docs: documents per MinHash shard (default: one shard). Neither changes the result.

    Returns:
        Pairs sorted by (query, match): for each query, the first reference row with an equal
        normalised key (``exact``, similarity 1.0), and every reference row whose shingle-set
        Jaccard similarity is at least ``cfg.near.threshold``; a pair found both ways is one pair.
    """
    key = key or leak_key(cfg)
    q_texts, r_texts = _texts(queries, key), _texts(reference, key)
    if hasattr(q_texts, "load"):  # the queries are the small side: held in memory
        q_texts = q_texts.load()
    if not len(q_texts) or not len(r_texts):
        return []
    best: dict[tuple[int, int], CrossPair] = {}
    # Exact: the first reference row with each query's key. Only the queries' keys are held; the
    # reference streams past in blocks (a lazy reference is read block by block, never held whole).
    wanted: dict[str, list[int]] = {}
    for i, t in enumerate(q_texts):
        k = normalize_for_exact(t, cfg.exact)
        if k:
            wanted.setdefault(k, []).append(i)
    block = max(1, shard_docs or len(r_texts))
    for lo in range(0, len(r_texts) if wanted else 0, block):
        chunk = r_texts[lo : lo + block]
        for j, t in enumerate(chunk.load() if hasattr(chunk, "load") else chunk, start=lo):
            k = normalize_for_exact(t, cfg.exact)
            if k in wanted:
                for i in wanted.pop(k):
                    best[(i, j)] = CrossPair(i, j, 1.0, True)
    nq = len(q_texts)
    if hasattr(r_texts, "load"):  # queries first, then the reference's rows, still lazy
        corpus: Any = type(r_texts)(r_texts.files, r_texts.rows, key=r_texts.key, head=list(q_texts) + r_texts.head)
    else:
        corpus = q_texts + r_texts
    res = find_near_duplicates(corpus, lsh_params(cfg.near), pair_filter=lambda i, j: (i < nq) & (j >= nq),
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


def _texts(rows: pd.DataFrame | Sequence[Any], key: KeyName) -> Any:
    if hasattr(rows, "load"):  # a lazy corpus of key texts (``ParquetTexts``)
        if rows.key != key:
            raise ValueError(f"lazy texts compare the {rows.key!r} key, but this check compares {key!r}")
        return rows
    if isinstance(rows, pd.DataFrame):
        missing = [c for c in ("messages",) if c not in rows.columns]
        if missing:
            raise ValueError(f"missing column(s) {missing}; expected canonical records (sftflow.data.records)")
        return key_texts(rows, key)
    rows = list(rows)
    if all(isinstance(r, str) for r in rows):
        return rows
    return key_texts(rows, key)

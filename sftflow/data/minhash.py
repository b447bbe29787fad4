"""A vectorised MinHash-LSH near-duplicate engine (numpy only, one process, bounded memory).

Used by the dedup stage (``tasks/dedup.py``) and its benchmark (``bench/dedup.py``).

How it works, and why it is fast:

1. Tokens. Word shingles: NFKC + lower case, ``\\w+`` tokens, each hashed to 64 bits from its bytes
   with vectorised prefix sums over the whole chunk (no Python object per token; see
   ``Shingler._word_hashes``). Character shingles: the code points.
2. Shingles. The n-gram hash of every window is a polynomial combination of the n token hashes,
   computed for the whole chunk at once (n vectorised passes), then windows that cross a document
   boundary are dropped. A text shorter than n tokens becomes one shingle of all its tokens, so short
   texts still match their exact copies; an empty text has no shingles and never matches.
3. MinHash. ``num_perm`` strongly-universal hashes ``h_p(x) = (a_p * x + b_p) mod 2^64 >> 32`` over the
   shingle hashes of a chunk (one multiply, one add, one shift per permutation), and the minimum per
   document with ``np.minimum.reduceat``: O(shingles x num_perm) in tight numpy loops, no Python per
   shingle.
4. LSH. Each band of ``rows`` signature values is folded into one 64-bit key; per band, keys are sorted
   and runs of equal keys are buckets. Only the band keys are kept (n x bands uint64), so memory grows
   with the number of documents, not with their text.
5. Candidate pairs come from buckets (all pairs in a bucket of up to ``window + 1`` members; a sliding
   window of ``window`` neighbours in larger ones, which keeps a bucket of 10k templated rows from
   producing 50M pairs while still connecting all of it).
6. Verification. The exact Jaccard of every candidate pair over the shingle sets (recomputed only for
   the documents that are in a candidate pair), vectorised as sorted-key membership tests; only pairs
   at or above the threshold are returned, so reported pairs really are near duplicates.
   (``verify="estimate"`` uses the signature agreement instead, whose standard error is
   ``sqrt(J(1-J)/num_perm)``.)

Bands and rows, when not given, are chosen from the threshold: the largest ``rows`` (fewest false
candidates) such that a pair exactly at the threshold still becomes a candidate with probability
>= ``min_recall`` (0.995 by default): recall is what LSH can lose; precision is restored by verification.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from itertools import chain
from typing import Callable, Literal, Sequence

import numpy as np

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_WORD = re.compile(r"\w+")
_EMPTY = np.iinfo(np.uint32).max  # signature value of a document with no shingles
# Byte classes for word tokenisation: ASCII [A-Za-z0-9_] (\w in ASCII) -> its lower-case byte, bytes of
# non-ASCII characters (texts pre-tokenised by the Unicode path) -> themselves, \x01 (the document
# boundary) -> 1, everything else -> 0 (a separator).
_BYTE_CLASS = np.array(
    [ord(chr(b).lower()) if (b < 128 and (chr(b).isalnum() or b == 95)) else (b if b >= 128 else int(b == 1)) for b in range(256)],
    dtype=np.uint8,
)
_TOKEN_R = 0xC2B2AE3D27D4EB4F  # odd: invertible mod 2^64
_TOKEN_R_INV = pow(_TOKEN_R, -1, 1 << 64)
_POLY = 0x9E3779B97F4A7C15  # odd multiplier for the n-gram polynomial


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Finaliser of splitmix64 (a bijective 64-bit mixer), on a uint64 array (wraps mod 2^64)."""
    x = x.astype(_U64, copy=True)
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorted unique values (sort + mask: faster here than np.unique's hash path on uint64)."""
    a = np.sort(a)
    if len(a) < 2:
        return a
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def lsh_probability(similarity: float, bands: int, rows: int) -> float:
    """P(a pair with Jaccard ``similarity`` shares at least one band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def optimal_bands_rows(threshold: float, num_perm: int, *, min_recall: float = 0.995) -> tuple[int, int]:
    """Choose (bands, rows) for a Jaccard threshold.

    The largest ``rows`` (so the fewest candidates below the threshold) whose ``bands = num_perm // rows``
    still make a pair at exactly ``threshold`` a candidate with probability >= ``min_recall``.
    Pairs above the threshold are then found at least as often; false candidates are removed by
    verification, so only recall has to be protected here.

    Args:
        threshold: Jaccard threshold in (0, 1].
        num_perm: signature length.
        min_recall: wanted candidate probability at the threshold.

    Returns:
        ``(bands, rows)`` with ``bands * rows <= num_perm``.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if lsh_probability(threshold, bands, rows) >= min_recall:
            best = (bands, rows)
    return best


@dataclass(frozen=True)
class LSHParams:
    """Parameters of one near-duplicate search.

    Attributes:
        threshold: Jaccard threshold; verified pairs are >= it.
        shingle: ``word`` or ``char`` n-grams.
        ngram: n of the n-grams.
        num_perm: MinHash signature length.
        bands: LSH bands (None: from the threshold, see ``optimal_bands_rows``).
        rows: rows per band (None: from the threshold).
        verify: ``exact`` (Jaccard over the shingle sets) or ``estimate`` (signature agreement).
        seed: seed of the hash functions (same seed, same result).
        window: bucket members compared with each member in buckets larger than ``window + 1``.
        chunk_docs: documents hashed per chunk (bounds memory).
        keep_shingles: shingle hashes (8 bytes each) kept between the passes to skip re-tokenising
            the candidates; larger corpora drop them and re-read the candidates' texts.
    """

    threshold: float = 0.8
    shingle: Literal["word", "char"] = "word"
    ngram: int = 5
    num_perm: int = 128
    bands: int | None = None
    rows: int | None = None
    verify: Literal["exact", "estimate"] = "exact"
    seed: int = 1
    window: int = 64
    chunk_docs: int = 2048
    keep_shingles: int = 16_000_000

    def bands_rows(self) -> tuple[int, int]:
        """Resolved (bands, rows); refuses a banding longer than the signature."""
        if self.bands is not None and self.rows is not None:
            b, r = self.bands, self.rows
        elif self.bands is not None:
            b, r = self.bands, max(1, self.num_perm // self.bands)
        elif self.rows is not None:
            b, r = max(1, self.num_perm // self.rows), self.rows
        else:
            b, r = optimal_bands_rows(self.threshold, self.num_perm)
        if b * r > self.num_perm:
            raise ValueError(f"bands x rows = {b} x {r} = {b * r} exceeds num_perm = {self.num_perm}")
        return b, r


class Shingler:
    """Turns texts into per-document arrays of 64-bit shingle hashes (deterministic for a given seed).

    Hashes depend only on the text and the seed (not on the order texts are seen in).
    """

    def __init__(self, *, shingle: Literal["word", "char"] = "word", ngram: int = 5, seed: int = 1) -> None:
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        if shingle not in ("word", "char"):
            raise ValueError(f"shingle must be 'word' or 'char', got {shingle!r}")
        self.shingle = shingle
        self.ngram = ngram
        self.seed = seed
        self._pow: tuple[np.ndarray, np.ndarray] | None = None

    def tokens(self, text: str) -> list[str]:
        """The normalised tokens of one text (words, or characters for char shingles)."""
        norm = unicodedata.normalize("NFKC", text).lower()
        if self.shingle == "word":
            return _WORD.findall(norm)
        return list(" ".join(norm.split()))

    def shingle_strings(self, text: str) -> set[str]:
        """The shingles of one text as strings (same shingles as ``hash``; for peers and checks)."""
        toks = self.tokens(text)
        sep = " " if self.shingle == "word" else ""
        n = self.ngram
        if not toks:
            return set()
        if len(toks) < n:
            return {sep.join(toks)}
        return {sep.join(toks[i : i + n]) for i in range(len(toks) - n + 1)}

    def hash(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of a batch of texts.

        Returns:
            ``(hashes, offsets)``: uint64 hashes of all shingles, document ``i``'s in
            ``hashes[offsets[i]:offsets[i + 1]]`` (not deduplicated; MinHash does not need it).
        """
        if self.shingle == "word":
            tok_hash, lens = self._word_hashes(texts)
        else:
            tok_lists = [self.tokens(t) for t in texts]
            lens = np.fromiter(map(len, tok_lists), dtype=np.int64, count=len(tok_lists))
            codes = np.fromiter(map(ord, chain.from_iterable(tok_lists)), dtype=np.int64, count=int(lens.sum()))
            tok_hash = codes.astype(_U64)
        return self._ngrams(_splitmix64(tok_hash ^ _U64(self.seed & _MASK64)), lens)

    def _word_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """64-bit hash of every word token of ``texts`` and the token count per text, without
        creating a Python object per token.

        ASCII texts (most) go through as bytes: a 256-entry table lower-cases ``[A-Za-z0-9_]`` (exactly
        ``\\w`` in ASCII) and blanks the rest, token edges come from the word/non-word transitions, and
        a token's hash is a polynomial over its bytes taken from prefix sums:
        ``sum_{m=s}^{e-1} c_m R^-(m-s) = (G[e] - G[s]) R^s`` with ``G[k] = sum_{m<k} c_m R^-m`` (mod 2^64; R
        is odd, so invertible). Other texts are tokenised by ``tokens`` (NFKC + Unicode ``\\w``) first and
        joined by spaces; their non-ASCII bytes count as word bytes. Texts are joined by \\x01, the
        document boundary.
        """
        pre = [t if t.isascii() else " ".join(self.tokens(t)) for t in texts]
        joined = "\x01".join(pre)
        if joined.count("\x01") != max(0, len(pre) - 1):  # a text holds \x01 itself: it is a separator there
            joined = "\x01".join(t.replace("\x01", " ") for t in pre)
        buf = np.frombuffer(joined.encode(), dtype=np.uint8)
        code = _BYTE_CLASS[buf]  # 0: separator, 1: document boundary, else the (lower-cased) word byte
        word = code > 1
        edges = np.flatnonzero(np.diff(word.astype(np.int8), prepend=np.int8(0), append=np.int8(0)))
        starts, ends = edges[0::2], edges[1::2]
        doc = np.searchsorted(np.flatnonzero(code == 1), starts)
        lens = np.bincount(doc, minlength=len(pre)).astype(np.int64)
        pw, inv = self._powers(len(buf))
        prefix = np.zeros(len(buf) + 1, dtype=_U64)
        np.cumsum(code.astype(_U64) * inv[: len(buf)], out=prefix[1:])
        return (prefix[ends] - prefix[starts]) * pw[starts], lens

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """R^m and R^-m mod 2^64 for m < n (cached; grown on demand)."""
        if self._pow is None or len(self._pow[0]) < n:
            size = max(n, 1 << 16)
            pw = np.full(size, _U64(_TOKEN_R), dtype=_U64)
            pw[0] = 1
            inv = np.full(size, _U64(_TOKEN_R_INV), dtype=_U64)
            inv[0] = 1
            self._pow = (np.cumprod(pw, dtype=_U64), np.cumprod(inv, dtype=_U64))
        return self._pow

    def _ngrams(self, tok_hash: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.ngram
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if len(lens) else np.zeros(0, np.int64)
        counts = np.where(lens >= n, lens - n + 1, np.where(lens > 0, 1, 0)).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = len(tok_hash)
        if total >= n:
            # Polynomial over each window of n token hashes, for every window start at once.
            width = total - n + 1
            acc = tok_hash[:width].copy()
            for k in range(1, n):
                acc *= _U64(_POLY)
                acc += tok_hash[k : k + width]
            # A window start i is kept when the window ends inside i's own document: i + n <= doc end.
            doc_end = np.repeat(starts + lens, lens)[:width]
            out = acc[np.arange(n, width + n, dtype=np.int64) <= doc_end]
        else:
            out = np.zeros(0, dtype=_U64)
        short = np.flatnonzero((lens > 0) & (lens < n))
        if len(short):  # rare: texts shorter than one shingle become one shingle of all their tokens
            vals = np.empty(len(short), dtype=_U64)
            for k, d in enumerate(short):
                seg = tok_hash[starts[d] : starts[d] + lens[d]]
                h = int(seg[0])
                for v in seg[1:]:
                    h = (h * _POLY + int(v)) & _MASK64
                vals[k] = h
            # offsets[d] counts the shingles before doc d; minus the k short docs before it = long windows.
            out = np.insert(out, offsets[short] - np.arange(len(short)), vals)
        return _splitmix64(out), offsets


class MinHasher:
    """MinHash signatures of shingle hashes with ``num_perm`` multiply-add-shift hash functions."""

    def __init__(self, *, num_perm: int = 128, seed: int = 1, block_shingles: int = 32768) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.block_shingles = block_shingles
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * _U64(2) + _U64(1)  # odd
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * _U64(2)

    def signatures(self, hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Signatures ``(num_docs, num_perm)`` uint32; a document without shingles is all 0xFFFFFFFF."""
        n_docs = len(offsets) - 1
        sig = np.full((n_docs, self.num_perm), _EMPTY, dtype=np.uint32)
        counts = np.diff(offsets)
        nonempty = np.flatnonzero(counts > 0)
        if len(nonempty) == 0:
            return sig
        starts = offsets[nonempty]
        ends = offsets[nonempty + 1]
        out = np.empty((self.num_perm, len(nonempty)), dtype=np.uint32)
        tmp = np.empty(min(len(hashes), self.block_shingles + int(np.diff(offsets).max())), dtype=_U64)
        shift = _U64(32)
        # Blocks of whole documents of about block_shingles shingles, so the temporary stays in cache
        # while all num_perm hash functions run over it (about 3x faster than whole-chunk passes).
        cuts = np.searchsorted(starts, np.arange(0, len(hashes), self.block_shingles), side="left")
        cuts = _sorted_unique(np.append(cuts, len(nonempty)))
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            s0, s1 = int(starts[lo]), int(ends[hi - 1])
            x = hashes[s0:s1]
            t = tmp[: s1 - s0]
            seg = starts[lo:hi] - s0
            for p in range(self.num_perm):
                np.multiply(x, self.a[p], out=t)
                t += self.b[p]
                t >>= shift
                out[p, lo:hi] = np.minimum.reduceat(t, seg)
        sig[nonempty] = out.T
        return sig


def band_keys(sig: np.ndarray, bands: int, rows: int, *, seed: int = 1) -> np.ndarray:
    """Fold each band of ``rows`` signature values into one uint64 key: ``(num_docs, bands)``."""
    n = sig.shape[0]
    keys = np.zeros((n, bands), dtype=_U64)
    s = sig[:, : bands * rows].reshape(n, bands, rows).astype(_U64)
    for r in range(rows):
        keys *= _U64(_POLY)
        keys += s[:, :, r]
    # Mix in the band index so equal values in different bands never share a bucket key.
    keys ^= np.arange(bands, dtype=_U64)[None, :] * _U64(0xD6E8FEB86659FD93)
    return _splitmix64(keys ^ _U64(seed & _MASK64))


def candidate_pairs(
    keys: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    window: int = 64,
    pair_filter: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Pairs of documents sharing a bucket in any band, as a unique ``(m, 2)`` int64 array with i < j.

    Args:
        keys: ``(num_docs, bands)`` band keys.
        valid: boolean mask of documents that take part (documents without shingles do not).
        window: in a bucket with more than ``window + 1`` members, each member is paired with the
            next ``window`` members only (the bucket stays connected, pairs stay linear in its size).
        pair_filter: ``f(i, j) -> bool mask`` applied before deduplicating pairs (e.g. cross-split only).
    """
    n, bands = keys.shape
    idx_all = np.arange(n, dtype=np.int64) if valid is None else np.flatnonzero(valid).astype(np.int64)
    found: list[np.ndarray] = []
    for b in range(bands):
        col = keys[idx_all, b]
        order = np.argsort(col, kind="stable")
        sk = col[order]
        same_next = sk[1:] == sk[:-1]
        if not same_next.any():
            continue
        # Keep only positions inside runs of length >= 2 (usually a tiny fraction).
        in_run = np.zeros(len(sk), dtype=bool)
        in_run[1:] |= same_next
        in_run[:-1] |= same_next
        pos = np.flatnonzero(in_run)
        members = idx_all[order[pos]]
        run_start = np.ones(len(pos), dtype=bool)
        run_start[1:] = ~((pos[1:] == pos[:-1] + 1) & same_next[pos[:-1]])
        run_id = np.cumsum(run_start)
        for d in range(1, window + 1):
            if d >= len(members):
                break
            same = run_id[d:] == run_id[:-d]
            if not same.any():
                break
            i, j = members[:-d][same], members[d:][same]
            lo, hi = np.minimum(i, j), np.maximum(i, j)
            if pair_filter is not None:
                keep = pair_filter(lo, hi)
                lo, hi = lo[keep], hi[keep]
            if len(lo):
                found.append(lo * n + hi)
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    codes = _sorted_unique(np.concatenate(found))
    return np.stack([codes // n, codes % n], axis=1)


@dataclass(frozen=True)
class ShingleSets:
    """Sorted unique shingles of some documents, as dense uint32 ids in one CSR layout.

    Dense ids (ranks of the 64-bit shingle hashes among all shingles here) let a (pair, shingle) key
    fit exactly in one uint64, which makes the Jaccard of many pairs a few vectorised passes.

    Attributes:
        docs: sorted document indices that have a row here.
        offsets: row ``k`` (document ``docs[k]``) is ``values[offsets[k]:offsets[k + 1]]``.
        values: sorted unique dense shingle ids per row.
    """

    docs: np.ndarray
    offsets: np.ndarray
    values: np.ndarray

    @classmethod
    def build(cls, docs: np.ndarray, hashes: np.ndarray, offsets: np.ndarray) -> "ShingleSets":
        """From per-document shingle hashes (``hashes[offsets[k]:offsets[k+1]]`` belong to ``docs[k]``)."""
        counts = np.diff(offsets)
        _, dense = np.unique(hashes, return_inverse=True)
        row = np.repeat(np.arange(len(docs), dtype=np.uint64), counts)
        # One sort of (row, dense id) dedups and orders every row at once.
        keys = _sorted_unique((row << _U64(32)) | dense.astype(_U64))
        rows_of = (keys >> _U64(32)).astype(np.int64)
        new_offsets = np.searchsorted(rows_of, np.arange(len(docs) + 1), side="left").astype(np.int64)
        return cls(docs=np.asarray(docs, dtype=np.int64), offsets=new_offsets, values=(keys & _U64(0xFFFFFFFF)).astype(np.uint32))

    def rows(self, doc_indices: np.ndarray) -> np.ndarray:
        """Row numbers of documents (all must be present)."""
        r = np.searchsorted(self.docs, doc_indices)
        if len(r) and (r.max(initial=0) >= len(self.docs) or not np.array_equal(self.docs[r], doc_indices)):
            raise KeyError("a document of the pairs has no shingle set")
        return r

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated values of ``rows`` and their lengths (vectorised variable-length gather)."""
        lens = self.offsets[rows + 1] - self.offsets[rows]
        total = int(lens.sum())
        start = np.repeat(self.offsets[rows] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
        return self.values[np.arange(total, dtype=np.int64) + start], lens


def exact_jaccard(sets: ShingleSets, pairs: np.ndarray, *, batch_elements: int = 4_000_000) -> np.ndarray:
    """Exact Jaccard of each pair of documents over their shingle sets (vectorised, in batches).

    Args:
        sets: shingle sets of (at least) every document in ``pairs``.
        pairs: ``(m, 2)`` document indices.
        batch_elements: bounds the temporary arrays.
    """
    m = len(pairs)
    out = np.zeros(m, dtype=np.float64)
    if m == 0:
        return out
    ri, rj = sets.rows(pairs[:, 0]), sets.rows(pairs[:, 1])
    size = (sets.offsets[ri + 1] - sets.offsets[ri]) + (sets.offsets[rj + 1] - sets.offsets[rj])
    ends = np.cumsum(size)
    lo = 0
    while lo < m:
        # Largest batch whose elements fit batch_elements (at least one pair).
        hi = max(lo + 1, int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + batch_elements, side="right")))
        out[lo:hi] = _jaccard_batch(sets, ri[lo:hi], rj[lo:hi])
        lo = hi
    return out


def _jaccard_batch(sets: ShingleSets, ri: np.ndarray, rj: np.ndarray) -> np.ndarray:
    m = len(ri)
    lv, nl = sets.gather(ri)
    rv, nr = sets.gather(rj)
    if len(lv) == 0 or len(rv) == 0:
        return np.zeros(m)
    pid = np.arange(m, dtype=np.uint64)
    lk = (np.repeat(pid, nl) << _U64(32)) | lv.astype(_U64)
    rk = (np.repeat(pid, nr) << _U64(32)) | rv.astype(_U64)
    # Each row is sorted and pairs are in order, so rk is sorted as a whole: membership by searchsorted.
    pos = np.searchsorted(rk, lk)
    pos[pos >= len(rk)] = len(rk) - 1
    hit = rk[pos] == lk
    inter = np.bincount(np.repeat(np.arange(m), nl)[hit], minlength=m).astype(np.float64)
    union = nl + nr - inter
    return np.divide(inter, union, out=np.zeros(m), where=union > 0)


_BBIT_COLLIDE = 1.0 / 256  # chance that two different 8-bit values agree


def bbit_estimate(low: np.ndarray, i: np.ndarray, j: np.ndarray, *, batch: int = 65536) -> np.ndarray:
    """Jaccard estimate of pairs from 8-bit signatures: (agreement - 2^-8) / (1 - 2^-8), clipped to [0, 1].

    Standard error: ``sqrt(P (1 - P) / num_perm) / (1 - 2^-8)`` with ``P = J + (1 - J) 2^-8``.
    """
    out = np.empty(len(i), dtype=np.float64)
    for lo in range(0, len(i), batch):
        agree = (low[i[lo : lo + batch]] == low[j[lo : lo + batch]]).mean(axis=1)
        out[lo : lo + batch] = (agree - _BBIT_COLLIDE) / (1 - _BBIT_COLLIDE)
    return np.clip(out, 0.0, 1.0)


def bbit_margin(threshold: float, num_perm: int, *, sigmas: float = 4.5) -> float:
    """How far below ``threshold`` the 8-bit estimate of a pair at the threshold can fall (``sigmas`` s.e.)."""
    p = threshold + (1 - threshold) * _BBIT_COLLIDE
    return sigmas * (p * (1 - p) / num_perm) ** 0.5 / (1 - _BBIT_COLLIDE)


@dataclass(frozen=True)
class NearDuplicates:
    """Result of a search.

    Attributes:
        pairs: ``(m, 2)`` int64 document indices, i < j, of the verified pairs.
        similarity: ``(m,)`` their Jaccard (exact, or the signature estimate).
        num_candidates: candidate pairs LSH produced before verification.
        num_shingleless: documents with no shingles (never matched).
        bands: bands used.
        rows: rows per band used.
    """

    pairs: np.ndarray
    similarity: np.ndarray
    num_candidates: int
    num_shingleless: int
    bands: int
    rows: int


# A mapper runs ``fn`` over ``items`` and returns the results in order: the builtin loop in this
# process, or an engine's map (``sftflow.engine.Engine.map``: Ray tasks). Results never depend on it.
Mapper = Callable[[Callable, Sequence], list]


def _local_map(fn: Callable, items: Sequence) -> list:
    return [fn(x) for x in items]


@dataclass(frozen=True)
class SignatureShard:
    """What one shard of documents contributes to a search (the per-shard map step).

    Attributes:
        keys: ``(m, bands)`` uint64 LSH band keys.
        valid: ``(m,)`` documents with at least one shingle.
        low: ``(m, num_perm)`` uint8 low bytes of the signatures (b-bit estimate).
        hashes: the shard's shingle hashes (for verification), or None when over ``keep_shingles``.
        offsets: their CSR offsets (document ``k``: ``hashes[offsets[k]:offsets[k + 1]]``), or None.
    """

    keys: np.ndarray
    valid: np.ndarray
    low: np.ndarray
    hashes: np.ndarray | None
    offsets: np.ndarray | None


def signature_shard(texts: Sequence[str], params: LSHParams) -> SignatureShard:
    """MinHash signatures and LSH band keys of one shard of texts (pure: the same text, the same keys).

    Every value depends on its own document only, so any sharding of a corpus gives the same keys.
    ``texts`` is read in chunks of ``params.chunk_docs``.
    """
    bands, rows = params.bands_rows()
    n = len(texts)
    shingler = Shingler(shingle=params.shingle, ngram=params.ngram, seed=params.seed)
    hasher = MinHasher(num_perm=params.num_perm, seed=params.seed)
    keys = np.zeros((n, bands), dtype=_U64)
    valid = np.zeros(n, dtype=bool)
    # b-bit minwise hashing (b = 8): the low byte of every signature value, 1 byte per permutation,
    # enough to estimate Jaccard (see ``bbit_estimate``) at a quarter of the memory of the signatures.
    low = np.zeros((n, params.num_perm), dtype=np.uint8)
    # Shingle hashes are kept for verification while they fit params.keep_shingles (no second
    # tokenisation pass); past that they are dropped and recomputed for the candidates only.
    kept: list[tuple[np.ndarray, np.ndarray]] | None = []
    kept_total = 0
    for lo in range(0, n, params.chunk_docs):
        hi = min(n, lo + params.chunk_docs)
        hashes, offsets = shingler.hash(texts[lo:hi])
        sig = hasher.signatures(hashes, offsets)
        keys[lo:hi] = band_keys(sig, bands, rows, seed=params.seed)
        valid[lo:hi] = np.diff(offsets) > 0
        low[lo:hi] = sig.astype(np.uint8)
        if kept is not None:
            kept_total += len(hashes)
            if kept_total <= params.keep_shingles:
                kept.append((hashes, offsets))
            else:
                kept = None
        del hashes, sig
    if kept is None:
        return SignatureShard(keys=keys, valid=valid, low=low, hashes=None, offsets=None)
    lens = np.concatenate([np.diff(o) for _, o in kept]) if kept else np.zeros(0, np.int64)
    all_hashes = np.concatenate([h for h, _ in kept]) if kept else np.zeros(0, _U64)
    return SignatureShard(keys=keys, valid=valid, low=low, hashes=all_hashes,
                          offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))


def _gather_csr(hashes: np.ndarray, offsets: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hashes of documents ``local`` of one CSR block, concatenated, and their counts."""
    counts = offsets[local + 1] - offsets[local]
    take = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(
        offsets[local] - np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64), counts
    )
    return hashes[take], counts


def verify_group(docs: np.ndarray, hashes: np.ndarray, counts: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard of one group of candidate pairs (the per-group verification step; pure).

    Args:
        docs: sorted document indices of every document in ``pairs``.
        hashes: their shingle hashes, concatenated in ``docs`` order.
        counts: shingle hashes per document.
        pairs: ``(m, 2)`` candidate pairs (document indices).
    """
    sets = ShingleSets.build(docs, hashes, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    return exact_jaccard(sets, pairs)


def _verify_task(args: tuple) -> np.ndarray:
    return verify_group(*args)


def _signature_task(args: tuple) -> SignatureShard:
    texts, params = args
    return signature_shard(texts.load() if hasattr(texts, "load") else texts, params)


def find_near_duplicates(
    texts: Sequence[str],
    params: LSHParams,
    *,
    pair_filter: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    map_fn: Mapper | None = None,
    shard_docs: int | None = None,
) -> NearDuplicates:
    """All pairs of ``texts`` whose shingle Jaccard is >= ``params.threshold`` (LSH + verification).

    ``texts`` may be any sequence supporting ``len``, slicing and integer indexing, or a lazy corpus
    with ``load()`` and ``take(positions)`` too (``sftflow.data.neardup.ParquetTexts``: a shard's task
    gets the slice and reads its own texts, verification reads the candidates' texts with ``take``);
    it is read in chunks of ``params.chunk_docs`` and, for verification, once more for the
    documents that are in a candidate pair only, so memory is bounded by n x bands band keys plus
    the candidates' shingles.

    Sharded (``shard_docs``): signatures and band keys are computed per shard of ``shard_docs``
    documents (``signature_shard``, mapped with ``map_fn``), candidates come from one grouping of all
    band keys (LSH buckets span shards), and candidate pairs are verified in groups of about
    ``shard_docs`` pairs (``verify_group``, mapped too). Every step is exact per document or per pair,
    so the result is the same for any ``shard_docs`` and any ``map_fn``.

    Args:
        texts: the documents.
        params: the search parameters.
        pair_filter: ``f(i, j) -> bool mask`` of candidate pairs to consider (e.g. cross-set only).
        map_fn: runs the per-shard / per-group steps (``sftflow.engine.Engine.map``); default: a loop here.
        shard_docs: documents per shard (default: one shard, the whole corpus).
    """
    bands, rows = params.bands_rows()
    n = len(texts)
    mapper = map_fn or _local_map
    lazy = hasattr(texts, "load")  # a lazy corpus (e.g. ``sftflow.data.neardup.ParquetTexts``): tasks read their own texts
    if shard_docs is None or shard_docs >= n:
        shards = [signature_shard(texts.load() if lazy else texts, params)]
    else:
        shards = mapper(_signature_task, [(texts[lo : min(n, lo + shard_docs)] if lazy else
                                           list(texts[lo : min(n, lo + shard_docs)]), params)
                                          for lo in range(0, n, shard_docs)])
    starts = np.concatenate([[0], np.cumsum([len(sh.valid) for sh in shards])]).astype(np.int64)
    keys = np.concatenate([sh.keys for sh in shards]) if shards else np.zeros((0, bands), _U64)
    valid = np.concatenate([sh.valid for sh in shards]) if shards else np.zeros(0, bool)
    low = np.concatenate([sh.low for sh in shards]) if shards else np.zeros((0, params.num_perm), np.uint8)
    kept_ok = all(sh.hashes is not None for sh in shards) and sum(len(sh.hashes) for sh in shards) <= params.keep_shingles
    kept = [(int(s), sh.hashes, sh.offsets) for s, sh in zip(starts, shards)] if kept_ok else None
    del shards
    # Most LSH candidates of real corpora are templated rows far below the threshold; the signature
    # estimate drops them before the (costlier) exact check. The margin is 4.5 standard errors of the
    # estimate at the threshold, so a pair at the threshold survives with probability > 0.99999.
    floor = params.threshold if params.verify == "estimate" else params.threshold - bbit_margin(params.threshold, params.num_perm)

    def keep_pair(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        ok = bbit_estimate(low, i, j) >= floor - 1e-12
        return ok & pair_filter(i, j) if pair_filter is not None else ok

    # Candidates grouped by band key over all shards at once (one bucket may hold rows of any shard).
    cand = candidate_pairs(keys, valid=valid, window=params.window, pair_filter=keep_pair)
    del keys
    if len(cand) == 0:
        sim = np.zeros(0)
    elif params.verify == "estimate":
        sim = bbit_estimate(low, cand[:, 0], cand[:, 1])
    else:
        shingler = Shingler(shingle=params.shingle, ngram=params.ngram, seed=params.seed)
        group = len(cand) if shard_docs is None else max(1, shard_docs)

        def shingles_of(docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Shingle hashes of ``docs`` (sorted): from the kept shard hashes, else re-read."""
            parts, lens = [], []
            if kept is not None:
                for first, hashes, offsets in kept:  # the candidates' shingles, shard by shard
                    local = docs[(docs >= first) & (docs < first + len(offsets) - 1)] - first
                    h, c = _gather_csr(hashes, offsets, local)
                    parts.append(h)
                    lens.append(c)
            elif lazy:  # one pass over the files for the whole group, then hashed chunk by chunk
                got = texts.take(docs)
                for lo in range(0, len(docs), params.chunk_docs):
                    hashes, offsets = shingler.hash(got[lo : lo + params.chunk_docs])
                    parts.append(hashes)
                    lens.append(np.diff(offsets))
                del got
            else:
                for lo in range(0, len(docs), params.chunk_docs):
                    part = docs[lo : lo + params.chunk_docs]
                    hashes, offsets = shingler.hash([texts[int(i)] for i in part])
                    parts.append(hashes)
                    lens.append(np.diff(offsets))
            return np.concatenate(parts), np.concatenate(lens)

        # Verification per group of candidate pairs (each group carries its documents' shingles).
        jobs = []
        for lo in range(0, len(cand), group):
            pairs = cand[lo : lo + group]
            docs = _sorted_unique(pairs.ravel())
            jobs.append((docs, *shingles_of(docs), pairs))
        sim = np.concatenate(mapper(_verify_task, jobs) if len(jobs) > 1 else [_verify_task(jobs[0])])
        del jobs
    keep = sim >= params.threshold - 1e-12
    return NearDuplicates(
        pairs=cand[keep],
        similarity=sim[keep],
        num_candidates=int(len(cand)),
        num_shingleless=int(n - valid.sum()),
        bands=bands,
        rows=rows,
    )


def connected_components(num_nodes: int, pairs: np.ndarray) -> np.ndarray:
    """Cluster label per node from pairs (union-find semantics; labels are the smallest member index)."""
    parent = np.arange(num_nodes, dtype=np.int64)
    if len(pairs) == 0:
        return parent
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as _cc

    graph = coo_matrix(
        (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(num_nodes, num_nodes)
    )
    _, labels = _cc(graph, directed=False)
    # Relabel each component by its smallest member, so labels are stable and meaningful.
    first = np.full(labels.max() + 1, num_nodes, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(num_nodes, dtype=np.int64))
    return first[labels]


__all__ = [
    "LSHParams",
    "MinHasher",
    "NearDuplicates",
    "ShingleSets",
    "Shingler",
    "SignatureShard",
    "band_keys",
    "bbit_estimate",
    "bbit_margin",
    "candidate_pairs",
    "connected_components",
    "exact_jaccard",
    "find_near_duplicates",
    "lsh_probability",
    "optimal_bands_rows",
    "signature_shard",
    "verify_group",
]

"""Benchmark of the near-duplicate engine (sftflow.data.minhash) against datasketch. Prints JSON.

Run (one core, as the targets are stated)::

    python bench/dedup.py                      # ~36k real docs + planted near-duplicates, vs datasketch
    python bench/dedup.py --scale              # + 100k / 300k / 1M synthetic docs: time, peak RSS
    python bench/dedup.py --scale --sizes 100000,1000000 --threshold 0.8

Corpus: every text in ../shared/data (instruct, eval, unlabeled) with at least 20 words, plus planted
near-duplicates (copies of sampled documents with about one word in 60 replaced; their true Jaccard is
measured on the shingle sets). Both engines get the same word 5-gram shingles and threshold, and run in
this one process pinned to one core. Recall: share of the planted pairs with true Jaccard >= threshold
that are reported. Precision: share of reported pairs whose exact Jaccard (Python sets of shingle
strings, computed independently of either engine) is >= threshold. datasketch reports LSH candidates
unverified (that is its API), ours are verified.

The timings are wall-clock on a shared machine: compare the ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

# One thread for numpy's BLAS (not used by the engine, but keep the measurement one-core honest).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"


# --------------------------------------------------------------------------- corpus
def _alpaca_text(r: dict) -> str:
    return "\n".join(str(r.get(k) or "") for k in ("instruction", "input", "output") if r.get(k))


def iter_corpus(root: Path) -> Iterator[tuple[str, str]]:
    """(file name, text) for every document in ../shared/data (instruct, eval, unlabeled)."""
    for path in sorted((root / "instruct").glob("*")) + sorted((root / "eval").glob("*")):
        name = path.name
        if path.suffix == ".json":
            for r in json.loads(path.read_text()):
                yield name, _alpaca_text(r)
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                r = json.loads(line)
                if "text" in r:
                    yield name, r["text"]
                elif "messages" in r:
                    parts = []
                    for m in r["messages"]:
                        c = m["content"]
                        parts.append(" ".join(x.get("value", "") for x in c) if isinstance(c, list) else str(c))
                    yield name, "\n".join(parts)
                else:
                    inst = "\n".join(f"{i.get('input', '')}\n{i.get('output', '')}" for i in r.get("instances", []))
                    yield name, f"{r.get('instruction', '')}\n{inst}"
    un = root / "unlabeled"
    wiki = un / "wikipedia_leads_10033.json"
    if wiki.exists():
        for v in json.loads(wiki.read_text()).values():
            yield wiki.name, v.get("extract") or ""
    c4 = un / "c4_300.jsonl"
    if c4.exists():
        for line in c4.read_text().splitlines():
            if line.strip():
                yield c4.name, json.loads(line)["text"]
    art = un / "wikipedia_articles_30.txt"
    if art.exists():
        for line in art.read_text().splitlines():
            if line.strip():
                yield art.name, line


def load_corpus(root: Path, *, min_words: int = 20) -> list[str]:
    """All texts with at least ``min_words`` whitespace words."""
    return [t for _, t in iter_corpus(root) if len(t.split()) >= min_words]


def plant(texts: list[str], *, num: int, rate: float, seed: int) -> tuple[list[str], list[tuple[int, int]]]:
    """Append ``num`` copies of sampled texts with each word replaced with probability ``rate``
    (at least one word); returns (texts + copies, [(original index, copy index)])."""
    rng = random.Random(seed)
    vocab = [w for t in rng.sample(texts, min(2000, len(texts))) for w in t.split()]
    out = list(texts)
    pairs = []
    for i in rng.sample(range(len(texts)), num):
        words = texts[i].split()
        hits = [k for k in range(len(words)) if rng.random() < rate] or [rng.randrange(len(words))]
        for k in hits:
            words[k] = rng.choice(vocab)
        pairs.append((i, len(out)))
        out.append(" ".join(words))
    return out, pairs


class SyntheticCorpus(Sequence[str]):
    """``size`` documents resampled from ``base`` (doc i perturbs base[i % len(base)] with its own seed).

    Lazy: texts are made when read, so the corpus itself takes no memory and the engine's memory is
    what is measured. Every 50th document is a light copy (a near-duplicate), the rest are heavily
    perturbed (about 15% of words replaced, a random prefix cut) so they are distinct documents.
    """

    def __init__(self, base: list[str], size: int, *, seed: int = 0) -> None:
        self.base = base
        self.size = size
        self.seed = seed
        rng = random.Random(seed)
        self.vocab = [w for t in rng.sample(base, min(3000, len(base))) for w in t.split()]
        self.generated = 0  # documents made so far (to separate generation time from engine time)

    def __len__(self) -> int:
        return self.size

    def _doc(self, i: int) -> str:
        self.generated += 1
        rng = random.Random(self.seed * 1_000_003 + i)
        words = self.base[i % len(self.base)].split()
        rate = 1 / 60 if i % 50 == 0 else 0.15
        if i % 50:
            words = words[rng.randrange(0, max(1, len(words) // 4)) :]
        v = self.vocab
        return " ".join(w if rng.random() >= rate else v[rng.randrange(len(v))] for w in words)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            return [self._doc(i) for i in range(*key.indices(self.size))]
        return self._doc(int(key))


def rss_mb() -> float:
    """Peak resident set size of this process, MiB (VmHWM: unlike ru_maxrss it is not inherited
    from the parent across exec, so each scale run reports its own peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- runs
def _clock() -> tuple[float, float]:
    """(wall, CPU time of this process): on a busy shared machine CPU time is the fairer measure."""
    return time.perf_counter(), time.process_time()


def run_ours(texts: Sequence[str], *, threshold: float, ngram: int, num_perm: int) -> tuple[float, float, object]:
    from sftflow.data.minhash import LSHParams, find_near_duplicates

    w0, c0 = _clock()
    res = find_near_duplicates(texts, LSHParams(threshold=threshold, ngram=ngram, num_perm=num_perm))
    w1, c1 = _clock()
    return w1 - w0, c1 - c0, res


def run_datasketch(texts: list[str], *, threshold: float, ngram: int, num_perm: int) -> tuple[float, float, set]:
    from datasketch import MinHash, MinHashLSH

    from sftflow.data.minhash import Shingler

    shingler = Shingler(shingle="word", ngram=ngram)
    w0, c0 = _clock()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sigs = []
    for i, t in enumerate(texts):
        m = MinHash(num_perm=num_perm)
        m.update_batch([s.encode() for s in shingler.shingle_strings(t)])
        lsh.insert(i, m, check_duplication=False)
        sigs.append(m)
    pairs = set()
    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            if j != i:
                pairs.add((min(i, j), max(i, j)))
    w1, c1 = _clock()
    return w1 - w0, c1 - c0, pairs


def jaccard_strings(a: set, b: set) -> float:
    """Exact Jaccard of two sets of shingle strings."""
    u = len(a | b)
    return len(a & b) / u if u else 0.0


def main_bench(args: argparse.Namespace) -> dict:
    from sftflow.data.minhash import Shingler

    base = load_corpus(Path(args.data))
    texts, planted = plant(base, num=args.planted, rate=1 / 60, seed=args.seed)
    shingler = Shingler(shingle="word", ngram=args.ngram)
    cache: dict[int, set] = {}

    def sh(i: int) -> set:
        if i not in cache:
            cache[i] = shingler.shingle_strings(texts[i])
        return cache[i]

    true_j = [jaccard_strings(sh(i), sh(j)) for i, j in planted]
    positives = {p for p, jv in zip(planted, true_j) if jv >= args.threshold}

    # Interleaved repeats, best of each: both engines see the same machine conditions.
    ours_w, ours_c, ds_w, ds_c = [], [], [], []
    for _ in range(args.repeat):
        w, c, res = run_ours(texts, threshold=args.threshold, ngram=args.ngram, num_perm=args.num_perm)
        ours_w.append(w)
        ours_c.append(c)
        w, c, ds_pairs = run_datasketch(texts, threshold=args.threshold, ngram=args.ngram, num_perm=args.num_perm)
        ds_w.append(w)
        ds_c.append(c)
    t_ours, t_ds = min(ours_c), min(ds_c)

    ours_pairs = {(int(i), int(j)) for i, j in res.pairs}

    def precision(pairs: set) -> tuple[float, int]:
        sample = sorted(pairs)
        rng = random.Random(args.seed)
        if len(sample) > args.precision_sample:
            sample = rng.sample(sample, args.precision_sample)
        ok = sum(jaccard_strings(sh(i), sh(j)) >= args.threshold - 1e-12 for i, j in sample)
        return (ok / len(sample) if sample else 1.0), len(sample)

    p_ours, n_ours = precision(ours_pairs)
    p_ds, n_ds = precision(ds_pairs)
    n = len(texts)
    return {
        "corpus_docs": len(base),
        "planted_pairs": len(planted),
        "planted_true_jaccard": {
            "min": round(min(true_j), 4),
            "median": round(sorted(true_j)[len(true_j) // 2], 4),
            "max": round(max(true_j), 4),
            "at_or_above_threshold": len(positives),
        },
        "docs": n,
        "threshold": args.threshold,
        "shingles": f"word {args.ngram}-grams",
        "num_perm": args.num_perm,
        "timing": f"best of {args.repeat} interleaved runs, CPU seconds of this process (pinned to one core)",
        "ours": {
            "cpu_seconds": round(t_ours, 3),
            "wall_seconds": round(min(ours_w), 3),
            "docs_per_s": round(n / t_ours),
            "bands_rows": [res.bands, res.rows],
            "candidates": res.num_candidates,
            "reported_pairs": len(ours_pairs),
            "recall_planted": round(len(positives & ours_pairs) / max(1, len(positives)), 4),
            "precision": round(p_ours, 4),
            "precision_checked_pairs": n_ours,
        },
        "datasketch": {
            "cpu_seconds": round(t_ds, 3),
            "wall_seconds": round(min(ds_w), 3),
            "docs_per_s": round(n / t_ds),
            "reported_pairs": len(ds_pairs),
            "recall_planted": round(len(positives & ds_pairs) / max(1, len(positives)), 4),
            "precision": round(p_ds, 4),
            "precision_checked_pairs": n_ds,
        },
        "speedup_docs_per_s": round(t_ds / t_ours, 2),
        "peak_rss_mb": round(rss_mb(), 1),
    }


def scale_one(args: argparse.Namespace) -> dict:
    """One size of the scale run (in its own process, so its peak RSS is its own)."""
    base = load_corpus(Path(args.data))
    corpus = SyntheticCorpus(base, args.scale_one, seed=args.seed)
    t0 = time.process_time()
    # Time to just produce the texts (the synthetic generator), subtracted to get engine time.
    for lo in range(0, len(corpus), 8192):
        corpus[lo : lo + 8192]
    t_gen = time.process_time() - t0
    rss_before = rss_mb()
    corpus.generated = 0
    _, t_total, res = run_ours(corpus, threshold=args.threshold, ngram=args.ngram, num_perm=args.num_perm)
    # The engine reads every doc once, plus the candidates' docs again to verify: subtract making them.
    engine = max(1e-9, t_total - t_gen * corpus.generated / len(corpus))
    return {
        "docs": len(corpus),
        "cpu_seconds_total_with_generation": round(t_total, 2),
        "cpu_seconds_generation_only": round(t_gen, 2),
        "cpu_seconds_engine": round(engine, 2),
        "docs_per_s_engine": round(len(corpus) / engine),
        "candidates": res.num_candidates,
        "verified_pairs": int(len(res.pairs)),
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_before_engine_mb": round(rss_before, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--planted", type=int, default=3000)
    ap.add_argument("--precision-sample", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved runs of each engine (best counts)")
    ap.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: no pinning)")
    ap.add_argument("--scale", action="store_true", help="also run synthetic corpora of --sizes")
    ap.add_argument("--sizes", default="100000,300000,1000000")
    ap.add_argument("--scale-one", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--skip-peer", action="store_true", help="only the scale run")
    args = ap.parse_args()
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    sys.path.insert(0, str(REPO))
    if args.scale_one:
        print(json.dumps(scale_one(args)))
        return
    out: dict = {"cpu_pinned": args.cpu}
    if not args.skip_peer:
        out["bench"] = main_bench(args)
    if args.scale:
        runs = []
        for size in [int(s) for s in args.sizes.split(",") if s]:
            cmd = [sys.executable, __file__, "--scale-one", str(size), "--data", args.data, "--cpu", str(args.cpu),
                   "--threshold", str(args.threshold), "--ngram", str(args.ngram), "--num-perm", str(args.num_perm)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        out["scale"] = runs
        if len(runs) >= 2:
            a, b = runs[0], runs[-1]
            out["scale_time_ratio_vs_size_ratio"] = [
                round(b["cpu_seconds_engine"] / a["cpu_seconds_engine"], 2), round(b["docs"] / a["docs"], 2)
            ]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Scale benchmark of the data stages: ingest -> validate -> dedup -> split, ``local`` vs ``ray``. Prints JSON.

Run::

    python bench/scale.py                          # 100k rows, local and ray (2 workers)
    python bench/scale.py --rows 100000,300000     # several sizes
    python bench/scale.py --rows 1000000 --engines local

Data: a synthetic Alpaca JSONL file per size (``--seed``): distinct instruction/response pairs built
from a word list, with 3% exact copies (re-cased, re-punctuated), 3% near copies (one word in ~30
changed) and 0.5% malformed lines (quarantined at ingestion) and 0.5% empty responses (quarantined
by validation). Each engine runs the plain stage functions (``tasks/*``: no MLflow, no Prefect) in a
fresh subprocess; a sampler here polls that process and every descendant (Ray's raylet, GCS and
workers included) with psutil every 0.2 s. Reported per run: wall time per stage and in total,
rows/s (input rows / total), peak RSS per process (by command) and the peak of their sum, the
peak RSS of the worker and its descendants during each stage (``peak_rss_mb_by_stage``; memory a
stage frees is often kept by the allocator, so a stage's figure includes what earlier ones left), and the
outputs' row counts and sha256 (equal for both engines: the results do not depend on the engine).

Timings are wall-clock on a shared machine: compare runs of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact be have do say get make go know take see come think look "
         "want give use find tell ask work seem feel try leave call good new first last long great little own "
         "other old right big high different small large next early young important few public bad same able "
         "river mountain garden kitchen engine theory market window letter music planet ocean forest city").split()


def make_data(path: Path, rows: int, *, seed: int = 0) -> dict[str, int]:
    """Write ``rows`` synthetic Alpaca lines to ``path`` (streamed); returns the planted counts."""
    rng = random.Random(seed)
    planted = {"exact": 0, "near": 0, "malformed": 0, "empty_response": 0}
    recent: list[tuple[str, str]] = []
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            r = rng.random()
            if r < 0.005:
                f.write('{"instruction": "broken line ' + str(i) + '"\n')
                planted["malformed"] += 1
                continue
            if r < 0.01:
                row = {"instruction": f"Explain item {i} briefly.", "input": "", "output": ""}
                planted["empty_response"] += 1
            elif r < 0.04 and recent:
                q, a = rng.choice(recent)
                row = {"instruction": q.upper().replace(".", "!"), "input": "", "output": a}
                planted["exact"] += 1
            elif r < 0.07 and recent:
                q, a = rng.choice(recent)
                words = q.split()
                for _ in range(max(1, len(words) // 30)):
                    words[rng.randrange(len(words))] = rng.choice(WORDS)
                row = {"instruction": " ".join(words), "input": "", "output": a}
                planted["near"] += 1
            else:
                q = f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 45))) + "."
                a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "."
                row = {"instruction": q, "input": "", "output": a}
                recent.append((q, a))
                if len(recent) > 2000:
                    recent.pop(rng.randrange(len(recent)))
            f.write(json.dumps(row) + "\n")
    return planted


def run_stages(*, data: Path, out: Path, engine: str, workers: int, shard_rows: int) -> dict[str, Any]:
    """One run of the four stages with ``engine`` (called in the worker subprocess)."""
    from sftflow.config_sections import (DedupConfig, ExecutionConfig, IngestConfig, SourceConfig, SplitConfig,
                                         ValidationConfig)
    from sftflow.engine import engine_session
    from tasks.dedup import dedup
    from tasks.ingest import ingest
    from tasks.split import split
    from tasks.validate import validate

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    cfg = ExecutionConfig(engine=engine, num_cpus=workers if engine == "ray" else None, shard_rows=shard_rows)
    stage_peak = StagePeak()
    with stage_peak, engine_session(cfg):
        times["engine_start"] = time.perf_counter() - t0
        t = time.perf_counter()
        stage_peak.start("ingest")
        raw = ingest(sources=[SourceConfig(name="synthetic", path=str(data))],
                     cfg=IngestConfig(max_quarantine_fraction=0.5), out_dir=out / "ingest")
        times["ingest"] = time.perf_counter() - t
        t = time.perf_counter()
        stage_peak.start("validate")
        valid = validate(dataset=raw.dataset, cfg=ValidationConfig(data_docs=False), out_dir=out / "validate")
        times["validate"] = time.perf_counter() - t
        t = time.perf_counter()
        stage_peak.start("dedup")
        clean = dedup(datasets=[valid.valid], cfg=DedupConfig(), out_dir=out / "dedup")
        times["dedup"] = time.perf_counter() - t
        t = time.perf_counter()
        stage_peak.start("split")
        parts = split(dataset=clean.kept, cfg=SplitConfig(heldout_fraction=0.01, seed=0), dedup=DedupConfig(),
                      out_dir=out / "split")
        times["split"] = time.perf_counter() - t
        stage_peak.start("")
    times["total"] = time.perf_counter() - t0
    refs = {"ingested": raw.dataset, "ingest_quarantine": raw.quarantine, "valid": valid.valid,
            "validate_quarantine": valid.quarantine, "kept": clean.kept, "removed": clean.removed,
            "train": parts.train, "heldout": parts.heldout}
    return {"seconds": {k: round(v, 2) for k, v in times.items()},
            "peak_rss_mb_by_stage": stage_peak.report(),
            "rows": {k: r.num_rows for k, r in refs.items()},
            # Quarantine files name their run folder, so their bytes differ by run; the data files must not.
            "sha256": {k: r.sha256[:16] for k, r in refs.items() if "quarantine" not in k}}


class StagePeak:
    """Peak RSS (this process and its descendants) per stage, polled every ``interval`` seconds in the worker."""

    def __init__(self, *, interval: float = 0.1) -> None:
        self.interval = interval
        self.stage = ""
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, stage: str) -> None:
        """From now on, samples count for ``stage`` ("" for none); samples the stage boundary once."""
        self._sample()
        self.stage = stage

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        if self.stage:
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "StagePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, int]:
        return {k: round(v / (1 << 20)) for k, v in self.peaks.items()}


class Sampler:
    """Peak RSS of a process and all its descendants, polled every ``interval`` seconds."""

    def __init__(self, pid: int, *, interval: float = 0.2) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_by_proc: dict[int, tuple[int, str]] = {}
        self.peak_total = 0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if p.pid not in self.peak_by_proc or rss > self.peak_by_proc[p.pid][0]:
                        name = self.peak_by_proc.get(p.pid, (0, ""))[1] or _label(p)
                        self.peak_by_proc[p.pid] = (rss, name)
                    total += rss
                except psutil.Error:
                    continue
            self.peak_total = max(self.peak_total, total)
            self.max_procs = max(self.max_procs, len(procs))
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, Any]:
        mb = 1 << 20
        procs = sorted(self.peak_by_proc.items(), key=lambda kv: -kv[1][0])
        return {"peak_rss_total_mb": round(self.peak_total / mb), "processes_seen": len(procs),
                "max_concurrent_processes": self.max_procs,
                "peak_rss_mb_by_process": [{"pid": pid, "process": name, "peak_rss_mb": round(rss / mb)}
                                           for pid, (rss, name) in procs if rss >= 20 * mb]}


def _label(p: Any) -> str:
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - a process that just exited
        return p.name()
    text = " ".join(cmd)
    if text.startswith("ray::") or p.name().startswith("ray::"):
        return "ray worker"
    for key in ("default_worker", "bench/scale.py", "gcs_server", "dashboard", "log_monitor", "runtime_env", "raylet"):
        if key in text:
            return key
    return p.name()


def bench_one(*, data: Path, rows: int, engine: str, workers: int, shard_rows: int, timeout: float) -> dict[str, Any]:
    """Run ``engine`` on ``data`` in a subprocess under the sampler."""
    with tempfile.TemporaryDirectory(prefix=f"scale-{engine}-") as tmp:
        cmd = [sys.executable, __file__, "--worker", "--data", str(data), "--out", tmp, "--engines", engine,
               "--workers", str(workers), "--shard-rows", str(shard_rows)]
        env = {**os.environ, "SFTFLOW_HOME": str(Path(tmp) / "home"), "RAY_DEDUP_LOGS": "0"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with Sampler(proc.pid) as sampler:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                return {"engine": engine, "rows_in": rows, "error": f"timed out after {timeout:.0f} s",
                        **sampler.report()}
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"engine": engine, "rows_in": rows, "error": err.strip().splitlines()[-5:], **sampler.report()}
    got = json.loads(out.strip().splitlines()[-1])
    return {"engine": engine, "workers": workers if engine == "ray" else 1, "rows_in": rows,
            "wall_seconds": round(wall, 2), "rows_per_second": round(rows / got["seconds"]["total"]), **got,
            **sampler.report()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="100000", help="comma-separated sizes (e.g. 100000,300000,1000000)")
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--workers", type=int, default=2, help="Ray CPUs (workers) of the local cluster")
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run before it is stopped")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_stages(data=Path(args.data), out=Path(args.out), engine=args.engines,
                                    workers=args.workers, shard_rows=args.shard_rows)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="scale-data-") as tmp:
        for rows in (int(x) for x in args.rows.split(",")):
            data = Path(tmp) / f"alpaca_{rows}.jsonl"
            planted = make_data(data, rows, seed=args.seed)
            for engine in args.engines.split(","):
                res = bench_one(data=data, rows=rows, engine=engine, workers=args.workers,
                                shard_rows=args.shard_rows, timeout=args.timeout)
                res["planted"] = planted
                results.append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)  # progress while the rest runs
            data.unlink()
    by_size: dict[int, dict[str, Any]] = {}
    for r in results:
        by_size.setdefault(r["rows_in"], {})[r["engine"]] = r
    same = {rows: (len({json.dumps(r.get("sha256")) for r in runs.values()}) == 1) for rows, runs in by_size.items()}
    print(json.dumps({"cpus": os.cpu_count(), "shard_rows": args.shard_rows, "runs": results,
                      "identical_outputs_across_engines": same}, indent=2))


if __name__ == "__main__":
    main()

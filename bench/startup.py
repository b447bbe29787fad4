"""How long `sftflow run` takes to start its first stage on a warm $SFTFLOW_HOME, phase by phase.

Runs ``python -m flows.cli run <pipeline> --verbose`` as a user does, with ``SFTFLOW_STARTUP_TRACE``
set (the CLI writes the end time of each start-up phase there), reads its output as it comes and
stops it with Ctrl-C (SIGINT, the run ends cleanly) once the flow logged its set-up line, which it
logs just before the first stage starts. The home is warmed first with one complete run when it has
no Prefect database yet. The peer, in the same run: a bare ``python -c "import prefect, mlflow"``.

    .venv/bin/python bench/startup.py [--pipeline smoke] [--home DIR] [--repeat 3]

Prints one JSON object: ``time_to_first_stage_s`` (median), ``phases_s`` (median per phase),
every measured run, the peer's import time, and the machine's load average (a busy machine is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The flow logs this just before its first stage starts (flows/pipeline.py).
FIRST_STAGE_LINE = "MLflow parent run"
FLOW_BEGIN_LINE = "Beginning flow run"
# CLI trace marks, in order (flows/cli.py _mark), and the phase each one ends.
PHASES = [("cli_imported", "python + CLI import"), ("config_resolved", "config"),
          ("preflight_done", "preflight"), ("checks_done", "home/input/store checks"),
          ("server_spawned", "environment + server spawn"), ("console_installed", "prefect import + console"),
          ("pipeline_imported", "flow + stages import"), ("server_ready", "wait for Prefect server")]


def _env(home: Path, trace: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"SFTFLOW_HOME": str(home), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})
    if trace is not None:
        env["SFTFLOW_STARTUP_TRACE"] = str(trace)
    return env


def warm(home: Path, pipeline: str) -> float:
    """One complete run (stores created, models provisioned, caches filled); its seconds."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", pipeline], cwd=REPO, env=_env(home, None),
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"warm-up run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.monotonic() - t0


def measure(home: Path, pipeline: str) -> dict[str, object]:
    """One `sftflow run` up to its first stage: seconds from launch to each phase's end."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace"
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", pipeline, "--verbose"], cwd=REPO,
                                env=_env(home, trace), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        seen: dict[str, float] = {}
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.time() - t0
            tail = (tail + [line.rstrip()])[-40:]
            if FLOW_BEGIN_LINE in line and "flow_begun" not in seen:
                seen["flow_begun"] = now
            if FIRST_STAGE_LINE in line:
                seen["first_stage_start"] = now
                break
        if "first_stage_start" in seen:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the run ends itself (no dead run to reap next time)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if "first_stage_start" not in seen:
            raise SystemExit(f"no first stage (exit {proc.returncode}):\n" + "\n".join(tail))
        marks = {}
        if trace.exists():
            for row in trace.read_text().splitlines():
                name, _, when = row.partition(" ")
                marks[name] = float(when) - t0
    ends = [(label, marks[key]) for key, label in PHASES if key in marks]
    ends += [("flow start (task runner, parent run lookup)", seen.get("flow_begun", seen["first_stage_start"])),
             ("flow set-up (MLflow parent run, recovery)", seen["first_stage_start"])]
    phases, prev = {}, 0.0
    for label, end in ends:
        phases[label] = round(max(end - prev, 0.0), 2)
        prev = max(prev, end)
    return {"time_to_first_stage_s": round(seen["first_stage_start"], 2), "phases_s": phases}


def peer_import() -> float:
    """Seconds of a bare ``python -c "import prefect, mlflow"``."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import prefect, mlflow"], check=True, capture_output=True,
                   env={**os.environ, "DO_NOT_TRACK": "1"})
    return time.monotonic() - t0


def main() -> None:
    """Measure and print the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="smoke")
    ap.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "sftflow-bench-startup")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    home = args.home.resolve()
    warm_s = None
    if not (home / "prefect" / "prefect.db").exists():
        warm_s = round(warm(home, args.pipeline), 1)
    runs = [measure(home, args.pipeline) for _ in range(args.repeat)]
    peers = [peer_import() for _ in range(args.repeat)]
    labels = list(runs[0]["phases_s"])  # type: ignore[arg-type]
    out = {
        "pipeline": args.pipeline, "home": str(home), "warm_up_run_s": warm_s,
        "time_to_first_stage_s": statistics.median(r["time_to_first_stage_s"] for r in runs),  # type: ignore[misc]
        "phases_s": {k: statistics.median(r["phases_s"].get(k, 0.0) for r in runs) for k in labels},  # type: ignore[union-attr]
        "runs": runs,
        "peer": {"python -c 'import prefect, mlflow'_s": round(statistics.median(peers), 2)},
        "load_average_1m": round(os.getloadavg()[0], 1), "cpus": os.cpu_count(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

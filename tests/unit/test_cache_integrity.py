"""Damaged cached outputs are recomputed, never served: completion markers record output digests
(``sftflow.markers``), a cache hit checks them (``sftflow.ops.cachekeys.verify_cached_result``),
and the training folder checks them before reusing a finished training."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from sftflow import markers
from sftflow.data.refs import DatasetRef, ModelRef, write_parquet
from sftflow.digests import file_sha256
from sftflow.layout import STAGE_DONE_MARKER

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class _Result:
    kept: DatasetRef
    removed: DatasetRef
    model: ModelRef | None = None
    base: ModelRef | None = None


def _frame(n: int, tag: str = "a") -> pd.DataFrame:
    return pd.DataFrame({"id": [f"{tag}{i}" for i in range(n)], "text": [f"row {i} {tag}" for i in range(n)]})


def _stage(tmp_path: Path) -> tuple[Path, _Result]:
    out = tmp_path / "runs" / "p" / "r1" / "dedup"
    kept = write_parquet(_frame(6), out / "kept.parquet", name="kept")
    removed = write_parquet(_frame(2, "b"), out / "removed.parquet", name="removed")
    model_dir = tmp_path / "runs" / "p" / "_train" / "k1" / "merged"
    model_dir.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"\x01" * 4096)
    (model_dir / "config.json").write_text("{}")
    base_dir = tmp_path / "models" / "base"  # an input: never part of the outputs
    base_dir.mkdir(parents=True)
    (base_dir / "config.json").write_text("{}")
    res = _Result(kept=kept, removed=removed, model=ModelRef(path=str(model_dir), sha256="x", kind="merged"),
                  base=ModelRef(path=str(base_dir), sha256="y", kind="base"))
    markers.write_marker(out, outputs=res, stage="dedup")
    markers.write_marker(model_dir.parent, outputs=res.model, stage="train")
    return out, res


def test_marker_records_output_digests_and_rows(tmp_path: Path) -> None:
    out, res = _stage(tmp_path)
    doc = json.loads((out / STAGE_DONE_MARKER).read_text())
    files = doc["files"]
    assert files[res.kept.path] == {"sha256": res.kept.sha256, "size": Path(res.kept.path).stat().st_size, "rows": 6}
    assert files[res.removed.path]["rows"] == 2
    weights = str(Path(res.model.path) / "model.safetensors")
    assert files[weights]["sha256"] == file_sha256(weights)
    assert not any(k.startswith(res.base.path) for k in files)  # a base model is an input
    assert not list(out.glob(".*.tmp"))  # written through a temporary file, renamed
    assert markers.check_outputs(res) == []


@pytest.mark.parametrize("damage, expect", [
    ("truncate", r"kept.parquet changed on disk \(size \d+ != \d+ bytes\)"),
    ("delete", "kept.parquet is missing"),
    ("replace", r"kept.parquet changed on disk \((sha256 [0-9a-f]{12}… != [0-9a-f]{12}…|size \d+ != \d+ bytes)\)"),
    ("marker_deleted", "completion marker missing for kept.parquet"),
    ("marker_garbled", "completion marker .*_SUCCESS is unreadable"),
    ("weights_truncated", r"merged/model.safetensors changed on disk"),
    ("weights_same_size", r"merged/model.safetensors changed on disk \(sha256"),
])
def test_damage_is_named(tmp_path: Path, damage: str, expect: str) -> None:
    out, res = _stage(tmp_path)
    kept = Path(res.kept.path)
    weights = Path(res.model.path) / "model.safetensors"
    if damage == "truncate":
        kept.write_bytes(kept.read_bytes()[:100])
    elif damage == "delete":
        kept.unlink()
    elif damage == "replace":  # another valid Parquet file of the same rows count, other content
        _frame(6, "z").to_parquet(kept, index=False)
    elif damage == "marker_deleted":
        (out / STAGE_DONE_MARKER).unlink()
    elif damage == "marker_garbled":
        (out / STAGE_DONE_MARKER).write_text("ok\n")  # what markers used to hold
    elif damage == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[:10])
    elif damage == "weights_same_size":
        weights.write_bytes(b"\x02" * 4096)
    problems = markers.check_outputs(res)
    assert problems and re.search(expect, problems[0]), problems
    assert markers.describe(problems).startswith(problems[0])


def test_result_not_the_recorded_file(tmp_path: Path) -> None:
    # The stage folder was rewritten by another computation: the marker and the file agree with
    # each other but not with the cached result's digest.
    out, res = _stage(tmp_path)
    write_parquet(_frame(7, "q"), res.kept.path, name="kept")
    markers.write_marker(out, outputs=_Result(kept=DatasetRef(path=res.kept.path, sha256=file_sha256(res.kept.path),
                                                              num_rows=7, name="kept"), removed=res.removed),
                         stage="dedup")
    problems = markers.check_outputs(res)
    assert problems and "is not the file the result describes" in problems[0]


def test_marker_refuses_a_missing_output(tmp_path: Path) -> None:
    ref = DatasetRef(path=str(tmp_path / "gone.parquet"), sha256="0" * 64, num_rows=1)
    with pytest.raises(FileNotFoundError):
        markers.write_marker(tmp_path, outputs=ref)
    assert not (tmp_path / STAGE_DONE_MARKER).exists()


def test_report_says_one_line_per_damage(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    log = logging.getLogger("sftflow.test_cache_integrity")
    with caplog.at_level(logging.INFO, logger=log.name):
        markers.report(log, "dedup: cached output x; recomputing", problems=["x unique-1"])
        markers.report(log, "training output: x; training again", problems=["x unique-1"])
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.INFO]


# ----------------------------------------------------------------------------- a real Prefect cache
_FLOW_SCRIPT = '''
import json, sys
from pathlib import Path

from sftflow.ops.orchestration import configure_environment

configure_environment()
import pandas as pd
from prefect import flow, task

from sftflow.data.refs import DatasetRef, write_parquet
from sftflow.markers import write_marker
from sftflow.ops.orchestration import stage_cache_policy

LOG = Path(sys.argv[1])


@task(name="dedup", cache_policy=stage_cache_policy(), persist_result=True)
def dedup(n: int, *, ctx: str) -> DatasetRef:
    out = Path(sys.argv[3]) / ctx / "dedup"
    ref = write_parquet(pd.DataFrame({"id": list(range(n))}), out / "kept.parquet", name="kept")
    write_marker(out, outputs=ref, stage="dedup")
    with open(LOG, "a") as f:
        f.write(json.dumps({"ctx": ctx, "sha256": ref.sha256}) + "\\n")
    return ref


@flow(persist_result=True)
def f(n: int, ctx: str) -> DatasetRef:
    return dedup(n, ctx=ctx)


ref = f(5, sys.argv[2])
print("RESULT " + json.dumps({"ctx": sys.argv[2], "path": ref.path, "sha256": ref.sha256}), flush=True)
'''


def test_prefect_recomputes_a_damaged_cached_output(tmp_path: Path) -> None:
    """A real Prefect flow (temporary API + SQLite under tmp): a cached stage whose output was
    truncated, replaced by another valid Parquet file, or whose marker was deleted is run again
    (one warning line each) and its new output has the first run's bytes; intact, it is cached."""
    script = tmp_path / "flow_script.py"
    script.write_text(textwrap.dedent(_FLOW_SCRIPT))
    runs = tmp_path / "home" / "runs" / "p"
    log = tmp_path / "executions.jsonl"
    first = runs / "r1" / "dedup" / "kept.parquet"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f'''
        import runpy, sys
        from pathlib import Path
        import pandas as pd
        first = Path({str(first)!r})
        steps = ["r1", "r2", "truncate", "r3", "replace", "r4", "marker", "r5", "r6"]
        for step in steps:
            if step == "truncate":
                first.write_bytes(first.read_bytes()[:50])
                continue
            if step == "replace":  # r3 wrote its own copy: damage the one the cache now points to
                p = Path({str(runs)!r}) / "r3" / "dedup" / "kept.parquet"
                pd.DataFrame({{"id": [9, 9, 9, 9, 9]}}).to_parquet(p, index=False)
                continue
            if step == "marker":
                (Path({str(runs)!r}) / "r4" / "dedup" / "_SUCCESS").unlink()
                continue
            sys.argv = ["x", {str(log)!r}, step, {str(runs)!r}]
            runpy.run_path({str(script)!r}, run_name="flow_script")
    '''))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"SFTFLOW_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO), "PREFECT_LOGGING_LEVEL": "WARNING"})
    proc = subprocess.run([sys.executable, str(driver)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    executed = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["ctx"] for e in executed] == ["r1", "r3", "r4", "r5"], out[-4000:]
    assert len({e["sha256"] for e in executed}) == 1  # recomputed: the same bytes as the first run
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    served = {r["ctx"]: Path(r["path"]).parent.parent.name for r in results}
    assert served == {"r1": "r1", "r2": "r1", "r3": "r3", "r4": "r4", "r5": "r5", "r6": "r5"}
    lines = [ln for ln in out.splitlines() if "cached output" in ln and "recomputing" in ln]
    assert len(lines) == 3, "\n".join(lines)
    assert "kept.parquet changed on disk (size" in lines[0]
    assert "kept.parquet changed on disk (" in lines[1]  # another valid Parquet file (size or sha256)
    assert "completion marker missing for kept.parquet" in lines[2]
    assert all(re.search(r"Task run 'dedup-[0-9a-f]{3}' - cached output", ln) for ln in lines), lines

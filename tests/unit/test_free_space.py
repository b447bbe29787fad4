"""Free-space preflight (issue 22, class 2): a run refuses to start on a filesystem that cannot
hold it, in one line naming the mount point, free vs needed, and what to do.

With root, a real 20 MiB tmpfs is mounted as the home's filesystem (and a real smoke run is
refused there before anything is written); otherwise those tests skip and the statvfs of a
real path is checked against a threshold given by ``$SFTFLOW_DISK_NEEDED``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from sftflow.config import resolve_pipeline
from sftflow.config_sections import ConfigError
from sftflow.errors import EXIT_HOME
from sftflow.ops.diskspace import (
    ENV_NEEDED,
    DiskSpaceError,
    estimate_need,
    format_size,
    free_bytes,
    mount_point,
    parse_size,
)
from sftflow.ops.preflight import preflight

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "data" / "smoke"


def _pipeline(tmp_path: Path, *, base: str = "tiny-gemma") -> Path:
    p = tmp_path / "pipelines.yaml"
    p.write_text(textwrap.dedent(f"""\
        pipelines:
          p:
            base_model: {base}
            sources: [{{name: dolly, path: {SMOKE / 'dolly_smoke.jsonl'}}}]
            split: {{heldout_size: 8}}
            evaluation: {{max_examples: 8}}
        """))
    return p


def test_sizes_parse_and_print() -> None:
    assert parse_size("0") == 0 and parse_size("123") == 123
    assert parse_size("500M") == 500 << 20 and parse_size("2G") == 2 << 30 and parse_size("1.5GiB") == 3 << 29
    assert parse_size(" 64 kb ") == 64 << 10
    with pytest.raises(ValueError, match="expected a size like 500M"):
        parse_size("lots")
    assert format_size(512) == "512 B" and format_size(3 << 29) == "1.5 GiB"


def test_threshold_against_the_real_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("SFTFLOW_HOME", str(home))
    cfg = resolve_pipeline("p", path=_pipeline(tmp_path))
    free = free_bytes(home)  # statvfs of the nearest existing parent: the home does not exist yet
    st = os.statvfs(tmp_path)
    assert abs(free - st.f_bavail * st.f_frsize) < (64 << 20)  # others write to this disk meanwhile
    monkeypatch.setenv(ENV_NEEDED, str(free + (1 << 40)))
    with pytest.raises(DiskSpaceError) as e:
        preflight(cfg, pipeline="p")
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == EXIT_HOME
    assert msg.startswith(f"{mount_point(home)} (the filesystem of $SFTFLOW_HOME={home}) has "), msg
    assert f"needs about {format_size(free + (1 << 40))} (${ENV_NEEDED}=" in msg
    assert "point SFTFLOW_HOME at a larger filesystem, or set SFTFLOW_DISK_NEEDED=<size>" in msg
    assert not home.exists()  # refused before anything was created
    monkeypatch.setenv(ENV_NEEDED, "1M")
    assert preflight(cfg, pipeline="p") == []
    monkeypatch.setenv(ENV_NEEDED, "0")  # off
    assert preflight(cfg, pipeline="p") == []
    monkeypatch.setenv(ENV_NEEDED, "plenty")
    with pytest.raises(ConfigError, match=r"\$SFTFLOW_DISK_NEEDED: expected a size like 500M or 2G, got 'plenty'"):
        preflight(cfg, pipeline="p")
    # validate-config runs nothing: no free-space check there.
    monkeypatch.setenv(ENV_NEEDED, str(free + (1 << 40)))
    assert preflight(cfg, pipeline="p", disk=False) == []


def test_the_estimate_follows_the_model_and_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sftflow.inference.tiny import build_tiny_model

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = _pipeline(tmp_path)
    lora = estimate_need(resolve_pipeline("p", path=p))
    assert "provisioning" in lora.detail  # the tiny model is not built yet
    ref = build_tiny_model("tiny-gemma")
    params = sum(f.stat().st_size for f in Path(ref.path).glob("*.safetensors")) // 4  # float32 weights
    on_disk = estimate_need(resolve_pipeline("p", path=p))
    assert "provisioning" not in on_disk.detail and on_disk.bytes < lora.bytes
    full = estimate_need(resolve_pipeline("p", path=p, overrides=["training.method=full"]))
    # Full fine-tuning: float32 weights + two Adam states (12 bytes a parameter) per kept checkpoint
    # instead of LoRA's adapter checkpoint (r=16: ~0.5 MiB here).
    assert full.bytes - on_disk.bytes >= 8 * params
    big_r = estimate_need(resolve_pipeline("p", path=p, overrides=["training.lora.r=32"]))
    assert big_r.bytes > on_disk.bytes  # adapter + its checkpoints grow with the rank
    gemma = estimate_need(resolve_pipeline("p", path=_pipeline(tmp_path, base="gemma-3-270m")))
    assert gemma.bytes > 1 << 30, gemma  # a 270M-parameter model: gigabytes, not megabytes


@pytest.fixture()
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 20 MiB tmpfs (root only)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_small_filesystem_refuses_the_run_in_one_line(small_fs: Path, tmp_path: Path) -> None:
    home = small_fs / "home"
    env = {**os.environ, "SFTFLOW_HOME": str(home), "PYTHONPATH": str(REPO)}
    for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", ENV_NEEDED):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "p", "-f", str(_pipeline(tmp_path))], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == EXIT_HOME, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"sftflow: not enough disk space: {small_fs} (the filesystem of "
                               f"$SFTFLOW_HOME={home}) has 20.0 MiB free, this run needs about "), lines[0]
    assert "Traceback" not in r.stderr and not home.exists() and list(small_fs.iterdir()) == []
    # The knob overrides the estimate (here only up to the preflight: the run itself is not started).
    from sftflow.ops.diskspace import check_free_space

    os.environ[ENV_NEEDED] = "10M"
    try:
        check_free_space(resolve_pipeline("p", path=_pipeline(tmp_path)), home=home)
    finally:
        del os.environ[ENV_NEEDED]

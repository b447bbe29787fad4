"""The peak resident memory of one stage: a high-water mark reset when the stage starts.

Linux keeps a process's RSS high-water mark (``VmHWM`` in ``/proc/self/status``); writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS. ``stage_run`` resets it when a stage opens
and logs ``peak_rss_mb`` when it closes, so each stage run reports its own peak, not the peak of
every stage before it in the same process. Elsewhere (no procfs, or the reset refused) the value
is the process's lifetime peak (``ru_maxrss``), which can only over-state a stage's own.
"""

from __future__ import annotations

import sys
from pathlib import Path

METRIC = "peak_rss_mb"


def reset_peak_rss(*, trim: bool = True) -> bool:
    """Reset this process's RSS high-water mark to its current RSS; False where that is not possible.

    With ``trim`` the garbage of what ran before (models in reference cycles, heap pages glibc keeps
    mapped) is first given back to the OS, so the stage starts, and its peak counts, from what is
    really alive: a stage that closes frees its models only once its task function has returned,
    i.e. after its own ``release_memory``.
    """
    if trim:
        _trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """This process's RSS high-water mark in MiB (since the last ``reset_peak_rss``); None if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20  # kB on Linux, bytes on macOS
    except (ImportError, OSError):
        return None


def _trim() -> None:
    """Collect reference cycles and return freed heap pages to the OS (glibc ``malloc_trim``)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

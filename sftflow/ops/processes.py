"""Process hygiene on Linux: who is alive, whole process trees, children that die with us.

* ``process_identity(pid)`` / ``is_alive(pid, start_ticks=)``: a pid plus its start time (field 22
  of ``/proc/<pid>/stat``) names one process for good; a bare pid may have been reused.
* ``descendants(pid)``: every process below ``pid`` (by parent pid, across sessions and process
  groups: MLflow's job runner, for one, starts its consumers outside the server's group).
* ``terminate_tree(pids)``: SIGTERM (or SIGINT) -> grace period -> SIGKILL for every process of
  the given trees, bounded in time, never touching a process that merely reuses a recorded pid.
* ``die_with_parent(argv)``: an argv that runs ``argv`` with ``PR_SET_PDEATHSIG``, so the child
  is killed when this process dies, even by ``kill -9``; ``call_in_lifetime_thread`` runs the
  spawn in a thread that lives as long as the process (the kernel sends the parent-death signal
  when the *thread* that forked the child ends, not the process).
* ``run_foreground(argv)``: run a server command until it exits or we get SIGTERM/SIGINT/SIGHUP,
  which end its whole tree before we return (``sftflow serve-model``).

Nothing here runs at import time. Where ``/proc`` does not exist the helpers degrade to
``os.kill(pid, 0)`` and no descendants.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ProcessId:
    """One process for good: pid + start time in clock ticks since boot (``None`` when unknown)."""

    pid: int
    start_ticks: int | None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (index 0 = state, 1 = ppid, 19 = starttime)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    return raw[raw.rfind(")") + 2:].split()


def start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` (clock ticks since boot), or None when it does not exist / no /proc."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def boot_id() -> str:
    """This boot of this kernel (pids and start times restart at every boot)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_identity(pid: int | None = None) -> ProcessId:
    """The identity of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return ProcessId(pid=pid, start_ticks=start_ticks(pid))


def is_alive(pid: int, *, start_ticks_: int | None = None) -> bool:
    """True when ``pid`` runs (a zombie counts as dead) and, if given, started at ``start_ticks_``."""
    if pid <= 0:
        return False
    fields = _stat_fields(pid)
    if fields is None:
        if Path("/proc/self/stat").exists():
            return False  # /proc works and has no such pid
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if fields[0] in ("Z", "X"):
        return False
    return start_ticks_ is None or (len(fields) > 19 and int(fields[19]) == start_ticks_)


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            fields = _stat_fields(int(entry.name))
            if fields and len(fields) > 1:
                kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren...), parents before children."""
    kids = _children_map()
    out: list[int] = []
    frontier = [pid]
    while frontier:
        nxt = []
        for p in frontier:
            for c in kids.get(p, []):
                if c not in out and c != pid:
                    out.append(c)
                    nxt.append(c)
        frontier = nxt
    return out


def tree(pids: Iterable[int]) -> list[ProcessId]:
    """The processes ``pids`` and all their descendants, as identities (so a reused pid is not hit)."""
    seen: dict[int, ProcessId] = {}
    for root in pids:
        for p in (root, *descendants(root)):
            if p not in seen and is_alive(p):
                seen[p] = process_identity(p)
    return list(seen.values())


def _signal(proc: ProcessId, sig: int) -> None:
    if is_alive(proc.pid, start_ticks_=proc.start_ticks):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, sig)


def _reap_children(procs: Iterable[ProcessId]) -> None:
    # Zombies of our own children stay in /proc until waited for.
    for p in procs:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(p.pid, os.WNOHANG)


def _wait_gone(procs: list[ProcessId], deadline: float, hurry: threading.Event | None) -> list[ProcessId]:
    while True:
        _reap_children(procs)
        left = [p for p in procs if is_alive(p.pid, start_ticks_=p.start_ticks)]
        if not left or time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
            return left
        time.sleep(0.1)


def terminate_tree(roots: Iterable[int], *, first_signal: int = signal.SIGTERM, grace: float = 10.0,
                   kill_wait: float = 5.0, hurry: threading.Event | None = None,
                   known: Iterable[ProcessId] = ()) -> list[ProcessId]:
    """End ``roots`` and every process below them: ``first_signal``, then SIGKILL after ``grace``.

    The tree is collected before the first signal (and again before SIGKILL, for processes
    started meanwhile, e.g. a watcher restarting a consumer). Each root's process group gets the
    signal too, so processes that already left the tree (re-parented to init) but kept the group
    are not missed.

    Args:
        roots: pids whose trees end.
        first_signal: the polite signal (SIGTERM; SIGINT for programs that only handle Ctrl-C).
        grace: seconds to wait for a clean exit before SIGKILL.
        kill_wait: seconds to wait after SIGKILL.
        hurry: when set (e.g. a second Ctrl-C), the grace period ends at once.
        known: identities collected earlier (e.g. before the roots were told to stop), added to the tree.

    Returns:
        Processes still alive at the end (empty unless one is unkillable, e.g. in D state).
    """
    roots = list(roots)
    procs = {p.pid: p for p in (*known, *tree(roots))}
    groups = set()
    for r in roots:
        with contextlib.suppress(OSError):
            if os.getpgid(r) == r:  # only groups the roots lead (never our own)
                groups.add(r)
    groups.discard(os.getpgrp())
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, first_signal)
    for p in procs.values():
        _signal(p, first_signal)
    left = _wait_gone(list(procs.values()), time.monotonic() + grace, hurry)
    if not left:
        return []
    for p in tree([p.pid for p in left]):
        procs.setdefault(p.pid, p)
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, signal.SIGKILL)
    for p in procs.values():
        _signal(p, signal.SIGKILL)
    return _wait_gone(list(procs.values()), time.monotonic() + kill_wait, None)


# --------------------------------------------------------------------------- die with the parent
# Runs in the child before the real program: ask the kernel for a signal when the parent dies,
# give up if the parent died already (we would be re-parented and never get it), then exec.
_PDEATH_CODE = (
    "import ctypes,os,sys\n"
    "libc=ctypes.CDLL(None,use_errno=True)\n"
    "if libc.prctl(1,int(sys.argv[2]),0,0,0)!=0:\n"
    "    raise OSError(ctypes.get_errno(),'prctl(PR_SET_PDEATHSIG) failed')\n"
    "if os.getppid()!=int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[3],sys.argv[3:])\n"
)


def pdeathsig_supported() -> bool:
    """True on Linux (``prctl(PR_SET_PDEATHSIG)``)."""
    return sys.platform.startswith("linux")


def die_with_parent(argv: list[str], *, sig: int = signal.SIGKILL) -> list[str]:
    """``argv`` wrapped so that the started process gets ``sig`` when this process dies.

    The wrapper is a few lines of Python that set ``PR_SET_PDEATHSIG`` and ``exec`` ``argv``, so
    the pid the caller sees is the real program's. The setting survives ``exec``. Spawn it from
    ``call_in_lifetime_thread``: the signal fires when the forking *thread* ends. Off Linux,
    ``argv`` is returned unchanged.
    """
    if not pdeathsig_supported():
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _PDEATH_CODE, str(os.getpid()), str(int(sig)), *argv]


class _LifetimeThread:
    """One daemon thread per process that never ends while the process lives; runs calls in order."""

    _lock = threading.Lock()
    _instance: "_LifetimeThread | None" = None
    _pid: int = 0

    def __init__(self) -> None:
        self._q: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        threading.Thread(target=self._loop, name="sftflow-lifetime-spawner", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, fut = self._q.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    @classmethod
    def get(cls) -> "_LifetimeThread":
        with cls._lock:
            if cls._instance is None or cls._pid != os.getpid():  # a forked child needs its own thread
                cls._instance, cls._pid = cls(), os.getpid()
            return cls._instance

    def call(self, fn: Callable[[], T]) -> T:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((fn, fut))
        return fut.result()


def call_in_lifetime_thread(fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a thread that lives as long as this process and return its result.

    Use it to spawn children with a parent-death signal: the kernel signals them when the thread
    that forked them ends, which must be the process's end, not a worker thread's.
    """
    return _LifetimeThread.get().call(fn)


# --------------------------------------------------------------------------- a child in the foreground
def run_foreground(argv: list[str], *, env: dict[str, str] | None = None, grace: float = 10.0,
                   on_stop: Callable[[int], None] | None = None) -> int:
    """Run ``argv`` until it exits or this process is told to stop; nothing outlives this process.

    The child runs in its own session (so a terminal's Ctrl-C reaches only us, and we decide) with
    a parent-death SIGTERM (so even ``kill -9`` of this process stops it). SIGTERM, SIGINT and
    SIGHUP to this process end the child's whole tree (``terminate_tree``: the signal, SIGKILL after
    ``grace`` seconds; a second signal cuts the grace short) before this returns.

    Args:
        argv: the command.
        env: its environment (default: ours).
        grace: seconds the tree gets to stop before SIGKILL.
        on_stop: called with the signal number when a stop signal arrives (e.g. to print one line).

    Returns:
        The child's exit code, or ``128 + signal`` when a signal stopped us.
    """
    import subprocess

    def popen() -> subprocess.Popen:
        return subprocess.Popen(die_with_parent(argv, sig=signal.SIGTERM), env=env, start_new_session=True)

    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    got: list[int] = []
    hurry = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if got:
            hurry.set()  # a second signal: no more grace
        got.append(signum)

    previous = {s: signal.signal(s, handler) for s in stop_signals}
    try:
        proc = call_in_lifetime_thread(popen)
        while proc.poll() is None and not got:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
        if not got:
            return int(proc.returncode)
        if on_stop is not None:
            on_stop(got[0])
        # SIGINT stays SIGINT (programs treat Ctrl-C as "stop now"); SIGHUP/SIGTERM become SIGTERM.
        first = signal.SIGINT if got[0] == signal.SIGINT else signal.SIGTERM
        terminate_tree([proc.pid], first_signal=first, grace=grace, hurry=hurry)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
        return 128 + int(got[0])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

"""Progress reporting for stages: :class:`Progress` logs ``progress <what> done/total | rate | eta``
lines through the run logger, each carrying a typed ``CountEvent`` (``sftflow.progress``) that the
quiet console (``sftflow.ops.console``) turns into its live progress line; :func:`progress_callback`
adapts the ``on_progress(done, total)`` callbacks of the generation/scoring loops to it.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from sftflow.progress import CountEvent

def progress_callback(what: str) -> Callable[[int, int], None]:
    """An ``on_progress(done, total)`` for generation/scoring loops that feeds a ``Progress`` line.

    The loops in ``sftflow.inference`` report cumulative counts; this turns them into increments.
    """
    state: dict[str, Any] = {"progress": None, "done": 0}
    started = time.monotonic()  # the work starts now, not at its first report (else the first ETA is 0)

    def on_progress(done: int, total: int) -> None:
        if state["progress"] is None:
            state["progress"] = Progress(what, total=total, started=started)
        state["progress"].advance(done - state["done"])
        state["done"] = done

    return on_progress


class Progress:
    """Report progress with ETA through the run logger, so the console can show one line for it.

    Use in a loop of known length (generation batches, evaluation examples)::

        progress = Progress("generate", total=len(prompts))
        for batch in batches:
            ...
            progress.advance(len(batch))

    Lines (``progress generate 64/256 | 12.1/s | eta 0m16s``) go to Prefect's run logger (the UI
    shows them too) at most every ``every_s`` seconds, plus the last one.
    """

    def __init__(self, what: str, *, total: int, every_s: float = 5.0, logger: Any = None,
                 started: float | None = None) -> None:
        self.what = what
        self.total = max(0, int(total))
        self.done = 0
        self.every_s = every_s
        self._t0 = time.monotonic() if started is None else started  # ``time.monotonic()`` when the work began
        self._last = -math.inf
        self._logger = logger

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done; log a line when due."""
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        now = time.monotonic()
        if now - self._last < self.every_s and self.done < self.total:
            return
        self._last = now
        rate = self.done / max(1e-9, now - self._t0)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        logger = self._logger
        if logger is None:
            from sftflow.progress import run_logger

            logger = run_logger("sftflow.progress")
        # The line is for people and the UI; the console reads the event it carries.
        logger.info("progress %s %d/%d | %.1f/s | eta %dm%02ds", self.what, self.done, self.total, rate,
                    int(eta // 60), int(eta % 60),
                    extra=CountEvent.extra(what=self.what, done=self.done, total=self.total, rate=rate, eta_s=eta))

"""Typed progress events from the work (training steps, generation/evaluation counts) to the console.

The work logs a readable line as before and attaches the event to the log record
(``extra={EVENT_ATTR: event}``, see ``StepEvent.extra``); ``sftflow.ops.console.RunConsole`` reads
``event_of(record)`` and never parses the text, so a change of wording cannot silence live
progress. Prefect's run logger keeps ``extra`` (its adapter merges it), so the event travels
inside a task run and outside one alike.

``run_logger`` is here too: the logger the library's long-running code (the training recipe,
``Progress``) writes to, without importing the orchestration layer. No Prefect import at module level.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Union

__all__ = ["EVENT_ATTR", "CountEvent", "ProgressEvent", "StepEvent", "event_of", "run_logger"]

# The LogRecord attribute that carries an event.
EVENT_ATTR = "sftflow_event"


@dataclass(frozen=True)
class StepEvent:
    """One optimizer step of the training recipe (``sftflow.training.loop``).

    Attributes:
        step: steps done (1-based, counting resumed ones).
        total: steps the run will take.
        loss: the step's training loss.
        seconds_per_step: mean wall time per step so far (the ETA is derived from it).
        eval_loss: the held-out loss when it was evaluated at this step, else None.
        what: what is being trained (``train``).
    """

    step: int
    total: int
    loss: float
    seconds_per_step: float
    eval_loss: float | None = None
    what: str = "train"

    @property
    def eta_s(self) -> float:
        """Seconds left at the current pace."""
        return max(0.0, self.seconds_per_step * (self.total - self.step))

    @classmethod
    def extra(cls, **fields: Any) -> dict[str, "StepEvent"]:
        """``extra=`` for a logging call carrying ``StepEvent(**fields)``."""
        return {EVENT_ATTR: cls(**fields)}


@dataclass(frozen=True)
class CountEvent:
    """Items of a known-length job done (generation batches, evaluation examples; ``Progress``).

    Attributes:
        what: the job's label (``generate``, ``evaluate.base heldout``; may hold spaces).
        done: items done.
        total: items in all.
        rate: items per second so far.
        eta_s: seconds left at that rate.
    """

    what: str
    done: int
    total: int
    rate: float
    eta_s: float

    @classmethod
    def extra(cls, **fields: Any) -> dict[str, "CountEvent"]:
        """``extra=`` for a logging call carrying ``CountEvent(**fields)``."""
        return {EVENT_ATTR: cls(**fields)}


ProgressEvent = Union[StepEvent, CountEvent]


def event_of(record: logging.LogRecord) -> ProgressEvent | None:
    """The progress event a log record carries, or None."""
    ev = getattr(record, EVENT_ATTR, None)
    return ev if isinstance(ev, (StepEvent, CountEvent)) else None


def run_logger(name: str) -> Any:
    """Prefect's run logger inside a flow/task (so messages show in the UI), else ``logging.getLogger(name)``."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # MissingContextError outside a run
        return logging.getLogger(name)

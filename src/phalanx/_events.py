"""Events a run emits as it goes, for the live display and for users' callbacks.

A handler is a plain callable taking one event; it runs on the event loop, so it must be quick
and must not block. An exception raised by a handler is a bug in the handler and stops the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ._results import InstanceResult, StageResult

__all__ = [
    "AttemptEnded",
    "AttemptStarted",
    "Event",
    "EventHandler",
    "InstanceEnded",
    "RunEnded",
    "RunStarted",
    "StageEnded",
    "StageStarted",
]


@dataclass(frozen=True)
class RunStarted:
    """``stages`` are the stages this run will run, in dependency order; ``totals`` their
    planned instance counts."""

    run_id: str
    pipeline: str
    stages: tuple[str, ...]
    totals: tuple[int, ...]


@dataclass(frozen=True)
class StageStarted:
    stage: str
    total: int
    concurrency: int


@dataclass(frozen=True)
class AttemptStarted:
    stage: str
    key: str
    attempt: int


@dataclass(frozen=True)
class AttemptEnded:
    """``cause`` is ``None`` when the attempt committed. ``retry_in`` is the backoff before the
    next attempt, or ``None`` when there will be none."""

    stage: str
    key: str
    attempt: int
    duration_s: float
    cause: str | None
    message: str
    retry_in: float | None


@dataclass(frozen=True)
class InstanceEnded:
    result: InstanceResult


@dataclass(frozen=True)
class StageEnded:
    result: StageResult


@dataclass(frozen=True)
class RunEnded:
    run_id: str
    ok: bool
    cancelled: bool


Event = (
    RunStarted
    | StageStarted
    | AttemptStarted
    | AttemptEnded
    | InstanceEnded
    | StageEnded
    | RunEnded
)
EventHandler = Callable[[Event], None]

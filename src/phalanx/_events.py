"""Events a run emits as it goes, for the live display and for users' callbacks.

A handler is a plain callable taking one event; it runs on the event loop, so it must be quick
and must not block. An exception raised by a handler is a bug in the handler and stops the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ._results import InstanceResult, StageResult
from ._usage import Usage

__all__ = [
    "AttemptEnded",
    "AttemptStarted",
    "BudgetReached",
    "Event",
    "EventHandler",
    "InstanceEnded",
    "LanePaused",
    "LimitChanged",
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
    """``concurrency`` is the stage's limit (an adaptive stage's ceiling); ``runner`` the type
    of its runner (``python``, ``command``, ``anthropic``...) and ``model`` the model it asks
    for ("" when it names none)."""

    stage: str
    total: int
    concurrency: int
    runner: str = ""
    model: str = ""


@dataclass(frozen=True)
class AttemptStarted:
    stage: str
    key: str
    attempt: int


@dataclass(frozen=True)
class AttemptEnded:
    """``cause`` is ``None`` when the attempt committed. ``retry_in`` is the backoff before the
    next attempt, or ``None`` when there will be none. ``usage`` is what the attempt spent on
    model calls, if anything."""

    stage: str
    key: str
    attempt: int
    duration_s: float
    cause: str | None
    message: str
    retry_in: float | None
    usage: Usage | None = None


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


@dataclass(frozen=True)
class LimitChanged:
    """A concurrency limit moved: a lane's adaptive limit (``lane`` set; ``reason``
    ``increase``, ``decrease`` or ``ceiling``) or a stage's limit changed by ``phalanx tune``
    (``stage`` set, ``reason`` ``tune``)."""

    stage: str | None
    lane: str | None
    old: int
    new: int
    reason: str


@dataclass(frozen=True)
class LanePaused:
    """A provider refused a call (429/529/503): every call of ``lane`` waits ``seconds``."""

    lane: str
    seconds: float


@dataclass(frozen=True)
class BudgetReached:
    """A budget is spent: ``stage`` starts no new attempt (``reason`` says which budget)."""

    stage: str
    reason: str


Event = (
    RunStarted
    | StageStarted
    | AttemptStarted
    | AttemptEnded
    | InstanceEnded
    | StageEnded
    | RunEnded
    | LimitChanged
    | LanePaused
    | BudgetReached
)
EventHandler = Callable[[Event], None]

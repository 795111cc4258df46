"""The event stream: every event of a run as one JSON object a line (``--events FILE``).

Each line is a record with the schema's version (``v``), the time (``t``, epoch seconds), the
run it belongs to (``run``) and its ``type``; the rest depends on the type. The schema is
:func:`event_schema` (JSON Schema, draft 2020-12), documented in ``docs/events.md``. A new
field may appear within a version; a field that changes meaning or goes away bumps ``v``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

from ._events import (
    AttemptEnded,
    AttemptStarted,
    BudgetReached,
    Event,
    InstanceEnded,
    LanePaused,
    LimitChanged,
    RunEnded,
    RunStarted,
    StageEnded,
    StageStarted,
)

__all__ = ["EVENT_SCHEMA", "SCHEMA_VERSION", "EventLog", "event_record", "event_schema"]

SCHEMA_VERSION: Final = 1


def event_record(event: Event, *, run: str, t: float) -> dict[str, Any]:
    """One event as its JSON record (see :data:`EVENT_SCHEMA`)."""
    base: dict[str, Any] = {"v": SCHEMA_VERSION, "t": round(t, 6), "run": run}
    if isinstance(event, RunStarted):
        return base | {
            "type": "run_started",
            "pipeline": event.pipeline,
            "stages": list(event.stages),
            "totals": list(event.totals),
        }
    if isinstance(event, StageStarted):
        return base | {
            "type": "stage_started",
            "stage": event.stage,
            "total": event.total,
            "concurrency": event.concurrency,
            "runner": event.runner,
            "model": event.model,
        }
    if isinstance(event, AttemptStarted):
        return base | {
            "type": "attempt_started",
            "stage": event.stage,
            "key": event.key,
            "attempt": event.attempt,
        }
    if isinstance(event, AttemptEnded):
        return base | {
            "type": "attempt_ended",
            "stage": event.stage,
            "key": event.key,
            "attempt": event.attempt,
            "outcome": "committed" if event.cause is None else "failed",
            "duration_s": round(event.duration_s, 6),
            "cause": event.cause,
            "message": event.message,
            "retry_in": None if event.retry_in is None else round(event.retry_in, 6),
            "usage": event.usage.to_json() if event.usage else None,
        }
    if isinstance(event, InstanceEnded):
        result = event.result
        usage = result.usage
        return base | {
            "type": "instance_ended",
            "stage": result.stage,
            "key": result.key,
            "status": result.status,
            "cause": result.cause,
            "reason": result.reason,
            "message": result.message,
            "attempts": len(result.attempts),
            "duration_s": round(result.duration_s, 6),
            "usage": usage.to_json() if usage else None,
        }
    if isinstance(event, StageEnded):
        stage = event.result
        return base | {
            "type": "stage_ended",
            "stage": stage.name,
            "total": stage.total,
            "committed": stage.committed,
            "cached": stage.cached,
            "failed": stage.failed,
            "skipped": stage.skipped,
            "met_threshold": stage.met_threshold,
            "skipped_reason": stage.skipped_reason,
            "wall_s": round(stage.wall_s, 6),
        }
    if isinstance(event, RunEnded):
        return base | {"type": "run_ended", "ok": event.ok, "cancelled": event.cancelled}
    if isinstance(event, LimitChanged):
        return base | {
            "type": "limit_changed",
            "stage": event.stage,
            "lane": event.lane,
            "old": event.old,
            "new": event.new,
            "reason": event.reason,
        }
    if isinstance(event, LanePaused):
        return base | {"type": "lane_paused", "lane": event.lane, "seconds": event.seconds}
    if isinstance(event, BudgetReached):
        return base | {"type": "budget_reached", "stage": event.stage, "reason": event.reason}
    raise TypeError(f"not a phalanx event: {event!r}")  # a new event without a record: a bug


class EventLog:
    """An event handler that appends every event to ``path`` as a JSON line.

    Use it as ``on_event`` (or alongside another handler), as a context manager, or call
    :meth:`close` at the end. Lines are flushed when a stage or the run ends and at close,
    so a reader following the file (``tail -f``) sees each stage's end at once.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] | None = self.path.open("a", encoding="utf-8")
        self._run = ""

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._run = event.run_id
        handle = self._handle
        if handle is None:
            return
        record = event_record(event, run=self._run, t=time.time())
        handle.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        if isinstance(event, StageEnded | RunEnded | BudgetReached):
            handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def _record(kind: str, fields: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "v": {"const": SCHEMA_VERSION},
            "t": {"type": "number"},
            "run": {"type": "string"},
            "type": {"const": kind},
            **fields,
        },
        "required": ["v", "t", "run", "type", *required],
        "additionalProperties": False,
    }


_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_NUM = {"type": "number", "minimum": 0}
_OPT_STR = {"type": ["string", "null"]}
_USAGE = {"type": ["object", "null"], "additionalProperties": {"type": "number"}}
_WHERE = {"stage": _STR, "key": _STR, "attempt": {"type": "integer", "minimum": 1}}

EVENT_SCHEMA: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://phalanx.invalid/schemas/events-v1.json",
    "title": "phalanx event record, version 1",
    "oneOf": [
        _record(
            "run_started",
            {
                "pipeline": _STR,
                "stages": {"type": "array", "items": _STR},
                "totals": {"type": "array", "items": _INT},
            },
            ["pipeline", "stages", "totals"],
        ),
        _record(
            "stage_started",
            {"stage": _STR, "total": _INT, "concurrency": _INT, "runner": _STR, "model": _STR},
            ["stage", "total", "concurrency"],
        ),
        _record("attempt_started", {**_WHERE, "log_dir": _STR}, ["stage", "key", "attempt"]),
        _record(
            "attempt_ended",
            {
                **_WHERE,
                "outcome": {"enum": ["committed", "failed"]},
                "duration_s": _NUM,
                "cause": _OPT_STR,
                "message": _STR,
                "detail": _STR,
                "retry_in": {"type": ["number", "null"], "minimum": 0},
                "usage": _USAGE,
            },
            ["stage", "key", "attempt", "outcome", "duration_s", "cause", "retry_in"],
        ),
        _record(
            "instance_ended",
            {
                "stage": _STR,
                "key": _STR,
                "status": {"enum": ["committed", "cached", "failed", "skipped"]},
                "cause": _OPT_STR,
                "reason": _OPT_STR,
                "message": _STR,
                "attempts": _INT,
                "duration_s": _NUM,
                "usage": _USAGE,
            },
            ["stage", "key", "status", "attempts", "duration_s"],
        ),
        _record(
            "stage_ended",
            {
                "stage": _STR,
                "total": _INT,
                "committed": _INT,
                "cached": _INT,
                "failed": _INT,
                "skipped": _INT,
                "met_threshold": {"type": "boolean"},
                "skipped_reason": _OPT_STR,
                "wall_s": _NUM,
            },
            ["stage", "total", "committed", "cached", "failed", "skipped", "met_threshold"],
        ),
        _record(
            "run_ended",
            {"ok": {"type": "boolean"}, "cancelled": {"type": "boolean"}},
            ["ok", "cancelled"],
        ),
        _record(
            "limit_changed",
            {
                "stage": _OPT_STR,
                "lane": _OPT_STR,
                "old": _INT,
                "new": _INT,
                "reason": {"enum": ["increase", "decrease", "ceiling", "tune"]},
            },
            ["stage", "lane", "old", "new", "reason"],
        ),
        _record("lane_paused", {"lane": _STR, "seconds": _NUM}, ["lane", "seconds"]),
        _record("budget_reached", {"stage": _STR, "reason": _STR}, ["stage", "reason"]),
    ],
}
"""The JSON Schema every line of an event stream validates against."""


def event_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) every line of an event stream validates against: one
    branch per record type. A copy: change it freely."""
    return copy.deepcopy(EVENT_SCHEMA)

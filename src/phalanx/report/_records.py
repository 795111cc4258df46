"""A run as event records: read from an ``--events`` file, or rebuilt from the ledger.

The report is built from version-1 event records (see ``phalanx.event_schema()``), whichever
way they come. The ledger keeps every attempt and instance in its own tables and the run's
milestones in its event log, so it can give back the records of any run it holds, also one
that was started without ``--events``. Records rebuilt from it carry two optional fields the
live stream leaves out: ``log_dir`` on ``attempt_started`` and ``detail`` (the traceback or
stderr tail) on ``attempt_ended``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .._errors import UsageError
from .._eventlog import SCHEMA_VERSION
from .._ledger import AttemptRow, InstanceRow, Ledger, RunRow

__all__ = ["ledger_records", "read_events"]

_ORDER = {
    "run_started": 0,
    "stage_started": 1,
    "attempt_started": 2,
    "limit_changed": 3,
    "lane_paused": 3,
    "budget_reached": 3,
    "attempt_ended": 4,
    "instance_ended": 5,
    "stage_ended": 6,
    "run_ended": 7,
}
"""Which of two records at the same time comes first."""


def read_events(path: Path, run: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The records of one run in an event file: ``run`` (an id or a unique prefix), or the
    last run the file holds. A line that is not a version-1 record is a usage error naming
    the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the event file {path}: {exc.strerror or exc}") from None
    records: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{path}, line {number}: not JSON ({exc.msg}); an event file has one JSON "
                "record a line, as `phalanx run --events FILE` writes it"
            ) from None
        if not isinstance(record, dict) or "type" not in record or "run" not in record:
            raise UsageError(
                f"{path}, line {number}: not a phalanx event record (no `type` or `run` field)"
            )
        if record.get("v") != SCHEMA_VERSION:
            raise UsageError(
                f"{path}, line {number}: event schema version {record.get('v')!r}; this "
                f"phalanx reads version {SCHEMA_VERSION}: upgrade phalanx to read this file"
            )
        records.append(record)
    runs = list(dict.fromkeys(str(record["run"]) for record in records))
    if not runs:
        raise UsageError(f"{path} holds no event records")
    if run is None or run == "latest":
        chosen = runs[-1]
    else:
        matches = [name for name in runs if name.startswith(run)]
        if run in runs:
            matches = [run]
        if not matches:
            raise UsageError(f"{path} has no run {run!r}; it holds {', '.join(runs)}")
        if len(matches) > 1:
            raise UsageError(f"run {run!r} is ambiguous in {path}: {', '.join(matches)}")
        chosen = matches[0]
    return chosen, [record for record in records if record["run"] == chosen]


def ledger_records(ledger: Ledger, run: RunRow) -> list[dict[str, Any]]:
    """The event records of ``run``, rebuilt from the ledger, in time order."""
    records = list(_rebuild(ledger, run))
    records.sort(key=lambda record: (record["t"], _ORDER.get(record["type"], 3)))
    return records


def _rebuild(ledger: Ledger, run: RunRow) -> Iterator[dict[str, Any]]:
    def record(kind: str, t: float, **fields: object) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, "t": round(t, 6), "run": run.id, "type": kind, **fields}

    stages = ledger.stage_rows(run.id)
    instances = ledger.run_instances(run.id)
    attempts = ledger.run_attempts(run.id)
    events = ledger.run_events(run.id)
    names = [row.name for row in stages]
    names += sorted({instance.stage for instance in instances} - set(names))
    totals = {row.name: row.total for row in stages}
    counted: dict[str, int] = {}
    for instance in instances:
        counted[instance.stage] = counted.get(instance.stage, 0) + 1
    started_data: dict[str, Mapping[str, object]] = {}
    ended_data: dict[str, Mapping[str, object]] = {}
    for event in events:
        if event.stage is not None and event.kind == "StageStarted":
            started_data[event.stage] = event.data or {}
        elif event.stage is not None and event.kind == "StageEnded":
            ended_data[event.stage] = event.data or {}

    def total(name: str) -> int:
        return totals.get(name) or counted.get(name, 0)

    yield record(
        "run_started",
        run.started,
        pipeline=run.pipeline,
        stages=names,
        totals=[total(name) for name in names],
    )
    end_of_run = run.ended
    for row in stages:
        if row.started is None:
            continue
        data = started_data.get(row.name, {})
        yield record(
            "stage_started",
            row.started,
            stage=row.name,
            total=total(row.name),
            concurrency=_int(data.get("limit")),
            runner=str(data.get("runner") or ""),
            model=str(data.get("model") or ""),
        )
    usage_of: dict[tuple[str, str], dict[str, float]] = {}
    for attempt in attempts:
        yield from _attempt_records(record, attempt)
        if attempt.usage:
            _add_usage(usage_of.setdefault((attempt.stage, attempt.key), {}), attempt.usage)
    for instance in instances:
        yield from _instance_records(record, instance, usage_of.get((instance.stage, instance.key)))
    statuses: dict[str, dict[str, int]] = {}
    for instance in instances:
        counts = statuses.setdefault(instance.stage, {})
        counts[instance.status] = counts.get(instance.status, 0) + 1
    for row in stages:
        if row.ended is None:
            continue
        counts = statuses.get(row.name, {})
        data = ended_data.get(row.name, {})
        failed = counts.get("failed", 0)
        met = data.get("met_threshold")
        wall = data.get("wall_s")
        if not isinstance(wall, int | float):
            wall = row.ended - row.started if row.started is not None else 0.0
        yield record(
            "stage_ended",
            row.ended,
            stage=row.name,
            total=total(row.name),
            committed=counts.get("committed", 0),
            cached=counts.get("cached", 0),
            failed=failed,
            skipped=counts.get("skipped", 0),
            met_threshold=bool(met) if isinstance(met, bool) else failed == 0,
            skipped_reason=row.skipped_reason,
            wall_s=round(max(0.0, float(wall)), 6),
        )
    for event in events:
        data = event.data or {}
        if event.kind == "LimitChanged":
            yield record(
                "limit_changed",
                event.t,
                stage=event.stage,
                lane=data.get("lane"),
                old=_int(data.get("old")),
                new=_int(data.get("new")),
                reason=str(data.get("reason") or "tune"),
            )
        elif event.kind == "LanePaused":
            yield record(
                "lane_paused",
                event.t,
                lane=str(data.get("lane") or ""),
                seconds=float(_num(data.get("seconds"))),
            )
        elif event.kind == "BudgetReached" and event.stage is not None:
            yield record(
                "budget_reached", event.t, stage=event.stage, reason=str(data.get("reason") or "")
            )
    if end_of_run is not None:
        yield record(
            "run_ended",
            end_of_run,
            ok=run.status == "ok",
            cancelled=run.status == "interrupted",
        )


def _attempt_records(record: Any, row: AttemptRow) -> Iterable[dict[str, Any]]:
    started = row.started if row.started is not None else row.ended
    if started is None:
        return
    fields: dict[str, object] = {"stage": row.stage, "key": row.key, "attempt": row.attempt}
    if row.log_dir:
        fields["log_dir"] = row.log_dir
    yield record("attempt_started", started, **fields)
    if row.ended is None or row.outcome in (None, "running"):
        return  # still running, or its orchestrator died: no end is known
    cause = row.cause
    if row.outcome != "committed" and cause is None:
        cause = "interrupted" if row.outcome == "discarded" else "error"
    ended: dict[str, object] = {
        "stage": row.stage,
        "key": row.key,
        "attempt": row.attempt,
        "outcome": "committed" if row.outcome == "committed" else "failed",
        "duration_s": round(max(0.0, row.duration_s or row.ended - started), 6),
        "cause": None if row.outcome == "committed" else cause,
        "message": row.message or "",
        "retry_in": None,
        "usage": dict(row.usage) if row.usage else None,
    }
    if row.detail:
        ended["detail"] = row.detail
    yield record("attempt_ended", row.ended, **ended)


def _instance_records(
    record: Any, row: InstanceRow, usage: Mapping[str, float] | None
) -> Iterable[dict[str, Any]]:
    if row.status == "running" or row.updated is None:
        return
    yield record(
        "instance_ended",
        row.updated,
        stage=row.stage,
        key=row.key,
        status=row.status,
        cause=row.cause,
        reason=row.reason,
        message=row.message or "",
        attempts=row.attempts or 0,
        duration_s=round(max(0.0, row.duration_s or 0.0), 6),
        usage=dict(usage) if usage else None,
    )


def _add_usage(into: dict[str, float], usage: Mapping[str, object]) -> None:
    for name, value in usage.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            into[name] = into.get(name, 0) + value


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _num(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return 0.0

"""What the HTML report shows, computed from a run's event records.

:func:`build` turns the version-1 records of one run into one JSON-able mapping: the
overview, each stage with its timeline, its slowest instances and its instance table, the
failures by cause, the cost per stage and per model, and the scheduling events. The page's
script only draws what is here; every number is computed in Python, where it is tested.

Times in the model are seconds since the run started. The timeline is columnar (one list per
field, an index into the stage's keys for the key) so that a 10,000-attempt stage stays a
few hundred kilobytes.
"""

from __future__ import annotations

import heapq
import os
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .._pipeline import STATE_DIR

__all__ = ["CATEGORIES", "COMPACT_ABOVE", "build"]

CATEGORIES: Final = ("committed", "retried", "failed", "superseded", "interrupted", "running")
"""How an attempt ended, as the timeline colours it: ``retried`` failed and was followed by
another attempt, ``failed`` failed and was the instance's last, ``superseded`` lost to a
speculative backup, ``interrupted`` was stopped with its run, ``running`` had not ended."""

COMPACT_ABOVE: Final = 1500
"""Above this many attempts a stage's timeline is drawn as one path per category instead of
one element per bar, so the page stays light at 10,000 instances."""

_FAILURES_SHOWN: Final = 200
"""The most failed attempts listed per cause; the rest are counted."""
_SLOWEST: Final = 10
_EVENTS_SHOWN: Final = 500
_USAGE_FIELDS: Final = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
    "unpriced",
)


@dataclass
class _Attempt:
    stage: str
    key: str
    number: int
    start: float
    end: float | None = None
    committed: bool = False
    cause: str | None = None
    message: str = ""
    detail: str = ""
    usage: dict[str, float] = field(default_factory=dict)
    log_dir: str | None = None
    backup: bool = False
    category: str = "running"


@dataclass
class _Stage:
    name: str
    total: int = 0
    runner: str = ""
    model: str = ""
    concurrency: int = 0
    started: float | None = None
    ended: float | None = None
    wall_s: float | None = None
    skipped_reason: str | None = None
    met_threshold: bool | None = None
    attempts: list[_Attempt] = field(default_factory=list)
    instances: dict[str, Mapping[str, Any]] = field(default_factory=dict)


def build(
    records: Iterable[Mapping[str, Any]],
    *,
    project_dir: Path | None = None,
    out_dir: Path | None = None,
    generated: float | None = None,
) -> dict[str, Any]:
    """The report's model of one run's records (all of one run, in time order).

    ``project_dir`` is where the run's logs are (its ``.phalanx`` folder's parent), and
    ``out_dir`` the folder the page will be written to: links to the logs are relative to it,
    and only logs that exist are linked.
    """
    run, stages, scheduling, last_t = _read(records)
    if not run:
        raise ValueError("the records hold no run_started record")
    t0 = float(run["started"])
    end = float(run.get("ended") or last_t)
    ordered = [stages[name] for name in run["order"] if name in stages]
    ordered += [stage for name, stage in stages.items() if name not in run["order"]]
    for stage in ordered:
        _classify(stage.attempts)
    stage_models = [_stage_model(stage, t0, end) for stage in ordered]
    instances = [record for stage in ordered for record in stage.instances.values()]
    counts = _counts(instances)
    usage = _sum_usage(attempt.usage for stage in ordered for attempt in stage.attempts)
    serial = sum(float(record["duration_s"]) for record in instances)
    wall = max(0.0, end - t0)
    status = (
        "running"
        if "ended" not in run
        else "interrupted"
        if run.get("cancelled")
        else "ok"
        if run.get("ok")
        else "failed"
    )
    every = [attempt for stage in ordered for attempt in stage.attempts]
    return {
        "v": 1,
        "generated": generated,
        "run": {
            "id": run["id"],
            "pipeline": run["pipeline"],
            "started": t0,
            "ended": run.get("ended"),
            "status": status,
            "wall_s": round(wall, 3),
        },
        "totals": {
            "instances": sum(stage.total for stage in ordered),
            **counts,
            "not_ended": max(0, sum(stage.total for stage in ordered) - sum(counts.values())),
            "attempts": len(every),
            "retries": sum(1 for a in every if a.number > 1 and not a.backup),
            "backups": sum(1 for a in every if a.backup),
            "usage": usage,
            "serial_s": round(serial, 3),
            "speedup": round(serial / wall, 2) if wall > 0 else None,
        },
        "categories": list(CATEGORIES),
        "stages": stage_models,
        "failures": _failures(ordered, project_dir, out_dir),
        "models": _models(ordered),
        "scheduling": [
            {**_without_header(event), "t": round(float(event["t"]) - t0, 3)}
            for event in scheduling[:_EVENTS_SHOWN]
        ],
        "scheduling_more": max(0, len(scheduling) - _EVENTS_SHOWN),
    }


def _read(
    records: Iterable[Mapping[str, Any]],
) -> tuple[dict[str, Any], dict[str, _Stage], list[dict[str, Any]], float]:
    """The run, its stages (with their attempts and ended instances), the scheduling events
    and the last time, from the records in time order."""
    run: dict[str, Any] = {}
    stages: dict[str, _Stage] = {}
    attempts: dict[tuple[str, str, int], _Attempt] = {}
    scheduling: list[dict[str, Any]] = []
    last_t = 0.0
    for record in records:
        kind = record["type"]
        t = float(record["t"])
        last_t = max(last_t, t)
        if kind == "run_started":
            run = {
                "id": record["run"],
                "pipeline": record["pipeline"],
                "started": t,
                "order": list(record["stages"]),
            }
            for name, total in zip(record["stages"], record["totals"], strict=False):
                stages.setdefault(name, _Stage(name)).total = int(total)
        elif kind == "run_ended":
            run["ended"] = t
            run["ok"] = bool(record["ok"])
            run["cancelled"] = bool(record["cancelled"])
        elif kind == "stage_started":
            stage = stages.setdefault(record["stage"], _Stage(record["stage"]))
            stage.started = t
            stage.total = int(record["total"]) or stage.total
            stage.runner = str(record.get("runner") or "")
            stage.model = str(record.get("model") or "")
            stage.concurrency = int(record["concurrency"])
        elif kind == "stage_ended":
            stage = stages.setdefault(record["stage"], _Stage(record["stage"]))
            stage.ended = t
            stage.wall_s = float(record.get("wall_s") or 0.0)
            stage.skipped_reason = record.get("skipped_reason")
            stage.met_threshold = bool(record["met_threshold"])
        elif kind == "attempt_started":
            where = (record["stage"], record["key"], int(record["attempt"]))
            log_dir = record.get("log_dir") or (
                f"{STATE_DIR}/runs/{record['run']}/logs/{where[0]}/{where[1]}/attempt-{where[2]}"
            )
            attempt = _Attempt(*where, start=t, log_dir=log_dir)
            attempts[where] = attempt
            stages.setdefault(where[0], _Stage(where[0])).attempts.append(attempt)
        elif kind == "attempt_ended":
            where = (record["stage"], record["key"], int(record["attempt"]))
            attempt = attempts.get(where) or _orphan(stages, attempts, where, record, t)
            attempt.end = t
            attempt.committed = record["outcome"] == "committed"
            attempt.cause = record.get("cause")
            attempt.message = str(record.get("message") or "")
            attempt.detail = str(record.get("detail") or "")
            attempt.usage = _usage(record.get("usage"))
        elif kind == "instance_ended":
            stage = stages.setdefault(record["stage"], _Stage(record["stage"]))
            stage.instances[record["key"]] = record
        elif kind in ("limit_changed", "lane_paused", "budget_reached"):
            scheduling.append(dict(record))
    return run, stages, scheduling, last_t


def _orphan(
    stages: dict[str, _Stage],
    attempts: dict[tuple[str, str, int], _Attempt],
    where: tuple[str, str, int],
    record: Mapping[str, Any],
    t: float,
) -> _Attempt:
    """An attempt whose start is not in the records (a file that begins mid-run)."""
    attempt = _Attempt(*where, start=t - float(record["duration_s"]))
    attempts[where] = attempt
    stages.setdefault(where[0], _Stage(where[0])).attempts.append(attempt)
    return attempt


def _usage(value: object) -> dict[str, float]:
    if not isinstance(value, Mapping):
        return {}
    return {
        name: float(number)
        for name, number in value.items()
        if isinstance(number, int | float) and not isinstance(number, bool)
    }


def _classify(attempts: list[_Attempt]) -> None:
    """Mark backups (an attempt that began while an earlier one of its instance ran) and give
    each attempt its timeline category."""
    by_key: dict[str, list[_Attempt]] = {}
    for attempt in attempts:
        by_key.setdefault(attempt.key, []).append(attempt)
    for group in by_key.values():
        group.sort(key=lambda attempt: attempt.number)
        for index, attempt in enumerate(group):
            attempt.backup = any(
                earlier.end is None or earlier.end > attempt.start + 1e-6
                for earlier in group[:index]
            )
            later = any(other.number > attempt.number for other in group)
            if attempt.end is None:
                attempt.category = "running"
            elif attempt.committed:
                attempt.category = "committed"
            elif attempt.cause == "superseded":
                attempt.category = "superseded"
            elif attempt.cause in ("interrupted", "cancelled"):
                attempt.category = "interrupted"
            else:
                attempt.category = "retried" if later else "failed"


def _lanes(attempts: list[_Attempt], end: float) -> list[int]:
    """A lane for each attempt (in the given order): attempts are packed in start order into
    the lowest lane free at their start, so the lanes are the slots the stage held."""
    order = sorted(range(len(attempts)), key=lambda i: (attempts[i].start, attempts[i].number))
    lanes = [0] * len(attempts)
    busy: list[tuple[float, int]] = []  # (end, lane)
    free: list[int] = []
    used = 0
    for i in order:
        attempt = attempts[i]
        while busy and busy[0][0] <= attempt.start + 1e-9:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            lane = heapq.heappop(free)
        else:
            lane, used = used, used + 1
        lanes[i] = lane
        finish = attempt.end if attempt.end is not None else end
        heapq.heappush(busy, (finish, lane))
    return lanes


def _stage_model(stage: _Stage, t0: float, end: float) -> dict[str, Any]:
    attempts = stage.attempts
    lanes = _lanes(attempts, end)
    keys = list(dict.fromkeys(attempt.key for attempt in attempts))
    index = {key: i for i, key in enumerate(keys)}
    category = {name: i for i, name in enumerate(CATEGORIES)}
    timeline = {
        "mode": "compact" if len(attempts) > COMPACT_ABOVE else "bars",
        "lanes": max(lanes, default=-1) + 1,
        "keys": keys,
        "key": [index[attempt.key] for attempt in attempts],
        "attempt": [attempt.number for attempt in attempts],
        "lane": lanes,
        "start": [round(attempt.start - t0, 3) for attempt in attempts],
        "duration": [
            round((attempt.end if attempt.end is not None else end) - attempt.start, 3)
            for attempt in attempts
        ],
        "category": [category[attempt.category] for attempt in attempts],
        "backup": [1 if attempt.backup else 0 for attempt in attempts],
    }
    instances = sorted(stage.instances.values(), key=lambda record: str(record["key"]))
    counts = _counts(instances)
    ran = [float(record["duration_s"]) for record in instances if record["status"] != "cached"]
    ran = [d for d in ran if d > 0] or ran
    wall = stage.wall_s
    if wall is None and stage.started is not None:
        wall = (stage.ended or end) - stage.started
    usage = _sum_usage(attempt.usage for attempt in attempts)
    serial = sum(ran)
    slowest = sorted(
        (record for record in instances if record["status"] != "cached"),
        key=lambda record: (-float(record["duration_s"]), record["key"]),
    )[:_SLOWEST]
    return {
        "name": stage.name,
        "runner": stage.runner,
        "model": stage.model,
        "concurrency": stage.concurrency,
        "total": stage.total,
        **counts,
        "not_ended": max(0, stage.total - sum(counts.values())),
        "skipped_reason": stage.skipped_reason,
        "met_threshold": stage.met_threshold,
        "started": None if stage.started is None else round(stage.started - t0, 3),
        "ended": None if stage.ended is None else round(stage.ended - t0, 3),
        "wall_s": None if wall is None else round(wall, 3),
        "attempts": len(attempts),
        "retries": sum(1 for a in attempts if a.number > 1 and not a.backup),
        "backups": sum(1 for a in attempts if a.backup),
        "superseded": sum(1 for a in attempts if a.category == "superseded"),
        "durations": _spread(ran),
        "serial_s": round(serial, 3),
        "usage": usage,
        "slowest": [
            {
                "key": record["key"],
                "status": record["status"],
                "attempts": int(record["attempts"]),
                "duration_s": round(float(record["duration_s"]), 3),
                "of_wall": _share(float(record["duration_s"]), wall),
                "of_serial": _share(float(record["duration_s"]), serial),
            }
            for record in slowest
        ],
        "table": {
            "key": [record["key"] for record in instances],
            "status": [record["status"] for record in instances],
            "attempts": [int(record["attempts"]) for record in instances],
            "duration": [round(float(record["duration_s"]), 3) for record in instances],
            "cost": [
                round(float((record.get("usage") or {}).get("cost_usd", 0.0)), 6)
                for record in instances
            ],
            "why": [record.get("cause") or record.get("reason") or "" for record in instances],
        },
        "timeline": timeline,
    }


def _share(part: float, whole: float | None) -> float | None:
    return round(part / whole, 4) if whole else None


def _spread(durations: list[float]) -> dict[str, float] | None:
    if not durations:
        return None
    ordered = sorted(durations)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {
        "min": round(ordered[0], 3),
        "p50": round(statistics.median(ordered), 3),
        "p95": at(0.95),
        "max": round(ordered[-1], 3),
    }


def _counts(instances: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts = {"committed": 0, "cached": 0, "failed": 0, "skipped": 0}
    for record in instances:
        status = record["status"]
        if status in counts:
            counts[status] += 1
    return counts


def _sum_usage(usages: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total = dict.fromkeys(_USAGE_FIELDS, 0.0)
    for usage in usages:
        for name in _USAGE_FIELDS:
            total[name] += usage.get(name, 0.0)
    return {
        name: round(value, 6) if name == "cost_usd" else int(value) for name, value in total.items()
    }


def _failures(
    stages: list[_Stage], project_dir: Path | None, out_dir: Path | None
) -> list[dict[str, Any]]:
    """Failed attempts grouped by cause, the largest group first; superseded backups and
    attempts stopped with the run are not failures."""
    groups: dict[str, list[_Attempt]] = {}
    finals: dict[str, set[tuple[str, str]]] = {}
    for stage in stages:
        failed_keys = {
            key for key, record in stage.instances.items() if record["status"] == "failed"
        }
        for attempt in stage.attempts:
            if attempt.category not in ("retried", "failed"):
                continue
            cause = attempt.cause or "error"
            groups.setdefault(cause, []).append(attempt)
            if attempt.key in failed_keys:
                finals.setdefault(cause, set()).add((stage.name, attempt.key))
    result = []
    for cause, items in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        items.sort(key=lambda attempt: (attempt.stage, attempt.key, attempt.number))
        shown = items[:_FAILURES_SHOWN]
        result.append(
            {
                "cause": cause,
                "attempts": len(items),
                "instances_failed": len(finals.get(cause, ())),
                "more": len(items) - len(shown),
                "items": [
                    {
                        "stage": attempt.stage,
                        "key": attempt.key,
                        "attempt": attempt.number,
                        "final": attempt.category == "failed",
                        "message": attempt.message,
                        "detail": attempt.detail[-4000:],
                        "logs": _logs(attempt, project_dir, out_dir),
                    }
                    for attempt in shown
                ],
            }
        )
    return result


def _logs(attempt: _Attempt, project_dir: Path | None, out_dir: Path | None) -> list[list[str]]:
    """``[name, href]`` for each log file the attempt left, relative to the page's folder."""
    if project_dir is None or out_dir is None or not attempt.log_dir:
        return []
    folder = project_dir / attempt.log_dir
    if not folder.is_dir():
        return []
    links = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            href = Path(os.path.relpath(path, out_dir)).as_posix()
            links.append([path.relative_to(folder).as_posix(), href])
    return links


def _models(stages: list[_Stage]) -> list[dict[str, Any]]:
    """Spending per model, summed over the stages that ask for it."""
    by_model: dict[str, list[_Stage]] = {}
    for stage in stages:
        name = stage.model or f"(no model: {stage.runner or 'unknown'} runner)"
        by_model.setdefault(name, []).append(stage)
    return [
        {
            "model": name,
            "stages": [stage.name for stage in group],
            "usage": _sum_usage(attempt.usage for stage in group for attempt in stage.attempts),
        }
        for name, group in by_model.items()
    ]


def _without_header(record: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in record.items() if name not in ("v", "run", "t")}

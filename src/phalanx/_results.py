"""What a run returns: per instance, per stage and for the whole run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ._usage import Usage

__all__ = ["AttemptRecord", "InstanceResult", "RunResult", "StageResult", "Status"]

Status = Literal["committed", "cached", "failed", "skipped"]


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt: when it ran, how long, and how it ended (``None`` cause = committed)."""

    attempt: int
    started: float
    duration_s: float
    cause: str | None = None
    message: str = ""
    usage: Usage | None = None
    backup: bool = False
    """A speculative backup of a straggling attempt (``speculate:``)."""


@dataclass(frozen=True)
class InstanceResult:
    """How one instance ended: ``committed`` (by this run), ``cached`` (an earlier run's output
    was up to date and intact, so it did not run), ``failed`` (with ``cause``) or ``skipped``
    (with ``reason``: ``cancelled``, ``aborted``, ``upstream failed``...). ``fingerprint``
    identifies what it was run with (see :mod:`phalanx._manifest`)."""

    stage: str
    key: str
    status: Status
    output: Path
    attempts: tuple[AttemptRecord, ...] = ()
    cause: str | None = None
    message: str = ""
    reason: str | None = None
    fingerprint: str | None = None

    @property
    def duration_s(self) -> float:
        """Time spent running attempts (not waiting for a slot or a retry)."""
        return sum(a.duration_s for a in self.attempts)

    @property
    def usage(self) -> Usage:
        """What every attempt of this instance spent, failed ones included."""
        return _total(a.usage for a in self.attempts)

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "status": self.status,
            "output": str(self.output),
            "attempts": len(self.attempts),
            "duration_s": round(self.duration_s, 6),
            "cause": self.cause,
            "message": self.message,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Streaming:
    """How a streaming fan-in stage overlapped the stages it reads: its first instance
    started ``early_s`` seconds before the last of them passed its barrier, ``started_early``
    instances started before that barrier, and ``saved_s`` estimates the time saved against
    strict layers (its instances' own durations replayed from that barrier on its slots)."""

    early_s: float
    started_early: int
    saved_s: float

    def to_json(self) -> dict[str, object]:
        return {
            "early_s": round(self.early_s, 6),
            "started_early": self.started_early,
            "saved_s": round(self.saved_s, 6),
        }


@dataclass(frozen=True)
class Speculation:
    """Backup attempts of stragglers: how many started, how many committed first, and what
    they cost (the time they held slots and the dollars their model calls cost)."""

    backups: int
    won: int
    extra_s: float
    extra_cost_usd: float

    def to_json(self) -> dict[str, object]:
        return {
            "backups": self.backups,
            "won": self.won,
            "extra_s": round(self.extra_s, 6),
            "extra_cost_usd": round(self.extra_cost_usd, 6),
        }


@dataclass(frozen=True)
class StageResult:
    """A stage after its barrier. ``committed + cached + failed + skipped == total`` always."""

    name: str
    instances: tuple[InstanceResult, ...]
    required: int
    wall_s: float
    skipped_reason: str | None = None
    streaming: Streaming | None = None
    speculation: Speculation | None = None

    @property
    def total(self) -> int:
        return len(self.instances)

    def count(self, status: Status) -> int:
        return sum(1 for inst in self.instances if inst.status == status)

    @property
    def committed(self) -> int:
        return self.count("committed")

    @property
    def cached(self) -> int:
        return self.count("cached")

    @property
    def done(self) -> int:
        """Instances whose output is committed and current: this run's and cached ones."""
        return self.committed + self.cached

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def skipped(self) -> int:
        return self.count("skipped")

    @property
    def met_threshold(self) -> bool:
        """Whether enough instances committed (``min_success``) for dependants to run."""
        return self.skipped_reason is None and self.done >= self.required

    @property
    def sum_instance_s(self) -> float:
        """Serial time: the sum of every attempt's duration."""
        return sum(inst.duration_s for inst in self.instances)

    @property
    def speedup(self) -> float:
        """Effective speedup: serial time over wall time."""
        return self.sum_instance_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def usage(self) -> Usage:
        # Instances none of whose attempts spent anything add nothing: skip them unsummed.
        return _total(
            inst.usage
            for inst in self.instances
            if any(attempt.usage is not None for attempt in inst.attempts)
        )

    def slowest(self, n: int = 5) -> list[InstanceResult]:
        ran = [inst for inst in self.instances if inst.attempts]
        return sorted(ran, key=lambda inst: inst.duration_s, reverse=True)[:n]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "total": self.total,
            "committed": self.committed,
            "cached": self.cached,
            "failed": self.failed,
            "skipped": self.skipped,
            "required": self.required,
            "met_threshold": self.met_threshold,
            "wall_s": round(self.wall_s, 6),
            "sum_instance_s": round(self.sum_instance_s, 6),
            "skipped_reason": self.skipped_reason,
            "usage": self.usage.to_json(),
            "streaming": None if self.streaming is None else self.streaming.to_json(),
            "speculation": None if self.speculation is None else self.speculation.to_json(),
            "failures": [inst.to_json() for inst in self.instances if inst.status == "failed"],
        }


@dataclass(frozen=True)
class RunResult:
    """A whole run. ``ok`` is true when every stage met its threshold and nothing was cancelled.
    ``halted`` names the fatal error (a rejected key, no quota) that stopped it, if one did."""

    run_id: str
    pipeline: str
    stages: tuple[StageResult, ...]
    wall_s: float
    cancelled: bool = False
    halted: str | None = None
    stop_reason: str | None = None
    notes: Path | None = None
    summaries: tuple[Path, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return (
            not self.cancelled
            and self.halted is None
            and all(stage.met_threshold for stage in self.stages)
        )

    @property
    def usage(self) -> Usage:
        """What the whole run spent on model calls."""
        return _total(stage.usage for stage in self.stages)

    def stage(self, name: str) -> StageResult:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def to_json(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "pipeline": self.pipeline,
            "ok": self.ok,
            "cancelled": self.cancelled,
            "halted": self.halted,
            "stop_reason": self.stop_reason,
            "wall_s": round(self.wall_s, 6),
            "notes": str(self.notes) if self.notes else None,
            "usage": self.usage.to_json(),
            "stages": [stage.to_json() for stage in self.stages],
        }


def _total(parts: Iterable[Usage | None]) -> Usage:
    total = Usage()
    for part in parts:
        if part is not None:
            total.add(part)
    return total

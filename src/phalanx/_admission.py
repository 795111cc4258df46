"""What decides, besides slots, whether the next attempt may start: the local resource guard,
budgets, and the control file through which ``phalanx tune`` changes a running run's limits.

The slots themselves (:class:`~phalanx._lanes.Slots`) and the adaptive lanes of API runners are
in :mod:`phalanx._lanes`; the scheduler combines them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._config import Budget, Guard
from ._errors import UsageError
from ._lanes import SYSTEM_CLOCK, Clock
from ._usage import Usage

__all__ = [
    "CONTROL_FILE",
    "Change",
    "Control",
    "ResourceGuard",
    "Spending",
    "machine_load",
    "request_change",
]

CONTROL_FILE = "control.json"
"""In ``.phalanx/runs/RUN/``: the limit changes asked of a running run, oldest first."""


def machine_load() -> tuple[float, float]:
    """Available memory in MiB (``MemAvailable``; infinite where ``/proc`` does not say) and
    the one-minute load average."""
    available = float("inf")
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) / 1024
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return available, load


class ResourceGuard:
    """Admits process agents (``command``, ``claude-code``) while the machine can take them.

    Up to one instance per core is always admitted, so a loaded machine still makes progress.
    Beyond that, an instance waits while available memory is under the stage's
    ``min_free_memory_mb`` or the load average is over ``max_load`` per core: the seed's
    "dynamic parallelism", measured rather than guessed. The load average trails real demand
    by design (it is a one-minute mean), so the guard re-reads it every ``interval`` seconds
    rather than trusting a reading taken before the last admissions took effect.
    """

    def __init__(
        self,
        *,
        cores: int | None = None,
        probe: Callable[[], tuple[float, float]] = machine_load,
        clock: Clock = SYSTEM_CLOCK,
        interval: float = 0.5,
    ) -> None:
        self.cores = cores or os.cpu_count() or 1
        self.probe = probe
        self.clock = clock
        self.interval = interval
        self.running = 0
        self.waited = 0  # admissions that had to wait
        self._reading: tuple[float, float] | None = None
        self._read_at = float("-inf")

    def _fits(self, guard: Guard) -> bool:
        now = self.clock.now()
        if self._reading is None or now - self._read_at >= self.interval:
            self._reading, self._read_at = self.probe(), now
        available, load = self._reading
        return available >= guard.min_free_memory_mb and load < guard.max_load * self.cores

    async def admit(self, guard: Guard) -> None:
        """Return once one more process agent may start, and count it as running."""
        if self.running >= self.cores and not self._fits(guard):
            self.waited += 1
            while self.running >= self.cores and not self._fits(guard):
                await self.clock.sleep(self.interval)
        self.running += 1

    def release(self) -> None:
        self.running -= 1


class Spending:
    """What a run (or a stage) has spent, against its budget. Spending is counted when an
    attempt ends, so the attempts in flight when the budget is reached may take it past the
    budget by what they spend; none starts after."""

    def __init__(self, budget: Budget | None, scope: str) -> None:
        self.budget = budget
        self.scope = scope
        self.usage = Usage()

    def add(self, usage: Usage) -> None:
        self.usage.add(usage)

    @property
    def tokens(self) -> int:
        used = self.usage
        return (
            used.input_tokens
            + used.output_tokens
            + used.cache_read_tokens
            + used.cache_write_tokens
        )

    def reached(self) -> str | None:
        """Why no new attempt may start, or ``None`` while the budget lasts."""
        budget = self.budget
        if budget is None:
            return None
        if budget.usd is not None and self.usage.cost_usd >= budget.usd:
            return (
                f"the {self.scope} budget of ${budget.usd:g} is spent (${self.usage.cost_usd:.4f})"
            )
        if budget.tokens is not None and self.tokens >= budget.tokens:
            return f"the {self.scope} budget of {budget.tokens} tokens is spent ({self.tokens})"
        return None


@dataclass(frozen=True)
class Change:
    """One change asked of a running run: ``concurrency`` for ``stage`` (every stage when
    ``None``), asked at ``asked`` (epoch seconds)."""

    seq: int
    concurrency: int
    stage: str | None
    asked: float


def _read_changes(path: Path) -> list[Change]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable control file ({exc}); delete it") from exc
    changes = []
    for item in raw.get("changes", []) if isinstance(raw, dict) else []:
        try:
            changes.append(
                Change(
                    int(item["seq"]),
                    int(item["concurrency"]),
                    item.get("stage"),
                    float(item.get("asked", 0)),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue  # a hand-edited entry that makes no sense is ignored, not fatal
    return changes


def request_change(run_dir: Path, *, concurrency: int, stage: str | None) -> Change:
    """Append a change to a run's control file (written whole, then renamed into place, so
    the run never reads half of it)."""
    path = run_dir / CONTROL_FILE
    changes = _read_changes(path)
    change = Change(
        (changes[-1].seq + 1) if changes else 1, concurrency, stage, round(time.time(), 3)
    )
    changes.append(change)
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(
        json.dumps(
            {
                "changes": [
                    {"seq": c.seq, "concurrency": c.concurrency, "stage": c.stage, "asked": c.asked}
                    for c in changes
                ]
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    temporary.replace(path)
    return change


class Control:
    """The run's side of the control file: the changes it has not applied yet."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / CONTROL_FILE
        self.applied = 0
        self._seen: tuple[int, int] | None = None
        try:
            existing = _read_changes(self.path)
        except UsageError:
            existing = []
        # A resumed run starts from its configured limits; old changes stay applied history.
        self.applied = existing[-1].seq if existing else 0

    def poll(self) -> list[Change]:
        """The changes written since the last poll (cheap when the file did not change)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return []
        self._seen = seen
        try:
            changes = _read_changes(self.path)
        except UsageError:
            return []
        fresh = [change for change in changes if change.seq > self.applied]
        if fresh:
            self.applied = fresh[-1].seq
        return fresh

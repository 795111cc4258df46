"""The live display of a run.

On a terminal: a rich table, one row per stage (total, running, committed, failed, retrying,
elapsed, ETA), redrawn a few times a second, with the tokens and cost so far, a forecast of the
total cost and of the finish once a few instances have ended, and the adaptive lanes' limits.
Elsewhere (a pipe, a CI log, ``--quiet`` off a terminal): plain lines, one per stage start and
end, per failed attempt, per budget reached and per ``phalanx tune`` change, and a progress line
per stage (or lane change) at most every ``interval`` seconds, so a 10,000-instance run does not
print 10,000 lines.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from .._events import (
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
from .._usage import Usage

__all__ = ["Progress"]


@dataclass
class _Row:
    name: str
    total: int = 0
    running: int = 0
    committed: int = 0
    cached: int = 0
    failed: int = 0
    skipped: int = 0
    retrying: int = 0
    started: float | None = None
    ended: float | None = None
    last_line: float = 0.0
    status: str = "waiting"
    concurrency: int = 1
    busy: float = 0.0
    keys_retrying: set[str] = field(default_factory=set)

    @property
    def done(self) -> int:
        return self.committed + self.cached + self.failed + self.skipped

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.monotonic()) - self.started

    def eta(self) -> str:
        """Remaining time: from the completion rate once a full window of instances has ended,
        before that from their mean duration spread over the slots (a rate taken from the
        first few completions badly overestimates a wide stage)."""
        if self.ended is not None or self.started is None:
            return ""
        ran = self.committed + self.failed
        if ran == 0:
            return "?"
        remaining = self.total - self.done
        finished = self.done - self.cached  # cached ones took no time: leave them out
        slots = max(1, min(self.concurrency, self.total - self.cached))
        if finished >= slots:
            return _clock(remaining * self.elapsed() / finished)
        return _clock(math.ceil(remaining / slots) * self.busy / ran)


def _clock(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """An event handler that draws the run; use as a context manager around the run."""

    def __init__(self, stream: TextIO, *, live: bool, interval: float = 5.0) -> None:
        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.live_mode = live
        self.interval = interval
        self.rows: dict[str, _Row] = {}
        self.usage = Usage()
        self.lanes: dict[str, int] = {}
        # Attempts in flight: (stage, key) -> (attempt, start); each stage's runner type.
        self.inflight: dict[tuple[str, str], tuple[int, float]] = {}
        self.runners: dict[str, str] = {}
        self.started = time.monotonic()
        self._live: Live | None = None
        self._lane_line = 0.0

    def __enter__(self) -> Progress:
        if self.live_mode:
            self._live = Live(
                console=self.console,
                refresh_per_second=4,
                transient=False,
                get_renderable=self._view,  # redrawn four times a second: elapsed times move
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self.inflight.clear()
            self._live.refresh()
            self._live.__exit__(None, None, None)
            self._live = None

    def _print(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, markup=False)
        else:
            self.console.print(text, markup=False)

    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, RunStarted):
            self.rows = {
                name: _Row(name, total=total)
                for name, total in zip(event.stages, event.totals, strict=True)
            }
            self._print(f"run {event.run_id}: pipeline {event.pipeline}")
        elif isinstance(event, StageStarted):
            row = self.rows[event.stage]
            row.total, row.started, row.status = event.total, now, "running"
            row.concurrency = event.concurrency
            self.runners[event.stage] = event.runner
            if not self.live_mode:
                self._print(
                    f"stage {event.stage}: {event.total} instances, concurrency {event.concurrency}"
                )
        elif isinstance(event, AttemptStarted):
            self.inflight[event.stage, event.key] = (event.attempt, now)
            row = self.rows[event.stage]
            row.running += 1
            if event.key in row.keys_retrying:
                row.keys_retrying.discard(event.key)
                row.retrying -= 1
        elif isinstance(event, AttemptEnded):
            self.inflight.pop((event.stage, event.key), None)
            row = self.rows[event.stage]
            row.running -= 1
            if event.cause is not None:
                then = "gave up" if event.retry_in is None else f"retry in {event.retry_in:.1f}s"
                self._print(
                    f"  {event.stage}/{event.key} attempt {event.attempt} failed "
                    f"[{event.cause}]: {_one_line(event.message)} ({then})"
                )
                if event.retry_in is not None:
                    row.keys_retrying.add(event.key)
                    row.retrying += 1
        elif isinstance(event, InstanceEnded):
            self._instance_ended(event, now)
        elif isinstance(event, StageEnded):
            result = event.result
            row = self.rows[result.name]
            row.ended = now
            row.status = "done" if result.met_threshold else "missed"
            row.total = result.total
            row.committed, row.cached, row.failed, row.skipped = (
                result.committed,
                result.cached,
                result.failed,
                result.skipped,
            )
            row.running = row.retrying = 0
            if not self.live_mode or result.skipped_reason:
                why = f" ({result.skipped_reason})" if result.skipped_reason else ""
                if result.usage and not self.live_mode:
                    why += f"; so far {self.usage.describe()}"
                cached = f"{result.cached} cached, " if result.cached else ""
                self._print(
                    f"stage {result.name}: {result.committed} committed, {cached}{result.failed} "
                    f"failed, {result.skipped} skipped of {result.total} in "
                    f"{result.wall_s:.2f}s{why}"
                )
        elif isinstance(event, RunEnded) and event.cancelled:
            self._print("run stopped: in-flight attempts cancelled, committed outputs kept")
        elif isinstance(event, LimitChanged | LanePaused | BudgetReached):
            self._limits(event, now)

    def _limits(self, event: LimitChanged | LanePaused | BudgetReached, now: float) -> None:
        """Budgets and ``phalanx tune`` changes are always told; a lane's moves are shown
        in the table on a terminal, and elsewhere at most once per ``interval``."""
        if isinstance(event, BudgetReached):
            self._print(f"stage {event.stage}: no new attempts: {event.reason}")
            return
        if isinstance(event, LimitChanged) and event.lane is None:
            self._print(f"stage {event.stage}: concurrency {event.old} -> {event.new} (tune)")
            return
        if isinstance(event, LimitChanged):
            lane = event.lane or ""
            self.lanes[lane] = event.new
            text = f"lane {lane}: limit {event.old} -> {event.new} ({event.reason})"
        else:
            text = f"lane {event.lane}: rate limited, pausing {event.seconds:.1f}s"
        if not self.live_mode and now - self._lane_line >= self.interval:
            self._lane_line = now
            self._print("  " + text)

    def forecast(self, now: float | None = None) -> str | None:
        """The expected total cost and time left, from the instances ended so far (at least
        three run, not cached); ``None`` before that."""
        ran = sum(row.committed + row.failed for row in self.rows.values())
        if ran < 3:
            return None
        to_run = sum(row.total - row.cached - row.skipped for row in self.rows.values())
        left = max(0, to_run - ran)
        elapsed = (now or time.monotonic()) - self.started
        parts = []
        if self.usage.cost_usd > 0:
            parts.append(f"~${self.usage.cost_usd / ran * to_run:.2f} in all")
        if left:
            parts.append(f"~{_clock(elapsed / ran * left)} to go")
        return "forecast: " + ", ".join(parts) if parts else None

    def _instance_ended(self, event: InstanceEnded, now: float) -> None:
        result = event.result
        row = self.rows[result.stage]
        row.busy += result.duration_s
        self.usage.add(result.usage)
        if result.status == "committed":
            row.committed += 1
        elif result.status == "cached":
            row.cached += 1
        elif result.status == "failed":
            row.failed += 1
        else:
            row.skipped += 1
        if not self.live_mode and now - row.last_line >= self.interval:
            row.last_line = now
            self._print(
                f"  {row.name}: {row.done}/{row.total} done, {row.committed} committed, "
                f"{row.failed} failed, {row.running} running, ETA {row.eta()}"
            )

    def _view(self) -> Group:
        """What the terminal shows: the stages, then the longest-running attempts in flight."""
        parts: list[Table] = [self._table()]  # called from rich's refresh thread: see below
        if self.inflight:
            parts.append(self.inflight_table())
        return Group(*parts)

    def inflight_table(self, now: float | None = None, limit: int = 8) -> Table:
        """The ``limit`` attempts in flight that have run longest: where a stuck agent shows."""
        now = time.monotonic() if now is None else now
        # Drawn from rich's refresh thread while the loop changes the dict: copy it in one
        # step (list() of a dict view runs under the GIL without yielding).
        inflight = list(self.inflight.items())
        oldest = sorted(inflight, key=lambda item: item[1][1])[:limit]
        more = len(inflight) - len(oldest)
        table = Table(
            box=None,
            pad_edge=False,
            header_style="bold",
            title=f"in flight: {len(inflight)}, longest running first"
            + (f" ({more} more)" if more else ""),
            title_justify="left",
        )
        for column in ("stage", "key", "attempt", "elapsed", "runner"):
            table.add_column(
                column, justify="right" if column in ("attempt", "elapsed") else "left"
            )
        for (stage, key), (attempt, started) in oldest:
            table.add_row(
                stage, key, str(attempt), _clock(now - started), self.runners.get(stage, "")
            )
        return table

    def _table(self) -> Table:
        lines = [self.usage.describe()] if self.usage else []
        forecast = self.forecast()
        if forecast is not None:
            lines.append(forecast)
        if self.lanes:
            lines.append(
                "lanes: " + ", ".join(f"{name} limit {n}" for name, n in sorted(self.lanes.items()))
            )
        caption = "\n".join(lines) or None
        table = Table(
            box=None, pad_edge=False, header_style="bold", caption=caption, caption_justify="left"
        )
        for column in (
            "stage",
            "total",
            "running",
            "committed",
            "cached",
            "failed",
            "skipped",
            "retrying",
            "elapsed",
            "ETA",
        ):
            table.add_column(column, justify="left" if column == "stage" else "right")
        for row in list(self.rows.values()):
            style = {"missed": "red", "done": "green", "waiting": "dim"}.get(row.status, "")
            table.add_row(
                row.name,
                str(row.total),
                str(row.running),
                str(row.committed),
                str(row.cached),
                str(row.failed),
                str(row.skipped),
                str(row.retrying),
                _clock(row.elapsed()),
                row.eta(),
                style=style,
            )
        return table


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"

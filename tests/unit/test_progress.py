"""The plain-line display (off a terminal): budgets, tune changes and lane moves are told,
lane moves at most once per interval; the forecast appears after three instances ran."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from phalanx import (
    AttemptRecord,
    BudgetReached,
    InstanceEnded,
    InstanceResult,
    LanePaused,
    LimitChanged,
    RunStarted,
    StageStarted,
    Usage,
)
from phalanx.report.progress import Progress


def _ended(key: str, cost: float) -> InstanceEnded:
    attempt = AttemptRecord(1, 0.0, 1.0, usage=Usage(requests=1, cost_usd=cost))
    return InstanceEnded(InstanceResult("s", key, "committed", Path(key), (attempt,)))


def test_plain_lines_tell_budgets_tunes_and_lane_moves_sparingly() -> None:
    stream = io.StringIO()
    progress = Progress(stream, live=False, interval=60.0)
    with progress:
        progress(RunStarted("r1", "p", ("s",), (10,)))
        progress(StageStarted("s", 10, 4))
        progress(LimitChanged("s", None, 4, 8, "tune"))
        progress(LimitChanged(None, "anthropic m", 4, 5, "increase"))
        progress(LimitChanged(None, "anthropic m", 5, 2, "decrease"))  # within the interval
        progress(LanePaused("anthropic m", 1.0))
        progress(BudgetReached("s", "the run budget of $1 is spent ($1.0200)"))
    text = stream.getvalue()
    assert "stage s: concurrency 4 -> 8 (tune)" in text
    assert "lane anthropic m: limit 4 -> 5 (increase)" in text
    assert "5 -> 2" not in text  # a second lane line within the interval is held back
    assert "pausing" not in text
    assert "stage s: no new attempts: the run budget of $1 is spent ($1.0200)" in text
    assert progress.lanes == {"anthropic m": 2}


def test_the_forecast_needs_three_instances_then_extrapolates() -> None:
    progress = Progress(io.StringIO(), live=False)
    progress(RunStarted("r1", "p", ("s",), (10,)))
    progress(StageStarted("s", 10, 4))
    progress.started = 100.0
    progress(_ended("a", 0.5))
    progress(_ended("b", 0.5))
    assert progress.forecast(now=110.0) is None
    progress(_ended("c", 0.5))
    # $1.50 for 3 of 10, and 10 s for 3: about $5 in all and 23 s to go
    assert progress.forecast(now=110.0) == "forecast: ~$5.00 in all, ~0:23 to go"


def test_the_live_view_lists_the_longest_running_attempts_in_flight() -> None:
    """On a terminal the display lists the attempts in flight, longest running first, with
    their attempt, elapsed time and runner; an attempt that ended leaves the list."""
    from phalanx import AttemptEnded, AttemptStarted

    stream = io.StringIO()
    progress = Progress(stream, live=False)
    progress(RunStarted("r1", "p", ("s",), (3,)))
    progress(StageStarted("s", 3, 4, "anthropic"))
    for key in ("a", "b", "c"):
        progress(AttemptStarted("s", key, 1))
    progress.inflight["s", "b"] = (2, progress.inflight["s", "b"][1] - 100.0)  # the oldest
    progress(AttemptEnded("s", "c", 1, 0.1, None, "", None))

    console = Console(file=io.StringIO(), width=100)
    console.print(progress.inflight_table())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "in flight: 2, longest running first" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("s ")]
    assert [row[:3] for row in rows] == [["s", "b", "2"], ["s", "a", "1"]]
    assert rows[0][-1] == "anthropic"
    assert rows[0][3].startswith("1:4")  # 100 s and a little


def test_a_terminal_run_draws_without_error(tmp_path: Path) -> None:
    """The live display, drawn into a fake terminal through a real run."""
    import asyncio

    from phalanx import InstanceContext, fan_out

    stream = io.StringIO()
    progress = Progress(stream, live=True)

    async def agent(ctx: InstanceContext) -> None:
        await asyncio.sleep(0.01)
        (ctx.output_dir / "out.txt").write_text(ctx.key)

    with progress:
        stage = asyncio.run(
            fan_out(["a", "b"], agent, output="out/{PARTITION_KEY}/", project_dir=tmp_path,
                    on_event=progress)
        )  # fmt: skip
    assert stage.committed == 2
    # the last frame: 2 total, 0 running, 2 committed, nothing left in flight
    assert re.search(r"fan-out\s+2\s+0\s+2\s+0\s+0\s+0", stream.getvalue())
    assert "in flight" not in stream.getvalue().rsplit("fan-out", 1)[1]

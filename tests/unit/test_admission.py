"""Admission beyond a fixed cap: waves, priority (partitions, stages, the priority barrier),
budgets (stopping admission exactly, resumed under a new budget), live tuning through the
control file, and the resource guard of process agents."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from phalanx import (
    Budget,
    BudgetReached,
    Event,
    InstanceContext,
    LimitChanged,
    RunHandle,
    Usage,
    fan_out,
    load_pipeline,
    plan_pipeline,
    resume_run,
    run_pipeline,
    run_plan,
)
from phalanx._admission import Control, ResourceGuard, Spending, request_change
from phalanx._config import Guard
from phalanx.runners.python import PythonRunner

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory


def _log_agent(
    log: list[tuple[str, str]], delay: float = 0.005
) -> Callable[[InstanceContext], Awaitable[None]]:
    async def agent(ctx: InstanceContext) -> None:
        log.append(("start", ctx.key))
        await asyncio.sleep(delay)
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        log.append(("end", ctx.key))

    return agent


def test_waves_run_strictly_one_after_another(tmp_path: Path) -> None:
    """``waves: 3`` over 10 partitions: four batches in plan order, and no instance of a
    batch starts before every instance of the previous one has ended."""
    log: list[tuple[str, str]] = []
    keys = [f"k{n:02d}" for n in range(10)]
    stage = asyncio.run(
        fan_out(
            keys,
            _log_agent(log),
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            concurrency=10,
            waves=3,
        )
    )
    assert stage.committed == 10
    waves = [keys[0:3], keys[3:6], keys[6:9], keys[9:10]]
    position = {entry: n for n, entry in enumerate(log)}
    for earlier, later in itertools.pairwise(waves):
        last_end = max(position[("end", key)] for key in earlier)
        first_start = min(position[("start", key)] for key in later)
        assert last_end < first_start, (earlier, later, log)
    # inside a wave the instances do overlap: a wave is a batch, not a queue
    first = [position[("start", key)] for key in waves[0]]
    assert max(first) < min(position[("end", key)] for key in waves[0])


def test_without_waves_slots_refill_at_once(tmp_path: Path) -> None:
    """The default is a sliding window: with concurrency 2, the third instance starts as soon
    as the (quick) first one ends, while the slow second one still runs."""
    log: list[tuple[str, str]] = []
    c_ended = asyncio.Event()

    async def agent(ctx: InstanceContext) -> None:
        log.append(("start", ctx.key))
        if ctx.key == "b":
            await c_ended.wait()  # b runs until c has come and gone
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        log.append(("end", ctx.key))
        if ctx.key == "c":
            c_ended.set()

    stage = asyncio.run(
        fan_out(
            ["a", "b", "c"],
            agent,
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            concurrency=2,
        )
    )
    assert stage.committed == 3
    assert log.index(("start", "c")) < log.index(("end", "b"))


def test_priority_barrier_finishes_each_level_before_the_next(tmp_path: Path) -> None:
    """``priority_barrier``: every partition of the highest priority ends before any of the
    next level starts, whatever the concurrency."""
    log: list[tuple[str, str]] = []
    rows = [{"id": f"p{n}", "priority": level} for n, level in enumerate([0, 2, 1, 2, 0, 1, 1])]
    stage = asyncio.run(
        fan_out(
            rows,
            _log_agent(log),
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            key="id",
            concurrency=8,
            priority_barrier=True,
        )
    )
    assert stage.committed == 7
    levels: dict[int, list[str]] = {}
    for row in rows:
        levels.setdefault(int(str(row["priority"])), []).append(str(row["id"]))
    position = {entry: n for n, entry in enumerate(log)}
    for high, low in ((2, 1), (1, 0)):
        assert max(position[("end", k)] for k in levels[high]) < min(
            position[("start", k)] for k in levels[low]
        )


def test_a_higher_priority_stage_takes_the_run_slots_first(make_project: ProjectFactory) -> None:
    """Two independent stages share a run-wide cap of one slot: once the first instance
    (admitted before anything waited) ends, every instance of the stage with ``priority: 5``
    runs before the remaining ones of the other stage."""
    project = make_project(
        {
            "name": "ranked",
            "concurrency": 1,
            "defaults": {"runner": {"type": "python", "function": "unused:agent"}},
            "stages": [
                {
                    "name": "low",
                    "partitions": {"items": ["l1", "l2", "l3"]},
                    "output": "data/low/{PARTITION_KEY}/",
                },
                {
                    "name": "high",
                    "priority": 5,
                    "partitions": {"items": ["h1", "h2", "h3"]},
                    "output": "data/high/{PARTITION_KEY}/",
                },
            ],
        }
    )
    started: list[str] = []

    async def agent(ctx: InstanceContext) -> None:
        started.append(ctx.key)
        await asyncio.sleep(0.005)
        (ctx.output_dir / "out.txt").write_text(ctx.key)

    plan = plan_pipeline(load_pipeline(project.pipeline))
    runner = PythonRunner(agent)
    result = asyncio.run(run_plan(plan, runners={"low": runner, "high": runner}))
    assert result.ok
    rest = started[1:]
    highs = [n for n, key in enumerate(rest) if key.startswith("h")]
    lows = [n for n, key in enumerate(rest) if key.startswith("l")]
    assert max(highs) < min(lows), started


def _spender(tokens: int) -> Callable[[InstanceContext], Awaitable[None]]:
    async def agent(ctx: InstanceContext) -> None:
        ctx.usage.add(Usage(requests=1, input_tokens=tokens))
        (ctx.output_dir / "out.txt").write_text(ctx.key)

    return agent


def test_a_token_budget_stops_admission_exactly(tmp_path: Path) -> None:
    """Each instance uses 100 tokens; a budget of 1,000 with one slot lets exactly ten run:
    the rest are skipped with reason ``budget``, and the stop is announced once."""
    events: list[Event] = []
    keys = [f"k{n:02d}" for n in range(25)]
    stage = asyncio.run(
        fan_out(
            keys,
            _spender(100),
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            concurrency=1,
            budget=Budget(tokens=1000),
            on_event=events.append,
        )
    )
    assert stage.committed == 10
    skipped = [i for i in stage.instances if i.status == "skipped"]
    assert len(skipped) == 15
    assert {i.reason for i in skipped} == {"budget"}
    assert "1000 tokens" in skipped[0].message
    assert [i.key for i in stage.instances if i.status == "committed"] == keys[:10]
    reached = [e for e in events if isinstance(e, BudgetReached)]
    assert len(reached) == 1
    assert not (tmp_path / "out" / "k10").exists()


def test_a_dollar_budget_counts_failed_attempts_and_stops_retries(tmp_path: Path) -> None:
    """Spending of failed attempts counts; once the budget is spent a failed instance is not
    retried but skipped (budget), its attempts kept."""

    async def agent(ctx: InstanceContext) -> None:
        ctx.usage.add(Usage(requests=1, cost_usd=0.5))
        raise RuntimeError("the model said no")

    stage = asyncio.run(
        fan_out(
            ["a"],
            agent,
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            concurrency=1,
            retries=5,
            budget=Budget(usd=1.0),
        )
    )
    (only,) = stage.instances
    assert only.status == "skipped"
    assert only.reason == "budget"
    assert len(only.attempts) == 2  # $0.50 each: the third would start past $1


def test_resume_continues_a_budget_stop_under_a_new_budget(make_project: ProjectFactory) -> None:
    """A run stopped by its budget resumes under a new one: the skipped partitions run, the
    committed ones are kept, and the run ends ok."""
    project = make_project(
        {
            "name": "budgeted",
            "budget": {"tokens": 500},
            "defaults": {"runner": {"type": "python", "function": "spend:agent"}, "concurrency": 1},
            "stages": [
                {
                    "name": "work",
                    "partitions": {"items": [f"k{n}" for n in range(12)]},
                    "output": "out/{PARTITION_KEY}/",
                }
            ],
        },
        files={
            "spend.py": (
                "from phalanx import Usage\n\n"
                "def agent(ctx):\n"
                "    ctx.usage.add(Usage(requests=1, output_tokens=100))\n"
                "    (ctx.output_dir / 'out.txt').write_text(ctx.key)\n"
            )
        },
    )
    first = asyncio.run(run_pipeline(project.pipeline))
    (stage,) = first.stages
    assert (stage.committed, stage.skipped) == (5, 7)
    assert not first.ok

    again = asyncio.run(resume_run(project.root, first.run_id, budget=Budget(tokens=10_000)))
    (stage,) = again.stages
    assert again.ok
    assert stage.committed == 12  # five kept from before the stop, seven run now
    assert sorted(p.name for p in (project.root / "out").iterdir()) == sorted(
        f"k{n}" for n in range(12)
    )


def test_spending_reports_the_budget_it_crossed() -> None:
    spending = Spending(Budget(usd=2.0, tokens=50), "run")
    assert spending.reached() is None
    spending.add(Usage(input_tokens=30, cache_read_tokens=20))
    assert spending.reached() == "the run budget of 50 tokens is spent (50)"
    priced = Spending(Budget(usd=2.0), "stage 'x'")
    priced.add(Usage(cost_usd=2.5))
    assert priced.reached() == "the stage 'x' budget of $2 is spent ($2.5000)"


def test_live_tuning_raises_the_limit_of_a_running_run(tmp_path: Path) -> None:
    """A run started at concurrency 1 holds its first instance until the run has been tuned
    to 4 and four instances are in flight at once; the change is announced as an event."""
    events: list[Event] = []
    running = 0
    peak = 0
    tuned = asyncio.Event()
    four = asyncio.Event()

    async def agent(ctx: InstanceContext) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if peak >= 4:
            four.set()
        if not tuned.is_set():
            run_dir = tmp_path / ".phalanx" / "runs" / ctx.run_id
            request_change(run_dir, concurrency=4, stage=None)
            tuned.set()
        if ctx.key == "k0":
            async with asyncio.timeout(30):  # generous: the run polls every 10 ms
                await four.wait()
        await asyncio.sleep(0.01)
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        running -= 1

    async def main() -> None:
        from phalanx._api import _one_stage_plan

        plan = _one_stage_plan(
            [f"k{n}" for n in range(8)],
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            name="tuned",
            key=None,
            blueprint=None,
            prompt="inline",
            params=None,
            expect=(),
            concurrency=1,
            retries=0,
            timeout=60.0,
            backoff=None,
            min_success=1.0,
            on_failure="continue",
            notes="wip/notes.md",
        )
        result = await run_plan(
            plan,
            runners={"tuned": PythonRunner(agent)},
            on_event=events.append,
            control_interval=0.01,
        )
        assert result.ok

    asyncio.run(main())
    assert peak >= 4
    changes = [e for e in events if isinstance(e, LimitChanged)]
    assert [(c.stage, c.old, c.new, c.reason) for c in changes] == [("tuned", 1, 4, "tune")]


def test_the_control_file_is_read_once_per_change(tmp_path: Path) -> None:
    control = Control(tmp_path)
    assert control.poll() == []
    request_change(tmp_path, concurrency=3, stage="a")
    (first,) = control.poll()
    assert (first.seq, first.concurrency, first.stage) == (1, 3, "a")
    assert control.poll() == []
    request_change(tmp_path, concurrency=9, stage=None)
    (second,) = control.poll()
    assert (second.seq, second.concurrency, second.stage) == (2, 9, None)
    # a resumed run starts from its configured limits: old changes are history
    assert Control(tmp_path).poll() == []


class _FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps = 0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.t += seconds
        await asyncio.sleep(0)


def test_the_resource_guard_holds_back_past_one_per_core_while_memory_is_short() -> None:
    """One instance per core is always admitted; beyond that the guard waits while memory
    is short and admits once the probe reports enough again."""
    clock = _FakeClock()
    readings = iter([(100.0, 0.0)] * 3 + [(4096.0, 0.0)] * 100)
    guard = ResourceGuard(cores=2, probe=lambda: next(readings), clock=clock, interval=1.0)
    rule = Guard(min_free_memory_mb=512)

    async def main() -> None:
        await guard.admit(rule)
        await guard.admit(rule)  # two cores: both admitted without asking
        assert clock.sleeps == 0
        await guard.admit(rule)  # short of memory for three readings, then admitted
        assert guard.running == 3
        assert clock.sleeps == 3
        assert guard.waited == 1

    asyncio.run(main())


def test_the_resource_guard_refuses_over_the_load_limit() -> None:
    clock = _FakeClock()
    loads = iter([5.0, 5.0, 5.0, 0.5])
    guard = ResourceGuard(cores=1, probe=lambda: (1e9, next(loads)), clock=clock, interval=1.0)

    async def main() -> None:
        await guard.admit(Guard(max_load=1.0))
        await guard.admit(Guard(max_load=1.0))
        assert clock.sleeps == 3
        guard.release()
        guard.release()
        assert guard.running == 0

    asyncio.run(main())


def test_a_command_stage_is_guarded_and_auto_is_its_ceiling(make_project: ProjectFactory) -> None:
    """``concurrency: auto`` on a process agent means the run's cap under the guard; a
    python agent has nothing to adapt to and keeps the default; ``guard: false`` turns it
    off."""
    project = make_project(
        {
            "name": "guarded",
            "concurrency": 40,
            "stages": [
                {
                    "name": "cmd",
                    "partitions": ["a"],
                    "output": "o/{PARTITION_KEY}/",
                    "runner": make_project.runner("ok"),
                    "concurrency": "auto",
                },
                {
                    "name": "free",
                    "partitions": ["a"],
                    "output": "f/{PARTITION_KEY}/",
                    "runner": make_project.runner("ok"),
                    "guard": False,
                },
                {
                    "name": "py",
                    "partitions": ["a"],
                    "output": "p/{PARTITION_KEY}/",
                    "runner": {"type": "python", "function": "x:y"},
                    "concurrency": "auto",
                },
            ],
        }
    )
    plan = plan_pipeline(load_pipeline(project.pipeline))
    cmd, free, py = plan.stages
    assert (cmd.auto, cmd.concurrency, cmd.guard) == (True, 40, Guard())
    assert free.guard is None
    assert (py.auto, py.concurrency, py.guard) == (False, 16, None)


@pytest.mark.parametrize("value", [0, -1, "fast", 2.5, True])
def test_bad_concurrency_is_refused_with_the_field(
    make_project: ProjectFactory, value: object
) -> None:
    project = make_project(
        {
            "name": "bad",
            "stages": [
                {
                    "name": "s",
                    "partitions": ["a"],
                    "output": "o/{PARTITION_KEY}/",
                    "runner": {"type": "python", "function": "x:y"},
                    "concurrency": value,
                }
            ],
        }
    )
    from phalanx import PipelineError

    with pytest.raises(PipelineError, match="concurrency"):
        load_pipeline(project.pipeline)


def test_stop_during_waves_skips_the_rest(tmp_path: Path) -> None:
    """Stopping between waves starts no further wave."""
    handle = RunHandle()
    started: Counter[str] = Counter()

    async def agent(ctx: InstanceContext) -> None:
        started[ctx.key] += 1
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        if ctx.key == "k1":
            handle.stop("enough")

    stage = asyncio.run(
        fan_out(
            [f"k{n}" for n in range(6)],
            agent,
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            concurrency=2,
            waves=2,
            handle=handle,
        )
    )
    assert set(started) <= {"k0", "k1"}
    assert stage.skipped >= 4


def test_a_run_handle_tunes_a_running_run(tmp_path: Path) -> None:
    """``RunHandle.tune`` from the Python side: the first instance raises the limit from 1 to
    3 and waits until three run at once; the change is an event."""
    handle = RunHandle()
    events: list[Event] = []
    running = 0
    three = asyncio.Event()

    async def agent(ctx: InstanceContext) -> None:
        nonlocal running
        running += 1
        if running >= 3:
            three.set()
        if ctx.key == "k0":
            handle.tune(3)
            async with asyncio.timeout(30):
                await three.wait()
        await asyncio.sleep(0.005)
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        running -= 1

    stage = asyncio.run(
        fan_out(
            [f"k{n}" for n in range(6)],
            agent,
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            concurrency=1,
            handle=handle,
            on_event=events.append,
        )
    )
    assert stage.committed == 6
    assert [(e.old, e.new) for e in events if isinstance(e, LimitChanged)] == [(1, 3)]
    with pytest.raises(RuntimeError, match="nothing to tune"):
        handle.tune(2)

"""The scheduler: backoff with full jitter, retries, priority, concurrency limits, plan-order
outcomes, stopping, and runner bugs caught at the instance boundary."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from phalanx import (
    AttemptEnded,
    AttemptStarted,
    Backoff,
    Event,
    InstanceContext,
    InstanceEnded,
    RunHandle,
    Runner,
    StageResult,
    fan_out,
    load_pipeline,
    plan_pipeline,
    run_plan,
)
from phalanx._scheduler import backoff_delay
from phalanx.runners.python import PythonRunner

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory


@pytest.mark.parametrize(("base", "cap"), [(0.5, 4.0), (1.0, 60.0), (0.01, 0.02), (3.0, 1.0)])
def test_backoff_delay_draws_within_full_jitter_bounds(base: float, cap: float) -> None:
    """``backoff_delay`` draws from ``[0, min(max, base * 2**(attempt-1))]``: never outside,
    spread over the whole range (not a constant), and the same sequence for the same seed."""
    policy = Backoff(base=base, max=cap)
    rng = random.Random(1234)  # noqa: S311 - jitter under test, not a secret
    for attempt in range(1, 12):
        ceiling = min(cap, base * 2 ** (attempt - 1))
        draws = [backoff_delay(policy, attempt, rng) for _ in range(400)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > 0.9 * ceiling
        assert min(draws) < 0.1 * ceiling
    one, two = (random.Random(99) for _ in range(2))  # noqa: S311 - jitter, not a secret
    first = [backoff_delay(policy, 3, one) for _ in range(20)]
    assert first == [backoff_delay(policy, 3, two) for _ in range(20)]


def test_flaky_agent_commits_on_attempt_3_with_two_notes_entries(tmp_path: Path) -> None:
    """An agent failing twice and then succeeding commits on attempt 3; the notes hold exactly
    two entries for it (1/3 and 2/3, both retrying), and each retry waited a delay within the
    backoff bounds."""
    calls: Counter[str] = Counter()
    events: list[Event] = []

    async def flaky(ctx: InstanceContext) -> None:
        calls[ctx.key] += 1
        assert ctx.attempt == calls[ctx.key]
        if ctx.key == "f" and ctx.attempt < 3:
            raise ConnectionError(f"flaky attempt {ctx.attempt}")
        (ctx.output_dir / "out.txt").write_text(f"{ctx.key} on attempt {ctx.attempt}")

    stage = asyncio.run(
        fan_out(
            ["a", "f"],
            flaky,
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            retries=2,
            backoff=Backoff(base=0.01, max=0.02),
            on_event=events.append,
        )
    )

    f = stage.instances[1]
    assert (f.status, len(f.attempts)) == ("committed", 3)
    assert [a.cause for a in f.attempts] == ["runner-error", "runner-error", None]
    assert (tmp_path / "out" / "f" / "out.txt").read_text() == "f on attempt 3"
    notes = (tmp_path / "wip" / "notes.md").read_text()
    headings = [line for line in notes.splitlines() if line.startswith("## ")]
    assert len(headings) == 2
    assert "· f · attempt 1/3" in headings[0]
    assert "· f · attempt 2/3" in headings[1]
    assert notes.count("action: retrying in") == 2
    assert "ConnectionError: flaky attempt 2" in notes
    delays = [e.retry_in for e in events if isinstance(e, AttemptEnded) and e.key == "f"]
    assert len(delays) == 3
    assert delays[2] is None
    assert 0 <= (delays[0] or 0) <= 0.01
    assert 0 <= (delays[1] or 0) <= 0.02
    assert calls == {"a": 1, "f": 3}


def test_higher_priority_starts_first(tmp_path: Path) -> None:
    """With concurrency 1, partitions start by descending ``priority``; ties keep plan order."""
    started: list[str] = []

    async def record(ctx: InstanceContext) -> None:
        started.append(ctx.key)
        (ctx.output_dir / "out.txt").write_text(ctx.key)

    items: list[dict[str, object]] = [
        {"id": "a", "priority": 1},
        {"id": "b", "priority": 5},
        {"id": "c"},
        {"id": "d", "priority": 5},
        {"id": "e", "priority": -1},
        {"id": "f", "priority": 2.5},
    ]
    stage = asyncio.run(
        fan_out(items, record, output="out/{PARTITION_KEY}/", project_dir=tmp_path, concurrency=1)
    )

    assert started == ["b", "d", "f", "a", "c", "e"]
    assert [i.key for i in stage.instances] == ["a", "b", "c", "d", "e", "f"]


def test_concurrency_limit_is_never_exceeded(tmp_path: Path) -> None:
    """A stage's ``concurrency`` caps how many of its instances run at once, and the cap is
    used (a slot refills when an instance ends)."""
    running = 0
    peak = 0

    async def tracked(ctx: InstanceContext) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        running -= 1

    stage = asyncio.run(
        fan_out(
            range(15), tracked, output="o/{PARTITION_KEY}/", project_dir=tmp_path, concurrency=3
        )
    )

    assert stage.committed == 15
    assert peak == 3


def test_sync_python_agents_run_up_to_the_stage_concurrency(tmp_path: Path) -> None:
    """Plain (sync) python agents run as many at once as the stage's ``concurrency`` allows:
    more agents than asyncio's default executor has threads, each waiting until all of them
    are running, all commit."""
    width = 16 + (os.cpu_count() or 1)
    barrier = threading.Barrier(width, timeout=3)

    def agent(ctx: InstanceContext) -> None:
        barrier.wait()
        (ctx.output_dir / "out.txt").write_text(ctx.key)

    stage = asyncio.run(
        fan_out(
            range(width),
            agent,
            output="o/{PARTITION_KEY}/",
            project_dir=tmp_path,
            concurrency=width,
            retries=0,
        )
    )

    assert stage.committed == width, stage.instances[0].message


def test_global_cap_limits_independent_stages_together(make_project: ProjectFactory) -> None:
    """Two independent stages run side by side, but never more instances at once than the
    pipeline-wide ``concurrency``."""
    project = make_project(
        {
            "name": "cap",
            "concurrency": 2,
            "defaults": {"runner": {"type": "python", "function": "unused:agent"}},
            "stages": [
                {
                    "name": name,
                    "partitions": {"items": [f"{name}{n}" for n in range(6)]},
                    "output": f"data/{name}/{{PARTITION_KEY}}/",
                    "concurrency": 5,
                }
                for name in ("x", "y")
            ],
        }
    )
    running: Counter[str] = Counter()
    peaks: list[int] = []

    async def tracked(ctx: InstanceContext) -> None:
        running[ctx.stage] += 1
        peaks.append(sum(running.values()))
        await asyncio.sleep(0.02)
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        running[ctx.stage] -= 1

    plan = plan_pipeline(load_pipeline(project.pipeline))
    runner = PythonRunner(tracked)
    result = asyncio.run(run_plan(plan, runners={"x": runner, "y": runner}))

    assert result.ok
    assert max(peaks) == 2


def test_outcomes_come_back_in_plan_order(tmp_path: Path) -> None:
    """Instances finishing in reverse order still come back in plan order, each with exactly
    one ``InstanceEnded`` event and one ``AttemptStarted`` per attempt."""
    events: list[Event] = []
    keys = [f"k{n}" for n in range(8)]

    async def reverse(ctx: InstanceContext) -> None:
        await asyncio.sleep(0.01 * (len(keys) - keys.index(ctx.key)))
        (ctx.output_dir / "out.txt").write_text(ctx.key)

    stage = asyncio.run(
        fan_out(
            keys, reverse, output="o/{PARTITION_KEY}/", project_dir=tmp_path, on_event=events.append
        )
    )

    assert [i.key for i in stage.instances] == keys
    ended = [e.result.key for e in events if isinstance(e, InstanceEnded)]
    assert sorted(ended) == keys
    assert len(ended) == len(set(ended))
    assert Counter(e.key for e in events if isinstance(e, AttemptStarted)) == dict.fromkeys(keys, 1)


class _BuggyRunner(Runner):
    """A runner whose own code fails (not an InstanceError) for one key."""

    type = "buggy"

    async def run(self, ctx: InstanceContext) -> None:
        if ctx.key == "b":
            raise KeyError("a bug in the runner")
        (ctx.output_dir / "out.txt").write_text(ctx.key)


def test_a_runner_bug_fails_only_its_instance(tmp_path: Path) -> None:
    """An exception from a runner's own code becomes a ``runner-error`` failure of that
    instance; its siblings commit."""
    stage = asyncio.run(
        fan_out(
            ["a", "b", "c"],
            _BuggyRunner(),
            output="o/{PARTITION_KEY}/",
            project_dir=tmp_path,
            retries=0,
        )
    )

    assert [(i.key, i.status, i.cause) for i in stage.instances] == [
        ("a", "committed", None),
        ("b", "failed", "runner-error"),
        ("c", "committed", None),
    ]
    assert "KeyError" in stage.instances[1].message


def test_async_agent_past_its_timeout_is_cancelled(tmp_path: Path) -> None:
    """An ``async def`` agent running past the timeout is cancelled (its ``finally`` runs),
    fails with cause ``timeout`` and leaves no staging folder; its siblings commit."""
    cleaned: list[str] = []

    async def slow(ctx: InstanceContext) -> None:
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        if ctx.key == "slow":
            try:
                await asyncio.sleep(3600)
            finally:
                cleaned.append(ctx.key)

    stage = asyncio.run(
        fan_out(
            ["fast", "slow"],
            slow,
            output="o/{PARTITION_KEY}/",
            project_dir=tmp_path,
            retries=0,
            timeout=0.3,
        )
    )

    assert [(i.key, i.status, i.cause) for i in stage.instances] == [
        ("fast", "committed", None),
        ("slow", "failed", "timeout"),
    ]
    assert cleaned == ["slow"]
    assert not (tmp_path / "o" / "slow").exists()
    assert not any((tmp_path / ".phalanx" / "staging").rglob("*"))


def test_stop_before_start_skips_everything(tmp_path: Path) -> None:
    """A run whose handle was stopped before it started runs nothing: every instance is
    skipped (``cancelled``) and the result says cancelled."""
    handle = RunHandle()
    handle.stop("test")
    ran: list[str] = []

    async def agent(ctx: InstanceContext) -> None:
        ran.append(ctx.key)

    stage = asyncio.run(
        fan_out(["a", "b"], agent, output="o/{PARTITION_KEY}/", project_dir=tmp_path, handle=handle)
    )

    assert ran == []
    assert [(i.status, i.reason) for i in stage.instances] == [("skipped", "cancelled")] * 2


def test_stop_mid_run_cancels_in_flight_and_keeps_committed(tmp_path: Path) -> None:
    """Stopping a run while some instances are in flight cancels them (skipped as
    ``cancelled``), keeps what already committed, removes every staging folder, and the counts
    still add up."""
    handle = RunHandle()
    committed = asyncio.Event()

    async def agent(ctx: InstanceContext) -> None:
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        if ctx.key.startswith("slow"):
            await asyncio.sleep(3600)

    def on_event(event: Event) -> None:
        if isinstance(event, InstanceEnded) and event.result.status == "committed":
            committed.set()

    async def main() -> StageResult:
        task = asyncio.create_task(
            fan_out(
                ["fast", "slow1", "slow2"],
                agent,
                output="o/{PARTITION_KEY}/",
                project_dir=tmp_path,
                handle=handle,
                on_event=on_event,
            )
        )
        await asyncio.wait_for(committed.wait(), 20)
        await asyncio.sleep(0.05)
        handle.stop("test")
        return await asyncio.wait_for(task, 20)

    stage = asyncio.run(main())

    assert [(i.key, i.status, i.reason) for i in stage.instances] == [
        ("fast", "committed", None),
        ("slow1", "skipped", "cancelled"),
        ("slow2", "skipped", "cancelled"),
    ]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["fast"]
    assert not any((tmp_path / ".phalanx" / "staging").rglob("*"))
    summary = json.loads(next((tmp_path / ".phalanx" / "runs").glob("*/summary.json")).read_text())
    assert summary["cancelled"] is True


def test_stop_skips_downstream_stages_as_cancelled(make_project: ProjectFactory) -> None:
    """A run stopped during its first stage skips the stage after it with the reason
    ``cancelled`` (not ``upstream failed``): nothing failed, the run was stopped."""
    project = make_project(
        {
            "name": "stop",
            "defaults": {"runner": {"type": "python", "function": "unused:agent"}},
            "stages": [
                {"name": "m", "partitions": {"items": ["a", "b"]}, "output": "m/{PARTITION_KEY}/"},
                {"name": "f", "needs": ["m"], "output": "f/{PARTITION_KEY}/"},
            ],
        }
    )
    handle = RunHandle()

    async def agent(ctx: InstanceContext) -> None:
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        if ctx.key == "b":
            handle.stop("test")
            await asyncio.sleep(3600)

    plan = plan_pipeline(load_pipeline(project.pipeline))
    runner = PythonRunner(agent)
    result = asyncio.run(run_plan(plan, handle=handle, runners={"m": runner, "f": runner}))

    assert result.cancelled
    assert not result.ok
    m, f = result.stages
    assert [(i.key, i.status, i.reason) for i in m.instances] == [
        ("a", "committed", None),
        ("b", "skipped", "cancelled"),
    ]
    assert f.skipped_reason == "cancelled"
    assert [(i.status, i.reason) for i in f.instances] == [("skipped", "cancelled")] * 2
    assert "did not run: cancelled" in project.summary("f")

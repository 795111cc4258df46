"""Streaming fan-in: a group starts as soon as every member of that group has ended, never
while one is still pending; ``barrier: stage`` restores strict layers; and the stage result
says how much the overlap saved."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from phalanx import InstanceContext, load_pipeline, plan_pipeline, run_plan
from phalanx.runners.python import PythonRunner

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory

MEMBERS = [
    {"id": "a", "GROUP": "g1"},
    {"id": "b", "GROUP": "g1"},
    {"id": "c", "GROUP": "g2"},
    {"id": "d", "GROUP": "g2"},
]


def _pipeline(barrier: str) -> dict[str, object]:
    return {
        "name": "stream",
        "defaults": {"runner": {"type": "python", "function": "unused:agent"}, "retries": 0},
        "stages": [
            {
                "name": "m",
                "partitions": {"items": MEMBERS, "key": "id"},
                "params": {"GROUP": "{GROUP}"},
                "output": "data/m/{PARTITION_KEY}/",
            },
            {
                "name": "f",
                "needs": ["m"],
                "group_by": "GROUP",
                "barrier": barrier,
                "output": "data/f/{GROUP}/",
            },
        ],
    }


def test_a_group_starts_while_another_groups_member_still_runs(
    make_project: ProjectFactory,
) -> None:
    """Member ``d`` of group g2 keeps running until group g1 (whose members are done) has
    started: so g1 started before the upstream barrier. g2 starts only after ``d`` ended."""
    project = make_project(_pipeline("stream"))
    log: list[str] = []
    g1_started = asyncio.Event()

    async def member(ctx: InstanceContext) -> None:
        log.append(f"start m/{ctx.key}")
        if ctx.key == "d":
            async with asyncio.timeout(30):  # generous: g1 starts within milliseconds
                await g1_started.wait()
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        log.append(f"end m/{ctx.key}")

    async def group(ctx: InstanceContext) -> None:
        log.append(f"start f/{ctx.key}")
        if ctx.key == "g1":
            g1_started.set()
        assert all((ref.path / "out.txt").is_file() for ref in ctx.inputs)
        (ctx.output_dir / "out.txt").write_text(",".join(ref.key for ref in ctx.inputs))
        log.append(f"end f/{ctx.key}")

    plan = plan_pipeline(load_pipeline(project.pipeline))
    result = asyncio.run(
        run_plan(plan, runners={"m": PythonRunner(member), "f": PythonRunner(group)})
    )
    assert result.ok, result.to_json()
    assert log.index("start f/g1") < log.index("end m/d")
    assert log.index("end m/d") < log.index("start f/g2")
    assert (project.root / "data/f/g2/out.txt").read_text() == "c,d"
    flow = result.stage("f").streaming
    assert flow is not None
    assert flow.started_early == 1
    assert flow.early_s > 0


def test_barrier_stage_waits_for_the_whole_upstream_stage(make_project: ProjectFactory) -> None:
    """``barrier: stage``: no group starts before every member of the upstream stage ended."""
    project = make_project(_pipeline("stage"))
    log: list[str] = []

    async def member(ctx: InstanceContext) -> None:
        await asyncio.sleep(0.02 if ctx.key == "d" else 0.0)
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        log.append(f"end m/{ctx.key}")

    async def group(ctx: InstanceContext) -> None:
        log.append(f"start f/{ctx.key}")
        (ctx.output_dir / "out.txt").write_text(ctx.key)

    plan = plan_pipeline(load_pipeline(project.pipeline))
    result = asyncio.run(
        run_plan(plan, runners={"m": PythonRunner(member), "f": PythonRunner(group)})
    )
    assert result.ok
    last_member = max(log.index(f"end m/{m['id']}") for m in MEMBERS)
    first_group = min(log.index(f"start f/{g}") for g in ("g1", "g2"))
    assert last_member < first_group
    assert result.stage("f").streaming is None


def test_a_failed_member_stops_new_groups_but_keeps_committed_ones(
    make_project: ProjectFactory,
) -> None:
    """With the default min_success of 1.0, once a member fails for good the upstream stage
    cannot pass: the group already committed stays, the failed member's group never starts
    and is skipped as upstream failed, naming the threshold."""
    project = make_project(_pipeline("stream"))
    g1_done = asyncio.Event()
    started: list[str] = []

    async def member(ctx: InstanceContext) -> None:
        if ctx.key == "d":
            async with asyncio.timeout(30):
                await g1_done.wait()
            raise RuntimeError("d fails")
        (ctx.output_dir / "out.txt").write_text(ctx.key)

    async def group(ctx: InstanceContext) -> None:
        started.append(ctx.key)
        (ctx.output_dir / "out.txt").write_text(ctx.key)
        if ctx.key == "g1":
            g1_done.set()

    plan = plan_pipeline(load_pipeline(project.pipeline))
    result = asyncio.run(
        run_plan(plan, runners={"m": PythonRunner(member), "f": PythonRunner(group)})
    )
    assert not result.ok
    f = result.stage("f")
    assert started == ["g1"]
    statuses = {inst.key: (inst.status, inst.reason) for inst in f.instances}
    assert statuses == {"g1": ("committed", None), "g2": ("skipped", "upstream failed")}
    (g2,) = [inst for inst in f.instances if inst.key == "g2"]
    assert "missed its threshold" in g2.message
    assert not (project.root / "data/f/g2").exists()


def test_an_upstream_that_does_not_run_skips_the_streaming_stage_whole(
    make_project: ProjectFactory,
) -> None:
    """When the upstream stage fails before any group could start, the streaming stage is
    skipped as a whole, exactly as under strict layers."""
    project = make_project(_pipeline("stream"))

    async def member(ctx: InstanceContext) -> None:
        raise RuntimeError("everything fails")

    async def group(ctx: InstanceContext) -> None:
        raise AssertionError("no group may start")

    plan = plan_pipeline(load_pipeline(project.pipeline))
    result = asyncio.run(
        run_plan(plan, runners={"m": PythonRunner(member), "f": PythonRunner(group)})
    )
    f = result.stage("f")
    assert f.skipped_reason is not None
    assert "missed its threshold" in f.skipped_reason
    assert f.skipped == 2

"""Invariant 6: whatever order instances finish in, a downstream stage sees its inputs (and so
merges files) in the same order: plan order."""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING

from phalanx import load_pipeline, plan_pipeline
from phalanx._databus import MANIFEST

if TYPE_CHECKING:
    from tests.conftest import Project, ProjectFactory

AGENT = """\
import asyncio
import json

_finished = {}


async def member(ctx):
    # Finish in the order finish_order.json gives, whatever order the instances started in.
    order = json.loads((ctx.project_dir / "finish_order.json").read_text())
    done = _finished.setdefault(ctx.run_id, [])
    while len(done) < order.index(ctx.key):
        await asyncio.sleep(0.002)
    payload = {"key": ctx.key, "feature": ctx.params["FEATURE_ID"]}
    (ctx.output_dir / "member.json").write_text(json.dumps(payload))
    done.append(ctx.key)
    with (ctx.project_dir / f"finished-{ctx.run_id}.log").open("a") as log:
        log.write(ctx.key + "\\n")


async def merge(ctx):
    keys = [ref.key for ref in ctx.inputs]
    parts = []
    for ref in ctx.inputs:
        # Skip dotfiles: phalanx's manifest (.phalanx-manifest.json) is in every output.
        for name in sorted(p.name for p in ref.path.iterdir() if not p.name.startswith(".")):
            parts.append(f"== {ref.key}/{name}\\n" + (ref.path / name).read_text() + "\\n")
    (ctx.output_dir / "members.json").write_text(json.dumps(keys))
    (ctx.output_dir / "merged.txt").write_text("".join(parts))
"""

MEMBERS = [f"f{n:02d}" for n in range(12)]
PIPELINE = {
    "name": "agg",
    "defaults": {"runner": {"type": "python", "function": "agg_agent:merge"}, "retries": 0},
    "stages": [
        {
            "name": "m",
            "partitions": {
                "items": [{"id": k, "feature": f"F{n % 3}"} for n, k in enumerate(MEMBERS)]
            },
            "params": {"FEATURE_ID": "{feature}"},
            "output": "data/m/{PARTITION_KEY}/",
            "runner": {"type": "python", "function": "agg_agent:member"},
            "concurrency": 32,
        },
        {"name": "g", "needs": ["m"], "group_by": "FEATURE_ID", "output": "data/g/{FEATURE_ID}/"},
        {"name": "s", "needs": ["m"], "single": True, "output": "data/s/"},
        {"name": "top", "needs": ["g"], "single": True, "output": "data/top/"},
    ],
}


def _snapshot(project: Project) -> dict[str, bytes]:
    data = project.root / "data"
    return {
        path.relative_to(data).as_posix(): path.read_bytes()
        for path in sorted(data.rglob("*"))
        if path.is_file()
        and not path.relative_to(data).as_posix().startswith("m/")
        and path.name != MANIFEST  # names the run that committed it
    }


def test_fan_in_sees_members_in_plan_order_whatever_the_finish_order(
    make_project: ProjectFactory,
) -> None:
    """Members are made to finish in three different orders (two seeded shuffles and the
    reverse of the plan); every run gives a group stage, a single stage over the members and a
    single stage over the groups the same ``ctx.inputs`` order (plan order) and byte-identical
    merged files."""
    project = make_project(PIPELINE, {"agg_agent.py": AGENT})
    plan = plan_pipeline(load_pipeline(project.pipeline))
    expected = {
        f"g/{inst.key}/members.json": [ref.key for ref in inst.inputs]
        for inst in plan.stage("g").instances
    }
    assert expected == {
        "g/F0/members.json": ["f00", "f03", "f06", "f09"],
        "g/F1/members.json": ["f01", "f04", "f07", "f10"],
        "g/F2/members.json": ["f02", "f05", "f08", "f11"],
    }
    expected["s/members.json"] = MEMBERS
    expected["top/members.json"] = ["F0", "F1", "F2"]

    orders = []
    for seed in (1, 2):
        order = list(MEMBERS)
        random.Random(seed).shuffle(order)  # noqa: S311 - a finish order, not a secret
        orders.append(order)
    orders.append(MEMBERS[::-1])
    assert len({tuple(order) for order in [*orders, MEMBERS]}) == 4

    snapshots = []
    for order in orders:
        project.write("finish_order.json", json.dumps(order))
        result = project.run(force=True)  # the same inputs each time: run them all the same
        assert result.ok, [i.message for s in result.stages for i in s.instances if i.message]
        finished = (project.root / f"finished-{result.run_id}.log").read_text().split()
        assert finished == order
        snapshot = _snapshot(project)
        for name, keys in expected.items():
            assert json.loads(snapshot[name]) == keys
        snapshots.append(snapshot)
    assert snapshots[0] == snapshots[1] == snapshots[2]
    merged = snapshots[0]["s/merged.txt"].decode()
    assert [line[3:] for line in merged.splitlines() if line.startswith("== ")] == [
        f"{key}/member.json" for key in MEMBERS
    ]

"""Invariant 4: every partition ends committed, failed (with a cause) or skipped (with a
reason), and the counts add up to N, in every combination of outcomes; ``on_failure: abort`` and
``min_success`` decide what is skipped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from phalanx import InstanceContext, RunResult, fan_out

if TYPE_CHECKING:
    from tests.conftest import Project, ProjectFactory

AGENT = """\
import asyncio
import json


async def run(ctx):
    if ctx.params.get("mode") == "fail":
        raise RuntimeError(f"{ctx.key} fails on purpose")
    await asyncio.sleep(0.001)
    payload = {"key": ctx.key, "inputs": [ref.key for ref in ctx.inputs]}
    (ctx.output_dir / "out.json").write_text(json.dumps(payload))
"""


def layered(
    items: list[dict[str, object]],
    defaults: Mapping[str, object] | None = None,
    **map_settings: object,
) -> dict[str, object]:
    """map ``m`` -> follow ``f`` (key by key) -> single ``all``, all with the python agent;
    ``defaults`` apply to every stage, ``map_settings`` to ``m`` only."""
    return {
        "name": "counts",
        "defaults": {
            "runner": {"type": "python", "function": "agent:run"},
            "retries": 0,
            **(defaults or {}),
        },
        "stages": [
            {
                "name": "m",
                "partitions": {"items": items},
                "output": "data/m/{PARTITION_KEY}/",
                "expect": ["out.json"],
                **map_settings,
            },
            {"name": "f", "needs": ["m"], "output": "data/f/{PARTITION_KEY}/"},
            {"name": "all", "needs": ["f"], "single": True, "output": "data/all/"},
        ],
    }


def _items(failing: str = "", keys: str = "abcd") -> list[dict[str, object]]:
    return [{"id": k, "mode": "fail" if k in failing else "ok"} for k in keys]


def check_counts(project: Project, result: RunResult) -> None:
    """Every stage's counts add up, every instance has one status with its cause or reason, and
    the JSON summary and the Markdown summary say the same."""
    summary = {stage["name"]: stage for stage in result.to_json()["stages"]}  # type: ignore[attr-defined]
    for stage in result.stages:
        assert stage.committed + stage.failed + stage.skipped == stage.total
        assert stage.total == len(stage.instances)
        for inst in stage.instances:
            assert inst.status in {"committed", "failed", "skipped"}
            if inst.status == "failed":
                assert inst.cause
            if inst.status == "skipped":
                assert inst.reason
            assert (inst.status == "committed") == inst.output.is_dir()
        row = summary[stage.name]
        assert (row["total"], row["committed"], row["failed"], row["skipped"]) == (
            stage.total,
            stage.committed,
            stage.failed,
            stage.skipped,
        )
        counts = (
            f"| {stage.total} | {stage.committed} | {stage.cached} | {stage.failed} "
            f"| {stage.skipped} |"
        )
        assert counts in project.summary(stage.name)


def _outcome(result: RunResult) -> dict[str, tuple[int, int, int]]:
    return {s.name: (s.committed, s.failed, s.skipped) for s in result.stages}


def _reasons(result: RunResult) -> dict[str, set[str]]:
    return {
        s.name: {inst.reason or "" for inst in s.instances if inst.status == "skipped"}
        for s in result.stages
    }


@pytest.mark.parametrize(
    ("failing", "defaults", "settings", "outcome", "reasons"),
    [
        pytest.param(
            "",
            {},
            {},
            {"m": (4, 0, 0), "f": (4, 0, 0), "all": (1, 0, 0)},
            {"m": set(), "f": set(), "all": set()},
            id="all-commit",
        ),
        pytest.param(
            "b",
            {},
            {},
            {"m": (3, 1, 0), "f": (0, 0, 4), "all": (0, 0, 1)},
            {"m": set(), "f": {"upstream failed"}, "all": {"upstream failed"}},
            id="one-fails-threshold-missed",
        ),
        pytest.param(
            "b",
            {},
            {"min_success": 0.5},
            {"m": (3, 1, 0), "f": (3, 0, 1), "all": (0, 0, 1)},
            {"m": set(), "f": {"upstream failed"}, "all": {"upstream failed"}},
            id="one-fails-threshold-met-follower-misses",
        ),
        pytest.param(
            "b",
            {"min_success": 0.5},
            {},
            {"m": (3, 1, 0), "f": (3, 0, 1), "all": (1, 0, 0)},
            {"m": set(), "f": {"upstream failed"}, "all": set()},
            id="one-fails-threshold-met",
        ),
        pytest.param(
            "abcd",
            {},
            {"min_success": 0},
            {"m": (0, 4, 0), "f": (0, 0, 4), "all": (0, 0, 1)},
            {"m": set(), "f": {"upstream failed"}, "all": {"upstream failed"}},
            id="all-fail-threshold-zero",
        ),
        pytest.param(
            "b",
            {},
            {"on_failure": "abort", "concurrency": 1},
            {"m": (1, 1, 2), "f": (0, 0, 4), "all": (0, 0, 1)},
            {"m": {"aborted"}, "f": {"upstream failed"}, "all": {"upstream failed"}},
            id="abort",
        ),
    ],
)
def test_counts_add_up_in_every_combination(
    make_project: ProjectFactory,
    failing: str,
    defaults: Mapping[str, object],
    settings: Mapping[str, object],
    outcome: Mapping[str, tuple[int, int, int]],
    reasons: Mapping[str, set[str]],
) -> None:
    """For each combination of committed, failed and skipped (by abort, by an upstream stage
    missing its ``min_success``, by an upstream instance that did not commit), each stage's
    counts add up to its total and every skip has a reason (``aborted: ...`` or ``upstream
    failed``). A follower keeps its own ``min_success`` (default: all), so one skipped follower
    stops the stage after it unless the threshold is lowered there too."""
    project = make_project(layered(_items(failing), defaults, **settings), {"agent.py": AGENT})

    result = project.run()

    check_counts(project, result)
    assert _outcome(result) == outcome
    shortened = {
        name: {"aborted" if r.startswith("aborted") else r for r in found}
        for name, found in _reasons(result).items()
    }
    assert shortened == reasons


@pytest.mark.parametrize(
    ("min_success", "met"),
    [(0.5, True), (0.75, True), (0.8, False), (3, True), (4, False)],
)
def test_min_success_as_fraction_or_count(
    make_project: ProjectFactory, min_success: float, met: bool
) -> None:
    """``min_success`` (set for every stage) is a fraction (0.5 of 4 -> 2 needed) or a count
    (3 -> 3 needed): with 1 of 4 failing, the stage meets it or not, and only when met do
    dependants run (the follower of the failed partition is skipped as ``upstream failed``)."""
    config = layered(_items("c"), {"min_success": min_success})
    project = make_project(config, {"agent.py": AGENT})

    result = project.run()

    check_counts(project, result)
    assert result.stage("m").met_threshold is met
    assert result.ok is met
    if met:
        assert _outcome(result)["f"] == (3, 0, 1)
        skipped = next(i for i in result.stage("f").instances if i.status == "skipped")
        assert (skipped.key, skipped.reason) == ("c", "upstream failed")
        report = json.loads((project.root / "data" / "all" / "out.json").read_text())
        assert report["inputs"] == ["a", "b", "d"]
    else:
        assert _outcome(result)["f"] == (0, 0, 4)
        assert "missed its threshold" in (result.stage("f").skipped_reason or "")
        assert not (project.root / "data" / "f").exists()


def test_abort_cancels_in_flight_agents_cleanly(make_project: ProjectFactory, pids: Path) -> None:
    """With ``on_failure: abort``, the failure of one instance cancels the instances in flight
    (their command agents and children die, their staging folders are removed) and marks them
    and the ones never started as skipped with an ``aborted: ...`` reason; nothing is
    committed; the queued agents never start."""
    runner = make_project.runner(
        "--pids", str(pids), "--wait-for", "3", "write", "bad=failafter", "h1=hang", "h2=hang",
        kill_grace="0.5s",
    )  # fmt: skip
    keys = ["bad", "h1", "h2", "q1", "q2", "q3"]
    project = make_project(
        {
            "name": "abort",
            "stages": [
                {
                    "name": "s",
                    "partitions": {"items": [{"id": k} for k in keys]},
                    "output": "data/{PARTITION_KEY}/",
                    "expect": ["out.json"],
                    "runner": runner,
                    "retries": 0,
                    "concurrency": 3,
                    "on_failure": "abort",
                }
            ],
        }
    )

    stage = project.run().stage("s")

    status = {i.key: i.status for i in stage.instances}
    assert status == {"bad": "failed"} | dict.fromkeys(keys[1:], "skipped")
    assert all((i.reason or "").startswith("aborted: 'bad' failed") for i in stage.instances[1:])
    recorded = project.recorded()
    assert sorted(recorded) == ["bad", "h1", "h2"]
    assert project.survivors([*recorded["h1"], *recorded["h2"]]) == []
    assert project.staging_leftovers() == []
    assert not (project.root / "data").exists() or project.dirs("data") == []
    assert (stage.committed, stage.failed, stage.skipped) == (0, 1, 5)


def test_a_thousand_partitions_all_commit(tmp_path: Path) -> None:
    """1,000 partitions through the python runner: all commit, the counts add up, and each
    output holds that partition's own result."""

    async def double(ctx: InstanceContext) -> None:
        value = int(str(ctx.params["n"]))
        payload = {"key": ctx.key, "double": value * 2}
        (ctx.output_dir / "v.json").write_text(json.dumps(payload), encoding="utf-8")

    items = [{"id": f"p{n:04d}", "n": n} for n in range(1000)]
    stage = asyncio.run(
        fan_out(items, double, output="out/{PARTITION_KEY}/", project_dir=tmp_path, concurrency=64)
    )

    assert (stage.total, stage.committed, stage.failed, stage.skipped) == (1000, 1000, 0, 0)
    assert [i.key for i in stage.instances] == [item["id"] for item in items]
    for n in range(1000):
        data = json.loads((tmp_path / "out" / f"p{n:04d}" / "v.json").read_text())
        assert data == {"key": f"p{n:04d}", "double": 2 * n}
    assert len(list((tmp_path / "out").iterdir())) == 1000

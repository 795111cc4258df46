"""The contract every backend keeps, run against ``local``, ``process`` and ``ray`` (a real
local Ray cluster with a head and a worker node): each instance writes only its own staging
folder, outputs are validated and committed in the orchestrator's data bus exactly once,
fan-in sees its members' committed outputs in plan order, failed attempts are retried, a dead
worker is a retried ``worker-lost`` attempt, a timeout stops the attempt, and the counts add
up."""

from __future__ import annotations

import json
import sqlite3
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from phalanx import RunResult

if TYPE_CHECKING:
    from tests.conftest import Project, ProjectFactory

BACKENDS = ["local", "process", "ray"]

AGENTS = textwrap.dedent(
    '''
    """Agents for the backend contract: behaviour chosen by the partition's ``mode``."""
    import json
    import os
    import time
    from pathlib import Path


    def work(ctx):
        mode = ctx.params.get("mode", "write")
        out = ctx.output_dir
        if mode == "fail_once" and ctx.attempt == 1:
            raise RuntimeError(f"first attempt of {ctx.key} fails")
        if mode == "die_once" and ctx.attempt == 1:
            os._exit(7)
        if mode == "sleepy":
            Path(ctx.params["marker"] + ".asleep").write_text(str(time.time()))
            time.sleep(15)
            Path(ctx.params["marker"]).write_text("still ran")
        if mode == "badjson":
            (out / "out.json").write_text("{not json")
            return
        if mode == "symlink":
            os.symlink("/etc/hostname", out / "link")
        (out / "out.json").write_text(json.dumps({
            "key": ctx.key, "attempt": ctx.attempt, "pid": os.getpid(),
            "listing_before": sorted(os.listdir(out)),
        }))


    def gather(ctx):
        members = []
        for ref in ctx.inputs:
            members.append(json.loads((ref.path / "out.json").read_text())["key"])
        (ctx.output_dir / "out.json").write_text(json.dumps({"members": members}))
    '''
)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The pipeline's ``backend:`` setting for each backend under test."""
    if request.param == "ray":
        cluster = request.getfixturevalue("ray_cluster")
        return {"type": "ray", "address": cluster.address}
    if request.param == "process":
        return {"type": "process", "workers": 2}
    return {"type": "local"}


def _project(
    make_project: ProjectFactory,
    backend: dict[str, Any],
    items: list[dict[str, Any]],
    *,
    group: bool = False,
    **stage: Any,
) -> Project:
    stages: list[dict[str, Any]] = [
        {
            "name": "s",
            "partitions": items,
            "output": "data/{PARTITION_KEY}/",
            "expect": ["out.json"],
            "runner": {"type": "python", "function": "agents:work"},
            "retries": 1,
            "backoff": {"base": 0.01, "max": 0.05},
            **stage,
        }
    ]
    if group:
        stages.append(
            {
                "name": "g",
                "group_by": {"stage": "s", "field": "team"},
                "needs": ["s"],
                "output": "groups/{team}/",
                "expect": ["out.json"],
                "runner": {"type": "python", "function": "agents:gather"},
            }
        )
    pipeline = {"name": "contract", "backend": backend, "stages": stages}
    return make_project(pipeline, {"agents.py": AGENTS})


def _attempts(project: Project) -> list[tuple[str, str, int, str, str | None]]:
    with sqlite3.connect(project.root / ".phalanx" / "ledger.db") as conn:
        return conn.execute(
            "SELECT stage, key, attempt, outcome, cause FROM attempts ORDER BY stage, key, attempt"
        ).fetchall()


def _counts_add_up(result: RunResult) -> None:
    for stage in result.stages:
        assert stage.committed + stage.cached + stage.failed + stage.skipped == stage.total


def test_outputs_are_isolated_committed_once_and_fanned_in(
    make_project: ProjectFactory, backend: dict[str, Any]
) -> None:
    keys = [f"k{i:02d}" for i in range(12)]
    items = [{"id": key, "team": "ab"[i % 2]} for i, key in enumerate(keys)]
    project = _project(make_project, backend, items, group=True)
    result = project.run()
    _counts_add_up(result)
    assert result.ok
    assert [(s.name, s.committed) for s in result.stages] == [("s", 12), ("g", 2)]
    for key in keys:
        folder = project.root / "data" / key
        written = json.loads((folder / "out.json").read_text())
        assert written["key"] == key
        assert written["listing_before"] == []  # a private, empty staging folder each
        assert sorted(p.name for p in folder.iterdir()) == [".phalanx-manifest.json", "out.json"]
    members = {
        team: json.loads((project.root / "groups" / team / "out.json").read_text())["members"]
        for team in "ab"
    }
    assert members == {"a": keys[0::2], "b": keys[1::2]}  # plan order, whatever the finish order
    assert [row[3] for row in _attempts(project)] == ["committed"] * 14  # exactly once each
    assert project.staging_leftovers() == []


def test_invalid_outputs_are_refused_in_the_orchestrator(
    make_project: ProjectFactory, backend: dict[str, Any]
) -> None:
    items = [{"id": "good"}, {"id": "bad", "mode": "badjson"}, {"id": "link", "mode": "symlink"}]
    project = _project(make_project, backend, items, retries=0)
    result = project.run()
    _counts_add_up(result)
    (stage,) = result.stages
    causes = {inst.key: inst.cause for inst in stage.instances}
    assert causes == {"good": None, "bad": "output-invalid", "link": "confinement"}
    assert not (project.root / "data" / "bad").exists()
    assert not (project.root / "data" / "link").exists()
    assert project.staging_leftovers() == []


def test_failed_attempts_are_retried(make_project: ProjectFactory, backend: dict[str, Any]) -> None:
    items = [{"id": "a"}, {"id": "b", "mode": "fail_once"}]
    project = _project(make_project, backend, items)
    result = project.run()
    _counts_add_up(result)
    assert result.ok
    assert _attempts(project) == [
        ("s", "a", 1, "committed", None),
        ("s", "b", 1, "failed", "runner-error"),
        ("s", "b", 2, "committed", None),
    ]
    assert json.loads((project.root / "data/b/out.json").read_text())["attempt"] == 2


def test_a_dead_worker_is_a_retried_attempt(
    make_project: ProjectFactory, backend: dict[str, Any]
) -> None:
    if backend["type"] == "local":
        pytest.skip("on the local backend the agent's process is the orchestrator itself")
    items = [{"id": "a"}, {"id": "b", "mode": "die_once"}, {"id": "c"}]
    project = _project(make_project, backend, items)
    result = project.run()
    _counts_add_up(result)
    assert result.ok
    rows = _attempts(project)
    assert ("s", "b", 1, "failed", "worker-lost") in rows
    assert ("s", "b", 2, "committed", None) in rows
    assert len(rows) == 4


def test_a_timeout_stops_the_attempt(
    make_project: ProjectFactory, backend: dict[str, Any], tmp_path: Path
) -> None:
    """The attempt ends at its timeout, not when the agent would have (15 s later), and on
    process and ray the agent is stopped: it never wakes up to write its marker."""
    marker = tmp_path / "marker"
    items = [{"id": "slow", "mode": "sleepy", "marker": str(marker)}]
    project = _project(make_project, backend, items, retries=0, timeout=3)
    project.run()
    ((cause, duration, started),) = [
        row[3:] for row in _attempt_times(project) if row[:3] == ("s", "slow", 1)
    ]
    assert cause == "timeout"
    assert duration < 12, f"the attempt lasted {duration:.1f}s: it waited for the agent"
    if backend["type"] == "local":
        return  # a sync agent's thread cannot be stopped in-process: that is what process is for
    # Past the moment the agent would have woken: 15 s after it fell asleep, plus a margin.
    asleep = float(Path(f"{marker}.asleep").read_text())
    assert asleep >= started - 1
    time.sleep(max(0.0, asleep + 16.5 - time.time()))
    assert not marker.exists()


def _attempt_times(project: Project) -> list[tuple[str, str, int, str | None, float, float]]:
    with sqlite3.connect(project.root / ".phalanx" / "ledger.db") as conn:
        return conn.execute(
            "SELECT stage, key, attempt, cause, duration_s, started FROM attempts"
        ).fetchall()

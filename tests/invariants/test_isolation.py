"""Invariant 3: one instance failing (error, crash, timeout, invalid output) never stops or
corrupts the others."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from phalanx import InstanceContext, fan_out

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory

KEYS = [f"k{n:02d}" for n in range(20)]


def test_command_failures_do_not_touch_siblings(make_project: ProjectFactory, pids: Path) -> None:
    """In one stage of 20 command agents, one raising (exit 1), one killed by SIGKILL and one
    hanging past the timeout fail with their own causes; the 17 others commit with the right
    content, and the hanging agent and its child are dead afterwards."""
    runner = make_project.runner(
        "--pids", str(pids), "write", "k03=raise", "k07=crash", "k11=hang", kill_grace="0.5s"
    )
    project = make_project(
        {
            "name": "iso",
            "stages": [
                {
                    "name": "s",
                    "partitions": {"items": [{"id": k} for k in KEYS]},
                    "output": "data/{PARTITION_KEY}/",
                    "expect": ["out.json", "notes.md"],
                    "runner": runner,
                    "retries": 0,
                    "timeout": "3s",
                    "concurrency": 20,
                }
            ],
        }
    )

    stage = project.run().stage("s")

    failed = {i.key: i.cause for i in stage.instances if i.status == "failed"}
    assert failed == {"k03": "runner-error", "k07": "runner-error", "k11": "timeout"}
    messages = {i.key: i.message for i in stage.instances}
    assert "exited with code 1" in messages["k03"]
    assert "killed by signal 9" in messages["k07"]
    assert (stage.committed, stage.failed, stage.skipped) == (17, 3, 0)
    assert project.dirs("data") == sorted(set(KEYS) - set(failed))
    for key in set(KEYS) - set(failed):
        out = project.root / "data" / key
        assert json.loads((out / "out.json").read_text()) == {"key": key, "attempt": "1"}
        assert (out / "notes.md").read_text() == f"# {key}\n"
    assert project.survivors(project.recorded()["k11"]) == []
    assert "RuntimeError: agent k03 raised on purpose" in project.entries("k03")[0]


async def _python_agent(ctx: InstanceContext) -> None:
    if ctx.key == "k02":
        raise ValueError("bad input for k02")
    if ctx.key == "k05":
        await asyncio.sleep(3600)
    if ctx.key == "k09":
        return  # writes nothing: invalid output
    if ctx.key == "k13":
        (ctx.output_dir / "result.json").write_text("[1, 2", encoding="utf-8")
        return
    await asyncio.sleep(0.01 * (int(ctx.key[1:]) % 5))
    (ctx.output_dir / "result.json").write_text(json.dumps({"key": ctx.key}), encoding="utf-8")


def test_python_failures_do_not_touch_siblings(tmp_path: Path) -> None:
    """With the python runner, an agent raising, one hanging past its timeout, one writing
    nothing and one writing broken JSON each fail with their cause; every other partition
    commits with its own content."""
    stage = asyncio.run(
        fan_out(
            KEYS,
            _python_agent,
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            expect=["result.json"],
            retries=0,
            timeout=1.0,
        )
    )

    failed = {i.key: i.cause for i in stage.instances if i.status == "failed"}
    assert failed == {
        "k02": "runner-error",
        "k05": "timeout",
        "k09": "output-invalid",
        "k13": "output-invalid",
    }
    ok = sorted(set(KEYS) - set(failed))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ok
    for key in ok:
        assert json.loads((tmp_path / "out" / key / "result.json").read_text()) == {"key": key}
    assert "ValueError: bad input for k02" in stage.instances[2].message


def _executor_threads() -> int:
    """How many threads asyncio's default executor has on this machine."""
    return min(32, (os.cpu_count() or 1) + 4)


def test_stuck_sync_agents_do_not_starve_their_siblings(tmp_path: Path) -> None:
    """Plain (sync) python agents that hang past the timeout fail with cause ``timeout``; the
    healthy instances of the same stage still run and commit."""
    release = threading.Event()
    stuck = [f"stuck{n}" for n in range(_executor_threads())]
    healthy = ["ok0", "ok1", "ok2", "ok3"]

    def agent(ctx: InstanceContext) -> None:
        if ctx.key.startswith("stuck"):
            release.wait(30)
        (ctx.output_dir / "out.txt").write_text(ctx.key)

    try:
        stage = asyncio.run(
            fan_out(
                stuck + healthy,
                agent,
                output="out/{PARTITION_KEY}/",
                project_dir=tmp_path,
                concurrency=64,
                retries=0,
                timeout=1.0,
            )
        )
    finally:
        release.set()  # let the stuck threads go, so nothing outlives the test

    outcome = {i.key: (i.status, i.cause) for i in stage.instances}
    assert {outcome[k] for k in stuck} == {("failed", "timeout")}
    assert [outcome[k] for k in healthy] == [("committed", None)] * len(healthy)


AGENT = """\
import sys

def run(ctx):
    if ctx.key == "b":
        sys.exit(0)
    (ctx.output_dir / "out.txt").write_text(ctx.key)
"""


def test_python_agent_calling_sys_exit_fails_only_itself(make_project: ProjectFactory) -> None:
    """A python agent that calls ``sys.exit(0)`` fails its own instance (cause
    ``runner-error``); its siblings commit and ``phalanx run`` reports it (exit code 1)."""
    project = make_project(
        {
            "name": "exit",
            "stages": [
                {
                    "name": "s",
                    "partitions": {"items": ["a", "b", "c"]},
                    "output": "data/{PARTITION_KEY}/",
                    "runner": {"type": "python", "function": "agent:run"},
                    "retries": 0,
                }
            ],
        },
        {"agent.py": AGENT},
    )

    done = project.cli("run", "pipeline.yaml", "--json")

    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    (failure,) = summary["stages"][0]["failures"]
    assert (failure["key"], failure["cause"]) == ("b", "runner-error")
    assert project.dirs("data") == ["a", "c"]

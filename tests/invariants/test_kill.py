"""Invariant 2 under crashes and stops: kill -9 of the orchestrator leaves no half-written
partition visible and a second run finishes the job; SIGTERM and Ctrl-C stop a run cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from phalanx._databus import MANIFEST

if TYPE_CHECKING:
    from tests.conftest import Project, ProjectFactory

KEYS = [f"p{n:02d}" for n in range(12)]


def complete(folder: Path) -> bool:
    """Whether an output folder holds exactly the agent's two files, whole and valid."""
    key = folder.name
    try:
        names = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
        data = json.loads((folder / "out.json").read_text())
        notes = (folder / "notes.md").read_text()
    except (OSError, ValueError):
        return False
    return names == ["notes.md", "out.json"] and data["key"] == key and notes == f"# {key}\n"


def visible(project: Project) -> list[Path]:
    data = project.root / "data"
    return sorted(data.iterdir()) if data.is_dir() else []


def test_kill_9_mid_run_leaves_only_complete_outputs(make_project: ProjectFactory) -> None:
    """While agents write their two files slowly, every output folder that ever becomes visible
    is complete; after SIGKILL of the orchestrator (with some outputs committed and others in
    flight) still only complete folders exist; a second run commits every partition and sweeps
    the dead run's staging folder."""
    runner = make_project.runner("--pids", str(make_project.pids), "--delay", "0.4", "slow")
    project = make_project(make_project.one_stage(runner, KEYS, concurrency=4))

    orchestrator = project.start("run", "pipeline.yaml", "--quiet")
    incomplete: set[str] = set()

    def enough() -> bool:
        folders = visible(project)
        incomplete.update(f.name for f in folders if not complete(f))
        return len(folders) >= 3 and len(project.recorded()) >= len(folders) + 2

    project.wait_until(enough, what="3 committed outputs and 2 agents in flight")
    os.killpg(orchestrator.pid, signal.SIGKILL)
    orchestrator.communicate()
    in_flight = project.recorded()
    project.kill_agents()
    assert project.survivors(pid for pids in in_flight.values() for pid in pids) == []

    assert orchestrator.returncode == -signal.SIGKILL
    assert incomplete == set()
    folders = visible(project)
    assert 3 <= len(folders) < len(KEYS)
    assert [f.name for f in folders if not complete(f)] == []
    assert project.staging_leftovers() != []  # the killed run's half-written attempts

    rerun = project.cli("run", "pipeline.yaml", "--quiet")

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert [f.name for f in visible(project)] == KEYS
    assert all(complete(f) for f in visible(project))
    assert project.staging_leftovers() == []  # swept: their owner died


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_130_and_cleans_up(
    make_project: ProjectFactory, sig: signal.Signals
) -> None:
    """SIGTERM or SIGINT (Ctrl-C) to ``phalanx run`` with agents in flight: it exits with code
    130 within a bounded time and says it stopped; committed outputs stay; the stopped
    partitions are skipped (counts still add up); no staging folder is left and no agent or
    agent's child survives (one agent ignores SIGTERM and needs the SIGKILL after
    ``kill_grace``)."""
    runner = make_project.runner(
        "--pids", str(make_project.pids), "hang", "f1=write", "f2=write", "f3=write",
        "s3=stubborn", kill_grace="0.5s",
    )  # fmt: skip
    keys = ["f1", "f2", "f3", "s1", "s2", "s3"]
    project = make_project(make_project.one_stage(runner, keys, concurrency=6))

    process = project.start("run", "pipeline.yaml", "--quiet")
    project.wait_until(
        lambda: (
            [f.name for f in visible(project)] == ["f1", "f2", "f3"]
            and {"s1", "s2", "s3"} <= set(project.recorded())
        ),
        what="f1-f3 committed and s1-s3 running",
    )
    started = time.monotonic()
    process.send_signal(sig)
    try:
        stdout, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"phalanx run did not stop within 20 s of {sig.name}")
    elapsed = time.monotonic() - started

    assert process.returncode == 130, stderr
    assert elapsed < 20
    assert "stopped" in stdout
    assert "committed outputs are kept" in stderr
    assert ("interrupted (Ctrl-C)" if sig == signal.SIGINT else "terminated (SIGTERM)") in stderr
    assert [f.name for f in visible(project)] == ["f1", "f2", "f3"]
    assert all(complete(f) for f in visible(project))
    assert project.staging_leftovers() == []
    recorded = project.recorded()
    assert project.survivors(pid for key in ("s1", "s2", "s3") for pid in recorded[key]) == []
    (summary_file,) = (project.root / ".phalanx" / "runs").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["cancelled"] is True
    (stage,) = summary["stages"]
    assert (stage["total"], stage["committed"], stage["failed"], stage["skipped"]) == (6, 3, 0, 3)


SYNC_AGENT = """\
import time


def run(ctx):
    if ctx.key == "slow":
        time.sleep(60)
    (ctx.output_dir / "out.txt").write_text(ctx.key)
"""


def test_run_with_a_timed_out_sync_agent_exits_promptly(make_project: ProjectFactory) -> None:
    """A plain (sync) python agent that overruns its 1 s timeout fails with cause ``timeout``,
    and ``phalanx run`` exits (code 1) within a bounded time, not when the agent returns."""
    project = make_project(
        {
            "name": "sync",
            "stages": [
                {
                    "name": "s",
                    "partitions": {"items": ["fast", "slow"]},
                    "output": "data/{PARTITION_KEY}/",
                    "runner": {"type": "python", "function": "agent:run"},
                    "timeout": "1s",
                    "retries": 0,
                }
            ],
        },
        {"agent.py": SYNC_AGENT},
    )

    process = project.start("run", "pipeline.yaml", "--json")
    try:
        stdout, _ = process.communicate(timeout=6)
    except subprocess.TimeoutExpired:
        pytest.fail("phalanx run was still running 6 s after a 1 s timeout")

    assert process.returncode == 1
    (failure,) = json.loads(stdout)["stages"][0]["failures"]
    assert (failure["key"], failure["cause"]) == ("slow", "timeout")

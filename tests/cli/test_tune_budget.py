"""``phalanx tune`` changes a running run's concurrency from another terminal; budgets given
on the command line stop admission and ``resume`` continues under a new one."""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory


def test_tune_lets_a_run_stuck_at_one_slot_finish(make_project: ProjectFactory) -> None:
    """Three agents each wait until three of them run at once; started at concurrency 1 the
    run can only finish once ``phalanx tune --concurrency 3`` has reached it. The change is
    in the run's event log."""
    pids = make_project.pids
    runner = make_project.runner("--pids", str(pids), "--wait-for", "3", "gather")
    project = make_project(
        make_project.one_stage(runner, ["a", "b", "c"], concurrency=1, guard=False)
    )
    process = project.start("run", "pipeline.yaml", "--quiet")
    project.wait_until(lambda: any(pids.glob("*.pid")), what="the first agent to start")

    tuned = project.cli("tune", "--concurrency", "3")
    assert tuned.returncode == 0, tuned.stderr
    assert "concurrency 3" in tuned.stdout

    _out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert project.dirs("data") == ["a", "b", "c"]
    with sqlite3.connect(project.root / ".phalanx" / "ledger.db") as db:
        rows = db.execute("SELECT stage, data FROM events WHERE kind = 'LimitChanged'").fetchall()
    assert [(stage, json.loads(data)["reason"]) for stage, data in rows] == [("s", "tune")]
    assert json.loads(rows[0][1])["new"] == 3
    assert "concurrency 1 -> 3 (tune)" in err


def test_tune_refuses_a_run_that_is_not_running(make_project: ProjectFactory) -> None:
    project = make_project(make_project.one_stage(make_project.runner("write"), ["a"]))
    assert project.cli("run", "pipeline.yaml", "--quiet").returncode == 0
    refused = project.cli("tune", "--concurrency", "4")
    assert refused.returncode == 2
    assert "is not running (ok)" in refused.stderr


def test_cli_budget_stops_admission_and_resume_continues(make_project: ProjectFactory) -> None:
    """``--budget-tokens`` on ``run``: the python agent spends 100 tokens an instance, so a
    budget of 300 lets three of eight run (exit 1, skipped as budget); ``resume`` with a
    larger budget runs the other five."""
    project = make_project(
        {
            "name": "spend",
            "defaults": {"runner": {"type": "python", "function": "spend:agent"}},
            "stages": [
                {
                    "name": "s",
                    "partitions": {"items": [f"k{n}" for n in range(8)]},
                    "output": "data/{PARTITION_KEY}/",
                    "concurrency": 1,
                }
            ],
        },
        files={
            "spend.py": (
                "from phalanx import Usage\n\n"
                "def agent(ctx):\n"
                "    ctx.usage.add(Usage(requests=1, input_tokens=100))\n"
                "    (ctx.output_dir / 'out.txt').write_text(ctx.key)\n"
            )
        },
    )
    first = project.cli("run", "pipeline.yaml", "--budget-tokens", "300", "--json")
    assert first.returncode == 1, first.stderr
    (stage,) = json.loads(first.stdout)["stages"]
    assert (stage["committed"], stage["skipped"]) == (3, 5)
    assert "no new attempts: the run budget of 300 tokens is spent (300)" in first.stderr

    again = project.cli("resume", "--budget-tokens", "10000", "--json")
    assert again.returncode == 0, again.stderr
    (stage,) = json.loads(again.stdout)["stages"]
    assert stage["committed"] == 8
    assert project.dirs("data") == [f"k{n}" for n in range(8)]

"""Invariant 2 across crashes: kill -9 of the orchestrator at random moments, then
``phalanx resume`` until done — every partition committed exactly once, nothing half-written
visible, no committed instance run again; Ctrl-C / SIGTERM then resume; one orchestrator per
project; an agent killed with kill -9 is retried."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from phalanx._databus import MANIFEST
from phalanx._lock import ProjectLock
from phalanx._manifest import read_manifest, verify_output

if TYPE_CHECKING:
    from tests.conftest import Project, ProjectFactory

N = 200
KEYS = [f"p{n:03d}" for n in range(N)]
TRIALS = 20

# An agent that takes 0-60 ms (varied by key), logs each execution and writes two files.
AGENTS = """\
import asyncio
import hashlib
import json


async def work(ctx):
    with open(ctx.project_dir / "executions.log", "a", encoding="utf-8") as log:
        log.write(f"{ctx.key} {ctx.attempt}\\n")
    digest = hashlib.sha256(ctx.key.encode()).digest()
    await asyncio.sleep(digest[0] % 61 / 1000)
    (ctx.output_dir / "result.json").write_text(json.dumps({"key": ctx.key}))
    await asyncio.sleep(digest[1] % 11 / 1000)
    (ctx.output_dir / "notes.md").write_text(f"# {ctx.key}\\n")
"""


def _pipeline(concurrency: int = 16) -> dict[str, object]:
    return {
        "name": "chaos",
        "stages": [
            {
                "name": "s",
                "partitions": {"items": [{"id": key} for key in KEYS]},
                "output": "data/{PARTITION_KEY}/",
                "expect": ["result.json", "notes.md"],
                "runner": {"type": "python", "function": "agents:work"},
                "concurrency": concurrency,
                "retries": 0,
            }
        ],
    }


def _intact(folder: Path) -> bool:
    """A committed output: its manifest verifies and it holds exactly the agent's two files."""
    manifest = read_manifest(folder)
    return (
        manifest is not None
        and manifest.key == folder.name
        and sorted(manifest.files) == ["notes.md", "result.json"]
        and verify_output(folder, manifest) is None
    )


def _visible(project: Project) -> dict[str, bool]:
    """Every entry of the data bus: name -> intact."""
    data = project.root / "data"
    return {p.name: _intact(p) for p in sorted(data.iterdir())} if data.is_dir() else {}


def _executions(project: Project) -> list[str]:
    log = project.root / "executions.log"
    return log.read_text().split("\n")[:-1] if log.exists() else []


def _kill_after(
    project: Project, process: subprocess.Popen[str], commits: int, pause: float
) -> int | None:
    """Wait for ``commits`` committed outputs (or the process's end), sleep ``pause``, then
    SIGKILL the orchestrator. Returns ``None`` when it was killed, else its exit code."""
    data = project.root / "data"
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if data.is_dir() and len(os.listdir(data)) >= commits:
            break
        time.sleep(0.002)
    time.sleep(pause)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None
    process.communicate()
    return process.returncode


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_9_and_resume_commits_every_partition_exactly_once(
    make_project: ProjectFactory, trial: int
) -> None:
    """Trial ``trial`` (seeded): kill -9 the orchestrator of a 200-partition run after a random
    number of commits, sometimes its resume too, and resume until it finishes. After every kill
    the data bus shows only intact outputs; at the end all 200 are committed by that one run,
    every manifest verifies, no staging folder is left, the counts add up, and the only
    instances executed more than once are ones that were in flight (started, not committed)
    at a kill."""
    rng = random.Random(trial)  # noqa: S311 - seeded chaos, not secrets
    project = make_project(_pipeline(), {"agents.py": AGENTS}, name=f"trial{trial}")
    kills_left = 1 + (rng.random() < 0.3)
    in_flight_at_kills: set[str] = set()
    kills = 0
    command = ["run", "pipeline.yaml", "--quiet"]
    while True:
        before = len(_executions(project))
        process = project.start(*command)
        if kills_left:
            # At least 30 partitions left, killed within 10 ms: the run cannot end first.
            code = _kill_after(project, process, rng.randrange(1, N - 30), rng.uniform(0, 0.01))
        else:
            process.communicate(timeout=120)
            code = process.returncode
        if code is not None:
            assert code == 0
            break
        kills_left -= 1
        kills += 1
        visible = _visible(project)
        assert all(visible.values()), [key for key, ok in visible.items() if not ok]
        started = {line.split()[0] for line in _executions(project)[before:]}
        in_flight_at_kills |= started - set(visible)
        command = ["resume", "--quiet"]

    assert kills >= 1
    visible = _visible(project)
    assert sorted(visible) == KEYS
    assert all(visible.values())
    manifests = [read_manifest(project.root / "data" / key) for key in KEYS]
    assert len({m.run_id for m in manifests if m is not None}) == 1  # one run committed all
    assert project.staging_leftovers() == []
    status = json.loads(project.cli("status", "--json").stdout)
    assert status["run"]["state"] == "ok"
    (stage,) = status["stages"]
    counted = [stage[k] for k in ("committed", "cached", "failed", "skipped", "running")]
    assert counted == [N, 0, 0, 0, 0]
    assert stage["pending"] == 0
    executed = [line.split()[0] for line in _executions(project)]
    again = {key for key in set(executed) if executed.count(key) > 1}
    assert again <= in_flight_at_kills, sorted(again - in_flight_at_kills)
    assert len(again) <= len(in_flight_at_kills)
    assert all((project.root / "data" / key / MANIFEST).is_file() for key in KEYS)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_marks_the_run_interrupted_and_resume_completes_it(
    make_project: ProjectFactory, sig: signal.Signals
) -> None:
    """Ctrl-C or SIGTERM mid-run: exit 130, the ledger marks the run ``interrupted`` with the
    partial counts; ``phalanx resume`` runs only what was not committed, under the same run id,
    and the run ends ``ok`` with every partition committed."""
    project = make_project(_pipeline(concurrency=4), {"agents.py": AGENTS})
    process = project.start("run", "pipeline.yaml", "--quiet")
    project.wait_until(
        lambda: len(_visible(project)) >= 20, timeout=60, what="20 committed outputs"
    )
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    committed_first = set(_visible(project))
    assert 20 <= len(committed_first) < N

    status = json.loads(project.cli("status", "--json").stdout)
    assert status["run"]["state"] == "interrupted"
    (stage,) = status["stages"]
    assert stage["committed"] == len(committed_first)
    assert stage["committed"] + stage["skipped"] + stage["pending"] == N
    run_id = status["run"]["id"]
    executions_before = len(_executions(project))

    resumed = project.cli("resume", "--quiet", "--json")

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["run_id"] == run_id
    assert summary["stages"][0]["committed"] == N
    rerun = {line.split()[0] for line in _executions(project)[executions_before:]}
    assert rerun == set(KEYS) - committed_first  # nothing committed ran again
    after = json.loads(project.cli("status", "--json").stdout)
    assert after["run"]["state"] == "ok"
    assert after["stages"][0]["committed"] == N


def test_a_second_orchestrator_is_refused_with_the_running_one_named(
    make_project: ProjectFactory,
) -> None:
    """While one ``phalanx run`` works in a project, a second one exits with code 2 and names
    the running run and its pid; nothing of the first is disturbed. Once the first is killed
    with kill -9, the lock is free again."""
    runner = make_project.runner("--pids", str(make_project.pids), "hang", kill_grace="0.2s")
    project = make_project(make_project.one_stage(runner, ["a", "b"]))
    first = project.start("run", "pipeline.yaml", "--quiet")
    project.wait_until(lambda: len(project.recorded()) == 2, what="both agents running")

    second = project.cli("run", "pipeline.yaml", "--quiet")

    assert second.returncode == 2
    status = json.loads(project.cli("status", "--json").stdout)
    assert f"run {status['run']['id']}" in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert "another phalanx run is working in this project" in second.stderr
    assert first.poll() is None  # undisturbed
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    project.kill_agents()
    assert json.loads(project.cli("status", "--json").stdout)["run"]["state"] == "crashed"

    lock = ProjectLock.acquire(project.root / ".phalanx", run_id="next", pipeline="t")
    lock.release()


def test_agent_killed_with_kill_9_is_retried_and_siblings_are_unaffected(
    make_project: ProjectFactory,
) -> None:
    """kill -9 of one agent process (not the orchestrator): its attempt fails with the signal
    recorded, the retry commits, and its siblings commit on their first attempt; the ledger
    holds both attempts."""
    runner = make_project.runner("--pids", str(make_project.pids), "write", "k2=waitonce")
    keys = ["k0", "k1", "k2", "k3"]
    project = make_project(
        make_project.one_stage(runner, keys, retries=1, backoff={"base": "0.01s", "max": "0.01s"})
    )
    process = project.start("run", "pipeline.yaml", "--quiet", "--json")
    project.wait_until(lambda: "k2" in project.recorded(), what="k2's first attempt")
    (pid,) = project.recorded()["k2"]
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["stages"][0]["committed"] == 4
    for key in keys:
        out = json.loads((project.root / "data" / key / "out.json").read_text())
        assert out["attempt"] == ("2" if key == "k2" else "1")
    assert "killed by signal 9" in project.entries("k2")[0]
    logs = project.cli("logs", "latest", "s", "k2", "--attempt", "1")
    assert logs.returncode == 0, logs.stderr
    assert "killed by signal 9" in logs.stdout


def test_commit_the_ledger_never_heard_of_is_reconciled_from_the_manifest(
    make_project: ProjectFactory,
) -> None:
    """The orchestrator dies after an output's rename but before the ledger recorded it (made
    here by deleting those rows and marking the run as still running): ``resume`` finds the
    commit in the output's manifest, counts it as committed by the run and does not execute
    it again."""
    keys = KEYS[:10]
    pipeline = _pipeline(concurrency=4)
    pipeline["stages"][0]["partitions"] = {"items": [{"id": key} for key in keys]}  # type: ignore[index]
    project = make_project(pipeline, {"agents.py": AGENTS})
    first = project.cli("run", "pipeline.yaml", "--quiet", "--json")
    assert first.returncode == 0, first.stderr
    run_id = json.loads(first.stdout)["run_id"]
    db = sqlite3.connect(project.root / ".phalanx" / "ledger.db")
    with db:
        db.execute("DELETE FROM instances WHERE run_id = ? AND key = 'p003'", (run_id,))
        db.execute("DELETE FROM attempts WHERE run_id = ? AND key = 'p003'", (run_id,))
        db.execute("UPDATE runs SET status = 'running', ended = NULL WHERE id = ?", (run_id,))
    db.close()
    (project.root / "executions.log").unlink()

    resumed = project.cli("resume", "--quiet", "--json")

    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["run_id"] == run_id
    assert summary["stages"][0]["committed"] == len(keys)
    assert not (project.root / "executions.log").exists()  # nothing executed again
    status = json.loads(project.cli("status", "--json").stdout)
    assert status["stages"][0]["committed"] == len(keys)
    assert status["run"]["state"] == "ok"


def test_resume_of_a_finished_run_has_nothing_to_do(make_project: ProjectFactory) -> None:
    """``phalanx resume`` after a run that met every stage runs nothing and says so; with
    ``--json`` it prints that run's recorded summary."""
    pipeline = _pipeline(concurrency=4)
    pipeline["stages"][0]["partitions"] = {"items": [{"id": "a"}, {"id": "b"}]}  # type: ignore[index]
    project = make_project(pipeline, {"agents.py": AGENTS})
    first = project.cli("run", "pipeline.yaml", "--quiet", "--json")
    assert first.returncode == 0, first.stderr
    (project.root / "executions.log").unlink()

    again = project.cli("resume")
    as_json = project.cli("resume", "--json")

    assert again.returncode == 0
    assert as_json.returncode == 0
    assert "nothing to resume" in again.stdout
    assert json.loads(as_json.stdout)["run_id"] == json.loads(first.stdout)["run_id"]
    assert not (project.root / "executions.log").exists()

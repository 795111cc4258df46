"""``phalanx runs``, ``status`` and ``logs``: what they show from a ledger, their JSON, and
exit code 2 with a message saying what exists when a run, stage, key or attempt does not, or
when there is no ledger at all."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
import pytest
from click.testing import CliRunner, Result

from phalanx._inspect import register
from phalanx._ledger import InstanceStatus, SQLiteLedger, open_ledger

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory

T0 = 1_700_000_000.0
OLD = "20250101T100000Z-aaaaaa"
NEW = "20250102T100000Z-bbbbbb"
CRASHED = "20250101T090000Z-cccccc"


def _group() -> click.Group:
    group = click.Group("phalanx")
    register(group)
    return group


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(_group(), [str(arg) for arg in args], catch_exceptions=False)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _started(ledger: SQLiteLedger, run_id: str, started: float, pid: int | None) -> None:
    ledger.run_started(
        run_id,
        pipeline="demo",
        pipeline_file="pipeline.yaml",
        started=started,
        pid=pid,
        options={"concurrency": 4},
    )


def _instance(
    ledger: SQLiteLedger,
    run_id: str,
    stage: str,
    key: str,
    status: InstanceStatus,
    cause: str | None = None,
    message: str = "",
    reason: str | None = None,
) -> None:
    ledger.instance_ended(
        run_id,
        stage,
        key,
        pipeline="demo",
        status=status,
        fingerprint=f"f-{key}",
        cause=cause,
        message=message,
        reason=reason,
        ended=T0,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project whose ledger holds three runs. The newest, ``NEW``, has stage ``s`` (10
    planned: a, b committed; c cached; d, f runner-error and e timeout failed; g running; h
    skipped; two pending) and stage ``t``, skipped. ``d`` ran twice; its second attempt left
    log files. ``CRASHED`` is still recorded as running, but its orchestrator is gone."""
    root = tmp_path / "project"
    (root / "sub").mkdir(parents=True)
    with open_ledger(root / ".phalanx") as ledger:
        _started(ledger, OLD, T0 - 86_400, None)
        _instance(ledger, OLD, "s", "a", "committed")
        ledger.run_ended(OLD, status="ok", ended=T0 - 86_000, summary={"ok": True})
        _started(ledger, CRASHED, T0 - 90_000, _dead_pid())

        _started(ledger, NEW, T0, None)
        ledger.stage_started(NEW, "s", position=0, total=10, started=T0)
        for key in ("a", "b"):
            ledger.attempt_started(NEW, "s", key, 1, started=T0, fingerprint=None, log_dir=None)
            ledger.attempt_ended(NEW, "s", key, 1, ended=T0 + 2, duration_s=2, outcome="committed")
            _instance(ledger, NEW, "s", key, "committed")
        _instance(ledger, NEW, "s", "c", "cached")
        logs = f".phalanx/runs/{NEW}/logs/s/d"
        for attempt in (1, 2):
            ledger.attempt_started(
                NEW,
                "s",
                "d",
                attempt,
                started=T0 + attempt,
                fingerprint=None,
                log_dir=f"{logs}/{attempt}",
            )
            ledger.attempt_ended(
                NEW,
                "s",
                "d",
                attempt,
                ended=T0 + attempt + 1.5,
                duration_s=1.5,
                outcome="failed",
                cause="runner-error",
                message="exited with code 3",
                detail=f"Traceback (most recent call last):\n  boom {attempt}\n",
                usage={"requests": 1},
                cost_usd=0.01,
            )
        folder = root / logs / "2"
        folder.mkdir(parents=True)
        (folder / "stdout.txt").write_text("out line\n")
        (folder / "stderr.txt").write_text("err line\n")
        (folder / "transcript.jsonl").write_text('{"role": "user"}\n')
        _instance(ledger, NEW, "s", "d", "failed", "runner-error", "exited with code 3\nmore")
        _instance(ledger, NEW, "s", "e", "failed", "timeout", "ran longer than 10s")
        _instance(ledger, NEW, "s", "f", "failed", "runner-error", "exited with code 1")
        ledger.attempt_started(NEW, "s", "g", 1, started=T0, fingerprint=None, log_dir=None)
        _instance(ledger, NEW, "s", "h", "skipped", reason="budget")
        ledger.stage_ended(NEW, "s", status="done", ended=T0 + 9)
        ledger.stage_ended(
            NEW,
            "t",
            status="skipped",
            ended=T0 + 9,
            skipped_reason="upstream failed",
            position=1,
            total=3,
        )
        ledger.run_ended(NEW, status="failed", ended=T0 + 10, summary={"ok": False})
    return root


def test_runs_lists_newest_first_with_totals(project: Path) -> None:
    """``runs`` shows every run newest first, with its state (a run whose orchestrator died
    shows as crashed) and its totals; ``--json`` is a list with the same facts."""
    shown = invoke("runs", "--project", project)
    assert shown.exit_code == 0, shown.output
    lines = [line for line in shown.stdout.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines[1:]] == [NEW, OLD, CRASHED]
    assert "crashed" in lines[3]
    assert lines[1].split()[-4:] == ["2", "1", "3", "1"]  # committed, cached, failed, skipped

    listed = json.loads(invoke("runs", "--json", "--project", project).stdout)
    assert [run["id"] for run in listed] == [NEW, OLD, CRASHED]
    newest = listed[0]
    assert (newest["state"], newest["pipeline"], newest["wall_s"]) == ("failed", "demo", 10.0)
    assert (newest["committed"], newest["cached"], newest["failed"], newest["skipped"]) == (
        2,
        1,
        3,
        1,
    )
    assert newest["options"] == {"concurrency": 4}
    assert listed[2]["state"] == "crashed"
    assert listed[2]["status"] == "running"
    assert listed[2]["ended"] is None
    assert [
        run["id"]
        for run in json.loads(invoke("runs", "--json", "--limit", "1", "--project", project).stdout)
    ] == [NEW]


def test_status_shows_stages_and_failures(project: Path) -> None:
    """``status`` (the newest run by default) shows the run, one line per stage with its
    counts, pending and status, then the failures grouped by stage and cause with example
    keys and the first line of their messages."""
    shown = invoke("status", "--project", project)
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    assert f"run {NEW}" in out
    assert "state failed" in out
    table, failures = out.split("\nfailures:\n")
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()}
    assert rows["stage"] == [
        "total",
        "committed",
        "cached",
        "running",
        "failed",
        "skipped",
        "pending",
        "status",
    ]
    assert rows["s"] == ["10", "2", "1", "1", "3", "1", "2", "done"]
    assert rows["t"] == ["3", "0", "0", "0", "0", "0", "3", "skipped:", "upstream", "failed"]
    assert failures.splitlines() == [
        "  s · runner-error: 2",
        "    d: exited with code 3",  # only the first line of each message
        "    f: exited with code 1",
        "  s · timeout: 1",
        "    e: ran longer than 10s",
    ]


def test_status_json_adds_up(project: Path) -> None:
    """``status --json``: per stage, the counts and pending add up to the total, the causes
    add up to the failed, and the failure groups carry every failure's count."""
    shown = invoke("status", NEW, "--json", "--project", project)
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    assert report["run"]["id"] == NEW
    assert report["run"]["state"] == "failed"
    assert report["run"]["summary"] == {"ok": False}
    stages = {stage["name"]: stage for stage in report["stages"]}
    assert list(stages) == ["s", "t"]
    for stage in stages.values():
        parts = ("committed", "cached", "running", "failed", "skipped", "pending")
        assert sum(stage[name] for name in parts) == stage["total"]
        assert sum(stage["causes"].values()) == stage["failed"]
    assert stages["s"]["causes"] == {"runner-error": 2, "timeout": 1}
    assert (stages["s"]["running"], stages["s"]["pending"]) == (1, 2)
    assert stages["t"]["status"] == "skipped: upstream failed"
    groups = {(group["stage"], group["cause"]): group for group in report["failures"]}
    assert set(groups) == {("s", "runner-error"), ("s", "timeout")}
    assert [example["key"] for example in groups["s", "runner-error"]["examples"]] == ["d", "f"]
    assert sum(group["count"] for group in groups.values()) == stages["s"]["failed"]


def test_runs_are_named_by_prefix_or_latest(project: Path) -> None:
    """A unique prefix or ``latest`` names a run; an ambiguous prefix lists the matches and an
    unknown run lists the latest ones, both on stderr with exit code 2."""
    by_prefix = json.loads(invoke("status", "20250101T10", "--json", "--project", project).stdout)
    assert by_prefix["run"]["id"] == OLD
    latest = json.loads(invoke("status", "latest", "--json", "--project", project).stdout)
    assert latest["run"]["id"] == NEW

    ambiguous = invoke("status", "20250101", "--project", project)
    assert ambiguous.exit_code == 2
    assert ambiguous.stderr.startswith("error: run '20250101' is ambiguous")
    assert OLD in ambiguous.stderr
    assert CRASHED in ambiguous.stderr
    assert ambiguous.stdout == ""

    unknown = invoke("logs", "1999", "s", "d", "--project", project)
    assert unknown.exit_code == 2
    assert "error: no run '1999' in this project; the latest are" in unknown.stderr
    assert NEW in unknown.stderr


def test_the_ledger_is_found_from_a_subfolder(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``--project`` the ledger is found from the current folder upward."""
    monkeypatch.chdir(project / "sub")
    shown = invoke("status", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["run"]["id"] == NEW


def test_no_ledger_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no ledger in the folder or its parents, or in ``--project``, each command says so
    and what to do, with exit code 2 and nothing created."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for args in (["runs"], ["status"], ["logs", "latest", "s", "k"]):
        found = invoke(*args)
        assert found.exit_code == 2, args
        assert found.stderr.startswith(f"error: no phalanx ledger in {empty.resolve()}")
        assert "--project DIR" in found.stderr
    given = invoke("status", "--project", empty)
    assert given.exit_code == 2
    assert f"error: no phalanx ledger in {empty}" in given.stderr
    assert list(empty.iterdir()) == []


def test_logs_shows_the_last_attempt_and_its_files(project: Path) -> None:
    """``logs`` shows the last attempt by default: outcome, cause, message, detail, then each
    log file (sorted) under a header with its path relative to the project."""
    shown = invoke("logs", "latest", "s", "d", "--project", project)
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    assert "attempt 2 of 2" in out
    assert "outcome failed · cause runner-error" in out
    assert "message: exited with code 3" in out
    assert "boom 2" in out
    folder = f".phalanx/runs/{NEW}/logs/s/d/2"
    headers = [line for line in out.splitlines() if line.startswith("==> ")]
    assert headers == [
        f"==> {folder}/stderr.txt <==",
        f"==> {folder}/stdout.txt <==",
        f"==> {folder}/transcript.jsonl <==",
    ]
    assert f"==> {folder}/stdout.txt <==\nout line\n" in out
    assert f"==> {folder}/stderr.txt <==\nerr line\n" in out


def test_logs_of_an_attempt_without_files(project: Path) -> None:
    """An attempt whose log folder does not exist says the runner keeps none."""
    shown = invoke("logs", NEW[:12], "s", "d", "--attempt", "1", "--project", project)
    assert shown.exit_code == 0, shown.output
    assert "attempt 1 of 2" in shown.stdout
    assert "boom 1" in shown.stdout
    assert "(no log files: this runner keeps none)" in shown.stdout
    plain = invoke("logs", NEW, "s", "a", "--project", project)
    assert "outcome committed" in plain.stdout
    assert "(no log files: this runner keeps none)" in plain.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["s", "zz"], f"error: run {NEW} has no instance 'zz' in stage 's'; its keys include a, b"),
        (["nope", "d"], f"error: run {NEW} has no stage 'nope'; its stages: s, t"),
        (["s", "d", "--attempt", "3"], "has no attempt 3; its attempts: 1, 2"),
        (["s", "c"], f"error: s/c ran no attempt in run {NEW}: it was cached"),
        (["s", "h"], "it was skipped (budget)"),
    ],
)
def test_logs_of_what_does_not_exist_exits_2(project: Path, args: list[str], message: str) -> None:
    """An unknown stage, key or attempt (or an instance that ran none) is exit code 2 with a
    message listing what does exist."""
    shown = invoke("logs", "latest", *args, "--project", project)
    assert shown.exit_code == 2
    assert message in shown.stderr
    assert shown.stdout == ""


def test_status_of_100000_instances_is_quick(tmp_path: Path) -> None:
    """``status`` of a run with 100,000 instance rows (five stages, four causes of failure)
    takes well under a second; the bound asserted is generous so that it cannot flake."""
    root = tmp_path / "big"
    causes = ("timeout", "runner-error", "output-invalid", "rate-limited")
    statuses: tuple[InstanceStatus, ...] = (
        *("committed",) * 6,
        "cached",
        "failed",
        "skipped",
        "failed",
    )
    with open_ledger(root / ".phalanx") as ledger:
        _started(ledger, NEW, T0, os.getpid())
        for position in range(5):
            ledger.stage_started(
                NEW, f"stage{position}", position=position, total=20_000, started=T0
            )
        for n in range(100_000):
            status = statuses[n % len(statuses)]
            failed = status == "failed"
            _instance(
                ledger,
                NEW,
                f"stage{n % 5}",
                f"key-{n:06d}",
                status,
                cause=causes[n % 4] if failed else None,
                message=f"attempt failed for key {n}\nsecond line" if failed else "",
            )
        ledger.flush()

    started = time.perf_counter()
    shown = invoke("status", "--project", root)
    took = time.perf_counter() - started
    as_json = invoke("status", "--json", "--project", root)
    print(f"\nphalanx status over 100,000 instance rows: {took * 1000:.0f} ms")

    assert shown.exit_code == 0, shown.output
    assert took < 5.0
    report = json.loads(as_json.stdout)
    assert sum(stage["total"] for stage in report["stages"]) == 100_000
    assert sum(stage["failed"] for stage in report["stages"]) == 20_000
    for stage in report["stages"]:
        parts = ("committed", "cached", "running", "failed", "skipped", "pending")
        assert sum(stage[name] for name in parts) == stage["total"]
        assert sum(stage["causes"].values()) == stage["failed"]


def test_status_watch_follows_a_run_started_elsewhere_to_its_end(
    make_project: ProjectFactory,
) -> None:
    """``status --watch`` on a run another process is running: it prints the view again as
    instances commit (off a terminal: only when something changed) and returns once the run
    has ended, its last view showing every instance committed and the run ok."""
    runner = make_project.runner("--delay", "0.3", "slow")
    project = make_project(make_project.one_stage(runner, ["a", "b", "c"], concurrency=1))
    process = project.start("run", "pipeline.yaml", "--quiet")
    ledger = project.root / ".phalanx" / "ledger.db"

    def recorded() -> bool:  # the run's row is flushed just after the ledger file appears
        if not ledger.exists():
            return False
        with sqlite3.connect(ledger) as db:
            try:
                return bool(db.execute("SELECT count(*) FROM runs").fetchone()[0])
            except sqlite3.OperationalError:  # the schema is being created
                return False

    project.wait_until(recorded, what="the run's row in the ledger")
    watched = project.cli("status", "--watch", "--interval", "0.1", timeout=120)
    assert process.wait(timeout=60) == 0
    assert watched.returncode == 0, watched.stderr
    views = watched.stdout.split("run 2")[1:]  # each view starts with its run id
    assert len(views) >= 2
    final = views[-1]
    assert "state ok" in final
    assert re.search(r"\n\s*s\s+3\s+3\s+0\s+0\s+0\s+0\s+0\s+done", final), final
    assert len(set(views)) == len(views)  # a view is printed again only when it changed


def test_status_watch_does_not_mix_with_json(make_project: ProjectFactory) -> None:
    project = make_project(make_project.one_stage(make_project.runner("write"), ["a"]))
    assert project.cli("run", "pipeline.yaml", "--quiet").returncode == 0
    refused = project.cli("status", "--watch", "--json")
    assert refused.returncode == 2
    assert "--watch" in refused.stderr

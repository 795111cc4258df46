"""The SQLite ledger: queued writes, flush, batching, reads, resume, migrations, errors."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from phalanx import _ledger as ledger_module
from phalanx._errors import UsageError
from phalanx._ledger import (
    DISCARDED_CAUSE,
    DISCARDED_MESSAGE,
    LEDGER_FILE,
    SCHEMA_VERSION,
    LedgerError,
    SQLiteLedger,
    _create_at_version,
    find_ledger,
    open_ledger,
)

T0 = 1_700_000_000.0


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / ".phalanx"


@pytest.fixture
def ledger(state_dir: Path) -> Iterator[SQLiteLedger]:
    opened = open_ledger(state_dir)
    try:
        yield opened
    finally:
        opened.close()


def _raw(path: Path) -> sqlite3.Connection:
    """A plain connection of the test's own, beside the ledger's."""
    return sqlite3.connect(path, isolation_level=None)


def _start_run(ledger: SQLiteLedger, run_id: str = "r1", *, started: float = T0) -> None:
    ledger.run_started(
        run_id,
        pipeline="demo",
        pipeline_file="pipeline.yaml",
        started=started,
        pid=None,
        options={"stages": ["s"], "concurrency": 4},
    )


def _record_a_run(ledger: SQLiteLedger) -> None:
    """Run ``r1`` through every write method: stage ``s`` with ``a`` committed, ``b`` failed
    twice, ``c`` cached, ``d`` skipped; stage ``t`` skipped; two events."""
    _start_run(ledger)
    ledger.stage_started("r1", "s", position=0, total=4, started=T0 + 1)
    ledger.attempt_started("r1", "s", "a", 1, started=T0 + 2, fingerprint="fa", log_dir="L/a/1")
    ledger.attempt_ended(
        "r1",
        "s",
        "a",
        1,
        ended=T0 + 3,
        duration_s=1.0,
        outcome="committed",
        usage={"requests": 2, "input_tokens": 10},
        cost_usd=0.25,
    )
    ledger.instance_ended(
        "r1",
        "s",
        "a",
        pipeline="demo",
        status="committed",
        fingerprint="fa",
        attempts=1,
        duration_s=1.0,
        ended=T0 + 3,
    )
    for attempt in (1, 2):
        ledger.attempt_started(
            "r1", "s", "b", attempt, started=T0 + 3 + attempt, fingerprint="fb", log_dir=None
        )
        ledger.attempt_ended(
            "r1",
            "s",
            "b",
            attempt,
            ended=T0 + 3.5 + attempt,
            duration_s=0.5,
            outcome="failed",
            cause="timeout",
            message=f"slow {attempt}\nmore",
            detail="tb",
        )
    ledger.instance_ended(
        "r1",
        "s",
        "b",
        pipeline="demo",
        status="failed",
        fingerprint="fb",
        cause="timeout",
        message="slow 2\nmore",
        attempts=2,
        duration_s=1.0,
        ended=T0 + 6,
    )
    ledger.instance_ended(
        "r1", "s", "c", pipeline="demo", status="cached", fingerprint="fc", ended=T0 + 2
    )
    ledger.instance_ended(
        "r1",
        "s",
        "d",
        pipeline="demo",
        status="skipped",
        fingerprint=None,
        reason="budget",
        ended=T0 + 6,
    )
    ledger.stage_ended("r1", "s", status="done", ended=T0 + 7)
    ledger.stage_ended(
        "r1", "t", status="skipped", ended=T0 + 7, skipped_reason="upstream failed", position=1
    )
    ledger.event("r1", t=T0 + 2, kind="attempt-started", stage="s", key="a", attempt=1)
    ledger.event("r1", t=T0 + 8, kind="note", data={"text": "hi"})
    ledger.run_ended("r1", status="failed", ended=T0 + 8, summary={"ok": False})


def test_every_write_reads_back(ledger: SQLiteLedger) -> None:
    """Each write method lands in its table and each read method returns it: run, stages,
    attempts with usage, instances of every status, causes, outcomes (cached counts as
    committed, skipped is no outcome), events, and the run's end with its summary."""
    _record_a_run(ledger)
    ledger.flush()

    (run,) = ledger.runs()
    assert (run.id, run.pipeline, run.pipeline_file, run.status) == (
        "r1",
        "demo",
        "pipeline.yaml",
        "failed",
    )
    assert (run.started, run.ended, run.wall_s) == (T0, T0 + 8, 8.0)
    assert run.options == {"stages": ["s"], "concurrency": 4}
    assert run.summary == {"ok": False}
    assert run.state == "failed"
    assert ledger.get_run() == run
    assert ledger.get_run("r1") == run


def test_every_write_reads_back_per_instance(ledger: SQLiteLedger) -> None:
    """The same run read per stage, instance, attempt and partition: stage order and
    status, counts and causes, failures (filtered by stage and cause), attempts with their
    usage and logs, the highest attempt per key, outcomes across runs, and events in order."""
    _record_a_run(ledger)
    ledger.flush()
    stages = ledger.stage_rows("r1")
    assert [(s.name, s.position, s.total, s.status) for s in stages] == [
        ("s", 0, 4, "done"),
        ("t", 1, None, "skipped"),
    ]
    assert stages[0].started == T0 + 1
    assert stages[1].skipped_reason == "upstream failed"

    assert ledger.counts("r1") == {"s": {"committed": 1, "failed": 1, "cached": 1, "skipped": 1}}
    assert ledger.causes("r1") == {"s": {"timeout": 1}}
    (failed,) = ledger.failures("r1")
    assert (failed.key, failed.cause, failed.message, failed.attempts) == (
        "b",
        "timeout",
        "slow 2\nmore",
        2,
    )
    assert ledger.failures("r1", "s", cause="timeout") == [failed]
    assert ledger.failures("r1", "s", cause="other") == []
    assert ledger.failures("r1", "t") == []
    skipped = ledger.get_instance("r1", "s", "d")
    assert skipped is not None
    assert (skipped.status, skipped.reason) == ("skipped", "budget")
    assert ledger.get_instance("r1", "s", "zz") is None
    assert ledger.keys("r1", "s") == ["a", "b", "c", "d"]
    assert ledger.keys("r1", "s", limit=2) == ["a", "b"]

    (committed,) = ledger.attempt_rows("r1", "s", "a")
    assert (committed.outcome, committed.started, committed.ended, committed.log_dir) == (
        "committed",
        T0 + 2,
        T0 + 3,
        "L/a/1",
    )
    assert committed.usage == {"requests": 2, "input_tokens": 10}
    assert committed.cost_usd == 0.25
    tries = ledger.attempt_rows("r1", "s", "b")
    assert [(a.attempt, a.outcome, a.cause, a.detail) for a in tries] == [
        (1, "failed", "timeout", "tb"),
        (2, "failed", "timeout", "tb"),
    ]
    assert ledger.last_attempts("r1", "s") == {"a": 1, "b": 2}

    outcomes = ledger.outcomes("demo", "s")
    assert {key: row.status for key, row in outcomes.items()} == {
        "a": "committed",
        "b": "failed",
        "c": "committed",
    }
    assert outcomes["c"].fingerprint == "fc"
    assert outcomes["b"].cause == "timeout"
    assert set(ledger.outcomes("demo", "s", "failed")) == {"b"}
    assert ledger.outcomes("other", "s") == {}

    with _raw(ledger.path) as conn:
        events = conn.execute("SELECT seq, kind, stage, key, attempt, data FROM events").fetchall()
    assert events == [
        (1, "attempt-started", "s", "a", 1, None),
        (2, "note", None, None, None, '{"text": "hi"}'),
    ]


def test_attempt_started_marks_the_instance_running(ledger: SQLiteLedger) -> None:
    """An attempt that has started shows its instance as running with its attempt number, so
    ``status`` counts it while it runs."""
    _start_run(ledger)
    ledger.attempt_started("r1", "s", "a", 3, started=T0, fingerprint="f", log_dir=None)
    ledger.flush()
    instance = ledger.get_instance("r1", "s", "a")
    assert instance is not None
    assert (instance.status, instance.attempts, instance.fingerprint) == ("running", 3, "f")
    assert ledger.counts("r1") == {"s": {"running": 1}}
    assert ledger.attempt_rows("r1", "s", "a")[0].outcome == "running"


def test_flush_makes_writes_visible_to_another_connection(ledger: SQLiteLedger) -> None:
    """Write methods return before anything is written; after ``flush`` a connection of
    someone else's sees every row queued before it."""
    _start_run(ledger)
    for n in range(50):
        ledger.event("r1", t=T0 + n, kind="tick")
    ledger.flush()
    with _raw(ledger.path) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (50,)
        assert conn.execute("SELECT id FROM runs").fetchall() == [("r1",)]


def test_queued_writes_are_batched_into_few_transactions(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10,000 writes queued while the writer waits for the database land in a handful of
    transactions (not one each), and ``counts`` adds them up right."""
    transactions: list[int] = []
    original = SQLiteLedger._transaction

    def counting(self: SQLiteLedger, ops: list[tuple[object, ...]]) -> None:
        transactions.append(len(ops))
        original(self, ops)

    monkeypatch.setattr(SQLiteLedger, "_transaction", counting)
    with open_ledger(state_dir) as ledger:
        blocker = _raw(ledger.path)
        blocker.execute("BEGIN IMMEDIATE")  # the writer waits (busy_timeout) behind this
        _start_run(ledger)
        for n in range(10_000):
            ledger.instance_ended(
                "r1",
                f"s{n % 2}",
                f"k{n}",
                pipeline="demo",
                status="committed" if n % 5 else "failed",
                fingerprint=None,
                ended=T0,
            )
        blocker.execute("COMMIT")
        blocker.close()
        ledger.flush()
        assert ledger.counts("r1") == {
            "s0": {"committed": 4000, "failed": 1000},
            "s1": {"committed": 4000, "failed": 1000},
        }
        assert sum(transactions) == 10_001
        assert len(transactions) <= 5, transactions


def test_reopened_ledger_keeps_its_data(state_dir: Path) -> None:
    """Closing and opening the ledger again finds every row; ``close`` is idempotent and a
    write after it is refused rather than lost silently."""
    ledger = open_ledger(state_dir)
    _start_run(ledger)
    ledger.instance_ended(
        "r1", "s", "a", pipeline="demo", status="committed", fingerprint="f", ended=T0
    )
    ledger.close()
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.event("r1", t=T0, kind="late")

    with open_ledger(state_dir) as again:
        assert [run.id for run in again.runs()] == ["r1"]
        assert again.counts("r1") == {"s": {"committed": 1}}
        assert set(again.outcomes("demo", "s")) == {"a"}


def test_discard_running_before_a_resume(ledger: SQLiteLedger) -> None:
    """Attempts still running become ``discarded`` (cause ``interrupted``) and their instances
    are forgotten so they are planned again; finished ones are untouched."""
    _start_run(ledger)
    ledger.attempt_started("r1", "s", "done", 1, started=T0, fingerprint=None, log_dir=None)
    ledger.attempt_ended("r1", "s", "done", 1, ended=T0 + 1, duration_s=1, outcome="committed")
    ledger.instance_ended(
        "r1", "s", "done", pipeline="demo", status="committed", fingerprint=None, ended=T0 + 1
    )
    ledger.attempt_started("r1", "s", "busy", 1, started=T0, fingerprint=None, log_dir=None)
    ledger.attempt_ended("r1", "s", "busy", 1, ended=T0 + 1, duration_s=1, outcome="failed")
    ledger.attempt_started("r1", "s", "busy", 2, started=T0 + 2, fingerprint=None, log_dir=None)
    ledger.discard_running("r1", ended=T0 + 100)
    ledger.flush()

    busy = ledger.attempt_rows("r1", "s", "busy")
    assert [(a.attempt, a.outcome) for a in busy] == [(1, "failed"), (2, "discarded")]
    assert (busy[1].cause, busy[1].message, busy[1].ended) == (
        DISCARDED_CAUSE,
        DISCARDED_MESSAGE,
        T0 + 100,
    )
    assert ledger.get_instance("r1", "s", "busy") is None
    assert ledger.counts("r1") == {"s": {"committed": 1}}
    assert ledger.attempt_rows("r1", "s", "done")[0].outcome == "committed"
    assert ledger.last_attempts("r1", "s") == {"done": 1, "busy": 2}


def test_a_resumed_run_keeps_its_start_and_options(ledger: SQLiteLedger) -> None:
    """``run_started`` with a known id is a resume: the run is running again under the new
    pid, its end and summary are cleared, its first start and its options are kept."""
    _start_run(ledger)
    ledger.run_ended("r1", status="interrupted", ended=T0 + 10, summary={"ok": False})
    ledger.run_started(
        "r1",
        pipeline="demo",
        pipeline_file="pipeline.yaml",
        started=T0 + 50,
        pid=4242,
        options={"stages": ["other"]},
    )
    ledger.flush()
    run = ledger.get_run("r1")
    assert run is not None
    assert (run.status, run.started, run.ended, run.pid, run.summary) == (
        "running",
        T0,
        None,
        4242,
        None,
    )
    assert run.options == {"stages": ["s"], "concurrency": 4}


def test_stage_started_again_keeps_its_first_start(ledger: SQLiteLedger) -> None:
    """A stage started again in a resumed run is running again and keeps its first start."""
    ledger.stage_started("r1", "s", position=0, total=3, started=T0)
    ledger.stage_ended("r1", "s", status="done", ended=T0 + 1)
    ledger.stage_started("r1", "s", position=0, total=3, started=T0 + 9)
    ledger.flush()
    (stage,) = ledger.stage_rows("r1")
    assert (stage.status, stage.started, stage.ended) == ("running", T0, None)


def test_get_run_by_prefix(ledger: SQLiteLedger) -> None:
    """A unique prefix finds its run, an ambiguous one is a usage error naming the matches,
    an unknown one is ``None``; no id means the newest run."""
    _start_run(ledger, "20250101T000000Z-aaaaaa", started=T0)
    _start_run(ledger, "20250101T000000Z-aabbbb", started=T0 + 1)
    _start_run(ledger, "20250202T000000Z-cccccc", started=T0 + 2)
    ledger.flush()
    newest = ledger.get_run()
    assert newest is not None
    assert newest.id == "20250202T000000Z-cccccc"
    found = ledger.get_run("20250101T000000Z-aab")
    assert found is not None
    assert found.id == "20250101T000000Z-aabbbb"
    with pytest.raises(UsageError, match="ambiguous") as info:
        ledger.get_run("20250101")
    assert "20250101T000000Z-aaaaaa" in str(info.value)
    assert "20250101T000000Z-aabbbb" in str(info.value)
    assert ledger.get_run("2026") is None
    assert [run.id for run in ledger.runs(limit=2)] == [
        "20250202T000000Z-cccccc",
        "20250101T000000Z-aabbbb",
    ]


def test_migrates_a_version_1_ledger(tmp_path: Path) -> None:
    """A ledger written in the first layout opens at the latest version with its rows intact,
    and the columns and tables added since are usable."""
    state = tmp_path / ".phalanx"
    state.mkdir()
    path = state / LEDGER_FILE
    _create_at_version(path, 1)
    with _raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
        conn.execute(
            "INSERT INTO runs (id, pipeline, pipeline_file, started, status, pid, options)"
            " VALUES ('old', 'demo', 'p.yaml', ?, 'ok', NULL, '{\"keys\": [\"a\"]}')",
            (T0,),
        )
        conn.execute(
            "INSERT INTO attempts (run_id, stage, key, attempt, started, ended, duration_s,"
            " outcome) VALUES ('old', 's', 'a', 1, ?, ?, 1.0, 'committed')",
            (T0, T0 + 1),
        )
        conn.execute(
            "INSERT INTO instances (run_id, stage, key, status, attempts)"
            " VALUES ('old', 's', 'a', 'committed', 1)"
        )
        assert "usage" not in {row[1] for row in conn.execute("PRAGMA table_info(attempts)")}
    conn.close()

    with open_ledger(state) as ledger:
        with _raw(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        conn.close()
        old = ledger.get_run("old")
        assert old is not None
        assert old.options == {"keys": ["a"]}
        (attempt,) = ledger.attempt_rows("old", "s", "a")
        assert (attempt.outcome, attempt.usage, attempt.cost_usd) == ("committed", None, None)
        assert ledger.counts("old") == {"s": {"committed": 1}}

        ledger.attempt_ended(
            "old",
            "s",
            "a",
            2,
            ended=T0 + 5,
            duration_s=1.0,
            outcome="committed",
            usage={"requests": 1},
            cost_usd=0.5,
        )
        ledger.instance_ended(
            "old", "s", "a", pipeline="demo", status="committed", fingerprint="f", ended=T0 + 5
        )
        ledger.event("old", t=T0 + 5, kind="resumed")
        ledger.flush()
        assert ledger.attempt_rows("old", "s", "a")[1].usage == {"requests": 1}
        assert set(ledger.outcomes("demo", "s")) == {"a"}


def test_a_ledger_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    """A ledger whose layout version is beyond this phalanx's is a usage error naming the
    file, both versions and the fix; it is left as it was."""
    state = tmp_path / ".phalanx"
    state.mkdir()
    path = state / LEDGER_FILE
    with _raw(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(UsageError) as info:
        open_ledger(state)
    message = str(info.value)
    assert str(path) in message
    assert f"version {SCHEMA_VERSION + 1}" in message
    assert f"up to {SCHEMA_VERSION}" in message
    assert "upgrade phalanx" in message
    with _raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    conn.close()


def test_a_file_that_is_no_database_is_a_usage_error(tmp_path: Path) -> None:
    """Something else at the ledger's path is a usage error naming the file."""
    state = tmp_path / ".phalanx"
    state.mkdir()
    (state / LEDGER_FILE).write_text("not sqlite at all, " * 100)
    with pytest.raises(UsageError, match=r"ledger\.db"):
        open_ledger(state)


def test_a_failed_write_is_raised_from_flush(ledger: SQLiteLedger) -> None:
    """A SQL error in the writer thread does not kill it silently: the next ``flush`` raises
    a ``LedgerError`` naming the write, caused by the SQLite error; the writes queued with
    it still land, and the ledger keeps working afterwards."""
    with _raw(ledger.path) as conn:
        conn.execute("DROP TABLE events")
    conn.close()
    _start_run(ledger)
    ledger.event("r1", t=T0, kind="lost")
    ledger.stage_started("r1", "s", position=0, total=1, started=T0)
    with pytest.raises(LedgerError, match="events") as info:
        ledger.flush()
    assert "could not record event('r1'" in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert [run.id for run in ledger.runs()] == ["r1"]
    assert [stage.name for stage in ledger.stage_rows("r1")] == ["s"]

    ledger.run_ended("r1", status="ok", ended=T0 + 1, summary={})
    ledger.flush()  # reported once: nothing new failed
    run = ledger.get_run("r1")
    assert run is not None
    assert run.status == "ok"


def test_a_failed_write_is_raised_from_close(state_dir: Path) -> None:
    """An error nobody flushed for is raised by ``close``, which still releases the ledger."""
    ledger = open_ledger(state_dir)
    with _raw(ledger.path) as conn:
        conn.execute("DROP TABLE events")
    conn.close()
    ledger.event("r1", t=T0, kind="lost")
    with pytest.raises(LedgerError, match="no such table"):
        ledger.close()
    ledger.close()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_running_run_whose_orchestrator_is_gone_is_crashed(ledger: SQLiteLedger) -> None:
    """``state`` is ``crashed`` for a run still recorded as running whose pid is no live
    process, ``running`` while its pid lives, and the status once the run has ended."""
    for run_id, pid in (("dead", _dead_pid()), ("live", None), ("ended", _dead_pid())):
        ledger.run_started(
            run_id, pipeline="demo", pipeline_file="p.yaml", started=T0, pid=pid, options={}
        )
    ledger.run_started(
        "alive", pipeline="demo", pipeline_file="p.yaml", started=T0, pid=os.getpid(), options={}
    )
    ledger.run_ended("ended", status="ok", ended=T0 + 1, summary={})
    ledger.flush()
    states = {run.id: run.state for run in ledger.runs()}
    assert states == {"dead": "crashed", "live": "running", "alive": "running", "ended": "ok"}


def test_reads_proceed_while_the_writer_writes(ledger: SQLiteLedger) -> None:
    """In WAL mode a reader on another thread reads throughout a stream of writes: never
    blocked, never an error, and what it counts only grows until it sees everything; a read
    does not see a transaction another connection has not committed."""
    _start_run(ledger)
    ledger.flush()
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                seen.append(sum(ledger.counts("r1").get("s", {}).values()))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(20_000):
            ledger.instance_ended(
                "r1",
                "s",
                f"k{n}",
                pipeline="demo",
                status="committed",
                fingerprint=None,
                ended=T0,
            )
            if n % 2000 == 0:
                ledger.flush()
        ledger.flush()
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert seen == sorted(seen)
    assert sum(ledger.counts("r1")["s"].values()) == 20_000

    pending = _raw(ledger.path)
    pending.execute("BEGIN IMMEDIATE")
    pending.execute("DELETE FROM instances")
    assert sum(ledger.counts("r1")["s"].values()) == 20_000
    pending.execute("ROLLBACK")
    pending.close()


def test_find_ledger_looks_in_parents(tmp_path: Path) -> None:
    """``find_ledger`` finds ``.phalanx/ledger.db`` in the folder or its nearest parent, and
    names the folder and the fix when there is none."""
    open_ledger(tmp_path / ".phalanx").close()
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert find_ledger(deep) == (tmp_path / ".phalanx" / LEDGER_FILE).resolve()
    assert find_ledger(tmp_path) == (tmp_path / ".phalanx" / LEDGER_FILE).resolve()
    lonely = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    lonely.mkdir()
    with pytest.raises(UsageError, match=r"no phalanx ledger in .* or its parents") as info:
        find_ledger(lonely)
    assert "--project DIR" in str(info.value)


def test_options_keep_plain_values(ledger: SQLiteLedger) -> None:
    """Options and usage are encoded in the writer, not by the caller; values JSON cannot hold
    (a path) are kept as text."""
    ledger.run_started(
        "r1",
        pipeline="demo",
        pipeline_file="p.yaml",
        started=T0,
        pid=None,
        options={"pipeline": Path("/x/p.yaml"), "only": ("a", "b")},
    )
    ledger.flush()
    run = ledger.get_run()
    assert run is not None
    assert run.options == {"pipeline": "/x/p.yaml", "only": ["a", "b"]}


def test_a_locked_database_fails_the_batch_at_once(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When another connection holds the write lock past the busy timeout, the writes queued
    together fail together (not one busy wait each) and ``flush`` says the database is locked;
    once the lock is gone the ledger writes again."""
    monkeypatch.setattr(ledger_module, "_BUSY_TIMEOUT_S", 0.05)
    transactions: list[int] = []
    original = SQLiteLedger._transaction

    def counting(self: SQLiteLedger, ops: list[tuple[object, ...]]) -> None:
        transactions.append(len(ops))
        original(self, ops)

    monkeypatch.setattr(SQLiteLedger, "_transaction", counting)
    with open_ledger(state_dir) as ledger:
        blocker = _raw(ledger.path)
        blocker.execute("BEGIN IMMEDIATE")
        for n in range(100):
            ledger.event("r1", t=T0 + n, kind="tick")
        with pytest.raises(LedgerError, match="locked") as info:
            ledger.flush()
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert len(transactions) < 10, transactions
        blocker.execute("ROLLBACK")
        blocker.close()
        _start_run(ledger)
        ledger.flush()
        assert [run.id for run in ledger.runs()] == ["r1"]

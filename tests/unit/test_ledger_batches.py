"""The ledger's writer merges the writes of a batch per row: the tables it leaves must be
exactly those the same writes leave when executed one by one, in order, whatever the batches."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from phalanx._ledger import (
    DISCARDED_CAUSE,
    DISCARDED_MESSAGE,
    SQLiteLedger,
    _create_at_version,
    _rows_per_statement,
    open_ledger,
)

T0 = 1_700_000_000.0
KEYS = ("a", "b", "c")
TABLES = {
    "attempts": "run_id, stage, key, attempt",
    "instances": "run_id, stage, key",
    "outcomes": "pipeline, stage, key",
    "stages": "run_id, name",
    "events": "seq",
}

# -- the reference: every write as its own statement(s), as the ledger wrote them before it
# merged its batches


def _json(value: dict[str, object] | None) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, default=str)


def _attempt_started(conn: sqlite3.Connection, *args: Any) -> None:
    run_id, stage, key, attempt, started, fingerprint, log_dir = args
    conn.execute(
        "INSERT INTO attempts (run_id, stage, key, attempt, started, outcome, log_dir)"
        " VALUES (?, ?, ?, ?, ?, 'running', ?)"
        " ON CONFLICT (run_id, stage, key, attempt) DO UPDATE SET"
        " started = excluded.started, ended = NULL, duration_s = NULL,"
        " outcome = 'running', cause = NULL, message = NULL, detail = NULL,"
        " log_dir = excluded.log_dir, usage = NULL, cost_usd = NULL",
        (run_id, stage, key, attempt, started, log_dir),
    )
    conn.execute(
        "INSERT INTO instances (run_id, stage, key, status, fingerprint, attempts, updated)"
        " VALUES (?, ?, ?, 'running', ?, ?, ?)"
        " ON CONFLICT (run_id, stage, key) DO UPDATE SET"
        " status = 'running', fingerprint = excluded.fingerprint,"
        " attempts = excluded.attempts, updated = excluded.updated,"
        " cause = NULL, message = NULL, reason = NULL",
        (run_id, stage, key, fingerprint, attempt, started),
    )


def _attempt_ended(conn: sqlite3.Connection, *args: Any) -> None:
    (run_id, stage, key, attempt, ended, duration_s, outcome, cause, message, detail, usage,
     cost_usd) = args  # fmt: skip
    conn.execute(
        "INSERT INTO attempts (run_id, stage, key, attempt, started, ended, duration_s,"
        " outcome, cause, message, detail, usage, cost_usd)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (run_id, stage, key, attempt) DO UPDATE SET"
        " ended = excluded.ended, duration_s = excluded.duration_s,"
        " outcome = excluded.outcome, cause = excluded.cause, message = excluded.message,"
        " detail = excluded.detail, usage = excluded.usage, cost_usd = excluded.cost_usd",
        (
            run_id,
            stage,
            key,
            attempt,
            ended - duration_s,
            ended,
            duration_s,
            outcome,
            cause,
            message,
            detail,
            _json(usage),
            cost_usd,
        ),
    )


def _instance_ended(conn: sqlite3.Connection, *args: Any) -> None:
    (run_id, stage, key, pipeline, status, fingerprint, cause, message, reason, attempts,
     duration_s, ended) = args  # fmt: skip
    conn.execute(
        "INSERT OR REPLACE INTO instances (run_id, stage, key, status, fingerprint, cause,"
        " message, reason, attempts, duration_s, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            run_id,
            stage,
            key,
            status,
            fingerprint,
            cause,
            message,
            reason,
            attempts,
            duration_s,
            ended,
        ),
    )
    latest = {"committed": "committed", "cached": "committed", "failed": "failed"}.get(status)
    if latest is not None:
        conn.execute(
            "INSERT OR REPLACE INTO outcomes (pipeline, stage, key, fingerprint, status, cause,"
            " message, run_id, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (pipeline, stage, key, fingerprint, latest, cause, message, run_id, ended),
        )


def _event(conn: sqlite3.Connection, *args: Any) -> None:
    run_id, t, kind, stage, key, attempt, data = args
    conn.execute(
        "INSERT INTO events (run_id, t, kind, stage, key, attempt, data)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (run_id, t, kind, stage, key, attempt, _json(data)),
    )


def _discard_running(conn: sqlite3.Connection, run_id: str, ended: float) -> None:
    conn.execute(
        "UPDATE attempts SET outcome = 'discarded', cause = ?, message = ?, ended = ?"
        " WHERE run_id = ? AND outcome = 'running'",
        (DISCARDED_CAUSE, DISCARDED_MESSAGE, ended, run_id),
    )
    conn.execute("DELETE FROM instances WHERE run_id = ? AND status = 'running'", (run_id,))


def _stage_started(conn: sqlite3.Connection, *args: Any) -> None:
    conn.execute(
        "INSERT INTO stages (run_id, name, position, total, status, started)"
        " VALUES (?, ?, ?, ?, 'running', ?)"
        " ON CONFLICT (run_id, name) DO UPDATE SET"
        " position = excluded.position, total = excluded.total, status = 'running',"
        " started = coalesce(stages.started, excluded.started), ended = NULL,"
        " skipped_reason = NULL",
        args,
    )


REFERENCE: dict[str, Callable[..., None]] = {
    "attempt_started": _attempt_started,
    "attempt_ended": _attempt_ended,
    "instance_ended": _instance_ended,
    "event": _event,
    "discard_running": _discard_running,
    "stage_started": _stage_started,
}

# -- random writes -------------------------------------------------------------------------


def _writes(rng: random.Random, n: int) -> Iterator[tuple[Any, ...]]:
    """``n`` random writes to a few rows, each as (name, arguments...) like the ledger's
    queue holds them."""
    for step in range(n):
        t = T0 + step
        key = rng.choice(KEYS)
        attempt = rng.randint(1, 3)
        stage = rng.choice(("s", "s", "t"))
        kind = rng.choices(
            ["attempt_started", "attempt_ended", "instance_ended", "event", "other"],
            weights=[5, 5, 3, 2, 1],
        )[0]
        if kind == "attempt_started":
            yield (kind, "r1", stage, key, attempt, t, f"f{rng.randint(0, 2)}", f"L/{key}")
        elif kind == "attempt_ended":
            usage = rng.choice([None, {"requests": step}])
            outcome = rng.choice(["committed", "failed", "discarded"])
            cost = rng.choice([None, 0.5])
            yield (kind, "r1", stage, key, attempt, t, rng.random(), outcome,
                   rng.choice([None, "error"]), f"m{step}", f"d{step}", usage, cost)  # fmt: skip
        elif kind == "instance_ended":
            status = rng.choice(["committed", "cached", "failed", "skipped"])
            yield (kind, "r1", stage, key, "demo", status, rng.choice([None, "fp"]),
                   rng.choice([None, "error"]), f"m{step}", rng.choice([None, "cancelled"]),
                   attempt, rng.random(), t)  # fmt: skip
        elif kind == "event":
            yield (kind, "r1", t, "AttemptEnded", stage, key, attempt,
                   rng.choice([None, {"n": step}]))  # fmt: skip
        elif rng.random() < 0.5:
            yield ("discard_running", "r1", t)
        else:
            yield ("stage_started", "r1", stage, 0, 3, t)


def _send(ledger: SQLiteLedger, write: tuple[Any, ...]) -> None:
    """A write through the ledger's public method of that name."""
    name, args = write[0], write[1:]
    if name == "attempt_started":
        run_id, stage, key, attempt, started, fingerprint, log_dir = args
        ledger.attempt_started(
            run_id, stage, key, attempt, started=started, fingerprint=fingerprint, log_dir=log_dir
        )
    elif name == "attempt_ended":
        (run_id, stage, key, attempt, ended, duration_s, outcome, cause, message, detail, usage,
         cost_usd) = args  # fmt: skip
        ledger.attempt_ended(
            run_id, stage, key, attempt, ended=ended, duration_s=duration_s, outcome=outcome,
            cause=cause, message=message, detail=detail, usage=usage, cost_usd=cost_usd,
        )  # fmt: skip
    elif name == "instance_ended":
        (run_id, stage, key, pipeline, status, fingerprint, cause, message, reason, attempts,
         duration_s, ended) = args  # fmt: skip
        ledger.instance_ended(
            run_id, stage, key, pipeline=pipeline, status=status, fingerprint=fingerprint,
            cause=cause, message=message, reason=reason, attempts=attempts,
            duration_s=duration_s, ended=ended,
        )  # fmt: skip
    elif name == "event":
        run_id, t, kind, stage, key, attempt, data = args
        ledger.event(run_id, t=t, kind=kind, stage=stage, key=key, attempt=attempt, data=data)
    elif name == "discard_running":
        ledger.discard_running(args[0], ended=args[1])
    else:
        run_id, stage, position, total, started = args
        ledger.stage_started(run_id, stage, position=position, total=total, started=started)


def _tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(path)
    try:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()  # noqa: S608 - constant names
            for table, order in TABLES.items()
        }
    finally:
        conn.close()


@pytest.mark.parametrize("seed", range(40))
def test_batches_leave_the_rows_one_by_one_writes_leave(tmp_path: Path, seed: int) -> None:
    """Random writes to a few rows (attempts that start and end, instances that end, start
    again, are discarded; events; stages), sent in batches of random size, leave every table
    exactly as the same writes executed one statement at a time, in order."""
    rng = random.Random(seed)  # noqa: S311 - seeded test data, not secrets
    writes = list(_writes(rng, 120))
    reference_path = tmp_path / "reference.db"
    _create_at_version(reference_path, 2)
    reference = sqlite3.connect(reference_path, isolation_level=None)
    for name, *args in writes:
        REFERENCE[name](reference, *args)
    reference.close()

    with open_ledger(tmp_path / ".phalanx") as ledger:
        for write in writes:
            _send(ledger, write)
            if rng.random() < 0.08:
                ledger.flush()
        ledger.flush()
        merged = _tables(ledger.path)

    assert merged == _tables(reference_path)


def test_a_batch_larger_than_one_statement_is_written_whole(tmp_path: Path) -> None:
    """A batch of thousands of attempts, more rows than one statement takes, lands whole:
    every attempt one row with its start and end merged, every instance its final row."""
    with open_ledger(tmp_path / ".phalanx") as ledger:
        blocker = sqlite3.connect(ledger.path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the writes pile up into one batch
        for n in range(3_001):
            key = f"k{n}"
            ledger.attempt_started(
                "r1", "s", key, 1, started=T0, fingerprint="f", log_dir=f"L/{key}"
            )
            ledger.attempt_ended(
                "r1", "s", key, 1, ended=T0 + 2, duration_s=1.5, outcome="committed"
            )
            ledger.instance_ended(
                "r1", "s", key, pipeline="demo", status="committed", fingerprint="f", ended=T0
            )
        ledger.attempt_started("r1", "s", "late", 1, started=T0, fingerprint="f", log_dir=None)
        blocker.execute("COMMIT")
        blocker.close()
        ledger.flush()
        assert ledger.counts("r1") == {"s": {"committed": 3_001, "running": 1}}
        (row,) = ledger.attempt_rows("r1", "s", "k2999")
        assert (row.started, row.ended, row.duration_s) == (T0, T0 + 2, 1.5)
        assert (row.outcome, row.log_dir) == ("committed", "L/k2999")
        assert len(ledger.outcomes("demo", "s")) == 3_001


def test_rows_per_statement_stay_within_sqlite_limit_on_bound_values() -> None:
    """Every row width gets a power of two of rows whose values SQLite can bind in one
    statement, even where it allows only 999 (SQLite before 3.32)."""
    for limit in (999, 32_766, 250_000):
        for width, rows in _rows_per_statement(limit).items():
            assert rows & (rows - 1) == 0
            assert 1 <= rows * width <= limit

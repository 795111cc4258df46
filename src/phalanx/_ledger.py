"""The ledger: the durable record of runs, stages, instances, attempts, events and outcomes.

One SQLite file per project, ``<project>/.phalanx/ledger.db``, in WAL mode so that readers
(``phalanx status`` in another terminal) never wait for the orchestrator writing it.

Writes come from the event loop, thousands of times a second, so a write method only puts a
small tuple on a queue and returns: no JSON encoding, no SQL on the caller's thread. One daemon
writer thread owns the write connection; it takes whatever is queued (up to :data:`_BATCH`
items) and records all of it in one transaction, the per-instance writes merged per row and
written with a few multi-row statements (:class:`_Merged`). :meth:`Ledger.flush` waits until
everything queued before it is committed; a write that failed in the writer thread is raised,
as a :class:`LedgerError`, from the next :meth:`~Ledger.flush` or :meth:`~Ledger.close`.
Mappings (options, usage, data, summary) are encoded as JSON in the writer thread, so pass ones
you will not change afterwards.

Reads are synchronous and open their own read-only connection, so they work from any thread and
while another process writes. They see what is committed: call :meth:`~Ledger.flush` first to
read your own writes.

The schema is versioned by ``PRAGMA user_version``: entry ``i`` of :data:`_MIGRATIONS` brings
version ``i`` to ``i + 1``, and opening a ledger applies every missing one, each in its own
transaction. A ledger written by a newer phalanx is refused with a :class:`UsageError`.

The ledger stores what its callers pass and nothing else: no environment, no secrets.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import itertools
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

from ._errors import PhalanxError, UsageError
from ._pipeline import STATE_DIR

__all__ = [
    "LEDGER_FILE",
    "AttemptOutcome",
    "AttemptRow",
    "EventRow",
    "InstanceRow",
    "InstanceStatus",
    "Ledger",
    "LedgerError",
    "OutcomeRow",
    "RunRow",
    "RunStatus",
    "SQLiteLedger",
    "StageRow",
    "StageStatus",
    "find_ledger",
    "open_ledger",
]

LEDGER_FILE = "ledger.db"
"""The ledger's file name inside the project's state folder (``STATE_DIR``)."""

RunStatus = Literal["running", "ok", "failed", "interrupted", "halted"]
StageStatus = Literal["running", "done", "skipped"]
InstanceStatus = Literal["running", "committed", "cached", "failed", "skipped"]
AttemptOutcome = Literal["running", "committed", "failed", "discarded"]

_BUSY_TIMEOUT_S: Final = 5.0
_BATCH: Final = 50_000
"""The most queued writes the writer executes in one transaction."""
_LINGER_S: Final = 0.05
"""How long the writer lets writes gather after the first one arrives: one transaction of
thousands costs a fraction of thousands of transactions, and a thread that woke for every
write would fight the event loop for the GIL."""

DISCARDED_CAUSE: Final = "interrupted"
DISCARDED_MESSAGE: Final = "the orchestrator stopped while it ran"

_MIGRATIONS: Final[list[str]] = [
    # 1: the first layout.
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        pipeline TEXT NOT NULL,
        pipeline_file TEXT NOT NULL,
        started REAL NOT NULL,
        ended REAL,
        status TEXT NOT NULL,
        pid INTEGER,
        options TEXT NOT NULL DEFAULT '{}',
        summary TEXT
    );
    CREATE TABLE stages (
        run_id TEXT,
        name TEXT,
        position INTEGER,
        total INTEGER,
        status TEXT,
        started REAL,
        ended REAL,
        skipped_reason TEXT,
        PRIMARY KEY (run_id, name)
    );
    CREATE TABLE instances (
        run_id TEXT,
        stage TEXT,
        key TEXT,
        status TEXT NOT NULL,
        fingerprint TEXT,
        cause TEXT,
        message TEXT,
        reason TEXT,
        attempts INTEGER,
        duration_s REAL,
        updated REAL,
        PRIMARY KEY (run_id, stage, key)
    );
    CREATE TABLE attempts (
        run_id TEXT,
        stage TEXT,
        key TEXT,
        attempt INTEGER,
        started REAL,
        ended REAL,
        duration_s REAL,
        outcome TEXT,
        cause TEXT,
        message TEXT,
        detail TEXT,
        log_dir TEXT,
        PRIMARY KEY (run_id, stage, key, attempt)
    );
    """,
    # 2: usage and cost per attempt, the event log, outcomes across runs.
    """
    ALTER TABLE attempts ADD COLUMN usage TEXT;
    ALTER TABLE attempts ADD COLUMN cost_usd REAL;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        run_id TEXT,
        t REAL,
        kind TEXT,
        stage TEXT,
        key TEXT,
        attempt INTEGER,
        data TEXT
    );
    CREATE TABLE outcomes (
        pipeline TEXT,
        stage TEXT,
        key TEXT,
        fingerprint TEXT,
        status TEXT,
        cause TEXT,
        message TEXT,
        run_id TEXT,
        updated REAL,
        PRIMARY KEY (pipeline, stage, key)
    );
    CREATE INDEX instances_by_status ON instances (run_id, stage, status);
    """,
]
SCHEMA_VERSION: Final = len(_MIGRATIONS)
"""The ledger layout this code writes and reads."""


class LedgerError(PhalanxError):
    """A queued write could not be recorded (a SQL error in the writer thread, a locked or full
    disk). Raised from the :meth:`Ledger.flush` or :meth:`Ledger.close` that follows it, with
    the SQLite error as its ``__cause__``; the writes queued with it that could be recorded
    were. Unlike a :class:`UsageError`, nothing the user wrote is wrong."""


# --------------------------------------------------------------------------------------------
# Rows


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, just not ours to signal
        return True
    return True


@dataclass(frozen=True)
class RunRow:
    """One run: how it was started (``options``) and, once ended, its ``summary``."""

    id: str
    pipeline: str
    pipeline_file: str
    started: float
    ended: float | None
    status: str
    pid: int | None
    options: Mapping[str, object]
    summary: Mapping[str, object] | None

    @property
    def state(self) -> str:
        """``status``, except ``crashed`` for a run recorded as ``running`` whose orchestrator
        (``pid``) is not a live process on this machine."""
        if self.status == "running" and self.pid is not None and not _alive(self.pid):
            return "crashed"
        return self.status

    @property
    def wall_s(self) -> float | None:
        """Seconds from start to end; ``None`` until the run has ended."""
        return None if self.ended is None else self.ended - self.started


@dataclass(frozen=True)
class StageRow:
    """One stage of a run: its place among the run's stages (``position``), its planned
    instance count (``total``) and ``status`` ``running``, ``done`` or ``skipped`` (with
    ``skipped_reason``)."""

    run_id: str
    name: str
    position: int | None
    total: int | None
    status: str | None
    started: float | None
    ended: float | None
    skipped_reason: str | None


@dataclass(frozen=True)
class InstanceRow:
    """One instance in one run: ``running``, ``committed``, ``cached``, ``failed`` (with
    ``cause`` and ``message``) or ``skipped`` (with ``reason``)."""

    run_id: str
    stage: str
    key: str
    status: str
    fingerprint: str | None
    cause: str | None
    message: str | None
    reason: str | None
    attempts: int | None
    duration_s: float | None
    updated: float | None


@dataclass(frozen=True)
class AttemptRow:
    """One attempt: ``outcome`` ``running``, ``committed``, ``failed`` or ``discarded`` (the
    orchestrator stopped while it ran); ``detail`` is the traceback or stderr tail, ``log_dir``
    the folder of its logs relative to the project."""

    run_id: str
    stage: str
    key: str
    attempt: int
    started: float | None
    ended: float | None
    duration_s: float | None
    outcome: str | None
    cause: str | None
    message: str | None
    detail: str | None
    log_dir: str | None
    usage: Mapping[str, object] | None
    cost_usd: float | None


@dataclass(frozen=True)
class OutcomeRow:
    """The latest outcome of one partition across runs: ``committed`` (committed or found
    cached) or ``failed``, with the fingerprint of the inputs it was made from."""

    pipeline: str
    stage: str
    key: str
    fingerprint: str | None
    status: str
    cause: str | None
    message: str | None
    run_id: str | None
    updated: float | None


@dataclass(frozen=True)
class EventRow:
    """One entry of a run's event log: its ``kind`` (the event's class name), where it
    happened, and its ``data``."""

    run_id: str
    t: float
    kind: str
    stage: str | None
    key: str | None
    attempt: int | None
    data: Mapping[str, object] | None


# --------------------------------------------------------------------------------------------
# The interface


class Ledger(abc.ABC):
    """Where runs are recorded. :class:`SQLiteLedger` is the only store today.

    Write methods record and return at once (the store may write later); :meth:`flush` waits
    until everything recorded before it is durable and raises what failed. Read methods are
    synchronous and see what is durable. Times are ``time.time()`` floats. A ledger is a
    context manager that closes itself.
    """

    # -- writes --------------------------------------------------------------------------

    @abc.abstractmethod
    def run_started(
        self,
        run_id: str,
        *,
        pipeline: str,
        pipeline_file: str,
        started: float,
        pid: int | None,
        options: Mapping[str, object],
    ) -> None:
        """A run started. ``options`` says how (stage selection, keys, settings, flags). A run
        id recorded already is a resumed run: it is ``running`` again with the new ``pid``, and
        keeps its first ``started`` and ``options``."""

    @abc.abstractmethod
    def run_ended(
        self, run_id: str, *, status: RunStatus, ended: float, summary: Mapping[str, object]
    ) -> None:
        """A run ended with ``status`` and the caller's ``summary``."""

    @abc.abstractmethod
    def stage_started(
        self, run_id: str, stage: str, *, position: int, total: int, started: float
    ) -> None:
        """A stage started: ``position`` is its place among the run's stages, ``total`` its
        planned instance count. A stage started again (a resumed run) keeps its first start."""

    @abc.abstractmethod
    def stage_ended(
        self,
        run_id: str,
        stage: str,
        *,
        status: StageStatus,
        ended: float,
        skipped_reason: str | None = None,
        position: int | None = None,
        total: int | None = None,
    ) -> None:
        """A stage ended (``done``) or was skipped without starting (``position`` and ``total``
        then place it among the others)."""

    @abc.abstractmethod
    def attempt_started(
        self,
        run_id: str,
        stage: str,
        key: str,
        attempt: int,
        *,
        started: float,
        fingerprint: str | None,
        log_dir: str | None,
    ) -> None:
        """Attempt ``attempt`` (from 1) of an instance started; the instance is ``running``."""

    @abc.abstractmethod
    def attempt_ended(
        self,
        run_id: str,
        stage: str,
        key: str,
        attempt: int,
        *,
        ended: float,
        duration_s: float,
        outcome: AttemptOutcome,
        cause: str | None = None,
        message: str = "",
        detail: str = "",
        usage: Mapping[str, object] | None = None,
        cost_usd: float | None = None,
    ) -> None:
        """An attempt ended with ``outcome``; a failed one with its ``cause``, ``message`` and
        ``detail`` (traceback or stderr tail); ``usage`` is what it spent."""

    @abc.abstractmethod
    def instance_ended(
        self,
        run_id: str,
        stage: str,
        key: str,
        *,
        pipeline: str,
        status: InstanceStatus,
        fingerprint: str | None,
        cause: str | None = None,
        message: str = "",
        reason: str | None = None,
        attempts: int = 0,
        duration_s: float = 0.0,
        ended: float,
    ) -> None:
        """An instance ended. A ``committed``, ``cached`` or ``failed`` one also becomes the
        partition's latest outcome in ``pipeline`` (see :meth:`outcomes`)."""

    @abc.abstractmethod
    def event(
        self,
        run_id: str,
        *,
        t: float,
        kind: str,
        stage: str | None = None,
        key: str | None = None,
        attempt: int | None = None,
        data: Mapping[str, object] | None = None,
    ) -> None:
        """Append one event to the run's event log."""

    @abc.abstractmethod
    def discard_running(self, run_id: str, *, ended: float) -> None:
        """Before resuming a run that crashed or was stopped: its attempts still ``running``
        become ``discarded``, its instances still ``running`` are forgotten (they are planned
        again)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Wait until every write recorded before this call is durable; raise
        :class:`LedgerError` if one failed since the last flush."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush, then release everything. Calling it again does nothing."""

    # -- reads ---------------------------------------------------------------------------

    @abc.abstractmethod
    def runs(self, limit: int | None = None) -> list[RunRow]:
        """Runs, newest first."""

    @abc.abstractmethod
    def get_run(self, run_id: str | None = None) -> RunRow | None:
        """The run with this id or unique id prefix (``None``: the newest); ``None`` when there
        is none. An ambiguous prefix raises :class:`UsageError` listing the matches."""

    @abc.abstractmethod
    def stage_rows(self, run_id: str) -> list[StageRow]:
        """The run's stages in run order."""

    @abc.abstractmethod
    def counts(self, run_id: str) -> dict[str, dict[str, int]]:
        """Stage -> instance status -> how many."""

    @abc.abstractmethod
    def causes(self, run_id: str) -> dict[str, dict[str, int]]:
        """Stage -> cause -> how many failed instances."""

    @abc.abstractmethod
    def failures(
        self,
        run_id: str,
        stage: str | None = None,
        limit: int | None = None,
        *,
        cause: str | None = None,
    ) -> list[InstanceRow]:
        """Failed instances (of one stage, with one cause), by stage and key."""

    @abc.abstractmethod
    def get_instance(self, run_id: str, stage: str, key: str) -> InstanceRow | None:
        """One instance, or ``None``."""

    @abc.abstractmethod
    def keys(self, run_id: str, stage: str, limit: int | None = None) -> list[str]:
        """The keys recorded in one stage of a run, sorted."""

    @abc.abstractmethod
    def attempt_rows(self, run_id: str, stage: str, key: str) -> list[AttemptRow]:
        """One instance's attempts by attempt number."""

    @abc.abstractmethod
    def run_instances(self, run_id: str) -> list[InstanceRow]:
        """Every instance of a run, by stage and key (for reports)."""

    @abc.abstractmethod
    def run_attempts(self, run_id: str) -> list[AttemptRow]:
        """Every attempt of a run, by stage, key and attempt number (for reports)."""

    @abc.abstractmethod
    def run_events(self, run_id: str) -> list[EventRow]:
        """The run's event log in the order it was written."""

    @abc.abstractmethod
    def last_attempts(self, run_id: str, stage: str) -> dict[str, int]:
        """Key -> the highest attempt number recorded in this stage of this run."""

    @abc.abstractmethod
    def outcomes(
        self, pipeline: str, stage: str, status: str | None = None
    ) -> dict[str, OutcomeRow]:
        """Key -> the latest outcome of each partition of ``stage`` across runs."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Opening and finding


def open_ledger(state_dir: Path) -> SQLiteLedger:
    """The ledger in ``state_dir`` (a project's ``.phalanx`` folder), created if needed and
    migrated to the current layout."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{state_dir}: cannot create phalanx's state folder: {exc}") from exc
    return SQLiteLedger(state_dir / LEDGER_FILE)


def find_ledger(start: Path) -> Path:
    """The ledger file of the project holding ``start``: ``.phalanx/ledger.db`` in ``start``
    or the nearest of its parents, as git finds ``.git``."""
    start = start.resolve()
    for folder in (start, *start.parents):
        candidate = folder / STATE_DIR / LEDGER_FILE
        if candidate.is_file():
            return candidate
    raise UsageError(
        f"no phalanx ledger in {start} or its parents: run a pipeline there first, "
        "or pass --project DIR"
    )


def _statements(script: str) -> Iterator[str]:
    """The SQL statements of ``script``, one by one (``executescript`` would commit)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n\t;"):
                yield pending.strip()
            pending = ""


def _version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def _too_new(path: Path, version: int) -> UsageError:
    return UsageError(
        f"{path}: this ledger has layout version {version}, but this phalanx knows layouts up "
        f"to {SCHEMA_VERSION}: upgrade phalanx to read or write it"
    )


def _migrate(conn: sqlite3.Connection, path: Path, target: int = SCHEMA_VERSION) -> None:
    """Apply the missing migrations up to ``target``, each in one transaction. The version is
    read again inside each transaction, so two processes opening one ledger do not both
    migrate it."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _version(conn)
            if version > SCHEMA_VERSION:
                raise _too_new(path, version)
            if version >= target:
                conn.execute("COMMIT")
                return
            for statement in _statements(_MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
    return conn


def _create_at_version(path: Path, version: int) -> None:
    """Create (or bring) the ledger at ``path`` to layout ``version`` exactly: for testing
    migrations from older layouts."""
    conn = _connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        _migrate(conn, path, version)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# The SQLite ledger

_Op = tuple[Any, ...]
"""A queued write: its name, then its arguments, exactly as the caller passed them."""


class _Stop:
    """The marker :meth:`SQLiteLedger.close` queues to end the writer thread."""


_STOP: Final = _Stop()


def _json(value: Mapping[str, object] | None) -> str | None:
    if value is None:
        return None
    # default=str: paths and other plain values in options read back as text, not an error.
    return json.dumps(dict(value), ensure_ascii=False, default=str)


def _decode(text: str | None) -> dict[str, object] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else {"value": value}


def _outcome_status(status: str) -> str | None:
    if status in ("committed", "cached"):
        return "committed"
    return "failed" if status == "failed" else None


_RUN_COLUMNS = "id, pipeline, pipeline_file, started, ended, status, pid, options, summary"
_INSTANCE_COLUMNS = (
    "run_id, stage, key, status, fingerprint, cause, message, reason, attempts, duration_s, updated"
)
_ATTEMPT_COLUMNS = (
    "run_id, stage, key, attempt, started, ended, duration_s, outcome, cause, message, detail, "
    "log_dir, usage, cost_usd"
)
_OUTCOME_COLUMNS = "pipeline, stage, key, fingerprint, status, cause, message, run_id, updated"


def _run_row(row: tuple[Any, ...]) -> RunRow:
    run_id, pipeline, pipeline_file, started, ended, status, pid, options, summary = row
    return RunRow(
        run_id,
        pipeline,
        pipeline_file,
        started,
        ended,
        status,
        pid,
        _decode(options) or {},
        _decode(summary),
    )


def _attempt_row(row: tuple[Any, ...]) -> AttemptRow:
    (run_id, stage, key, attempt, started, ended, duration_s, outcome, cause, message, detail,
     log_dir, usage, cost_usd) = row  # fmt: skip
    return AttemptRow(
        run_id=run_id,
        stage=stage,
        key=key,
        attempt=attempt,
        started=started,
        ended=ended,
        duration_s=duration_s,
        outcome=outcome,
        cause=cause,
        message=message,
        detail=detail,
        log_dir=log_dir,
        usage=_decode(usage),
        cost_usd=cost_usd,
    )


# --------------------------------------------------------------------------------------------
# The writer's batches: merged per row, written with multi-row statements

_ROWS: Final = 256
"""The most rows one statement inserts."""
_MERGED: Final = frozenset({"attempt_started", "attempt_ended", "instance_ended", "event"})
"""The writes :class:`_Merged` takes: the per-instance ones, thousands a second."""

_AttemptKey = tuple[str, str, str, int]
_InstanceKey = tuple[str, str, str]

# What the merged rows are written with. Whole rows replace what was there; the other two
# change some columns of a row that may exist already (an attempt that started in an earlier
# transaction ends; an instance starts an attempt).
_ALL_ATTEMPT = f"INSERT OR REPLACE INTO attempts ({_ATTEMPT_COLUMNS})"
_ATTEMPT_END = (
    "INSERT INTO attempts (run_id, stage, key, attempt, started, ended, duration_s, outcome,"
    " cause, message, detail, usage, cost_usd)"
)
_ATTEMPT_END_UPDATE = (
    " ON CONFLICT (run_id, stage, key, attempt) DO UPDATE SET"
    " ended = excluded.ended, duration_s = excluded.duration_s,"
    " outcome = excluded.outcome, cause = excluded.cause, message = excluded.message,"
    " detail = excluded.detail, usage = excluded.usage, cost_usd = excluded.cost_usd"
)
_RUNNING = "INSERT INTO instances (run_id, stage, key, status, fingerprint, attempts, updated)"
_RUNNING_UPDATE = (
    " ON CONFLICT (run_id, stage, key) DO UPDATE SET"
    " status = excluded.status, fingerprint = excluded.fingerprint,"
    " attempts = excluded.attempts, updated = excluded.updated,"
    " cause = NULL, message = NULL, reason = NULL"
)
_ALL_INSTANCE = f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLUMNS})"
_ALL_OUTCOME = f"INSERT OR REPLACE INTO outcomes ({_OUTCOME_COLUMNS})"
_EVENT = "INSERT INTO events (run_id, t, kind, stage, key, attempt, data)"


def _rows_per_statement(variables: int) -> dict[int, int]:
    """Row width -> the most rows one statement takes (a power of two), within SQLite's limit
    on bound values."""
    most: dict[int, int] = {}
    for width in (7, 9, 11, 13, 14):
        rows = max(1, min(_ROWS, variables // width))
        most[width] = 1 << (rows.bit_length() - 1)
    return most


@functools.cache
def _values_sql(head: str, tail: str, width: int, rows: int) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return f"{head} VALUES {', '.join([one] * rows)}{tail}"


class _Merged:
    """The per-instance writes of one transaction, merged per row and written with a few
    multi-row statements.

    Within a batch, most attempts both start and end, and most instances start their attempt
    and end: each becomes one row in ``attempts`` and one in ``instances`` instead of a
    statement per write. The rows that result are exactly those the writes would leave one
    by one, in order. Few statements also mean few hand-overs of the GIL: ``sqlite3`` releases
    it for every statement it steps, and each release is a chance for the writer and the event
    loop to fight over it. Rows are written in groups whose sizes are powers of two, so that
    SQLite's statement cache keeps every statement this needs.
    """

    def __init__(self, most: Mapping[int, int]) -> None:
        self.most = most
        self.attempts: dict[_AttemptKey, list[Any]] = {}  # whole rows
        self.attempt_ends: dict[_AttemptKey, list[Any]] = {}  # an end, started earlier
        self.running: dict[_InstanceKey, list[Any]] = {}  # an attempt started, nothing else
        self.instances: dict[_InstanceKey, list[Any]] = {}  # whole rows
        self.outcomes: dict[_InstanceKey, tuple[Any, ...]] = {}  # whole rows
        self.events: list[tuple[Any, ...]] = []

    def add(self, op: _Op) -> None:
        """Merge one write (a name in :data:`_MERGED`) into the rows."""
        name = op[0]
        if name == "attempt_ended":
            self._attempt_ended(*op[1:])
        elif name == "attempt_started":
            self._attempt_started(*op[1:])
        elif name == "instance_ended":
            self._instance_ended(*op[1:])
        else:
            run_id, t, kind, stage, key, attempt, data = op[1:]
            self.events.append((run_id, t, kind, stage, key, attempt, _json(data)))

    def _attempt_started(
        self,
        run_id: str,
        stage: str,
        key: str,
        attempt: int,
        started: float,
        fingerprint: str | None,
        log_dir: str | None,
    ) -> None:
        # The attempt's row whole: a start resets every column an earlier write set.
        where = (run_id, stage, key, attempt)
        self.attempt_ends.pop(where, None)
        self.attempts[where] = [
            run_id, stage, key, attempt, started, None, None, "running", None, None, None,
            log_dir, None, None,
        ]  # fmt: skip
        instance = self.instances.get(where[:3])
        if instance is None:
            self.running[(run_id, stage, key)] = [
                run_id, stage, key, "running", fingerprint, attempt, started,
            ]  # fmt: skip
        else:  # the instance ended earlier in this batch and runs again: keep duration_s
            instance[3:9] = ["running", fingerprint, None, None, None, attempt]
            instance[10] = started

    def _attempt_ended(
        self,
        run_id: str,
        stage: str,
        key: str,
        attempt: int,
        ended: float,
        duration_s: float,
        outcome: str,
        cause: str | None,
        message: str,
        detail: str,
        usage: Mapping[str, object] | None,
        cost_usd: float | None,
    ) -> None:
        where = (run_id, stage, key, attempt)
        usage_json = _json(usage)
        row = self.attempts.get(where)
        if row is not None:  # started in this batch
            row[5:11] = [ended, duration_s, outcome, cause, message, detail]
            row[12:14] = [usage_json, cost_usd]
            return
        earlier = self.attempt_ends.get(where)
        # The start a new row gets when none was recorded: the first end's, as one by one.
        started = earlier[4] if earlier is not None else ended - duration_s
        self.attempt_ends[where] = [
            run_id, stage, key, attempt, started, ended, duration_s, outcome, cause, message,
            detail, usage_json, cost_usd,
        ]  # fmt: skip

    def _instance_ended(
        self,
        run_id: str,
        stage: str,
        key: str,
        pipeline: str,
        status: str,
        fingerprint: str | None,
        cause: str | None,
        message: str,
        reason: str | None,
        attempts: int,
        duration_s: float,
        ended: float,
    ) -> None:
        where = (run_id, stage, key)
        self.running.pop(where, None)
        self.instances[where] = [
            run_id, stage, key, status, fingerprint, cause, message, reason, attempts,
            duration_s, ended,
        ]  # fmt: skip
        latest = _outcome_status(status)
        if latest is not None:
            self.outcomes[(pipeline, stage, key)] = (
                pipeline, stage, key, fingerprint, latest, cause, message, run_id, ended,
            )  # fmt: skip

    def write(self, conn: sqlite3.Connection) -> None:
        """Execute what was merged so far, then start afresh. The groups touch different
        rows, so their order does not matter; events keep theirs."""
        self._insert(conn, _ALL_ATTEMPT, "", list(self.attempts.values()))
        self._insert(conn, _ATTEMPT_END, _ATTEMPT_END_UPDATE, list(self.attempt_ends.values()))
        self._insert(conn, _RUNNING, _RUNNING_UPDATE, list(self.running.values()))
        self._insert(conn, _ALL_INSTANCE, "", list(self.instances.values()))
        self._insert(conn, _ALL_OUTCOME, "", list(self.outcomes.values()))
        self._insert(conn, _EVENT, "", self.events)
        self.attempts, self.attempt_ends, self.running = {}, {}, {}
        self.instances, self.outcomes, self.events = {}, {}, []

    def _insert(
        self, conn: sqlite3.Connection, head: str, tail: str, rows: Sequence[Sequence[Any]]
    ) -> None:
        if not rows:
            return
        width = len(rows[0])
        most = self.most[width]
        done = 0
        while done < len(rows):
            left = len(rows) - done
            size = most if left >= most else 1 << (left.bit_length() - 1)
            values = list(itertools.chain.from_iterable(rows[done : done + size]))
            conn.execute(_values_sql(head, tail, width, size), values)
            done += size


class SQLiteLedger(Ledger):
    """The ledger in one SQLite file (see the module's docstring for how it writes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[_Op | threading.Event | _Stop] = queue.SimpleQueue()
        self._error: LedgerError | None = None
        self._error_lock = threading.Lock()
        self._hurry = threading.Event()  # set by flush() and close(): stop lingering
        self._closed = False
        self._close_lock = threading.Lock()
        self._conn = self._open()
        self._rows_per_statement = _rows_per_statement(
            self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        )
        self._thread = threading.Thread(
            target=self._write_loop, name=f"phalanx-ledger:{path}", daemon=True
        )
        self._thread.start()

    def _open(self) -> sqlite3.Connection:
        try:
            conn = _connect(self.path)
        except sqlite3.Error as exc:
            raise UsageError(f"{self.path}: cannot open the ledger: {exc}") from exc
        try:
            version = _version(conn)  # before anything writes to a ledger we may not know
            if version > SCHEMA_VERSION:
                raise _too_new(self.path, version)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            _migrate(conn, self.path)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise UsageError(
                f"{self.path}: not a usable phalanx ledger ({exc}); move it aside and run again"
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def __repr__(self) -> str:
        return f"SQLiteLedger({str(self.path)!r})"

    # -- writes: queue and return ----------------------------------------------------------

    def _put(self, op: _Op) -> None:
        if self._closed:
            raise LedgerError(f"the ledger {self.path} is closed: {op[0]} was not recorded")
        self._queue.put(op)

    def run_started(
        self,
        run_id: str,
        *,
        pipeline: str,
        pipeline_file: str,
        started: float,
        pid: int | None,
        options: Mapping[str, object],
    ) -> None:
        self._put(("run_started", run_id, pipeline, pipeline_file, started, pid, options))

    def run_ended(
        self, run_id: str, *, status: RunStatus, ended: float, summary: Mapping[str, object]
    ) -> None:
        self._put(("run_ended", run_id, status, ended, summary))

    def stage_started(
        self, run_id: str, stage: str, *, position: int, total: int, started: float
    ) -> None:
        self._put(("stage_started", run_id, stage, position, total, started))

    def stage_ended(
        self,
        run_id: str,
        stage: str,
        *,
        status: StageStatus,
        ended: float,
        skipped_reason: str | None = None,
        position: int | None = None,
        total: int | None = None,
    ) -> None:
        self._put(("stage_ended", run_id, stage, status, ended, skipped_reason, position, total))

    def attempt_started(
        self,
        run_id: str,
        stage: str,
        key: str,
        attempt: int,
        *,
        started: float,
        fingerprint: str | None,
        log_dir: str | None,
    ) -> None:
        self._put(("attempt_started", run_id, stage, key, attempt, started, fingerprint, log_dir))

    def attempt_ended(
        self,
        run_id: str,
        stage: str,
        key: str,
        attempt: int,
        *,
        ended: float,
        duration_s: float,
        outcome: AttemptOutcome,
        cause: str | None = None,
        message: str = "",
        detail: str = "",
        usage: Mapping[str, object] | None = None,
        cost_usd: float | None = None,
    ) -> None:
        self._put(
            (
                "attempt_ended",
                run_id,
                stage,
                key,
                attempt,
                ended,
                duration_s,
                outcome,
                cause,
                message,
                detail,
                usage,
                cost_usd,
            )
        )

    def instance_ended(
        self,
        run_id: str,
        stage: str,
        key: str,
        *,
        pipeline: str,
        status: InstanceStatus,
        fingerprint: str | None,
        cause: str | None = None,
        message: str = "",
        reason: str | None = None,
        attempts: int = 0,
        duration_s: float = 0.0,
        ended: float,
    ) -> None:
        self._put(
            (
                "instance_ended",
                run_id,
                stage,
                key,
                pipeline,
                status,
                fingerprint,
                cause,
                message,
                reason,
                attempts,
                duration_s,
                ended,
            )
        )

    def event(
        self,
        run_id: str,
        *,
        t: float,
        kind: str,
        stage: str | None = None,
        key: str | None = None,
        attempt: int | None = None,
        data: Mapping[str, object] | None = None,
    ) -> None:
        self._put(("event", run_id, t, kind, stage, key, attempt, data))

    def discard_running(self, run_id: str, *, ended: float) -> None:
        self._put(("discard_running", run_id, ended))

    def flush(self) -> None:
        if not self._closed:
            done = threading.Event()
            self._queue.put(done)
            self._hurry.set()
            while not done.wait(0.5):
                if not self._thread.is_alive():
                    raise LedgerError(f"the ledger {self.path}: its writer thread has stopped")
        self._raise_error()

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
            self._hurry.set()
            self._thread.join()
            self._conn.close()
        self._raise_error()

    def _raise_error(self) -> None:
        with self._error_lock:
            error, self._error = self._error, None
        if error is not None:
            raise error from error.__cause__

    # -- the writer thread -----------------------------------------------------------------

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            if isinstance(batch[0], tuple):  # a flush or close does not wait
                self._hurry.wait(_LINGER_S)
            self._hurry.clear()
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = any(item is _STOP for item in batch)
            if stopping:  # whatever raced past close() still lands
                with contextlib.suppress(queue.Empty):
                    while True:
                        batch.append(self._queue.get_nowait())
            ops = [item for item in batch if isinstance(item, tuple)]
            try:
                if ops:
                    self._execute(ops)
            except BaseException as exc:  # kept for flush(): never lost
                self._keep(ops[0], exc)
            finally:
                for item in batch:
                    if isinstance(item, threading.Event):
                        item.set()

    def _execute(self, ops: list[_Op]) -> None:
        """All of ``ops`` in one transaction; when that fails, each in its own, so that one
        bad write costs only itself. A database another process keeps locked past the busy
        timeout fails the whole batch at once (retrying each write would wait that long each).
        """
        try:
            self._transaction(ops)
        except Exception as exc:  # retried one by one below
            if _busy(exc):
                self._keep(ops[0], exc, lost=len(ops))
                return
            for op in ops:
                try:
                    self._transaction([op])
                except Exception as exc:  # kept, raised from flush()
                    self._keep(op, exc)

    def _transaction(self, ops: list[_Op]) -> None:
        """Record ``ops`` in one transaction: the run and stage writes one statement each, in
        order; the per-instance writes merged per row (:class:`_Merged`)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            merged = _Merged(self._rows_per_statement)
            for op in ops:
                name = op[0]
                if name in _MERGED:
                    merged.add(op)
                elif name == "discard_running":  # acts on rows written before it
                    merged.write(conn)
                    self._do_discard_running(conn, *op[1:])
                else:  # runs and stages: other tables, a handful per run
                    getattr(self, f"_do_{name}")(conn, *op[1:])
            merged.write(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _keep(self, op: _Op, exc: BaseException, *, lost: int = 1) -> None:
        where = ", ".join(repr(arg) for arg in op[1:4] if isinstance(arg, str | int))
        also = f" and {lost - 1} writes queued with it" if lost > 1 else ""
        error = LedgerError(
            f"the ledger {self.path} could not record {op[0]}({where}){also}: "
            f"{type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        with self._error_lock:
            if self._error is None:
                self._error = error

    @staticmethod
    def _do_run_started(
        conn: sqlite3.Connection,
        run_id: str,
        pipeline: str,
        pipeline_file: str,
        started: float,
        pid: int | None,
        options: Mapping[str, object],
    ) -> None:
        conn.execute(
            "INSERT INTO runs (id, pipeline, pipeline_file, started, status, pid, options)"
            " VALUES (?, ?, ?, ?, 'running', ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET"
            " status = 'running', pid = excluded.pid, ended = NULL, summary = NULL",
            (run_id, pipeline, pipeline_file, started, pid, _json(options) or "{}"),
        )

    @staticmethod
    def _do_run_ended(
        conn: sqlite3.Connection,
        run_id: str,
        status: str,
        ended: float,
        summary: Mapping[str, object],
    ) -> None:
        conn.execute(
            "UPDATE runs SET status = ?, ended = ?, summary = ? WHERE id = ?",
            (status, ended, _json(summary), run_id),
        )

    @staticmethod
    def _do_stage_started(
        conn: sqlite3.Connection,
        run_id: str,
        stage: str,
        position: int,
        total: int,
        started: float,
    ) -> None:
        conn.execute(
            "INSERT INTO stages (run_id, name, position, total, status, started)"
            " VALUES (?, ?, ?, ?, 'running', ?)"
            " ON CONFLICT (run_id, name) DO UPDATE SET"
            " position = excluded.position, total = excluded.total, status = 'running',"
            " started = coalesce(stages.started, excluded.started), ended = NULL,"
            " skipped_reason = NULL",
            (run_id, stage, position, total, started),
        )

    @staticmethod
    def _do_stage_ended(
        conn: sqlite3.Connection,
        run_id: str,
        stage: str,
        status: str,
        ended: float,
        skipped_reason: str | None,
        position: int | None,
        total: int | None,
    ) -> None:
        conn.execute(
            "INSERT INTO stages (run_id, name, position, total, status, ended, skipped_reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (run_id, name) DO UPDATE SET"
            " position = coalesce(excluded.position, stages.position),"
            " total = coalesce(excluded.total, stages.total),"
            " status = excluded.status, ended = excluded.ended,"
            " skipped_reason = excluded.skipped_reason",
            (run_id, stage, position, total, status, ended, skipped_reason),
        )

    @staticmethod
    def _do_discard_running(conn: sqlite3.Connection, run_id: str, ended: float) -> None:
        # duration_s stays NULL: when the attempt really stopped is unknown.
        conn.execute(
            "UPDATE attempts SET outcome = 'discarded', cause = ?, message = ?, ended = ?"
            " WHERE run_id = ? AND outcome = 'running'",
            (DISCARDED_CAUSE, DISCARDED_MESSAGE, ended, run_id),
        )
        conn.execute(
            "DELETE FROM instances WHERE run_id = ? AND status = 'running'",
            (run_id,),
        )

    # -- reads: a read-only connection each -------------------------------------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=_BUSY_TIMEOUT_S,
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            raise UsageError(f"{self.path}: cannot read the ledger: {exc}") from exc
        try:
            yield conn
        finally:
            conn.close()

    def _rows(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._reading() as conn:
            return conn.execute(sql, params).fetchall()

    def runs(self, limit: int | None = None) -> list[RunRow]:
        rows = self._rows(
            f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY started DESC, id DESC LIMIT ?",  # noqa: S608 - constant column names; values are bound
            (-1 if limit is None else limit,),
        )
        return [_run_row(row) for row in rows]

    def get_run(self, run_id: str | None = None) -> RunRow | None:
        if run_id is None:
            newest = self.runs(limit=1)
            return newest[0] if newest else None
        exact = self._rows(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,))  # noqa: S608 - constant column names; values are bound
        if exact:
            return _run_row(exact[0])
        shown = 10
        rows = self._rows(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE substr(id, 1, ?) = ?"  # noqa: S608 - constant column names; values are bound
            " ORDER BY started DESC, id DESC LIMIT ?",
            (len(run_id), run_id, shown + 1),
        )
        if len(rows) > 1:
            names = ", ".join(row[0] for row in rows[:shown])
            more = " and more" if len(rows) > shown else ""
            raise UsageError(
                f"run {run_id!r} is ambiguous: it starts {names}{more}; give more of the id"
            )
        return _run_row(rows[0]) if rows else None

    def stage_rows(self, run_id: str) -> list[StageRow]:
        rows = self._rows(
            "SELECT run_id, name, position, total, status, started, ended, skipped_reason"
            " FROM stages WHERE run_id = ? ORDER BY position IS NULL, position, name",
            (run_id,),
        )
        return [StageRow(*row) for row in rows]

    def counts(self, run_id: str) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for stage, status, n in self._rows(
            "SELECT stage, status, count(*) FROM instances WHERE run_id = ? GROUP BY stage, status",
            (run_id,),
        ):
            counts.setdefault(stage, {})[status] = n
        return counts

    def causes(self, run_id: str) -> dict[str, dict[str, int]]:
        causes: dict[str, dict[str, int]] = {}
        for stage, cause, n in self._rows(
            "SELECT stage, coalesce(cause, 'error'), count(*) FROM instances"
            " WHERE run_id = ? AND status = 'failed' GROUP BY stage, 2 ORDER BY stage, 3 DESC",
            (run_id,),
        ):
            causes.setdefault(stage, {})[cause] = n
        return causes

    def failures(
        self,
        run_id: str,
        stage: str | None = None,
        limit: int | None = None,
        *,
        cause: str | None = None,
    ) -> list[InstanceRow]:
        rows = self._named(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances"  # noqa: S608 - constant column names; values are bound
            " WHERE run_id = :run AND status = 'failed'"
            " AND (:stage IS NULL OR stage = :stage)"
            " AND (:cause IS NULL OR coalesce(cause, 'error') = :cause)"
            " ORDER BY stage, key LIMIT :limit",
            {"run": run_id, "stage": stage, "cause": cause, "limit": _limit(limit)},
        )
        return [InstanceRow(*row) for row in rows]

    def _named(self, sql: str, params: Mapping[str, object]) -> list[tuple[Any, ...]]:
        with self._reading() as conn:
            return conn.execute(sql, params).fetchall()

    def get_instance(self, run_id: str, stage: str, key: str) -> InstanceRow | None:
        rows = self._rows(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances"  # noqa: S608 - constant column names; values are bound
            " WHERE run_id = ? AND stage = ? AND key = ?",
            (run_id, stage, key),
        )
        return InstanceRow(*rows[0]) if rows else None

    def keys(self, run_id: str, stage: str, limit: int | None = None) -> list[str]:
        rows = self._rows(
            "SELECT key FROM instances WHERE run_id = ? AND stage = ? ORDER BY key LIMIT ?",
            (run_id, stage, _limit(limit)),
        )
        return [row[0] for row in rows]

    def attempt_rows(self, run_id: str, stage: str, key: str) -> list[AttemptRow]:
        rows = self._rows(
            f"SELECT {_ATTEMPT_COLUMNS} FROM attempts"  # noqa: S608 - constant column names; values are bound
            " WHERE run_id = ? AND stage = ? AND key = ? ORDER BY attempt",
            (run_id, stage, key),
        )
        return [_attempt_row(row) for row in rows]

    def run_instances(self, run_id: str) -> list[InstanceRow]:
        rows = self._rows(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances"  # noqa: S608 - constant column names; values are bound
            " WHERE run_id = ? ORDER BY stage, key",
            (run_id,),
        )
        return [InstanceRow(*row) for row in rows]

    def run_attempts(self, run_id: str) -> list[AttemptRow]:
        rows = self._rows(
            f"SELECT {_ATTEMPT_COLUMNS} FROM attempts"  # noqa: S608 - constant column names; values are bound
            " WHERE run_id = ? ORDER BY stage, key, attempt",
            (run_id,),
        )
        return [_attempt_row(row) for row in rows]

    def run_events(self, run_id: str) -> list[EventRow]:
        rows = self._rows(
            "SELECT run_id, t, kind, stage, key, attempt, data FROM events"
            " WHERE run_id = ? ORDER BY seq",
            (run_id,),
        )
        return [
            EventRow(run_id, t, kind, stage, key, attempt, _decode(data))
            for run_id, t, kind, stage, key, attempt, data in rows
        ]

    def last_attempts(self, run_id: str, stage: str) -> dict[str, int]:
        rows = self._rows(
            "SELECT key, max(attempt) FROM attempts WHERE run_id = ? AND stage = ? GROUP BY key",
            (run_id, stage),
        )
        return dict(rows)

    def outcomes(
        self, pipeline: str, stage: str, status: str | None = None
    ) -> dict[str, OutcomeRow]:
        rows = self._named(
            f"SELECT {_OUTCOME_COLUMNS} FROM outcomes"  # noqa: S608 - constant column names; values are bound
            " WHERE pipeline = :pipeline AND stage = :stage"
            " AND (:status IS NULL OR status = :status)",
            {"pipeline": pipeline, "stage": stage, "status": status},
        )
        return {row[2]: OutcomeRow(*row) for row in rows}


def _busy(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite giving up on a lock another connection holds."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _limit(limit: int | None) -> int:
    return -1 if limit is None else limit

"""The scheduler: runs a planned pipeline.

Stages start when the stages they need have passed their barrier, so independent stages run
side by side under one global cap; a group or follow stage streams instead, starting each
instance as soon as the upstream instances it reads have ended. Inside a stage a feeder starts
the instances in priority order, each the moment it holds its slots (see :meth:`_Run._slot`):
a sliding window in which a slot refills the moment an instance ends, or batches with
``waves`` and ``priority_barrier``. Each attempt runs under the stage's timeout (absolute, or
relative to the stage's median), is validated, and is committed by an atomic rename. A failure
is caught at the instance boundary: it becomes an outcome, is written to the notes, and is
retried after a backoff with full jitter. A straggler may get a speculative backup attempt;
the first of the two to commit wins. Only a bug in phalanx itself cancels siblings.

API runners' calls go through their lane (:mod:`phalanx._lanes`); budgets, the resource guard
and ``phalanx tune`` are in :mod:`phalanx._admission`.

Stopping (Ctrl-C, SIGTERM, :meth:`RunHandle.stop`) cancels in-flight attempts — their staging
folders are removed, a ``command`` agent's process group is killed — and marks everything not
committed as skipped (cancelled). Committed outputs stay.

Before an instance starts, its fingerprint is computed (:mod:`phalanx._manifest`). An
instance whose committed output carries that fingerprint and is intact is not run again
(``cached``; ``committed`` when an earlier process of this same run committed it, i.e. on a
resume); one that failed before with the same fingerprint is not retried unless asked. The run
holds the project's lock throughout and records everything in the ledger.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import functools
import heapq
import json
import math
import os
import random
import secrets
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from ._admission import Control, ResourceGuard, Spending
from ._config import BackendConfig, Backoff, Budget, Guard
from ._databus import DataBus, OutputRules, Snapshot, changed_inputs, load_schema, scan, snapshot
from ._errors import ConfinementError, InstanceError, RunnerError, RunnerTimeout, UsageError
from ._events import (
    AttemptEnded,
    AttemptStarted,
    BudgetReached,
    Event,
    EventHandler,
    InstanceEnded,
    LanePaused,
    LimitChanged,
    RunEnded,
    RunStarted,
    StageEnded,
    StageStarted,
)
from ._lanes import Lane, LaneChange, Slots
from ._ledger import AttemptOutcome, Ledger, LedgerError, OutcomeRow, RunStatus, open_ledger
from ._lock import ProjectLock
from ._manifest import fingerprint, read_manifest, stage_digest, verify_output, write_manifest
from ._notes import Notes
from ._pipeline import STATE_DIR, InstancePlan, Plan, StagePlan
from ._results import (
    AttemptRecord,
    InstanceResult,
    RunResult,
    Speculation,
    StageResult,
    Status,
    Streaming,
)
from ._review import Reviewer
from .backends import Backend, RunnerSpec, load_backend
from .backends._local import LocalBackend
from .runners import InputRef, InstanceContext, Runner, create_runner
from .runners._llm import Clients

__all__ = ["RunHandle", "backoff_delay", "check_runners", "new_run_id", "run_plan"]


_T = TypeVar("_T")


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a random suffix."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def backoff_delay(policy: Backoff, attempt: int, rng: random.Random) -> float:
    """Full jitter: a uniform draw in ``[0, min(max, base * 2**(attempt - 1))]``."""
    ceiling = min(policy.max, policy.base * 2 ** (attempt - 1))
    return rng.uniform(0.0, ceiling)


def check_runners(plan: Plan) -> None:
    """Build every stage's runner and output rules as a run would, so that an unimportable
    function or a broken JSON Schema is reported before anything runs; check that every
    backend named exists and that a stage's own backend can execute its runner."""
    for stage in plan.stages:
        _stage_tools(plan, stage, None)
        where = _backend_where(plan, stage)
        backend = load_backend(
            _stage_backend(plan, stage, None), project_dir=plan.project_dir, where=where
        )
        _check_stage_backend(plan, stage, backend)


def _check_stage_backend(plan: Plan, stage: StagePlan, backend: Backend) -> None:
    """A stage that names its own backend must run there: refuse one that cannot execute the
    stage's runner (with the pipeline's backend, such a stage runs in the orchestrator)."""
    if stage.config.backend is not None and not backend.executes(stage.runner.type):
        raise UsageError(
            f"{_backend_where(plan, stage)}: the {backend.name} backend does not execute "
            f"{stage.runner.type} runners (API runners stay in the orchestrator, where their "
            "rate-limit lanes are); remove the stage's backend setting"
        )


def _stage_backend(plan: Plan, stage: StagePlan, override: str | None) -> BackendConfig:
    """The settings of the backend a stage runs on: the stage's own type (or the run's
    override, or the pipeline's), with the pipeline's settings when the types agree."""
    pipeline = plan.pipeline.config.backend
    name = override or stage.config.backend or pipeline.type
    return pipeline if name == pipeline.type else BackendConfig(type=name)


def _backend_where(plan: Plan, stage: StagePlan) -> str:
    if stage.config.backend is not None:
        return plan.pipeline.where("stages", plan.index(stage.name), "backend")
    return plan.pipeline.where("backend")


def _runner_spec(plan: Plan, stage: StagePlan) -> RunnerSpec:
    return RunnerSpec(
        key=f"{plan.pipeline.path}:{stage.name}",
        config=stage.runner,
        project_dir=plan.project_dir,
        where=plan.pipeline.where("stages", plan.index(stage.name), "runner"),
        blueprint_model=stage.blueprint.model if stage.blueprint else None,
        reference=stage.prompt_mode == "reference",
        prices=dict(plan.pipeline.config.prices),
        blueprint_tools=tuple(stage.blueprint.tools) if stage.blueprint else (),
    )


def _stage_tools(
    plan: Plan, stage: StagePlan, given: Runner | None, clients: Clients | None = None
) -> tuple[Runner, OutputRules]:
    runner = given
    if runner is None:
        where = plan.pipeline.where("stages", plan.index(stage.name), "runner")
        runner = create_runner(
            stage.runner,
            project_dir=plan.project_dir,
            where=where,
            blueprint_model=stage.blueprint.model if stage.blueprint else None,
            reference=stage.prompt_mode == "reference",
            prices=plan.pipeline.config.prices,
            clients=clients,
            blueprint_tools=stage.blueprint.tools if stage.blueprint else (),
        )
    schemas = {
        name: load_schema(path, display=str(path.relative_to(plan.project_dir)))
        for name, path in stage.schemas.items()
    }
    return runner, OutputRules(
        stage.expect, schemas, stage.config.check, stage.timeout, stage.config.checks
    )


class RunHandle:
    """Lets a caller stop or tune a run in progress (the CLI wires Ctrl-C and SIGTERM to
    :meth:`stop`)."""

    def __init__(self) -> None:
        self._run: _Run | None = None
        self.stop_reason: str | None = None

    def stop(self, reason: str = "stopped") -> None:
        """Stop admitting, cancel in-flight attempts; safe to call more than once."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._run is not None:
            self._run.stop(self.stop_reason)

    def tune(self, concurrency: int, *, stage: str | None = None) -> None:
        """Change the run's concurrency while it runs, as ``phalanx tune`` does: the slots of
        ``stage`` (every stage by default). Lowering it stops nothing; no new instance starts
        until fewer are in flight. Call it from the run's event loop."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, not {concurrency}")
        if self._run is None:
            raise RuntimeError("the run has not started or has ended: nothing to tune")
        self._run.tune(concurrency, stage)


@dataclass(eq=False)
class _StageState:
    plan: StagePlan
    runner: Runner
    rules: OutputRules
    limit: int
    slots: Slots
    spending: Spending
    lane: Lane | None = None
    # Where attempts execute: ``remote`` is the stage's backend when it runs the stage's
    # runner type itself (``spec`` rebuilds the runner there), ``None`` for the event loop.
    remote: Backend | None = None
    spec: RunnerSpec | None = None
    guard: Guard | None = None
    reviewer: Reviewer | None = None
    outcomes: dict[str, InstanceResult] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    abort_reason: str | None = None
    budget_reason: str | None = None
    upstream_reason: str | None = None  # streaming: an upstream stage can no longer pass
    force: bool = False
    # What every verdict of the stage shares, worked out by the first batch of verdicts.
    basis: tuple[str, Mapping[str, OutcomeRow], Mapping[str, int]] | None = None
    started_at: list[float] = field(default_factory=list)  # first attempts' start times
    # Stragglers: successful durations (sorted), the attempts running now, and backups.
    durations: list[float] = field(default_factory=list)
    running: set[_Running] = field(default_factory=set)
    backups: int = 0  # backups that ran
    backups_queued: int = 0  # backups waiting for their slots
    backups_won: int = 0
    backup_s: float = 0.0
    backup_usd: float = 0.0


_SUPERSEDED = "superseded: another attempt of the instance committed first"
_RELATIVE_MIN_SAMPLES = 5
"""The fewest successful attempts before ``timeout: 300%`` replaces the stage's seconds (see
:func:`_cohort` for the usual number)."""
_SPECULATE_MIN_SAMPLES = 10


def _cohort(state: _StageState, floor: int) -> int:
    """How many successes a stage needs before its durations say anything about the slow end.
    The first to finish are the quickest of the attempts that started together, so a
    percentile of a few of them is far too low: wait for about one slot's worth (the stage's
    limit), but no more than half the stage, and never fewer than ``floor``."""
    slots = state.limit
    if state.lane is not None and state.lane.auto:
        slots = min(slots, math.floor(state.lane.limit))  # an adaptive stage: what runs now
    return max(floor, min(slots, len(state.plan.instances) // 2))


@dataclass(eq=False)
class _Live:
    """One instance while it runs: the number its next attempt takes, its attempts so far,
    and, when a speculative backup runs beside it, both tasks and which one committed."""

    inst: InstancePlan
    verdict: _Verdict
    next: int
    attempts: list[AttemptRecord] = field(default_factory=list)
    primary: asyncio.Task[None] | None = None
    backup: asyncio.Task[None] | None = None
    claim: threading.Lock = field(default_factory=threading.Lock)
    won: bool = False


@dataclass(eq=False)
class _Running:
    """An attempt in flight: when it started and the timeout scope it runs under."""

    live: _Live
    attempt: int
    started: float
    scope: asyncio.Timeout
    backup: bool
    relative: float | None = None  # the relative limit applied to it, in seconds


class _Superseded(Exception):
    """Raised in the losing attempt's commit when its twin committed first."""


@dataclass(frozen=True)
class _Verdict:
    """What to do with one instance, decided before its stage starts. ``outcome`` is set when
    it need not run (cached, committed earlier in this run, failed before); ``first`` is the
    number its first attempt takes (attempts continue their numbering on a resume)."""

    fingerprint: str
    outcome: InstanceResult | None = None
    digest: str | None = None
    first: int = 1
    stale: str | None = None
    inputs: tuple[InputRef, ...] = ()  # the upstream outputs it reads, split once
    missing: tuple[str, ...] = ()


async def run_plan(
    plan: Plan,
    *,
    run_id: str | None = None,
    concurrency: int | None = None,
    on_event: EventHandler | None = None,
    handle: RunHandle | None = None,
    rng: random.Random | None = None,
    runners: Mapping[str, Runner] | None = None,
    force: bool = False,
    force_stages: Iterable[str] = (),
    rerun_failed: bool = False,
    resume: bool = False,
    ledger: bool = True,
    options: Mapping[str, object] | None = None,
    budget: Budget | None = None,
    guard: ResourceGuard | None = None,
    control_interval: float = 0.5,
    backend: str | None = None,
) -> RunResult:
    """Run the selected stages of ``plan``; see the module docstring.

    ``concurrency`` overrides every stage's own limit (and lifts the global cap to at least
    it). ``runners`` supplies ready runner objects by stage name instead of building them from
    the stage's settings. ``force`` runs every instance (``force_stages``: those of the named
    stages) even when its output is up to date; ``rerun_failed`` retries instances that failed
    before with the same fingerprint. ``resume`` continues the run ``run_id`` (its in-flight
    attempts are discarded, its committed instances kept). ``ledger`` false keeps no ledger
    (benchmarks compare the two); ``options`` is recorded with the run so that ``phalanx
    resume`` can plan it again. ``budget`` replaces the pipeline's run budget; ``guard`` is
    the resource guard of process agents (tests give one with a fake probe);
    ``control_interval`` is how often the run looks for ``phalanx tune`` changes; ``backend``
    names the backend every stage runs on, in place of the pipeline's. Returns when
    every selected stage has passed its barrier or been skipped. Raises
    :class:`~phalanx.ProjectBusyError` when another run holds the project.
    """
    run = _Run(
        plan,
        run_id=run_id or new_run_id(),
        concurrency=concurrency,
        on_event=on_event,
        rng=rng or random.Random(),  # noqa: S311 - jitter, not secrets
        runners=runners or {},
        force=force,
        force_stages=frozenset(force_stages),
        rerun_failed=rerun_failed,
        resume=resume,
        record=ledger,
        options=options or {},
        budget=budget,
        guard=guard,
        control_interval=control_interval,
        backend=backend,
    )
    if handle is not None:
        handle._run = run
        if handle.stop_reason is not None:
            run.stop(handle.stop_reason)
    try:
        return await run.execute()
    finally:
        if handle is not None:
            handle._run = None


class _Run:
    def __init__(
        self,
        plan: Plan,
        *,
        run_id: str,
        concurrency: int | None,
        on_event: EventHandler | None,
        rng: random.Random,
        runners: Mapping[str, Runner],
        force: bool = False,
        force_stages: frozenset[str] = frozenset(),
        rerun_failed: bool = False,
        resume: bool = False,
        record: bool = True,
        options: Mapping[str, object] | None = None,
        budget: Budget | None = None,
        guard: ResourceGuard | None = None,
        control_interval: float = 0.5,
        backend: str | None = None,
    ) -> None:
        self.plan = plan
        self.force = force
        self.force_stages = force_stages
        self.rerun_failed = rerun_failed
        self.resume = resume
        self.record = record
        self.options = dict(options or {})
        self.ledger: Ledger | None = None
        self.lock: ProjectLock | None = None
        # Content digests of the outputs committed (or found cached) in this run, by stage
        # and key: downstream fingerprints are made of them.
        self.digests: dict[str, dict[str, str]] = {}
        self.given_runners = runners
        self.run_id = run_id
        self.on_event = on_event
        self.rng = rng
        self.override = concurrency
        config = plan.pipeline.config
        root = plan.project_dir
        self.state_dir = root / STATE_DIR
        self.bus = DataBus(root, self.state_dir, run_id)
        self.notes = Notes(
            root / config.notes,
            root / config.summaries,
            run_id=run_id,
            pipeline=config.name,
        )
        cap = max(config.concurrency, concurrency or 0)
        self.global_slots = Slots(cap)
        self.lanes: dict[object, Lane] = {}
        self.guard = guard or ResourceGuard()
        self.backend_override = backend
        self.backends: dict[str, Backend] = {}  # by their settings, as JSON
        self.opened: list[Backend] = []
        self.spending = Spending(budget or config.budget, "run")
        self.control = Control(self.state_dir / "runs" / run_id)
        self.control_interval = control_interval
        # Validation, commits and input snapshots: a pool of our own, so a slow check command
        # in one stage does not queue behind asyncio's few default threads.
        self.pool = ThreadPoolExecutor(min(64, cap), thread_name_prefix="phalanx-io")
        self.stopping = False
        self.stop_reason: str | None = None
        self.halted: str | None = None
        self.results: dict[str, StageResult] = {}
        self.finished: dict[str, asyncio.Event] = {}
        # Streaming fan-in: which instances of each stage have ended, how many of them failed
        # or were skipped, who listens for the next (a key, or None when the stage is done),
        # and when each stage passed its barrier.
        self.ended_keys: dict[str, set[str]] = {}
        self.lost: Counter[str] = Counter()
        self.listeners: dict[str, list[Callable[[str | None], None]]] = {}
        self.barrier_at: dict[str, float] = {}
        self.active: set[_StageState] = set()
        self.states: Mapping[str, _StageState] = {}
        self.summaries: list[Path] = []
        self.clients = Clients()
        self.logs = self.state_dir / "runs" / run_id / "logs"

    def _io(self, function: Callable[..., _T], *args: object) -> asyncio.Future[_T]:
        return asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    def emit(self, event: Event) -> None:
        # The ledger's event log keeps the run's and stages' milestones and every failed
        # attempt; what each attempt and instance did is in its own tables already.
        if self.ledger is not None and _logged(event):
            kind, stage, key, attempt, data = _event_row(event)
            self.ledger.event(
                self.run_id,
                t=time.time(),
                kind=kind,
                stage=stage,
                key=key,
                attempt=attempt,
                data=data,
            )
        if self.on_event is not None:
            self.on_event(event)

    def halt(self, reason: str) -> None:
        """Stop the run because of an error every instance would hit (see ``FatalError``)."""
        if not self.stopping:
            self.halted = reason
        self.stop(reason)

    def stop(self, reason: str) -> None:
        if not self.stopping:
            self.stop_reason = reason
        self.stopping = True
        for state in list(self.active):
            for task in list(state.tasks):
                task.cancel()

    # -- the run -----------------------------------------------------------------------------

    def _prepare(self, stage: StagePlan) -> _StageState:
        """Everything that can fail on bad input is done before the first instance starts."""
        given = self.given_runners.get(stage.name)
        runner, rules = _stage_tools(self.plan, stage, given, self.clients)
        config = _stage_backend(self.plan, stage, self.backend_override)
        settings = config.model_dump_json()
        backend = self.backends.get(settings)
        if backend is None:
            backend = self.backends[settings] = load_backend(
                config, project_dir=self.plan.project_dir, where=_backend_where(self.plan, stage)
            )
        remote = None
        if given is None and not isinstance(backend, LocalBackend):
            _check_stage_backend(self.plan, stage, backend)
            if backend.executes(stage.runner.type):
                remote = backend
        limit = self.override or stage.concurrency
        force = self.force or stage.name in self.force_stages
        lane = None
        if runner.lane is not None:
            lane = self.lanes.get(runner.lane)
            if lane is None:
                lane = Lane(
                    _lane_name(runner.lane),
                    auto=stage.auto and self.override is None,
                    ceiling=limit,
                    on_change=self._lane_changed,
                )
                self.lanes[runner.lane] = lane
            elif limit > lane.ceiling:
                lane.set_ceiling(limit)
        return _StageState(
            stage,
            runner,
            rules,
            limit,
            Slots(limit),
            Spending(stage.budget, f"stage {stage.name!r}"),
            lane,
            remote=remote,
            spec=_runner_spec(self.plan, stage) if remote is not None else None,
            # A cluster's load is not this machine's: the guard admits local processes only.
            guard=stage.guard if remote is None or remote.name == "process" else None,
            reviewer=self._reviewer(stage),
            force=force,
        )

    def _reviewer(self, stage: StagePlan) -> Reviewer | None:
        if stage.review is None:
            return None
        runner = create_runner(
            stage.review.runner,
            project_dir=self.plan.project_dir,
            where=self.plan.pipeline.where("stages", self.plan.index(stage.name), "review"),
            blueprint_model=stage.blueprint.model if stage.blueprint else None,
            reference=False,
            prices=self.plan.pipeline.config.prices,
            clients=self.clients,
        )
        return Reviewer(stage.review, runner, self.bus.review_dir(stage.name))

    def _lane_changed(self, change: LaneChange) -> None:
        if change.reason == "pause":
            self.emit(LanePaused(change.lane, change.paused_for or 0.0))
        else:
            self.emit(LimitChanged(None, change.lane, change.old, change.new, change.reason))

    async def execute(self) -> RunResult:
        selected = [s for s in self.plan.stages if s.name in self.plan.selected]
        states = {stage.name: self._prepare(stage) for stage in selected}
        self.finished = {stage.name: asyncio.Event() for stage in selected}
        self.digests = {stage.name: {} for stage in selected}
        started = time.monotonic()
        try:
            await self._open_backends(states)
            # Even when cancelled meanwhile, wait for the thread: it may hold the lock by then.
            await _to_the_end(asyncio.to_thread(self._open), lambda: None)
        except BaseException:
            self._close()
            self.pool.shutdown(wait=False)
            for state in states.values():
                await state.runner.aclose()
            await self.clients.aclose()
            await self._close_backends()
            raise
        try:
            return await self._execute(states, started)
        finally:
            await asyncio.to_thread(self._close)

    async def _open_backends(self, states: Mapping[str, _StageState]) -> None:
        """Start or connect to the backends the stages use (a usage error when one cannot
        be); cap each remote stage's limit at what its backend can run at once."""
        used = {id(state.remote): state.remote for state in states.values() if state.remote}
        for backend in used.values():
            await backend.open()
            self.opened.append(backend)
        for state in states.values():
            if state.remote is None:
                continue
            most = state.remote.capacity(state.plan.config.resources)
            if most is not None and most < state.limit and self.override is None:
                state.limit = most
                state.slots.limit = most

    async def _close_backends(self) -> None:
        opened, self.opened = self.opened, []
        for backend in opened:
            await backend.aclose()

    def _open(self) -> None:
        """Take the project's lock, open the ledger, claim the staging folder."""
        self.lock = ProjectLock.acquire(
            self.state_dir, run_id=self.run_id, pipeline=self.plan.pipeline.config.name
        )
        try:
            if self.record:
                self.ledger = open_ledger(self.state_dir)
                if self.resume:
                    self.ledger.discard_running(self.run_id, ended=time.time())
                self.ledger.run_started(
                    self.run_id,
                    pipeline=self.plan.pipeline.config.name,
                    pipeline_file=str(self.plan.pipeline.path),
                    started=time.time(),
                    pid=os.getpid(),
                    options=self.options,
                )
                self.ledger.flush()  # on disk before anything runs: a crash can be resumed
            self.bus.open()
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        """Flush and close the ledger, release the lock; safe to call twice. A ledger that
        could not record everything (a full disk) is reported, not raised: the outputs and
        their manifests, which resume relies on, are already safe."""
        try:
            if self.ledger is not None:
                ledger, self.ledger = self.ledger, None
                ledger.close()
        except LedgerError as exc:
            warnings.warn(
                f"phalanx: the ledger {self.state_dir / 'ledger.db'} missed some records of run "
                f"{self.run_id}: {exc}; committed outputs are unaffected",
                RuntimeWarning,
                stacklevel=1,
            )
        finally:
            if self.lock is not None:
                lock, self.lock = self.lock, None
                lock.release()

    async def _execute(self, states: Mapping[str, _StageState], started: float) -> RunResult:
        self.states = states
        selected = [state.plan for state in states.values()]
        self.emit(
            RunStarted(
                self.run_id,
                self.plan.pipeline.config.name,
                tuple(states),
                tuple(len(stage.instances) for stage in selected),
            )
        )
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._stage(state), name=f"stage:{name}")
                    for name, state in states.items()
                ]
                watcher = group.create_task(self._watch_control(), name="control")
                try:
                    await asyncio.wait(tasks)
                finally:
                    watcher.cancel()
        finally:
            await self._io(self.bus.close)
            self.pool.shutdown(wait=False)  # every task above awaited its own work
            for state in states.values():
                await state.runner.aclose()
            await self.clients.aclose()
            await self._close_backends()
        result = RunResult(
            run_id=self.run_id,
            pipeline=self.plan.pipeline.config.name,
            stages=tuple(self.results[name] for name in states),
            wall_s=time.monotonic() - started,
            cancelled=self.stopping and self.halted is None,
            halted=self.halted,
            stop_reason=self.stop_reason,
            notes=self.notes.journal if self.notes.written else None,
            summaries=tuple(self.summaries),
        )
        await asyncio.to_thread(self._record, result)
        self.emit(RunEnded(self.run_id, result.ok, result.cancelled))
        return result

    def _record(self, result: RunResult) -> None:
        folder = self.state_dir / "runs" / self.run_id
        folder.mkdir(parents=True, exist_ok=True)
        summary = result.to_json()
        (folder / "summary.json").write_text(
            json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        if self.ledger is not None:
            status: RunStatus
            if result.halted is not None:
                status = "halted"
            elif result.cancelled:
                status = "interrupted"
            else:
                status = "ok" if result.ok else "failed"
            self.ledger.run_ended(self.run_id, status=status, ended=time.time(), summary=summary)

    async def _stage(self, state: _StageState) -> None:
        stage = state.plan
        try:
            if self._streams(stage):
                result = await self._run_stage(state, streaming=True)
            else:
                blocked = await self._wait_for_needs(stage)
                if blocked is not None:
                    result = self._skipped_stage(stage, blocked)
                else:
                    result = await self._run_stage(state)
            self.results[stage.name] = result
            self.barrier_at[stage.name] = time.monotonic()
            if self.ledger is not None:
                self.ledger.stage_ended(
                    self.run_id,
                    stage.name,
                    status="skipped" if result.skipped_reason else "done",
                    ended=time.time(),
                    skipped_reason=result.skipped_reason,
                )
            self.summaries.append(await self._io(self.notes.summary, result))
            self.emit(StageEnded(result))
        finally:
            self.finished[stage.name].set()
            for listener in list(self.listeners.get(stage.name, ())):
                listener(None)

    def _streams(self, stage: StagePlan) -> bool:
        """Whether a stage streams: a group or follow stage whose instances can start as their
        own inputs end, unless it asks for strict layers or runs in waves or levels."""
        return (
            stage.kind in ("group", "follow")
            and stage.config.barrier == "stream"
            and stage.waves is None
            and not stage.priority_barrier
            and any(need in self.finished for need in stage.needs)
        )

    def _upstream_blocked(self, needs: Sequence[str]) -> str | None:
        """Why a streaming stage may start nothing more: a stage it reads did not run, missed
        its threshold, or has already lost more instances than its threshold allows."""
        for need in needs:
            upstream = self.results.get(need)
            if upstream is not None:
                if upstream.skipped_reason is not None:
                    return f"upstream stage {need!r} did not run"
                if not upstream.met_threshold:
                    return (
                        f"upstream stage {need!r} missed its threshold "
                        f"({upstream.done}/{upstream.total} committed, "
                        f"{upstream.required} required)"
                    )
                continue
            planned = self.plan.stage(need)
            if self.lost[need] > len(planned.instances) - planned.required:
                return (
                    f"upstream stage {need!r} missed its threshold ({self.lost[need]} failed "
                    f"or skipped so far, {planned.required} of {len(planned.instances)} "
                    "required)"
                )
        return None

    async def _wait_for_needs(self, stage: StagePlan) -> str | None:
        for need in stage.needs:
            if need in self.finished:
                await self.finished[need].wait()
                if self.stopping:
                    return "cancelled"
                upstream = self.results[need]
                if upstream.skipped_reason is not None:
                    return f"upstream stage {need!r} did not run"
                if not upstream.met_threshold:
                    return (
                        f"upstream stage {need!r} missed its threshold "
                        f"({upstream.committed}/{upstream.total} committed, "
                        f"{upstream.required} required)"
                    )
        return "cancelled" if self.stopping else None

    def _skipped_stage(self, stage: StagePlan, reason: str) -> StageResult:
        short = "cancelled" if reason == "cancelled" else "upstream failed"
        instances = tuple(
            self._recorded(
                InstanceResult(stage.name, inst.key, "skipped", inst.output, reason=short)
            )
            for inst in stage.instances
        )
        return StageResult(stage.name, instances, stage.required, 0.0, skipped_reason=reason)

    async def _run_stage(self, state: _StageState, *, streaming: bool = False) -> StageResult:
        stage = state.plan
        self.emit(
            StageStarted(
                stage.name, len(stage.instances), state.limit, stage.runner.type, _model(stage)
            )
        )
        if self.ledger is not None:
            self.ledger.stage_started(
                self.run_id,
                stage.name,
                position=self.plan.index(stage.name),
                total=len(stage.instances),
                started=time.time(),
            )
        started = time.monotonic()
        self.active.add(state)
        try:
            async with asyncio.TaskGroup() as group:
                feeder = self._stream(state, group) if streaming else self._feed_all(state, group)
                self._track(state, group.create_task(feeder))
                if stage.speculate is not None:
                    group.create_task(self._speculate(state, group))
        finally:
            self.active.discard(state)
        message = ""
        if streaming and not state.outcomes and (self.stopping or state.upstream_reason):
            # nothing of it ran: the same result as if it had waited for the barrier
            return self._skipped_stage(
                stage, "cancelled" if self.stopping else state.upstream_reason or ""
            )
        if self.halted:
            reason = "run stopped by a fatal error"
        elif self.stopping:
            reason = "cancelled"
        elif state.budget_reason is not None:
            reason, message = "budget", state.budget_reason
        elif state.upstream_reason is not None:
            reason, message = "upstream failed", state.upstream_reason
        else:
            reason = state.abort_reason or "cancelled"
        instances = tuple(
            state.outcomes.get(inst.key)
            or self._ended(
                InstanceResult(
                    stage.name, inst.key, "skipped", inst.output, reason=reason, message=message
                )
            )
            for inst in stage.instances
        )
        flow = self._streaming(state, instances) if streaming else None
        spec = None
        if stage.speculate is not None:
            spec = Speculation(state.backups, state.backups_won, state.backup_s, state.backup_usd)
        if streaming and state.started_at:
            started = state.started_at[0]  # its span begins with its first instance, not the wait
        return StageResult(
            stage.name,
            instances,
            stage.required,
            time.monotonic() - started,
            streaming=flow,
            speculation=spec,
        )

    def _streaming(
        self, state: _StageState, instances: Sequence[InstanceResult]
    ) -> Streaming | None:
        """How much a streaming stage overlapped the stages it reads. The saving is estimated
        by replaying its instances' durations, in admission order, on its slots from the last
        upstream barrier on: when strict layers would have ended it, against when it did."""
        barriers = [self.barrier_at[n] for n in state.plan.needs if n in self.barrier_at]
        if not barriers or not state.started_at:
            return None
        barrier, now = max(barriers), time.monotonic()
        early = [t for t in state.started_at if t < barrier]
        if not early:
            return Streaming(0.0, 0, 0.0)
        slots = [barrier] * max(1, min(state.limit, len(instances)))
        for inst in sorted(instances, key=lambda r: r.attempts[0].started if r.attempts else 0):
            if inst.attempts:
                heapq.heapreplace(slots, slots[0] + inst.duration_s)
        strict_end = max(slots)
        return Streaming(barrier - min(early), len(early), max(0.0, strict_end - now))

    def _ended(self, result: InstanceResult) -> InstanceResult:
        self._recorded(result)
        if self.on_event is not None:  # not in the ledger's event log: skip building it
            self.emit(InstanceEnded(result))
        if result.stage in self.finished:
            self.ended_keys.setdefault(result.stage, set()).add(result.key)
            if result.status in ("failed", "skipped"):
                self.lost[result.stage] += 1
            for listener in list(self.listeners.get(result.stage, ())):
                listener(result.key)
        return result

    def _recorded(self, result: InstanceResult) -> InstanceResult:
        if self.ledger is not None:
            self.ledger.instance_ended(
                self.run_id,
                result.stage,
                result.key,
                pipeline=self.plan.pipeline.config.name,
                status=result.status,
                fingerprint=result.fingerprint,
                cause=result.cause,
                message=result.message,
                reason=result.reason,
                attempts=len(result.attempts),
                duration_s=result.duration_s,
                ended=time.time(),
            )
        return result

    # -- what needs to run ----------------------------------------------------------------------

    def _verdicts(
        self,
        state: _StageState,
        batch: Sequence[InstancePlan],
        available: Mapping[str, tuple[tuple[InputRef, ...], tuple[str, ...]]],
    ) -> dict[str, _Verdict]:
        """Fingerprint a batch of a stage's instances and decide which need to run (in a
        thread: it reads manifests and hashes files)."""
        stage = state.plan
        if state.basis is None:
            shared = stage_digest(stage, state.runner, self.plan.project_dir)
            failed: Mapping[str, OutcomeRow] = {}
            last: Mapping[str, int] = {}
            if self.ledger is not None:
                if not self.rerun_failed and not state.force:
                    failed = self.ledger.outcomes(
                        self.plan.pipeline.config.name, stage.name, status="failed"
                    )
                if self.resume:
                    last = self.ledger.last_attempts(self.run_id, stage.name)
            state.basis = (shared, failed, last)
        shared, failed_before, first = state.basis
        verdicts = {}
        for inst in batch:
            inputs, missing = available[inst.key]
            print_ = fingerprint(
                shared,
                inst.key,
                inst.prompt,
                inst.values,
                [(ref.stage, ref.key, self._digest(ref)) for ref in inputs],
                missing,
            )
            outcome, digest, stale = self._verdict(state, inst, print_, failed_before.get(inst.key))
            verdicts[inst.key] = _Verdict(
                print_, outcome, digest, first.get(inst.key, 0) + 1, stale, inputs, missing
            )
        return verdicts

    def _verdict(
        self, state: _StageState, inst: InstancePlan, print_: str, failed: OutcomeRow | None
    ) -> tuple[InstanceResult | None, str | None, str | None]:
        """``(outcome, digest, stale)``: the outcome of an instance that need not run (with
        its output's digest when that is current), or why its committed output no longer
        counts."""
        if state.force:
            return None, None, None
        manifest = read_manifest(inst.output)
        stale = None
        if manifest is not None and manifest.fingerprint == print_:
            stale = verify_output(inst.output, manifest)
            if stale is None:
                status: Status = "committed" if manifest.run_id == self.run_id else "cached"
                message = (
                    f"committed by attempt {manifest.attempt} before the run was resumed"
                    if status == "committed"
                    else f"up to date: committed by run {manifest.run_id}"
                )
                outcome = InstanceResult(
                    inst.stage, inst.key, status, inst.output, message=message, fingerprint=print_
                )
                return outcome, manifest.digest, None
        if failed is not None and failed.fingerprint == print_ and failed.cause != "fatal":
            outcome = InstanceResult(
                inst.stage,
                inst.key,
                "failed",
                inst.output,
                cause=failed.cause,
                message=(
                    f"failed in run {failed.run_id} with the same inputs and was not retried "
                    f"(--rerun-failed retries it): {failed.message}"
                ),
                fingerprint=print_,
            )
            return outcome, None, None
        return None, None, stale

    def _digest(self, ref: InputRef) -> str:
        """The content digest of an upstream output this run reads."""
        if ref.stage in self.digests:
            return self.digests[ref.stage].get(ref.key, "")
        manifest = read_manifest(ref.path)  # a stage outside this run: as an earlier run left it
        return manifest.digest if manifest is not None else ""

    def _available(self, inst: InstancePlan) -> tuple[tuple[InputRef, ...], tuple[str, ...]]:
        """Split an instance's inputs into committed ones and missing ones. The outputs of a
        stage that is not part of this run are read from disk as earlier runs left them."""
        if not inst.inputs:
            return (), ()
        present: list[InputRef] = []
        missing: list[str] = []
        for ref in inst.inputs:
            if ref.stage in self.digests:  # a stage of this run: committed or cached
                ok = ref.key in self.digests[ref.stage]
            else:
                ok = ref.path.is_dir()
            if ok:
                present.append(ref)
            else:
                missing.append(f"{ref.stage}/{ref.key}")
        return tuple(present), tuple(missing)

    @staticmethod
    def _track(state: _StageState, task: asyncio.Task[None]) -> None:
        """Stop and abort cancel what is tracked here."""
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    async def _slot(self, state: _StageState, inst: InstancePlan, *, first: bool = False) -> None:
        """Take, in this order, a slot of the stage, the resource guard's leave (process
        agents), a slot of the lane (API agents) and one of the run, or none of them. The
        stage's own order is the feeder's; the lane and the run serve higher-priority stages,
        then higher-priority partitions, first; ``first`` (a speculative backup: the stage's
        tail) goes before them all."""
        await state.slots.acquire((math.inf,) if first else (inst.priority,))
        try:
            guard = state.guard
            if guard is not None:
                await self.guard.admit(guard)
            try:
                rank = (math.inf, math.inf) if first else (state.plan.priority, inst.priority)
                lane = state.lane
                if lane is not None:
                    await lane.acquire(rank)
                try:
                    await self.global_slots.acquire(rank)
                except BaseException:
                    if lane is not None:
                        lane.release()
                    raise
            except BaseException:
                if guard is not None:
                    self.guard.release()
                raise
        except BaseException:
            state.slots.release()
            raise

    def _free(self, state: _StageState) -> None:
        self.global_slots.release()
        if state.lane is not None:
            state.lane.release()
        if state.guard is not None:
            self.guard.release()
        state.slots.release()

    def _out_of_budget(self, state: _StageState) -> str | None:
        """Why no new attempt of this stage may start, if a budget is spent (announced once
        per stage)."""
        if state.budget_reason is None:
            reason = self.spending.reached() or state.spending.reached()
            if reason is None:
                return None
            state.budget_reason = reason
            self.emit(BudgetReached(state.plan.name, reason))
        return state.budget_reason

    def _spent(self, state: _StageState, ctx: InstanceContext) -> None:
        if ctx.usage:
            self.spending.add(ctx.usage)
            state.spending.add(ctx.usage)

    async def _watch_control(self) -> None:
        """Apply ``phalanx tune`` changes while the run lasts."""
        while True:
            await asyncio.sleep(self.control_interval)
            for change in self.control.poll():
                self.tune(change.concurrency, change.stage)

    def tune(self, concurrency: int, stage: str | None) -> None:
        """Set the concurrency of ``stage`` (every stage when ``None``; a stage this run does
        not have is ignored): its slots, and for an adaptive stage its lane's ceiling."""
        if stage is None:
            targets = list(self.states.values())
            self.global_slots.limit = max(self.global_slots.limit, concurrency)
        else:
            targets = [self.states[stage]] if stage in self.states else []
        for state in targets:
            old = state.slots.limit
            state.slots.limit = concurrency
            state.limit = concurrency
            if state.lane is not None:
                state.lane.set_ceiling(concurrency)
            self.emit(LimitChanged(state.plan.name, None, old, concurrency, "tune"))

    def _settled(self, state: _StageState, inst: InstancePlan, verdict: _Verdict) -> None:
        """Record an instance that need not run (cached, committed earlier, failed before)."""
        assert verdict.outcome is not None  # noqa: S101 - the callers checked
        if verdict.digest is not None:
            self.digests[state.plan.name][inst.key] = verdict.digest
        state.outcomes[inst.key] = self._ended(verdict.outcome)

    async def _feed_all(self, state: _StageState, group: asyncio.TaskGroup) -> None:
        """A stage behind its barrier: every instance's verdict at once, then the feeder."""
        stage = state.plan
        available = {inst.key: self._available(inst) for inst in stage.instances}
        verdicts = await self._io(self._verdicts, state, stage.instances, available)
        order = []
        for inst in sorted(stage.instances, key=lambda inst: (-inst.priority, inst.index)):
            verdict = verdicts[inst.key]
            if verdict.outcome is None:
                order.append((inst, verdict))
            else:
                self._settled(state, inst, verdict)
        await self._feed(state, order, group)

    async def _stream(self, state: _StageState, group: asyncio.TaskGroup) -> None:
        """Streaming fan-in: start each instance as soon as every upstream instance it reads
        has ended (committed, or failed or skipped for good), in priority order among those
        ready, and never one whose input is still pending. Stops starting new ones once an
        upstream stage can no longer pass its threshold."""
        stage = state.plan
        upstream = [need for need in stage.needs if need in self.finished]
        waiting: dict[tuple[str, str], list[InstancePlan]] = {}
        pending: dict[str, int] = {}
        ready: list[tuple[float, int, InstancePlan]] = []
        wake = asyncio.Event()
        for inst in stage.instances:
            count = 0
            for ref in inst.inputs:
                if ref.stage in upstream and ref.key not in self.ended_keys.get(ref.stage, ()):
                    waiting.setdefault((ref.stage, ref.key), []).append(inst)
                    count += 1
            if count:
                pending[inst.key] = count
            else:
                heapq.heappush(ready, (-inst.priority, inst.index, inst))

        def listener(name: str) -> Callable[[str | None], None]:
            def heard(key: str | None) -> None:
                if key is not None:
                    for inst in waiting.pop((name, key), ()):
                        pending[inst.key] -= 1
                        if pending[inst.key] == 0:
                            del pending[inst.key]
                            heapq.heappush(ready, (-inst.priority, inst.index, inst))
                wake.set()

            return heard

        heard = {name: listener(name) for name in upstream}
        for name, callback in heard.items():
            self.listeners.setdefault(name, []).append(callback)
        try:
            while ready or pending:
                blocked = self._upstream_blocked(upstream)
                if blocked is not None:
                    state.upstream_reason = blocked
                    return
                if not ready:
                    wake.clear()
                    await wake.wait()
                    continue
                batch = [heapq.heappop(ready)[2] for _ in range(len(ready))]
                available = {inst.key: self._available(inst) for inst in batch}
                verdicts = await self._io(self._verdicts, state, batch, available)
                for inst in batch:
                    verdict = verdicts[inst.key]
                    if verdict.outcome is not None:
                        self._settled(state, inst, verdict)
                        continue
                    if await self._start(state, inst, verdict, group, upstream) is None:
                        return
        finally:
            for upstream_name, callback in heard.items():
                self.listeners[upstream_name].remove(callback)

    async def _feed(
        self,
        state: _StageState,
        order: list[tuple[InstancePlan, _Verdict]],
        group: asyncio.TaskGroup,
    ) -> None:
        """Start instances in priority order, each the moment a slot is free.

        An instance task is created only once it holds its slot, so a stage of 10,000 does not
        park 10,000 tasks on a semaphore; instances never started (stop, abort) have no task
        and are recorded as skipped.
        """
        segments = _segments(state.plan, order)
        for number, segment in enumerate(segments, 1):
            started: list[asyncio.Task[None]] = []
            for inst, verdict in segment:
                task = await self._start(state, inst, verdict, group)
                if task is None:
                    return
                if len(segments) > 1:
                    started.append(task)
            if number < len(segments) and started:
                await asyncio.wait(started)  # a wave (or a priority level) ends before the next

    async def _start(
        self,
        state: _StageState,
        inst: InstancePlan,
        verdict: _Verdict,
        group: asyncio.TaskGroup,
        upstream: Sequence[str] = (),
    ) -> asyncio.Task[None] | None:
        """Start an instance once it holds its slots; ``None`` when nothing more may start
        (the run stops, the stage aborts, a budget is spent, an upstream stage failed)."""
        await self._slot(state, inst)
        blocked = self._upstream_blocked(upstream) if upstream else None
        if self.stopping or state.abort_reason or self._out_of_budget(state) or blocked:
            state.upstream_reason = state.upstream_reason or blocked
            self._free(state)
            return None
        task = group.create_task(
            self._instance(state, inst, verdict), name=f"instance:{state.plan.name}/{inst.key}"
        )
        self._track(state, task)
        return task

    async def _instance(self, state: _StageState, inst: InstancePlan, verdict: _Verdict) -> None:
        """One instance, from its first attempt (started holding its slot, see :meth:`_feed`)
        to its outcome. The slot is given back during a retry's backoff."""
        stage = state.plan
        held = True
        live = _Live(inst, verdict, verdict.first, primary=asyncio.current_task())
        try:
            if inst.inputs and not verdict.inputs:
                state.outcomes[inst.key] = self._ended(
                    InstanceResult(
                        stage.name,
                        inst.key,
                        "skipped",
                        inst.output,
                        reason="upstream failed",
                        message=f"none of its inputs committed: {', '.join(verdict.missing[:5])}",
                        fingerprint=verdict.fingerprint,
                    )
                )
                return
            if verdict.stale is not None:
                stale = functools.partial(
                    self.notes.stale, stage=stage.name, key=inst.key, problem=verdict.stale
                )
                await self._io(stale)
            state.started_at.append(time.monotonic())
            total = stage.retries + 1
            for tries in range(1, total + 1):
                if not held:
                    await self._slot(state, inst)
                    held = True
                if self.stopping or state.abort_reason or inst.key in state.outcomes:
                    return
                if live.attempts and (budget := self._out_of_budget(state)) is not None:
                    state.outcomes[inst.key] = self._ended(
                        InstanceResult(
                            stage.name,
                            inst.key,
                            "skipped",
                            inst.output,
                            tuple(live.attempts),
                            reason="budget",
                            message=f"not retried: {budget}",
                            fingerprint=verdict.fingerprint,
                        )
                    )
                    return
                attempt = live.next
                live.next += 1
                error = await self._attempt(state, live, attempt)
                self._free(state)
                held = False
                if error is None:
                    return
                final = (
                    tries == total
                    or not error.retryable
                    or self.stopping
                    or state.abort_reason is not None
                )
                delay = self._failed_attempt(
                    state, inst, attempt, attempt + total - tries, error, live.attempts, final
                )
                if delay is None:
                    if live.backup is not None and not live.backup.done():
                        await asyncio.wait({live.backup})  # the backup may still commit
                    if inst.key not in state.outcomes:
                        self._gave_up(state, live, error)
                    return
                await asyncio.sleep(delay)
        finally:
            if held:
                self._free(state)

    async def _backup(self, state: _StageState, live: _Live) -> None:
        """A speculative backup attempt of a straggling instance: it runs beside the original
        one, and the first of the two to commit a valid output wins (see :meth:`_speculate`)."""
        held = False
        queued = True
        inst = live.inst
        try:
            await self._slot(state, inst, first=True)
            held = True
            if (
                self.stopping
                or state.abort_reason
                or inst.key in state.outcomes
                or self._out_of_budget(state)
            ):
                return  # not run: it does not count against max_extra
            state.backups_queued -= 1
            queued = False
            state.backups += 1
            attempt = live.next
            live.next += 1
            error = await self._attempt(state, live, attempt, backup=True)
            if error is not None:
                self.notes.failure(
                    stage=state.plan.name,
                    key=inst.key,
                    attempt=attempt,
                    attempts=attempt,
                    cause=error.cause,
                    message=str(error),
                    detail=error.detail,
                    action="a speculative backup failed; the first attempt goes on",
                    logs=self._log_folder(state.plan.name, inst.key, attempt),
                )
                self.emit(
                    AttemptEnded(
                        state.plan.name,
                        inst.key,
                        attempt,
                        live.attempts[-1].duration_s,
                        error.cause,
                        str(error),
                        None,
                        live.attempts[-1].usage,
                    )
                )
        finally:
            if queued:
                state.backups_queued -= 1
            if held:
                self._free(state)

    async def _speculate(self, state: _StageState, group: asyncio.TaskGroup) -> None:
        """Watch the stage's running attempts and start a backup of each one that runs past
        the ``speculate.after`` percentile of the stage's successful durations, up to
        ``max_extra`` of its instances. Ends when the stage has nothing left running."""
        spec = state.plan.speculate
        if spec is None:
            return
        cap = max(1, math.floor(spec.share * len(state.plan.instances) + 1e-9))
        tick = 0.05
        while state.tasks:
            await asyncio.sleep(tick)
            durations = state.durations
            needed = spec.min_samples or _cohort(state, _SPECULATE_MIN_SAMPLES)
            if len(durations) < needed or state.backups + state.backups_queued >= cap:
                continue
            threshold = durations[
                min(len(durations) - 1, int(spec.percentile / 100 * len(durations)))
            ]
            tick = min(0.25, max(0.005, threshold / 10))
            now = time.monotonic()
            for running in sorted(state.running, key=lambda r: r.started):
                live = running.live
                if running.backup or live.backup is not None or live.inst.key in state.outcomes:
                    continue
                if (
                    now - running.started <= threshold
                    or state.backups + state.backups_queued >= cap
                ):
                    break  # the rest started later still
                state.backups_queued += 1
                live.backup = group.create_task(
                    self._backup(state, live), name=f"backup:{state.plan.name}/{live.inst.key}"
                )
                self._track(state, live.backup)

    def _succeeded(self, state: _StageState, duration: float) -> None:
        """Keep the stage's successful durations for relative timeouts and speculation, and
        tighten the running attempts' deadlines as the median moves."""
        stage = state.plan
        if stage.timeout_factor is None and stage.speculate is None:
            return
        bisect.insort(state.durations, duration)
        if stage.timeout_factor is not None:
            for running in state.running:
                self._tighten(state, running)

    def _tighten(self, state: _StageState, running: _Running) -> None:
        """Bring an attempt's deadline forward to ``timeout_factor`` times the stage's median
        successful duration, once enough attempts have succeeded to know it."""
        factor, durations = state.plan.timeout_factor, state.durations
        if factor is None or len(durations) < _cohort(state, _RELATIVE_MIN_SAMPLES):
            return
        limit = factor * durations[len(durations) // 2]
        deadline = running.started + limit
        when = running.scope.when()
        if (when is None or deadline < when) and _reschedule(running.scope, deadline):
            running.relative = limit

    def _failed_attempt(
        self,
        state: _StageState,
        inst: InstancePlan,
        attempt: int,
        last: int,
        error: InstanceError,
        attempts: list[AttemptRecord],
        final: bool,
    ) -> float | None:
        """Journal a failed attempt (``last`` is the number its last attempt would take);
        returns the backoff before the next one, or ``None`` when ``final``."""
        stage = state.plan
        delay = None
        if not final:
            delay = max(backoff_delay(stage.backoff, attempt, self.rng), error.retry_after or 0.0)
        self.notes.failure(
            stage=stage.name,
            key=inst.key,
            attempt=attempt,
            attempts=last,
            cause=error.cause,
            message=str(error),
            detail=error.detail,
            action="gave up" if delay is None else f"retrying in {delay:.1f}s",
            logs=self._log_folder(stage.name, inst.key, attempt),
        )
        self.emit(
            AttemptEnded(
                stage.name,
                inst.key,
                attempt,
                attempts[-1].duration_s,
                error.cause,
                str(error),
                delay,
                attempts[-1].usage,
            )
        )
        return delay

    def _gave_up(self, state: _StageState, live: _Live, error: InstanceError) -> None:
        """Record an instance that failed for good; halt the run or abort the stage if asked."""
        stage, inst = state.plan, live.inst
        state.outcomes[inst.key] = self._ended(
            InstanceResult(
                stage.name,
                inst.key,
                "failed",
                inst.output,
                tuple(live.attempts),
                cause=error.cause,
                message=str(error),
                fingerprint=live.verdict.fingerprint,
            )
        )
        if error.stops_run:
            self.halt(f"{stage.name}/{inst.key}: {error}")
        elif stage.on_failure == "abort" and state.abort_reason is None:
            self._abort(state, inst.key)

    def _log_dir(self, stage: str, key: str, attempt: int) -> Path:
        return Path(f"{self.logs}/{stage}/{key}/attempt-{attempt}")

    def _log_folder(self, stage: str, key: str, attempt: int) -> Path | None:
        """The attempt's log folder relative to the project, if its runner wrote one."""
        folder = self._log_dir(stage, key, attempt)
        return folder.relative_to(self.plan.project_dir) if folder.is_dir() else None

    def _abort(self, state: _StageState, key: str) -> None:
        state.abort_reason = f"aborted: {key!r} failed and the stage has on_failure: abort"
        current = asyncio.current_task()
        for task in list(state.tasks):
            if task is not current:
                task.cancel()

    async def _attempt(  # noqa: PLR0915 - an attempt's whole life, kept readable in one place
        self, state: _StageState, live: _Live, attempt: int, *, backup: bool = False
    ) -> InstanceError | None:
        """One attempt: run, validate, commit. Appends its record to ``live.attempts``; on
        success records the instance as committed and returns ``None``, else returns the
        error. ``None`` also when another attempt of the instance committed first."""
        stage, inst, verdict, attempts = state.plan, live.inst, live.verdict, live.attempts
        staging = self.bus.staging_dir(stage.name, inst.key, attempt)
        feedback = "" if backup else _feedback(attempts)
        ctx = self._context(
            state, inst, attempt, staging, verdict.inputs, verdict.missing, feedback
        )
        if self.on_event is not None:  # not in the ledger's event log: skip building it
            self.emit(AttemptStarted(stage.name, inst.key, attempt))
        wall = time.time()
        started = time.monotonic()
        self._ledger_attempt(ctx, verdict.fingerprint)
        here = False  # whether this attempt committed

        def ended(outcome: AttemptOutcome, error: InstanceError | None) -> None:
            duration = time.monotonic() - started
            if backup:
                state.backup_s += duration
                state.backup_usd += ctx.usage.cost_usd
            self._ledger_attempt(ctx, None, outcome, error, duration)

        def committed() -> None:
            nonlocal here
            here = True
            self._spent(state, ctx)
            duration = time.monotonic() - started
            attempts.append(
                AttemptRecord(attempt, wall, duration, usage=ctx.usage or None, backup=backup)
            )
            ended("committed", None)
            self._committed(state, live, attempt, duration, backup)

        error: InstanceError | None = None
        try:
            await self._run_agent(state, ctx, live, backup)
            files = scan(staging)
            commit = (state, live, attempt, staging, files)
            if state.reviewer is not None:  # validate, review, then commit what was reviewed
                await self._io(state.rules.validate, staging, inst.values, files)
                lane = state.lane if state.reviewer.runner.lane == state.runner.lane else None
                gate = lane.gate() if lane is not None else None
                await state.reviewer.judge(ctx, staging, self._io, gate)
                await _to_the_end(self._io(self._validate_and_commit, *commit, True), committed)
            elif state.rules.cheap(files):
                self._validate_and_commit(*commit)
                committed()
            else:
                await _to_the_end(self._io(self._validate_and_commit, *commit), committed)
        except InstanceError as exc:
            error = exc
        except _Superseded:
            ended("discarded", RunnerError(_SUPERSEDED))
        except asyncio.CancelledError:
            if not here:
                self._spent(state, ctx)
                superseded = inst.key in state.outcomes
                ended("discarded", RunnerError(_SUPERSEDED if superseded else "cancelled"))
            raise
        except Exception as exc:  # a runner's own bug must not take its siblings down
            tail = "".join(traceback.format_exception(exc)[-3:])
            error = RunnerError(f"{type(exc).__name__}: {exc}", detail=tail)
        finally:
            if not here:  # not committed: the staging folder is still there
                self.bus.discard(staging)
        if error is not None:
            self._spent(state, ctx)
            usage = ctx.usage or None
            duration = time.monotonic() - started
            attempts.append(
                AttemptRecord(attempt, wall, duration, error.cause, str(error), usage, backup)
            )
            ended("failed", error)
        return error

    def _committed(
        self, state: _StageState, live: _Live, attempt: int, duration: float, backup: bool
    ) -> None:
        """Record an instance whose attempt ``attempt`` committed; cancel its twin, if any."""
        stage, inst = state.plan, live.inst
        if self.on_event is not None:  # a success is not in the ledger's event log
            usage = live.attempts[-1].usage  # the record committed() has just added
            self.emit(AttemptEnded(stage.name, inst.key, attempt, duration, None, "", None, usage))
        self._succeeded(state, duration)
        if backup:
            state.backups_won += 1
        now, wall = time.monotonic(), time.time()
        for twin in state.running:  # the slower twin, about to be cancelled: its time counts
            if twin.live is live and twin.attempt != attempt:
                spent = now - twin.started
                live.attempts.append(
                    AttemptRecord(
                        twin.attempt, wall - spent, spent, "superseded", _SUPERSEDED,
                        backup=twin.backup,
                    )
                )  # fmt: skip
        state.outcomes[inst.key] = self._ended(
            InstanceResult(
                stage.name,
                inst.key,
                "committed",
                inst.output,
                tuple(sorted(live.attempts, key=lambda record: record.attempt)),
                fingerprint=live.verdict.fingerprint,
            )
        )
        other = live.primary if backup else live.backup
        if other is not None and other is not asyncio.current_task():
            other.cancel()  # the slower twin: its staging folder is removed as it unwinds

    async def _run_agent(
        self, state: _StageState, ctx: InstanceContext, live: _Live, backup: bool
    ) -> None:
        """Run the agent under the stage's timeout (brought forward by a relative timeout,
        pushed back by waits for the lane); fail the attempt if it wrote into the upstream
        outputs it may only read."""
        folders = [ref.path for ref in ctx.inputs]
        before = await self._io(snapshot, folders) if folders else None
        stage = state.plan
        running: _Running | None = None
        try:
            async with asyncio.timeout(stage.timeout) as scope:
                running = _Running(live, ctx.attempt, time.monotonic(), scope, backup)
                self._tighten(state, running)
                state.running.add(running)
                if state.lane is not None:
                    ctx = replace(ctx, gate=state.lane.gate(on_wait=_extend(scope)))
                if state.remote is not None and state.spec is not None:
                    await state.remote.execute(
                        state.runner, state.spec, ctx, stage.config.resources
                    )
                else:
                    await state.runner.run(ctx)
        except TimeoutError:
            if running is not None and running.relative is not None:
                raise RunnerTimeout(
                    f"ran past {stage.timeout_factor or 0:.0%} of the stage's median duration "
                    f"({running.relative:.3g}s) and was stopped"
                ) from None
            raise RunnerTimeout(
                f"ran past the stage's timeout of {stage.timeout:g}s and was stopped"
            ) from None
        finally:
            if running is not None:
                state.running.discard(running)
        if before is not None:
            await self._check_inputs_untouched(before, folders)

    def _context(
        self,
        state: _StageState,
        inst: InstancePlan,
        attempt: int,
        staging: Path,
        inputs: tuple[InputRef, ...],
        missing: tuple[str, ...],
        feedback: str,
    ) -> InstanceContext:
        stage = state.plan
        return InstanceContext(
            run_id=self.run_id,
            stage=stage.name,
            key=inst.key,
            attempt=attempt,
            params=inst.values,
            prompt=inst.prompt,
            output_dir=staging,
            final_dir=inst.output,
            inputs=inputs,
            missing=missing,
            project_dir=self.plan.project_dir,
            log_dir=self._log_dir(stage.name, inst.key, attempt),
            blueprint=stage.blueprint.path if stage.blueprint else None,
            timeout=stage.timeout,
            expected=state.rules.names(inst.values),
            reads=tuple(stage.config.reads),
            feedback=feedback,
        )

    def _ledger_attempt(
        self,
        ctx: InstanceContext,
        print_: str | None,
        outcome: AttemptOutcome | None = None,
        error: InstanceError | None = None,
        duration: float = 0.0,
    ) -> None:
        """Record an attempt's start (``outcome`` ``None``) or its end in the ledger."""
        if self.ledger is None:
            return
        if outcome is None:
            self.ledger.attempt_started(
                self.run_id,
                ctx.stage,
                ctx.key,
                ctx.attempt,
                started=time.time(),
                fingerprint=print_,
                log_dir=f"{STATE_DIR}/runs/{self.run_id}/logs/{ctx.stage}/{ctx.key}/"
                f"attempt-{ctx.attempt}",
            )
            return
        usage = ctx.usage or None
        self.ledger.attempt_ended(
            self.run_id,
            ctx.stage,
            ctx.key,
            ctx.attempt,
            ended=time.time(),
            duration_s=duration,
            outcome=outcome,
            cause=error.cause if error is not None else None,
            message=str(error) if error is not None else "",
            detail=error.detail if error is not None else "",
            usage=usage.to_json() if usage is not None else None,
            cost_usd=usage.cost_usd if usage is not None else None,
        )

    async def _check_inputs_untouched(self, before: Snapshot, folders: list[Path]) -> None:
        changed = await self._io(changed_inputs, before, folders)
        if changed:
            shown = ", ".join(
                str(Path(path).relative_to(self.plan.project_dir)) for path in changed[:5]
            )
            raise ConfinementError(
                f"the attempt changed upstream outputs it may only read: {shown}"
                + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            )

    def _validate_and_commit(
        self,
        state: _StageState,
        live: _Live,
        attempt: int,
        staging: Path,
        files: dict[str, int],
        validated: bool = False,
    ) -> None:
        """Validate (unless ``validated``), write the manifest into the staging folder, rename
        it into place. Of two attempts of one instance (a straggler and its backup), only the
        first renames."""
        inst = live.inst
        if not validated:
            state.rules.validate(staging, inst.values, files)
        digest = write_manifest(
            staging,
            files,
            stage=inst.stage,
            key=inst.key,
            run_id=self.run_id,
            attempt=attempt,
            fingerprint=live.verdict.fingerprint,
        )
        with live.claim:
            if live.won:
                raise _Superseded
            self.bus.commit(staging, inst.output, stage=inst.stage, key=inst.key)
            live.won = True
        self.digests[inst.stage][inst.key] = digest


def _extend(scope: asyncio.Timeout) -> Callable[[float], None]:
    """Time an attempt spends waiting for its lane (a pause after a 429, an empty bucket) is
    added to its timeout: the timeout is about the agent, not the provider's queue."""

    def waited(seconds: float) -> None:
        when = scope.when()
        if when is not None:
            _reschedule(scope, when + seconds)

    return waited


def _reschedule(scope: asyncio.Timeout, when: float) -> bool:
    """Move a timeout's deadline, unless it has already fired (its cancellation is on its
    way: too late to change it) or been left. Returns whether it moved."""
    if scope.expired():
        return False
    try:
        scope.reschedule(when)
    except RuntimeError:  # not entered any more
        return False
    return True


def _lane_name(lane: object) -> str:
    """A lane as people read it: ``anthropic claude-sonnet-4-5`` (never the credential)."""
    if isinstance(lane, tuple) and len(lane) >= 3:
        provider, base_url, model = lane[0], lane[1], lane[2]
        where = f" @ {base_url}" if base_url else ""
        return f"{provider} {model}{where}"
    return str(lane)


def _segments(
    stage: StagePlan, order: list[tuple[InstancePlan, _Verdict]]
) -> list[list[tuple[InstancePlan, _Verdict]]]:
    """The parts of a stage's admission order that run one after another: priority levels
    under ``priority_barrier``, cut into batches of ``waves``. Without either, one part: a
    sliding window in which a slot refills the moment an instance ends."""
    parts = [order]
    if stage.priority_barrier:
        parts = []
        for item in order:  # the order is by descending priority already
            if parts and parts[-1][0][0].priority == item[0].priority:
                parts[-1].append(item)
            else:
                parts.append([item])
    if stage.waves is not None:
        size = stage.waves
        parts = [part[i : i + size] for part in parts for i in range(0, len(part), size)]
    return [part for part in parts if part]


def _logged(event: Event) -> bool:
    if isinstance(event, AttemptEnded):
        return event.cause is not None
    return not isinstance(event, AttemptStarted | InstanceEnded)


_EventRow = tuple[str, str | None, str | None, int | None, dict[str, object] | None]


def _event_row(event: Event) -> _EventRow:
    """An event as the ledger stores it: its kind, where it happened, and its data."""
    kind = type(event).__name__
    if isinstance(event, AttemptStarted):
        return kind, event.stage, event.key, event.attempt, None
    if isinstance(event, AttemptEnded):
        data: dict[str, object] = {
            "duration_s": event.duration_s,
            "cause": event.cause,
            "message": event.message,
            "retry_in": event.retry_in,
        }
        return kind, event.stage, event.key, event.attempt, data
    if isinstance(event, InstanceEnded):
        result = event.result
        data = {"status": result.status, "cause": result.cause, "reason": result.reason}
        return kind, result.stage, result.key, None, data
    if isinstance(event, StageStarted):
        data = {
            "total": event.total,
            "limit": event.concurrency,
            "runner": event.runner,
            "model": event.model,
        }
        return kind, event.stage, None, None, data
    if isinstance(event, StageEnded):
        stage = event.result
        data = {
            "total": stage.total,
            "committed": stage.committed,
            "cached": stage.cached,
            "failed": stage.failed,
            "skipped": stage.skipped,
            "met_threshold": stage.met_threshold,
            "skipped_reason": stage.skipped_reason,
            "wall_s": stage.wall_s,
        }
        return kind, stage.name, None, None, data
    if isinstance(event, RunStarted):
        return kind, None, None, None, {"pipeline": event.pipeline, "stages": list(event.stages)}
    if isinstance(event, RunEnded):
        return kind, None, None, None, {"ok": event.ok, "cancelled": event.cancelled}
    if isinstance(event, LimitChanged):
        data = {"lane": event.lane, "old": event.old, "new": event.new, "reason": event.reason}
        return kind, event.stage, None, None, data
    if isinstance(event, LanePaused):
        return kind, None, None, None, {"lane": event.lane, "seconds": event.seconds}
    if isinstance(event, BudgetReached):
        return kind, event.stage, None, None, {"reason": event.reason}
    return kind, None, None, None, None


def _model(stage: StagePlan) -> str:
    """The model a stage's runner asks for ("" for runners without one)."""
    model = getattr(stage.runner, "model", None)
    llm = stage.runner.type in ("anthropic", "openai", "claude-code")
    if not model and llm and stage.blueprint is not None:
        model = stage.blueprint.model
    return model or ""


def _feedback(attempts: list[AttemptRecord]) -> str:
    """Why the last attempt's output was rejected, for the next one to fix."""
    if attempts and attempts[-1].cause in ("output-invalid", "review-rejected", "confinement"):
        return attempts[-1].message
    return ""


async def _to_the_end(work: Awaitable[None], on_success: Callable[[], None]) -> None:
    """Await ``work`` to its end even when cancelled meanwhile, call ``on_success`` if it
    succeeded, then let any cancellation continue.

    Validation and commit run in a thread that cannot be interrupted. Unwinding while the
    thread still renames would race the removal of the staging folder, and an instance whose
    rename went through must be counted committed, not cancelled.
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                continue
        if task.exception() is None:
            on_success()
        raise
    on_success()

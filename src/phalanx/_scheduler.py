"""The scheduler: runs a planned pipeline.

Stages start when the stages they need have passed their barrier, so independent stages run
side by side under one global cap. Inside a stage a feeder starts the instances in priority
order, each the moment it holds a slot of the stage and one of the run (a sliding window: a slot
refills the moment an instance ends, no waves). Each attempt runs under the stage's timeout, is
validated, and is committed by an atomic rename. A failure is caught at the instance boundary:
it becomes an outcome, is written to the notes, and is retried after a backoff with full jitter.
Only a bug in phalanx itself cancels siblings.

Stopping (Ctrl-C, SIGTERM, :meth:`RunHandle.stop`) cancels in-flight attempts — their staging
folders are removed, a ``command`` agent's process group is killed — and marks everything not
committed as skipped (cancelled). Committed outputs stay.

Before a stage starts, each instance's fingerprint is computed (:mod:`phalanx._manifest`). An
instance whose committed output carries that fingerprint and is intact is not run again
(``cached``; ``committed`` when an earlier process of this same run committed it, i.e. on a
resume); one that failed before with the same fingerprint is not retried unless asked. The run
holds the project's lock throughout and records everything in the ledger.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import os
import random
import secrets
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from ._config import Backoff
from ._databus import DataBus, OutputRules, Snapshot, changed_inputs, load_schema, scan, snapshot
from ._errors import ConfinementError, InstanceError, RunnerError, RunnerTimeout
from ._events import (
    AttemptEnded,
    AttemptStarted,
    Event,
    EventHandler,
    InstanceEnded,
    RunEnded,
    RunStarted,
    StageEnded,
    StageStarted,
)
from ._ledger import AttemptOutcome, Ledger, LedgerError, OutcomeRow, RunStatus, open_ledger
from ._lock import ProjectLock
from ._manifest import fingerprint, read_manifest, stage_digest, verify_output, write_manifest
from ._notes import Notes
from ._pipeline import STATE_DIR, InstancePlan, Plan, StagePlan
from ._results import AttemptRecord, InstanceResult, RunResult, StageResult, Status
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
    function or a broken JSON Schema is reported before anything runs."""
    for stage in plan.stages:
        _stage_tools(plan, stage, None)


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
    return runner, OutputRules(stage.expect, schemas, stage.config.check, stage.timeout)


class RunHandle:
    """Lets a caller stop a run in progress (the CLI wires Ctrl-C and SIGTERM to it)."""

    def __init__(self) -> None:
        self._run: _Run | None = None
        self.stop_reason: str | None = None

    def stop(self, reason: str = "stopped") -> None:
        """Stop admitting, cancel in-flight attempts; safe to call more than once."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._run is not None:
            self._run.stop(self.stop_reason)


@dataclass(eq=False)
class _StageState:
    plan: StagePlan
    runner: Runner
    rules: OutputRules
    limit: int
    slots: asyncio.Semaphore
    outcomes: dict[str, InstanceResult] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    abort_reason: str | None = None
    force: bool = False


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
) -> RunResult:
    """Run the selected stages of ``plan``; see the module docstring.

    ``concurrency`` overrides every stage's own limit (and lifts the global cap to at least
    it). ``runners`` supplies ready runner objects by stage name instead of building them from
    the stage's settings. ``force`` runs every instance (``force_stages``: those of the named
    stages) even when its output is up to date; ``rerun_failed`` retries instances that failed
    before with the same fingerprint. ``resume`` continues the run ``run_id`` (its in-flight
    attempts are discarded, its committed instances kept). ``ledger`` false keeps no ledger
    (benchmarks compare the two); ``options`` is recorded with the run so that ``phalanx
    resume`` can plan it again. Returns when every selected stage has passed its barrier or
    been skipped. Raises :class:`~phalanx.ProjectBusyError` when another run holds the
    project.
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
        self.global_slots = asyncio.Semaphore(cap)
        # Validation, commits and input snapshots: a pool of our own, so a slow check command
        # in one stage does not queue behind asyncio's few default threads.
        self.pool = ThreadPoolExecutor(min(64, cap), thread_name_prefix="phalanx-io")
        self.stopping = False
        self.stop_reason: str | None = None
        self.halted: str | None = None
        self.results: dict[str, StageResult] = {}
        self.finished: dict[str, asyncio.Event] = {}
        self.active: set[_StageState] = set()
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
        runner, rules = _stage_tools(
            self.plan, stage, self.given_runners.get(stage.name), self.clients
        )
        limit = self.override or stage.concurrency
        force = self.force or stage.name in self.force_stages
        return _StageState(stage, runner, rules, limit, asyncio.Semaphore(limit), force=force)

    async def execute(self) -> RunResult:
        selected = [s for s in self.plan.stages if s.name in self.plan.selected]
        states = {stage.name: self._prepare(stage) for stage in selected}
        self.finished = {stage.name: asyncio.Event() for stage in selected}
        self.digests = {stage.name: {} for stage in selected}
        started = time.monotonic()
        try:
            # Even when cancelled meanwhile, wait for the thread: it may hold the lock by then.
            await _to_the_end(asyncio.to_thread(self._open), lambda: None)
        except BaseException:
            self._close()
            self.pool.shutdown(wait=False)
            for state in states.values():
                await state.runner.aclose()
            await self.clients.aclose()
            raise
        try:
            return await self._execute(states, started)
        finally:
            await asyncio.to_thread(self._close)

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
                for name, state in states.items():
                    group.create_task(self._stage(state), name=f"stage:{name}")
        finally:
            await self._io(self.bus.close)
            self.pool.shutdown(wait=False)  # every task above awaited its own work
            for state in states.values():
                await state.runner.aclose()
            await self.clients.aclose()
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
            blocked = await self._wait_for_needs(stage)
            if blocked is not None:
                result = self._skipped_stage(stage, blocked)
            else:
                result = await self._run_stage(state)
            self.results[stage.name] = result
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

    async def _run_stage(self, state: _StageState) -> StageResult:
        stage = state.plan
        self.emit(StageStarted(stage.name, len(stage.instances), state.limit))
        if self.ledger is not None:
            self.ledger.stage_started(
                self.run_id,
                stage.name,
                position=self.plan.index(stage.name),
                total=len(stage.instances),
                started=time.time(),
            )
        started = time.monotonic()
        available = {inst.key: self._available(inst) for inst in stage.instances}
        verdicts = await self._io(self._verdicts, state, available)
        order = []
        for inst in sorted(stage.instances, key=lambda inst: (-inst.priority, inst.index)):
            verdict = verdicts[inst.key]
            if verdict.outcome is None:
                order.append((inst, verdict))
            else:
                if verdict.digest is not None:
                    self.digests[stage.name][inst.key] = verdict.digest
                state.outcomes[inst.key] = self._ended(verdict.outcome)
        self.active.add(state)
        try:
            async with asyncio.TaskGroup() as group:
                self._track(state, group.create_task(self._feed(state, order, group)))
        finally:
            self.active.discard(state)
        if self.halted:
            reason = "run stopped by a fatal error"
        elif self.stopping:
            reason = "cancelled"
        else:
            reason = state.abort_reason or "cancelled"
        instances = tuple(
            state.outcomes.get(inst.key)
            or self._ended(
                InstanceResult(stage.name, inst.key, "skipped", inst.output, reason=reason)
            )
            for inst in stage.instances
        )
        return StageResult(stage.name, instances, stage.required, time.monotonic() - started)

    def _ended(self, result: InstanceResult) -> InstanceResult:
        self._recorded(result)
        self.emit(InstanceEnded(result))
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
        available: Mapping[str, tuple[tuple[InputRef, ...], tuple[str, ...]]],
    ) -> dict[str, _Verdict]:
        """Fingerprint every instance of a stage and decide which need to run (in a thread:
        it reads manifests and hashes files)."""
        stage = state.plan
        shared = stage_digest(stage, state.runner, self.plan.project_dir)
        failed_before = {}
        first: Mapping[str, int] = {}
        if self.ledger is not None:
            if not self.rerun_failed and not state.force:
                failed_before = self.ledger.outcomes(
                    self.plan.pipeline.config.name, stage.name, status="failed"
                )
            if self.resume:
                first = self.ledger.last_attempts(self.run_id, stage.name)
        verdicts = {}
        for inst in stage.instances:
            inputs, missing = available[inst.key]
            print_ = fingerprint(
                shared,
                inst.key,
                inst.prompt,
                inst.values,
                [(ref.stage, ref.key, self._digest(ref)) for ref in inputs],
                missing,
            )
            verdict = self._verdict(state, inst, print_, failed_before.get(inst.key))
            verdicts[inst.key] = replace(
                verdict, inputs=inputs, missing=missing, first=first.get(inst.key, 0) + 1
            )
        return verdicts

    def _verdict(
        self, state: _StageState, inst: InstancePlan, print_: str, failed: OutcomeRow | None
    ) -> _Verdict:
        if state.force:
            return _Verdict(print_)
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
                return _Verdict(print_, outcome, manifest.digest)
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
            return _Verdict(print_, outcome)
        return _Verdict(print_, stale=stale)

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

    async def _slot(self, state: _StageState) -> None:
        """Take a slot of the stage and one of the run, in that order, or neither."""
        await state.slots.acquire()
        try:
            await self.global_slots.acquire()
        except BaseException:
            state.slots.release()
            raise

    def _free(self, state: _StageState) -> None:
        self.global_slots.release()
        state.slots.release()

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
        name = state.plan.name
        for inst, verdict in order:
            await self._slot(state)
            if self.stopping or state.abort_reason:
                self._free(state)
                return
            self._track(
                state,
                group.create_task(
                    self._instance(state, inst, verdict), name=f"instance:{name}/{inst.key}"
                ),
            )

    async def _instance(self, state: _StageState, inst: InstancePlan, verdict: _Verdict) -> None:
        """One instance, from its first attempt (started holding its slot, see :meth:`_feed`)
        to its outcome. The slot is given back during a retry's backoff."""
        stage = state.plan
        held = True
        try:
            inputs, missing = verdict.inputs, verdict.missing
            if inst.inputs and not inputs:
                state.outcomes[inst.key] = self._ended(
                    InstanceResult(
                        stage.name,
                        inst.key,
                        "skipped",
                        inst.output,
                        reason="upstream failed",
                        message=f"none of its inputs committed: {', '.join(missing[:5])}",
                        fingerprint=verdict.fingerprint,
                    )
                )
                return
            if verdict.stale is not None:
                stale = functools.partial(
                    self.notes.stale, stage=stage.name, key=inst.key, problem=verdict.stale
                )
                await self._io(stale)
            attempts: list[AttemptRecord] = []
            total = stage.retries + 1
            for attempt in range(verdict.first, verdict.first + total):
                if not held:
                    await self._slot(state)
                    held = True
                if self.stopping or state.abort_reason:
                    return
                error = await self._attempt(
                    state, inst, attempt, verdict, inputs, missing, attempts, _feedback(attempts)
                )
                self._free(state)
                held = False
                if error is None:
                    return
                delay = self._failed_attempt(state, inst, attempt, verdict, error, attempts)
                if delay is None:
                    return
                await asyncio.sleep(delay)
        finally:
            if held:
                self._free(state)

    def _failed_attempt(
        self,
        state: _StageState,
        inst: InstancePlan,
        attempt: int,
        verdict: _Verdict,
        error: InstanceError,
        attempts: list[AttemptRecord],
    ) -> float | None:
        """Journal a failed attempt; returns the backoff before the next one, or ``None`` when
        the instance has failed for good (and then records that, aborting if asked)."""
        stage = state.plan
        total = verdict.first + stage.retries  # the number of its last attempt
        last = (
            attempt == total
            or not error.retryable
            or self.stopping
            or state.abort_reason is not None
        )
        delay = None
        if not last:
            delay = max(backoff_delay(stage.backoff, attempt, self.rng), error.retry_after or 0.0)
        self.notes.failure(
            stage=stage.name,
            key=inst.key,
            attempt=attempt,
            attempts=total,
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
            )
        )
        if delay is None:
            state.outcomes[inst.key] = self._ended(
                InstanceResult(
                    stage.name,
                    inst.key,
                    "failed",
                    inst.output,
                    tuple(attempts),
                    cause=error.cause,
                    message=str(error),
                    fingerprint=verdict.fingerprint,
                )
            )
            if error.stops_run:
                self.halt(f"{stage.name}/{inst.key}: {error}")
            elif stage.on_failure == "abort" and state.abort_reason is None:
                self._abort(state, inst.key)
        return delay

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

    async def _attempt(
        self,
        state: _StageState,
        inst: InstancePlan,
        attempt: int,
        verdict: _Verdict,
        inputs: tuple[InputRef, ...],
        missing: tuple[str, ...],
        attempts: list[AttemptRecord],
        feedback: str,
    ) -> InstanceError | None:
        """One attempt: run, validate, commit. Appends its record to ``attempts``; on success
        records the instance as committed and returns ``None``, else returns the error."""
        stage = state.plan
        staging = self.bus.staging_dir(stage.name, inst.key, attempt)
        ctx = self._context(state, inst, attempt, staging, inputs, missing, feedback)
        self.emit(AttemptStarted(stage.name, inst.key, attempt))
        wall = time.time()
        started = time.monotonic()
        self._ledger_attempt(ctx, verdict.fingerprint)

        def ended(outcome: AttemptOutcome, error: InstanceError | None) -> None:
            self._ledger_attempt(ctx, None, outcome, error, time.monotonic() - started)

        def committed() -> None:
            duration = time.monotonic() - started
            attempts.append(AttemptRecord(attempt, wall, duration, usage=ctx.usage or None))
            ended("committed", None)
            self.emit(AttemptEnded(stage.name, inst.key, attempt, duration, None, "", None))
            state.outcomes[inst.key] = self._ended(
                InstanceResult(
                    stage.name,
                    inst.key,
                    "committed",
                    inst.output,
                    tuple(attempts),
                    fingerprint=verdict.fingerprint,
                )
            )

        error: InstanceError | None = None
        try:
            await self._run_agent(state, ctx)
            files = scan(staging)
            commit = (state, inst, attempt, verdict.fingerprint, staging, files)
            if state.rules.cheap(files):
                self._validate_and_commit(*commit)
                committed()
            else:
                await _to_the_end(self._io(self._validate_and_commit, *commit), committed)
        except InstanceError as exc:
            error = exc
        except asyncio.CancelledError:
            if inst.key not in state.outcomes:
                ended("discarded", RunnerError("cancelled while running"))
            raise
        except Exception as exc:  # a runner's own bug must not take its siblings down
            tail = "".join(traceback.format_exception(exc)[-3:])
            error = RunnerError(f"{type(exc).__name__}: {exc}", detail=tail)
        finally:
            if inst.key not in state.outcomes:  # not committed: the staging folder is still there
                self.bus.discard(staging)
        if error is not None:
            duration = time.monotonic() - started
            attempts.append(
                AttemptRecord(attempt, wall, duration, error.cause, str(error), ctx.usage or None)
            )
            ended("failed", error)
        return error

    async def _run_agent(self, state: _StageState, ctx: InstanceContext) -> None:
        """Run the agent under the stage's timeout; fail the attempt if it wrote into the
        upstream outputs it may only read."""
        folders = [ref.path for ref in ctx.inputs]
        before = await self._io(snapshot, folders) if folders else None
        try:
            async with asyncio.timeout(state.plan.timeout):
                await state.runner.run(ctx)
        except TimeoutError:
            raise RunnerTimeout(
                f"ran past the stage's timeout of {state.plan.timeout:g}s and was stopped"
            ) from None
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
        inst: InstancePlan,
        attempt: int,
        print_: str,
        staging: Path,
        files: dict[str, int],
    ) -> None:
        """Validate, write the manifest into the staging folder, rename it into place."""
        state.rules.validate(staging, inst.values, files)
        digest = write_manifest(
            staging,
            files,
            stage=inst.stage,
            key=inst.key,
            run_id=self.run_id,
            attempt=attempt,
            fingerprint=print_,
        )
        self.bus.commit(staging, inst.output, stage=inst.stage, key=inst.key)
        self.digests[inst.stage][inst.key] = digest


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
        return kind, event.stage, None, None, {"total": event.total, "limit": event.concurrency}
    if isinstance(event, StageEnded):
        stage = event.result
        data = {
            "total": stage.total,
            "committed": stage.committed,
            "cached": stage.cached,
            "failed": stage.failed,
            "skipped": stage.skipped,
        }
        return kind, stage.name, None, None, data
    if isinstance(event, RunStarted):
        return kind, None, None, None, {"pipeline": event.pipeline, "stages": list(event.stages)}
    if isinstance(event, RunEnded):
        return kind, None, None, None, {"ok": event.ok, "cancelled": event.cancelled}
    return kind, None, None, None, None


def _feedback(attempts: list[AttemptRecord]) -> str:
    """Why the last attempt's output was rejected, for the next one to fix."""
    if attempts and attempts[-1].cause in ("output-invalid", "confinement"):
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

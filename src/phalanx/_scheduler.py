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
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import secrets
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
from ._notes import Notes
from ._pipeline import STATE_DIR, InstancePlan, Plan, StagePlan
from ._results import AttemptRecord, InstanceResult, RunResult, StageResult
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


async def run_plan(
    plan: Plan,
    *,
    run_id: str | None = None,
    concurrency: int | None = None,
    on_event: EventHandler | None = None,
    handle: RunHandle | None = None,
    rng: random.Random | None = None,
    runners: Mapping[str, Runner] | None = None,
) -> RunResult:
    """Run the selected stages of ``plan``; see the module docstring.

    ``concurrency`` overrides every stage's own limit (and lifts the global cap to at least
    it). ``runners`` supplies ready runner objects by stage name instead of building them from
    the stage's settings. Returns when every selected stage has passed its barrier or been
    skipped.
    """
    run = _Run(
        plan,
        run_id=run_id or new_run_id(),
        concurrency=concurrency,
        on_event=on_event,
        rng=rng or random.Random(),  # noqa: S311 - jitter, not secrets
        runners=runners or {},
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
    ) -> None:
        self.plan = plan
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
        self.committed: dict[str, set[str]] = {}
        self.clients = Clients()
        self.logs = self.state_dir / "runs" / run_id / "logs"

    def _io(self, function: Callable[..., _T], *args: object) -> asyncio.Future[_T]:
        return asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    def emit(self, event: Event) -> None:
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
        return _StageState(stage, runner, rules, limit, asyncio.Semaphore(limit))

    async def execute(self) -> RunResult:
        selected = [s for s in self.plan.stages if s.name in self.plan.selected]
        states = {stage.name: self._prepare(stage) for stage in selected}
        self.finished = {stage.name: asyncio.Event() for stage in selected}
        started = time.monotonic()
        await self._io(self.bus.open)
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
        (folder / "summary.json").write_text(
            json.dumps(result.to_json(), indent=2, ensure_ascii=False), encoding="utf-8"
        )

    async def _stage(self, state: _StageState) -> None:
        stage = state.plan
        try:
            blocked = await self._wait_for_needs(stage)
            if blocked is not None:
                result = self._skipped_stage(stage, blocked)
            else:
                result = await self._run_stage(state)
            self.results[stage.name] = result
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
            InstanceResult(stage.name, inst.key, "skipped", inst.output, reason=short)
            for inst in stage.instances
        )
        return StageResult(stage.name, instances, stage.required, 0.0, skipped_reason=reason)

    async def _run_stage(self, state: _StageState) -> StageResult:
        stage = state.plan
        self.emit(StageStarted(stage.name, len(stage.instances), state.limit))
        started = time.monotonic()
        order = sorted(stage.instances, key=lambda inst: (-inst.priority, inst.index))
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
        if result.status == "committed":
            self.committed.setdefault(result.stage, set()).add(result.key)
        self.emit(InstanceEnded(result))
        return result

    def _available(self, inst: InstancePlan) -> tuple[tuple[InputRef, ...], tuple[str, ...]]:
        """Split an instance's inputs into committed ones and missing ones. The outputs of a
        stage that is not part of this run are read from disk as earlier runs left them."""
        if not inst.inputs:
            return (), ()
        present: list[InputRef] = []
        missing: list[str] = []
        for ref in inst.inputs:
            if ref.stage in self.finished:
                ok = ref.key in self.committed.get(ref.stage, ())
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
        self, state: _StageState, order: list[InstancePlan], group: asyncio.TaskGroup
    ) -> None:
        """Start instances in priority order, each the moment a slot is free.

        An instance task is created only once it holds its slot, so a stage of 10,000 does not
        park 10,000 tasks on a semaphore; instances never started (stop, abort) have no task
        and are recorded as skipped.
        """
        name = state.plan.name
        for inst in order:
            await self._slot(state)
            if self.stopping or state.abort_reason:
                self._free(state)
                return
            self._track(
                state,
                group.create_task(self._instance(state, inst), name=f"instance:{name}/{inst.key}"),
            )

    async def _instance(self, state: _StageState, inst: InstancePlan) -> None:
        """One instance, from its first attempt (started holding its slot, see :meth:`_feed`)
        to its outcome. The slot is given back during a retry's backoff."""
        stage = state.plan
        held = True
        try:
            inputs, missing = self._available(inst)
            if inst.inputs and not inputs:
                state.outcomes[inst.key] = self._ended(
                    InstanceResult(
                        stage.name,
                        inst.key,
                        "skipped",
                        inst.output,
                        reason="upstream failed",
                        message=f"none of its inputs committed: {', '.join(missing[:5])}",
                    )
                )
                return
            attempts: list[AttemptRecord] = []
            total = stage.retries + 1
            for attempt in range(1, total + 1):
                if not held:
                    await self._slot(state)
                    held = True
                if self.stopping or state.abort_reason:
                    return
                error = await self._attempt(
                    state, inst, attempt, inputs, missing, attempts, _feedback(attempts)
                )
                self._free(state)
                held = False
                if error is None:
                    return
                delay = self._failed_attempt(state, inst, attempt, total, error, attempts)
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
        total: int,
        error: InstanceError,
        attempts: list[AttemptRecord],
    ) -> float | None:
        """Journal a failed attempt; returns the backoff before the next one, or ``None`` when
        the instance has failed for good (and then records that, aborting if asked)."""
        stage = state.plan
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
        inputs: tuple[InputRef, ...],
        missing: tuple[str, ...],
        attempts: list[AttemptRecord],
        feedback: str,
    ) -> InstanceError | None:
        """One attempt: run, validate, commit. Appends its record to ``attempts``; on success
        records the instance as committed and returns ``None``, else returns the error."""
        stage = state.plan
        staging = self.bus.staging_dir(stage.name, inst.key, attempt)
        ctx = InstanceContext(
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
        self.emit(AttemptStarted(stage.name, inst.key, attempt))
        wall = time.time()
        started = time.monotonic()

        def committed() -> None:
            duration = time.monotonic() - started
            attempts.append(AttemptRecord(attempt, wall, duration, usage=ctx.usage or None))
            self.emit(AttemptEnded(stage.name, inst.key, attempt, duration, None, "", None))
            state.outcomes[inst.key] = self._ended(
                InstanceResult(stage.name, inst.key, "committed", inst.output, tuple(attempts))
            )

        error: InstanceError | None = None
        folders = [ref.path for ref in inputs]
        try:
            before = await self._io(snapshot, folders) if folders else None
            try:
                async with asyncio.timeout(stage.timeout):
                    await state.runner.run(ctx)
            except TimeoutError:
                raise RunnerTimeout(
                    f"ran past the stage's timeout of {stage.timeout:g}s and was stopped"
                ) from None
            if before is not None:
                await self._check_inputs_untouched(before, folders)
            files = scan(staging)
            if state.rules.cheap(files):
                self._validate_and_commit(state, inst, staging, files)
                committed()
            else:
                await _to_the_end(
                    self._io(self._validate_and_commit, state, inst, staging, files), committed
                )
        except InstanceError as exc:
            error = exc
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
        return error

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
        self, state: _StageState, inst: InstancePlan, staging: Path, files: dict[str, int]
    ) -> None:
        state.rules.validate(staging, inst.values, files)
        self.bus.commit(staging, inst.output, stage=inst.stage, key=inst.key)


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

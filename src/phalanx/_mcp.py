"""``phalanx mcp``: an MCP server on stdin/stdout, so that a chat agent (Claude Code, or any
client of the Model Context Protocol) can hand a fan-out to phalanx and read back what
happened.

The server offers seven tools. ``plan`` expands a pipeline without running anything;
``start_run`` plans it too (a bad pipeline is refused before anything starts), then starts
``phalanx run --run-id ID`` as a detached process and returns at once; ``status``,
``stage_summary`` and ``failures`` read the project's ledger; ``stop_run`` asks a run this
server started to stop; ``import_project`` writes the pipeline file of a POMASA project
(:mod:`phalanx._pomasa`). A run is a process of its own, in its own session: it goes on when the
chat ends and the server exits, and the ledger keeps its record either way.

Every figure the tools return comes from the ledger, never from what the server expected to
happen. The server adds only what the ledger cannot know: that a run it started exited before
recording itself (``failed-to-start``, with the exit code and the end of its log) or has not
recorded itself yet (``starting``).

The ``mcp`` package (``pip install 'phalanx[mcp]'``) is imported only when the command runs;
the service (:class:`_Service`) does not need it. ``cli.py`` adds the command to the
``phalanx`` group with :func:`register`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, NoReturn

import click
from pydantic import Field

from ._errors import PhalanxError, UsageError
from ._inspect import _failure_groups, _iso, _round, _run, _stage_lines, _StageLine, _wall_s
from ._ledger import LEDGER_FILE, AttemptRow, InstanceRow, Ledger, RunRow, open_ledger
from ._pipeline import STATE_DIR, Plan, StagePlan, load_pipeline, plan_pipeline
from ._pomasa import RunnerChoice, import_project
from ._scheduler import check_runners, new_run_id
from ._usage import Usage
from .backends import backend_names

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

__all__ = ["register"]

EXIT_USAGE = 2
MCP_DIR: Final = "mcp"
"""Where, inside the project's state folder, the server keeps the output of the runs it
starts: ``ID.log`` (the run's stderr: progress lines and errors) and ``ID.json`` (its
stdout: the JSON summary)."""

_INSTALL = "phalanx mcp needs the MCP SDK, version 2.3 or later: pip install 'phalanx[mcp]'"
_FIRST_KEYS = 8
_SLOWEST = 5
_KEYS_SHOWN = 50
_DETAIL_CHARS = 2000
_LOG_CHARS = 4000
_SUMMARY_CHARS = 20_000
_ENDED = frozenset({"ok", "failed", "interrupted", "halted", "crashed", "failed-to-start"})

_INSTRUCTIONS = """\
phalanx runs one prompt-defined agent over many partitions in parallel and records every
instance in a ledger. Use plan to see what a pipeline expands to, start_run to start it (it
returns at once with a run id), then call status with that run id every few seconds until
`done` is true: never assume a run finished or succeeded without reading status. When
instances failed, read failures (cause, message, stderr tail, log folder) before retrying;
stage_summary gives one stage's figures and its summary file. A run keeps going if this chat
ends; stop_run stops a run this server started. For a POMASA project (agents/NN.name.md
blueprints, references/, an orchestrator blueprint) with no pipeline file yet, import_project
writes one; show the user the TODOs it reports rather than guessing their values."""


def _fail(error: UsageError) -> NoReturn:
    click.echo(f"error: {error}", err=True)
    sys.exit(EXIT_USAGE)


# --------------------------------------------------------------------------------------------
# The runs this server started


@dataclass
class _Started:
    """A ``phalanx run`` process this server started, and where its output goes."""

    run_id: str
    project: Path
    pipeline: Path
    process: subprocess.Popen[bytes]
    log: Path
    started: float
    stop_sent: float | None = None

    def exit_code(self) -> int | None:
        """The process's exit code (reaping it), or ``None`` while it runs."""
        return self.process.poll()

    def to_json(self) -> dict[str, object]:
        code = self.exit_code()
        return {
            "pid": self.process.pid,
            "alive": code is None,
            "exit_code": code,
            "log": str(self.log),
            "stop_requested": self.stop_sent is not None,
        }


@dataclass
class _Found:
    """What a status-like tool reads: the project, its open ledger, the run, and the process
    when this server started the run. ``run`` is ``None`` only for a run this server started
    that the ledger does not hold (yet)."""

    root: Path
    ledger: Ledger | None
    run: RunRow | None
    started: _Started | None


# --------------------------------------------------------------------------------------------
# The tools, without the protocol


@dataclass
class _Service:
    """The seven tools as plain methods: arguments in, JSON-ready dicts out, a
    :class:`UsageError` (naming the file, field or run, and the fix) for anything the caller
    can correct. Paths in arguments are relative to ``root``. Safe to call from several
    threads at once."""

    root: Path
    runs: dict[str, _Started] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def path(self, given: str) -> Path:
        """``given`` (absolute, ``~``, or relative to the server's folder) as a path."""
        path = Path(given).expanduser()
        return path if path.is_absolute() else self.root / path

    # -- plan ----------------------------------------------------------------------------

    def _plan(
        self,
        pipeline: str,
        stages: Sequence[str] | None,
        only: Sequence[str] | None,
        settings: Mapping[str, object] | None,
    ) -> Plan:
        loaded = load_pipeline(self.path(pipeline), runner_settings=settings or None)
        return plan_pipeline(loaded, stages=stages or None, only=only or None)

    def plan(
        self,
        pipeline: str,
        stages: Sequence[str] | None = None,
        only: Sequence[str] | None = None,
        settings: Mapping[str, object] | None = None,
    ) -> dict[str, object]:
        """What ``pipeline`` expands to, stage by stage; nothing runs."""
        planned = self._plan(pipeline, stages, only, settings)
        return {
            "pipeline": planned.pipeline.config.name,
            "pipeline_file": str(planned.pipeline.path),
            "project": str(planned.project_dir),
            "instances": sum(len(stage.instances) for stage in planned.stages),
            "stages": [_stage_plan(planned, stage) for stage in planned.stages],
            "checks": "passed: every instance owns a distinct output folder, none nested in "
            "another's, all inside the project; no stage reads its own outputs",
        }

    # -- import_project ------------------------------------------------------------------

    def import_project(
        self,
        project: str,
        *,
        runner: str = "claude-code",
        model: str | None = None,
        params: Mapping[str, str] | None = None,
        review: bool = False,
        force: bool = False,
    ) -> dict[str, object]:
        """``phalanx import``: a pipeline file for the POMASA project in ``project``."""
        result = import_project(
            self.path(project),
            runner=runner,
            model=model,
            params=params,
            review=review,
            force=force,
        )
        todos = [{"where": where, "reason": reason} for where, reason in result.todos]
        return {
            "pipeline": str(result.path),
            "stages": [
                {"name": name, "kind": kind, "instances": source}
                for name, kind, source in result.stages
            ],
            "todos": todos,
            "message": (
                f"wrote {result.path}; {len(todos)} value(s) marked TODO must be filled in "
                "before it plans or runs (ask the user; import again with params, or edit "
                "the file)"
                if todos
                else f"wrote {result.path}; plan it, then start_run"
            ),
        }

    # -- start_run -----------------------------------------------------------------------

    def start_run(
        self,
        pipeline: str,
        *,
        stages: Sequence[str] | None = None,
        only: Sequence[str] | None = None,
        settings: Mapping[str, object] | None = None,
        concurrency: int | None = None,
        backend: str | None = None,
        force: bool = False,
        rerun_failed: bool = False,
        budget_usd: float | None = None,
        budget_tokens: int | None = None,
    ) -> dict[str, object]:
        """Plan ``pipeline`` (refusing a bad one before anything starts), then start it as a
        detached ``phalanx run`` process; return at once."""
        planned = self._plan(pipeline, stages, only, settings)
        check_runners(planned)
        if backend is not None and backend not in backend_names():
            raise UsageError(
                f"backend {backend!r}: no such backend; the backends are "
                f"{', '.join(backend_names())}"
            )
        run_id = new_run_id()
        argv = [
            sys.executable,
            "-m",
            "phalanx",
            "run",
            str(planned.pipeline.path),
            "--run-id",
            run_id,
            "-q",
            "--json",
        ]
        for name in stages or ():
            argv += ["--stage", name]
        for key in only or ():
            argv += ["--only", key]
        for name, value in (settings or {}).items():
            argv += ["--set", f"{name}={_setting(value)}"]
        if concurrency is not None:
            argv += ["--concurrency", str(concurrency)]
        if backend is not None:
            argv += ["--backend", backend]
        if force:
            argv.append("--force")
        if rerun_failed:
            argv.append("--rerun-failed")
        if budget_usd is not None:
            argv += ["--budget-usd", repr(budget_usd)]
        if budget_tokens is not None:
            argv += ["--budget-tokens", str(budget_tokens)]
        folder = planned.project_dir / STATE_DIR / MCP_DIR
        log, summary = folder / f"{run_id}.log", folder / f"{run_id}.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with log.open("wb") as err, summary.open("wb") as out:
                process = subprocess.Popen(
                    argv,
                    cwd=planned.project_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    start_new_session=True,  # the run outlives this server and the chat
                )
        except OSError as exc:
            raise UsageError(
                f"{folder}: cannot start the run there ({exc.strerror or exc}); check that "
                "the project folder is writable"
            ) from exc
        started = _Started(
            run_id=run_id,
            project=planned.project_dir,
            pipeline=planned.pipeline.path,
            process=process,
            log=log,
            started=time.time(),
        )
        with self.lock:
            self.runs[run_id] = started
        return {
            "run_id": run_id,
            "pid": process.pid,
            "pipeline": planned.pipeline.config.name,
            "pipeline_file": str(planned.pipeline.path),
            "project": str(planned.project_dir),
            "stages": [
                {"name": stage.name, "instances": len(stage.instances)}
                for stage in planned.stages
                if stage.name in planned.selected
            ],
            "instances": sum(
                len(stage.instances) for stage in planned.stages if stage.name in planned.selected
            ),
            "log": str(log),
            "command": argv,
            "next": f"call status with run_id {run_id!r} every few seconds until done is "
            "true; the run goes on if this chat ends",
        }

    # -- finding a run -------------------------------------------------------------------

    def _mine(self, ref: str | None, project: Path | None) -> _Started | None:
        """The run this server started that ``ref`` names: its id or a unique prefix; for
        ``None``, the last one it started (in ``project`` when given)."""
        with self.lock:
            runs = [run for run in self.runs.values() if project is None or run.project == project]
        if ref == "latest" or not runs:
            return None
        if ref is None:
            return max(runs, key=lambda run: run.started)
        exact = [run for run in runs if run.run_id == ref]
        matches = exact or [run for run in runs if run.run_id.startswith(ref)]
        return matches[0] if len(matches) == 1 else None

    def _projects(self) -> list[Path]:
        """Projects to look in when nothing names one: those of the runs this server
        started, newest first, then the one holding the server's folder."""
        with self.lock:
            mine = sorted(self.runs.values(), key=lambda run: run.started, reverse=True)
        found = [run.project for run in mine]
        for folder in (self.root, *self.root.parents):
            if (folder / STATE_DIR / LEDGER_FILE).is_file():
                found.append(folder)
                break
        return list(dict.fromkeys(found))

    @contextlib.contextmanager
    def _find(self, ref: str | None, project: str | None) -> Iterator[_Found]:
        """The run ``ref`` names (an id, a unique prefix, ``latest``, or ``None``: the last
        run this server started, else the newest in the ledger), with its ledger open."""
        where = self.path(project).resolve() if project is not None else None
        started = self._mine(ref, where)
        if started is not None:
            started.exit_code()  # reap it: a zombie would pass for a live orchestrator
            roots = [started.project]
        else:
            roots = [where] if where is not None else self._projects()
        wanted = started.run_id if started is not None else ref
        missing: UsageError | None = None
        for root in roots:
            if not (root / STATE_DIR / LEDGER_FILE).is_file():
                continue
            with open_ledger(root / STATE_DIR) as ledger:
                try:
                    run = _run(ledger, wanted)
                except UsageError as exc:
                    missing = missing or exc
                    continue
                yield _Found(root, ledger, run, started)
                return
        if started is not None:
            yield _Found(started.project, None, None, started)
            return
        if missing is not None:
            raise missing
        if where is not None:
            raise UsageError(
                f"no phalanx ledger in {where} (no {STATE_DIR}/{LEDGER_FILE}): no run has "
                "been recorded there; pass the folder that holds the pipeline file"
            )
        raise UsageError(
            f"no phalanx ledger in {self.root} or its parents: start a run with start_run "
            "first, or pass project (the folder holding the pipeline file)"
        )

    @staticmethod
    def _recorded(found: _Found) -> tuple[Ledger, RunRow]:
        """The ledger and run of ``found``, or why a run this server started has none."""
        if found.ledger is not None and found.run is not None:
            return found.ledger, found.run
        started = found.started
        assert started is not None  # noqa: S101 - _find yields no run only for one of ours
        code = started.exit_code()
        if code is None:
            raise UsageError(
                f"run {started.run_id} has not recorded anything yet: its process (pid "
                f"{started.process.pid}) is still starting; call status until it runs"
            )
        raise UsageError(
            f"run {started.run_id} failed to start (exit code {code}): "
            f"{_last_error(started.log)}; call status for the end of its log"
        )

    # -- status --------------------------------------------------------------------------

    def status(self, run_id: str | None = None, project: str | None = None) -> dict[str, object]:
        """How far a run got, from the ledger, and whether it has ended."""
        with self._find(run_id, project) as found:
            if found.run is None or found.ledger is None:
                assert found.started is not None  # noqa: S101 - see _find
                return _unrecorded(found.started)
            ledger, run = found.ledger, found.run
            lines = _stage_lines(ledger, run.id)
            groups = _failure_groups(ledger, run.id, lines)
            usage = _usage(ledger.run_attempts(run.id))
            waiting = _not_started(run, lines, found.root) if run.state == "running" else []
        state = run.state
        if found.started is not None and state in _ENDED:
            _settle(found.started)
        totals = _totals(lines)
        summary = run.summary or {}
        result: dict[str, object] = {
            "run_id": run.id,
            "state": state,
            "done": state in _ENDED,
            "message": _message(run, state, totals, found.started),
            "pid": run.pid,
            "pipeline": run.pipeline,
            "pipeline_file": run.pipeline_file,
            "project": str(found.root),
            "started": _iso(run.started),
            "ended": _iso(run.ended),
            "wall_s": _round(_wall_s(run)),
            "totals": totals,
            "stages": [line.to_json() for line in lines],
            "stages_not_started": waiting,
            "usage": usage,
            "failures": [group.to_json() for group in groups],
            "stop_reason": summary.get("stop_reason"),
            "halted": summary.get("halted"),
            "process": None if found.started is None else found.started.to_json(),
        }
        return result

    # -- stage_summary -------------------------------------------------------------------

    def stage_summary(
        self, stage: str, run_id: str | None = None, project: str | None = None
    ) -> dict[str, object]:
        """One stage of a run: counts, times, the slowest instances, the failed and skipped
        keys, the output folder and the stage's summary file."""
        with self._find(run_id, project) as found:
            ledger, run = self._recorded(found)
            lines = {line.name: line for line in _stage_lines(ledger, run.id)}
            line = lines.get(stage)
            if line is None:
                raise _no_stage(run, stage, list(lines))
            row = next((row for row in ledger.stage_rows(run.id) if row.name == stage), None)
            instances = [inst for inst in ledger.run_instances(run.id) if inst.stage == stage]
            usage = _usage(att for att in ledger.run_attempts(run.id) if att.stage == stage)
        wall: float | None = None
        if row is not None and row.started is not None:
            if row.ended is not None:
                wall = row.ended - row.started
            elif run.state == "running":
                wall = time.time() - row.started
        serial = sum(inst.duration_s or 0.0 for inst in instances)
        ran = [inst for inst in instances if inst.attempts and inst.duration_s is not None]
        slowest = sorted(ran, key=lambda inst: inst.duration_s or 0.0, reverse=True)[:_SLOWEST]
        failed = [inst for inst in instances if inst.status == "failed"]
        skipped = [inst for inst in instances if inst.status == "skipped"]
        config = _pipeline_facts(run, found.root, stage)
        return {
            "run_id": run.id,
            "run_state": run.state,
            "stage": stage,
            **{name: value for name, value in line.to_json().items() if name != "name"},
            "wall_s": _round(wall),
            "sum_instance_s": _round(serial),
            "speedup": round(serial / wall, 2) if wall else None,
            "slowest": [
                {"key": inst.key, "seconds": _round(inst.duration_s), "attempts": inst.attempts}
                for inst in slowest
            ],
            "failed_keys": [inst.key for inst in failed[:_KEYS_SHOWN]],
            "skipped_keys": [
                {"key": inst.key, "reason": inst.reason} for inst in skipped[:_KEYS_SHOWN]
            ],
            "keys_truncated": len(failed) > _KEYS_SHOWN or len(skipped) > _KEYS_SHOWN,
            "usage": usage,
            **config,
        }

    # -- failures ------------------------------------------------------------------------

    def failures(
        self,
        run_id: str | None = None,
        stage: str | None = None,
        limit: int = 50,
        project: str | None = None,
    ) -> dict[str, object]:
        """Every failed instance (up to ``limit``) with its cause, message, stderr or
        traceback tail and log folder, and the totals by cause."""
        with self._find(run_id, project) as found:
            ledger, run = self._recorded(found)
            causes = ledger.causes(run.id)
            if stage is not None:
                names = [row.name for row in ledger.stage_rows(run.id)]
                names += sorted(set(ledger.counts(run.id)) - set(names))
                if stage not in names:
                    raise _no_stage(run, stage, names)
            rows = ledger.failures(run.id, stage, limit=limit)
            items = [_failure(ledger, found.root, row) for row in rows]
        counted = [
            (name, cause, count)
            for name, per_cause in causes.items()
            if stage is None or name == stage
            for cause, count in per_cause.items()
        ]
        total = sum(count for _, _, count in counted)
        return {
            "run_id": run.id,
            "run_state": run.state,
            "stage": stage,
            "total_failed": total,
            "by_cause": [
                {"stage": name, "cause": cause, "count": count} for name, cause, count in counted
            ],
            "shown": len(items),
            "truncated": total > len(items),
            "failures": items,
        }

    # -- stop_run ------------------------------------------------------------------------

    def stop_run(self, run_id: str, wait_s: float = 30.0) -> dict[str, object]:
        """Ask a run this server started to stop (SIGTERM: phalanx cancels its attempts,
        keeps what committed and records the run as interrupted); wait up to ``wait_s``
        seconds for it to end."""
        started = self._mine(run_id, None)
        if started is None:
            with self._find(run_id, None) as found:
                run = found.run
            assert run is not None  # noqa: S101 - not ours, so _find found it or raised
            pid = f", pid {run.pid}" if run.pid is not None else ""
            raise UsageError(
                f"run {run.id} was not started by this server (state {run.state}{pid}); "
                "stop_run stops only the runs this server started. Stop it where it runs "
                "(Ctrl-C in its terminal) or with kill -TERM on its pid"
            )
        before = self.status(started.run_id)
        if before["done"]:
            code = started.exit_code()
            exited = f", exit code {code}" if code is not None else ", its process exiting"
            raise UsageError(
                f"run {started.run_id} has already ended ({before['state']}{exited}); there "
                "is nothing to stop"
            )
        with contextlib.suppress(ProcessLookupError):
            started.process.send_signal(signal.SIGTERM)
        started.stop_sent = time.time()
        deadline = time.monotonic() + wait_s
        while started.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        status = self.status(started.run_id)
        ended = started.exit_code() is not None
        return {
            "run_id": started.run_id,
            "signal": "SIGTERM",
            "ended": ended,
            "exit_code": started.exit_code(),
            "state": status["state"],
            "done": status["done"],
            "totals": status.get("totals"),
            "message": (
                status["message"]
                if ended
                else f"asked the run to stop; it has not ended within {wait_s:g}s (it is "
                "cancelling its attempts): call status until done is true"
            ),
        }


# --------------------------------------------------------------------------------------------
# Pieces of the results


def _settle(started: _Started, within: float = 5.0) -> None:
    """Give the process of a run whose end the ledger holds a moment to exit (it still
    prints its summary and closes its files), so that the status shows its exit code."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        started.process.wait(timeout=within)


def _no_stage(run: RunRow, stage: str, names: list[str]) -> UsageError:
    known = ", ".join(names) or "none yet"
    return UsageError(
        f"run {run.id} has no stage {stage!r} in the ledger (a stage is recorded when it "
        f"starts); its stages: {known}"
    )


def _setting(value: object) -> str:
    """A runner setting as ``phalanx run --set`` reads it back: YAML, so JSON."""
    return json.dumps(value, ensure_ascii=False)


def _output_template(stage: StagePlan) -> str | None:
    """The stage's ``output:``, or the one its blueprint declares."""
    return stage.config.output or (stage.blueprint.output_location if stage.blueprint else None)


def _stage_plan(planned: Plan, stage: StagePlan) -> dict[str, object]:
    return {
        "name": stage.name,
        "kind": stage.kind,
        "selected": stage.name in planned.selected,
        "instances": len(stage.instances),
        "runner": stage.runner.type,
        "concurrency": stage.concurrency,
        "adaptive": stage.auto,
        "retries": stage.retries,
        "timeout_s": stage.timeout,
        "needs": list(stage.needs),
        "output": _output_template(stage),
        "expect": sorted(stage.expect),
        "first_instances": [
            {"key": inst.key, "output": inst.output_rel} for inst in stage.instances[:_FIRST_KEYS]
        ],
        "more_instances": max(0, len(stage.instances) - _FIRST_KEYS),
    }


def _totals(lines: list[_StageLine]) -> dict[str, int]:
    totals = {"total": sum(line.total for line in lines)}
    for name in ("committed", "cached", "failed", "skipped", "running"):
        totals[name] = sum(line.counts.get(name, 0) for line in lines)
    totals["pending"] = sum(line.pending for line in lines)
    return totals


def _usage(attempts: Iterable[AttemptRow]) -> dict[str, int | float] | None:
    """What the attempts spent, summed; ``None`` when none of them recorded usage."""
    total = Usage()
    seen = False
    for attempt in attempts:
        if attempt.usage:
            seen = True
            for item in fields(Usage):
                value = attempt.usage.get(item.name)
                if isinstance(value, int | float):
                    setattr(total, item.name, getattr(total, item.name) + value)
    return total.to_json() if seen else None


def _not_started(run: RunRow, lines: list[_StageLine], root: Path) -> list[str]:
    """The stages of a running run that have not started (waiting for their needs)."""
    started = {line.name for line in lines}
    chosen = run.options.get("stages")
    try:
        pipeline = load_pipeline(_pipeline_path(run, root))
    except (UsageError, OSError):
        return []
    return [
        stage.name
        for stage in pipeline.config.stages
        if stage.name not in started and (not isinstance(chosen, list) or stage.name in chosen)
    ]


def _pipeline_path(run: RunRow, root: Path) -> Path:
    """The run's pipeline file: the path it was started with, or the file of that name in
    the project (the folder that holds the pipeline file)."""
    path = Path(str(run.options.get("pipeline") or run.pipeline_file))
    return path if path.is_absolute() else root / path.name


def _pipeline_facts(run: RunRow, root: Path, stage: str) -> dict[str, object]:
    """The stage's output template and folder, and its summary file, read from the
    pipeline (``None`` where the pipeline cannot be read or planned any more)."""
    facts: dict[str, object] = {
        "output": None,
        "output_folder": None,
        "summary_file": None,
        "summary_of_this_run": None,
        "summary": None,
    }
    try:
        pipeline = load_pipeline(_pipeline_path(run, root))
    except (UsageError, OSError):
        return facts
    summary_file = pipeline.project_dir / pipeline.config.summaries / f"{stage}.md"
    facts["summary_file"] = str(summary_file)
    with contextlib.suppress(OSError):
        text = summary_file.read_text(encoding="utf-8")
        facts["summary_of_this_run"] = f"Run `{run.id}`" in text
        facts["summary"] = text[:_SUMMARY_CHARS] + (
            "\n(truncated)\n" if len(text) > _SUMMARY_CHARS else ""
        )
    try:
        planned = plan_pipeline(pipeline).stage(stage)
    except (UsageError, OSError, KeyError):
        return facts
    facts["output"] = _output_template(planned)
    outputs = [inst.output for inst in planned.instances]
    if outputs:
        common = Path(os.path.commonpath([str(path) for path in outputs]))
        facts["output_folder"] = str(common if len(outputs) > 1 else outputs[0])
    return facts


def _tail(text: str | None, limit: int) -> str:
    """The end of ``text``, at most ``limit`` characters, saying what was left out."""
    text = (text or "").rstrip("\n")
    if len(text) <= limit:
        return text
    return f"({len(text) - limit} characters before this)\n{text[-limit:]}"


def _failure(ledger: Ledger, root: Path, row: InstanceRow) -> dict[str, object]:
    attempts = ledger.attempt_rows(row.run_id, row.stage, row.key)
    failed = [attempt for attempt in attempts if attempt.outcome == "failed"]
    last = failed[-1] if failed else (attempts[-1] if attempts else None)
    return {
        "stage": row.stage,
        "key": row.key,
        "cause": row.cause or "error",
        "message": row.message or "",
        "attempts": row.attempts,
        "detail": _tail(last.detail if last else None, _DETAIL_CHARS),
        "log_dir": str(root / last.log_dir) if last and last.log_dir else None,
        "history": [
            {
                "attempt": attempt.attempt,
                "outcome": attempt.outcome,
                "cause": attempt.cause,
                "message": (attempt.message or "").strip().split("\n", 1)[0],
                "duration_s": _round(attempt.duration_s),
            }
            for attempt in attempts
        ],
    }


def _read_log(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _last_error(log: Path) -> str:
    """The last ``error:`` line of a run's log, else its last line."""
    lines = [line for line in _read_log(log).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error:").strip()
    return lines[-1].strip() if lines else "it wrote nothing to its log"


def _unrecorded(started: _Started) -> dict[str, object]:
    """The status of a run this server started that the ledger does not hold."""
    code = started.exit_code()
    if code is None:
        state = "starting"
        message = (
            f"the run's process (pid {started.process.pid}) is planning; nothing is in the "
            "ledger yet. Call status again in a few seconds"
        )
    else:
        state = "failed-to-start"
        why = _last_error(started.log)
        stopped = " after stop_run asked it to stop" if started.stop_sent is not None else ""
        message = (
            f"the run's process exited with code {code}{stopped} before recording the run, so "
            f"nothing ran: {why}"
        )
    return {
        "run_id": started.run_id,
        "state": state,
        "done": state in _ENDED,
        "message": message,
        "pipeline_file": str(started.pipeline),
        "project": str(started.project),
        "started": _iso(started.started),
        "exit_code": code,
        "log_tail": _tail(_read_log(started.log), _LOG_CHARS) if code is not None else None,
        "process": started.to_json(),
    }


def _message(run: RunRow, state: str, totals: Mapping[str, int], started: _Started | None) -> str:
    """One sentence on where the run stands and what to do next."""
    ended = totals["committed"] + totals["cached"] + totals["failed"] + totals["skipped"]
    figures = (
        f"{totals['committed']} committed, {totals['cached']} cached, {totals['failed']} "
        f"failed, {totals['skipped']} skipped of {totals['total']}"
    )
    summary = run.summary or {}
    if state == "running":
        stopping = " (stop requested)" if started is not None and started.stop_sent else ""
        return (
            f"running{stopping}: {ended} of {totals['total']} instances have ended "
            f"({figures}), {totals['running']} running; call status again later"
        )
    if state == "ok":
        return f"finished: every stage met its threshold ({figures})"
    if state == "failed":
        return (
            f"finished with failures ({figures}); call failures for each cause and the "
            "agents' stderr. Once the cause is fixed, start_run with rerun_failed=true runs "
            "only what did not commit"
        )
    if state == "interrupted":
        reason = summary.get("stop_reason") or "stopped"
        return (
            f"stopped ({reason}): in-flight attempts were cancelled; committed outputs are "
            f"kept ({figures}). start_run again runs what is not up to date"
        )
    if state == "halted":
        return (
            f"halted on a fatal error that every instance would hit: {summary.get('halted')} "
            f"({figures}); fix it before starting again"
        )
    if state == "crashed":
        return (
            f"the ledger says running but its orchestrator (pid {run.pid}) is gone: the run "
            f"was killed ({figures}). Committed outputs are intact; `phalanx resume {run.id}` "
            "continues it"
        )
    return f"{state} ({figures})"


# --------------------------------------------------------------------------------------------
# The protocol


_Pipeline = Annotated[
    str,
    Field(
        description="The pipeline file (pipeline.yaml), absolute or relative to the folder the "
        "server was started for."
    ),
]
_Stages = Annotated[
    list[str] | None,
    Field(description="Only these stages (the others' outputs are read from disk)."),
]
_Only = Annotated[
    list[str] | None,
    Field(description="Only the instances with these partition keys."),
]
_Settings = Annotated[
    dict[str, str | int | float | bool | None] | None,
    Field(
        description="Runner settings to override everywhere (as phalanx run --set KEY=VALUE), "
        'e.g. {"base_url": "http://127.0.0.1:8765"} or {"model": "claude-sonnet-4-5"}.'
    ),
]
_RunId = Annotated[
    str | None,
    Field(
        description="A run id or a unique prefix of one, or 'latest'; default: the run this "
        "server started last, else the newest run in the project."
    ),
]
_Project = Annotated[
    str | None,
    Field(
        description="The project folder (the one holding the pipeline file); default: that "
        "of the runs this server started, else the folder the server was started for."
    ),
]


def build_server(service: _Service) -> MCPServer[Any]:
    """The MCP server offering the service's tools. Imports ``mcp``: raises
    :class:`UsageError` naming the extra to install when it is missing."""
    try:
        import anyio.to_thread  # noqa: PLC0415 - the optional extra
        from mcp.server.mcpserver import MCPServer  # noqa: PLC0415
        from mcp.server.mcpserver.exceptions import ToolError  # noqa: PLC0415
        from mcp.types import ToolAnnotations  # noqa: PLC0415
    except ImportError as exc:
        raise UsageError(f"{_INSTALL} ({exc})") from None
    server: MCPServer[Any] = MCPServer(
        "phalanx",
        version=importlib.metadata.version("phalanx"),
        instructions=_INSTRUCTIONS,
        log_level="WARNING",
    )

    async def call(function: Callable[[], dict[str, object]]) -> dict[str, Any]:
        try:
            return await anyio.to_thread.run_sync(function)
        except PhalanxError as exc:  # a usage error, or the ledger failing: say what
            raise ToolError(str(exc)) from None

    reading = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(annotations=reading)
    async def plan(
        pipeline: _Pipeline,
        stages: _Stages = None,
        only: _Only = None,
        settings: _Settings = None,
    ) -> dict[str, Any]:
        """Expand a pipeline into its stages and instances without running anything, and
        check it (files, templates, keys, output conflicts). Returns per stage: name, kind
        (map, group, single, follow), instance count, runner type, concurrency limit,
        retries, timeout, output template, expected files, needs, and the first keys with
        their output folders."""
        return await call(functools.partial(service.plan, pipeline, stages, only, settings))

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False))
    async def import_project(
        project: Annotated[
            str,
            Field(
                description="The POMASA project's root folder (holding agents/ and "
                "references/), relative to the server's folder."
            ),
        ],
        runner: Annotated[
            RunnerChoice,
            Field(description="What runs each instance."),
        ] = "claude-code",
        model: Annotated[str | None, Field(description="The model the runner uses.")] = None,
        params: Annotated[
            dict[str, str] | None,
            Field(description="Values of the orchestrator's global parameters, e.g. PERIOD."),
        ] = None,
        review: Annotated[
            bool,
            Field(
                description="Hand the completion criteria no program can check to a reviewer "
                "agent that gates each commit."
            ),
        ] = False,
        force: Annotated[
            bool, Field(description="Replace the project's pipeline.yaml if it exists.")
        ] = False,
    ) -> dict[str, Any]:
        """Write pipeline.yaml for a POMASA project: one stage per stage of its orchestrator
        blueprint, partitions from its references/ files, output folders and expected files
        from its blueprints, completion criteria as checks. Returns the stages and every value
        it could not infer (todos): those must be filled in before plan or start_run."""
        return await call(
            functools.partial(
                service.import_project,
                project,
                runner=runner,
                model=model,
                params=params,
                review=review,
                force=force,
            )
        )

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False))
    async def start_run(
        pipeline: _Pipeline,
        stages: _Stages = None,
        only: _Only = None,
        settings: _Settings = None,
        concurrency: Annotated[
            int | None,
            Field(ge=1, description="Override every stage's concurrency limit."),
        ] = None,
        backend: Annotated[
            str | None,
            Field(description="Run every stage on this backend: local, process or ray."),
        ] = None,
        force: Annotated[
            bool, Field(description="Run every instance, even those whose output is up to date.")
        ] = False,
        rerun_failed: Annotated[
            bool,
            Field(
                description="Retry instances that failed in earlier runs with the same inputs "
                "(by default they are not run again)."
            ),
        ] = False,
        budget_usd: Annotated[
            float | None,
            Field(gt=0, description="Start no new attempt once the run has spent this (USD)."),
        ] = None,
        budget_tokens: Annotated[
            int | None,
            Field(ge=1, description="Start no new attempt once the run has used this many tokens."),
        ] = None,
    ) -> dict[str, Any]:
        """Start a pipeline run in the background and return at once with its run_id. The
        pipeline is planned first, so a bad one is an error here and nothing starts. The run
        is a process of its own: it keeps going if this chat ends. Poll status with the
        run_id until done is true; do not assume it succeeded."""
        return await call(
            functools.partial(
                service.start_run,
                pipeline,
                stages=stages,
                only=only,
                settings=settings,
                concurrency=concurrency,
                backend=backend,
                force=force,
                rerun_failed=rerun_failed,
                budget_usd=budget_usd,
                budget_tokens=budget_tokens,
            )
        )

    @server.tool(annotations=reading)
    async def status(run_id: _RunId = None, project: _Project = None) -> dict[str, Any]:
        """Where a run stands, from the ledger: state (starting, running, ok, failed,
        interrupted, halted, crashed, failed-to-start), done (true once it will change no
        more: stop polling then), per-stage counts (total, committed, cached, failed,
        skipped, running, pending), wall time, tokens and cost, and the failures grouped by
        cause with example keys."""
        return await call(functools.partial(service.status, run_id, project))

    @server.tool(annotations=reading)
    async def stage_summary(
        stage: Annotated[str, Field(description="The stage's name.")],
        run_id: _RunId = None,
        project: _Project = None,
    ) -> dict[str, Any]:
        """One stage of a run: counts, wall time, summed instance time and speedup, the
        slowest instances, the failed and skipped keys, tokens and cost, the output folder,
        and the text of the stage summary file phalanx wrote."""
        return await call(functools.partial(service.stage_summary, stage, run_id, project))

    @server.tool(annotations=reading)
    async def failures(
        run_id: _RunId = None,
        stage: Annotated[
            str | None, Field(description="Only this stage's failures (default: every stage).")
        ] = None,
        limit: Annotated[
            int, Field(ge=1, le=1000, description="At most this many failed instances.")
        ] = 50,
        project: _Project = None,
    ) -> dict[str, Any]:
        """The failed instances of a run: stage, key, cause (runner-error, timeout,
        invalid-output, ...), message, attempts, the stderr or traceback tail of the last
        failed attempt, and its log folder; with the totals by cause."""
        return await call(functools.partial(service.failures, run_id, stage, limit, project))

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
    async def stop_run(
        run_id: Annotated[str, Field(description="The run's id (or a unique prefix).")],
        wait_s: Annotated[
            float,
            Field(ge=0, le=300, description="Seconds to wait for the run to end."),
        ] = 30.0,
    ) -> dict[str, Any]:
        """Stop a run this server started: its in-flight attempts are cancelled and cleaned
        up, committed outputs are kept, and the run is recorded as interrupted. Refused for
        a run this server did not start or one that has ended."""
        return await call(functools.partial(service.stop_run, run_id, wait_s))

    return server


# --------------------------------------------------------------------------------------------
# The command


@click.command()
@click.option(
    "--project",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=".",
    show_default=True,
    help="The folder that paths in tool arguments are relative to.",
)
def mcp(project: Path) -> None:
    """Serve phalanx to an MCP client (Claude Code, ...) on stdin/stdout.

    Tools: plan, start_run, status, stage_summary, failures, stop_run. A run started through
    the server is a process of its own: it goes on when the client disconnects. Needs
    pip install 'phalanx[mcp]'.
    """
    try:
        server = build_server(_Service(project.resolve()))
    except UsageError as exc:
        _fail(exc)
    server.run("stdio")


def register(group: click.Group) -> None:
    """Add ``mcp`` to ``group`` (the ``phalanx`` command)."""
    group.add_command(mcp)

"""The read-only commands over the ledger: ``phalanx runs``, ``phalanx status`` and
``phalanx logs``.

Each finds the ledger from the current folder upward (as git finds ``.git``), or in
``--project DIR``; none of them writes anything but the ledger's own upgrade to the current
layout. ``cli.py`` adds them to the ``phalanx`` group with :func:`register`.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ._admission import request_change
from ._errors import UsageError
from ._ledger import LEDGER_FILE, AttemptRow, Ledger, RunRow, find_ledger, open_ledger
from ._pipeline import STATE_DIR, load_pipeline

__all__ = ["logs", "register", "runs", "status", "tune"]

EXIT_USAGE = 2
_COUNTED = ("committed", "cached", "running", "failed", "skipped")
_EXAMPLES = 5
_STATE_STYLE = {
    "ok": "green",
    "running": "cyan",
    "failed": "red",
    "crashed": "red",
    "halted": "red",
    "interrupted": "yellow",
}


def _fail(error: UsageError) -> NoReturn:
    click.echo(f"error: {error}", err=True)
    sys.exit(EXIT_USAGE)


_project_option = click.option(
    "--project",
    type=click.Path(file_okay=False, path_type=Path),
    help="The project folder (default: the one holding the current folder).",
)


@contextmanager
def _ledger(project: Path | None) -> Iterator[tuple[Ledger, Path]]:
    """The project's ledger (closed at the end) and the project folder; a usage problem
    inside exits 2."""
    try:
        if project is None:
            path = find_ledger(Path.cwd())
        else:
            path = project / STATE_DIR / LEDGER_FILE
            if not path.is_file():
                raise UsageError(
                    f"no phalanx ledger in {project} (no {STATE_DIR}/{LEDGER_FILE}): "
                    "run a pipeline there first"
                )
        with open_ledger(path.parent) as ledger:
            yield ledger, path.parent.parent
    except UsageError as exc:
        _fail(exc)


def _run(ledger: Ledger, ref: str | None) -> RunRow:
    """The run ``ref`` names: an id, a unique prefix, ``latest`` or ``None`` (the newest)."""
    wanted = None if ref in (None, "latest") else ref
    run = ledger.get_run(wanted)
    if run is not None:
        return run
    recent = [row.id for row in ledger.runs(limit=5)]
    if not recent:
        raise UsageError("no runs recorded in this project yet")
    raise UsageError(
        f"no run {ref!r} in this project; the latest are {', '.join(recent)} "
        "(phalanx runs lists them all)"
    )


def _when(t: float | None) -> str:
    """Local time to the minute, for people."""
    return "-" if t is None else dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def _iso(t: float | None) -> str | None:
    """Local time with its offset, for programs."""
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _wall_s(run: RunRow) -> float | None:
    """Seconds from start to end, or to now while it runs; ``None`` for a crashed run."""
    if run.ended is not None:
        return run.ended - run.started
    return time.time() - run.started if run.state == "running" else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _state(run: RunRow) -> Text:
    state = run.state
    return Text(state, style=_STATE_STYLE.get(state, ""))


def _console() -> Console:
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 120  # logs and pipes: do not squeeze the table into 80 columns
    return console


def _first_line(text: str | None) -> str:
    return (text or "").strip().split("\n", 1)[0]


def _emit_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


# --------------------------------------------------------------------------------------------
# phalanx runs


@click.command()
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="How many runs."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@_project_option
def runs(limit: int, as_json: bool, project: Path | None) -> None:
    """List the recorded runs, newest first."""
    with _ledger(project) as (ledger, _):
        rows = []
        for run in ledger.runs(limit=limit):
            totals = dict.fromkeys(("committed", "cached", "failed", "skipped"), 0)
            for per_status in ledger.counts(run.id).values():
                for name in totals:
                    totals[name] += per_status.get(name, 0)
            rows.append((run, totals))
    if as_json:
        _emit_json(
            [
                {
                    "id": run.id,
                    "pipeline": run.pipeline,
                    "pipeline_file": run.pipeline_file,
                    "state": run.state,
                    "status": run.status,
                    "started": _iso(run.started),
                    "ended": _iso(run.ended),
                    "wall_s": _round(_wall_s(run)),
                    **totals,
                    "options": dict(run.options),
                }
                for run, totals in rows
            ]
        )
        return
    console = _console()
    if not rows:
        console.print("no runs recorded yet")
        return
    table = Table(box=None)
    for column in ("run", "pipeline", "state", "started", "wall", *totals):
        table.add_column(column, justify="right" if column in totals else "left")
    for run, totals in rows:
        table.add_row(
            Text(run.id),
            Text(run.pipeline),
            _state(run),
            _when(run.started),
            _duration(_wall_s(run)),
            *(str(n) for n in totals.values()),
        )
    console.print(table)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --------------------------------------------------------------------------------------------
# phalanx status


@dataclass(frozen=True)
class _StageLine:
    name: str
    total: int
    counts: dict[str, int]
    pending: int
    status: str
    causes: dict[str, int]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "total": self.total,
            **self.counts,
            "pending": self.pending,
            "status": self.status,
            "causes": self.causes,
        }


def _stage_lines(ledger: Ledger, run_id: str) -> list[_StageLine]:
    rows = {row.name: row for row in ledger.stage_rows(run_id)}
    counts = ledger.counts(run_id)
    causes = ledger.causes(run_id)
    names = [*rows, *sorted(set(counts) - set(rows))]
    lines = []
    for name in names:
        per_status = counts.get(name, {})
        counted = {status: per_status.get(status, 0) for status in _COUNTED}
        row = rows.get(name)
        recorded = sum(per_status.values())
        total = row.total if row is not None and row.total is not None else recorded
        stage_status = (row.status if row is not None else None) or "-"
        if stage_status == "skipped" and row is not None and row.skipped_reason:
            stage_status = f"skipped: {row.skipped_reason}"
        lines.append(
            _StageLine(
                name=name,
                total=total,
                counts=counted,
                pending=max(0, total - sum(counted.values())),
                status=stage_status,
                causes=causes.get(name, {}),
            )
        )
    return lines


@dataclass(frozen=True)
class _FailureGroup:
    """The failures of one stage with one cause, with a few example instances."""

    stage: str
    cause: str
    count: int
    examples: tuple[tuple[str, str], ...]
    """(key, message) pairs."""

    def to_json(self) -> dict[str, object]:
        return {
            "stage": self.stage,
            "cause": self.cause,
            "count": self.count,
            "examples": [{"key": key, "message": message} for key, message in self.examples],
        }


def _failure_groups(ledger: Ledger, run_id: str, lines: list[_StageLine]) -> list[_FailureGroup]:
    return [
        _FailureGroup(
            stage=line.name,
            cause=cause,
            count=count,
            examples=tuple(
                (row.key, row.message or "")
                for row in ledger.failures(run_id, line.name, limit=_EXAMPLES, cause=cause)
            ),
        )
        for line in lines
        for cause, count in line.causes.items()
    ]


def _run_json(run: RunRow) -> dict[str, object]:
    return {
        "id": run.id,
        "pipeline": run.pipeline,
        "pipeline_file": run.pipeline_file,
        "state": run.state,
        "status": run.status,
        "pid": run.pid,
        "started": _iso(run.started),
        "ended": _iso(run.ended),
        "wall_s": _round(_wall_s(run)),
        "options": dict(run.options),
        "summary": None if run.summary is None else dict(run.summary),
    }


@click.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option(
    "--watch",
    is_flag=True,
    help="Keep showing the status until the run ends (a run started elsewhere).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between two looks at the ledger, with --watch.",
)
@_project_option
def status(
    run_ref: str | None, as_json: bool, watch: bool, interval: float, project: Path | None
) -> None:
    """Show how far RUN got, per stage, and why its instances failed.

    RUN is a run id, a unique prefix of one, or "latest" (the default). With --watch the view
    follows the run from the ledger, redrawn in place on a terminal (elsewhere printed again
    whenever it changes), until the run is no longer running.
    """
    if watch and as_json:
        _fail(UsageError("--watch draws the status as it changes; it does not mix with --json"))
    with _ledger(project) as (ledger, _):
        try:
            run = _run(ledger, run_ref)
        except UsageError as exc:
            _fail(exc)
        lines = _stage_lines(ledger, run.id)
        groups = _failure_groups(ledger, run.id, lines)
        if watch:
            _watch(ledger, run, interval)
            return
    if as_json:
        _emit_json(
            {
                "run": _run_json(run),
                "stages": [line.to_json() for line in lines],
                "failures": [group.to_json() for group in groups],
            }
        )
        return
    _console().print(_status_view(run, lines, groups))


def _watch(ledger: Ledger, run: RunRow, interval: float) -> None:
    """Redraw the status of ``run`` every ``interval`` seconds while it runs."""
    console = _console()

    def look() -> tuple[RunRow, Group, str]:
        current = ledger.get_run(run.id) or run
        lines = _stage_lines(ledger, current.id)
        groups = _failure_groups(ledger, current.id, lines)
        key = json.dumps([line.to_json() for line in lines]) + current.state
        return current, _status_view(current, lines, groups), key

    current, view, shown = look()
    if console.is_terminal:
        with Live(view, console=console, auto_refresh=False) as live:
            while current.state == "running":
                time.sleep(interval)
                current, view, _ = look()
                live.update(view, refresh=True)
        return
    console.print(view)
    while current.state == "running":
        time.sleep(interval)
        current, view, key = look()
        if key != shown:  # a log or a pipe gets a new view only when something changed
            shown = key
            console.print(view)


def _status_view(run: RunRow, lines: list[_StageLine], groups: list[_FailureGroup]) -> Group:
    header = Text.assemble("run ", (run.id, "bold"), f"  pipeline {run.pipeline}  state ")
    header.append_text(_state(run))
    ended = f"ended {_when(run.ended)}" if run.ended is not None else "not ended"
    parts: list[RenderableType] = [
        header,
        Text(f"started {_when(run.started)} · {ended} · wall {_duration(_wall_s(run))}"),
    ]
    if not lines:
        parts.append(Text("no stage has started yet"))
    else:
        table = Table(box=None)
        for column in ("stage", "total", *_COUNTED, "pending", "status"):
            table.add_column(column, justify="left" if column in ("stage", "status") else "right")
        for line in lines:
            table.add_row(
                Text(line.name),
                str(line.total),
                *(str(line.counts[name]) for name in _COUNTED),
                str(line.pending),
                Text(line.status),
            )
        parts.append(table)
    if groups:
        parts.append(Text("failures:"))
    for group in groups:
        parts.append(Text(f"  {group.stage} · {group.cause}: {group.count}"))
        for key, message in group.examples:
            parts.append(Text(f"    {key}: {_first_line(message)}"))
        if group.count > len(group.examples):
            parts.append(Text(f"    ... and {group.count - len(group.examples)} more"))
    return Group(*parts)


# --------------------------------------------------------------------------------------------
# phalanx logs


def _attempt(ledger: Ledger, run: RunRow, stage: str, key: str, number: int | None) -> AttemptRow:
    """The attempt asked for, or a usage error saying what does exist."""
    attempts = ledger.attempt_rows(run.id, stage, key)
    if not attempts:
        stages = [row.name for row in ledger.stage_rows(run.id)]
        stages += sorted(set(ledger.counts(run.id)) - set(stages))
        if stage not in stages:
            known = ", ".join(stages) or "none recorded yet"
            raise UsageError(f"run {run.id} has no stage {stage!r}; its stages: {known}")
        instance = ledger.get_instance(run.id, stage, key)
        if instance is not None:
            why = f" ({instance.reason})" if instance.reason else ""
            raise UsageError(
                f"{stage}/{key} ran no attempt in run {run.id}: it was {instance.status}{why}"
            )
        keys = ledger.keys(run.id, stage, limit=11)
        shown = ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "")
        raise UsageError(
            f"run {run.id} has no instance {key!r} in stage {stage!r}"
            + (f"; its keys include {shown}" if keys else "; no instance of it is recorded")
        )
    if number is None:
        return attempts[-1]
    for row in attempts:
        if row.attempt == number:
            return row
    numbers = ", ".join(str(row.attempt) for row in attempts)
    raise UsageError(
        f"{stage}/{key} in run {run.id} has no attempt {number}; its attempts: {numbers}"
    )


@click.command()
@click.argument("run_ref", metavar="RUN")
@click.argument("stage")
@click.argument("key")
@click.option(
    "--attempt", "number", type=click.IntRange(min=1), help="Which attempt (default: the last)."
)
@_project_option
def logs(run_ref: str, stage: str, key: str, number: int | None, project: Path | None) -> None:
    """Show one attempt of one instance: how it ended, and every log file it left.

    RUN is a run id, a unique prefix of one, or "latest".
    """
    with _ledger(project) as (ledger, root):
        try:
            run = _run(ledger, run_ref)
            attempt = _attempt(ledger, run, stage, key, number)
            last = max(row.attempt for row in ledger.attempt_rows(run.id, stage, key))
        except UsageError as exc:
            _fail(exc)
    click.echo(f"run {run.id} · stage {stage} · key {key} · attempt {attempt.attempt} of {last}")
    took = f" · {_duration(attempt.duration_s)}" if attempt.duration_s is not None else ""
    cause = f" · cause {attempt.cause}" if attempt.cause else ""
    click.echo(f"outcome {attempt.outcome}{cause}{took} · started {_when(attempt.started)}")
    if attempt.message:
        click.echo(f"message: {attempt.message}")
    if attempt.usage:
        cost = f" (${attempt.cost_usd:.4f})" if attempt.cost_usd is not None else ""
        click.echo(f"usage: {json.dumps(dict(attempt.usage), ensure_ascii=False)}{cost}")
    if attempt.detail:
        click.echo("detail:")
        click.echo(attempt.detail.rstrip("\n"))
    folder = root / attempt.log_dir if attempt.log_dir else None
    if folder is None or not folder.is_dir():
        click.echo("(no log files: this runner keeps none)")
        return
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    if not files:
        click.echo(f"(no log files in {attempt.log_dir})")
    for path in files:
        shown = path.relative_to(root) if path.is_relative_to(root) else path
        text = path.read_bytes().decode("utf-8", errors="replace")
        click.echo(f"\n==> {shown.as_posix()} <==")
        click.echo(text, nl=not text.endswith("\n"))


def _stage_names(run: RunRow, ledger: Ledger) -> list[str]:
    """The stages of a run: those that started, and those its pipeline file declares."""
    names = [row.name for row in ledger.stage_rows(run.id)]
    try:
        pipeline = load_pipeline(str(run.options.get("pipeline") or run.pipeline_file))
    except (UsageError, OSError):
        return names  # a fan_out() run has no file; its stages are all started
    return names + [s.name for s in pipeline.config.stages if s.name not in names]


@click.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    required=True,
    help="The new limit: instances at once per stage (for an adaptive stage, its ceiling).",
)
@click.option("--stage", help="Only this stage (default: every stage of the run).")
@_project_option
def tune(run_ref: str | None, concurrency: int, stage: str | None, project: Path | None) -> None:
    """Change the concurrency of RUN while it runs (the newest run by default).

    The run picks the change up within a second and records it in its event log. Lowering
    the limit stops no instance: the run admits no new one until fewer are in flight.
    """
    with _ledger(project) as (ledger, root):
        try:
            run = _run(ledger, run_ref)
            if run.state != "running":
                raise UsageError(
                    f"run {run.id} is not running ({run.state}); tune changes a run in "
                    "progress. Set concurrency in the pipeline file, or pass --concurrency to "
                    "phalanx run or resume"
                )
            stages = _stage_names(run, ledger)
            if stage is not None and stage not in stages:
                raise UsageError(
                    f"run {run.id} has no stage {stage!r}; its stages: {', '.join(stages)}"
                )
        except UsageError as exc:
            _fail(exc)
    change = request_change(
        root / STATE_DIR / "runs" / run.id, concurrency=concurrency, stage=stage
    )
    where = f"stage {stage}" if stage else "every stage"
    click.echo(
        f"asked run {run.id} to run {where} at concurrency {concurrency} (change {change.seq})"
    )


@click.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The HTML file to write (default: .phalanx/runs/RUN/report.html).",
)
@click.option(
    "--events",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Build the report from this event file (phalanx run --events) instead of the ledger.",
)
@_project_option
def report(
    run_ref: str | None, output: Path | None, events: Path | None, project: Path | None
) -> None:
    """Write RUN's report: one self-contained HTML page with the overview, a timeline per
    stage, the slowest instances, the failures by cause with links to their logs, and the
    cost per stage and model.

    RUN is a run id, a unique prefix of one, or "latest" (the default). The page needs no
    network; open it in any browser.
    """
    from .report import write_report  # noqa: PLC0415 - keeps plotly off the other commands

    try:
        written = write_report(output, run=run_ref, project=project, events=events)
    except UsageError as exc:
        _fail(exc)
    except OSError as exc:
        where = output if output is not None else "the run's folder"
        _fail(UsageError(f"cannot write the report to {where}: {exc.strerror or exc}"))
    size = written.stat().st_size / 1e6
    try:
        shown = written.relative_to(Path.cwd())
    except ValueError:
        shown = written
    click.echo(f"wrote {shown} ({size:.1f} MB): open it in a browser")


def register(group: click.Group) -> None:
    """Add ``runs``, ``status``, ``logs`` and ``tune`` to ``group`` (the ``phalanx``
    command)."""
    for command in (runs, status, logs, tune, report):
        group.add_command(command)

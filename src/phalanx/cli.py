"""The ``phalanx`` command.

Exit codes: 0 every stage met its threshold; 1 some partitions failed (a stage missed its
threshold) or the run was stopped; 2 bad input or configuration (nothing was run or written).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import click
import yaml
from rich.console import Console
from rich.table import Table

from . import _inspect, _mcp
from ._api import resume_plan, run_options
from ._config import Budget
from ._errors import UsageError
from ._eventlog import EventLog
from ._events import Event, EventHandler
from ._ledger import open_ledger
from ._pipeline import STATE_DIR, InstancePlan, Plan, StagePlan, load_pipeline, plan_pipeline
from ._pomasa import RUNNER_CHOICES, import_project
from ._results import RunResult
from ._scaffold import write_starter
from ._scheduler import RunHandle, check_runners, run_plan
from .report.progress import Progress

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 130

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _fail(error: UsageError) -> NoReturn:
    click.echo(f"error: {error}", err=True)
    sys.exit(EXIT_USAGE)


def _plan(
    pipeline: str,
    stages: tuple[str, ...],
    only: tuple[str, ...],
    settings: tuple[str, ...] = (),
) -> Plan:
    try:
        loaded = load_pipeline(pipeline, runner_settings=_settings(settings))
        return plan_pipeline(loaded, stages=stages or None, only=only or None)
    except UsageError as exc:
        _fail(exc)


def _settings(pairs: tuple[str, ...]) -> dict[str, object]:
    """``--set key=value`` pairs; values are read as YAML scalars (numbers, booleans, null)."""
    settings: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(
                f"--set {pair!r}: write --set KEY=VALUE, e.g. --set base_url=http://127.0.0.1:8765"
            )
        parsed = yaml.safe_load(value) if value.strip() else ""
        settings[key.strip()] = value if isinstance(parsed, dict | list) else parsed
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="phalanx")
def cli() -> None:
    """Run one prompt-defined agent in parallel over many partitions: barrier, verify,
    commit, and record every failure."""


_stage_option = click.option(
    "--stage", "stages", multiple=True, metavar="NAME", help="Only this stage (repeatable)."
)
_only_option = click.option(
    "--only", multiple=True, metavar="KEY", help="Only the instances with this key (repeatable)."
)
_set_option = click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a runner setting everywhere, e.g. --set base_url=http://127.0.0.1:8765 "
    "(repeatable).",
)


def _budget_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--budget-tokens",
        type=click.IntRange(min=1),
        help="Start no new attempt once the run has used this many tokens.",
    )(command)
    return click.option(
        "--budget-usd",
        type=click.FloatRange(min=0, min_open=True),
        help="Start no new attempt once the run has spent this many dollars (replaces the "
        "pipeline's run budget).",
    )(command)


_otel_option = click.option(
    "--otel",
    is_flag=True,
    help="Export the run as OpenTelemetry traces over OTLP/HTTP, to where the OTEL_EXPORTER_"
    "OTLP_* variables say (needs pip install 'phalanx[otel]').",
)
_events_option = click.option(
    "--events",
    metavar="FILE",
    help="Append every event of the run to FILE as JSON Lines (schema: docs/events.md).",
)


def _limit(stage: StagePlan) -> str:
    return f"auto (up to {stage.concurrency})" if stage.auto else str(stage.concurrency)


@cli.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@_stage_option
@_only_option
@_set_option
@click.option("--concurrency", type=click.IntRange(min=1), help="Override every stage's limit.")
@click.option(
    "--backend",
    metavar="NAME",
    help="Run every stage on this backend (local, process, ray), in place of the pipeline's.",
)
@click.option("--force", is_flag=True, help="Run every instance, even those that are up to date.")
@click.option(
    "--force-stage",
    "force_stages",
    multiple=True,
    metavar="NAME",
    help="Run every instance of this stage, even those that are up to date (repeatable).",
)
@click.option(
    "--rerun-failed",
    is_flag=True,
    help="Retry instances that failed before with the same inputs (skipped by default).",
)
@_budget_options
@_events_option
@_otel_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No live display; plain lines only.")
@click.option(
    "--run-id",
    metavar="ID",
    help="Give the run this id instead of a new one (for a caller that must know it before "
    "the run starts); letters, digits, '_', '-', '.', unused in this project.",
)
def run(
    pipeline: str,
    stages: tuple[str, ...],
    only: tuple[str, ...],
    settings: tuple[str, ...],
    concurrency: int | None,
    backend: str | None,
    force: bool,
    force_stages: tuple[str, ...],
    rerun_failed: bool,
    budget_usd: float | None,
    budget_tokens: int | None,
    events: str | None,
    otel: bool,
    as_json: bool,
    quiet: bool,
    run_id: str | None,
) -> None:
    """Run PIPELINE (a pipeline.yaml).

    Instances whose committed output is up to date (same inputs, intact files) are not run
    again: they count as cached. Instances that failed before with the same inputs are not
    retried unless --rerun-failed.
    """
    plan = _plan(pipeline, stages, only, settings)
    unknown = sorted(set(force_stages) - {stage.name for stage in plan.stages})
    if unknown:
        _fail(
            UsageError(
                f"--force-stage {', '.join(map(repr, unknown))}: no such stage; stages: "
                f"{', '.join(stage.name for stage in plan.stages)}"
            )
        )
    options = run_options(
        plan.pipeline,
        stages=stages or None,
        only=only or None,
        concurrency=concurrency,
        settings=_settings(settings),
    )
    if backend is not None:
        options = {**options, "backend": backend}
    if run_id is not None:
        _check_run_id(plan, run_id)

    def start(handle: RunHandle, progress: EventHandler) -> Coroutine[Any, Any, RunResult]:
        return run_plan(
            plan,
            run_id=run_id,
            concurrency=concurrency,
            backend=backend,
            on_event=progress,
            handle=handle,
            force=force,
            force_stages=force_stages,
            rerun_failed=rerun_failed,
            options=options,
            budget=_budget(budget_usd, budget_tokens),
        )

    _finish(_execute(start, quiet, events, otel), as_json)


@cli.command()
@click.argument("run_id", metavar="[RUN]", required=False)
@click.option(
    "--project",
    type=click.Path(file_okay=False, exists=True),
    help="The project folder (default: found from the current folder upward).",
)
@click.option(
    "--rerun-failed", is_flag=True, help="Also retry the instances that failed in that run."
)
@_set_option
@_budget_options
@_events_option
@_otel_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No live display; plain lines only.")
def resume(
    run_id: str | None,
    project: str | None,
    rerun_failed: bool,
    settings: tuple[str, ...],
    budget_usd: float | None,
    budget_tokens: int | None,
    events: str | None,
    otel: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Continue an interrupted run (the newest by default; a prefix of its id works).

    Committed instances are kept, in-flight attempts are discarded and run again, failed
    instances are retried only with --rerun-failed. Instances skipped because a budget was
    spent run now, under the pipeline's budget or the one given here, counted afresh.
    """
    try:
        row, plan = resume_plan(project or ".", run_id, settings=_settings(settings))
    except UsageError as exc:
        _fail(exc)
    if row.state == "ok" and not rerun_failed:
        if as_json and row.summary is not None:
            click.echo(json.dumps(row.summary, indent=2, ensure_ascii=False))
        else:
            click.echo(f"run {row.id} finished with every stage met; nothing to resume")
        return
    given = _settings(settings)
    recorded = row.options.get("withheld")
    withheld = [str(n) for n in recorded if n not in given] if isinstance(recorded, list) else []
    if withheld:
        click.echo(
            f"note: the settings {', '.join(withheld)} were not recorded (they may hold "
            "secrets); pass them again with --set if the run needs them",
            err=True,
        )
    concurrency = row.options.get("concurrency")
    backend = row.options.get("backend")

    def start(handle: RunHandle, progress: EventHandler) -> Coroutine[Any, Any, RunResult]:
        return run_plan(
            plan,
            run_id=row.id,
            resume=True,
            rerun_failed=rerun_failed,
            concurrency=concurrency if isinstance(concurrency, int) else None,
            backend=backend if isinstance(backend, str) else None,
            on_event=progress,
            handle=handle,
            options=row.options,
            budget=_budget(budget_usd, budget_tokens),
        )

    _finish(_execute(start, quiet, events, otel), as_json)


def _check_run_id(plan: Plan, run_id: str) -> None:
    if not _RUN_ID.fullmatch(run_id):
        _fail(
            UsageError(
                f"--run-id {run_id!r}: a run id is 1-64 letters, digits, '_', '-' or '.', "
                "starting with a letter or digit (it names the run's log folder)"
            )
        )
    with open_ledger(plan.project_dir / STATE_DIR) as ledger:
        if ledger.get_run(run_id) is not None:
            _fail(
                UsageError(
                    f"--run-id {run_id!r}: this project already has a run with that id; "
                    "choose another, or continue that one with phalanx resume"
                )
            )


def _budget(usd: float | None, tokens: int | None) -> Budget | None:
    return None if usd is None and tokens is None else Budget(usd=usd, tokens=tokens)


def _execute(
    start: Callable[[RunHandle, EventHandler], Coroutine[Any, Any, RunResult]],
    quiet: bool,
    events: str | None = None,
    otel: bool = False,
) -> RunResult:
    live = sys.stderr.isatty() and not quiet
    progress = Progress(sys.stderr, live=live)
    handlers: list[EventHandler] = [progress]
    log = None
    if events is not None:
        try:
            log = EventLog(events)
        except OSError as exc:
            _fail(UsageError(f"--events {events}: cannot write the event stream there ({exc})"))
        handlers.append(log)
    provider = None
    if otel:
        try:
            from .otel import OTelHandler, otlp_provider  # noqa: PLC0415 - an optional extra

            provider = otlp_provider()
            handlers.append(OTelHandler(provider))
        except UsageError as exc:
            _fail(exc)
    try:
        with progress:
            return asyncio.run(_run(start, _all(handlers)))
    except UsageError as exc:
        _fail(exc)
    finally:
        if log is not None:
            log.close()
        if provider is not None:
            provider.shutdown()  # type: ignore[attr-defined]  # the SDK's: flushes the spans


def _all(handlers: list[EventHandler]) -> EventHandler:
    if len(handlers) == 1:
        return handlers[0]

    def handler(event: Event) -> None:
        for each in handlers:
            each(event)

    return handler


def _finish(result: RunResult, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        _print_summary(result)
    if result.halted:
        click.echo(
            f"run stopped: {result.halted}; every other instance would fail the same way, so "
            "nothing more was started. Committed outputs are kept.",
            err=True,
        )
        sys.exit(EXIT_FAILED)
    if result.cancelled:
        click.echo(
            f"stopped: {result.stop_reason or 'cancelled'}; in-flight attempts were cancelled "
            "and cleaned up, committed outputs are kept",
            err=True,
        )
        sys.exit(EXIT_STOPPED)
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)


async def _run(
    start: Callable[[RunHandle, EventHandler], Coroutine[Any, Any, RunResult]],
    progress: EventHandler,
) -> RunResult:
    handle = RunHandle()
    loop = asyncio.get_running_loop()
    names = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "terminated (SIGTERM)"}
    for sig, reason in names.items():
        loop.add_signal_handler(sig, handle.stop, reason)
    try:
        return await start(handle, progress)
    finally:
        for sig in names:
            loop.remove_signal_handler(sig)


def _print_summary(result: RunResult) -> None:
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 120  # logs and pipes: do not squeeze the table into 80 columns
    table = Table(title=f"run {result.run_id}", title_justify="left", box=None)
    columns = ("stage", "total", "committed", "cached", "failed", "skipped", "wall", "speedup", "")
    for column in columns:
        table.add_column(column, justify="left" if column in ("stage", "") else "right")
    for stage in result.stages:
        if stage.met_threshold:
            verdict = "ok"
        elif stage.skipped_reason and not result.cancelled:
            verdict = "[yellow]skipped: upstream failed[/yellow]"
        elif result.cancelled:
            verdict = "[yellow]stopped[/yellow]"
        else:
            verdict = "[red]missed threshold[/red]"
        table.add_row(
            stage.name,
            str(stage.total),
            str(stage.committed),
            str(stage.cached),
            str(stage.failed),
            str(stage.skipped),
            f"{stage.wall_s:.2f}s",
            f"{stage.speedup:.1f}x",
            verdict,
        )
    console.print(table)
    failures = [
        inst for stage in result.stages for inst in stage.instances if inst.status == "failed"
    ]
    for inst in failures[:10]:
        console.print(
            f"  failed {inst.stage}/{inst.key} [{inst.cause}]: {inst.message}", markup=False
        )
    if len(failures) > 10:
        console.print(f"  ... and {len(failures) - 10} more failures")
    if result.usage:
        console.print(f"model usage: {result.usage.describe()}", markup=False)
    if result.notes:
        console.print(f"notes: {result.notes}", markup=False)


@cli.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@_stage_option
@_only_option
@_set_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(
    pipeline: str,
    stages: tuple[str, ...],
    only: tuple[str, ...],
    settings: tuple[str, ...],
    as_json: bool,
) -> None:
    """Expand PIPELINE into instances without running anything."""
    planned = _plan(pipeline, stages, only, settings)
    if as_json:
        click.echo(json.dumps(planned.to_json(), indent=2, ensure_ascii=False))
        return
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"pipeline {planned.pipeline.config.name} ({planned.project_dir})", markup=False)
    for stage in planned.stages:
        mark = "" if stage.name in planned.selected else " (not selected: read from disk)"
        needs = f", needs {', '.join(stage.needs)}" if stage.needs else ""
        console.print(
            f"\nstage {stage.name}: {stage.kind}, {len(stage.instances)} instances, "
            f"runner {stage.runner.type}, concurrency {_limit(stage)}, "
            f"retries {stage.retries}, timeout {stage.timeout:g}s{needs}{mark}",
            markup=False,
        )
        if stage.expect:
            console.print(f"  expects: {', '.join(sorted(stage.expect))}", markup=False)
        for inst in stage.instances[:8]:
            console.print(f"  {inst.key} -> {inst.output_rel}/{_inputs(inst)}", markup=False)
        if len(stage.instances) > 8:
            console.print(f"  ... and {len(stage.instances) - 8} more", markup=False)
    console.print(
        "\nchecks passed: every instance owns a distinct output folder, none nested in "
        "another's, all inside the project; no stage reads its own outputs."
    )


def _inputs(inst: InstancePlan) -> str:
    if not inst.inputs:
        return ""
    names = ", ".join(f"{ref.stage}/{ref.key}" for ref in inst.inputs[:3])
    more = f" and {len(inst.inputs) - 3} more" if len(inst.inputs) > 3 else ""
    return f" <- {names}{more}"


@cli.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@_set_option
def validate(pipeline: str, settings: tuple[str, ...]) -> None:
    """Check PIPELINE and every file it names, without running anything."""
    planned = _plan(pipeline, (), (), settings)
    try:
        check_runners(planned)
    except UsageError as exc:
        _fail(exc)
    total = sum(len(stage.instances) for stage in planned.stages)
    click.echo(f"ok: {len(planned.stages)} stages, {total} instances")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False), default=".")
def init(directory: str) -> None:
    """Write a starter project (pipeline, blueprint, partitions, agent) into DIRECTORY."""
    try:
        written = write_starter(Path(directory))
    except UsageError as exc:
        _fail(exc)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"next: phalanx run {Path(directory) / 'pipeline.yaml'}")


@cli.command("import")
@click.argument("project", type=click.Path(file_okay=False), default=".")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="The pipeline file to write (default: PROJECT/pipeline.yaml); it must sit in PROJECT.",
)
@click.option(
    "--runner",
    type=click.Choice(RUNNER_CHOICES),
    default="claude-code",
    show_default=True,
    help="What runs each instance.",
)
@click.option("--model", help="The model the runner uses.")
@click.option("--base-url", help="The runner's API endpoint (a local server, a proxy).")
@click.option(
    "--param",
    "param_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="A value of one of the orchestrator's global parameters (repeatable).",
)
@click.option(
    "--review",
    is_flag=True,
    help="Hand the completion criteria no program can check to a reviewer agent that gates "
    "each commit.",
)
@click.option("--force", is_flag=True, help="Replace the pipeline file if it exists.")
def import_(
    project: str,
    output: str | None,
    runner: str,
    model: str | None,
    base_url: str | None,
    param_pairs: tuple[str, ...],
    review: bool,
    force: bool,
) -> None:
    """Write a pipeline.yaml for the POMASA project in PROJECT: its agents/ blueprints, its
    references/ partition lists and its orchestrator's stages, run by phalanx.

    What cannot be inferred is left as a value starting "TODO:"; `phalanx validate` lists each.
    """
    params: dict[str, str] = {}
    for pair in param_pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            _fail(UsageError(f"--param {pair!r}: write NAME=VALUE, e.g. --param PERIOD=2025-09"))
        params[name.strip()] = value
    try:
        result = import_project(
            Path(project),
            output=Path(output) if output else None,
            runner=runner,
            model=model,
            base_url=base_url,
            params=params,
            review=review,
            force=force,
        )
    except UsageError as exc:
        _fail(exc)
    table = Table(box=None, pad_edge=False)
    for column in ("stage", "kind", "instances"):
        table.add_column(column)
    for name, kind, source in result.stages:
        table.add_row(name, kind, source)
    console = Console()
    console.print(f"wrote {result.path}", soft_wrap=True)
    console.print(table)
    shown = Path(output) if output else Path(project) / "pipeline.yaml"
    if result.todos:
        console.print(f"{len(result.todos)} TODO(s) to resolve before it runs:")
        for where, reason in result.todos:
            console.print(f"  {where}: {reason}", markup=False, highlight=False, soft_wrap=True)
        console.print(f"next: fill them in, then phalanx validate {shown}", soft_wrap=True)
    else:
        console.print(f"next: phalanx plan {shown}, then phalanx run {shown}", soft_wrap=True)


@cli.command()
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=8765,
    show_default=True,
    help="Port on 127.0.0.1 (0 picks a free one).",
)
@click.option(
    "--latency",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds before each answer (the median when --latency-sigma > 0).",
)
@click.option(
    "--latency-sigma",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Spread of a log-normal latency.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    help="Answer 429 beyond this many requests in flight.",
)
@click.option(
    "--rpm",
    "requests_per_minute",
    type=click.IntRange(min=1),
    help="Requests per minute before 429s.",
)
@click.option("--seed", type=int, default=0, help="Seed of the latency draws.")
def loopback(
    port: int,
    latency: float,
    latency_sigma: float,
    max_concurrency: int | None,
    requests_per_minute: int | None,
    seed: int,
) -> None:
    """Serve a fake LLM on 127.0.0.1 (Anthropic and OpenAI APIs) to rehearse pipelines offline.

    Its default model writes every file a prompt names as expected, through the runners'
    write_file tool. Stop it with Ctrl-C.
    """
    try:
        from .testing import LoopbackLLM  # noqa: PLC0415 - needs the optional aiohttp
    except ImportError as exc:
        _fail(UsageError(str(exc)))
    server = LoopbackLLM(
        port=port,
        latency=latency,
        latency_sigma=latency_sigma,
        max_concurrency=max_concurrency,
        requests_per_minute=requests_per_minute,
        seed=seed,
    )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            click.echo(f"loopback LLM listening on {server.url}", err=False)
            click.echo(f"  anthropic runner: base_url: {server.url}")
            click.echo(f"  openai runner:    base_url: {server.url}/v1")
            click.echo(f"  claude-code:      base_url: {server.url}")
            click.echo("  any API key is accepted; Ctrl-C stops it", err=False)
            sys.stdout.flush()
            await stop.wait()
        click.echo(f"served {server.counters.requests} requests", err=True)

    try:
        asyncio.run(serve())
    except OSError as exc:
        _fail(UsageError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}"))


_inspect.register(cli)
_mcp.register(cli)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()

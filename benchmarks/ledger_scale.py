"""How phalanx's ledger scales: 100,000 trivial instances, with the ledger on and off.

The workload is one map stage over N partitions (100,000 by default), written into a fresh
temporary project: a JSON file of N rows, a pipeline file whose runner is ``{type: python,
function: "bench_agent:work"}``, and ``bench_agent.py``, an ``async def`` agent that writes one
tiny ``result.json`` and returns at once. The agent never waits, so the run's wall time is the
orchestrator's own cost: planning aside, ``wall / N`` is what phalanx spends per instance
(admission, staging, validation, the manifest, the commit, and with the ledger on, recording
every attempt and instance).

For each repeat, and for the ledger on and then off (the order alternates between repeats, so
that drift hits both alike), the script:

1. writes a fresh project, then (in a fresh process) times ``load_pipeline`` +
   ``plan_pipeline`` (*time to plan*);
2. times ``run_plan(plan, concurrency=..., ledger=True|False)`` (*the run*), and records the
   process's peak RSS (``ru_maxrss``) and the size of ``.phalanx/ledger.db`` and its ``-wal``
   once the run has returned;
3. with the ledger on, times the real CLI, ``phalanx status --project DIR`` and ``--json``, as
   subprocesses end to end (against ``phalanx --version``, the bare start-up), and, in a fresh
   process, ``open_ledger(...)`` + ``counts(run_id)``;
4. runs the same project again (*the cached re-run*: every instance's manifest is read and its
   files verified, and none runs).

Steps 1–2 and 4 each run in a fresh process (this script re-invoked with ``--child``), so peak
RSS belongs to that run alone. Projects are written and deleted by yet other processes, so that
the parent stays small: on Linux a child's ``ru_maxrss`` starts at the RSS of the process that
spawned it. Projects go on tmpfs (``/dev/shm``) when it exists, so the figures measure phalanx
and SQLite, not the disk; the table names the filesystem used. Run ``python
benchmarks/ledger_scale.py --help`` for the options; ``benchmarks/README.md`` explains every
number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import importlib.metadata
import json
import os
import platform
import pstats
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from overhead import filesystem  # the same table cell as overhead.py's: one definition

import phalanx
from phalanx._ledger import LEDGER_FILE, open_ledger
from phalanx._pipeline import STATE_DIR

STAGE = "work"
RESULT_FILE = "result.json"
CHILD_TIMEOUT_S = 3600
STATUS_TIMES = 3  # each CLI command is timed this many times per repeat; the median is kept
TARGET_RATIO = 1.5
TARGET_RSS_BYTES = 2**30
TARGET_STATUS_S = 1.0

AGENT = '''"""The benchmark's agent: one tiny file, no waiting."""

import json


async def work(ctx):
    (ctx.output_dir / "result.json").write_text(json.dumps({"key": ctx.key}), encoding="utf-8")
'''

Mode = Literal["on", "off"]


# -- the project ---------------------------------------------------------------------------------


def instance_keys(n: int) -> list[str]:
    """The partition keys in plan order, zero-padded so that sorting keeps that order."""
    width = len(str(max(n - 1, 0)))
    return [f"p{i:0{width}d}" for i in range(n)]


def write_project(root: Path, n: int, concurrency: int, seed: int) -> Path:
    """The pipeline, its N rows and the agent's module; returns the pipeline file (JSON, which
    is YAML's subset, so no quoting can go wrong)."""
    rng = random.Random(seed)
    rows = [{"id": key, "weight": rng.randrange(1000)} for key in instance_keys(n)]
    (root / "partitions.json").write_text(json.dumps(rows), encoding="utf-8")
    (root / "bench_agent.py").write_text(AGENT, encoding="utf-8")
    pipeline = {
        "name": "ledger-scale",
        "concurrency": concurrency,
        "stages": [
            {
                "name": STAGE,
                "partitions": {"from": "partitions.json", "key": "id"},
                "output": "out/{PARTITION_KEY}/",
                "expect": [RESULT_FILE],
                "runner": {"type": "python", "function": "bench_agent:work"},
                "concurrency": concurrency,
                "retries": 0,
            }
        ],
    }
    path = root / "pipeline.yaml"
    path.write_text(json.dumps(pipeline, indent=2), encoding="utf-8")
    return path


def ledger_bytes(project: Path) -> dict[str, int]:
    """The size of the ledger's files (0 for one that does not exist)."""
    base = project / STATE_DIR / LEDGER_FILE
    sizes = {}
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{base}{suffix}")
        sizes[f"db{suffix.replace('-', '_')}"] = path.stat().st_size if path.exists() else 0
    return sizes


# -- one run, in a child process -----------------------------------------------------------------


@dataclass
class Measured:
    """What one child process measured for one run of the project."""

    mode: str  # "on" or "off": the ledger
    cached_run: bool  # the second run of the same project
    n: int
    load_s: float  # load_pipeline
    plan_s: float  # plan_pipeline
    wall_s: float  # run_plan, from the call to its return
    stage_wall_s: float  # the stage alone, from its StageResult
    cpu_s: float  # user + system CPU time of the whole process (all threads) during run_plan
    switches: int  # context switches of the process (voluntary + involuntary) during run_plan
    rss_before_kib: int  # peak RSS after the imports, before loading the pipeline
    rss_planned_kib: int  # peak RSS once planned
    rss_peak_kib: int  # peak RSS at the end
    committed: int
    cached: int
    failed: int
    run_id: str
    ledger_db_bytes: int  # after the run has returned (the ledger is closed)
    ledger_wal_bytes: int
    ledger_shm_bytes: int


@dataclass
class Outcome:
    """What ``asyncio.run`` hands back: small, because it formats the repr of the main task's
    result when it restores the SIGINT handler, and a 100,000-instance result's is slow."""

    wall_s: float
    stage_wall_s: float
    committed: int
    cached: int
    failed: int
    run_id: str


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def context_switches() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def run_once(plan: phalanx.Plan, args: argparse.Namespace) -> Outcome:
    started = time.perf_counter()
    result = await phalanx.run_plan(
        plan,
        concurrency=args.concurrency,
        ledger=args.ledger == "on",
        rng=random.Random(args.seed),
    )
    wall = time.perf_counter() - started
    stage = result.stages[0]
    return Outcome(wall, stage.wall_s, stage.committed, stage.cached, stage.failed, result.run_id)


def child_run(args: argparse.Namespace) -> Measured:
    """Plan and run the project in ``args.project`` (written by another process, so that the
    rows built to write it do not count in this process's peak RSS)."""
    project = Path(args.project)
    rss_before = peak_rss_kib()
    started = time.perf_counter()
    pipeline = phalanx.load_pipeline(project / "pipeline.yaml")
    loaded = time.perf_counter()
    plan = phalanx.plan_pipeline(pipeline)
    planned = time.perf_counter()
    rss_planned = peak_rss_kib()
    profile = cProfile.Profile() if args.profile else None
    cpu, switches = cpu_seconds(), context_switches()
    if profile is not None:
        profile.enable()
    outcome = asyncio.run(run_once(plan, args))
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    cpu, switches = cpu_seconds() - cpu, context_switches() - switches
    rss_peak = peak_rss_kib()
    sizes = ledger_bytes(project)
    return Measured(
        mode=args.ledger,
        cached_run=args.again,
        n=args.n,
        load_s=loaded - started,
        plan_s=planned - loaded,
        wall_s=outcome.wall_s,
        stage_wall_s=outcome.stage_wall_s,
        cpu_s=cpu,
        switches=switches,
        rss_before_kib=rss_before,
        rss_planned_kib=rss_planned,
        rss_peak_kib=rss_peak,
        committed=outcome.committed,
        cached=outcome.cached,
        failed=outcome.failed,
        run_id=outcome.run_id,
        ledger_db_bytes=sizes["db"],
        ledger_wal_bytes=sizes["db_wal"],
        ledger_shm_bytes=sizes["db_shm"],
    )


@dataclass
class Counted:
    """``open_ledger`` + ``counts(run_id)`` timed in a fresh process, and what the ledger holds."""

    open_s: float
    counts_s: float
    close_s: float
    counts: dict[str, dict[str, int]]
    rows: dict[str, int]  # rows per table (counted after the timing)


def child_counts(args: argparse.Namespace) -> Counted:
    state = Path(args.project) / STATE_DIR
    started = time.perf_counter()
    ledger = open_ledger(state)
    opened = time.perf_counter()
    counts = ledger.counts(args.run_id)
    counted = time.perf_counter()
    ledger.close()
    closed = time.perf_counter()
    rows: dict[str, int] = {}
    with contextlib.closing(sqlite3.connect(state / LEDGER_FILE)) as conn:
        for table in ("runs", "stages", "instances", "attempts", "events", "outcomes"):
            # The table names are the constants above; nothing comes from outside.
            rows[table] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
    return Counted(opened - started, counted - opened, closed - counted, counts, rows)


# -- the parent: runs the children, reports --------------------------------------------------------


def child_argv(args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--n",
        str(args.n),
        "--concurrency",
        str(args.concurrency),
        "--seed",
        str(args.seed),
        *extra,
    ]


def call(argv: list[str], what: str) -> str:
    """Run ``argv``; its last line of output, or exit with its error output."""
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=CHILD_TIMEOUT_S
    )
    if done.returncode != 0:
        raise SystemExit(f"{what} failed (exit {done.returncode}):\n{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


def spawn_run(
    args: argparse.Namespace, project: Path, mode: Mode, *, again: bool, profile: str = ""
) -> Measured:
    """Run the project in ``project`` in a fresh process: a first run of a project written
    here, or (``again``) the same project once more."""
    extra = ["--child", "run", "--project", str(project), "--ledger", mode]
    if again:
        extra.append("--again")
    else:
        # In a process of its own: on Linux a child's ru_maxrss starts at its parent's RSS (the
        # spawning process's pages count toward the high-water mark carried across exec), so
        # the parent must stay small for the run's peak RSS to be its own.
        call(child_argv(args, "--child", "write", "--project", str(project)), "writing the project")
    if profile:
        extra += ["--profile", profile]
    what = f"the {'cached re-' if again else ''}run with the ledger {mode}"
    measured = Measured(**json.loads(call(child_argv(args, *extra), what)))
    expected = {"cached": args.n} if again else {"committed": args.n}
    got = {name: getattr(measured, name) for name in expected}
    if got != expected or measured.failed:
        raise SystemExit(f"{what}: expected {expected}, got {asdict(measured)}")
    return measured


def phalanx_cli() -> list[str]:
    """The ``phalanx`` console script beside this interpreter, else ``python -m phalanx``."""
    script = Path(sys.executable).with_name("phalanx")
    return [str(script)] if script.exists() else [sys.executable, "-m", "phalanx"]


def time_command(argv: list[str]) -> tuple[float, str]:
    """Seconds from start to exit of ``argv``, and its standard output."""
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {done.returncode}):\n{done.stderr}")
    return elapsed, done.stdout


@dataclass
class StatusTimes:
    """The CLI timed end to end (medians of ``STATUS_TIMES``), and the in-process read."""

    version_s: float  # `phalanx --version`: interpreter start-up and the CLI's imports
    status_s: float  # `phalanx status --project DIR`
    status_json_s: float  # `phalanx status --project DIR --json`
    counted: Counted


def time_status(args: argparse.Namespace, project: Path, run: Measured) -> StatusTimes:
    cli = phalanx_cli()
    version, status, as_json = [], [], []
    out = ""
    for _ in range(STATUS_TIMES):
        version.append(time_command([*cli, "--version"])[0])
        status.append(time_command([*cli, "status", "--project", str(project)])[0])
        elapsed, out = time_command([*cli, "status", "--project", str(project), "--json"])
        as_json.append(elapsed)
    stages = json.loads(out)["stages"]
    if [(s["name"], s["committed"]) for s in stages] != [(STAGE, args.n)]:
        raise SystemExit(f"phalanx status --json does not show {args.n} committed: {stages}")
    line = call(
        child_argv(args, "--child", "counts", "--project", str(project), "--run-id", run.run_id),
        "the in-process counts",
    )
    counted = Counted(**json.loads(line))
    return StatusTimes(
        statistics.median(version),
        statistics.median(status),
        statistics.median(as_json),
        counted,
    )


@dataclass
class Repeat:
    """Everything one repeat measured for one ledger mode."""

    mode: str
    first: Measured
    again: Measured
    status: StatusTimes | None  # with the ledger on only


def repeat_once(args: argparse.Namespace, tmpdir: str, mode: Mode, index: int) -> Repeat:
    project = Path(tempfile.mkdtemp(prefix=f"phalanx-ledger-scale-{mode}-", dir=tmpdir))
    try:
        first = spawn_run(args, project, mode, again=False)
        note(f"  repeat {index + 1}, ledger {mode}: run {first.wall_s:.2f} s")
        status = time_status(args, project, first) if mode == "on" else None
        if status is not None:
            note(f"  repeat {index + 1}, ledger {mode}: status {status.status_s:.2f} s")
        again = spawn_run(args, project, mode, again=True)
        note(f"  repeat {index + 1}, ledger {mode}: cached re-run {again.wall_s:.2f} s")
    finally:
        remove(args, project)
    return Repeat(mode, first, again, status)


def remove(args: argparse.Namespace, project: Path) -> None:
    """Delete a project in a process of its own: ``shutil.rmtree`` over 100,000 folders grows
    this process by some 70 MiB, which the next child's ``ru_maxrss`` would start from."""
    call(child_argv(args, "--child", "remove", "--project", str(project)), "removing the project")


def note(text: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(text, file=sys.stderr, flush=True)


def profile_run(args: argparse.Namespace, tmpdir: str) -> None:
    """One extra run with the ledger on under cProfile (its main thread only; the ledger's
    writer thread is not seen); the stats go to ``args.profile`` and their top to stderr."""
    project = Path(tempfile.mkdtemp(prefix="phalanx-ledger-scale-profile-", dir=tmpdir))
    try:
        spawn_run(args, project, "on", again=False, profile=args.profile)
    finally:
        remove(args, project)
    stats = pstats.Stats(args.profile, stream=sys.stderr)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(30)


# -- the report ------------------------------------------------------------------------------------


def environment(tmpdir: str) -> dict[str, Any]:
    return {
        "phalanx": importlib.metadata.version("phalanx"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "projects_in": tmpdir,
        "filesystem": filesystem(tmpdir),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@dataclass
class PlanFigures:
    """Time to plan: medians over every first run (planning does not depend on the ledger)."""

    load_s: float  # load_pipeline
    plan_s: float  # plan_pipeline
    total_s: float
    us_per_instance: float


@dataclass
class RunFigures:
    """The medians of one kind of run (ledger on or off; first or cached) over the repeats."""

    wall_s: float  # run_plan, from the call to its return
    wall_min_s: float
    wall_max_s: float
    us_per_instance: float  # wall / N
    cpu_us_per_instance: float  # CPU time of the process (all threads) / N
    switches_per_instance: float  # context switches of the process / N
    stage_wall_s: float
    rss_before_mib: float  # interpreter and imports
    rss_planned_mib: float  # ... and the plan
    rss_peak_mib: float  # ... and the run
    ledger_bytes: float  # ledger.db + -wal once run_plan has returned
    ledger_db_bytes: float
    ledger_wal_bytes: float


@dataclass
class StatusFigures:
    """``phalanx status`` on a ledger-on run: medians over the repeats."""

    version_s: float
    status_s: float
    status_json_s: float
    open_ledger_s: float
    counts_s: float
    close_s: float
    rows: dict[str, int]


@dataclass
class Target:
    what: str
    value: float
    unit: str
    met: bool


@dataclass
class Summary:
    plan: PlanFigures
    on: RunFigures
    off: RunFigures
    cached_on: RunFigures
    cached_off: RunFigures
    ratio_on_off: float
    cached_ratio_on_off: float
    status: StatusFigures
    targets: list[Target]


def run_figures(n: int, runs: list[Measured]) -> RunFigures:
    wall = median([m.wall_s for m in runs])
    return RunFigures(
        wall_s=wall,
        wall_min_s=min(m.wall_s for m in runs),
        wall_max_s=max(m.wall_s for m in runs),
        us_per_instance=wall / n * 1e6,
        cpu_us_per_instance=median([m.cpu_s for m in runs]) / n * 1e6,
        switches_per_instance=median([m.switches for m in runs]) / n,
        stage_wall_s=median([m.stage_wall_s for m in runs]),
        rss_before_mib=median([m.rss_before_kib for m in runs]) / 1024,
        rss_planned_mib=median([m.rss_planned_kib for m in runs]) / 1024,
        rss_peak_mib=median([m.rss_peak_kib for m in runs]) / 1024,
        ledger_bytes=median([m.ledger_db_bytes + m.ledger_wal_bytes for m in runs]),
        ledger_db_bytes=median([m.ledger_db_bytes for m in runs]),
        ledger_wal_bytes=median([m.ledger_wal_bytes for m in runs]),
    )


def summarize(n: int, repeats: list[Repeat]) -> Summary:
    """The medians over the repeats, and the targets met or missed."""
    firsts = [r.first for r in repeats]
    total = median([m.load_s + m.plan_s for m in firsts])
    plan = PlanFigures(
        load_s=median([m.load_s for m in firsts]),
        plan_s=median([m.plan_s for m in firsts]),
        total_s=total,
        us_per_instance=total / n * 1e6,
    )
    on = run_figures(n, [r.first for r in repeats if r.mode == "on"])
    off = run_figures(n, [r.first for r in repeats if r.mode == "off"])
    cached_on = run_figures(n, [r.again for r in repeats if r.mode == "on"])
    cached_off = run_figures(n, [r.again for r in repeats if r.mode == "off"])
    statuses = [r.status for r in repeats if r.status is not None]
    status = StatusFigures(
        version_s=median([s.version_s for s in statuses]),
        status_s=median([s.status_s for s in statuses]),
        status_json_s=median([s.status_json_s for s in statuses]),
        open_ledger_s=median([s.counted.open_s for s in statuses]),
        counts_s=median([s.counted.counts_s for s in statuses]),
        close_s=median([s.counted.close_s for s in statuses]),
        rows=statuses[0].counted.rows,
    )
    ratio = on.wall_s / off.wall_s
    rss = max(run.rss_peak_mib for run in (on, off, cached_on, cached_off))
    slowest = max(status.status_s, status.status_json_s)
    targets = [
        Target(f"ratio on/off <= {TARGET_RATIO:g}", ratio, "x", ratio <= TARGET_RATIO),
        Target("peak RSS < 1 GiB", rss, "MiB", rss * 2**20 < TARGET_RSS_BYTES),
        Target(f"phalanx status < {TARGET_STATUS_S:g} s", slowest, "s", slowest < TARGET_STATUS_S),
    ]
    return Summary(
        plan=plan,
        on=on,
        off=off,
        cached_on=cached_on,
        cached_off=cached_off,
        ratio_on_off=ratio,
        cached_ratio_on_off=cached_on.wall_s / cached_off.wall_s,
        status=status,
        targets=targets,
    )


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def print_table(env: dict[str, Any], args: argparse.Namespace, summary: Summary) -> None:
    print(
        f"phalanx {env['phalanx']} · {env['python']} · SQLite {env['sqlite']} · "
        f"{env['cores']} cores ({env['usable_cores']} usable) · {env['memory_gib']} GiB · "
        f"{env['platform']}"
    )
    print(
        f"N = {args.n:,} trivial instances · concurrency {args.concurrency} · seed {args.seed} · "
        f"median of {args.repeats} repeat(s), each run in a fresh process"
    )
    print(f"temporary projects in {env['projects_in']} ({env['filesystem']})")
    print()
    plan = summary.plan
    print(
        f"time to plan   {plan.total_s:.3f} s = load_pipeline {plan.load_s:.3f} s "
        f"+ plan_pipeline {plan.plan_s:.3f} s ({plan.us_per_instance:.1f} µs/instance)"
    )
    print()
    print(
        f"{'run':<20}{'wall s':>8}{'(min-max)':>16}{'µs/inst':>9}{'CPU µs/inst':>13}"
        f"{'ctx sw/inst':>13}{'stage s':>9}{'peak RSS':>11}{'ledger':>12}"
    )
    kinds = (
        ("ledger on", summary.on),
        ("ledger off", summary.off),
        ("cached, ledger on", summary.cached_on),
        ("cached, ledger off", summary.cached_off),
    )
    for label, row in kinds:
        spread = f"({row.wall_min_s:.2f}-{row.wall_max_s:.2f})"
        ledger = mib(row.ledger_bytes) if row.ledger_bytes else "-"
        print(
            f"{label:<20}{row.wall_s:>8.2f}{spread:>16}{row.us_per_instance:>9.0f}"
            f"{row.cpu_us_per_instance:>13.0f}{row.switches_per_instance:>13.1f}"
            f"{row.stage_wall_s:>9.2f}{row.rss_peak_mib:>7.0f} MiB{ledger:>12}"
        )
    on, status = summary.on, summary.status
    print()
    print(
        f"ratio on/off   {summary.ratio_on_off:.3f}x (run), "
        f"{summary.cached_ratio_on_off:.3f}x (cached re-run)"
    )
    print(
        f"ledger         {mib(on.ledger_db_bytes)} ledger.db + {mib(on.ledger_wal_bytes)} -wal "
        f"after the run; {mib(summary.cached_on.ledger_bytes)} after the cached re-run"
    )
    rows = ", ".join(f"{table} {count:,}" for table, count in status.rows.items())
    print(f"               rows after the run: {rows}")
    print(
        f"status         `phalanx status` {status.status_s:.3f} s · `--json` "
        f"{status.status_json_s:.3f} s · `phalanx --version` {status.version_s:.3f} s "
        "(start-up alone)"
    )
    print(
        f"               in process: open_ledger {status.open_ledger_s * 1e3:.1f} ms · "
        f"counts(run_id) {status.counts_s * 1e3:.1f} ms · close {status.close_s * 1e3:.1f} ms"
    )
    print()
    print("targets:")
    for target in summary.targets:
        shown = (
            f"{target.value:.3f}{target.unit}"
            if target.unit != "MiB"
            else f"{target.value:.0f} MiB"
        )
        print(f"  {target.what:<26}{shown:>12}   {'met' if target.met else 'MISSED'}")
    print()
    print("run wall = run_plan from call to return (no planning); µs/inst = wall / N")
    print("CPU      = user + system CPU of the run's process (every thread) during run_plan, / N")
    print("ctx sw   = context switches of the run's process during run_plan, / N")
    print("peak RSS = ru_maxrss of the run's own process (interpreter, imports, plan and run)")
    print("ledger   = ledger.db + ledger.db-wal once run_plan has returned")


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "How phalanx's ledger scales: N trivial instances with the ledger on and off, "
            "planning, peak memory, ledger size, `phalanx status`, and a cached re-run."
        )
    )
    parser.add_argument("--n", type=int, help="instances (default 100,000; 10,000 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: N = 10,000 and 1 repeat")
    parser.add_argument(
        "--repeats", type=int, help="repeats of each mode; medians are shown (default 3)"
    )
    parser.add_argument("--concurrency", type=int, default=256, help="slots (default 256)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the rows and of the jitter")
    parser.add_argument(
        "--tmpdir", help="where the temporary projects go (default /dev/shm if present, $TMPDIR)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="first, one extra ledger-on run under cProfile: stats to FILE, top to stderr",
    )
    parser.add_argument(
        "--child", choices=("run", "counts", "write", "remove"), help=argparse.SUPPRESS
    )
    parser.add_argument("--project", help=argparse.SUPPRESS)
    parser.add_argument("--ledger", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    parser.add_argument("--again", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 10_000 if args.quick else 100_000
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.n < 1 or args.repeats < 1 or args.concurrency < 1:
        parser.error("--n, --repeats and --concurrency must be positive")
    return args


def default_tmpdir() -> str:
    shm = Path("/dev/shm")  # noqa: S108 - tmpfs on purpose; each project is a fresh mkdtemp
    if shm.is_dir() and os.access(shm, os.W_OK):
        return str(shm)
    return tempfile.gettempdir()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child == "run":
        print(json.dumps(asdict(child_run(args))))
        return
    if args.child == "remove":
        shutil.rmtree(args.project, ignore_errors=True)
        print("{}")
        return
    if args.child == "write":
        path = write_project(Path(args.project), args.n, args.concurrency, args.seed)
        print(json.dumps({"pipeline": str(path)}))
        return
    if args.child == "counts":
        print(json.dumps(asdict(child_counts(args))))
        return
    tmpdir = args.tmpdir or default_tmpdir()
    env = environment(tmpdir)
    note(f"N={args.n:,}, {args.repeats} repeat(s), projects in {tmpdir} ({env['filesystem']})")
    if args.profile:
        profile_run(args, tmpdir)
    repeats: list[Repeat] = []
    for index in range(args.repeats):
        modes: tuple[Mode, Mode] = ("on", "off") if index % 2 == 0 else ("off", "on")
        repeats.extend(repeat_once(args, tmpdir, mode, index) for mode in modes)
    summary = summarize(args.n, repeats)
    print_table(env, args, summary)
    if args.json:
        document = {
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else list(argv),
            "environment": env,
            "settings": {
                "n": args.n,
                "repeats": args.repeats,
                "concurrency": args.concurrency,
                "seed": args.seed,
                "status_times": STATUS_TIMES,
            },
            "summary": asdict(summary),
            "repeats": [asdict(r) for r in repeats],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

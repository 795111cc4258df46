"""How much time phalanx adds on top of a perfect scheduler.

N simulated instances, each an ``async def`` agent (the ``python`` runner) that sleeps a latency
drawn from a log-normal distribution (median 20 ms, sigma 0.5, fixed seed) and writes one small
``result.json``, run by :func:`phalanx.fan_out` with validation (the file is expected and parsed),
commit (atomic rename) and notes (the default ``wip/notes.md``) switched on, in a fresh temporary
project per run.

Each run is compared with the *ideal makespan*: a perfect greedy list scheduler with the same
number of slots, given the same latencies in the same order as phalanx admits them (plan order;
all priorities are equal), each instance holding its slot for exactly its latency. The same
latencies are also run by plain ``asyncio.gather`` under an ``asyncio.Semaphore`` with no file
work at all: what asyncio itself costs on this machine.

Every (N, run kind, repeat) runs in a fresh subprocess (this script re-invoked with ``--child``),
so the peak RSS it reports belongs to that run alone. Run ``python benchmarks/overhead.py --help``
for the options; ``benchmarks/README.md`` explains every number.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import importlib.metadata
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

import phalanx

MEDIAN_LATENCY_S = 0.020
SIGMA = 0.5
BACKOFF_S = 0.001  # the ceiling of the (full-jitter) retry delay when --failures is set
OUTPUT = "out/{PARTITION_KEY}/"
RESULT_FILE = "result.json"
NOTES = "wip/notes.md"  # phalanx's default failure journal

Mode = Literal["phalanx", "gather", "gather-files"]
MODES: tuple[Mode, ...] = ("phalanx", "gather", "gather-files")
LABELS: dict[Mode, str] = {
    "phalanx": "phalanx.fan_out",
    "gather": "gather + semaphore",
    "gather-files": "gather + files",
}


# -- the workload --------------------------------------------------------------------------------


def draw_latencies(n: int, seed: int) -> list[float]:
    """``n`` latencies in seconds, log-normal with median 20 ms and sigma 0.5."""
    rng = random.Random(seed)
    return [rng.lognormvariate(math.log(MEDIAN_LATENCY_S), SIGMA) for _ in range(n)]


def draw_failures(n: int, rate: float, seed: int) -> list[bool]:
    """Which instances fail their first attempt: exactly ``round(rate * n)`` of them."""
    rng = random.Random(f"failures:{seed}")
    chosen = set(rng.sample(range(n), round(rate * n)))
    return [i in chosen for i in range(n)]


def ideal_makespan(latencies: Sequence[float], fails: Sequence[bool], slots: int) -> float:
    """The makespan of a perfect greedy list scheduler with ``slots`` slots.

    Instances are taken in order, each by the slot that frees first, and hold it for exactly
    their latency. An instance that fails its first attempt is queued again, with the same
    latency, when that attempt ends (behind every first attempt, as in phalanx's FIFO admission);
    the retry's backoff is taken as zero, so this stays a lower bound.
    """
    free = [0.0] * max(1, min(slots, len(latencies)))  # a heap of the times slots free up
    retries: list[tuple[float, float]] = []
    for latency, fail in zip(latencies, fails, strict=True):
        end = free[0] + latency
        heapq.heapreplace(free, end)
        if fail:
            retries.append((end, latency))
    for ready, latency in sorted(retries):
        heapq.heapreplace(free, max(free[0], ready) + latency)
    return max(free)


# -- one run, in a child process -----------------------------------------------------------------


@dataclass
class Measured:
    """What one child process measured for one run."""

    mode: str
    n: int
    wall_s: float
    stage_wall_s: float | None  # phalanx only: the stage alone, without planning and teardown
    cpu_s: float  # user + system CPU time of the whole process (all threads) during the run
    loop_cpu_s: float  # CPU time of the event loop's own thread during the run
    rss_before_kib: int  # peak RSS before the run: interpreter, imports and the drawn latencies
    rss_peak_kib: int  # peak RSS at the end of the run
    traced_peak_bytes: int | None  # tracemalloc's peak, only in the --tracemalloc pass
    committed: int
    failed: int
    attempts: int
    notes_entries: int  # entries in the failure journal (phalanx only)


class SimulatedFailure(RuntimeError):
    """Raised by the agent on the first attempt of the instances chosen to fail."""


async def agent(ctx: phalanx.InstanceContext) -> None:
    """The simulated agent: waits its latency, then writes one small JSON file."""
    await asyncio.sleep(cast(float, ctx.params["latency"]))
    if ctx.params["fail"] and ctx.attempt == 1:
        raise SimulatedFailure(f"simulated failure of {ctx.key}, attempt {ctx.attempt}")
    document = {"key": ctx.key, "attempt": ctx.attempt, "latency": ctx.params["latency"]}
    (ctx.output_dir / RESULT_FILE).write_text(json.dumps(document), encoding="utf-8")


@dataclass
class Outcome:
    """What a run hands back to its process. Kept small on purpose: when ``asyncio.run`` restores
    the SIGINT handler, CPython formats the repr of the main task, result included, and the repr
    of a 10,000-instance ``StageResult`` takes a noticeable fraction of a second."""

    wall_s: float
    stage_wall_s: float | None
    committed: int
    failed: int
    attempts: int
    notes_entries: int


async def run_phalanx(
    project: Path, latencies: Sequence[float], fails: Sequence[bool], concurrency: int
) -> Outcome:
    partitions = [
        {"id": f"p{i:05d}", "latency": latency, "fail": fail}
        for i, (latency, fail) in enumerate(zip(latencies, fails, strict=True))
    ]
    started = time.perf_counter()
    result = await phalanx.fan_out(
        partitions,
        agent,
        key="id",
        output=OUTPUT,
        project_dir=project,
        expect=[RESULT_FILE],
        concurrency=concurrency,
        retries=2,
        backoff=phalanx.Backoff(base=BACKOFF_S, max=BACKOFF_S),
    )
    wall = time.perf_counter() - started
    journal = project / NOTES
    entries = journal.read_text("utf-8").count("\n## ") if journal.exists() else 0
    return Outcome(
        wall_s=wall,
        stage_wall_s=result.wall_s,
        committed=result.committed,
        failed=result.failed,
        attempts=sum(len(inst.attempts) for inst in result.instances),
        notes_entries=entries,
    )


async def run_gather(
    project: Path | None, latencies: Sequence[float], fails: Sequence[bool], concurrency: int
) -> Outcome:
    """Plain ``asyncio.gather`` under a semaphore; with ``project``, also the minimal file work
    by hand (make a folder, write the file, read it back, rename the folder into place)."""
    slots = asyncio.Semaphore(concurrency)
    rng = random.Random(0)
    attempts = 0
    if project is not None:
        (project / "staging").mkdir()
        (project / "out").mkdir()

    async def one(i: int, latency: float, fail: bool) -> None:
        nonlocal attempts
        for attempt in (1, 2):
            async with slots:
                attempts += 1
                await asyncio.sleep(latency)
                if fail and attempt == 1:
                    failed = True
                else:
                    failed = False
                    if project is not None:
                        staging = project / "staging" / f"p{i:05d}.{attempt}"
                        staging.mkdir()
                        path = staging / RESULT_FILE
                        path.write_text(json.dumps({"key": i, "latency": latency}), "utf-8")
                        json.loads(path.read_bytes())
                        staging.rename(project / "out" / f"p{i:05d}")
            if not failed:
                return
            await asyncio.sleep(rng.uniform(0.0, BACKOFF_S))

    started = time.perf_counter()
    pairs = enumerate(zip(latencies, fails, strict=True))
    await asyncio.gather(*(one(i, latency, fail) for i, (latency, fail) in pairs))
    wall = time.perf_counter() - started
    return Outcome(wall, None, len(latencies), 0, attempts, 0)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(mode: Mode, n: int, args: argparse.Namespace) -> Measured:
    """One run in this (fresh) process."""
    latencies = draw_latencies(n, args.seed)
    fails = draw_failures(n, args.failures, args.seed)
    with tempfile.TemporaryDirectory(prefix="phalanx-overhead-", dir=args.tmpdir) as tmp:
        project = Path(tmp)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if args.tracemalloc:
            tracemalloc.start()
        cpu = cpu_seconds()
        loop_cpu = time.thread_time()  # asyncio.run runs the loop in this thread
        if mode == "phalanx":
            outcome = asyncio.run(run_phalanx(project, latencies, fails, args.concurrency))
        else:
            files = project if mode == "gather-files" else None
            outcome = asyncio.run(run_gather(files, latencies, fails, args.concurrency))
        loop_cpu = time.thread_time() - loop_cpu
        cpu = cpu_seconds() - cpu
        traced = tracemalloc.get_traced_memory()[1] if args.tracemalloc else None
        tracemalloc.stop()
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if outcome.committed != n:
        raise SystemExit(
            f"{mode} N={n}: only {outcome.committed} of {n} committed ({outcome.failed} failed)"
        )
    return Measured(
        mode=mode,
        n=n,
        wall_s=outcome.wall_s,
        stage_wall_s=outcome.stage_wall_s,
        cpu_s=cpu,
        loop_cpu_s=loop_cpu,
        rss_before_kib=rss_before,
        rss_peak_kib=rss_peak,
        traced_peak_bytes=traced,
        committed=outcome.committed,
        failed=outcome.failed,
        attempts=outcome.attempts,
        notes_entries=outcome.notes_entries,
    )


# -- the parent: runs the children, reports --------------------------------------------------------


def spawn(mode: Mode, n: int, args: argparse.Namespace, *, traced: bool = False) -> Measured:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--n",
        str(n),
        "--concurrency",
        str(args.concurrency),
        "--seed",
        str(args.seed),
        "--failures",
        str(args.failures),
    ]
    if args.tmpdir:
        argv += ["--tmpdir", args.tmpdir]
    if traced:
        argv.append("--tracemalloc")
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"the {mode} run with N={n} failed:\n{done.stderr}")
    return Measured(**json.loads(done.stdout.strip().splitlines()[-1]))


@dataclass
class Row:
    """The median of the repeats of one (N, run kind)."""

    mode: str
    n: int
    wall_s: float
    wall_min_s: float
    wall_max_s: float
    ideal_s: float
    ratio: float
    overhead_us: float  # (wall - ideal) * concurrency / N
    stage_wall_s: float | None
    cpu_us: float  # CPU time per instance
    loop_us: float  # CPU time of the event loop's thread per instance
    rss_peak_mib: float
    rss_run_mib: float  # peak RSS minus the RSS before the run
    traced_peak_mib: float | None
    attempts: int
    notes_entries: int


def summarize(mode: Mode, n: int, ideal: float, runs: list[Measured], concurrency: int) -> Row:
    wall = statistics.median(r.wall_s for r in runs)
    stages = [r.stage_wall_s for r in runs if r.stage_wall_s is not None]
    return Row(
        mode=mode,
        n=n,
        wall_s=wall,
        wall_min_s=min(r.wall_s for r in runs),
        wall_max_s=max(r.wall_s for r in runs),
        ideal_s=ideal,
        ratio=wall / ideal,
        overhead_us=(wall - ideal) * concurrency / n * 1e6,
        stage_wall_s=statistics.median(stages) if stages else None,
        cpu_us=statistics.median(r.cpu_s for r in runs) / n * 1e6,
        loop_us=statistics.median(r.loop_cpu_s for r in runs) / n * 1e6,
        rss_peak_mib=statistics.median(r.rss_peak_kib for r in runs) / 1024,
        rss_run_mib=statistics.median(r.rss_peak_kib - r.rss_before_kib for r in runs) / 1024,
        traced_peak_mib=None,
        attempts=runs[0].attempts,
        notes_entries=runs[0].notes_entries,
    )


def filesystem(path: str) -> str:
    """The type of the filesystem holding ``path`` (from ``/proc/mounts``), or ``"?"``."""
    try:
        mounts = Path("/proc/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return "?"
    real = os.path.realpath(path)
    best, kind = "", "?"
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1]
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def environment(tmpdir: str) -> dict[str, Any]:
    return {
        "phalanx": importlib.metadata.version("phalanx"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "projects_in": tmpdir,
        "filesystem": filesystem(tmpdir),
    }


def print_table(env: dict[str, Any], args: argparse.Namespace, rows: list[Row]) -> None:
    print(
        f"phalanx {env['phalanx']} · {env['python']} · {env['cores']} cores "
        f"({env['usable_cores']} usable) · {env['platform']}"
    )
    print(
        f"latencies: log-normal, median {MEDIAN_LATENCY_S * 1e3:g} ms, sigma {SIGMA:g}, "
        f"seed {args.seed} · concurrency {args.concurrency} · "
        f"failures {args.failures:.1%} of first attempts (retried after <= {BACKOFF_S * 1e3:g} ms)"
        f" · median of {args.repeat} run(s), each in a fresh process"
    )
    print(f"temporary projects in {env['projects_in']} ({env['filesystem']})")
    print()
    header = (
        f"{'N':>7}  {'run':<19}{'wall s':>8}{'(min-max)':>16}{'ideal s':>9}{'ratio':>8}"
        f"{'overhead':>10}{'CPU':>9}{'loop':>9}{'stage s':>9}{'peak RSS':>10}{'of which run':>14}"
    )
    units = f"{'':>7}  {'':<19}{'':>8}{'':>16}{'':>9}{'':>8}{'µs/inst':>10}{'µs/inst':>9}"
    units += f"{'µs/inst':>9}"
    units += f"{'':>9}{'MiB':>10}{'MiB':>14}"
    print(header)
    print(units)
    for row in rows:
        spread = f"({row.wall_min_s:.3f}-{row.wall_max_s:.3f})"
        stage = f"{row.stage_wall_s:.3f}" if row.stage_wall_s is not None else "-"
        print(
            f"{row.n:>7,}  {LABELS[cast(Mode, row.mode)]:<19}{row.wall_s:>8.3f}{spread:>16}"
            f"{row.ideal_s:>9.3f}{row.ratio:>7.3f}x{row.overhead_us:>10.0f}{row.cpu_us:>9.0f}"
            f"{row.loop_us:>9.0f}"
            f"{stage:>9}{row.rss_peak_mib:>10.1f}{row.rss_run_mib:>14.1f}"
        )
    print()
    by_kind = {(row.n, row.mode): row for row in rows}
    for n in args.n:
        ours, files = by_kind.get((n, "phalanx")), by_kind.get((n, "gather-files"))
        if ours is not None and files is not None:
            print(
                f"{n:>7,}  phalanx / gather + files = {ours.wall_s / files.wall_s:.3f}x "
                "(phalanx's cost beyond the minimal file work, on this filesystem)"
            )
    if args.failures:
        print()
        for row in rows:
            if row.mode == "phalanx":
                print(
                    f"{row.n:>7,}  phalanx made {row.attempts:,} attempts for {row.n:,} instances "
                    f"and wrote {row.notes_entries:,} entries to {NOTES}"
                )
    if any(row.traced_peak_mib is not None for row in rows):
        print()
        print("tracemalloc peak (a separate, slower pass):")
        for row in rows:
            if row.traced_peak_mib is not None:
                label = LABELS[cast(Mode, row.mode)]
                print(f"{row.n:>7,}  {label:<19}{row.traced_peak_mib:>8.1f} MiB")
    print()
    print("ratio    = wall / ideal makespan of a perfect greedy scheduler (same slots, same order)")
    print("overhead = (wall - ideal) * concurrency / N: extra time each instance held a slot")
    print("CPU      = CPU time of the whole process (every thread, user + system) / N")
    print(
        "loop     = CPU time of the event loop's thread / N: it keeps up while this stays "
        "well below mean latency / concurrency"
    )
    print("stage s  = the stage alone, from phalanx's StageResult: no planning, no teardown")
    print("peak RSS = ru_maxrss of the run's own process; 'of which run' = growth during the run")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="phalanx's overhead against a perfect scheduler and plain asyncio.gather."
    )
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000], help="instance counts")
    parser.add_argument("--concurrency", type=int, default=100, help="slots (default 100)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the latencies (default 7)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per N; the median is shown")
    parser.add_argument(
        "--failures",
        type=float,
        default=0.0,
        help="fraction of instances whose first attempt fails and is retried (default 0)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="what to run (default: all three)",
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="also a separate pass per N under tracemalloc, reporting its peak (slower)",
    )
    parser.add_argument("--tmpdir", help="where to make the temporary projects (default: $TMPDIR)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0.0 <= args.failures < 1.0:
        parser.error("--failures must be in [0, 1)")
    if args.repeat < 1 or args.concurrency < 1 or min(args.n) < 1:
        parser.error("--repeat, --concurrency and --n must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(asdict(child(args.child, args.n[0], args))))
        return
    env = environment(args.tmpdir or tempfile.gettempdir())
    rows: list[Row] = []
    measured: list[Measured] = []
    for n in args.n:
        latencies = draw_latencies(n, args.seed)
        ideal = ideal_makespan(
            latencies, draw_failures(n, args.failures, args.seed), args.concurrency
        )
        runs: dict[Mode, list[Measured]] = {mode: [] for mode in args.modes}
        for _ in range(args.repeat):
            for mode in args.modes:  # interleaved, so that drift hits every kind alike
                runs[mode].append(spawn(mode, n, args))
                if not args.json:
                    print(f"  N={n:,} {mode}: {runs[mode][-1].wall_s:.3f} s", file=sys.stderr)
                    sys.stderr.flush()
        for mode in args.modes:
            measured.extend(runs[mode])
            row = summarize(mode, n, ideal, runs[mode], args.concurrency)
            if args.tracemalloc:
                row.traced_peak_mib = (
                    spawn(mode, n, args, traced=True).traced_peak_bytes or 0
                ) / 2**20
            rows.append(row)
    if args.json:
        document = {
            "environment": env,
            "settings": {
                "n": args.n,
                "concurrency": args.concurrency,
                "seed": args.seed,
                "repeat": args.repeat,
                "failures": args.failures,
                "median_latency_s": MEDIAN_LATENCY_S,
                "sigma": SIGMA,
            },
            "results": [asdict(row) for row in rows],
            "runs": [asdict(run) for run in measured],
        }
        print(json.dumps(document, indent=2))
    else:
        print_table(env, args, rows)


if __name__ == "__main__":
    main()

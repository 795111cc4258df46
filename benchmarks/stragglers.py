"""Stragglers: the makespan of a fan-out with and without speculative execution.

N simulated instances (1,000 by default), each an ``async def`` agent (the ``python`` runner)
that sleeps a latency drawn from a log-normal distribution (median 200 ms, sigma 0.3, fixed seed)
and writes one small ``result.json``, run by :func:`phalanx.fan_out` with 100 slots in a fresh
temporary project per run. A median of 200 ms keeps phalanx's own cost per instance (about
0.3 ms of CPU, see ``overhead.py``) small against the work: 100 slots finish about 500
instances a second, so the event loop is busy about 15% of the time.

A share of the instances (2%, chosen by the seed) are **stragglers**: their *first attempt*
takes 20 times the median latency (4 s); any later attempt of the same instance takes its
normal latency. Straggling is a property of the attempt, not of the work: a slow replica, a
congested host, a provider queue. That is the case speculative execution can fix, because a
second attempt of the same instance runs at normal speed. (A partition that is slow whatever
runs it cannot be fixed by a backup; only by splitting it.)

Each repeat runs the same instances three times, interleaved:

- without speculation;
- with ``speculate=Speculate(after="p99", max_extra="5%")`` and phalanx's default
  ``min_samples`` (one slot's worth of successes: here 100): once that many attempts have
  succeeded, an attempt running longer than the 99th percentile of the successful durations
  gets a backup attempt, and the first valid commit wins.
  ``p99`` because with sigma 0.3 the p99 of normal attempts is exp(2.326 * 0.3) = 2.0x the
  median, so about 1% of normal attempts (10 of 1,000) look like stragglers, while a straggler
  is 10x past it; ``p90`` (1.47x the median) would flag 10% of normal attempts, 100 false
  positives, and spend the 5% cap (50 backups) before most stragglers were seen;
- the same with ``min_samples=10`` (``--min-samples`` sets the list; 0 stands for phalanx's
  default), which was phalanx's default before this benchmark showed why it fails. Early in a
  stage the successful durations are a censored sample: at time t only attempts shorter than t
  have succeeded, so the p99 of the first ten is about the tenth-fastest duration of the first
  wave, and every first-wave attempt still running is past it. A slot's worth of samples waits
  until most of the first wave has ended.

Both are compared with the **ideal without stragglers**: a perfect greedy list scheduler with
the same slots, taking the instances in admission order (plan order), each holding a slot for
exactly its *normal* latency. The target: with speculation, within 1.5x of that ideal at no
more than 5% extra cost.

The agent logs every attempt it runs, cancelled ones included, so the cost is counted from what
really ran: backup attempts over instances, and backup slot-seconds over the slot-seconds of
every attempt. Every (run kind, repeat) runs in a fresh subprocess (this script re-invoked with
``--child``). Run ``python benchmarks/stragglers.py --help`` for the options;
``benchmarks/README.md`` explains every number.
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from overhead import filesystem  # the same table cell as overhead.py's: one definition

import phalanx

OUTPUT = "out/{PARTITION_KEY}/"
RESULT_FILE = "result.json"

PLAIN = "plain"
SPECULATE = "speculate-"  # + min_samples: one kind of run per --min-samples value
TARGET_RATIO = 1.5  # the target: within 1.5x of the ideal without stragglers...
TARGET_EXTRA = 0.05  # ...at no more than 5% extra cost


# -- the workload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The instances of one run, in admission order."""

    latencies: list[float]  # each instance's normal latency, seconds
    stragglers: list[bool]  # whether its first attempt straggles
    straggle_s: float  # how long a straggling first attempt takes

    def first_attempt_s(self, i: int) -> float:
        return self.straggle_s if self.stragglers[i] else self.latencies[i]


def draw_workload(args: argparse.Namespace) -> Workload:
    """Log-normal latencies and exactly ``round(share * n)`` stragglers, both from the seed."""
    rng = random.Random(args.seed)
    latencies = [rng.lognormvariate(math.log(args.median), args.sigma) for _ in range(args.n)]
    chosen = set(random.Random(f"stragglers:{args.seed}").sample(range(args.n), stragglers(args)))
    return Workload(latencies, [i in chosen for i in range(args.n)], args.factor * args.median)


def stragglers(args: argparse.Namespace) -> int:
    """How many instances straggle: ``round(share * n)``."""
    return round(cast(float, args.share) * cast(int, args.n))


def list_schedule(durations: Sequence[float], slots: int) -> float:
    """The makespan of a perfect greedy list scheduler with ``slots`` slots: the instances in
    order, each taken by the slot that frees first and held for exactly its duration."""
    free = [0.0] * max(1, min(slots, len(durations)))  # a heap of the times slots free up
    for duration in durations:
        heapq.heapreplace(free, free[0] + duration)
    return max(free)


# -- one run, in a child process -----------------------------------------------------------------


@dataclass
class AttemptLog:
    """One attempt as the agent saw it: from its start to its end or its cancellation."""

    index: int
    attempt: int
    started: float  # seconds since fan_out was called
    duration_s: float


@dataclass
class Measured:
    """What one child process measured for one run."""

    kind: str
    wall_s: float  # the fan_out call
    stage_wall_s: float  # StageResult.wall_s: the stage alone
    committed: int
    backups: int  # StageResult.speculation.backups
    won: int  # StageResult.speculation.won
    extra_s: float  # StageResult.speculation.extra_s
    attempts: int  # attempts the agent ran, cancelled ones included
    attempt_s: float  # their slot-seconds
    backup_attempts: int  # attempts after the first (no attempt fails, so all are backups)
    backup_s: float  # their slot-seconds
    backups_of_stragglers: int
    stragglers_won: int  # stragglers committed by their backup
    early_backups: int  # backup attempts started before the `after` percentile of latencies
    recorded_s: float  # StageResult.sum_instance_s: the attempts InstanceResult records
    backup_starts: list[float] = field(default_factory=list)  # seconds since the call


def min_samples(kind: str) -> int | None:
    """The ``min_samples`` of a kind of run; ``None`` for the run without speculation."""
    return int(kind.removeprefix(SPECULATE)) if kind.startswith(SPECULATE) else None


def percentile_of(args: argparse.Namespace) -> float:
    """The number in ``--after``: 99.0 for ``p99``."""
    return phalanx.Speculate(after=args.after).percentile


def kinds(args: argparse.Namespace) -> list[str]:
    return [PLAIN, *(f"{SPECULATE}{m}" for m in args.min_samples)]


async def run(project: Path, work: Workload, kind: str, args: argparse.Namespace) -> Measured:
    """One fan-out of the workload; the agent logs every attempt it runs."""
    log: list[AttemptLog] = []
    origin = time.monotonic()

    async def agent(ctx: phalanx.InstanceContext) -> None:
        index = cast(int, ctx.params["index"])
        seconds = work.first_attempt_s(index) if ctx.attempt == 1 else work.latencies[index]
        started = time.monotonic()
        try:
            await asyncio.sleep(seconds)
            document = {"key": ctx.key, "attempt": ctx.attempt, "seconds": seconds}
            (ctx.output_dir / RESULT_FILE).write_text(json.dumps(document), encoding="utf-8")
        finally:  # a superseded twin is cancelled: its time counts all the same
            ended = time.monotonic()
            log.append(AttemptLog(index, ctx.attempt, started - origin, ended - started))

    partitions = [{"id": f"p{i:05d}", "index": i} for i in range(args.n)]
    speculate = None
    samples = min_samples(kind)
    if samples is not None:
        speculate = phalanx.Speculate(
            after=args.after, max_extra=args.max_extra, min_samples=samples or None
        )
    result = await phalanx.fan_out(
        partitions,
        agent,
        key="id",
        output=OUTPUT,
        project_dir=project,
        concurrency=args.concurrency,
        expect=[RESULT_FILE],
        speculate=speculate,
    )
    wall = time.monotonic() - origin
    spec = result.speculation
    # No attempt can have run longer than this before this much time has passed since the call
    # (planning comes first, so the count errs low): a backup that started earlier was
    # triggered by a threshold below the true percentile.
    percentile = sorted(work.latencies)[min(args.n - 1, int(percentile_of(args) / 100 * args.n))]
    backups = [entry for entry in log if entry.attempt > 1]
    by_index = {int(inst.key[1:]): inst for inst in result.instances}
    return Measured(
        kind=kind,
        wall_s=wall,
        stage_wall_s=result.wall_s,
        committed=result.committed,
        backups=spec.backups if spec else 0,
        won=spec.won if spec else 0,
        extra_s=spec.extra_s if spec else 0.0,
        attempts=len(log),
        attempt_s=sum(entry.duration_s for entry in log),
        backup_attempts=len(backups),
        backup_s=sum(entry.duration_s for entry in backups),
        backups_of_stragglers=sum(1 for entry in backups if work.stragglers[entry.index]),
        stragglers_won=sum(
            1
            for i, inst in by_index.items()
            if work.stragglers[i] and any(a.backup and a.cause is None for a in inst.attempts)
        ),
        early_backups=sum(1 for entry in backups if entry.started < percentile),
        recorded_s=result.sum_instance_s,
        backup_starts=sorted(round(entry.started, 4) for entry in backups),
    )


def child(kind: str, args: argparse.Namespace) -> Measured:
    work = draw_workload(args)
    with tempfile.TemporaryDirectory(prefix="phalanx-stragglers-", dir=args.tmpdir) as tmp:
        measured = asyncio.run(run(Path(tmp), work, kind, args))
    if measured.committed != args.n:
        raise SystemExit(f"{kind}: only {measured.committed} of {args.n} committed")
    return measured


# -- the parent: runs the children, reports --------------------------------------------------------


def spawn(kind: str, args: argparse.Namespace) -> Measured:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind]
    for name in ("n", "concurrency", "median", "sigma", "share", "factor", "seed"):
        argv += [f"--{name}", str(getattr(args, name))]
    argv += ["--after", args.after, "--max-extra", args.max_extra]
    if args.tmpdir:
        argv += ["--tmpdir", args.tmpdir]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"the {kind} run failed:\n{done.stderr}")
    return Measured(**json.loads(done.stdout.strip().splitlines()[-1]))


@dataclass
class Row:
    """The median of the repeats of one kind of run."""

    kind: str
    min_samples: int | None  # None: no speculation
    wall_s: float
    wall_min_s: float
    wall_max_s: float
    ratio: float  # wall / ideal without stragglers
    backups: float
    won: float
    backup_attempts: float
    early_backups: float
    backups_of_stragglers: float
    stragglers_won: float
    extra_attempts: float  # backup attempts / instances
    extra_slot_s: float  # backup slot-seconds / slot-seconds of every attempt
    phalanx_extra_s: float  # StageResult.speculation.extra_s
    backup_s: float  # the agent's own count of the same
    attempt_s: float  # slot-seconds of every attempt the agent ran
    recorded_s: float  # StageResult.sum_instance_s
    met: bool | None  # both targets, for a run with speculation


def summarize(kind: str, runs: list[Measured], ideal: float, args: argparse.Namespace) -> Row:
    def median(values: Sequence[float]) -> float:
        return float(statistics.median(values))

    wall = median([r.wall_s for r in runs])
    extra_attempts = median([r.backup_attempts / args.n for r in runs])
    extra_slot_s = median([r.backup_s / r.attempt_s for r in runs])
    samples = min_samples(kind)
    met = None
    if samples is not None:
        met = wall / ideal <= TARGET_RATIO and max(extra_attempts, extra_slot_s) <= TARGET_EXTRA
    return Row(
        kind=kind,
        min_samples=samples,
        wall_s=wall,
        wall_min_s=min(r.wall_s for r in runs),
        wall_max_s=max(r.wall_s for r in runs),
        ratio=wall / ideal,
        backups=median([r.backups for r in runs]),
        won=median([r.won for r in runs]),
        backup_attempts=median([r.backup_attempts for r in runs]),
        early_backups=median([r.early_backups for r in runs]),
        backups_of_stragglers=median([r.backups_of_stragglers for r in runs]),
        stragglers_won=median([r.stragglers_won for r in runs]),
        extra_attempts=extra_attempts,
        extra_slot_s=extra_slot_s,
        phalanx_extra_s=median([r.extra_s for r in runs]),
        backup_s=median([r.backup_s for r in runs]),
        attempt_s=median([r.attempt_s for r in runs]),
        recorded_s=median([r.recorded_s for r in runs]),
        met=met,
    )


def environment(tmpdir: str) -> dict[str, Any]:
    return {
        "phalanx": importlib.metadata.version("phalanx"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "projects_in": tmpdir,
        "filesystem": filesystem(tmpdir),
    }


def label(row: Row) -> str:
    if row.min_samples is None:
        return "no speculation"
    if row.min_samples == 0:
        return "speculate, min_samples default"
    return f"speculate, min_samples {row.min_samples}"


def print_table(
    env: dict[str, Any], args: argparse.Namespace, ideals: dict[str, float], rows: list[Row]
) -> None:
    print(f"phalanx {env['phalanx']} · {env['python']} · {env['cores']} cores · {env['platform']}")
    print(
        f"{args.n:,} instances · latencies log-normal, median {args.median * 1e3:g} ms, "
        f"sigma {args.sigma:g}, seed {args.seed} · concurrency {args.concurrency}"
    )
    print(
        f"stragglers: {stragglers(args)} ({args.share:.1%}), first attempt "
        f"{args.factor:g}x the median = {args.factor * args.median:g} s · speculate: "
        f"after {args.after}, max_extra {args.max_extra}"
    )
    print(f"temporary projects in {env['projects_in']} ({env['filesystem']})")
    print(f"median of {args.repeat} run(s) per kind, each in a fresh process")
    print()
    print(
        f"ideal without stragglers {ideals['without']:.3f} s · ideal with stragglers and no "
        f"backups {ideals['with']:.3f} s ({ideals['with'] / ideals['without']:.2f}x)"
    )
    print()
    width = max(len(label(row)) for row in rows) + 2
    print(
        f"{'run':<{width}}{'makespan s':>11}{'(min-max)':>16}{'ratio':>9}{'backups':>9}"
        f"{'ran':>5}{'too early':>11}{'won':>5}{'stragglers won':>16}"
        f"{'extra attempts':>16}{'extra slot-s':>14}"
    )
    for row in rows:
        spread = f"({row.wall_min_s:.3f}-{row.wall_max_s:.3f})"
        print(
            f"{label(row):<{width}}{row.wall_s:>11.3f}{spread:>16}{row.ratio:>8.3f}x"
            f"{row.backups:>9g}{row.backup_attempts:>5g}{row.early_backups:>11g}{row.won:>5g}"
            f"{row.stragglers_won:>16g}"
            f"{row.extra_attempts:>16.1%}{row.extra_slot_s:>14.1%}"
        )
    print()
    for row in rows:
        if row.met is None:
            continue
        print(
            f"{label(row)}: backup slot-seconds {row.backup_s:.3f} s counted by the agent, "
            f"{row.phalanx_extra_s:.3f} s by phalanx (StageResult.speculation.extra_s)"
        )
        print(
            f"  slot-seconds of every attempt {row.attempt_s:.1f} s (the agent's count); "
            f"StageResult.sum_instance_s {row.recorded_s:.1f} s (superseded twins included)"
        )
        ok_time = row.ratio <= TARGET_RATIO
        ok_cost = max(row.extra_attempts, row.extra_slot_s) <= TARGET_EXTRA
        print(
            f"  target within {TARGET_RATIO:g}x of the ideal without stragglers: "
            f"{'met' if ok_time else 'NOT met'} ({row.ratio:.3f}x); at <= {TARGET_EXTRA:.0%} "
            f"extra cost: {'met' if ok_cost else 'NOT met'} ({row.extra_attempts:.1%} of "
            f"attempts, {row.extra_slot_s:.1%} of slot-seconds)"
        )
    print()
    print("ratio          = makespan / ideal makespan without stragglers (same slots, same order)")
    print(
        "backups, won   = StageResult.speculation: backups that ran, backups that committed first"
    )
    print("ran            = backup attempts the agent ran (a backup still waiting for a slot when")
    print("                 its original commits never runs, and does not count)")
    print(f"too early      = backup attempts started before the {args.after} of the normal")
    print("                 latencies had passed since the start: no attempt had run that long,")
    print("                 so the threshold they crossed was below the true percentile")
    print("stragglers won = stragglers whose backup committed (the straggling attempt cancelled)")
    print("extra attempts = backup attempts / instances")
    print("extra slot-s   = backup slot-seconds / slot-seconds of every attempt (cancelled too)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Makespan of a fan-out with stragglers, with and without speculation."
    )
    parser.add_argument("--n", type=int, default=1000, help="instances (default 1000)")
    parser.add_argument("--concurrency", type=int, default=100, help="slots (default 100)")
    parser.add_argument(
        "--median", type=float, default=0.2, help="median latency, seconds (default 0.2)"
    )
    parser.add_argument("--sigma", type=float, default=0.3, help="log-normal sigma (default 0.3)")
    parser.add_argument(
        "--share", type=float, default=0.02, help="share of stragglers (default 0.02)"
    )
    parser.add_argument(
        "--factor",
        type=float,
        default=20.0,
        help="a straggling first attempt takes this many medians (default 20)",
    )
    parser.add_argument("--after", default="p99", help="speculate after (default p99)")
    parser.add_argument("--max-extra", default="5%", help="speculate max_extra (default 5%%)")
    parser.add_argument(
        "--min-samples",
        type=int,
        nargs="+",
        default=[0, 10],
        help="speculate min_samples: one run kind per value, 0 for phalanx's default "
        "(default: 0 and 10)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per kind; the median is shown")
    parser.add_argument("--seed", type=int, default=7, help="seed of the workload (default 7)")
    parser.add_argument("--tmpdir", help="where to make the temporary projects (default: $TMPDIR)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.n, args.concurrency, args.repeat) < 1 or min(args.min_samples) < 0:
        parser.error("--n, --concurrency and --repeat must be positive, --min-samples >= 0")
    if not 0.0 <= args.share < 1.0 or args.median <= 0 or args.sigma < 0 or args.factor <= 0:
        parser.error("--share is in [0, 1); --median and --factor are positive; --sigma >= 0")
    try:
        phalanx.Speculate(after=args.after, max_extra=args.max_extra)
    except ValueError as exc:  # pydantic's ValidationError is one
        parser.error(f"--after / --max-extra: {exc}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(asdict(child(args.child, args))))
        return
    env = environment(args.tmpdir or tempfile.gettempdir())
    work = draw_workload(args)
    ideals = {
        "without": list_schedule(work.latencies, args.concurrency),
        "with": list_schedule([work.first_attempt_s(i) for i in range(args.n)], args.concurrency),
    }
    runs: dict[str, list[Measured]] = {kind: [] for kind in kinds(args)}
    for _ in range(args.repeat):
        for kind, measured in runs.items():  # interleaved: drift hits every kind alike
            last = spawn(kind, args)
            measured.append(last)
            if not args.json:
                print(
                    f"  {kind}: {last.wall_s:.3f} s, {last.backups} backups, {last.won} won",
                    file=sys.stderr,
                )
    rows = [summarize(kind, measured, ideals["without"], args) for kind, measured in runs.items()]
    if args.json:
        names = ("n", "concurrency", "median", "sigma", "share", "factor", "after", "max_extra")
        settings = {name: getattr(args, name) for name in names}
        settings |= {"min_samples": args.min_samples, "repeat": args.repeat, "seed": args.seed}
        document = {
            "environment": env,
            "settings": settings,
            "targets": {"ratio": TARGET_RATIO, "extra": TARGET_EXTRA},
            "ideal_s": ideals,
            "results": [asdict(row) for row in rows],
            "runs": [asdict(run) for measured in runs.values() for run in measured],
        }
        print(json.dumps(document, indent=2))
    else:
        print_table(env, args, ideals, rows)


if __name__ == "__main__":
    main()

"""2,000 two-turn LLM agents against a rate-limited server: ``concurrency: auto`` or fixed caps.

The server is :class:`phalanx.testing.LoopbackLLM` with ``max_concurrency`` 50 (a request
beyond 50 in flight is answered 429 at once, ``retry-after: 1``), ``requests_per_minute``
1,200 (a bucket that starts full, holds 1,200 requests and refills at 20 a second; a request
that finds it empty is answered 429 with ``retry-after`` in whole seconds) and every response
carrying the ``x-ratelimit-*`` (or ``anthropic-ratelimit-*``) headers. Each model request takes
``--latency`` seconds (0.5 s by default) to answer.

The workload is llm_fanout.py's: one stage over N partitions (2,000 by default), runner
``openai`` (or ``anthropic`` with ``--provider``), whose blueprint declares two outputs, so the
server's default model writes both on the first turn and answers text on the second: two model
requests per instance. The pipeline's ``concurrency`` (the run's cap, and the ceiling of an
adaptive lane) is 256; the stage has ``retries: 2`` and a timeout of 600 s (time waiting for the
lane is added to it). Each run sets the stage's ``concurrency`` to one of:

- ``auto``: the lane's adaptive limit (AIMD on 429s, pauses for ``retry-after``, request and
  token buckets synchronised from the rate-limit headers; see ``docs/scheduling.md``);
- ``256``: a fixed slot count of 256 conversations; pauses and buckets still apply;
- ``7``: the "at most 7 subagents at a time" habit, fixed.

Why a latency of 0.5 s. The server allows 20 requests a second once its initial 1,200 are
spent. With 7 conversations in flight a client sends at most ``7 / 0.5`` = 14 requests a second:
fixed 7 is bound by its own cap, below what the server allows, and can never use the allowance.
With 50 requests in flight the server itself could answer 100 a second, so ``auto`` and 256 are
bound by the rate limit (the bucket), not by the latency or the concurrency limit, and must
discover both limits from the server's answers. At 0.3 s, 7 would be rate-bound as well
(23 a second) and the comparison would show nothing; a longer latency would only stretch the
fixed-7 run, already half of the default invocation's 10 minutes on a 2-core machine.

What "allowed" means. Over a wall time T, the server can admit at most ``1200 + 20 * T``
requests (the full bucket plus its refill), and at most ``50 * T / latency`` (50 in flight, each
held ``latency``): **allowed(T)** is the smaller. The **share of the allowed rate** is the
answered (status 200) requests over allowed(T), with T the run's wall time (``load_pipeline``
to the return of ``run_plan``): 100% would be a client that spends every request the server
grants, from the first moment to the last. The **lower bound** on the wall time is the smallest
T in which a perfect client can get 2N requests answered: the last request must arrive by
``T - latency``, so ``T >= (2N - 1200) / 20 + latency``; ``T >= 2N * latency / 50`` (the
server's concurrency); and with a fixed cap c below 50, ``T >= ceil(N / c) * 2 * latency``.

What "steady state" means. The parent replays the server's request bucket from the arrival
times of the answered requests (the server records each request's arrival): full at the first
arrival, refilled at 20 a second, one taken per answered request. The **initial burst** ends at
the arrival that first leaves it holding less than 5% of its capacity (60 requests): from then
on, the client can only spend what refills. The **steady-state rate** is the number of answered
requests that arrived after that one, up to and including the last answered one, divided by
that span (compare it with 20 a second). Its **share** is that number over what the server
could admit in the span: what the bucket held at its start plus 20 a second. A run that never
draws the bucket down that far (fixed 7) has no steady state in this sense.

Three processes per run, as in llm_fanout.py: the **server** (this script with ``--serve``, a
fresh one per run so that its bucket starts full; when stopped it prints every model request's
arrival time, duration and status as one JSON line), the **orchestrator** (this script with
``--child RUN``, a fresh process per run, which also records the lane's ``LimitChanged`` and
``LanePaused`` events), and this **parent**, which starts both and prints the table.

Run ``python benchmarks/rate_limit.py --help`` for the options; ``benchmarks/README.md`` explains
every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import importlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from llm_fanout import (  # the same workload as llm_fanout.py's: one definition
    BLUEPRINT,
    KEY_ENV,
    MAX_TOKENS,
    MODEL,
    STAGE,
    TURNS,
    cpu_seconds,
    environment,
    instance_keys,
    serve_until_stopped,
    server_process,
)
from overhead import filesystem

import phalanx

Provider = Literal["openai", "anthropic"]
PROVIDERS: tuple[Provider, ...] = ("openai", "anthropic")
DEFAULT_RUNS = ("auto", "256", "7")
BURST_END = 0.05  # the initial burst ends when the bucket first holds less than this share
TARGET_SHARE = 0.90
CHILD_TIMEOUT_S = 3600
START = 4  # an adaptive lane's first limit (phalanx._lanes.Lane's default start)


# -- the workload ----------------------------------------------------------------------------------


def run_setting(text: str) -> str:
    """A run: ``auto`` or a positive whole number of slots (argparse's type)."""
    if text == "auto":
        return text
    try:
        slots = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number") from None
    if slots < 1:
        raise argparse.ArgumentTypeError(f"a fixed concurrency must be >= 1, not {slots}")
    return str(slots)


def write_project(root: Path, args: argparse.Namespace, url: str, run: str) -> Path:
    """A one-stage pipeline over ``args.n`` partitions, the stage's ``concurrency`` set to
    ``run``; returns the pipeline file, written as JSON (YAML's subset)."""
    partitions = [{"id": key, "name": f"Item {key}"} for key in instance_keys(args.n)]
    (root / "partitions.json").write_text(json.dumps(partitions), encoding="utf-8")
    (root / "agents").mkdir()
    (root / "agents" / "agent.md").write_text(BLUEPRINT, encoding="utf-8")
    provider = cast(Provider, args.provider)
    pipeline = {
        "name": "rate-limit",
        "concurrency": args.ceiling,
        "stages": [
            {
                "name": STAGE,
                "blueprint": "agents/agent.md",
                "partitions": {"from": "partitions.json", "key": "id"},
                "params": {"ITEM_ID": "{id}", "ITEM_NAME": "{name}"},
                "output": "out/{PARTITION_KEY}/",
                "runner": {
                    "type": provider,
                    "model": MODEL,
                    "base_url": f"{url}/v1" if provider == "openai" else url,
                    "api_key_env": KEY_ENV,
                    "max_turns": 4,
                    "max_tokens": MAX_TOKENS,
                },
                "concurrency": run if run == "auto" else int(run),
                "retries": 2,
                "timeout": f"{args.timeout:g}s",
            }
        ],
    }
    path = root / "pipeline.yaml"
    path.write_text(json.dumps(pipeline, indent=2), encoding="utf-8")
    return path


# -- the server, in its own process (--serve) ------------------------------------------------------


@dataclass
class ServerStats:
    """What the server process reported when it was stopped."""

    requests: int  # model requests, whatever their outcome
    rate_limited: int  # 429s its limits answered (concurrency, requests per minute)
    peak_in_flight: int
    input_tokens: int
    output_tokens: int
    cpu_s: float  # the server's CPU time while it was up (user + system)
    records: list[tuple[float, float, int]]  # per model request: arrival (epoch s), s, status


def serve(args: argparse.Namespace) -> None:
    """Run the loopback server until SIGINT or SIGTERM, then print what it saw as one JSON line.

    The first stdout line is the URL; the parent waits for it."""
    from phalanx.testing import LoopbackLLM  # noqa: PLC0415 - needs the optional aiohttp

    server = LoopbackLLM(
        latency=args.latency,
        max_concurrency=args.max_concurrency,
        requests_per_minute=args.rpm,
        seed=args.seed,
    )

    cpu = asyncio.run(serve_until_stopped(server))
    counters = server.counters
    records = [
        (round(record.started, 6), round(record.duration, 6), record.status or 0)
        for record in server.requests
        if record.api is not None and record.path.endswith(("/messages", "/completions"))
    ]
    summary = ServerStats(
        requests=counters.requests,
        rate_limited=counters.rate_limited,
        peak_in_flight=counters.peak_concurrency,
        input_tokens=counters.input_tokens,
        output_tokens=counters.output_tokens,
        cpu_s=cpu,
        records=records,
    )
    print(json.dumps(asdict(summary)), flush=True)


@contextlib.contextmanager
def loopback_server(args: argparse.Namespace) -> Iterator[tuple[str, list[ServerStats]]]:
    """Start a server process; yield its URL and a list that holds its stats once stopped.

    The server gets SIGINT (and is killed if it has not stopped 10 s later) however the block
    ends."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", "--seed", str(args.seed)]
    argv += ["--latency", str(args.latency), "--max-concurrency", str(args.max_concurrency)]
    argv += ["--rpm", str(args.rpm)]
    stats: list[ServerStats] = []
    with server_process(argv) as (url, last):
        yield url, stats
    if last:
        stats.append(ServerStats(**json.loads(last[0])))


# -- one run, in the orchestrator's own process (--child RUN) --------------------------------------


@dataclass
class Measured:
    """What one orchestrator process measured for one run."""

    run: str
    provider: str
    n: int
    started_epoch: float  # time.time() when the run started, to place the server's records
    wall_s: float  # load_pipeline + plan_pipeline + run_plan
    stage_wall_s: float
    cpu_s: float  # user + system CPU time of the whole process (every thread) during the run
    rss_peak_kib: int
    committed: int
    failed: int
    attempts: int
    failed_attempts: dict[str, int]  # cause -> failed attempts (retried or final)
    lane_events: list[tuple[float, str, int, int, float]]  # (s since start, reason, old, new, s)


def run_in_child(run: str, args: argparse.Namespace) -> Measured:
    """One run in this (fresh) process, against the server at ``args.url``."""
    importlib.import_module(args.provider)  # the SDK: imported before the run, not timed
    events: list[tuple[float, str, int, int, float]] = []
    started = time.perf_counter()

    def on_event(event: phalanx.Event) -> None:
        if isinstance(event, phalanx.LimitChanged) and event.lane is not None:
            since = time.perf_counter() - started
            events.append((round(since, 4), event.reason, event.old, event.new, 0.0))
        elif isinstance(event, phalanx.LanePaused):
            since = time.perf_counter() - started
            events.append((round(since, 4), "pause", 0, 0, round(event.seconds, 4)))

    async def go(pipeline_file: Path) -> phalanx.RunResult:
        plan = phalanx.plan_pipeline(phalanx.load_pipeline(pipeline_file))
        return await phalanx.run_plan(plan, on_event=on_event)

    with tempfile.TemporaryDirectory(prefix="phalanx-rate-limit-", dir=args.tmpdir) as tmp:
        pipeline_file = write_project(Path(tmp), args, args.url, run)
        cpu = cpu_seconds()
        epoch = time.time()
        started = time.perf_counter()
        result = asyncio.run(go(pipeline_file))
        wall = time.perf_counter() - started
        cpu = cpu_seconds() - cpu
    stage = result.stages[0]
    causes = Counter(
        attempt.cause or "?"
        for inst in stage.instances
        for attempt in inst.attempts
        if attempt.cause is not None
    )
    return Measured(
        run=run,
        provider=args.provider,
        n=args.n,
        started_epoch=epoch,
        wall_s=wall,
        stage_wall_s=stage.wall_s,
        cpu_s=cpu,
        rss_peak_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        committed=stage.committed,
        failed=stage.failed,
        attempts=sum(len(inst.attempts) for inst in stage.instances),
        failed_attempts=dict(causes),
        lane_events=events,
    )


def spawn(run: str, url: str, args: argparse.Namespace) -> Measured:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", run, "--url", url]
    argv += ["--provider", args.provider, "--n", str(args.n), "--ceiling", str(args.ceiling)]
    argv += ["--timeout", str(args.timeout), "--tmpdir", args.tmpdir]
    # The server is on 127.0.0.1: no proxy from the environment may get in between.
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env.pop(KEY_ENV, None)
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=CHILD_TIMEOUT_S, env=env
    )
    if done.returncode != 0:
        raise SystemExit(f"the run with concurrency {run} failed:\n{done.stderr}")
    return Measured(**json.loads(done.stdout.strip().splitlines()[-1]))


# -- what the figures mean -------------------------------------------------------------------------


def lower_bound(run: str, args: argparse.Namespace) -> float:
    """The shortest wall time in which a perfect client gets every request answered (see the
    module docstring)."""
    n: int = args.n
    latency: float = args.latency
    rpm: int = args.rpm
    most: int = args.max_concurrency
    requests = n * TURNS
    bound = max((requests - rpm) / (rpm / 60.0) + latency, requests * latency / most)
    if run != "auto" and int(run) < most:
        bound = max(bound, math.ceil(n / int(run)) * TURNS * latency)
    return bound


def allowed(wall: float, args: argparse.Namespace) -> float:
    """The most requests the server can admit in ``wall`` seconds: its full bucket plus the
    refill, and no more than its concurrency limit lets through at this latency."""
    rpm: int = args.rpm
    latency: float = args.latency
    most: int = args.max_concurrency
    return min(rpm + rpm / 60.0 * wall, most * wall / latency)


def refusal_kinds(
    records: Sequence[tuple[float, float, int]], args: argparse.Namespace
) -> tuple[int, int]:
    """The 429s split into (concurrency, rate). The server does not record why it refused, so
    both of its checks are replayed from the arrival times. The bucket: full at the first
    arrival, refilled at ``rpm / 60`` a second, one taken per answered request. A 429 is a
    refusal for the rate when the bucket held less than two requests at its arrival (one, plus
    one for the arrival times' jitter) and no more than ``max_concurrency`` requests were in
    flight (every request that had arrived and not yet been answered, itself included), for
    the concurrency otherwise. (Counting in flight at the arrival alone undercounts: the server
    checks after reading the body, by when later requests may have arrived.)"""
    capacity, per_s = float(args.rpm), args.rpm / 60.0
    ordered = sorted(records)
    level, last = capacity, ordered[0][0] if ordered else 0.0
    ends: list[float] = []  # a heap of the answer times of the requests in flight
    concurrency = rate = 0
    for arrival, duration, status in ordered:
        level, last = min(capacity, level + (arrival - last) * per_s), arrival
        while ends and ends[0] <= arrival:
            heapq.heappop(ends)
        heapq.heappush(ends, arrival + duration)
        if status == 200:
            level -= 1.0
        elif status == 429:
            if level < 2.0 and len(ends) <= args.max_concurrency:
                rate += 1
            else:
                concurrency += 1
    return concurrency, rate


@dataclass
class Steady:
    """When the initial burst ended, and the rate after it."""

    burst_end_s: float  # since the run started: the arrival that took the bucket below 5%
    answered_in_burst: int  # answered requests up to and including that one
    level: float  # what the bucket held just after it
    span_s: float  # from it to the last answered request's arrival
    answered: int  # answered requests that arrived after it
    rate: float  # answered / span_s
    allowance: float  # level + rpm / 60 * span_s: the most the server could admit in the span
    share: float  # answered / allowance
    in_flight: float  # the answered requests' time on the server in the span / span_s


def steady_state(
    answered: Sequence[tuple[float, float]], args: argparse.Namespace
) -> Steady | None:
    """Replay the server's bucket over the answered requests' ``(arrival, duration)``, arrivals
    in seconds since the run started, sorted: full at the first arrival, refilled at ``rpm /
    60`` a second, one taken per request. The burst ends when it first holds less than 5% of
    its capacity. ``None`` when it never does."""
    if not answered:
        return None
    capacity, per_s = float(args.rpm), args.rpm / 60.0
    level, last = capacity, answered[0][0]
    for index, (arrival, _) in enumerate(answered):
        level = min(capacity, level + (arrival - last) * per_s) - 1.0
        last = arrival
        if level < BURST_END * capacity:
            after = answered[index + 1 :]
            span = answered[-1][0] - arrival
            if span <= 0.0:
                return None
            allowance = max(0.0, level) + per_s * span
            return Steady(
                burst_end_s=arrival,
                answered_in_burst=index + 1,
                level=level,
                span_s=span,
                answered=len(after),
                rate=len(after) / span,
                allowance=allowance,
                share=len(after) / allowance,
                in_flight=sum(duration for _, duration in after) / span,
            )
    return None


@dataclass
class Row:
    """One run: what the orchestrator and the server measured, and what follows from it."""

    run: str
    provider: str
    n: int
    wall_s: float
    lower_bound_s: float
    stage_wall_s: float
    committed: int
    failed: int
    attempts: int
    failed_attempts: dict[str, int]
    requests: int  # model requests the server received
    answered: int  # ... answered 200
    refused: int  # ... answered 429
    refused_concurrency: int
    refused_rate: int
    other_statuses: dict[str, int]
    achieved_rate: float  # answered / wall
    allowed: float  # allowed(wall)
    share: float  # answered / allowed
    steady: Steady | None
    peak_in_flight: int
    limit_final: int | None  # the lane's last whole-number limit (auto), else the fixed count
    limit_max: int | None
    increases: int  # LimitChanged(reason=increase) events
    decreases: int
    pauses: int  # LanePaused events (a running pause's extensions are not announced)
    paused_announced_s: float  # the sum of the announced pauses' lengths
    cpu_us: float  # orchestrator CPU per instance
    server_cpu_us: float  # server CPU per request
    rss_peak_mib: float
    per_second: list[tuple[int, int]] = field(default_factory=list)  # (200s, 429s) per second
    lane_events: list[tuple[float, str, int, int, float]] = field(default_factory=list)


def summarize(measured: Measured, server: ServerStats, args: argparse.Namespace) -> Row:
    run = measured.run
    statuses = Counter(status for _, _, status in server.records)
    answered, refused = statuses.get(200, 0), statuses.get(429, 0)
    answered_times = sorted(
        (arrival - measured.started_epoch, duration)
        for arrival, duration, status in server.records
        if status == 200
    )
    concurrency, rate = refusal_kinds(server.records, args)
    steady = steady_state(answered_times, args)
    wall = measured.wall_s
    limit = allowed(wall, args)
    events = measured.lane_events
    moves = [event for event in events if event[1] != "pause"]
    fixed = None if run == "auto" else int(run)
    seconds = math.ceil(wall)
    per_second = [[0, 0] for _ in range(seconds + 1)]
    for arrival, _, status in server.records:
        second = min(seconds, max(0, int(arrival - measured.started_epoch)))
        if status == 200:
            per_second[second][0] += 1
        elif status == 429:
            per_second[second][1] += 1
    return Row(
        run=run,
        provider=measured.provider,
        n=measured.n,
        wall_s=wall,
        lower_bound_s=lower_bound(run, args),
        stage_wall_s=measured.stage_wall_s,
        committed=measured.committed,
        failed=measured.failed,
        attempts=measured.attempts,
        failed_attempts=measured.failed_attempts,
        requests=server.requests,
        answered=answered,
        refused=refused,
        refused_concurrency=concurrency,
        refused_rate=rate,
        other_statuses={str(s): c for s, c in statuses.items() if s not in {200, 429}},
        achieved_rate=answered / wall,
        allowed=limit,
        share=answered / limit,
        steady=steady,
        peak_in_flight=server.peak_in_flight,
        limit_final=fixed if fixed is not None else (moves[-1][3] if moves else START),
        limit_max=fixed if fixed is not None else max([START, *(event[3] for event in moves)]),
        increases=sum(1 for event in moves if event[1] == "increase"),
        decreases=sum(1 for event in moves if event[1] == "decrease"),
        pauses=sum(1 for event in events if event[1] == "pause"),
        paused_announced_s=sum(event[4] for event in events if event[1] == "pause"),
        cpu_us=measured.cpu_s / measured.n * 1e6,
        server_cpu_us=server.cpu_s / max(1, server.requests) * 1e6,
        rss_peak_mib=measured.rss_peak_kib / 1024,
        per_second=[(ok, no) for ok, no in per_second],
        lane_events=events,
    )


# -- the parent: runs the servers and the children, reports ----------------------------------------


def label(run: str) -> str:
    return f"concurrency: {run}"


def verdicts(rows: Sequence[Row]) -> list[str]:
    """The targets, for the ``auto`` run: no failed instance, >= 90% of the allowed rate."""
    lines = []
    for row in rows:
        if row.run != "auto":
            continue
        failed = "met" if row.failed == 0 else "NOT met"
        share = "met" if row.share >= TARGET_SHARE else "NOT met"
        lines.append(f"target, auto: zero failed instances: {row.failed} failed: {failed}")
        lines.append(
            f"target, auto: >= {TARGET_SHARE:.0%} of the allowed rate: {row.share:.1%}: {share}"
        )
    return lines


def print_table(env: dict[str, Any], args: argparse.Namespace, rows: list[Row]) -> None:
    print(
        f"phalanx {env['phalanx']} ({env['commit']}) · {args.provider} {env[args.provider]} · "
        f"aiohttp {env['aiohttp']} · {env['python']} · {env['cores']} cores "
        f"({env['usable_cores']} usable)"
    )
    print(
        f"N={args.n:,} two-turn instances · server: {args.max_concurrency} concurrent, "
        f"{args.rpm:,} requests/min ({args.rpm / 60:g}/s, bucket starts full), latency "
        f"{args.latency * 1e3:g} ms · run cap {args.ceiling} · retries 2 · timeout "
        f"{args.timeout:g} s"
    )
    print(f"temporary projects in {env['projects_in']} ({env['filesystem']})")
    print()
    print(
        f"{'run':<18}{'wall s':>8}{'bound s':>9}{'committed':>10}{'failed':>7}{'attempts':>9}"
        f"{'200':>6}{'429':>6}{'conc/rate':>11}{'req/s':>7}{'allowed':>9}{'share':>7}"
    )
    for row in rows:
        split = f"{row.refused_concurrency}/{row.refused_rate}"
        print(
            f"{label(row.run):<18}{row.wall_s:>8.1f}{row.lower_bound_s:>9.1f}{row.committed:>10}"
            f"{row.failed:>7}{row.attempts:>9}{row.answered:>6}{row.refused:>6}{split:>11}"
            f"{row.achieved_rate:>7.2f}{row.allowed:>9.0f}{row.share:>7.1%}"
        )
    print()
    print(
        f"{'run':<18}{'burst s':>8}{'req/s':>7}{'steady':>8}{'share':>7}{'in flight':>10}"
        f"{'limit':>9}{'up':>5}{'down':>5}{'pauses':>7}{'peak':>6}{'CPU':>7}{'RSS':>6}"
    )
    print(
        f"{'':<18}{'':>8}{'':>7}{'req/s':>8}{'':>7}{'mean':>10}{'end/max':>9}{'':>5}{'':>5}"
        f"{'':>7}{'flight':>6}{'µs/in':>7}{'MiB':>6}"
    )
    for row in rows:
        steady = row.steady
        if steady is None:
            phases = f"{'-':>8}{'-':>7}{'-':>8}{'-':>7}{'-':>10}"
        else:
            phases = (
                f"{steady.burst_end_s:>8.1f}{steady.answered_in_burst / steady.burst_end_s:>7.1f}"
                f"{steady.rate:>8.2f}{steady.share:>7.1%}{steady.in_flight:>10.1f}"
            )
        limits = f"{row.limit_final}/{row.limit_max}"
        print(
            f"{label(row.run):<18}{phases}{limits:>9}{row.increases:>5}{row.decreases:>5}"
            f"{row.pauses:>7}{row.peak_in_flight:>6}{row.cpu_us:>7.0f}{row.rss_peak_mib:>6.0f}"
        )
    print()
    for row in rows:
        if row.failed_attempts:
            causes = ", ".join(f"{cause} {count}" for cause, count in row.failed_attempts.items())
            print(f"{label(row.run)}: failed attempts by cause: {causes}")
        if row.other_statuses:
            print(f"{label(row.run)}: other statuses: {row.other_statuses}")
    print(
        "bound     = the shortest possible wall time (the rate, concurrency and fixed-cap bounds)"
    )
    print("429       = refused requests, split into concurrency / rate refusals (replayed)")
    print("req/s     = answered (200) requests / wall")
    print("allowed   = min(rpm + rpm/60 · wall, max_concurrency · wall / latency) requests")
    print("share     = answered / allowed")
    print("burst s   = when the server's bucket first fell below 5%; req/s = answered by then / it")
    print(
        "steady    = answered requests/s after the burst; share = of what the bucket allowed then"
    )
    print("in flight = the server's mean requests in flight after the burst")
    print("limit     = the lane's limit in conversations at the end / its highest (auto), or fixed")
    print("up, down  = LimitChanged increases, decreases; pauses = LanePaused events")
    print("peak flight = the most requests the server held at once (refused ones included)")
    print("CPU       = the orchestrator's CPU per instance; RSS = its peak RSS")
    print()
    for line in verdicts(rows):
        print(line)


def git_state() -> str:
    """The commit, and ``+dirty`` when ``src/`` has uncommitted changes (read-only git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH, read only
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],  # noqa: S607 - as above
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return commit + ("+dirty" if dirty else "")


def default_tmpdir() -> str:
    """``/dev/shm`` when it exists and is writable (the disk is not what is measured), else
    ``$TMPDIR``."""
    shm = Path("/dev/shm")  # noqa: S108 - tmpfs on purpose; each project is a fresh mkdtemp
    if shm.is_dir() and os.access(shm, os.W_OK):
        return str(shm)
    return tempfile.gettempdir()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="N two-turn LLM agents against a rate-limited loopback server: "
        "concurrency auto against fixed caps."
    )
    parser.add_argument("--n", type=int, default=2000, help="instances (default 2000)")
    parser.add_argument(
        "--latency", type=float, default=0.5, help="seconds per model request (default 0.5)"
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=50,
        help="requests the server answers at once; beyond, 429 (default 50)",
    )
    parser.add_argument(
        "--rpm", type=int, default=1200, help="the server's requests per minute (default 1200)"
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        type=run_setting,
        default=list(DEFAULT_RUNS),
        help="the stage's concurrency for each run: auto or a number (default: auto 256 7)",
    )
    parser.add_argument(
        "--ceiling",
        type=int,
        default=256,
        help="the pipeline's concurrency: the run's cap and auto's ceiling (default 256)",
    )
    parser.add_argument("--provider", choices=PROVIDERS, default="openai", help="default openai")
    parser.add_argument("--seed", type=int, default=7, help="the server's seed (default 7)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="per-attempt timeout, seconds (default 600)"
    )
    parser.add_argument(
        "--tmpdir", help="where the temporary projects go (default /dev/shm if writable)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", type=run_setting, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.n, args.max_concurrency, args.rpm, args.ceiling) < 1:
        parser.error("--n, --max-concurrency, --rpm and --ceiling must be positive")
    if args.latency <= 0 or args.timeout <= 0:
        parser.error("--latency and --timeout must be positive")
    if args.tmpdir is None:
        args.tmpdir = default_tmpdir()
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:
        serve(args)
        return
    if args.child is not None:
        print(json.dumps(asdict(run_in_child(args.child, args))))
        return
    env = {
        **environment(args.tmpdir),
        "filesystem": filesystem(args.tmpdir),
        "commit": git_state(),
    }
    rows: list[Row] = []
    for run in args.runs:
        with loopback_server(args) as (url, stats):
            measured = spawn(run, url, args)
        if not stats:
            raise SystemExit("the loopback server did not report what it saw")
        rows.append(summarize(measured, stats[0], args))
        if not args.json:
            print(
                f"  {label(run)}: {measured.wall_s:.1f} s, {measured.failed} failed",
                file=sys.stderr,
                flush=True,
            )
    if args.json:
        document = {
            "environment": env,
            "settings": {
                "n": args.n,
                "turns": TURNS,
                "latency_s": args.latency,
                "max_concurrency": args.max_concurrency,
                "requests_per_minute": args.rpm,
                "ceiling": args.ceiling,
                "runs": args.runs,
                "provider": args.provider,
                "seed": args.seed,
                "timeout_s": args.timeout,
                "retries": 2,
            },
            "targets": {"failed": 0, "share": TARGET_SHARE, "verdicts": verdicts(rows)},
            "results": [asdict(row) for row in rows],
        }
        print(json.dumps(document, indent=2))
    else:
        print_table(env, args, rows)


if __name__ == "__main__":
    main()

"""N two-turn LLM agents through the real SDKs against the loopback LLM server.

Each of the N instances is one partition of a one-stage pipeline whose runner is ``openai``
(``base_url: <server>/v1``) or ``anthropic`` (``base_url: <server>``), model ``loopback``. Its
blueprint declares two outputs, ``result.json`` and ``notes.md``, so the loopback server's default
model (``BlueprintModel``) answers the first request with two ``write_file`` calls and the second,
once their results came back, with a short text: two model requests per instance, each answered
after a latency of 300 ms (by default). phalanx runs the stage with ``concurrency`` 100,
``retries`` 2, transcripts, validation, commit and notes, as ``phalanx run`` would.

Three processes per run:

- the **server**: this script re-invoked with ``--serve``. It runs
  :class:`phalanx.testing.LoopbackLLM`, as ``phalanx loopback`` does, and when it gets SIGINT it
  prints what it saw (requests, statuses, tokens, how long it held the requests, its own CPU
  time) as one JSON line;
- the **orchestrator**: this script re-invoked with ``--child``, a fresh process per run, so its
  peak RSS and its CPU time are its own. It writes the project into a temporary folder and runs
  it with ``load_pipeline``, ``plan_pipeline`` and ``run_plan``;
- this **parent**, which starts both, collects what they measured and prints the table.

The **ideal makespan** is exact. With ``--sigma 0`` (the default) every request takes exactly
``--latency`` (the server's own ``latency`` knob), every instance ``2 * latency``, and a perfect
greedy scheduler with ``concurrency`` slots finishes N equal instances in ``ceil(N /
concurrency)`` waves. With ``--sigma > 0`` the latency of each request is drawn from a
log-normal distribution (median ``--latency``) seeded by the instance's key and the turn, and
slept by the server's model before it answers (the server's own ``latency_sigma`` draws in
arrival order, which the parent cannot know). The parent draws the same latencies and computes
the makespan of a greedy list scheduler over the instances in plan order.

A second kind of run, ``SDK + gather``, holds the same conversations (the same system prompt,
tool definitions and SDK client settings, a task message worded like the runners' but without
the list of readable files, so 3% fewer input tokens) from plain ``asyncio.gather`` under an
``asyncio.Semaphore``, with no files at all: what the SDK itself costs on this machine.

Run ``python benchmarks/llm_fanout.py --help`` for the options; ``benchmarks/README.md`` explains
every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import heapq
import importlib
import importlib.metadata
import json
import math
import os
import platform
import pstats
import random
import re
import resource
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, cast

import phalanx
from phalanx.runners.tools import FileTools

Provider = Literal["openai", "anthropic"]
PROVIDERS: tuple[Provider, ...] = ("openai", "anthropic")
Mode = Literal["phalanx", "sdk"]
MODES: tuple[Mode, ...] = ("phalanx", "sdk")
LABELS: dict[Mode, str] = {"phalanx": "phalanx run_plan", "sdk": "SDK + gather"}
TURNS = 2  # model requests per instance: the write_file calls, then the final answer
STAGE = "fanout"
MODEL = "loopback"
MAX_TOKENS = 1024
# The runners read their key from this variable. It is never set: with ``base_url`` set they
# send a placeholder, so no real key can reach the loopback server.
KEY_ENV = "PHALANX_LLM_FANOUT_NO_KEY"
PLACEHOLDER_KEY = "not-needed"
SERVER_START_TIMEOUT_S = 30.0
INSTANCE_KEY = re.compile(r"You are instance `([^`]+)`")
EXPECTED = ("result.json", "notes.md")

BLUEPRINT = """\
---
name: fanout-agent
description: Describe one item in two files.
params:
  ITEM_ID: The item's id.
  ITEM_NAME: The item's name.
outputs:
  result.json: A JSON object describing the item.
  notes.md: A few lines of notes on the item.
---
Describe item **{ITEM_NAME}** (`{ITEM_ID}`).

Write two files with the write_file tool: `result.json`, a JSON object with what you know about
the item, and `notes.md`, a few lines of Markdown notes. Then reply with one short sentence.
"""


# -- the workload ----------------------------------------------------------------------------------


def instance_keys(n: int) -> list[str]:
    """The partition keys in plan order (zero-padded, so sorting them keeps that order)."""
    return [f"p{i:05d}" for i in range(n)]


def request_latency(key: str, turn: int, args: argparse.Namespace) -> float:
    """The latency of request ``turn`` (0 or 1) of instance ``key``: fixed with sigma 0, else
    log-normal with median ``args.latency``, seeded by the seed, the key and the turn."""
    if args.sigma <= 0:
        return cast(float, args.latency)
    rng = random.Random(f"{args.seed}:{key}:{turn}")
    return rng.lognormvariate(math.log(args.latency), args.sigma)


def write_project(root: Path, args: argparse.Namespace, url: str) -> Path:
    """A one-stage pipeline over ``args.n`` partitions; returns the pipeline file, written as
    JSON (YAML's subset), so no quoting can go wrong."""
    partitions = [{"id": key, "name": f"Item {key}"} for key in instance_keys(args.n)]
    (root / "partitions.json").write_text(json.dumps(partitions), encoding="utf-8")
    (root / "agents").mkdir()
    (root / "agents" / "agent.md").write_text(BLUEPRINT, encoding="utf-8")
    provider = cast(Provider, args.provider[0])
    pipeline = {
        "name": "llm-fanout",
        "concurrency": args.concurrency,
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
                "concurrency": args.concurrency,
                "retries": 2,
                "timeout": f"{args.timeout:g}s",
            }
        ],
    }
    path = root / "pipeline.yaml"
    path.write_text(json.dumps(pipeline, indent=2), encoding="utf-8")
    return path


# -- the server, in its own process (--serve) ------------------------------------------------------


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serve(args: argparse.Namespace) -> None:
    """Run the loopback server until SIGINT or SIGTERM, then print what it saw as one JSON line.

    The first stdout line is the URL; the parent waits for it."""
    from phalanx.testing import (  # noqa: PLC0415 - needs the optional aiohttp
        BlueprintModel,
        Conversation,
        LoopbackLLM,
        Reply,
    )

    blueprint_model = BlueprintModel()

    async def drawn_latency_model(conversation: Conversation) -> Reply:
        found = INSTANCE_KEY.search(conversation.first_user_text)
        key = found.group(1) if found else ""
        await asyncio.sleep(request_latency(key, conversation.assistant_turns, args))
        return blueprint_model(conversation)

    if args.sigma > 0:
        server = LoopbackLLM(default_model=drawn_latency_model, seed=args.seed)
    else:
        server = LoopbackLLM(latency=args.latency, seed=args.seed)

    cpu = asyncio.run(serve_until_stopped(server))
    counters = server.counters
    statuses: dict[str, int] = {}
    held = 0.0
    for record in server.requests:
        if record.api is not None and record.path.endswith(("/messages", "/completions")):
            statuses[str(record.status)] = statuses.get(str(record.status), 0) + 1
            held += record.duration
    summary = ServerStats(
        requests=counters.requests,
        statuses=statuses,
        peak_in_flight=counters.peak_concurrency,
        held_s=held,
        input_tokens=counters.input_tokens,
        output_tokens=counters.output_tokens,
        cpu_s=cpu,
    )
    print(json.dumps(asdict(summary)), flush=True)


async def serve_until_stopped(server: Any) -> float:
    """Start ``server`` (a :class:`phalanx.testing.LoopbackLLM`), print its URL as the first
    stdout line, serve until SIGINT or SIGTERM; return the CPU seconds spent meanwhile."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        print(server.url, flush=True)
        cpu = cpu_seconds()
        await stop.wait()
        return cpu_seconds() - cpu


@dataclass
class ServerStats:
    """What the server process reported when it was stopped."""

    requests: int  # model requests, whatever their outcome
    statuses: dict[str, int]  # model requests per HTTP status
    peak_in_flight: int  # the most model requests in flight at once
    held_s: float  # the sum of the model requests' durations on the server
    input_tokens: int
    output_tokens: int
    cpu_s: float  # the server's CPU time while it was up (user + system)


@contextlib.contextmanager
def loopback_server(args: argparse.Namespace) -> Iterator[tuple[str, list[ServerStats]]]:
    """Start the server process; yield its URL and a list that holds its stats once stopped.

    The server gets SIGINT (and is killed if it has not stopped 10 s later) however the block
    ends."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve"]
    argv += ["--latency", str(args.latency), "--sigma", str(args.sigma), "--seed", str(args.seed)]
    stats: list[ServerStats] = []
    with server_process(argv) as (url, last):
        yield url, stats
    if last:
        stats.append(ServerStats(**json.loads(last[0])))


@contextlib.contextmanager
def server_process(argv: list[str]) -> Iterator[tuple[str, list[str]]]:
    """Start a ``--serve`` process; yield its URL and a list that holds its last stdout line
    (its report) once it has stopped cleanly.

    The server gets SIGINT (and is killed if it has not stopped 10 s later) however the block
    ends."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    last: list[str] = []
    try:
        pipe = cast(IO[str], process.stdout)  # set by stdout=PIPE
        with selectors.DefaultSelector() as selector:
            selector.register(pipe, selectors.EVENT_READ)
            if not selector.select(SERVER_START_TIMEOUT_S):
                raise SystemExit("the loopback server did not start within 30 s")
        url = pipe.readline().strip()
        if not url.startswith("http://"):
            raise SystemExit(f"the loopback server did not print its URL (got {url!r})")
        yield url, last
    finally:
        process.send_signal(signal.SIGINT)
        try:
            out, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise SystemExit("the loopback server did not stop within 10 s of SIGINT") from None
        lines = out.strip().splitlines()
        if process.returncode == 0 and lines:
            last.append(lines[-1])


# -- one run, in the orchestrator's own process (--child) ------------------------------------------


@dataclass
class Measured:
    """What one orchestrator process measured for one run."""

    mode: str
    provider: str
    n: int
    wall_s: float  # phalanx: load + plan + run_plan; sdk: the gather
    plan_s: float | None  # phalanx only: load_pipeline + plan_pipeline
    stage_wall_s: float | None  # phalanx only: the stage alone, from its StageResult
    cpu_s: float  # user + system CPU time of the whole process (all threads) during the run
    rss_before_kib: int  # peak RSS before the run: interpreter, phalanx, the SDK
    rss_peak_kib: int  # peak RSS at the end of the run
    committed: int
    failed: int
    attempts: int
    usage: dict[str, int | float]  # phalanx: RunResult.to_json()["usage"]; sdk: summed replies


@dataclass
class Outcome:
    """What a run hands back to its process: small, because ``asyncio.run`` formats the repr
    of the main task's result when it restores the SIGINT handler."""

    wall_s: float
    plan_s: float | None
    stage_wall_s: float | None
    committed: int
    failed: int
    attempts: int
    usage: dict[str, int | float]


async def run_phalanx(pipeline_file: Path) -> Outcome:
    started = time.perf_counter()
    plan = phalanx.plan_pipeline(phalanx.load_pipeline(pipeline_file))
    planned = time.perf_counter()
    result = await phalanx.run_plan(plan)
    wall = time.perf_counter() - started
    stage = result.stages[0]
    return Outcome(
        wall_s=wall,
        plan_s=planned - started,
        stage_wall_s=stage.wall_s,
        committed=stage.committed,
        failed=stage.failed,
        attempts=sum(len(inst.attempts) for inst in stage.instances),
        usage=cast(dict[str, int | float], result.to_json()["usage"]),
    )


def sdk_task_message(key: str, values: dict[str, object]) -> str:
    """The first user message, worded like the runners' (same instance line, parameters and
    expected files), so the requests have the same shape and nearly the same size."""
    params = [f"- {name}: {value}" for name, value in values.items() if name.isupper()]
    return "\n".join(
        [
            f"You are instance `{key}` of stage `{STAGE}` (attempt 1).",
            "",
            "Parameters:",
            *params,
            "",
            "Write every output file with the write_file tool; paths are relative to your "
            "output folder.",
            "Expected files: " + ", ".join(f"`{name}`" for name in EXPECTED) + ".",
            "",
            "When every file is written, reply with one short sentence and stop.",
        ]
    )


def tool_result(arguments: Any) -> str:
    """What phalanx's write_file answers, without writing anything."""
    content = str(arguments.get("content", "")) if isinstance(arguments, dict) else ""
    path = arguments.get("path", "?") if isinstance(arguments, dict) else "?"
    return f"wrote {path} ({len(content.encode())} bytes)"


async def run_sdk(pipeline_file: Path, provider: Provider, url: str, concurrency: int) -> Outcome:
    """The same conversations through the SDK alone: plain gather under a semaphore."""
    plan = phalanx.plan_pipeline(phalanx.load_pipeline(pipeline_file))
    instances = plan.stages[0].instances
    tools = FileTools(pipeline_file.parent, {}).definitions(provider)
    sdk: Any = importlib.import_module(provider)
    if provider == "openai":
        client = sdk.AsyncOpenAI(api_key=PLACEHOLDER_KEY, base_url=f"{url}/v1", max_retries=0)
    else:
        client = sdk.AsyncAnthropic(api_key=PLACEHOLDER_KEY, base_url=url, max_retries=0)
    slots = asyncio.Semaphore(concurrency)
    usage = {"requests": 0, "input_tokens": 0, "output_tokens": 0}

    async def openai_conversation(system: str, user: str) -> None:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ]
        for _turn in range(4):
            reply = await client.chat.completions.create(
                model=MODEL, messages=messages, tools=tools, max_tokens=MAX_TOKENS
            )
            usage["requests"] += 1
            usage["input_tokens"] += reply.usage.prompt_tokens
            usage["output_tokens"] += reply.usage.completion_tokens
            message = reply.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                return
            for call in message.tool_calls:
                result = tool_result(json.loads(call.function.arguments))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})

    async def anthropic_conversation(system: str, user: str) -> None:
        messages: list[dict[str, Any]] = [{"role": "user", "content": user}]
        for _turn in range(4):
            reply = await client.messages.create(
                model=MODEL, system=system, messages=messages, tools=tools, max_tokens=MAX_TOKENS
            )
            usage["requests"] += 1
            usage["input_tokens"] += reply.usage.input_tokens
            usage["output_tokens"] += reply.usage.output_tokens
            messages.append(
                {
                    "role": "assistant",
                    "content": [b.model_dump(exclude_none=True) for b in reply.content],
                }
            )
            calls = [block for block in reply.content if block.type == "tool_use"]
            if not calls:
                return
            results = [
                {"type": "tool_result", "tool_use_id": c.id, "content": tool_result(c.input)}
                for c in calls
            ]
            messages.append({"role": "user", "content": results})

    conversation = openai_conversation if provider == "openai" else anthropic_conversation

    async def one(instance: phalanx.InstancePlan) -> None:
        async with slots:
            await conversation(
                instance.prompt, sdk_task_message(instance.key, dict(instance.values))
            )

    started = time.perf_counter()
    try:
        await asyncio.gather(*(one(instance) for instance in instances))
    finally:
        await client.close()
    wall = time.perf_counter() - started
    n = len(instances)
    return Outcome(wall, None, None, n, 0, n, cast(dict[str, int | float], usage))


def child(mode: Mode, args: argparse.Namespace) -> Measured:
    """One run in this (fresh) process, against the server at ``args.url``."""
    provider = cast(Provider, args.provider[0])
    importlib.import_module(provider)  # the SDK: counted in the baseline, not in the run
    with tempfile.TemporaryDirectory(prefix="phalanx-llm-fanout-", dir=args.tmpdir) as tmp:
        pipeline_file = write_project(Path(tmp), args, args.url)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        profiler = cProfile.Profile() if args.profile else None
        cpu = cpu_seconds()
        if profiler is not None:
            profiler.enable()
        if mode == "phalanx":
            outcome = asyncio.run(run_phalanx(pipeline_file))
        else:
            outcome = asyncio.run(run_sdk(pipeline_file, provider, args.url, args.concurrency))
        if profiler is not None:
            profiler.disable()
        cpu = cpu_seconds() - cpu
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if outcome.committed != args.n:
            notes = Path(tmp) / "wip" / "notes.md"
            tail = notes.read_text("utf-8")[-3000:] if notes.exists() else ""
            raise SystemExit(
                f"{provider} N={args.n}: only {outcome.committed} of {args.n} committed "
                f"({outcome.failed} failed)\n{tail}"
            )
    if profiler is not None:
        profiler.dump_stats(args.profile)
    return Measured(
        mode=mode,
        provider=provider,
        n=args.n,
        wall_s=outcome.wall_s,
        plan_s=outcome.plan_s,
        stage_wall_s=outcome.stage_wall_s,
        cpu_s=cpu,
        rss_before_kib=rss_before,
        rss_peak_kib=rss_peak,
        committed=outcome.committed,
        failed=outcome.failed,
        attempts=outcome.attempts,
        usage=outcome.usage,
    )


def spawn(
    mode: Mode, provider: Provider, url: str, args: argparse.Namespace, profile: str | None
) -> Measured:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--url", url]
    argv += ["--provider", provider, "--n", str(args.n), "--concurrency", str(args.concurrency)]
    argv += ["--timeout", str(args.timeout)]
    if args.tmpdir:
        argv += ["--tmpdir", args.tmpdir]
    if profile:
        argv += ["--profile", profile]
    # The server is on 127.0.0.1: no proxy from the environment may get in between.
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env.pop(KEY_ENV, None)
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the {mode} run ({provider}, N={args.n}) failed:\n{done.stderr}")
    return Measured(**json.loads(done.stdout.strip().splitlines()[-1]))


# -- the ideal -------------------------------------------------------------------------------------


def ideal_makespan(args: argparse.Namespace) -> float:
    """The makespan of a perfect greedy list scheduler with ``concurrency`` slots: instances
    taken in plan order, each by the slot that frees first, holding it for exactly the sum of
    its requests' latencies. With sigma 0 this is ``ceil(N / concurrency) * 2 * latency``."""
    jobs = [
        sum(request_latency(key, turn, args) for turn in range(TURNS))
        for key in instance_keys(args.n)
    ]
    free = [0.0] * max(1, min(args.concurrency, len(jobs)))  # a heap of the times slots free up
    for job in jobs:
        heapq.heapreplace(free, free[0] + job)
    return max(free)


# -- the parent: runs the server and the children, reports -----------------------------------------


@dataclass
class Run:
    """One run: what the orchestrator and the server measured."""

    measured: Measured
    server: ServerStats


@dataclass
class Row:
    """The median over the repeats of one kind of run with one provider."""

    mode: str
    provider: str
    n: int
    concurrency: int
    repeats: int
    wall_s: float
    wall_min_s: float
    wall_max_s: float
    ideal_s: float
    ratio: float
    plan_s: float | None
    stage_wall_s: float | None
    requests: int  # model requests the server received (median run)
    requests_per_s: float
    ideal_requests_per_s: float
    instances_per_s: float
    mean_in_flight: float  # server-side request time / wall: requests in flight on average
    peak_in_flight: int  # the most requests the server had in flight at once
    server_request_ms: float  # mean time the server held a request
    cpu_us: float  # orchestrator CPU per instance
    server_cpu_us: float  # server CPU per request
    rss_before_mib: float
    rss_peak_mib: float
    rss_run_mib: float
    attempts: int
    usage: dict[str, int | float] = field(default_factory=dict)
    server_tokens: dict[str, int] = field(default_factory=dict)


def summarize(mode: Mode, provider: Provider, runs: list[Run], args: argparse.Namespace) -> Row:
    def med(values: Sequence[float]) -> float:
        return statistics.median(values)

    ideal = ideal_makespan(args)
    walls = [run.measured.wall_s for run in runs]
    middle = sorted(runs, key=lambda run: run.measured.wall_s)[(len(runs) - 1) // 2]
    plans = [run.measured.plan_s for run in runs if run.measured.plan_s is not None]
    stages = [run.measured.stage_wall_s for run in runs if run.measured.stage_wall_s is not None]
    return Row(
        mode=mode,
        provider=provider,
        n=args.n,
        concurrency=args.concurrency,
        repeats=len(runs),
        wall_s=med(walls),
        wall_min_s=min(walls),
        wall_max_s=max(walls),
        ideal_s=ideal,
        ratio=med(walls) / ideal,
        plan_s=med(plans) if plans else None,
        stage_wall_s=med(stages) if stages else None,
        requests=middle.server.requests,
        requests_per_s=med([run.server.requests / run.measured.wall_s for run in runs]),
        ideal_requests_per_s=args.n * TURNS / ideal,
        instances_per_s=med([args.n / run.measured.wall_s for run in runs]),
        mean_in_flight=med([run.server.held_s / run.measured.wall_s for run in runs]),
        peak_in_flight=max(run.server.peak_in_flight for run in runs),
        server_request_ms=med([run.server.held_s / max(1, run.server.requests) for run in runs])
        * 1e3,
        cpu_us=med([run.measured.cpu_s for run in runs]) / args.n * 1e6,
        server_cpu_us=med([run.server.cpu_s / max(1, run.server.requests) for run in runs]) * 1e6,
        rss_before_mib=med([run.measured.rss_before_kib for run in runs]) / 1024,
        rss_peak_mib=med([run.measured.rss_peak_kib for run in runs]) / 1024,
        rss_run_mib=med([run.measured.rss_peak_kib - run.measured.rss_before_kib for run in runs])
        / 1024,
        attempts=middle.measured.attempts,
        usage=middle.measured.usage,
        server_tokens={
            "input_tokens": middle.server.input_tokens,
            "output_tokens": middle.server.output_tokens,
        },
    )


def environment(tmpdir: str) -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "phalanx": version("phalanx"),
        "openai": version("openai"),
        "anthropic": version("anthropic"),
        "aiohttp": version("aiohttp"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "projects_in": tmpdir,
    }


def print_table(env: dict[str, Any], args: argparse.Namespace, rows: list[Row]) -> None:
    print(
        f"phalanx {env['phalanx']} · openai {env['openai']} · anthropic {env['anthropic']} · "
        f"aiohttp {env['aiohttp']} · {env['python']} · {env['cores']} cores "
        f"({env['usable_cores']} usable)"
    )
    latency = f"fixed {args.latency * 1e3:g} ms"
    if args.sigma > 0:
        latency = f"log-normal, median {args.latency * 1e3:g} ms, sigma {args.sigma:g}"
    print(
        f"N={args.n:,} two-turn instances · concurrency {args.concurrency} · latency {latency}, "
        f"seed {args.seed} · median of {args.repeat} run(s), each in fresh processes"
    )
    print(f"temporary projects in {env['projects_in']}")
    print()
    header = (
        f"{'provider':<10}{'run':<18}{'wall s':>8}{'(min-max)':>16}{'ideal s':>9}{'ratio':>8}"
        f"{'req/s':>8}{'inst/s':>8}{'in flight':>11}{'CPU':>8}{'peak RSS':>10}{'of which':>10}"
    )
    units = f"{'':<10}{'':<18}{'':>8}{'':>16}{'':>9}{'':>8}{'':>8}{'':>8}{'mean/peak':>11}"
    units += f"{'µs/inst':>8}{'MiB':>10}{'run MiB':>10}"
    print(header)
    print(units)
    for row in rows:
        spread = f"({row.wall_min_s:.3f}-{row.wall_max_s:.3f})"
        flight = f"{row.mean_in_flight:.0f}/{row.peak_in_flight}"
        print(
            f"{row.provider:<10}{LABELS[cast(Mode, row.mode)]:<18}{row.wall_s:>8.3f}{spread:>16}"
            f"{row.ideal_s:>9.3f}{row.ratio:>7.3f}x{row.requests_per_s:>8.1f}"
            f"{row.instances_per_s:>8.1f}{flight:>11}{row.cpu_us:>8.0f}{row.rss_peak_mib:>10.1f}"
            f"{row.rss_run_mib:>10.1f}"
        )
    print()
    for row in rows:
        usage = row.usage
        label = f"{row.provider}, {LABELS[cast(Mode, row.mode)]}"
        print(
            f"{label}: {row.requests:,} requests for {row.attempts:,} attempts "
            f"(ideal {row.ideal_requests_per_s:.1f} req/s); the server held each "
            f"{row.server_request_ms:.1f} ms on average and spent {row.server_cpu_us:.0f} µs "
            "of CPU on it"
        )
        timing = ""
        if row.plan_s is not None and row.stage_wall_s is not None:
            timing = f"plan {row.plan_s:.3f} s, stage {row.stage_wall_s:.3f} s; "
        source = "phalanx recorded" if row.mode == "phalanx" else "the replies said"
        print(
            f"    {timing}tokens {source}: {usage.get('requests', 0):,} requests, "
            f"input {usage.get('input_tokens', 0):,}, output {usage.get('output_tokens', 0):,}, "
            f"cache read {usage.get('cache_read_tokens', 0):,}, "
            f"cache write {usage.get('cache_write_tokens', 0):,} (server: input "
            f"{row.server_tokens.get('input_tokens', 0):,}, output "
            f"{row.server_tokens.get('output_tokens', 0):,})"
        )
    print()
    print("ideal     = makespan of a perfect greedy scheduler with the same slots and latencies")
    print("ratio     = wall / ideal; phalanx's wall = load_pipeline + plan_pipeline + run_plan")
    print("req/s     = model requests the server received / wall; inst/s = N / wall")
    print("in flight = requests the server held: on average (its request time / wall) and peak")
    print("CPU       = the orchestrator's CPU time (every thread, user + system) / N")
    print("peak RSS  = ru_maxrss of the orchestrator's own process; 'of which run' = its growth")


def print_profile(path: str) -> None:
    stats = pstats.Stats(path, stream=sys.stderr)
    stats.strip_dirs()
    print("\n-- the orchestrator's profile, by own time --", file=sys.stderr)
    stats.sort_stats("tottime").print_stats(30)
    print("-- by cumulative time --", file=sys.stderr)
    stats.sort_stats("cumulative").print_stats(50)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="N two-turn LLM agents through the real SDKs against the loopback server."
    )
    parser.add_argument("--n", type=int, default=1000, help="instances (default 1000)")
    parser.add_argument("--concurrency", type=int, default=100, help="slots (default 100)")
    parser.add_argument(
        "--latency", type=float, default=0.3, help="seconds per model request (default 0.3)"
    )
    parser.add_argument(
        "--sigma",
        type=float,
        default=0.0,
        help="log-normal spread of the latency, whose median is --latency (default 0: fixed)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the latencies (default 7)")
    parser.add_argument(
        "--provider",
        nargs="+",
        choices=PROVIDERS,
        default=list(PROVIDERS),
        help="runners to measure (default: openai anthropic)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="what to run: phalanx, sdk (default: both)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each kind (median shown)")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="per-attempt timeout, seconds (default 120)"
    )
    parser.add_argument("--tmpdir", help="where to make the temporary projects (default: $TMPDIR)")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="first, one extra run (the first provider and kind) under cProfile: save its "
        "stats to FILE and print them to stderr; its times are not used",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.concurrency < 1 or args.n < 1:
        parser.error("--repeat, --concurrency and --n must be positive")
    if args.latency <= 0 or args.sigma < 0 or args.timeout <= 0:
        parser.error("--latency and --timeout must be positive, --sigma not negative")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:
        serve(args)
        return
    if args.child is not None:
        print(json.dumps(asdict(child(args.child, args))))
        return
    env = environment(args.tmpdir or tempfile.gettempdir())
    kinds = [(provider, mode) for provider in args.provider for mode in args.modes]
    runs: dict[tuple[Provider, Mode], list[Run]] = {kind: [] for kind in kinds}
    if args.profile:  # an extra run, under cProfile: its times are not used
        provider, mode = kinds[0]
        with loopback_server(args) as (url, _):
            spawn(mode, provider, url, args, args.profile)
        print_profile(args.profile)
    for _ in range(args.repeat):
        for provider, mode in kinds:  # interleaved, so that drift hits every kind alike
            with loopback_server(args) as (url, stats):
                measured = spawn(mode, provider, url, args, None)
            if not stats:
                raise SystemExit("the loopback server did not report what it saw")
            runs[provider, mode].append(Run(measured, stats[0]))
            if not args.json:
                print(f"  {provider} {mode}: {measured.wall_s:.3f} s", file=sys.stderr, flush=True)
    rows = [summarize(mode, provider, runs[provider, mode], args) for provider, mode in kinds]
    if args.json:
        document = {
            "environment": env,
            "settings": {
                "n": args.n,
                "concurrency": args.concurrency,
                "latency_s": args.latency,
                "sigma": args.sigma,
                "seed": args.seed,
                "turns": TURNS,
                "repeat": args.repeat,
                "providers": args.provider,
                "modes": args.modes,
                "timeout_s": args.timeout,
            },
            "results": [asdict(row) for row in rows],
            "runs": [
                {**asdict(run.measured), "server": asdict(run.server)}
                for kind in kinds
                for run in runs[kind]
            ],
        }
        print(json.dumps(document, indent=2))
    else:
        print_table(env, args, rows)


if __name__ == "__main__":
    main()

"""Streaming fan-in against strict layers: the 55 -> 12 -> 4 -> 1 layering with skewed durations.

A four-stage pipeline is written into a fresh temporary project per run:

- ``functions``: a map over 55 partitions; each has a ``FEATURE`` (12 features of uneven sizes)
  and a ``DIMENSION`` (each feature belongs to one of 4 dimensions);
- ``features``: ``group_by: FEATURE`` over ``functions``, one instance per feature, reading its
  functions' outputs;
- ``dimensions``: ``group_by: DIMENSION`` over ``features``, one instance per dimension;
- ``overall``: ``single: true``, reading the four dimensions.

Every agent is an ``async def`` in a module written into the project (the ``python`` runner).
It sleeps a duration drawn per stage and key from a log-normal distribution (median 100 ms,
sigma 1.0: skewed; with the default seed the slowest of the 55 functions takes 808 ms), and
writes one small ``result.json`` naming its inputs. The durations are drawn once, in this
process, and written into the project, so both kinds of run see the same ones.

The same pipeline runs with both group stages at ``barrier: stream`` (phalanx's default: a
group starts as soon as its own members have ended) and at ``barrier: stage`` (strict layers: a
stage starts once the whole stage it reads has passed its barrier). Concurrency is 64, above
the widest stage, so slots are never what an instance waits for; only the dependencies are.

Two lower bounds, from the drawn durations, with unlimited slots and no overhead:

- the **critical path**: the longest chain function -> feature -> dimension -> overall, where a
  group starts when the last of its members ends. It is what streaming can reach at best;
- the **strict-layer bound**: the sum over the stages of their slowest instance. It is what
  strict layers can reach at best.

A group instance carries the fields its members all share, so a feature passes on the
``DIMENSION`` of its functions and the ``dimensions`` stage groups features by it. The layout
puts features of one size in one dimension (12 of 1 function, 8 of 2, 5 of 3, 2 of 6), which
makes the four dimensions very uneven.

Every (kind of run, repeat) runs in a fresh subprocess (this script re-invoked with
``--child``). Run ``python benchmarks/fan_in.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import asyncio
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from overhead import filesystem  # the same table cell as overhead.py's: one definition

import phalanx

RESULT_FILE = "result.json"
CONCURRENCY = 64
STAGES = ("functions", "features", "dimensions", "overall")
GROUP_STAGES = ("features", "dimensions")
# Features per dimension and functions per feature. A dimension is the set of features of one
# size (see the module docstring): 1 x 12 + 2 x 8 + 3 x 5 + 6 x 2 = 55 functions, 12 features.
LAYOUT: tuple[tuple[int, int], ...] = ((1, 12), (2, 8), (3, 5), (6, 2))

Barrier = Literal["stream", "stage"]
BARRIERS: tuple[Barrier, ...] = ("stream", "stage")

AGENT = '''"""The benchmark's agent: sleeps the duration drawn for its stage and key, then writes
one small file naming its inputs."""

import asyncio
import json
from pathlib import Path

DURATIONS = json.loads((Path(__file__).parent / "durations.json").read_text("utf-8"))


async def work(ctx):
    seconds = DURATIONS[ctx.stage][ctx.key]
    await asyncio.sleep(seconds)
    document = {"key": ctx.key, "seconds": seconds, "inputs": [ref.key for ref in ctx.inputs]}
    (ctx.output_dir / "result.json").write_text(json.dumps(document), encoding="utf-8")
'''

PIPELINE = """\
# The 55 -> 12 -> 4 -> 1 layering of benchmarks/fan_in.py (barrier: {barrier}).
name: fan-in
concurrency: 256
defaults:
  runner: {{type: python, function: "fan_in_agents:work"}}
  concurrency: {concurrency}
  retries: 0
stages:
  - name: functions
    partitions: {{from: functions.json, key: id}}
    output: data/functions/{{PARTITION_KEY}}/
    expect: [{result}]
  - name: features
    needs: [functions]
    group_by: FEATURE
    barrier: {barrier}
    # DIMENSION, which every function of a feature shares, is carried by the feature.
    output: data/features/{{FEATURE}}/
    expect: [{result}]
  - name: dimensions
    needs: [features]
    group_by: DIMENSION
    barrier: {barrier}
    output: data/dimensions/{{DIMENSION}}/
    expect: [{result}]
  - name: overall
    needs: [dimensions]
    single: true
    output: data/overall/
    expect: [{result}]
"""


# -- the workload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The functions (key -> feature), the features (key -> dimension) and every duration."""

    functions: dict[str, str]
    features: dict[str, str]
    durations: dict[str, dict[str, float]]  # stage -> key -> seconds


def draw_workload(args: argparse.Namespace) -> Workload:
    """The layering of ``LAYOUT``; the functions in a seeded shuffled order, each duration drawn
    from a generator seeded by the seed, the stage and the key."""
    features: dict[str, str] = {}
    members: list[str] = []
    for count, size in LAYOUT:
        for _ in range(count):
            feature = f"F{len(features) + 1:02d}"
            features[feature] = f"D{size}"
            members += [feature] * size
    random.Random(f"order:{args.seed}").shuffle(members)
    functions = {f"fn{i + 1:02d}": feature for i, feature in enumerate(members)}
    keys = {
        "functions": list(functions),
        "features": list(features),
        "dimensions": sorted(set(features.values()), key=lambda d: int(d[1:])),
        "overall": ["overall"],
    }
    durations = {
        stage: {
            key: random.Random(f"{args.seed}:{stage}:{key}").lognormvariate(
                math.log(args.median), args.sigma
            )
            for key in stage_keys
        }
        for stage, stage_keys in keys.items()
    }
    return Workload(functions, features, durations)


def critical_path(work: Workload) -> float:
    """The earliest end of ``overall`` with unlimited slots and no overhead, each group starting
    the moment its last member ends."""
    d = work.durations
    feature_end = {feature: d["features"][feature] for feature in work.features}
    for function, feature in work.functions.items():
        ended = d["functions"][function]  # every function starts at 0: slots are plenty
        feature_end[feature] = max(feature_end[feature], ended + d["features"][feature])
    dimension_end = dict.fromkeys(d["dimensions"], 0.0)
    for feature, dimension in work.features.items():
        dimension_end[dimension] = max(dimension_end[dimension], feature_end[feature])
    ends = [end + d["dimensions"][dimension] for dimension, end in dimension_end.items()]
    return max(ends) + d["overall"]["overall"]


def strict_bound(work: Workload) -> float:
    """The earliest end of ``overall`` under strict layers: the slowest instance of each stage,
    one stage after another."""
    return sum(max(work.durations[stage].values()) for stage in STAGES)


def write_project(root: Path, work: Workload, barrier: Barrier) -> Path:
    rows = [
        {"id": key, "FEATURE": feature, "DIMENSION": work.features[feature]}
        for key, feature in work.functions.items()
    ]
    (root / "functions.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    (root / "durations.json").write_text(json.dumps(work.durations), encoding="utf-8")
    (root / "fan_in_agents.py").write_text(AGENT, encoding="utf-8")
    path = root / "pipeline.yaml"
    text = PIPELINE.format(barrier=barrier, concurrency=CONCURRENCY, result=RESULT_FILE)
    path.write_text(text, encoding="utf-8")
    return path


# -- one run, in a child process -----------------------------------------------------------------


@dataclass
class StageFigures:
    """One stage of one run: its own timeline (seconds since the run was called) and, for a
    streaming group stage, ``StageResult.streaming``."""

    name: str
    committed: int
    wall_s: float  # StageResult.wall_s
    first_start_s: float
    last_end_s: float
    early_s: float | None
    started_early: int | None
    saved_s: float | None


@dataclass
class Measured:
    barrier: str
    wall_s: float  # from calling run_pipeline to its return, planning included
    run_wall_s: float  # RunResult.wall_s
    ok: bool
    stages: list[StageFigures]


async def run(pipeline: Path, barrier: Barrier) -> Measured:
    origin_wall = time.time()
    origin = time.perf_counter()
    result = await phalanx.run_pipeline(pipeline)
    wall = time.perf_counter() - origin
    stages = []
    for stage in result.stages:
        attempts = [a for inst in stage.instances for a in inst.attempts]
        flow = stage.streaming
        stages.append(
            StageFigures(
                name=stage.name,
                committed=stage.committed,
                wall_s=stage.wall_s,
                first_start_s=min(a.started for a in attempts) - origin_wall,
                last_end_s=max(a.started + a.duration_s for a in attempts) - origin_wall,
                early_s=flow.early_s if flow else None,
                started_early=flow.started_early if flow else None,
                saved_s=flow.saved_s if flow else None,
            )
        )
    return Measured(barrier, wall, result.wall_s, result.ok, stages)


def check_layering(project: Path, work: Workload) -> None:
    """Each feature and dimension read exactly the members the workload gave it."""
    expected = {
        "features": {
            f: sorted(k for k, v in work.functions.items() if v == f) for f in work.features
        },
        "dimensions": {
            d: sorted(f for f, v in work.features.items() if v == d)
            for d in work.durations["dimensions"]
        },
    }
    for stage, groups in expected.items():
        for key, members in groups.items():
            path = project / "data" / stage / key / RESULT_FILE
            inputs = sorted(json.loads(path.read_text("utf-8"))["inputs"])
            if inputs != members:
                raise SystemExit(f"{stage}/{key} read {inputs}, expected {members}")


def child(barrier: Barrier, args: argparse.Namespace) -> Measured:
    work = draw_workload(args)
    with tempfile.TemporaryDirectory(prefix="phalanx-fan-in-", dir=args.tmpdir) as tmp:
        project = Path(tmp)
        measured = asyncio.run(run(write_project(project, work, barrier), barrier))
        if not measured.ok:
            raise SystemExit(f"barrier {barrier}: the run did not succeed: {asdict(measured)}")
        check_layering(project, work)
    return measured


# -- the parent: runs the children, reports --------------------------------------------------------


def spawn(barrier: Barrier, args: argparse.Namespace) -> Measured:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", barrier]
    argv += ["--seed", str(args.seed), "--median", str(args.median), "--sigma", str(args.sigma)]
    if args.tmpdir:
        argv += ["--tmpdir", args.tmpdir]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"the barrier {barrier} run failed:\n{done.stderr}")
    document = json.loads(done.stdout.strip().splitlines()[-1])
    document["stages"] = [StageFigures(**stage) for stage in document["stages"]]
    return Measured(**document)


@dataclass
class Row:
    """The median of the repeats of one kind of run."""

    barrier: str
    wall_s: float
    wall_min_s: float
    wall_max_s: float
    over_critical_path: float
    over_strict_bound: float
    stages: list[StageFigures]  # each figure the median over the repeats


def median_stages(runs: list[Measured]) -> list[StageFigures]:
    def median(values: Sequence[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return float(statistics.median(present)) if present else None

    figures = []
    for i, first in enumerate(runs[0].stages):
        same = [run.stages[i] for run in runs]
        started = median([s.started_early for s in same])
        figures.append(
            StageFigures(
                name=first.name,
                committed=first.committed,
                wall_s=median([s.wall_s for s in same]) or 0.0,
                first_start_s=median([s.first_start_s for s in same]) or 0.0,
                last_end_s=median([s.last_end_s for s in same]) or 0.0,
                early_s=median([s.early_s for s in same]),
                started_early=None if started is None else round(started),
                saved_s=median([s.saved_s for s in same]),
            )
        )
    return figures


def summarize(barrier: Barrier, runs: list[Measured], bounds: dict[str, float]) -> Row:
    wall = float(statistics.median(r.wall_s for r in runs))
    return Row(
        barrier=barrier,
        wall_s=wall,
        wall_min_s=min(r.wall_s for r in runs),
        wall_max_s=max(r.wall_s for r in runs),
        over_critical_path=wall / bounds["critical_path_s"],
        over_strict_bound=wall / bounds["strict_bound_s"],
        stages=median_stages(runs),
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


def describe(work: Workload) -> list[str]:
    """The layering and the drawn durations, a line per stage."""
    lines = []
    for dimension in work.durations["dimensions"]:
        features = [f for f, d in work.features.items() if d == dimension]
        size = sum(1 for f in work.functions.values() if f in features)
        lines.append(f"  {dimension}: {len(features)} feature(s), {size} functions")
    for stage in STAGES:
        values = sorted(work.durations[stage].values())
        lines.append(
            f"  {stage:<11}{len(values):>3} instance(s), durations {values[0] * 1e3:.0f}-"
            f"{values[-1] * 1e3:.0f} ms (median {statistics.median(values) * 1e3:.0f} ms)"
        )
    return lines


def print_table(
    env: dict[str, Any],
    args: argparse.Namespace,
    work: Workload,
    bounds: dict[str, float],
    rows: list[Row],
) -> None:
    print(f"phalanx {env['phalanx']} · {env['python']} · {env['cores']} cores · {env['platform']}")
    print(
        f"55 -> 12 -> 4 -> 1 · durations log-normal, median {args.median * 1e3:g} ms, sigma "
        f"{args.sigma:g}, seed {args.seed} · concurrency {CONCURRENCY}"
    )
    print(f"temporary projects in {env['projects_in']} ({env['filesystem']})")
    print(f"median of {args.repeat} run(s) per kind, each in a fresh process")
    print()
    print("\n".join(describe(work)))
    print()
    print(
        f"critical path {bounds['critical_path_s']:.3f} s · strict-layer bound "
        f"{bounds['strict_bound_s']:.3f} s · best possible stream / strict "
        f"{bounds['critical_path_s'] / bounds['strict_bound_s']:.3f}"
    )
    print()
    print(
        f"{'barrier':<9}{'makespan s':>11}{'(min-max)':>16}{'/ critical path':>17}"
        f"{'/ strict bound':>16}"
    )
    for row in rows:
        spread = f"({row.wall_min_s:.3f}-{row.wall_max_s:.3f})"
        print(
            f"{row.barrier:<9}{row.wall_s:>11.3f}{spread:>16}{row.over_critical_path:>16.3f}x"
            f"{row.over_strict_bound:>15.3f}x"
        )
    by_barrier = {row.barrier: row for row in rows}
    if len(by_barrier) == len(BARRIERS):
        ratio = by_barrier["stream"].wall_s / by_barrier["stage"].wall_s
        gain = by_barrier["stage"].wall_s - by_barrier["stream"].wall_s
        print()
        print(f"stream / strict = {ratio:.3f} (streaming saved {gain:.3f} s)")
    print()
    print(
        f"{'barrier':<9}{'stage':<12}{'first start s':>14}{'last end s':>12}{'wall s':>9}"
        f"{'early_s':>9}{'started_early':>15}{'saved_s':>9}"
    )
    for row in rows:
        for stage in row.stages:
            early = "-" if stage.early_s is None else f"{stage.early_s:.3f}"
            count = "-" if stage.started_early is None else str(stage.started_early)
            saved = "-" if stage.saved_s is None else f"{stage.saved_s:.3f}"
            print(
                f"{row.barrier:<9}{stage.name:<12}{stage.first_start_s:>14.3f}"
                f"{stage.last_end_s:>12.3f}{stage.wall_s:>9.3f}{early:>9}{count:>15}{saved:>9}"
            )
    print()
    print("makespan      = from calling run_pipeline to its return (planning included)")
    print("critical path = longest chain function -> feature -> dimension -> overall of the")
    print("                drawn durations, each group starting when its last member ends")
    print("strict bound  = the sum over the stages of their slowest instance")
    print("first start, last end = of the stage's attempts, seconds since run_pipeline was called")
    print("early_s, started_early, saved_s = StageResult.streaming (stream only): how long before")
    print("                the upstream barrier the first group started, how many started before")
    print("                it, phalanx's estimate of the time saved against strict layers")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Streaming fan-in against strict layers: 55 -> 12 -> 4 -> 1, skewed."
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per kind; the median is shown")
    parser.add_argument("--seed", type=int, default=7, help="seed of the durations (default 7)")
    parser.add_argument(
        "--median", type=float, default=0.1, help="median duration, seconds (default 0.1)"
    )
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma (default 1.0)")
    parser.add_argument("--tmpdir", help="where to make the temporary projects (default: $TMPDIR)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--child", choices=BARRIERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.median <= 0 or args.sigma < 0:
        parser.error("--repeat and --median must be positive, --sigma >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(asdict(child(args.child, args))))
        return
    env = environment(args.tmpdir or tempfile.gettempdir())
    work = draw_workload(args)
    bounds = {"critical_path_s": critical_path(work), "strict_bound_s": strict_bound(work)}
    runs: dict[Barrier, list[Measured]] = {barrier: [] for barrier in BARRIERS}
    for _ in range(args.repeat):
        for barrier, measured in runs.items():  # interleaved: drift hits both kinds alike
            last = spawn(barrier, args)
            measured.append(last)
            if not args.json:
                print(f"  barrier {barrier}: {last.wall_s:.3f} s", file=sys.stderr, flush=True)
    rows = [summarize(barrier, measured, bounds) for barrier, measured in runs.items()]
    if args.json:
        document = {
            "environment": env,
            "settings": {
                "repeat": args.repeat,
                "seed": args.seed,
                "median_s": args.median,
                "sigma": args.sigma,
                "concurrency": CONCURRENCY,
            },
            "workload": asdict(work),
            "bounds": bounds,
            "results": [asdict(row) for row in rows],
            "runs": [asdict(run) for measured in runs.values() for run in measured],
        }
        print(json.dumps(document, indent=2))
    else:
        print_table(env, args, work, bounds, rows)


if __name__ == "__main__":
    main()

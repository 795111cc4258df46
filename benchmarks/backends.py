"""Backends compared: ``local``, ``process`` and ``ray`` on trivial and on CPU-bound agents.

Two workloads, each a one-stage pipeline written into a fresh temporary project, run once per
backend in a fresh subprocess (this script re-invoked with ``--child``):

- **trivial**: ``--trivial`` instances (10,000) of a ``python`` agent that writes one small
  file. What is measured is the backend's own cost per instance: throughput (instances a
  second) and wall time per instance.
- **cpu**: ``--cpu`` instances (1,000) of a ``python`` agent that runs a pure-Python loop for
  ``--work`` iterations (37.5 million, about a second of one core here). The same work for every
  backend. (Counting each agent's CPU time instead would not be: under ``local`` the agents'
  threads are charged for spinning on the interpreter's lock, so each would do less work.)
  Right before and right after each backend's run the script times one agent's work five
  times in its own process (this VM's speed drifts by tens of percent over minutes); the mean
  of the two medians is the ``seconds`` of the ideal, ``instances x seconds / cores``: every
  core busy all the time, no overhead. ``local`` runs a sync agent in a thread, so its agents
  share one interpreter lock.

Every run has validation, commit, manifests and the ledger on, as a user's would. The stage's
concurrency is 256 for every backend; ``process`` and ``ray`` cap it at what they can run at
once (their workers; the cluster's CPUs over the stage's ``num_cpus``). ``ray`` starts a local
single-node Ray instance for the run (``address: local``), with the machine's CPUs.

Run ``python benchmarks/backends.py --help`` for the options; ``--json FILE`` keeps the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

AGENTS = textwrap.dedent(
    """
    def trivial(ctx):
        (ctx.output_dir / "out.txt").write_text(ctx.key)


    def work(iterations):
        count = 0
        for _ in range(iterations):
            count += 1
        return count


    def cpu(ctx):
        count = work(int(ctx.params["iterations"]))
        (ctx.output_dir / "out.txt").write_text(str(count))
    """
)


def _calibrate(iterations: int) -> float:
    """Seconds one core takes for one agent's work here: the median of five timed runs of
    the very same loop, in this process, before any run starts."""
    namespace: dict[str, Any] = {}
    exec(AGENTS, namespace)  # noqa: S102 - our own agents' code, to time the very same loop
    work = namespace["work"]
    samples = []
    for _ in range(5):
        began = time.perf_counter()
        work(iterations)
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def _project(folder: Path, workload: str, count: int, iterations: int, backend: str) -> Path:
    items = [{"id": f"i{i:05d}", "iterations": iterations} for i in range(count)]
    backend_setting: dict[str, Any] = {"type": backend}
    if backend == "ray":
        backend_setting["address"] = "local"
    pipeline = {
        "name": f"backends-{workload}",
        "backend": backend_setting,
        "concurrency": 256,
        "stages": [
            {
                "name": workload,
                "partitions": items,
                "output": "out/{PARTITION_KEY}/",
                "expect": ["out.txt"],
                "runner": {"type": "python", "function": f"agents:{workload}"},
                "concurrency": 256,
                "timeout": 3600,
                "retries": 0,
            }
        ],
    }
    folder.mkdir(parents=True)
    (folder / "agents.py").write_text(AGENTS)
    path = folder / "pipeline.yaml"
    path.write_text(json.dumps(pipeline))
    return path


def _child(args: argparse.Namespace) -> None:
    from phalanx import run_pipeline  # noqa: PLC0415 - the child's own import, timed apart

    with tempfile.TemporaryDirectory(prefix="phalanx-bench-", dir=args.tmpdir) as folder:
        pipeline = _project(
            Path(folder) / "p", args.workload, args.count, args.iterations, args.backend
        )
        began = time.perf_counter()
        result = asyncio.run(run_pipeline(pipeline))
        wall = time.perf_counter() - began
        (stage,) = result.stages
        print(
            json.dumps(
                {
                    "backend": args.backend,
                    "workload": args.workload,
                    "count": args.count,
                    "committed": stage.committed,
                    "failed": stage.failed,
                    "wall_s": round(wall, 3),
                    "stage_wall_s": round(stage.wall_s, 3),
                }
            )
        )


def _row(
    backend: str, workload: str, count: int, seconds: float, iterations: int, tmpdir: str | None
) -> dict[str, Any]:
    argv = [
        sys.executable,
        __file__,
        "--child",
        "--backend",
        backend,
        "--workload",
        workload,
        "--count",
        str(count),
        "--iterations",
        str(iterations),
    ]
    if tmpdir:
        argv += ["--tmpdir", tmpdir]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{backend}/{workload} failed:\n{done.stderr[-3000:]}")
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    cores = os.cpu_count() or 1
    wall = row["stage_wall_s"]
    row["throughput_per_s"] = round(count / wall, 1)
    if workload == "trivial":
        row["ms_per_instance"] = round(wall / count * 1000, 3)
    else:
        ideal = count * seconds / cores
        row["ideal_s"] = round(ideal, 1)
        row["vs_ideal"] = round(wall / ideal, 3)
        row["overhead_ms_per_instance"] = round((wall - ideal) / count * cores * 1000, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trivial", type=int, default=10_000, help="trivial instances")
    parser.add_argument("--cpu", type=int, default=1_000, help="CPU-bound instances")
    parser.add_argument(
        "--work",
        type=int,
        default=37_500_000,
        help="loop iterations per CPU-bound agent (37.5 million: about a second of one core here)",
    )
    parser.add_argument("--backends", default="local,process,ray", help="comma-separated")
    parser.add_argument("--workloads", default="trivial,cpu", help="comma-separated")
    parser.add_argument("--tmpdir", help="where the projects go (default: the system's)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    seconds = _calibrate(args.work) if "cpu" in args.workloads else 0.0
    print(
        f"# {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores; trivial={args.trivial}, cpu={args.cpu} x {args.work:,} "
        f"iterations ({seconds:.3f} s of one core each, median of 5)"
    )
    rows = []
    for workload in args.workloads.split(","):
        count = args.trivial if workload == "trivial" else args.cpu
        for backend in args.backends.split(","):
            if workload == "cpu":  # this VM's speed drifts: time the work next to each run
                seconds = _calibrate(args.work)
            row = _row(backend, workload, count, seconds, args.work, args.tmpdir)
            if workload == "cpu":
                after = _calibrate(args.work)
                row["agent_s_before_after"] = [round(seconds, 3), round(after, 3)]
                # The ideal from the mean of the two timings, recomputed.
                mean = (seconds + after) / 2
                cores = os.cpu_count() or 1
                row["ideal_s"] = round(count * mean / cores, 1)
                row["vs_ideal"] = round(row["stage_wall_s"] / row["ideal_s"], 3)
                row["overhead_ms_per_instance"] = round(
                    (row["stage_wall_s"] - row["ideal_s"]) / count * cores * 1000, 1
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

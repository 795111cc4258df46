"""A command agent for the MCP server's tests: it waits at a gate the test opens.

Usage::

    python gate_agent.py GATE PIDS phalanx-test-child [KEY=fail ...]

phalanx runs it with ``PHALANX_KEY`` naming the partition. It records its pid in
``PIDS/KEY.pid`` (so the tests' clean-up can kill it; the ``phalanx-test-child`` argument
tells that clean-up the process is a test agent), then waits until the file ``GATE`` exists.
Then a key listed as ``KEY=fail`` writes three lines on stderr and exits 3; any other writes
``out.json`` and ``notes.md`` and exits 0. A test that never creates ``GATE`` has agents that
run until they are stopped: a slow run whose length no clock decides.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(args: list[str]) -> int:
    gate, pids = Path(args[0]), Path(args[1])
    failing = {arg.split("=", 1)[0] for arg in args[3:] if arg.endswith("=fail")}
    key = os.environ["PHALANX_KEY"]
    pids.mkdir(parents=True, exist_ok=True)
    temp = pids / f".{key}.{os.getpid()}.tmp"
    temp.write_text(str(os.getpid()), encoding="utf-8")
    temp.rename(pids / f"{key}.pid")
    while not gate.exists():
        time.sleep(0.02)
    if key in failing:
        print(f"agent {key}: looking for the data", file=sys.stderr)
        print(f"agent {key}: the data is not there", file=sys.stderr)
        print(f"agent {key}: giving up with code 3", file=sys.stderr)
        return 3
    Path("out.json").write_text(json.dumps({"key": key}), encoding="utf-8")
    Path("notes.md").write_text(f"# {key}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

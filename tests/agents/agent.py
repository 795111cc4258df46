"""A command agent for phalanx's tests: one behaviour per failure path, chosen per partition.

Usage::

    python agent.py [--pids DIR] [--delay SECONDS] [--wait-for N] DEFAULT [KEY=MODE ...]
    python agent.py argv ARG...

phalanx runs it with the attempt's staging folder as working directory and ``PHALANX_KEY``
naming the partition. The partition's mode is ``MODE`` from a matching ``KEY=MODE`` pair, else
``DEFAULT``. With ``--pids``, the agent first records its pid in ``DIR/KEY.pid`` (``hang`` and
``orphan`` add their child's pid) so that a test can check it is dead afterwards.

Modes:

``write``        out.json (``{"key": ..., "attempt": ...}``) and notes.md
``slow``         out.json, then sleep ``--delay`` seconds, then notes.md
``exit3``        a few lines on stderr, then exit code 3
``raise``        an uncaught exception (exit code 1 with a traceback)
``crash``        SIGKILL itself
``hang``         start a child process, then sleep for ever
``stubborn``     like ``hang`` but ignoring SIGTERM
``orphan``       start a child process, write the outputs and exit 0, leaving the child
``badjson``      out.json holding ``{not json``, and notes.md
``partial``      out.json only
``partialfail``  out.json, then exit code 1
``symlink``      out.json, notes.md and ``link`` -> ``/etc/hostname``
``fifo``         out.json, notes.md and a named pipe ``pipe``
``failafter``    wait until ``--wait-for`` pid files exist in ``--pids``, then exit code 3
``gather``       wait until ``--wait-for`` pid files exist in ``--pids``, then ``write``
                 (so it only ends once that many agents ran at the same time)
``waitonce``     on attempt 1, record the pid and sleep for ever (a test kills it); later
                 attempts ``write``

``argv`` writes argv.json (the remaining arguments as a JSON list) and stdin.bin (stdin, byte for
byte).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CHILD_MARK = "phalanx-test-child"
"""An argument every child carries, so the tests' clean-up recognises what it may kill."""


def _record(pids: Path | None, key: str, *numbers: int) -> None:
    if pids is None:
        return
    pids.mkdir(parents=True, exist_ok=True)
    temp = pids / f".{key}.{os.getpid()}.tmp"
    temp.write_text(" ".join(str(n) for n in numbers), encoding="utf-8")
    temp.rename(pids / f"{key}.pid")


def _child() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(1000)", CHILD_MARK],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _outputs(key: str, *, notes: bool = True) -> None:
    attempt = os.environ.get("PHALANX_ATTEMPT", "")
    Path("out.json").write_text(json.dumps({"key": key, "attempt": attempt}), encoding="utf-8")
    if notes:
        Path("notes.md").write_text(f"# {key}\n", encoding="utf-8")


def _sleep_for_ever() -> None:
    while True:
        time.sleep(3600)


def _slow(key: str, options: dict[str, str]) -> int:
    _outputs(key, notes=False)
    time.sleep(float(options.get("--delay", "0.5")))
    Path("notes.md").write_text(f"# {key}\n", encoding="utf-8")
    return 0


def _exit3(key: str, options: dict[str, str]) -> int:
    for n in range(1, 4):
        print(f"agent {key}: problem line {n}", file=sys.stderr)
    print(f"agent {key}: giving up with code 3", file=sys.stderr)
    return 3


def _raise(key: str, options: dict[str, str]) -> int:
    raise RuntimeError(f"agent {key} raised on purpose")


def _crash(key: str, options: dict[str, str]) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


def _badjson(key: str, options: dict[str, str]) -> int:
    Path("out.json").write_text("{not json", encoding="utf-8")
    Path("notes.md").write_text("fine\n", encoding="utf-8")
    return 0


def _partial(key: str, options: dict[str, str]) -> int:
    _outputs(key, notes=False)
    return 0


def _partialfail(key: str, options: dict[str, str]) -> int:
    _outputs(key, notes=False)
    return 1


def _symlink(key: str, options: dict[str, str]) -> int:
    _outputs(key)
    Path("link").symlink_to("/etc/hostname")
    return 0


def _fifo(key: str, options: dict[str, str]) -> int:
    _outputs(key)
    os.mkfifo("pipe")
    return 0


def _gathered(options: dict[str, str]) -> int:
    pids = Path(options["--pids"])
    want = int(options["--wait-for"])
    deadline = time.monotonic() + 30
    while len(list(pids.glob("*.pid"))) < want and time.monotonic() < deadline:
        time.sleep(0.01)
    return want


def _failafter(key: str, options: dict[str, str]) -> int:
    want = _gathered(options)
    print(f"agent {key}: failing after {want} agents started", file=sys.stderr)
    return 3


def _gather(key: str, options: dict[str, str]) -> int:
    want = _gathered(options)
    if len(list(Path(options["--pids"]).glob("*.pid"))) < want:
        print(f"agent {key}: fewer than {want} agents ever ran at once", file=sys.stderr)
        return 4
    _outputs(key)
    return 0


def _write(key: str, options: dict[str, str]) -> int:
    _outputs(key)
    return 0


MODES: dict[str, Callable[[str, dict[str, str]], int]] = {
    "write": _write,
    "slow": _slow,
    "exit3": _exit3,
    "raise": _raise,
    "crash": _crash,
    "badjson": _badjson,
    "partial": _partial,
    "partialfail": _partialfail,
    "symlink": _symlink,
    "fifo": _fifo,
    "failafter": _failafter,
    "gather": _gather,
}


def main(args: list[str]) -> int:
    if args and args[0] == "argv":
        Path("argv.json").write_text(json.dumps(args[1:]), encoding="utf-8")
        Path("stdin.bin").write_bytes(sys.stdin.buffer.read())
        return 0
    options: dict[str, str] = {}
    while args and args[0].startswith("--"):
        options[args[0]] = args[1]
        args = args[2:]
    pids = Path(options["--pids"]) if "--pids" in options else None
    key = os.environ["PHALANX_KEY"]
    modes = dict(arg.split("=", 1) for arg in args[1:])
    mode = modes.get(key, args[0])
    if mode in {"hang", "stubborn", "orphan"}:
        if mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = _child()
        _record(pids, key, os.getpid(), child.pid)
        if mode == "orphan":
            _outputs(key)
            return 0
        _sleep_for_ever()
    if mode == "waitonce":
        if os.environ.get("PHALANX_ATTEMPT") == "1":
            _record(pids, key, os.getpid())
            _sleep_for_ever()
        mode = "write"
    _record(pids, key, os.getpid())
    if mode not in MODES:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 99
    return MODES[mode](key, options)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

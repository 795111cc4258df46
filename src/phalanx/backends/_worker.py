"""The worker's side of the ``process`` and ``ray`` backends.

A worker rebuilds a stage's runner once (from its :class:`RunnerSpec`) and runs attempts with
it, each in an event loop of its own. :func:`pack` and :func:`unpack` carry a folder between
machines as a list of entries, keeping symlinks and special files as what they are, so that the
orchestrator's validation refuses them exactly as it would have on one machine.

Run as ``python -m phalanx.backends._worker FD``, this module is a ``process`` backend worker:
it serves attempts over the connection on file descriptor ``FD`` until told to stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal

from .._errors import InstanceError, RunnerError
from ..runners import InstanceContext, Runner
from ._base import RunnerSpec

__all__ = ["Entry", "pack", "run_attempt", "unpack"]

Entry = tuple[str, Literal["file", "dir", "link", "other"], bytes]
"""One path of a packed folder: its path relative to the folder (POSIX), its kind, and the
file's bytes or the link's target."""

_RUNNERS: dict[str, Runner] = {}


def run_attempt(
    spec: RunnerSpec, ctx: InstanceContext, project_dir: Path | None = None
) -> dict[str, int | float]:
    """Run one attempt with the stage's runner (built on first use) and return its usage.
    Raises the attempt's :class:`~phalanx.InstanceError`; anything else a runner raises is a
    :class:`~phalanx.RunnerError` with the traceback's tail."""
    runner = _RUNNERS.get(spec.key)
    if runner is None:
        runner = _RUNNERS[spec.key] = spec.build(project_dir)
    try:
        asyncio.run(runner.run(ctx))
    except InstanceError:
        raise
    except Exception as exc:  # a runner's own bug fails its attempt, not the worker
        tail = "".join(traceback.format_exception(exc)[-3:])
        raise RunnerError(f"{type(exc).__name__}: {exc}", detail=tail) from exc
    return ctx.usage.to_json()


def pack(folder: Path) -> list[Entry]:
    """Every path under ``folder``, in a stable order; nothing is followed."""
    entries: list[Entry] = []
    if not folder.is_dir():
        return entries
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in [*dirs, *sorted(files)]:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                entries.append((rel, "link", os.readlink(path).encode()))
            elif stat.S_ISDIR(mode):
                entries.append((rel, "dir", b""))
            elif stat.S_ISREG(mode):
                entries.append((rel, "file", path.read_bytes()))
            else:
                entries.append((rel, "other", b""))
    return entries


def unpack(entries: list[Entry], folder: Path) -> None:
    """Recreate packed entries under ``folder``. A special file (a pipe, a socket) becomes a
    named pipe, which validation refuses as it would the original."""
    folder.mkdir(parents=True, exist_ok=True)
    root = folder.resolve()
    for rel, kind, data in entries:
        path = folder / rel
        if root not in (path.parent.resolve(), *path.parent.resolve().parents):
            raise RunnerError(f"a worker returned a path outside the attempt's folder: {rel!r}")
        if kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "file":
            path.write_bytes(data)
        elif kind == "link":
            path.symlink_to(data.decode())
        else:
            os.mkfifo(path)


def _serve(conn: Connection) -> None:
    """A process worker's loop: ``(spec, ctx)`` in, ``("ok", usage)`` or ``("error", exc)``
    out; ``None`` or a closed connection ends it."""
    # Ctrl-C reaches the whole process group; the orchestrator decides what stops, and stops a
    # worker by killing it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        spec, ctx = message
        reply: tuple[str, object]
        try:
            reply = ("ok", run_attempt(spec, ctx))
        except InstanceError as exc:
            reply = ("error", exc)
        except BaseException as exc:  # SystemExit in a runner ends the attempt, not the worker
            tail = "".join(traceback.format_exception(exc)[-3:])
            reply = ("error", RunnerError(f"{type(exc).__name__}: {exc}", detail=tail))
        try:
            conn.send(reply)
        except (TypeError, AttributeError, ValueError) as exc:  # an error that does not pickle
            conn.send(("error", RunnerError(f"{reply[1]!r} (not picklable: {exc})")))


def main(argv: list[str]) -> None:
    """``python -m phalanx.backends._worker FD``."""
    fd = int(argv[0])
    conn = Connection(fd)
    try:
        _serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1:])

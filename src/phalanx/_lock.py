"""One orchestrator per project: an advisory lock on ``.phalanx/lock``.

The lock is an ``flock`` held on an open file for as long as the run lasts. The kernel drops it
when the process ends in any way, ``kill -9`` included, so a crashed run never leaves the
project locked. The file itself stays; it holds a description of the holder (run id, pid, start
time, pipeline) for the error the next run prints.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from pathlib import Path

from ._errors import ProjectBusyError

__all__ = ["ProjectLock"]

LOCK_FILE = "lock"


class ProjectLock:
    """The held lock of one project's state folder; :meth:`release` gives it back."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path, *, run_id: str, pipeline: str) -> ProjectLock:
        """Take the lock or raise :class:`ProjectBusyError` naming the run that holds it."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise ProjectBusyError(
                f"{state_dir.parent}: another phalanx run is working in this project ({holder}); "
                "wait for it to finish, or stop it (Ctrl-C or kill PID) and then "
                "`phalanx resume` it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {
            "run_id": run_id,
            "pid": os.getpid(),
            "pipeline": pipeline,
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        """Give the lock back; safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the flock


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (
            f"run {info['run_id']} of pipeline {info['pipeline']!r}, pid {info['pid']}, "
            f"started {info['started']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that is just starting"

"""The ``process`` backend: a pool of worker processes for CPU-bound ``python`` agents.

In the ``local`` backend a ``python`` agent shares the orchestrator's interpreter, so agents
that compute rather than wait take turns on one core. Here each attempt runs in a worker
process of its own (one per core by default), started as ``python -m
phalanx.backends._worker`` with a socket pair to the orchestrator: no ``fork`` of a process
that holds threads and an event loop, and no re-import of the user's main module.

A worker that dies under an attempt (killed, segfault, ``os._exit``) fails that attempt with
:class:`~phalanx.WorkerLost`, which the stage's retry policy retries; a new worker takes its
place. An attempt cancelled (timeout, abort, Ctrl-C) kills its worker, so CPU-bound code that
never yields still stops. Other runner types run in the orchestrator, as with ``local``: they
are processes or network calls already.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from .._config import Resources
from .._errors import WorkerLost
from .._usage import Usage
from ..runners import InstanceContext, Runner
from ._base import Backend, RunnerSpec, portable

__all__ = ["ProcessBackend"]

_STOP_GRACE_S = 2.0


class _Worker:
    """One worker process and the orchestrator's end of its connection."""

    def __init__(self) -> None:
        mine, theirs = socket.socketpair()
        try:
            # Our own module with our own interpreter; no shell.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "phalanx.backends._worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(mine.detach())

    @property
    def pid(self) -> int:
        return self.process.pid

    def receive(self) -> Any:
        """The worker's reply; ``None`` when it died (the connection closed)."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    def reap(self) -> str:
        """Wait for the dead worker; how it ended, in words."""
        code = self.process.wait()
        self.conn.close()
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

    def stop(self) -> None:
        """Ask the worker to finish, kill it if it does not."""
        with contextlib.suppress(OSError):
            self.conn.send(None)
        try:
            self.process.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait()
        self.conn.close()


class ProcessBackend(Backend):
    """A pool of ``config.workers`` processes (default: one per core), started as needed."""

    name = "process"
    remote_runners = frozenset({"python"})

    async def open(self) -> None:
        self.size = self.config.workers or os.cpu_count() or 1
        self.idle: list[_Worker] = []
        self.alive = 0
        self.changed = asyncio.Condition()
        # One thread per worker waits for its reply; the loop never blocks on a pipe.
        self.threads = ThreadPoolExecutor(self.size, thread_name_prefix="phalanx-process")

    def capacity(self, resources: Resources) -> int | None:
        del resources
        return self.size

    async def execute(
        self, runner: Runner, spec: RunnerSpec, ctx: InstanceContext, resources: Resources
    ) -> None:
        del runner, resources
        worker = await self._take()
        loop = asyncio.get_running_loop()
        healthy = False
        try:
            try:
                worker.conn.send((spec, portable(ctx)))
            except OSError:
                reply = None  # it died while idle
            else:
                receiving = loop.run_in_executor(self.threads, worker.receive)
                try:
                    reply = await asyncio.shield(receiving)
                except asyncio.CancelledError:
                    worker.kill()  # the reply thread sees the connection close and returns
                    await asyncio.wait({receiving})
                    raise
            if reply is None:
                how = await asyncio.to_thread(worker.reap)
                raise WorkerLost(
                    f"the worker process (pid {worker.pid}) {how} while running the attempt"
                )
            healthy = True
        finally:
            await self._give(worker if healthy else None, dead=worker)
        kind, value = reply
        if kind == "ok":
            ctx.usage.add(Usage(**value))
            return
        raise value

    async def _take(self) -> _Worker:
        async with self.changed:
            while not self.idle and self.alive >= self.size:
                await self.changed.wait()
            if self.idle:
                return self.idle.pop()
            self.alive += 1
        starting = asyncio.ensure_future(asyncio.to_thread(_Worker))
        try:
            return await asyncio.shield(starting)
        except BaseException:
            await asyncio.wait({starting})
            if not starting.cancelled() and starting.exception() is None:
                await asyncio.to_thread(starting.result().stop)
            async with self.changed:
                self.alive -= 1
                self.changed.notify()
            raise

    async def _give(self, worker: _Worker | None, *, dead: _Worker) -> None:
        """Put a healthy worker back; retire a dead or killed one (a new one starts when
        next needed). The pool's count is settled before anything is awaited that a second
        cancellation could interrupt."""
        async with self.changed:
            if worker is None:
                self.alive -= 1
            else:
                self.idle.append(worker)
            self.changed.notify()
        if worker is None:
            dead.kill()
            await asyncio.to_thread(_quietly_reap, dead)

    async def aclose(self) -> None:
        idle, self.idle = self.idle, []
        await asyncio.gather(*(asyncio.to_thread(worker.stop) for worker in idle))
        self.threads.shutdown(wait=True)


def _quietly_reap(worker: _Worker) -> None:
    with contextlib.suppress(OSError):
        worker.reap()

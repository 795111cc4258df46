"""The ``ray`` backend: each attempt runs as a Ray task on a cluster.

The orchestrator (scheduler, ledger, data bus) stays where ``phalanx run`` runs; Ray only
executes. An attempt becomes one task with the stage's resources (``num_cpus``, ``memory``,
custom resources). On the worker node the runner works in a scratch folder: the upstream
outputs the instance reads travel with the task, and what the agent wrote (and its log files)
travels back, to be validated and committed in the orchestrator's data bus as on one machine.
With ``shared_fs: true`` the workers read and write the project's folder in place instead.

Ray's own retries are off (``max_retries=0``): a lost node or a killed worker process fails the
attempt with :class:`~phalanx.WorkerLost`, and phalanx's retry policy runs it again, on any node
Ray picks, with the cause recorded. Cancelling an attempt (timeout, abort, Ctrl-C) cancels its
task: a ``python`` agent's worker is killed at once; a process agent's task first gets a
``KeyboardInterrupt``, so the runner stops its processes, and its worker is killed if it has
not ended within a few seconds.

``python``, ``command`` and ``claude-code`` runners execute on the cluster; the API runners
(``anthropic``, ``openai``) stay in the orchestrator, where their rate-limit lanes are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from .._config import Resources
from .._errors import BackendUnavailable, InstanceError, RunnerError, WorkerLost
from .._usage import Usage
from ..runners import InputRef, InstanceContext, Runner
from ._base import Backend, RunnerSpec, portable
from ._worker import Entry, pack, run_attempt, unpack

__all__ = ["RayBackend"]

_CANCEL_GRACE_S = 5.0
"""How long a cancelled attempt's task gets to stop its agent before its worker is killed."""


def _ray_attempt(payload: dict[str, Any]) -> dict[str, Any]:
    """The Ray task: run one attempt on this node; return what it wrote, its logs, its usage
    and its error (returned, not raised, so that a failed attempt's logs travel too)."""
    spec: RunnerSpec = payload["spec"]
    ctx: InstanceContext = payload["ctx"]
    where = {"node": socket.gethostname()}
    if payload["shared_fs"]:
        try:
            usage = run_attempt(spec, ctx)
        except InstanceError as exc:
            return where | {"error": exc, "usage": ctx.usage.to_json()}
        return where | {"usage": usage}
    scratch = Path(tempfile.mkdtemp(prefix="phalanx-attempt-"))
    try:
        # The project as planned, when this node sees it (one machine, or a shared
        # filesystem); else the working directory Ray's runtime environment unpacked.
        project = spec.project_dir if spec.project_dir.is_dir() else Path.cwd()
        inputs = []
        for index, (ref, entries) in enumerate(zip(ctx.inputs, payload["inputs"], strict=True)):
            folder = scratch / "inputs" / str(index)
            unpack(entries, folder)
            inputs.append(InputRef(ref.stage, ref.key, folder))
        out, logs = scratch / "out", scratch / "logs"
        out.mkdir()
        logs.mkdir()
        here = replace(ctx, output_dir=out, log_dir=logs, inputs=tuple(inputs), project_dir=project)
        error: InstanceError | None = None
        try:
            run_attempt(spec, here, project)
        except InstanceError as exc:
            error = exc
        return where | {
            "files": [] if error is not None else pack(out),
            "logs": pack(logs),
            "usage": here.usage.to_json(),
            "error": error,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class RayBackend(Backend):
    """Connects to the cluster ``config.address`` names (or starts one, ``local``)."""

    name = "ray"
    remote_runners = frozenset({"python", "command", "claude-code"})

    async def open(self) -> None:
        try:
            import ray  # noqa: PLC0415 - optional dependency, loaded only when used
        except ImportError as exc:
            raise BackendUnavailable(
                f"backend ray: Ray is not installed ({exc}): pip install 'phalanx[ray]'"
            ) from None
        self.ray = ray
        address = self.config.address
        await asyncio.to_thread(_reachable, address, self.config.connect_timeout)
        self.owner = not ray.is_initialized()
        if self.owner:
            options: dict[str, Any] = {
                "logging_level": logging.ERROR,
                "log_to_driver": False,
                "namespace": "phalanx",
            }
            if self.config.runtime_env:
                options["runtime_env"] = _runtime_env(self.config.runtime_env, self.project_dir)
            if address == "local":
                options["include_dashboard"] = False
            else:
                options["address"] = address
            try:
                await asyncio.to_thread(ray.init, **options)
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
                raise BackendUnavailable(
                    f"backend ray: cannot connect to the Ray cluster at {address!r}: {exc}. "
                    "Start one (`ray start --head`), or set backend.address to its head's "
                    "HOST:PORT (or ray://HOST:PORT for Ray Client)"
                ) from None
        self.task = ray.remote(max_retries=0)(_ray_attempt)
        resources = await asyncio.to_thread(ray.cluster_resources)
        self.cpus = float(resources.get("CPU", 0.0))

    def capacity(self, resources: Resources) -> int | None:
        if resources.num_cpus <= 0:
            return None
        return max(1, int(self.cpus / resources.num_cpus + 1e-9))

    async def execute(
        self, runner: Runner, spec: RunnerSpec, ctx: InstanceContext, resources: Resources
    ) -> None:
        del runner
        ray = self.ray
        shared = self.config.shared_fs
        inputs: list[list[Entry]] = []
        if not shared and ctx.inputs:
            inputs = await asyncio.to_thread(lambda: [pack(ref.path) for ref in ctx.inputs])
        payload = {"spec": spec, "ctx": portable(ctx), "inputs": inputs, "shared_fs": shared}
        options: dict[str, Any] = {"num_cpus": resources.num_cpus}
        if resources.memory is not None:
            options["memory"] = resources.memory
        if resources.custom:
            options["resources"] = dict(resources.custom)
        ref = self.task.options(**options).remote(payload)
        try:
            result: dict[str, Any] = await ref
        except asyncio.CancelledError:
            # A python agent runs in a thread of the worker that only the worker's end
            # stops; a process agent's runner stops its process group when interrupted.
            await self._cancel(ref, gently=spec.config.type != "python")
            raise
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, InstanceError):
                raise cause from None
            raise RunnerError(f"the Ray task failed: {cause!r}", detail=str(exc)[-2000:]) from None
        except (
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.ObjectLostError,
            ray.exceptions.LocalRayletDiedError,
            ray.exceptions.RaySystemError,
            ray.exceptions.TaskCancelledError,
        ) as exc:
            raise WorkerLost(
                f"the Ray worker running the attempt was lost: {type(exc).__name__}",
                detail=str(exc)[-2000:],
            ) from None
        ctx.usage.add(Usage(**result["usage"]))
        if not shared:
            await asyncio.to_thread(_land, result, ctx)
        if result.get("error") is not None:
            raise result["error"]

    async def _cancel(self, ref: Any, *, gently: bool) -> None:
        """Stop a cancelled attempt's task. ``gently``: first a ``KeyboardInterrupt`` in the
        worker, so that the runner stops its agent's process group; then, or else, by killing
        the worker process."""
        ray = self.ray
        if gently:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=False)
            if await _ended_within(ref, _CANCEL_GRACE_S):
                return
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
        await _ended_within(ref, _CANCEL_GRACE_S)

    async def aclose(self) -> None:
        if getattr(self, "owner", False):
            await asyncio.to_thread(self.ray.shutdown)


async def _ended_within(ref: Any, seconds: float) -> bool:
    """Whether the task of ``ref`` ended (in any way) within ``seconds``; the wait is
    cancelled and awaited otherwise, so nothing is left pending."""

    async def settled() -> None:
        with contextlib.suppress(Exception):
            await ref

    waiting = asyncio.ensure_future(settled())
    done, _ = await asyncio.wait({waiting}, timeout=seconds)
    if not done:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
    return bool(done)


def _land(result: dict[str, Any], ctx: InstanceContext) -> None:
    """Write what the worker returned into the attempt's staging and log folders."""
    unpack(result.get("files") or [], ctx.output_dir)
    logs = result.get("logs") or []
    if logs:
        unpack(logs, ctx.log_dir)


def _reachable(address: str, timeout: float) -> None:
    """Fail fast, with a clear message, when a HOST:PORT address has nobody listening."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise BackendUnavailable(
            f"backend.address {address!r} is not auto, local, HOST:PORT or ray://HOST:PORT"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise BackendUnavailable(
            f"backend ray: nothing answers at {address!r} ({exc.strerror or exc}): start the "
            "cluster's head (`ray start --head`) or fix backend.address"
        ) from None


def _runtime_env(env: dict[str, Any], project_dir: Path) -> dict[str, Any]:
    """The runtime environment with a relative ``working_dir`` taken from the project."""
    env = dict(env)
    working = env.get("working_dir")
    if isinstance(working, str) and "://" not in working and not Path(working).is_absolute():
        env["working_dir"] = str((project_dir / working).resolve())
    return env

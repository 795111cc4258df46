"""The ``python`` runner: a callable in the user's project, ``module:function``.

The callable receives the :class:`~phalanx.InstanceContext`. An ``async def`` is awaited on
the event loop; a plain function runs in a worker thread so it cannot stall the others. It
signals failure by raising; whatever it raises becomes a failed attempt carrying the exception's
type, message and the last lines of its traceback.

A thread cannot be killed: on timeout phalanx stops waiting for a sync function and discards its
staging folder, but the function itself runs on until it returns (in a daemon thread, so it
neither holds up its siblings nor keeps the process alive at exit). Write long-running agents as
``async def`` (or use the ``command`` runner) when timeouts matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import InstanceError, RunnerError, UsageError
from .._imports import forget_foreign
from ._base import InstanceContext, Runner

__all__ = ["PythonRunner", "import_callable"]


def import_callable(spec: str, *, project_dir: Path, what: str) -> Callable[..., Any]:
    """Import ``module:attr.path`` with ``project_dir`` first on ``sys.path``.

    Raises :class:`UsageError` naming ``what`` (where the spec was written) and the fix.
    """
    module_name, _, attr_path = spec.partition(":")
    root = str(project_dir)
    forget_foreign(module_name, project_dir)
    sys.path.insert(0, root)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(
            f"{what}: cannot import module {module_name!r} for {spec!r}: {exc}; the module must "
            f"be importable from the project directory {project_dir} or installed"
        ) from exc
    finally:
        if sys.path and sys.path[0] == root:
            del sys.path[0]
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(
                f"{what}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise UsageError(f"{what}: {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


class PythonRunner(Runner):
    """Calls a user function with the instance context; see the module docstring."""

    type = "python"

    def __init__(self, function: Callable[[InstanceContext], Any]) -> None:
        self.function = function
        self.is_async = inspect.iscoroutinefunction(function)

    async def run(self, ctx: InstanceContext) -> None:
        try:
            if self.is_async:
                await self.function(ctx)
            else:
                await _in_daemon_thread(self.function, ctx)
        except InstanceError:
            raise
        except (Exception, SystemExit) as exc:  # sys.exit() in an agent ends only its attempt
            tail = "".join(traceback.format_exception(exc)[-3:])
            raise RunnerError(f"{type(exc).__name__}: {exc}", detail=tail) from exc


async def _in_daemon_thread(
    function: Callable[[InstanceContext], Any], ctx: InstanceContext
) -> None:
    """Run a sync agent in a thread of its own.

    Not a pool: a pool's few threads would cap the stage's concurrency, and an agent stuck past
    its timeout would hold a pool thread for good, starving its siblings and keeping the process
    from exiting. A daemon thread per attempt costs tens of microseconds and neither.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return  # cancelled (timeout, abort, stop) while the thread ran on
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def target() -> None:
        error: BaseException | None = None
        try:
            contextvars.copy_context().run(function, ctx)
        except BaseException as exc:  # handed to the awaiting task, which decides
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed while the thread ran on
            loop.call_soon_threadsafe(settle, error)

    thread = threading.Thread(target=target, name=f"phalanx:{ctx.stage}/{ctx.key}", daemon=True)
    thread.start()
    await done

"""The ``local`` backend: every attempt runs in the orchestrator's event loop (the default)."""

from __future__ import annotations

from .._config import Resources
from ..runners import InstanceContext, Runner
from ._base import Backend, RunnerSpec

__all__ = ["LocalBackend"]


class LocalBackend(Backend):
    """Runs the runner in place: ``python`` agents as coroutines (or in a thread each),
    ``command`` and ``claude-code`` agents as child processes, API runners as HTTP calls."""

    name = "local"

    def executes(self, runner_type: str) -> bool:
        del runner_type
        return True

    async def execute(
        self, runner: Runner, spec: RunnerSpec, ctx: InstanceContext, resources: Resources
    ) -> None:
        del spec, resources
        await runner.run(ctx)

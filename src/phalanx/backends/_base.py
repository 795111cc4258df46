"""What every backend shares: the small base class and how a worker rebuilds a stage's runner.

A backend executes attempts; it does not decide anything. The scheduler admits an attempt
(stage slots, resource guard, lanes, budgets), makes its staging folder, and hands the backend
the stage's runner, the recipe to rebuild that runner elsewhere (:class:`RunnerSpec`), the
attempt's context and the stage's resources. When :meth:`Backend.execute` returns, the
attempt's outputs are in ``ctx.output_dir`` on the orchestrator's machine, where the scheduler
validates and commits them as always; when it raises, the attempt failed (a dead worker is a
:class:`~phalanx.WorkerLost`, retried by the stage's policy).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from .._config import BackendConfig, Resources, RunnerConfig
from .._prices import Price
from ..runners import InstanceContext, Runner, create_runner
from ..runners._base import Gate

__all__ = ["Backend", "RunnerSpec", "portable"]


@dataclass(frozen=True)
class RunnerSpec:
    """How to build a stage's runner in another process: the arguments the scheduler gave
    :func:`~phalanx.runners.create_runner`. Pickles; ``key`` names it in a worker's cache."""

    key: str
    config: RunnerConfig
    project_dir: Path
    where: str
    blueprint_model: str | None = None
    reference: bool = False
    prices: Mapping[str, Price] = field(default_factory=dict)
    blueprint_tools: tuple[str, ...] = ()

    def build(self, project_dir: Path | None = None) -> Runner:
        """The runner, with the project at ``project_dir`` (default: where it was planned)."""
        return create_runner(
            self.config,
            project_dir=project_dir or self.project_dir,
            where=self.where,
            blueprint_model=self.blueprint_model,
            reference=self.reference,
            prices=dict(self.prices),
            blueprint_tools=self.blueprint_tools,
        )


def portable(ctx: InstanceContext) -> InstanceContext:
    """``ctx`` as it can cross a process boundary: plain parameters, the direct gate (the
    lanes live in the orchestrator; runners that need them never leave it), fresh usage."""
    return replace(ctx, params=dict(ctx.params), gate=Gate(), usage=type(ctx.usage)())


class Backend(abc.ABC):
    """Where attempts execute. One instance per run and backend type; the scheduler calls
    :meth:`open` before the first attempt, :meth:`aclose` after the last.

    ``remote_runners`` are the runner types the backend executes itself; an attempt of any
    other type runs in the orchestrator's event loop, as with the ``local`` backend (the API
    runners stay there: their calls go through the orchestrator's rate-limit lanes).
    """

    name: ClassVar[str]
    remote_runners: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: BackendConfig, *, project_dir: Path) -> None:
        self.config = config
        self.project_dir = project_dir

    def executes(self, runner_type: str) -> bool:
        """Whether attempts of ``runner_type`` run on this backend (else in the orchestrator)."""
        return runner_type in self.remote_runners

    async def open(self) -> None:  # noqa: B027 - optional hook: local needs nothing
        """Start or connect to what executes the attempts. Raises
        :class:`~phalanx.BackendUnavailable` (a usage error) when that is not possible."""

    def capacity(self, resources: Resources) -> int | None:
        """How many attempts needing ``resources`` can run at once (after :meth:`open`), or
        ``None`` for no bound of the backend's own. A stage's limit is capped by it, so that
        no attempt's timeout runs while it waits for a worker."""
        del resources
        return None

    @abc.abstractmethod
    async def execute(
        self, runner: Runner, spec: RunnerSpec, ctx: InstanceContext, resources: Resources
    ) -> None:
        """Run one attempt to its end; raise an :class:`~phalanx.InstanceError` when it
        failed. Honours cancellation: whatever runs the attempt is stopped before the
        cancellation propagates."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook: local holds nothing
        """Stop the workers or disconnect. Called once, after every attempt ended."""

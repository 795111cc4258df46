"""The Python API: :func:`run_pipeline` for a pipeline file, :func:`fan_out` for one stage."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from ._config import Backoff, Defaults, ExpectSpec, PipelineConfig, StageConfig
from ._events import EventHandler
from ._partitions import PartitionSource
from ._pipeline import Pipeline, Plan, load_pipeline, plan_pipeline
from ._results import RunResult, StageResult
from ._scheduler import RunHandle, run_plan
from .runners import InstanceContext, Runner
from .runners.python import PythonRunner

__all__ = ["fan_out", "run_pipeline"]

Agent = Callable[[InstanceContext], Awaitable[object]] | Callable[[InstanceContext], object]


async def run_pipeline(
    pipeline: str | Path | Pipeline,
    *,
    stages: Iterable[str] | None = None,
    only: Iterable[str] | None = None,
    concurrency: int | None = None,
    on_event: EventHandler | None = None,
    handle: RunHandle | None = None,
) -> RunResult:
    """Load, plan and run a pipeline file.

    ``stages`` runs only those stages (the outputs of the others are read from disk);
    ``only`` runs only the instances with those keys; ``concurrency`` overrides every stage's
    limit. Raises :class:`~phalanx.UsageError` (before anything runs) for bad input; failures
    of instances are not raised but reported in the :class:`~phalanx.RunResult`.
    """
    loaded = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline)
    plan = plan_pipeline(loaded, stages=stages, only=only)
    return await run_plan(plan, concurrency=concurrency, on_event=on_event, handle=handle)


async def fan_out(
    partitions: Iterable[Mapping[str, Any] | str | int] | PartitionSource,
    agent: Agent | Runner,
    *,
    output: str,
    project_dir: str | Path = ".",
    name: str = "fan-out",
    key: str | None = None,
    blueprint: str | None = None,
    prompt: Literal["inline", "reference"] = "inline",
    params: Mapping[str, object] | None = None,
    expect: Iterable[str] | Mapping[str, ExpectSpec] = (),
    concurrency: int = 16,
    retries: int = 2,
    timeout: float = 600.0,  # noqa: ASYNC109 - per attempt, like the stage field, not for this call
    backoff: Backoff | None = None,
    min_success: float = 1.0,
    on_failure: Literal["continue", "abort"] = "continue",
    notes: str = "wip/notes.md",
    on_event: EventHandler | None = None,
    handle: RunHandle | None = None,
) -> StageResult:
    """Run one stage without a pipeline file: ``agent`` once per partition, in parallel.

    ``agent`` is a function taking an :class:`~phalanx.InstanceContext` (``async def`` or
    plain; it writes its files into ``ctx.output_dir``) or a :class:`~phalanx.Runner`.
    ``output`` is the output folder template, relative to ``project_dir``, e.g.
    ``"out/{PARTITION_KEY}/"``. Everything else means what the same stage field means in a
    pipeline file. Returns the stage's result after its barrier; instance failures are in it,
    not raised.
    """
    plan = _one_stage_plan(
        partitions,
        output=output,
        project_dir=project_dir,
        name=name,
        key=key,
        blueprint=blueprint,
        prompt=prompt,
        params=params,
        expect=expect,
        concurrency=concurrency,
        retries=retries,
        timeout=timeout,
        backoff=backoff,
        min_success=min_success,
        on_failure=on_failure,
        notes=notes,
    )
    runner = agent if isinstance(agent, Runner) else PythonRunner(agent)
    result = await run_plan(plan, on_event=on_event, handle=handle, runners={name: runner})
    return result.stages[0]


def _one_stage_plan(
    partitions: Iterable[Mapping[str, Any] | str | int] | PartitionSource,
    *,
    output: str,
    project_dir: str | Path,
    name: str,
    key: str | None,
    blueprint: str | None,
    prompt: Literal["inline", "reference"],
    params: Mapping[str, object] | None,
    expect: Iterable[str] | Mapping[str, ExpectSpec],
    concurrency: int,
    retries: int,
    timeout: float,
    backoff: Backoff | None,
    min_success: float,
    on_failure: Literal["continue", "abort"],
    notes: str,
) -> Plan:
    source = (
        partitions
        if isinstance(partitions, PartitionSource)
        else PartitionSource.model_validate({"items": list(partitions), "key": key})
    )
    stage = StageConfig(
        name=name,
        blueprint=blueprint,
        prompt=prompt,
        partitions=source,
        params=dict(params or {}),
        output=output,
        expect=dict(expect) if isinstance(expect, Mapping) else dict.fromkeys(expect, ExpectSpec()),
        # The runner object is passed to the scheduler directly; this only labels the stage.
        runner={"type": "python", "function": "phalanx:fan_out"},
        concurrency=concurrency,
        retries=retries,
        timeout=timeout,
        backoff=backoff or Backoff(),
        min_success=min_success,
        on_failure=on_failure,
    )
    config = PipelineConfig(
        name=name,
        defaults=Defaults(),
        concurrency=concurrency,
        notes=notes,
        stages=[stage],
    )
    root = Path(project_dir).resolve()
    pipeline = Pipeline(config, root / "fan_out()", root, "fan_out()")
    return plan_pipeline(pipeline)

"""The Python API: :func:`run_pipeline` for a pipeline file, :func:`resume_run` to continue an
interrupted one, :func:`fan_out` for one stage."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from ._config import (
    Backoff,
    Budget,
    Defaults,
    ExpectSpec,
    PipelineConfig,
    Speculate,
    StageConfig,
)
from ._errors import UsageError
from ._events import EventHandler
from ._ledger import RunRow, find_ledger, open_ledger
from ._partitions import PartitionSource
from ._pipeline import STATE_DIR, Pipeline, Plan, load_pipeline, plan_pipeline
from ._results import RunResult, StageResult
from ._scheduler import RunHandle, run_plan
from .runners import InstanceContext, Runner
from .runners.python import PythonRunner

__all__ = ["fan_out", "resume_plan", "resume_run", "run_options", "run_pipeline"]

Agent = Callable[[InstanceContext], Awaitable[object]] | Callable[[InstanceContext], object]


async def run_pipeline(
    pipeline: str | Path | Pipeline,
    *,
    stages: Iterable[str] | None = None,
    only: Iterable[str] | None = None,
    concurrency: int | None = None,
    on_event: EventHandler | None = None,
    handle: RunHandle | None = None,
    force: bool = False,
    force_stages: Iterable[str] = (),
    rerun_failed: bool = False,
    budget: Budget | None = None,
    backend: str | None = None,
) -> RunResult:
    """Load, plan and run a pipeline file.

    ``stages`` runs only those stages (the outputs of the others are read from disk);
    ``only`` runs only the instances with those keys; ``concurrency`` overrides every stage's
    limit. An instance whose committed output is up to date is not run again (``cached``)
    unless ``force`` (or its stage is in ``force_stages``); one that failed before with the
    same inputs is retried only with ``rerun_failed``. ``budget`` replaces the pipeline's run
    budget; ``backend`` (``local``, ``process``, ``ray``) replaces the pipeline's backend
    for every stage. Raises :class:`~phalanx.UsageError`
    (before anything runs) for bad input, :class:`~phalanx.ProjectBusyError` when another run
    holds the project; failures of instances are not raised but reported in the
    :class:`~phalanx.RunResult`.
    """
    loaded = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline)
    plan = plan_pipeline(loaded, stages=stages, only=only)
    return await run_plan(
        plan,
        concurrency=concurrency,
        on_event=on_event,
        handle=handle,
        force=force,
        force_stages=force_stages,
        rerun_failed=rerun_failed,
        options=run_options(loaded, stages=stages, only=only, concurrency=concurrency)
        | ({"backend": backend} if backend else {}),
        budget=budget,
        backend=backend,
    )


# Runner settings that may carry a credential are not written to the ledger; a resume asks for
# them again.
_SECRET = re.compile(r"key|token|secret|password|env", re.IGNORECASE)


def run_options(
    pipeline: Pipeline,
    *,
    stages: Iterable[str] | None = None,
    only: Iterable[str] | None = None,
    concurrency: int | None = None,
    settings: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """How a run was started, as the ledger keeps it for ``phalanx resume``."""
    kept = {name: value for name, value in (settings or {}).items() if not _SECRET.search(name)}
    return {
        "pipeline": str(pipeline.path),
        "stages": sorted(stages) if stages is not None else None,
        "only": sorted(only) if only is not None else None,
        "concurrency": concurrency,
        "settings": kept,
        "withheld": sorted(set(settings or {}) - set(kept)),
    }


def resume_plan(
    project_dir: str | Path = ".",
    run_id: str | None = None,
    *,
    settings: Mapping[str, object] | None = None,
) -> tuple[RunRow, Plan]:
    """The ledger's record of a run (the newest when ``run_id`` is ``None``; a unique prefix
    works) and its plan made again from the pipeline file and the options it was started
    with. ``settings`` are runner settings to apply on top of the recorded ones."""
    ledger = open_ledger(find_ledger(Path(project_dir)).parent)
    try:
        row = ledger.get_run(run_id)
    finally:
        ledger.close()
    if row is None:
        raise UsageError(f"{Path(project_dir) / STATE_DIR}: no run recorded yet; nothing to resume")
    options = row.options
    recorded = options.get("settings")
    merged = {**(recorded if isinstance(recorded, dict) else {}), **(settings or {})}
    path = str(options.get("pipeline") or row.pipeline_file)
    if path.endswith("fan_out()"):
        raise UsageError(f"run {row.id} was started by fan_out(); call fan_out() again instead")
    loaded = load_pipeline(path, runner_settings=merged or None)
    stages = options.get("stages")
    only = options.get("only")
    plan = plan_pipeline(
        loaded,
        stages=[str(s) for s in stages] if isinstance(stages, list) else None,
        only=[str(k) for k in only] if isinstance(only, list) else None,
    )
    return row, plan


async def resume_run(
    project_dir: str | Path = ".",
    run_id: str | None = None,
    *,
    rerun_failed: bool = False,
    settings: Mapping[str, object] | None = None,
    on_event: EventHandler | None = None,
    handle: RunHandle | None = None,
    budget: Budget | None = None,
) -> RunResult:
    """Continue an interrupted run (the newest when ``run_id`` is ``None``) under its own id.

    Its committed instances are kept (found from their manifests on disk, so an instance whose
    commit the ledger never heard of is not run again); its in-flight attempts are discarded
    and run again; its failed instances are retried only with ``rerun_failed``. Instances a
    spent budget skipped run now, under ``budget`` (or the pipeline's), counted afresh.
    """
    row, plan = resume_plan(project_dir, run_id, settings=settings)
    concurrency = row.options.get("concurrency")
    return await run_plan(
        plan,
        run_id=row.id,
        resume=True,
        rerun_failed=rerun_failed,
        concurrency=concurrency if isinstance(concurrency, int) else None,
        on_event=on_event,
        handle=handle,
        options=row.options,
        budget=budget,
    )


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
    timeout: float | str = 600.0,  # noqa: ASYNC109 - per attempt, like the stage field, not for this call
    backoff: Backoff | None = None,
    min_success: float = 1.0,
    on_failure: Literal["continue", "abort"] = "continue",
    notes: str = "wip/notes.md",
    on_event: EventHandler | None = None,
    handle: RunHandle | None = None,
    force: bool = False,
    waves: int | None = None,
    priority_barrier: bool = False,
    budget: Budget | None = None,
    speculate: Speculate | None = None,
) -> StageResult:
    """Run one stage without a pipeline file: ``agent`` once per partition, in parallel.

    ``agent`` is a function taking an :class:`~phalanx.InstanceContext` (``async def`` or
    plain; it writes its files into ``ctx.output_dir``) or a :class:`~phalanx.Runner`.
    ``output`` is the output folder template, relative to ``project_dir``, e.g.
    ``"out/{PARTITION_KEY}/"``. Everything else means what the same stage field means in a
    pipeline file. Returns the stage's result after its barrier; instance failures are in it,
    not raised.

    As in a pipeline, a partition whose output is up to date is not run again (``cached``).
    The fingerprint sees the partitions, ``params``, the prompt and the source file of
    ``agent``, not the values a closure or a bound object holds: pass ``force=True`` to run
    every partition regardless.
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
        waves=waves,
        priority_barrier=priority_barrier,
        budget=budget,
        speculate=speculate,
    )
    runner = agent if isinstance(agent, Runner) else PythonRunner(agent)
    result = await run_plan(
        plan, on_event=on_event, handle=handle, runners={name: runner}, force=force
    )
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
    timeout: float | str,
    backoff: Backoff | None,
    min_success: float,
    on_failure: Literal["continue", "abort"],
    notes: str,
    waves: int | None = None,
    priority_barrier: bool = False,
    budget: Budget | None = None,
    speculate: Speculate | None = None,
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
        waves=waves,
        priority_barrier=priority_barrier,
        budget=budget,
        speculate=speculate,
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

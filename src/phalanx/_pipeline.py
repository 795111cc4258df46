"""Pipeline files: load and validate ``pipeline.yaml``, then plan it.

Planning expands every stage into its instances without running anything: partitions are read,
blueprints rendered, output paths resolved, groups formed from upstream instances, and the
checks of "identify parallel opportunities" applied (every instance owns a distinct output
directory, none nested in another's, none outside the project, no stage reading what its own
instances write). Everything that can be wrong with the input is found here, so a run that
starts does not stop halfway on a typo.
"""

from __future__ import annotations

import difflib
import math
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from ._blueprint import Blueprint, load_blueprint
from ._config import (
    Backoff,
    Budget,
    Defaults,
    ExpectSpec,
    GroupBy,
    Guard,
    PipelineConfig,
    RunnerConfig,
    Speculate,
    StageConfig,
)
from ._databus import expected_name
from ._errors import CycleError, OutputConflictError, PipelineError
from ._partitions import Partition, PartitionSource, load_partitions, validate_key
from ._templates import TemplateKeyError, TemplateSyntaxError, render_config, stringify
from .runners._base import InputRef

__all__ = [
    "STATE_DIR",
    "InputRef",
    "InstancePlan",
    "Pipeline",
    "Plan",
    "StagePlan",
    "load_pipeline",
    "plan_pipeline",
]

STATE_DIR = ".phalanx"
"""phalanx's own folder inside a project: staging directories, logs, run records."""

_RUNNER_ADAPTER: TypeAdapter[RunnerConfig] = TypeAdapter(RunnerConfig)
_RUNNER_TYPES = ["python", "command", "anthropic", "openai", "claude-code"]

StageKind = Literal["map", "group", "single", "follow"]
_Seed = tuple[str, float, Mapping[str, object], tuple[InputRef, ...]]
"""What one instance is made from: key, priority, fields, inputs."""


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline file. ``project_dir`` is the folder that holds it: every relative
    path in the file (blueprints, partition files, outputs, notes) is relative to it."""

    config: PipelineConfig
    path: Path
    project_dir: Path
    display_path: str
    lines: Mapping[tuple[str | int, ...], int] = field(default_factory=dict, repr=False)

    def line_of(self, *loc: str | int) -> int | None:
        """The line in the file where the value at ``loc`` is written, or its nearest parent."""
        for end in range(len(loc), 0, -1):
            if (line := self.lines.get(loc[:end])) is not None:
                return line
        return None

    def where(self, *loc: str | int) -> str:
        """``pipeline.yaml:12: stages[0].output`` style location for messages."""
        line = self.line_of(*loc)
        prefix = f"{self.display_path}:{line}" if line else self.display_path
        return f"{prefix}: {_dotted(loc, self.config)}" if loc else prefix


def load_pipeline(
    path: str | Path, *, runner_settings: Mapping[str, object] | None = None
) -> Pipeline:
    """Read and validate a pipeline file.

    ``runner_settings`` override runner settings everywhere in the file (the defaults' runner
    and every stage's own): ``{"base_url": "http://127.0.0.1:8765"}`` points a pipeline at
    another server, ``{"type": "openai", "model": "llama3.1"}`` at another provider.
    Raises :class:`PipelineError` naming the file, the line, the field and the fix.
    """
    path = Path(path)
    display = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{display}: pipeline file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{display}: cannot read the pipeline file: {exc}") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineError(f"{display}: malformed YAML: {_yaml_problem(exc)}") from exc
    if not isinstance(data, dict):
        raise PipelineError(
            f"{display}: a pipeline file is a YAML mapping with name, params, defaults and "
            "stages; see `phalanx init` for a starter"
        )
    lines = _line_map(node) if node is not None else {}
    todos = list(_todos(data, ()))
    if todos:
        raise PipelineError(_todo_message(display, todos, lines, data))
    if runner_settings:
        _override_runners(data, runner_settings)
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise PipelineError(_format_validation(exc, display, lines, data)) from None
    return Pipeline(
        config=config,
        path=path.resolve(),
        project_dir=path.resolve().parent,
        display_path=display,
        lines=lines,
    )


TODO_MARK = "TODO:"
"""A value that starts with this is a gap ``phalanx import`` (or a person) left to fill in;
loading refuses the file and names every one, with the reason written after the mark."""


def _todos(value: object, loc: tuple[str | int, ...]) -> Iterator[tuple[str | int, ...]]:
    if isinstance(value, str) and value.lstrip().startswith(TODO_MARK):
        yield loc
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _todos(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _todos(item, (*loc, index))


def _todo_message(
    display: str,
    todos: list[tuple[str | int, ...]],
    lines: Mapping[tuple[str | int, ...], int],
    data: object,
) -> str:
    def text(loc: tuple[str | int, ...]) -> str:
        current: Any = data
        for part in loc:
            current = current[part]
        return " ".join(str(current).split())

    shown = [f"  {display}:{lines.get(loc, 0)}: {_dotted(loc, data)}: {text(loc)}" for loc in todos]
    count = f"{len(todos)} value{'s' if len(todos) != 1 else ''}"
    return (
        f"{display}: {count} still marked {TODO_MARK!r} (left by phalanx import, or by hand); "
        "replace each with a real value, then run again:\n" + "\n".join(shown)
    )


def _override_runners(data: dict[str, Any], settings: Mapping[str, object]) -> None:
    """Apply ``settings`` to the defaults' runner and to every stage that sets its own."""
    defaults = data.setdefault("defaults", {})
    targets = [defaults] if isinstance(defaults, dict) else []
    stages = data.get("stages")
    if isinstance(stages, list):
        targets += [stage for stage in stages if isinstance(stage, dict) and "runner" in stage]
        targets += [  # a reviewer with a runner of its own
            stage["review"]
            for stage in stages
            if isinstance(stage, dict)
            and isinstance(stage.get("review"), dict)
            and "runner" in stage["review"]
        ]
    for target in targets:
        runner = target.get("runner")
        if isinstance(runner, str):
            runner = {"type": runner}
        target["runner"] = {**(runner if isinstance(runner, dict) else {}), **settings}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(problem)


def _line_map(node: yaml.Node) -> dict[tuple[str | int, ...], int]:
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(current: yaml.Node, loc: tuple[str | int, ...]) -> None:
        lines[loc] = current.start_mark.line + 1
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                key = (key_node.value,)
                walk(value_node, loc + key)
                lines[loc + key] = key_node.start_mark.line + 1
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                walk(item, (*loc, index))

    walk(node, ())
    return lines


def _dotted(loc: Sequence[str | int], data: object) -> str:
    """``stages[1] (features).group_by`` from a pydantic / YAML location."""
    out = ""
    current: Any = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            try:
                current = current[part]
            except (IndexError, KeyError, TypeError):
                current = None
            name = (
                current.get("name") if isinstance(current, dict) else getattr(current, "name", None)
            )
            if isinstance(name, str):
                out += f" ({name})"
        else:
            out += f".{part}" if out else str(part)
            if isinstance(current, dict):
                current = current.get(part)
            else:
                current = getattr(current, str(part), None)
    return out


def _format_validation(
    exc: ValidationError,
    display: str,
    lines: Mapping[tuple[str | int, ...], int],
    data: object,
) -> str:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        line = None
        for end in range(len(loc), -1, -1):
            if (line := lines.get(loc[:end])) is not None:
                break
        where = f"{display}:{line}" if line else display
        message = error["msg"]
        if error["type"] == "extra_forbidden" and loc:
            message = _unknown_field_message(str(loc[-1]), loc[:-1])
        elif error["type"] == "missing" and loc:
            message = f"the required field {loc[-1]!r} is missing"
        message = message.removeprefix("Value error, ")
        problems.append(f"{where}: {_dotted(loc, data) or 'top level'}: {message}")
    head = "invalid pipeline file" if len(problems) == 1 else f"{len(problems)} problems"
    return f"{display}: {head}\n  " + "\n  ".join(problems)


_SECTIONS: dict[str, type[BaseModel]] = {
    "stages": StageConfig,
    "defaults": Defaults,
    "partitions": PartitionSource,
    "backoff": Backoff,
    "budget": Budget,
    "guard": Guard,
    "speculate": Speculate,
    "group_by": GroupBy,
    "expect": ExpectSpec,
}


def _unknown_field_message(name: str, parent: tuple[str | int, ...]) -> str:
    """``unknown field 'concurency'; did you mean 'concurrency'?`` for the section at ``parent``."""
    words = [part for part in parent if isinstance(part, str)]
    if len(words) > 1 and words[-2] == "expect":
        words.pop()  # the last word is an expected file's name
    model = _SECTIONS.get(words[-1], PipelineConfig) if words else PipelineConfig
    known = [spec.alias or field for field, spec in model.model_fields.items()]
    hint = difflib.get_close_matches(name, known, n=1)
    fix = f"did you mean {hint[0]!r}?" if hint else f"known fields: {', '.join(known)}"
    return f"unknown field {name!r}; {fix}"


# ---------------------------------------------------------------------------------------------
# Planning

_API_RUNNERS = frozenset({"anthropic", "openai"})
"""Runners whose calls go through a lane and can adapt their concurrency to the provider."""
_GUARDED_RUNNERS = frozenset({"command", "claude-code"})
"""Runners that start local processes, admitted under the local resource guard."""
_DEFAULT_CONCURRENCY = 16


_RELATIVE_FALLBACK_S = 600.0


def _shared(members: Sequence[InstancePlan]) -> dict[str, object]:
    """The fields every member of a group has with the same value (a feature's DIMENSION), so
    that the group can pass them on; never the members' own keys."""
    shared = dict(members[0].values)
    for member in members[1:]:
        for name in list(shared):
            if name not in member.values or member.values[name] != shared[name]:
                del shared[name]
    shared.pop("PARTITION_KEY", None)
    shared.pop("GROUP_SIZE", None)
    return shared


def _timeout(own: float | str | None, default: float | str) -> tuple[float, float | None]:
    """A stage's timeout as (seconds, factor of the median or ``None``). A relative timeout
    falls back on the default's seconds (or 600 s) until enough attempts have succeeded."""
    chosen = default if own is None else own
    fallback = default if isinstance(default, float) else _RELATIVE_FALLBACK_S
    if isinstance(chosen, str):
        return fallback, float(chosen.rstrip("% ")) / 100
    return chosen, None


def _guard(stage: StageConfig, runner: RunnerConfig, defaults: Defaults) -> Guard | None:
    """The resource guard of a stage whose agents are local processes, unless turned off."""
    if runner.type not in _GUARDED_RUNNERS:
        return None
    chosen = defaults.guard if stage.guard is None else stage.guard
    if chosen is False:
        return None
    return Guard() if chosen is True else chosen


@dataclass(frozen=True)
class InstancePlan:
    """One instance, fully resolved: its parameters, rendered prompt, output and inputs."""

    stage: str
    key: str
    index: int
    priority: float
    values: Mapping[str, object]
    prompt: str
    output: Path
    output_rel: str
    inputs: tuple[InputRef, ...] = ()


@dataclass(frozen=True)
class StagePlan:
    """One stage with its resolved settings and its instances in plan order."""

    name: str
    kind: StageKind
    config: StageConfig
    blueprint: Blueprint | None
    runner: RunnerConfig
    prompt_mode: Literal["inline", "reference"]
    concurrency: int
    retries: int
    timeout: float
    on_failure: Literal["continue", "abort"]
    min_success: float
    backoff: Backoff
    expect: Mapping[str, ExpectSpec]
    schemas: Mapping[str, Path]
    instances: tuple[InstancePlan, ...]
    needs: tuple[str, ...]
    group_field: str | None = None
    auto: bool = False
    """``concurrency: auto``: ``concurrency`` is then the ceiling, and the lane's adaptive
    limit decides."""
    waves: int | None = None
    priority: float = 0.0
    priority_barrier: bool = False
    budget: Budget | None = None
    guard: Guard | None = None
    timeout_factor: float | None = None
    """``timeout: 300%``: 3.0; ``timeout`` is then the limit until the median is known."""
    speculate: Speculate | None = None
    review: ReviewPlan | None = None

    @property
    def required(self) -> int:
        """How many instances must commit for the stage to meet its threshold."""
        total = len(self.instances)
        if self.min_success <= 1:
            return math.ceil(self.min_success * total - 1e-9)
        return min(int(self.min_success), total)


@dataclass(frozen=True)
class ReviewPlan:
    """A stage's reviewer (``review:``), resolved: what it judges, what runs it, its prompt
    template (``None``: phalanx's) and how long it may take."""

    criteria: tuple[str, ...]
    runner: RunnerConfig
    blueprint: Blueprint | None
    timeout: float


@dataclass(frozen=True)
class Plan:
    """A planned pipeline: stages in dependency order; ``selected`` are the ones to run."""

    pipeline: Pipeline
    stages: tuple[StagePlan, ...]
    selected: frozenset[str]

    @property
    def project_dir(self) -> Path:
        return self.pipeline.project_dir

    def index(self, name: str) -> int:
        """The position of stage ``name`` in the pipeline file (for messages)."""
        return [stage.name for stage in self.pipeline.config.stages].index(name)

    def stage(self, name: str) -> StagePlan:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def to_json(self) -> dict[str, object]:
        """The plan as ``phalanx plan --json`` prints it."""
        return {
            "pipeline": self.pipeline.config.name,
            "project_dir": str(self.project_dir),
            "stages": [
                {
                    "name": stage.name,
                    "kind": stage.kind,
                    "selected": stage.name in self.selected,
                    "needs": list(stage.needs),
                    "runner": stage.runner.type,
                    "concurrency": stage.concurrency,
                    "adaptive": stage.auto,
                    "retries": stage.retries,
                    "timeout_s": stage.timeout,
                    "min_success": stage.min_success,
                    "instances": len(stage.instances),
                    "expect": sorted(stage.expect),
                    "outputs": [
                        {
                            "key": inst.key,
                            "output": inst.output_rel,
                            "priority": inst.priority,
                            "inputs": [f"{ref.stage}/{ref.key}" for ref in inst.inputs],
                        }
                        for inst in stage.instances
                    ],
                }
                for stage in self.stages
            ],
        }


def plan_pipeline(
    pipeline: Pipeline,
    *,
    stages: Iterable[str] | None = None,
    only: Iterable[str] | None = None,
) -> Plan:
    """Expand every stage of ``pipeline`` into instances and check the plan.

    ``stages`` limits which stages run (the others are still planned, so their outputs can be
    read); ``only`` limits the instances of the selected stages to those keys.
    Raises :class:`~phalanx.UsageError` subclasses for anything wrong with the input.
    """
    return _Planner(pipeline).plan(stages, only)


class _Planner:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config
        self.root = pipeline.project_dir
        self.real_root = self.root.resolve()
        self.index = {stage.name: i for i, stage in enumerate(self.config.stages)}
        self.safe_parents: set[str] = set()  # output parents already checked for symlinks
        self.checked_names: set[str] = set()  # expect names without placeholders, checked

    def where(self, stage_index: int, *loc: str | int) -> str:
        return self.pipeline.where("stages", stage_index, *loc)

    def plan(self, stages: Iterable[str] | None, only: Iterable[str] | None) -> Plan:
        order = self._order()
        planned: dict[str, StagePlan] = {}
        for name in order:
            planned[name] = self._plan_stage(self.index[name], planned)
        self._check_outputs(list(planned.values()))
        selected = self._select(stages, planned)
        result = [planned[name] for name in order]
        if only is not None:
            result = self._only(list(only), result, selected)
        return Plan(self.pipeline, tuple(result), frozenset(selected))

    # -- dependency order ----------------------------------------------------------------------

    def _order(self) -> list[str]:
        stages = self.config.stages
        seen: dict[str, int] = {}
        for i, stage in enumerate(stages):
            if stage.name in seen:
                raise PipelineError(
                    f"{self.where(i, 'name')}: stage name {stage.name!r} is used twice "
                    f"(also stages[{seen[stage.name]}]); stage names must be unique"
                )
            seen[stage.name] = i
        for i, stage in enumerate(stages):
            for j, need in enumerate(stage.needs):
                if need not in seen:
                    hint = difflib.get_close_matches(need, list(seen), n=1)
                    fix = f"did you mean {hint[0]!r}?" if hint else f"stages: {', '.join(seen)}"
                    raise PipelineError(
                        f"{self.where(i, 'needs', j)}: unknown stage {need!r} in needs; {fix}"
                    )
                if need == stage.name:
                    raise CycleError(f"{self.where(i, 'needs', j)}: stage {need!r} needs itself")
        # Kahn's algorithm, ties broken by file order so the plan is stable.
        remaining = {s.name: set(s.needs) for s in stages}
        order: list[str] = []
        while remaining:
            ready = [s.name for s in stages if s.name in remaining and not remaining[s.name]]
            if not ready:
                raise CycleError(
                    f"{self.pipeline.display_path}: the stages' needs form a cycle: "
                    f"{self._cycle(remaining)}; remove one of these needs"
                )
            for name in ready:
                del remaining[name]
                order.append(name)
            for needs in remaining.values():
                needs.difference_update(ready)
        return order

    @staticmethod
    def _cycle(remaining: Mapping[str, set[str]]) -> str:
        start = next(iter(remaining))
        path = [start]
        while True:
            nxt = sorted(remaining[path[-1]])[0]
            if nxt in path:
                cycle = [*path[path.index(nxt) :], nxt]
                return " -> ".join(cycle)
            path.append(nxt)

    # -- one stage -------------------------------------------------------------------------------

    def _plan_stage(self, i: int, planned: Mapping[str, StagePlan]) -> StagePlan:
        stage = self.config.stages[i]
        defaults = self.config.defaults
        blueprint = self._blueprint(i, stage)
        runner = self._runner(i, stage)
        output = stage.output or (blueprint.output_location if blueprint else None)
        if not output:
            raise PipelineError(
                f"{self.where(i)}: no output: set the stage's `output:` to a directory template "
                "such as data/{PERIOD}/raw/{ORGANIZATION_ID}/"
            )
        expect: dict[str, ExpectSpec] = {}
        if blueprint is not None:
            expect = {
                out.name: ExpectSpec(schema=out.schema, description=out.description)
                for out in blueprint.outputs
            }
        expect.update(stage.expect)  # the stage adds files or refines the blueprint's
        schemas = {
            name: self._existing_file(spec.schema_, i, "expect", name, "schema")
            for name, spec in expect.items()
            if spec.schema_
        }
        prompt_mode = stage.prompt or defaults.prompt
        kind: StageKind = stage.kind
        group_field = None
        seeds: list[_Seed]
        if kind == "map":
            assert stage.partitions is not None  # noqa: S101 - the kind says so
            rows = self._rows(i, stage.partitions)
            seeds = [(p.key, p.priority, p.fields, ()) for p in rows]
        elif kind == "follow":
            upstream = planned[stage.needs[0]]
            seeds = [
                (inst.key, inst.priority, inst.values, (_ref(inst),)) for inst in upstream.instances
            ]
        elif kind == "group":
            group_field, seeds = self._groups(i, stage, planned)
        else:
            inputs = tuple(_ref(inst) for need in stage.needs for inst in planned[need].instances)
            seeds = [(stage.name, 0.0, {}, inputs)]
        instances = tuple(
            self._instance(i, stage, blueprint, prompt_mode, output, expect, n, *seed)
            for n, seed in enumerate(seeds)
        )
        absolute, factor = _timeout(stage.timeout, defaults.timeout)
        ceiling = self.config.concurrency
        concurrency = stage.concurrency or defaults.concurrency
        if concurrency is None:
            concurrency = "auto" if runner.type in _API_RUNNERS else _DEFAULT_CONCURRENCY
        elif concurrency == "auto" and runner.type not in _API_RUNNERS | _GUARDED_RUNNERS:
            concurrency = _DEFAULT_CONCURRENCY  # nothing to adapt to: a python agent
        return StagePlan(
            name=stage.name,
            kind=kind,
            config=stage,
            blueprint=blueprint,
            runner=runner,
            prompt_mode=prompt_mode,
            concurrency=ceiling if concurrency == "auto" else concurrency,
            auto=concurrency == "auto",
            waves=stage.waves,
            priority=stage.priority,
            priority_barrier=stage.priority_barrier,
            budget=stage.budget,
            guard=_guard(stage, runner, defaults),
            retries=defaults.retries if stage.retries is None else stage.retries,
            timeout=absolute,
            timeout_factor=factor,
            speculate=stage.speculate,
            on_failure=stage.on_failure or defaults.on_failure,
            min_success=defaults.min_success if stage.min_success is None else stage.min_success,
            backoff=stage.backoff or defaults.backoff,
            expect=expect,
            schemas=schemas,
            instances=instances,
            needs=tuple(stage.needs),
            group_field=group_field,
            review=self._review(i, stage, runner, absolute),
        )

    def _review(
        self, i: int, stage: StageConfig, runner: RunnerConfig, timeout: float
    ) -> ReviewPlan | None:
        review = stage.review
        if review is None:
            return None
        if review.runner is not None:
            reviewer = self._runner_config(dict(review.runner), self.where(i, "review", "runner"))
        elif runner.type in {"command", "python"}:
            raise PipelineError(
                f"{self.where(i, 'review')}: a {runner.type} stage's program writes the outputs; "
                "give the reviewer its own runner: review: {runner: {type: anthropic}} (or "
                "openai, claude-code, or a command that reviews)"
            )
        else:
            reviewer = runner
        blueprint = None
        if review.blueprint is not None:
            path = self._inside(review.blueprint, i, "review", "blueprint")
            blueprint = load_blueprint(path, display_path=review.blueprint)
        seconds = timeout if review.timeout is None else review.timeout
        return ReviewPlan(tuple(review.criteria), reviewer, blueprint, seconds)

    def _blueprint(self, i: int, stage: StageConfig) -> Blueprint | None:
        if stage.blueprint is None:
            return None
        path = self._inside(stage.blueprint, i, "blueprint")
        return load_blueprint(path, display_path=stage.blueprint)

    def _runner(self, i: int, stage: StageConfig) -> RunnerConfig:
        base = dict(self.config.defaults.runner or {})
        own = dict(stage.runner or {})
        if own.get("type", base.get("type")) != base.get("type"):
            base = {}
        merged = {**base, **own}
        if not merged:
            raise PipelineError(
                f"{self.where(i)}: no runner: set `runner:` on the stage or under defaults, "
                "e.g. runner: {type: python, function: agents:run} or "
                "runner: {type: command, argv: [python, agent.py]}"
            )
        where = (
            self.where(i, "runner") if stage.runner else self.pipeline.where("defaults", "runner")
        )
        return self._runner_config(merged, where)

    def _runner_config(self, merged: dict[str, Any], where: str) -> RunnerConfig:
        kind = merged.get("type")
        if kind not in _RUNNER_TYPES:
            hint = difflib.get_close_matches(str(kind), _RUNNER_TYPES, n=1)
            fix = f"did you mean {hint[0]!r}? " if hint else ""
            raise PipelineError(
                f"{where}: unknown runner type {kind!r}; {fix}runners: {', '.join(_RUNNER_TYPES)}"
            )
        try:
            return _RUNNER_ADAPTER.validate_python(merged)
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'][1:]) or 'type'}: {e['msg']}"
                for e in exc.errors()
            )
            raise PipelineError(f"{where}: invalid {kind} runner settings: {details}") from None

    def _rows(self, i: int, source: PartitionSource) -> list[Partition]:
        origin = self.where(i, "partitions")
        return load_partitions(source, project_dir=self.root, origin=origin)

    def _groups(
        self, i: int, stage: StageConfig, planned: Mapping[str, StagePlan]
    ) -> tuple[str, list[_Seed]]:
        assert stage.group_by is not None  # noqa: S101 - the kind says so
        source_name = stage.group_by.stage
        if source_name is None:
            if len(stage.needs) != 1:
                raise PipelineError(
                    f"{self.where(i, 'group_by')}: this stage needs {len(stage.needs)} stages; "
                    "say which one to group: group_by: {stage: NAME, field: FIELD}"
                )
            source_name = stage.needs[0]
        elif source_name not in stage.needs:
            raise PipelineError(
                f"{self.where(i, 'group_by', 'stage')}: group_by.stage {source_name!r} "
                "must also be listed in needs"
            )
        field_name = stage.group_by.field
        groups: dict[str, list[InstancePlan]] = {}
        for inst in planned[source_name].instances:
            if field_name not in inst.values:
                raise PipelineError(
                    f"{self.where(i, 'group_by')}: instance {inst.key!r} of stage "
                    f"{source_name!r} has no field {field_name!r} to group by; its fields: "
                    f"{', '.join(sorted(inst.values))}"
                )
            value = inst.values[field_name]
            groups.setdefault(stringify(value), []).append(inst)
        seeds: list[_Seed] = []
        for value, members in groups.items():
            reason = validate_key(value)
            if reason:
                raise PipelineError(
                    f"{self.where(i, 'group_by')}: group value {value!r} (field {field_name!r}"
                    f" of {members[0].key!r}) cannot name a folder: {reason}"
                )
            fields = {
                **_shared(members),
                field_name: members[0].values[field_name],
                "GROUP_SIZE": len(members),
            }
            priority = max(m.priority for m in members)
            seeds.append((value, priority, fields, tuple(_ref(m) for m in members)))
        return field_name, seeds

    def _instance(
        self,
        i: int,
        stage: StageConfig,
        blueprint: Blueprint | None,
        prompt_mode: str,
        output_template: str,
        expect: Mapping[str, ExpectSpec],
        index: int,
        key: str,
        priority: float,
        fields: Mapping[str, object],
        inputs: tuple[InputRef, ...],
    ) -> InstancePlan:
        context: dict[str, object] = {**self.config.params, **fields, "PARTITION_KEY": key}
        for name, raw in stage.params.items():
            if isinstance(raw, str):
                context[name] = self._render(raw, context, i, ("params", name), key)
            else:
                context[name] = raw
        output_rel = self._output_path(
            self._render(output_template, context, i, ("output",), key), i, key
        )
        for name in expect:
            if "{" not in name and name in self.checked_names:
                continue  # a fixed name: checked once for the stage
            try:
                expected_name(name, context)
            except ValueError as exc:
                raise PipelineError(f"{self.where(i, 'expect')}: {exc}") from None
            except TemplateKeyError as exc:
                raise PipelineError(
                    f"{self.where(i, 'expect')}: {name!r} refers to {{{exc.name}}}, which "
                    f"partition {key!r} does not have"
                ) from None
            self.checked_names.add(name)
        if blueprint is None:
            prompt = ""
        elif prompt_mode == "reference":
            prompt = blueprint.reference_prompt(context, partition=key)
        else:
            prompt = blueprint.render(context, partition=key)
        return InstancePlan(
            stage=stage.name,
            key=key,
            index=index,
            priority=priority,
            values=context,
            prompt=prompt,
            output=self.root / output_rel,
            output_rel=output_rel,
            inputs=inputs,
        )

    def _render(
        self,
        template: str,
        values: Mapping[str, object],
        i: int,
        loc: tuple[str, ...],
        key: str,
    ) -> str:
        try:
            return render_config(template, values)
        except TemplateSyntaxError as exc:
            raise PipelineError(f"{self.where(i, *loc)}: {exc}") from None
        except TemplateKeyError as exc:
            known = ", ".join(sorted(values))
            raise PipelineError(
                f"{self.where(i, *loc)}: {template!r} refers to {{{exc.name}}}, which partition "
                f"{key!r} does not have; available: {known}; add it to the pipeline's params "
                "or the stage's params"
            ) from None

    def _output_path(self, rendered: str, i: int, key: str) -> str:
        text = rendered.replace("\\", "/")
        if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
            raise OutputConflictError(
                f"{self.where(i, 'output')}: output {rendered!r} (partition {key!r}) is "
                "absolute; outputs are relative to the project directory"
            )
        norm = posixpath.normpath(text)
        if norm in {".", ".."} or norm.startswith("../"):
            raise OutputConflictError(
                f"{self.where(i, 'output')}: output {rendered!r} (partition {key!r}) escapes "
                "the project directory; outputs must be folders inside it"
            )
        if norm.split("/", 1)[0] == STATE_DIR:
            raise OutputConflictError(
                f"{self.where(i, 'output')}: output {rendered!r} is inside {STATE_DIR}/, "
                "phalanx's own state"
            )
        parent = posixpath.dirname(norm)
        if parent not in self.safe_parents:
            # The deepest existing folder on the way must resolve inside the project: a symlink
            # there would carry outputs elsewhere. Checked once per parent folder.
            anchor = self.root / parent
            while not anchor.exists() and anchor != self.root:
                anchor = anchor.parent
            if not anchor.resolve().is_relative_to(self.real_root):
                raise OutputConflictError(
                    f"{self.where(i, 'output')}: output {rendered!r} (partition {key!r}) leads "
                    f"outside the project directory through the symlink {anchor}"
                )
            self.safe_parents.add(parent)
        return norm

    def _inside(self, rel: str, i: int, *loc: str) -> Path:
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.real_root):
            raise PipelineError(
                f"{self.where(i, *loc)}: {rel!r} is outside the project directory "
                f"{self.root}; keep blueprints, schemas and inputs inside it"
            )
        return path

    def _existing_file(self, rel: str, i: int, *loc: str) -> Path:
        path = self._inside(rel, i, *loc)
        if not path.is_file():
            raise PipelineError(f"{self.where(i, *loc)}: file {rel!r} not found")
        return path

    # -- whole-plan checks ----------------------------------------------------------------------

    def _check_outputs(self, stages: Sequence[StagePlan]) -> None:
        owners: dict[tuple[str, ...], tuple[str, str]] = {}
        for stage in stages:
            for inst in stage.instances:
                parts = tuple(inst.output_rel.split("/"))
                if parts in owners:
                    other = owners[parts]
                    raise OutputConflictError(
                        f"{self.where(self.index[stage.name], 'output')}: instances "
                        f"{other[0]}/{other[1]} and {stage.name}/{inst.key} both write "
                        f"{inst.output_rel}/; put a parameter that differs per partition "
                        "(e.g. {PARTITION_KEY}) in the output template"
                    )
                owners[parts] = (stage.name, inst.key)
        for parts, (stage_name, key) in owners.items():
            for end in range(1, len(parts)):
                outer = owners.get(parts[:end])
                if outer is not None:
                    raise OutputConflictError(
                        f"{self.where(self.index[stage_name], 'output')}: the output of "
                        f"{stage_name}/{key} ({'/'.join(parts)}/) is inside the output of "
                        f"{outer[0]}/{outer[1]} ({'/'.join(parts[:end])}/); each instance "
                        "must own a folder no other instance writes into"
                    )
        reserved = {
            "notes": self.config.notes,
            "summaries": self.config.summaries,
        }
        for field_name, rel in reserved.items():
            parts = tuple(posixpath.normpath(rel).split("/"))
            for end in range(1, len(parts) + 1):
                if (owner := owners.get(parts[:end])) is not None:
                    raise OutputConflictError(
                        f"{self.pipeline.where(field_name)}: {rel!r} is inside the output of "
                        f"{owner[0]}/{owner[1]}; keep notes and summaries out of the data bus"
                    )
        for stage in stages:
            own = {tuple(inst.output_rel.split("/")) for inst in stage.instances}
            for source, loc in self._reads(stage):
                parts = tuple(posixpath.normpath(source).split("/"))
                for end in range(1, len(parts) + 1):
                    if parts[:end] in own:
                        raise OutputConflictError(
                            f"{self.where(self.index[stage.name], *loc)}: stage "
                            f"{stage.name!r} reads {source!r}, which is inside its own "
                            "outputs; a stage may not read what its instances write"
                        )

    @staticmethod
    def _reads(stage: StagePlan) -> list[tuple[str, tuple[str, ...]]]:
        reads: list[tuple[str, tuple[str, ...]]] = [
            (path, ("reads",)) for path in stage.config.reads
        ]
        source = stage.config.partitions
        if source is not None and source.from_:
            reads.append((source.from_, ("partitions", "from")))
        if source is not None and source.glob:
            fixed = []
            for part in source.glob.split("/"):
                if any(ch in part for ch in "*?["):
                    break
                fixed.append(part)
            if fixed:
                reads.append(("/".join(fixed), ("partitions", "glob")))
        return reads

    def _select(self, stages: Iterable[str] | None, planned: Mapping[str, StagePlan]) -> set[str]:
        if stages is None:
            return set(planned)
        chosen = set(stages)
        unknown = sorted(chosen - set(planned))
        if unknown:
            raise PipelineError(
                f"{self.pipeline.display_path}: no stage named {', '.join(map(repr, unknown))}; "
                f"stages: {', '.join(planned)}"
            )
        return chosen

    def _only(
        self, keys: list[str], stages: list[StagePlan], selected: set[str]
    ) -> list[StagePlan]:
        wanted = set(keys)
        found: set[str] = set()
        result = []
        for stage in stages:
            if stage.name not in selected:
                result.append(stage)
                continue
            kept = tuple(inst for inst in stage.instances if inst.key in wanted)
            found.update(inst.key for inst in kept)
            result.append(replace(stage, instances=kept))
        missing = sorted(wanted - found)
        if missing:
            raise PipelineError(
                f"{self.pipeline.display_path}: --only {', '.join(map(repr, missing))} matches "
                "no instance of the selected stages; `phalanx plan` lists the keys"
            )
        return result


def _ref(inst: InstancePlan) -> InputRef:
    return InputRef(stage=inst.stage, key=inst.key, path=inst.output)

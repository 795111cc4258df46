"""The pipeline file's schema: pydantic models for what a user writes in ``pipeline.yaml``.

These models check shapes and types only. Cross-references (``needs`` naming a stage, a
blueprint file existing, output paths not colliding) are checked when the pipeline is planned
(:mod:`phalanx._pipeline`), where the project directory and the partitions are known.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from ._partitions import PartitionSource
from ._prices import Price

__all__ = [
    "AnthropicRunnerConfig",
    "Backoff",
    "Budget",
    "CheckSpec",
    "ClaudeCodeRunnerConfig",
    "CommandRunnerConfig",
    "Defaults",
    "ExpectSpec",
    "GroupBy",
    "Guard",
    "LLMRunnerConfig",
    "OpenAIRunnerConfig",
    "PipelineConfig",
    "PythonRunnerConfig",
    "ReviewConfig",
    "RunnerConfig",
    "Speculate",
    "StageConfig",
    "parse_duration",
]

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*\Z")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_JSON_PATH = re.compile(r"[^.\[\]]+(?:\[\])?(?:\.[^.\[\]]+(?:\[\])?)*\Z")
_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``"500ms"``, ``"30s"``, ``"15m"``, ``"1.5h"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 15m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as 30s, 15m or 1h, not {value!r}")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]

_PERCENT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*\Z")


def _percent(value: str) -> float | None:
    match = _PERCENT.match(value)
    return float(match.group(1)) / 100 if match else None


def parse_timeout(value: object) -> float | str:
    """A duration in seconds, or a share of the stage's median duration written ``"300%"``
    (kept as text; the plan turns it into a factor)."""
    if isinstance(value, str) and _PERCENT.match(value):
        if not (_percent(value) or 0) > 0:
            raise ValueError("a relative timeout must be above 0%")
        return value.strip()
    return parse_duration(value)


Timeout = Annotated[float | str, BeforeValidator(parse_timeout)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PythonRunnerConfig(_Model):
    """``runner: {type: python, function: "module:function"}``: a callable in the project."""

    type: Literal["python"] = "python"
    function: str = Field(pattern=r"^[\w.]+:[\w.]+$")


class CommandRunnerConfig(_Model):
    """``runner: {type: command, argv: [...]}``: any program, never through a shell."""

    type: Literal["command"] = "command"
    argv: list[str] = Field(min_length=1)
    prompt: Literal["stdin", "file", "none"] = "stdin"
    env: dict[str, str] = Field(default_factory=dict)
    kill_grace: Duration = 2.0


class LLMRunnerConfig(_Model):
    """Settings shared by the LLM runners."""

    model: str | None = None
    base_url: str | None = None
    api_key_env: str
    max_turns: int = Field(default=30, ge=1)
    max_tokens: int = Field(default=8192, ge=1)
    temperature: float | None = Field(default=None, ge=0)


class AnthropicRunnerConfig(LLMRunnerConfig):
    """``runner: {type: anthropic, model: claude-sonnet-4-6}``: the Messages API with phalanx's
    file tools. ``model`` defaults to the blueprint's."""

    type: Literal["anthropic"] = "anthropic"
    api_key_env: str = "ANTHROPIC_API_KEY"
    server_tools: list[dict[str, Any]] = Field(default_factory=list)
    """Tools Anthropic runs itself, passed through as written, e.g.
    ``{type: web_search_20250305, name: web_search, max_uses: 5}``."""


class OpenAIRunnerConfig(LLMRunnerConfig):
    """``runner: {type: openai, model: gpt-5-mini, base_url: ...}``: Chat Completions with
    phalanx's file tools, against OpenAI or any compatible server (vLLM, Ollama, llama.cpp,
    LM Studio)."""

    type: Literal["openai"] = "openai"
    api_key_env: str = "OPENAI_API_KEY"


class ClaudeCodeRunnerConfig(_Model):
    """``runner: {type: claude-code}``: headless Claude Code (``claude -p``), one process per
    attempt, writing only into the attempt's staging folder."""

    type: Literal["claude-code"] = "claude-code"
    command: list[str] = Field(default_factory=lambda: ["claude"], min_length=1)
    model: str | None = None
    allowed_tools: list[str] = Field(
        default_factory=lambda: ["Read", "Write", "Edit", "Glob", "Grep", "LS"]
    )
    permission_mode: str = "acceptEdits"
    max_turns: int | None = Field(default=None, ge=1)
    base_url: str | None = None
    api_key_env: str = "ANTHROPIC_API_KEY"
    env: dict[str, str] = Field(default_factory=dict)
    kill_grace: Duration = 5.0


RunnerConfig = Annotated[
    PythonRunnerConfig
    | CommandRunnerConfig
    | AnthropicRunnerConfig
    | OpenAIRunnerConfig
    | ClaudeCodeRunnerConfig,
    Field(discriminator="type"),
]


class Backoff(_Model):
    """Retry delays: full jitter, ``uniform(0, min(max, base * 2**(attempt-1)))``."""

    base: Duration = 1.0
    max: Duration = 60.0


Concurrency = int | Literal["auto"]
"""A fixed number of instances at once, or ``auto``: an adaptive limit per lane (see
:mod:`phalanx._lanes`) that starts low and grows while the provider accepts the calls."""


def _concurrency(value: object) -> object:
    if value == "auto" or value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("concurrency is a whole number >= 1 or 'auto'")
    return value


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(value: object) -> object:
    """Bytes: a number, or text such as ``512MB``, ``2GiB``, ``1.5G``."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a size: write bytes, or e.g. 512MB, 2GiB")
        number, unit = float(match.group(1)), (match.group(2) or "").lower()
        base = 1024 if "i" in unit else 1000
        power = "bkmgt".index(unit[0]) if unit else 0
        return int(number * base**power)
    return value


class Resources(_Model):
    """``resources: {num_cpus: 2, memory: 4GB, custom: {licence: 1}}``: what one attempt of the
    stage reserves on a cluster backend (Ray schedules each attempt where they are free).
    Other backends ignore them."""

    num_cpus: float = Field(default=1.0, ge=0)
    memory: Annotated[int | None, BeforeValidator(parse_size), Field(ge=0)] = None
    custom: dict[str, float] = Field(default_factory=dict)


class BackendConfig(_Model):
    """``backend: {type: ray, address: auto}``: where the instances execute. The scheduler,
    the ledger and the data bus stay in the orchestrator whatever the backend."""

    type: str = Field(default="local", pattern=r"^[a-z][a-z0-9_-]*$")
    """``local`` (the orchestrator's event loop, the default), ``process`` (a pool of worker
    processes, for CPU-bound ``python`` runners) or ``ray`` (a Ray cluster)."""
    address: str = "auto"
    """Ray: ``auto`` (the cluster ``RAY_ADDRESS`` or a running local one names), ``local``
    (start a Ray instance for this run), ``HOST:PORT`` (a cluster's head) or
    ``ray://HOST:PORT`` (Ray Client)."""
    shared_fs: bool = False
    """Ray: the workers see the project's folder at the same path, so they read inputs and
    write outputs in place instead of shipping them."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Ray: the runtime environment of the run's workers (``working_dir``, ``pip``,
    ``env_vars``...)."""
    workers: int | None = Field(default=None, ge=1)
    """Process: how many worker processes (default: one per core)."""
    connect_timeout: Duration = 30.0
    """Ray: how long to try to reach the cluster before giving up."""


def _backend(value: object) -> object:
    return {"type": value} if isinstance(value, str) else value


class Budget(_Model):
    """``budget: {usd: 5, tokens: 2000000}``: once a run (or stage) has spent this much, no
    new attempt starts; attempts in flight finish, the rest are skipped (budget)."""

    usd: float | None = Field(default=None, gt=0)
    tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if self.usd is None and self.tokens is None:
            raise ValueError("a budget names usd, tokens or both, e.g. {usd: 5}")
        return self


class Guard(_Model):
    """The local resource guard of ``command`` and ``claude-code`` stages: beyond one instance
    per core, a new instance is admitted only while the machine has ``min_free_memory_mb`` of
    available memory and a one-minute load average under ``max_load`` per core."""

    min_free_memory_mb: int = Field(default=512, ge=0)
    max_load: float = Field(default=1.0, gt=0)


class Speculate(_Model):
    """``speculate: {after: p99, max_extra: 5%}``: when an attempt runs longer than the
    ``after`` percentile of the stage's successful durations (known once ``min_samples`` have
    succeeded), a backup attempt of the same instance starts; the first valid commit wins and
    the other is cancelled. At most ``max_extra`` of the stage's instances get a backup."""

    after: str = "p99"
    max_extra: float | str = "5%"
    min_samples: int | None = Field(default=None, ge=1)
    """``None``: one slot's worth of successes (the stage's limit, at most half the stage, at
    least 10): the first few to finish are the quickest, and would set the bar too low."""

    @field_validator("after")
    @classmethod
    def _percentile(cls, value: str) -> str:
        match = re.fullmatch(r"p(\d+(?:\.\d+)?)", value.strip())
        if not match or not 0 < float(match.group(1)) < 100:
            raise ValueError("after is a percentile of the stage's durations, such as p90 or p99")
        return value.strip()

    @field_validator("max_extra")
    @classmethod
    def _share(cls, value: float | str) -> float | str:
        share = _percent(value) if isinstance(value, str) else value
        if share is None or not 0 < share <= 1:
            raise ValueError("max_extra is a share of the stage's instances, such as 5% or 0.05")
        return value

    @property
    def percentile(self) -> float:
        return float(self.after.strip()[1:])

    @property
    def share(self) -> float:
        value = self.max_extra
        return (_percent(value) or 0.0) if isinstance(value, str) else float(value)


class ExpectSpec(_Model):
    """What one expected output file must satisfy beyond existing and being non-empty."""

    schema_: str | None = Field(default=None, alias="schema")
    description: str = ""


class CheckSpec(_Model):
    """One mechanical check of one output file (see :mod:`phalanx._checks`), usually an item of
    the blueprint's completion criteria: ``{file: activities.json, field: activities,
    min_items: 1, criterion: "..."}``."""

    file: str = Field(min_length=1)
    """The file, relative to the instance's output folder; a template like ``expect``'s names."""
    field: str | None = None
    """JSON: a dotted path that must exist; ``[]`` steps into every element of a list."""
    min_items: int | None = Field(default=None, ge=0)
    """JSON: the value at ``field`` (or the document) has at least this many entries."""
    contains: str | None = Field(default=None, min_length=1)
    """Text: a string the file must contain."""
    min_words: int | None = Field(default=None, ge=1)
    """Text: at least this many words (each CJK character counts as one)."""
    criterion: str = ""
    """The checklist item this check stands for; failures quote it."""

    @field_validator("file")
    @classmethod
    def _inside(cls, value: str) -> str:
        parts = value.replace("\\", "/").split("/")
        if value.startswith("/") or ".." in parts:
            raise ValueError("a check's file is a path inside the output folder (no '..', not /)")
        return value

    @field_validator("field")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not _JSON_PATH.match(value):
            raise ValueError(
                f"{value!r} is not a field path: write names joined by '.', with '[]' after a "
                "list's name to ask every element, e.g. activities[].source"
            )
        return value

    @model_validator(mode="after")
    def _asks_something(self) -> CheckSpec:
        if (self.field, self.min_items, self.contains, self.min_words) == (None,) * 4:
            raise ValueError(
                "a check asks something of its file: field, min_items, contains or min_words "
                "(to require the file alone, list it under expect)"
            )
        return self


class ReviewConfig(_Model):
    """``review: {criteria: [...], runner: {...}}``: before an attempt commits, a reviewer
    agent reads its outputs and judges them against ``criteria``; a failing verdict fails the
    attempt (cause ``review-rejected``), which is retried with the reasons as feedback."""

    criteria: list[str] = Field(min_length=1)
    """The checklist items the reviewer judges (those no mechanical check can)."""
    runner: dict[str, Any] | None = None
    """The reviewer's runner; default: the stage's own, which must then be an LLM runner or
    ``claude-code`` (a ``command`` or ``python`` stage's program writes, it does not review)."""
    blueprint: str | None = None
    """The reviewer's own prompt template; default: phalanx's. It may use the instance's
    parameters, ``{CRITERIA}`` (the list) and ``{REVIEWED_DIR}`` (the folder to review)."""
    timeout: Duration | None = None
    """How long the review may take (``5m``); default: the stage's timeout in seconds."""

    @field_validator("runner", mode="before")
    @classmethod
    def _runner_shorthand(cls, value: object) -> object:
        return {"type": value} if isinstance(value, str) else value


def _fraction_or_count(value: float) -> float:
    if value < 0:
        raise ValueError("min_success must be a count (>= 1) or a fraction between 0 and 1")
    if value > 1 and not float(value).is_integer():
        raise ValueError("a min_success above 1 is a count of instances and must be whole")
    return value


class Defaults(_Model):
    """Settings every stage inherits unless it sets its own."""

    runner: dict[str, Any] | None = None
    prompt: Literal["inline", "reference"] = "inline"
    concurrency: Annotated[Concurrency | None, BeforeValidator(_concurrency)] = None
    """``None``: ``auto`` for the ``anthropic`` and ``openai`` runners, 16 for the others."""
    guard: Guard | bool = True
    retries: int = Field(default=2, ge=0)
    timeout: Timeout = 600.0
    on_failure: Literal["continue", "abort"] = "continue"
    min_success: Annotated[float, Field(ge=0)] = 1.0
    backoff: Backoff = Backoff()

    @field_validator("runner", mode="before")
    @classmethod
    def _runner_shorthand(cls, value: object) -> object:
        return {"type": value} if isinstance(value, str) else value

    _check_min_success = field_validator("min_success")(_fraction_or_count)


class GroupBy(_Model):
    """``group_by: {stage: functions, field: FEATURE_ID}``; a bare field name when the stage
    needs exactly one upstream stage."""

    stage: str | None = None
    field: str


class StageConfig(_Model):
    """One stage. Exactly one of ``partitions`` / ``group_by`` / ``single`` says its kind; a
    stage with none of them and one upstream stage follows that stage's partitions key by key."""

    name: str
    blueprint: str | None = None
    prompt: Literal["inline", "reference"] | None = None
    partitions: PartitionSource | None = None
    group_by: GroupBy | None = None
    single: bool = False
    needs: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    output: str | None = None
    expect: dict[str, ExpectSpec] = Field(default_factory=dict)
    check: list[str] | None = Field(default=None, min_length=1)
    checks: list[CheckSpec] = Field(default_factory=list)
    review: ReviewConfig | None = None
    reads: list[str] = Field(default_factory=list)
    runner: dict[str, Any] | None = None
    concurrency: Annotated[Concurrency | None, BeforeValidator(_concurrency)] = None
    waves: int | None = Field(default=None, ge=1)
    barrier: Literal["stream", "stage"] = "stream"
    """``stream``: a group (or, following a stage, a key) starts as soon as its own inputs
    have ended; ``stage``: once the whole upstream stage has passed its barrier."""
    priority: float = 0.0
    priority_barrier: bool = False
    budget: Budget | None = None
    guard: Guard | bool | None = None
    retries: int | None = Field(default=None, ge=0)
    timeout: Timeout | None = None
    """Seconds, or ``"300%"``: three times the median duration of the stage's successful
    attempts so far (the default's seconds until enough have succeeded)."""
    speculate: Speculate | None = None
    backend: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_-]*$")
    """Run this stage on another backend than the pipeline's (its settings are the
    pipeline's when it names the same type, the defaults otherwise)."""
    resources: Resources = Resources()
    on_failure: Literal["continue", "abort"] | None = None
    min_success: Annotated[float, Field(ge=0)] | None = None
    backoff: Backoff | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _STAGE_NAME.match(value):
            raise ValueError(
                "a stage name is 1-64 letters, digits, '_', '-' or '.', starting with a "
                "letter or digit (it names folders and log files)"
            )
        return value

    @field_validator("partitions", mode="before")
    @classmethod
    def _inline_list(cls, value: object) -> object:
        return {"items": value} if isinstance(value, list) else value

    @field_validator("group_by", mode="before")
    @classmethod
    def _group_shorthand(cls, value: object) -> object:
        return {"field": value} if isinstance(value, str) else value

    @field_validator("expect", mode="before")
    @classmethod
    def _expect_list(cls, value: object) -> object:
        if isinstance(value, list):
            return {str(name): {} for name in value}
        if isinstance(value, dict):
            return {name: ({} if spec is None else spec) for name, spec in value.items()}
        return value

    @field_validator("runner", mode="before")
    @classmethod
    def _runner_shorthand(cls, value: object) -> object:
        return {"type": value} if isinstance(value, str) else value

    _check_min_success = field_validator("min_success")(
        lambda value: None if value is None else _fraction_or_count(value)
    )

    @model_validator(mode="after")
    def _one_kind(self) -> StageConfig:
        kinds = [
            name
            for name, present in (
                ("partitions", self.partitions is not None),
                ("group_by", self.group_by is not None),
                ("single", self.single),
            )
            if present
        ]
        if len(kinds) > 1:
            raise ValueError(
                f"a stage is one kind: {' and '.join(kinds)} cannot both be set "
                "(partitions: one instance per partition; group_by: one per group of an "
                "upstream stage; single: one instance)"
            )
        if not kinds and len(self.needs) != 1:
            raise ValueError(
                "say what this stage fans out over: partitions (a map), group_by (fan-in over "
                "an upstream stage), single: true, or exactly one stage in needs to follow its "
                "partitions key by key"
            )
        return self

    @property
    def kind(self) -> Literal["map", "group", "single", "follow"]:
        if self.partitions is not None:
            return "map"
        if self.group_by is not None:
            return "group"
        if self.single:
            return "single"
        return "follow"


class PipelineConfig(_Model):
    """A whole ``pipeline.yaml``."""

    name: str
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    defaults: Defaults = Defaults()
    concurrency: int = Field(default=256, ge=1)
    budget: Budget | None = None
    backend: Annotated[BackendConfig, BeforeValidator(_backend)] = BackendConfig()
    notes: str = "wip/notes.md"
    summaries: str = "wip/stages"
    prices: dict[str, Price] = Field(default_factory=dict)
    stages: list[StageConfig] = Field(min_length=1)

    @field_validator("params")
    @classmethod
    def _scalar_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, item in value.items():
            if isinstance(item, dict | list):
                raise ValueError(f"pipeline parameter {name!r} must be a string or number")
        return value

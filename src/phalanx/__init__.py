"""phalanx: run many instances of one prompt-defined agent in parallel, one per data partition;
wait at a barrier, verify what each wrote, commit it atomically, and record every failure.

The public API is what this module exports; everything in underscore modules is internal.
"""

from ._api import fan_out, resume_run, run_pipeline
from ._blueprint import Blueprint, load_blueprint
from ._config import Backoff, Budget, ExpectSpec, Speculate
from ._errors import (
    BackendUnavailable,
    BlueprintError,
    ConfinementError,
    CycleError,
    FatalError,
    InstanceError,
    OutputConflictError,
    OutputInvalidError,
    PartitionError,
    PartitionKeyError,
    PermanentError,
    PhalanxError,
    PipelineError,
    ProjectBusyError,
    RateLimited,
    ReviewFailed,
    ReviewRejected,
    RunnerError,
    RunnerTimeout,
    UnknownPluginError,
    UsageError,
    WorkerLost,
)
from ._eventlog import EventLog, event_schema
from ._events import (
    AttemptEnded,
    AttemptStarted,
    BudgetReached,
    Event,
    EventHandler,
    InstanceEnded,
    LanePaused,
    LimitChanged,
    RunEnded,
    RunStarted,
    StageEnded,
    StageStarted,
)
from ._partitions import Partition, PartitionSource, load_partitions
from ._pipeline import InstancePlan, Pipeline, Plan, StagePlan, load_pipeline, plan_pipeline
from ._results import AttemptRecord, InstanceResult, RunResult, StageResult
from ._scheduler import RunHandle, run_plan
from ._usage import Usage
from .report import write_report
from .runners import InputRef, InstanceContext, Runner

__all__ = [
    "AttemptEnded",
    "AttemptRecord",
    "AttemptStarted",
    "BackendUnavailable",
    "Backoff",
    "Blueprint",
    "BlueprintError",
    "Budget",
    "BudgetReached",
    "ConfinementError",
    "CycleError",
    "Event",
    "EventHandler",
    "EventLog",
    "ExpectSpec",
    "FatalError",
    "InputRef",
    "InstanceContext",
    "InstanceEnded",
    "InstanceError",
    "InstancePlan",
    "InstanceResult",
    "LanePaused",
    "LimitChanged",
    "OutputConflictError",
    "OutputInvalidError",
    "Partition",
    "PartitionError",
    "PartitionKeyError",
    "PartitionSource",
    "PermanentError",
    "PhalanxError",
    "Pipeline",
    "PipelineError",
    "Plan",
    "ProjectBusyError",
    "RateLimited",
    "ReviewFailed",
    "ReviewRejected",
    "RunEnded",
    "RunHandle",
    "RunResult",
    "RunStarted",
    "Runner",
    "RunnerError",
    "RunnerTimeout",
    "Speculate",
    "StageEnded",
    "StagePlan",
    "StageResult",
    "StageStarted",
    "UnknownPluginError",
    "Usage",
    "UsageError",
    "WorkerLost",
    "event_schema",
    "fan_out",
    "load_blueprint",
    "load_partitions",
    "load_pipeline",
    "plan_pipeline",
    "resume_run",
    "run_pipeline",
    "run_plan",
    "write_report",
]

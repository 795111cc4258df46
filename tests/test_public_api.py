"""The public API is exactly what ``phalanx.__all__`` lists, and every error pickles."""

from __future__ import annotations

import pickle

import pytest

import phalanx

EXPECTED = {
    "AttemptEnded", "AttemptRecord", "AttemptStarted", "Backoff", "Blueprint", "BlueprintError",
    "Budget", "BudgetReached", "LanePaused", "LimitChanged", "Speculate", "EventLog",
    "event_schema",
    "ConfinementError", "CycleError", "Event", "EventHandler", "ExpectSpec", "FatalError",
    "InputRef",
    "InstanceContext", "InstanceEnded", "InstanceError", "InstancePlan", "InstanceResult",
    "OutputConflictError", "OutputInvalidError", "Partition", "PartitionError",
    "PartitionKeyError", "PartitionSource", "PermanentError", "PhalanxError", "Pipeline",
    "PipelineError", "Plan", "ProjectBusyError", "RateLimited", "RunEnded", "RunHandle",
    "RunResult", "RunStarted",
    "Runner", "RunnerError", "RunnerTimeout", "StageEnded", "StagePlan", "StageResult",
    "StageStarted", "UnknownPluginError", "Usage", "UsageError", "fan_out", "load_blueprint",
    "load_partitions", "load_pipeline", "plan_pipeline", "resume_run", "run_pipeline",
    "run_plan", "write_report", "BackendUnavailable", "WorkerLost",
    "ReviewFailed", "ReviewRejected",
}  # fmt: skip


def test_all_is_exactly_the_public_names() -> None:
    """``__all__`` is sorted, complete and holds nothing private."""
    assert phalanx.__all__ == sorted(phalanx.__all__)
    assert set(phalanx.__all__) == EXPECTED
    public = {name for name in vars(phalanx) if not name.startswith("_")}
    modules = {"runners", "report", "cli", "testing", "otel", "backends"}
    assert public - modules == EXPECTED


@pytest.mark.parametrize(
    "error",
    [
        phalanx.RunnerError("boom", detail="stderr tail"),
        phalanx.RunnerTimeout("slow"),
        phalanx.RateLimited("429", retry_after=2.5),
        phalanx.PermanentError("400: bad request"),
        phalanx.OutputInvalidError("bad json"),
        phalanx.ConfinementError("symlink"),
        phalanx.WorkerLost("the worker process (pid 7) was killed", detail="SIGKILL"),
        phalanx.ReviewRejected("the reviewer rejected the output: no sources"),
        phalanx.ReviewFailed("the reviewer wrote no verdict.json"),
        phalanx.BackendUnavailable("backend ray: pip install 'phalanx[ray]'"),
        phalanx.PipelineError("pipeline.yaml:3: bad"),
        phalanx.PartitionKeyError("orgs.json: item 2: bad key"),
    ],
)
def test_errors_pickle_with_their_details(error: phalanx.PhalanxError) -> None:
    """Errors cross process boundaries intact: type, message and detail survive pickling."""
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own object, round-tripped
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    if isinstance(error, phalanx.InstanceError):
        assert isinstance(copy, phalanx.InstanceError)
        assert copy.detail == error.detail
        assert copy.cause == error.cause
        assert copy.retry_after == error.retry_after
        assert copy.retryable == error.retryable


def test_usage_and_instance_errors_are_distinct_families() -> None:
    """A bad-input error is never mistaken for a failed attempt, and vice versa."""
    assert not issubclass(phalanx.PipelineError, phalanx.InstanceError)
    assert not issubclass(phalanx.RunnerError, phalanx.UsageError)
    assert issubclass(phalanx.OutputConflictError, phalanx.PipelineError)
    assert issubclass(phalanx.PartitionKeyError, phalanx.UsageError)

"""The exception hierarchy.

Two families matter to users. A :class:`UsageError` is bad input or configuration: it is raised
before anything runs, the CLI exits with code 2, and it is never retried. An
:class:`InstanceError` is one attempt of one instance going wrong: it is caught at the instance
boundary, retried by the stage's policy and, when the retries are spent, recorded in the notes.

Every exception here pickles (its constructor arguments are kept in ``args``) because later
backends move them across process boundaries.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "BackendUnavailable",
    "BlueprintError",
    "CallTimeout",
    "ConfinementError",
    "CycleError",
    "FatalError",
    "InstanceError",
    "OutputConflictError",
    "OutputInvalidError",
    "PartitionError",
    "PartitionKeyError",
    "PermanentError",
    "PhalanxError",
    "PipelineError",
    "ProjectBusyError",
    "RateLimited",
    "ReviewFailed",
    "ReviewRejected",
    "RunnerError",
    "RunnerTimeout",
    "UnknownPluginError",
    "UsageError",
    "WorkerLost",
]


class PhalanxError(Exception):
    """Base class of every error phalanx raises on purpose."""


class UsageError(PhalanxError):
    """Bad input or configuration, found before anything runs.

    The message names the file, the field (or row, or line) and the fix. The CLI exits with
    code 2 and writes nothing.
    """


class BlueprintError(UsageError):
    """A blueprint cannot be loaded, or cannot be rendered for a partition (missing parameter)."""


class PipelineError(UsageError):
    """A pipeline file is malformed or inconsistent (unknown field, bad value, unknown stage)."""


class OutputConflictError(PipelineError):
    """Two instances (of one stage or of two) would own the same output path, or one would own a
    path inside another's; or an output would land outside the project or inside phalanx's state.
    """


class CycleError(PipelineError):
    """The stages' ``needs`` form a cycle."""


class PartitionError(UsageError):
    """A partition source cannot be read or one of its rows is malformed."""


class PartitionKeyError(PartitionError):
    """A partition key is not a safe path segment, or is not unique within its stage."""


class ProjectBusyError(UsageError):
    """Another phalanx run holds the project's lock; the message names it (run id, pid)."""


class UnknownPluginError(UsageError):
    """A runner (or backend) name is not registered, or its optional dependency is missing."""


class BackendUnavailable(UsageError):
    """The run's backend cannot be used: its optional dependency is not installed (the message
    gives the ``pip install`` command), or its cluster cannot be reached at the configured
    address. Raised before anything runs."""


class InstanceError(PhalanxError):
    """One attempt of one instance failed. Retried by policy, then recorded with its cause.

    ``cause`` is a short, stable class name for grouping failures (``timeout``,
    ``runner-error``, ``output-invalid``, ...); the message says what happened in words.
    ``retry_after`` (seconds), when given, is the least the next attempt must wait, whatever
    the backoff draws (a provider's ``retry-after``). An error with ``retryable`` false ends the
    instance at once: retrying cannot help (a 400, an unknown model).
    """

    cause = "error"
    retryable = True
    stops_run = False

    def __init__(self, message: str, *, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(message, detail, retry_after)
        self.message = message
        self.detail = detail
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_instance_error,
            (type(self), self.message, self.detail, self.retry_after),
        )

    def __str__(self) -> str:
        return self.message


def _rebuild_instance_error(
    cls: type[InstanceError], message: str, detail: str, retry_after: float | None
) -> InstanceError:
    return cls(message, detail=detail, retry_after=retry_after)


class RunnerError(InstanceError):
    """The runner reported failure: the agent raised, or its process exited non-zero."""

    cause = "runner-error"


class RunnerTimeout(RunnerError):
    """The attempt ran longer than the stage's ``timeout`` and was stopped (a ``command`` agent's
    whole process group is killed)."""

    cause = "timeout"


class CallTimeout(RunnerError):
    """One model call got no answer within the client's own per-call timeout. Unlike
    :class:`RunnerTimeout` (the whole attempt overran the stage's ``timeout`` and was stopped),
    this is a single request; a lane (:mod:`phalanx._lanes`) takes it as a sign the provider
    is overloaded and lowers its concurrency before the error fails the attempt."""

    cause = "timeout"


class RateLimited(RunnerError):
    """The provider refused the call for now (429, 529, 503); ``retry_after`` says how long it
    asked us to wait, when it said. ``headers`` are the refusal's rate-limit headers (only
    those: ``retry-after`` and the ``*ratelimit*`` family, never cookies), from which a lane
    re-synchronises its token buckets."""

    cause = "rate-limited"

    def __init__(
        self,
        message: str,
        *,
        detail: str = "",
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, detail=detail, retry_after=retry_after)
        self.headers: Mapping[str, str] | None = dict(headers) if headers is not None else None

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_rate_limited,
            (type(self), self.message, self.detail, self.retry_after, self.headers),
        )


def _rebuild_rate_limited(
    cls: type[RateLimited],
    message: str,
    detail: str,
    retry_after: float | None,
    headers: Mapping[str, str] | None,
) -> RateLimited:
    return cls(message, detail=detail, retry_after=retry_after, headers=headers)


class WorkerLost(RunnerError):
    """The process or cluster node executing the attempt died under it (a worker process
    killed or crashed, a Ray node lost). The attempt failed; another attempt may run
    elsewhere, so it is retried like any runner failure."""

    cause = "worker-lost"


class PermanentError(RunnerError):
    """The attempt failed in a way another attempt cannot fix (a 400, a 404, an unknown model):
    the instance fails without retrying."""

    cause = "permanent"
    retryable = False


class FatalError(PermanentError):
    """Every instance would fail the same way (a rejected API key: 401, 403; an account with no
    quota left): the first one stops the whole run, instead of spending one failure per
    partition on it."""

    cause = "fatal"
    stops_run = True


class OutputInvalidError(InstanceError):
    """The attempt finished but what it wrote fails validation: a missing or empty expected file,
    a ``.json`` file that does not parse or does not match its schema, or a failing check command.
    """

    cause = "output-invalid"


class ReviewRejected(OutputInvalidError):
    """The stage's reviewer read the attempt's outputs and found completion criteria unmet;
    the message gives its reasons, which the next attempt receives as feedback."""

    cause = "review-rejected"


class ReviewFailed(RunnerError):
    """The stage's reviewer could not give a verdict: it failed, ran past its timeout, wrote no
    valid ``verdict.json``, or changed the files it was reviewing."""

    cause = "review-failed"


class ConfinementError(InstanceError):
    """The attempt wrote something it may not: a symlink, or a path outside its staging
    directory."""

    cause = "confinement"

"""The exception hierarchy.

Two families matter to users. A :class:`UsageError` is bad input or configuration: it is raised
before anything runs, the CLI exits with code 2, and it is never retried. An
:class:`InstanceError` is one attempt of one instance going wrong: it is caught at the instance
boundary, retried by the stage's policy and, when the retries are spent, recorded in the notes.

Every exception here pickles (its constructor arguments are kept in ``args``) because later
backends move them across process boundaries.
"""

from __future__ import annotations

__all__ = [
    "BlueprintError",
    "ConfinementError",
    "CycleError",
    "InstanceError",
    "OutputConflictError",
    "OutputInvalidError",
    "PartitionError",
    "PartitionKeyError",
    "PhalanxError",
    "PipelineError",
    "RunnerError",
    "RunnerTimeout",
    "UnknownPluginError",
    "UsageError",
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


class UnknownPluginError(UsageError):
    """A runner (or backend) name is not registered, or its optional dependency is missing."""


class InstanceError(PhalanxError):
    """One attempt of one instance failed. Retried by policy, then recorded with its cause.

    ``cause`` is a short, stable class name for grouping failures (``timeout``, ``exit-code``,
    ``output-invalid``, ...); the message says what happened in words.
    """

    cause = "error"

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message, detail)
        self.message = message
        self.detail = detail

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_instance_error, (type(self), self.message, self.detail))

    def __str__(self) -> str:
        return self.message


def _rebuild_instance_error(cls: type[InstanceError], message: str, detail: str) -> InstanceError:
    return cls(message, detail=detail)


class RunnerError(InstanceError):
    """The runner reported failure: the agent raised, or its process exited non-zero."""

    cause = "runner-error"


class RunnerTimeout(RunnerError):
    """The attempt ran longer than the stage's ``timeout`` and was stopped (a ``command`` agent's
    whole process group is killed)."""

    cause = "timeout"


class OutputInvalidError(InstanceError):
    """The attempt finished but what it wrote fails validation: a missing or empty expected file,
    a ``.json`` file that does not parse or does not match its schema, or a failing check command.
    """

    cause = "output-invalid"


class ConfinementError(InstanceError):
    """The attempt wrote something it may not: a symlink, or a path outside its staging
    directory."""

    cause = "confinement"

"""What every runner shares: the instance context it is handed and the small base class."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from .._usage import Usage

__all__ = ["Gate", "InputRef", "InstanceContext", "Runner", "Sent", "Usage"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Sent(Generic[_T]):
    """What one model call returned: the parsed reply, the response's headers (rate-limit
    headers are read from them) and the tokens the call used, input (cached included) plus
    output."""

    value: _T
    headers: Mapping[str, str]
    tokens: int


class Gate:
    """The way an attempt's model calls go out. This one sends them straight away; the
    scheduler hands API runners a gate of their lane (:mod:`phalanx._lanes`) that waits for the
    lane's pauses and token buckets before a call, reserves ``estimate`` tokens (the input's
    estimate plus ``max_tokens``), settles against what the call used, and sends a call that
    was refused (:class:`~phalanx.RateLimited`) again instead of failing the attempt."""

    async def request(self, send: Callable[[], Awaitable[Sent[_T]]], *, estimate: int) -> _T:
        """Send one call through the gate and return its reply's value."""
        del estimate
        return (await send()).value


_DIRECT = Gate()


@dataclass(frozen=True)
class InputRef:
    """One upstream output an instance reads: the upstream stage, its key and its folder."""

    stage: str
    key: str
    path: Path


@dataclass(frozen=True)
class InstanceContext:
    """Everything one attempt of one instance knows.

    ``output_dir`` is the attempt's private staging folder: write every output file there.
    phalanx validates it when the runner returns and, only if it passes, moves it to
    ``final_dir`` in one atomic rename. ``inputs`` are the committed outputs of upstream
    instances this instance reads (for a group: its members, in plan order); read them, never
    write them. ``missing`` names upstream instances this one would read but that did not commit.
    ``expected`` are the file names the stage expects in ``output_dir``; ``reads`` the
    project-relative reference paths the stage declares. ``feedback`` is why the previous
    attempt's output was rejected (empty on a first attempt, or after another kind of failure),
    for agents that can learn from it. LLM runners add what they spend to ``usage`` and send
    every model call through ``gate``.
    """

    run_id: str
    stage: str
    key: str
    attempt: int
    params: Mapping[str, object]
    prompt: str
    output_dir: Path
    final_dir: Path
    inputs: tuple[InputRef, ...]
    missing: tuple[str, ...]
    project_dir: Path
    log_dir: Path
    blueprint: Path | None
    timeout: float
    expected: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    feedback: str = ""
    usage: Usage = field(default_factory=Usage)
    gate: Gate = _DIRECT


class Runner(abc.ABC):
    """Executes one attempt of one instance.

    ``run`` returns when the agent is done writing into ``ctx.output_dir`` and raises an
    :class:`~phalanx.InstanceError` subclass when the attempt failed. It must honour
    cancellation: phalanx cancels it on timeout, abort and Ctrl-C, and whatever it started
    (threads aside) must be stopped before the cancellation propagates.
    """

    type: ClassVar[str]
    lane: Hashable | None = None
    """Runners that call a model API name their lane: calls with the same provider, endpoint,
    model and credential share one concurrency limit and one set of rate-limit buckets."""

    @abc.abstractmethod
    async def run(self, ctx: InstanceContext) -> None:
        """Run one attempt."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most runners hold nothing
        """Release what the runner holds (clients, pools). Called once when the stage ends."""

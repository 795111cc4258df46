"""What every runner shares: the instance context it is handed and the small base class."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .._usage import Usage

__all__ = ["InputRef", "InstanceContext", "Runner", "Usage"]


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
    for agents that can learn from it. LLM runners add what they spend to ``usage``.
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


class Runner(abc.ABC):
    """Executes one attempt of one instance.

    ``run`` returns when the agent is done writing into ``ctx.output_dir`` and raises an
    :class:`~phalanx.InstanceError` subclass when the attempt failed. It must honour
    cancellation: phalanx cancels it on timeout, abort and Ctrl-C, and whatever it started
    (threads aside) must be stopped before the cancellation propagates.
    """

    type: ClassVar[str]

    @abc.abstractmethod
    async def run(self, ctx: InstanceContext) -> None:
        """Run one attempt."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most runners hold nothing
        """Release what the runner holds (clients, pools). Called once when the stage ends."""

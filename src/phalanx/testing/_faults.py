"""Injected faults: which requests fail, and how. Deterministic for a given seed and order of
requests, and counted per rule."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ._models import Api

__all__ = ["Fault", "FaultKind", "FaultPlan"]

FaultKind = Literal["error", "reset", "cut_stream", "malformed_tool_call"]

_BEFORE: frozenset[FaultKind] = frozenset({"error", "reset"})


@dataclass(frozen=True)
class Fault:
    """One fault-injection rule. Build it with :meth:`error`, :meth:`reset`,
    :meth:`cut_stream` or :meth:`malformed_tool_call`.

    A rule is asked about every model request it applies to (``api`` and ``model``, when set,
    narrow that; a cut applies only to streaming requests, a malformed tool call only to replies
    that call a tool). It fires for the first ``first`` requests it is asked about, or, when
    ``first`` is ``None``, with probability ``probability`` drawn from a generator seeded by the
    server's ``seed`` and the rule's position. Rules are asked in order and the first that fires
    decides; a request that no rule fires on is answered normally.
    """

    kind: FaultKind
    status: int = 500
    code: str | None = None
    first: int | None = None
    probability: float = 1.0
    model: str | None = None
    api: Api | None = None
    after_events: int = 3

    def __post_init__(self) -> None:
        if self.first is not None and self.first < 0:
            raise ValueError(f"Fault.first must be >= 0, not {self.first}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"Fault.probability must be within [0, 1], not {self.probability}")
        if not 400 <= self.status <= 599:
            raise ValueError(f"Fault.status must be an HTTP error status, not {self.status}")
        if self.after_events < 1:
            raise ValueError(f"Fault.after_events must be >= 1, not {self.after_events}")

    @classmethod
    def error(
        cls,
        status: int,
        *,
        code: str | None = None,
        first: int | None = None,
        probability: float = 1.0,
        model: str | None = None,
        api: Api | None = None,
    ) -> Fault:
        """Answer with HTTP ``status`` and the API's error body. The error type follows the
        status (529: ``overloaded_error``, 401: ``authentication_error`` with
        ``x-should-retry: false``, ...); ``code`` replaces it (Anthropic's ``error.type``,
        OpenAI's ``error.type`` and ``error.code``), e.g. ``Fault.error(429,
        code="insufficient_quota")`` for OpenAI's billing error."""
        return cls(
            "error",
            status=status,
            code=code,
            first=first,
            probability=probability,
            model=model,
            api=api,
        )

    @classmethod
    def reset(
        cls,
        *,
        first: int | None = None,
        probability: float = 1.0,
        model: str | None = None,
        api: Api | None = None,
    ) -> Fault:
        """Reset the connection (TCP RST) before answering: the SDKs raise a connection
        error."""
        return cls("reset", first=first, probability=probability, model=model, api=api)

    @classmethod
    def cut_stream(
        cls,
        *,
        after_events: int = 3,
        first: int | None = None,
        probability: float = 1.0,
        model: str | None = None,
        api: Api | None = None,
    ) -> Fault:
        """Close the connection of a streaming response after ``after_events`` server-sent
        events, without ending the body: the SDKs raise while iterating."""
        return cls(
            "cut_stream",
            first=first,
            probability=probability,
            model=model,
            api=api,
            after_events=after_events,
        )

    @classmethod
    def malformed_tool_call(
        cls,
        *,
        first: int | None = None,
        probability: float = 1.0,
        model: str | None = None,
        api: Api | None = None,
    ) -> Fault:
        """Send the reply's tool calls with broken arguments: JSON that does not parse
        (OpenAI ``arguments``, Anthropic streamed ``partial_json``) or, in a non-streamed
        Anthropic response, an ``input`` that is a string rather than an object."""
        return cls(
            "malformed_tool_call", first=first, probability=probability, model=model, api=api
        )


class FaultPlan:
    """The rules with their generators and counters (owned by one server)."""

    def __init__(self, rules: Sequence[Fault], seed: int) -> None:
        self.rules = tuple(rules)
        self._random = [random.Random(f"{seed}:{i}") for i in range(len(self.rules))]  # noqa: S311 - simulated faults, not secrets
        self.asked = [0] * len(self.rules)
        self.fired = [0] * len(self.rules)

    def pick(
        self, api: Api, model: str, *, stream: bool, has_tool_calls: bool | None
    ) -> Fault | None:
        """The fault for this request, or ``None``. ``has_tool_calls`` is ``None`` before the
        model has answered (only ``error`` and ``reset`` rules are asked then), and says whether
        the reply calls a tool afterwards (only ``cut_stream`` and ``malformed_tool_call``)."""
        for index, rule in enumerate(self.rules):
            if (rule.kind in _BEFORE) != (has_tool_calls is None):
                continue
            if rule.api not in (None, api) or rule.model not in (None, model):
                continue
            if rule.kind == "cut_stream" and not stream:
                continue
            if rule.kind == "malformed_tool_call" and not has_tool_calls:
                continue
            seen = self.asked[index]
            self.asked[index] += 1
            if rule.first is not None:
                fires = seen < rule.first
            else:
                fires = self._random[index].random() < rule.probability
            if fires:
                self.fired[index] += 1
                return rule
        return None

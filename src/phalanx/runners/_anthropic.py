"""The ``anthropic`` runner: the Messages API with phalanx's file tools.

The blueprint is the system prompt (inline mode), or the instance is told which blueprint file
to read (reference mode). The conversation runs until the model ends its turn, ``max_turns``,
or ``max_tokens``. The SDK's own retries are off (``max_retries=0``) so every 429 and 529
reaches phalanx: each call goes through the attempt's gate (``ctx.gate``), which in a run is
its lane's, pacing calls by the ``anthropic-ratelimit-*`` headers and sending a refused call
again after the ``retry-after``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._config import AnthropicRunnerConfig
from .._errors import CallTimeout, RunnerError
from .._prices import Price, add_cost
from ._base import InstanceContext, Sent, Usage
from ._llm import (
    APIRunner,
    Clients,
    Transcript,
    classify_status,
    estimate_tokens,
    limit_headers,
    opening,
    provider_message,
    retry_after_seconds,
)

if TYPE_CHECKING:
    import anthropic

__all__ = ["AnthropicRunner"]


class AnthropicRunner(APIRunner):
    """Runs an instance as a Messages conversation; see the module docstring."""

    type = "anthropic"
    provider = "anthropic"
    client_class = "AsyncAnthropic"
    client: anthropic.AsyncAnthropic

    def __init__(
        self,
        config: AnthropicRunnerConfig,
        *,
        model: str,
        reference: bool,
        prices: Mapping[str, Price],
        clients: Clients | None = None,
        blueprint_tools: Sequence[str] = (),
    ) -> None:
        super().__init__(config, model=model, reference=reference, prices=prices, clients=clients)
        self.config = config
        self.server_tools = [*config.server_tools, *_named_server_tools(blueprint_tools)]

    async def run(self, ctx: InstanceContext) -> None:
        tools, system, user = opening(ctx, reference=self.reference)
        messages: list[dict[str, Any]] = [{"role": "user", "content": user}]
        transcript = Transcript(ctx)
        try:
            transcript.write("request", model=self.model, system=system, messages=messages)
            offered = [*tools.definitions("anthropic"), *self.server_tools]
            for _turn in range(self.config.max_turns):
                reply = await self._create(system, messages, offered, ctx)
                blocks = [_echo(block) for block in reply.content]
                messages.append({"role": "assistant", "content": blocks})
                transcript.write("assistant", content=blocks, stop_reason=reply.stop_reason)
                if reply.stop_reason == "pause_turn":
                    continue  # a long server-tool turn: send it back for Anthropic to resume
                calls = [block for block in reply.content if block.type == "tool_use"]
                if not calls:
                    return
                results = []
                for call in calls:
                    result = tools.call(call.name, call.input)
                    transcript.write(
                        "tool", name=call.name, error=result.is_error, result=result.text[:2000]
                    )
                    results.append(
                        {
                            "type": "tool_result",
                            "tool_use_id": call.id,
                            "content": result.text,
                            "is_error": result.is_error,
                        }
                    )
                messages.append({"role": "user", "content": results})
            raise RunnerError(
                f"the model was still calling tools after max_turns={self.config.max_turns}"
            )
        finally:
            transcript.close()

    async def _create(
        self,
        system: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        ctx: InstanceContext,
    ) -> Any:
        extra: dict[str, Any] = {}
        if self.config.temperature is not None:
            extra["temperature"] = self.config.temperature
        request = {"system": system, "messages": messages, "tools": tools}
        reply = await ctx.gate.request(
            lambda: self._send(system, messages, tools, extra),
            estimate=estimate_tokens(request, self.config.max_tokens),
        )
        self._account(reply, ctx.usage)
        return reply

    async def _send(
        self,
        system: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        extra: dict[str, Any],
    ) -> Sent[Any]:
        """One Messages call, its errors mapped onto phalanx's; the reply with its rate-limit
        headers and the tokens it used (input, cached and output)."""
        sdk = self.sdk
        try:
            raw = await self.client.messages.with_raw_response.create(
                model=self.model,
                system=system,
                messages=messages,  # type: ignore[arg-type]
                tools=tools,  # type: ignore[arg-type]
                max_tokens=self.config.max_tokens,
                **extra,
            )
            reply = await raw.parse()
        except sdk.APIStatusError as exc:
            raise classify_status(
                exc.status_code,
                provider_message(exc.body, str(exc.message)),
                retry_after=retry_after_seconds(exc.response.headers),
                headers=limit_headers(exc.response.headers),
            ) from exc
        except sdk.APITimeoutError as exc:
            raise CallTimeout(f"the model did not answer in time: {exc}") from exc
        except sdk.APIConnectionError as exc:
            raise RunnerError(f"connection to the model failed: {exc}") from exc
        used = reply.usage
        tokens = (
            used.input_tokens
            + (used.cache_read_input_tokens or 0)
            + (used.cache_creation_input_tokens or 0)
            + used.output_tokens
        )
        return Sent(reply, limit_headers(raw.headers), tokens)

    def _account(self, reply: Any, usage: Usage) -> None:
        used = reply.usage
        spent = Usage(
            requests=1,
            input_tokens=used.input_tokens,  # Anthropic's already excludes cached tokens
            output_tokens=used.output_tokens,
            cache_read_tokens=used.cache_read_input_tokens or 0,
            cache_write_tokens=used.cache_creation_input_tokens or 0,
        )
        add_cost(usage, spent, self.model, self.prices)


def _echo(block: Any) -> dict[str, Any]:
    """An assistant content block as it is sent back in the next request. A tool call whose
    input is not an object (a malformed call) is echoed with an empty one; the tool result then
    tells the model what was wrong."""
    if block.type == "text":
        return {"type": "text", "text": block.text}
    if block.type == "tool_use":
        arguments = block.input if isinstance(block.input, dict) else {}
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": arguments}
    dumped: dict[str, Any] = block.model_dump(exclude_none=True)
    return dumped


_SERVER_TOOLS = {"web_search": {"type": "web_search_20250305", "name": "web_search"}}
"""Provider-side tools a blueprint may name in its ``tools`` list."""


def _named_server_tools(names: Sequence[str]) -> list[dict[str, Any]]:
    return [dict(_SERVER_TOOLS[name]) for name in names if name in _SERVER_TOOLS]

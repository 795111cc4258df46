"""The ``openai`` runner: Chat Completions with phalanx's file tools.

Works against OpenAI and every server that speaks its API (vLLM, Ollama, llama.cpp's server,
LM Studio): set ``base_url``. The SDK's own retries are off (``max_retries=0``) so every 429 and
5xx reaches phalanx: each call goes through the attempt's gate (``ctx.gate``), which in a run is
its lane's, pacing calls by the ``x-ratelimit-*`` headers and sending a refused call again after
the ``retry-after``; other errors fail the attempt, which the scheduler retries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._config import OpenAIRunnerConfig
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
    import openai

__all__ = ["OpenAIRunner"]


class OpenAIRunner(APIRunner):
    """Runs an instance as a Chat Completions conversation; see the module docstring."""

    type = "openai"
    provider = "openai"
    client_class = "AsyncOpenAI"
    client: openai.AsyncOpenAI

    def __init__(
        self,
        config: OpenAIRunnerConfig,
        *,
        model: str,
        reference: bool,
        prices: Mapping[str, Price],
        clients: Clients | None = None,
    ) -> None:
        super().__init__(config, model=model, reference=reference, prices=prices, clients=clients)
        self.config = config

    async def run(self, ctx: InstanceContext) -> None:
        tools, system, user = opening(ctx, reference=self.reference)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ]
        transcript = Transcript(ctx)
        try:
            transcript.write("request", model=self.model, messages=messages)
            for _turn in range(self.config.max_turns):
                reply = await self._complete(messages, tools.definitions("openai"), ctx)
                choice = reply.choices[0]
                message = choice.message
                calls = message.tool_calls or []
                messages.append(message.model_dump(exclude_none=True))
                transcript.write(
                    "assistant",
                    content=message.content,
                    tool_calls=[call.model_dump() for call in calls],
                    finish_reason=choice.finish_reason,
                )
                if not calls:
                    return
                for call in calls:
                    result = _call_tool(tools, call.function.name, call.function.arguments)
                    transcript.write(
                        "tool", name=call.function.name, error=result[1], result=result[0][:2000]
                    )
                    messages.append({"role": "tool", "tool_call_id": call.id, "content": result[0]})
            raise RunnerError(
                f"the model was still calling tools after max_turns={self.config.max_turns}"
            )
        finally:
            transcript.close()

    async def _complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], ctx: InstanceContext
    ) -> Any:
        extra: dict[str, Any] = {}
        if self.config.temperature is not None:
            extra["temperature"] = self.config.temperature
        estimate = estimate_tokens({"messages": messages, "tools": tools}, self.config.max_tokens)
        reply = await ctx.gate.request(
            lambda: self._send(messages, tools, extra, estimate), estimate=estimate
        )
        usage = ctx.usage
        spent = Usage(requests=1)
        if reply.usage is not None:
            details = reply.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details is not None else 0
            spent.input_tokens = reply.usage.prompt_tokens - cached  # OpenAI counts cached in
            spent.cache_read_tokens = cached
            spent.output_tokens = reply.usage.completion_tokens
        add_cost(usage, spent, self.model, self.prices)
        if not reply.choices:
            raise RunnerError("the model returned no choices")
        return reply

    async def _send(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        extra: dict[str, Any],
        estimate: int,
    ) -> Sent[Any]:
        """One Chat Completions call, its errors mapped onto phalanx's; the reply with its
        rate-limit headers and the tokens it used (prompt, cached included, and completion;
        the ``estimate`` when a server reports no usage)."""
        sdk = self.sdk
        try:
            raw = await self.client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                tools=tools,  # type: ignore[arg-type]
                max_tokens=self.config.max_tokens,
                **extra,
            )
            reply = raw.parse()
        except sdk.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            code = body.get("code") or getattr(exc, "code", None)
            raise classify_status(
                exc.status_code,
                provider_message(exc.body, str(exc.message)),
                retry_after=retry_after_seconds(exc.response.headers),
                code=code if isinstance(code, str) else None,
                headers=limit_headers(exc.response.headers),
            ) from exc
        except sdk.APITimeoutError as exc:
            raise CallTimeout(f"the model did not answer in time: {exc}") from exc
        except sdk.APIConnectionError as exc:
            raise RunnerError(f"connection to the model failed: {exc}") from exc
        used = reply.usage
        tokens = used.prompt_tokens + used.completion_tokens if used is not None else estimate
        return Sent(reply, limit_headers(raw.headers), tokens)


def _call_tool(tools: Any, name: str, arguments: str) -> tuple[str, bool]:
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        return f"{name}: the arguments are not valid JSON ({exc.msg}); send a JSON object", True
    result = tools.call(name, parsed)
    return result.text, result.is_error

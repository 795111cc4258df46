"""Injected faults raise the SDKs' own typed errors, and the rules fire as configured:
deterministically, counted, for the first N requests or with a seeded probability."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from phalanx.testing import Fault, LoopbackLLM

PROMPT = "Expected files: `a.json`."
A_TOOLS: list[anthropic.types.ToolParam] = [
    {"name": "write_file", "input_schema": {"type": "object", "properties": {}}}
]
O_TOOLS: list[openai.types.chat.ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object"}}}
]


def _anthropic(server: LoopbackLLM) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.url, api_key="sk-test", max_retries=0)


def _openai(server: LoopbackLLM) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)


async def _ask_anthropic(client: anthropic.AsyncAnthropic, model: str = "claude-test") -> str:
    message = await client.messages.create(
        model=model, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    return message.stop_reason or ""


async def _ask_openai(client: openai.AsyncOpenAI) -> str:
    completion = await client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]
    )
    return completion.choices[0].finish_reason


@pytest.mark.parametrize(
    ("status", "anthropic_error", "openai_error"),
    [
        (500, anthropic.InternalServerError, openai.InternalServerError),
        (503, anthropic.ServiceUnavailableError, openai.InternalServerError),
        (529, anthropic.OverloadedError, openai.InternalServerError),
        (400, anthropic.BadRequestError, openai.BadRequestError),
        (404, anthropic.NotFoundError, openai.NotFoundError),
        (401, anthropic.AuthenticationError, openai.AuthenticationError),
    ],
)
def test_error_statuses_raise_the_sdks_typed_errors(
    status: int, anthropic_error: type[Exception], openai_error: type[Exception]
) -> None:
    """Each status comes with each API's error body, so each SDK raises its own class."""

    async def scenario() -> None:
        async with (
            LoopbackLLM(faults=[Fault.error(status)]) as server,
            _anthropic(server) as a,
            _openai(server) as o,
        ):
            with pytest.raises(anthropic_error) as caught_a:
                await _ask_anthropic(a)
            with pytest.raises(openai_error) as caught_o:
                await _ask_openai(o)
            for caught in (caught_a.value, caught_o.value):
                assert isinstance(caught, anthropic.APIStatusError | openai.APIStatusError)
                assert caught.status_code == status
                should_retry = caught.response.headers.get("x-should-retry")
                assert should_retry == ("false" if status == 401 else None)
            assert server.counters.faults == 2
            assert [r.fault for r in server.requests] == ["error", "error"]

    asyncio.run(scenario())


def test_overloaded_body_and_insufficient_quota() -> None:
    """529 says ``overloaded_error``; OpenAI's billing 429 carries ``insufficient_quota``."""

    async def scenario() -> None:
        faults = [
            Fault.error(529, api="anthropic"),
            Fault.error(429, code="insufficient_quota", api="openai"),
        ]
        async with (
            LoopbackLLM(faults=faults) as server,
            _anthropic(server) as a,
            _openai(server) as o,
        ):
            with pytest.raises(anthropic.OverloadedError) as overloaded:
                await _ask_anthropic(a)
            assert isinstance(overloaded.value.body, dict)
            assert overloaded.value.body["error"]["type"] == "overloaded_error"
            with pytest.raises(openai.RateLimitError) as quota:
                await _ask_openai(o)
            assert quota.value.code == "insufficient_quota"
            assert quota.value.type == "insufficient_quota"
            assert server.counters.fault_hits == (1, 1)
            assert server.counters.rate_limited == 0

    asyncio.run(scenario())


def test_first_n_and_model_filter() -> None:
    """``first=2`` fails exactly the first two requests of the named model; other models and
    later requests are answered."""

    async def scenario() -> None:
        faults = [Fault.error(500, first=2, model="flaky")]
        async with LoopbackLLM(faults=faults) as server, _anthropic(server) as client:
            assert await _ask_anthropic(client, "steady") == "end_turn"
            for _ in range(2):
                with pytest.raises(anthropic.InternalServerError):
                    await _ask_anthropic(client, "flaky")
            assert await _ask_anthropic(client, "flaky") == "end_turn"
            assert server.counters.fault_hits == (2,)
            assert [r.status for r in server.requests] == [200, 500, 500, 200]

    asyncio.run(scenario())


def test_probability_is_deterministic_for_a_seed() -> None:
    """The same seed fails the same requests; the rate is roughly the probability."""

    async def outcomes(seed: int) -> list[bool]:
        faults = [Fault.error(503, probability=0.5)]
        async with LoopbackLLM(faults=faults, seed=seed) as server, _openai(server) as client:
            results = []
            for _ in range(40):
                try:
                    await _ask_openai(client)
                    results.append(True)
                except openai.InternalServerError:
                    results.append(False)
            assert server.counters.faults == results.count(False)
            return results

    first = asyncio.run(outcomes(seed=1))
    assert asyncio.run(outcomes(seed=1)) == first
    assert asyncio.run(outcomes(seed=2)) != first
    assert 8 <= first.count(False) <= 32


def test_connection_reset() -> None:
    """A reset before answering is a connection error in both SDKs."""

    async def scenario() -> None:
        async with (
            LoopbackLLM(faults=[Fault.reset()]) as server,
            _anthropic(server) as a,
            _openai(server) as o,
        ):
            with pytest.raises(anthropic.APIConnectionError):
                await _ask_anthropic(a)
            with pytest.raises(openai.APIConnectionError):
                await _ask_openai(o)
            assert [(r.status, r.fault) for r in server.requests] == [(None, "reset")] * 2

    asyncio.run(scenario())


def test_stream_cut_midway() -> None:
    """A stream closed after a few events raises while iterating: a protocol error from the
    anthropic SDK (not wrapped), ``APIConnectionError`` from openai. Non-streamed requests are
    not cut."""

    async def scenario() -> None:
        faults = [Fault.cut_stream(after_events=3)]
        async with (
            LoopbackLLM(faults=faults) as server,
            _anthropic(server) as a,
            _openai(server) as o,
        ):
            assert await _ask_anthropic(a) == "end_turn"
            seen: list[str] = []

            async def consume() -> None:
                async with a.messages.stream(
                    model="claude-test",
                    max_tokens=50,
                    messages=[{"role": "user", "content": "a long enough question"}],
                ) as stream:
                    async for event in stream:
                        seen.append(event.type)

            with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)):
                await consume()
            assert seen[0] == "message_start"
            assert "message_stop" not in seen
            chunks = await o.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            with pytest.raises(openai.APIConnectionError):
                async for _ in chunks:
                    pass
            assert server.counters.fault_hits == (2,)
            assert [r.fault for r in server.requests] == [None, "cut_stream", "cut_stream"]

    asyncio.run(scenario())


def test_malformed_tool_call_anthropic() -> None:
    """A malformed tool call: non-streamed, ``input`` is a string, not an object; streamed,
    the ``partial_json`` does not parse and the SDK's stream helper raises. Replies without a
    tool call are not affected."""

    async def scenario() -> None:
        async with (
            LoopbackLLM(faults=[Fault.malformed_tool_call()]) as server,
            _anthropic(server) as client,
        ):
            assert await _ask_anthropic(client) == "end_turn"
            kwargs: dict[str, Any] = {
                "model": "claude-test",
                "max_tokens": 4096,
                "tools": A_TOOLS,
                "messages": [{"role": "user", "content": PROMPT}],
            }
            message = await client.messages.create(**kwargs)
            block = next(b for b in message.content if b.type == "tool_use")
            assert isinstance(block.input, str)
            with pytest.raises(ValueError, match="Unable to parse tool parameter JSON"):
                async with client.messages.stream(**kwargs) as stream:
                    await stream.get_final_message()
            raw = await client.messages.create(stream=True, **kwargs)
            partial = ""
            async for event in raw:
                if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                    partial += event.delta.partial_json
            with pytest.raises(ValueError, match="Expecting"):
                json.loads(partial)
            assert server.counters.fault_hits == (3,)

    asyncio.run(scenario())


def test_malformed_tool_call_openai() -> None:
    """OpenAI tool-call ``arguments`` that are not valid JSON, streamed or not."""
    with (
        LoopbackLLM(faults=[Fault.malformed_tool_call(api="openai")]).running_in_thread() as s,
        openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test", max_retries=0) as client,
    ):
        messages: list[openai.types.chat.ChatCompletionMessageParam] = [
            {"role": "user", "content": PROMPT}
        ]
        completion = client.chat.completions.create(
            model="gpt-test", messages=messages, tools=O_TOOLS
        )
        calls = completion.choices[0].message.tool_calls or []
        assert calls
        assert calls[0].type == "function"
        with pytest.raises(ValueError, match="Expecting"):
            json.loads(calls[0].function.arguments)
        arguments = ""
        for chunk in client.chat.completions.create(
            model="gpt-test", messages=messages, tools=O_TOOLS, stream=True
        ):
            for piece in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                if piece.function and piece.function.arguments:
                    arguments += piece.function.arguments
        assert arguments.startswith('{"path": "a.json"')
        with pytest.raises(ValueError, match="Expecting"):
            json.loads(arguments)
        assert s.counters.faults == 2

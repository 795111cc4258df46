"""The loopback server through the real ``anthropic`` SDK: messages, streams, tool round trips,
usage, token counting, the prompt cache, and what Claude Code sends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import anthropic
import pytest
from anthropic.types import Message, MessageParam, ToolParam

from phalanx.testing import LoopbackLLM

PROMPT = "Research the organization. Expected files: `a.json`, `b.md`."
TOOLS: list[ToolParam] = [
    {
        "name": "write_file",
        "description": "Write a file into the output folder.",
        "input_schema": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
    }
]


def _client(server: LoopbackLLM) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.url, api_key="sk-test", max_retries=0)


def _assistant_turn(message: Message) -> MessageParam:
    """The assistant message to send back, rebuilt from the response's blocks."""
    content: list[Any] = []
    for block in message.content:
        if block.type == "text":
            content.append({"type": "text", "text": block.text})
        elif block.type == "tool_use":
            content.append(
                {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
            )
    return {"role": "assistant", "content": content}


async def _agent(client: anthropic.AsyncAnthropic, *, stream: bool) -> tuple[dict[str, str], int]:
    """Play the runner: call the model, run its write_file calls, send the results back, until
    it ends its turn. Returns the files written and the number of model calls."""
    files: dict[str, str] = {}
    messages: list[MessageParam] = [{"role": "user", "content": PROMPT}]
    for calls in range(1, 6):
        message: Message
        if stream:
            async with client.messages.stream(
                model="claude-test", max_tokens=4096, tools=TOOLS, messages=messages
            ) as events:
                message = await events.get_final_message()
        else:
            message = await client.messages.create(
                model="claude-test", max_tokens=4096, tools=TOOLS, messages=messages
            )
        assert message.usage.input_tokens > 0
        assert message.usage.output_tokens > 0
        assert message.usage.cache_read_input_tokens == 0
        assert message.usage.cache_creation_input_tokens == 0
        if message.stop_reason == "end_turn":
            return files, calls
        assert message.stop_reason == "tool_use"
        messages.append(_assistant_turn(message))
        results: list[Any] = []
        for block in message.content:
            if block.type == "tool_use":
                assert block.name == "write_file"
                assert isinstance(block.input, dict)
                files[str(block.input["path"])] = str(block.input["content"])
                results.append({"type": "tool_result", "tool_use_id": block.id, "content": "ok"})
        messages.append({"role": "user", "content": results})
    raise AssertionError("the default model never ended its turn")


def test_text_reply_sync_client() -> None:
    """A synchronous client against the threaded server gets a plain text message."""
    with (
        LoopbackLLM().running_in_thread() as server,
        anthropic.Anthropic(base_url=server.url, api_key="sk-test", max_retries=0) as client,
    ):
        message = client.messages.create(
            model="claude-test",
            max_tokens=100,
            system=[{"type": "text", "text": "Be brief."}],
            messages=[{"role": "user", "content": "Say hello"}],
        )
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == "claude-test"
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert message.content[0].type == "text"
    assert "Say hello" in message.content[0].text
    assert message.id.startswith("msg_")


def test_text_reply_streamed_both_ways() -> None:
    """``messages.stream`` and ``create(stream=True)`` both work and carry usage."""

    async def scenario() -> None:
        async with LoopbackLLM() as server, _client(server) as client:
            kwargs: dict[str, Any] = {
                "model": "claude-test",
                "max_tokens": 100,
                "messages": [{"role": "user", "content": "Say hello to the stream"}],
            }
            async with client.messages.stream(**kwargs) as stream:
                pieces = [text async for text in stream.text_stream]
                final = await stream.get_final_message()
            assert len(pieces) > 1
            assert "".join(pieces) == final.content[0].text  # type: ignore[union-attr]
            assert final.stop_reason == "end_turn"
            assert final.usage.output_tokens > 0

            names = []
            raw = await client.messages.create(stream=True, **kwargs)
            async for event in raw:
                names.append(event.type)
            assert names[0] == "message_start"
            assert names[-2:] == ["message_delta", "message_stop"]
            assert "content_block_delta" in names

    asyncio.run(scenario())


def test_tool_round_trip_with_the_default_model() -> None:
    """The default model writes every backticked expected file with ``write_file``, then ends
    its turn once the results are back, streamed or not; the JSON file parses."""

    async def scenario() -> None:
        async with LoopbackLLM() as server, _client(server) as client:
            for stream in (False, True):
                files, calls = await _agent(client, stream=stream)
                assert sorted(files) == ["a.json", "b.md"]
                assert json.loads(files["a.json"])["file"] == "a.json"
                assert files["b.md"].startswith("# ")
                assert calls == 2
            assert server.counters.requests == 4
            assert [r.stream for r in server.requests] == [False, False, True, True]

    asyncio.run(scenario())


def test_count_tokens_and_models() -> None:
    """``count_tokens`` answers about a quarter of the prompt's length; models list pages."""

    async def scenario() -> None:
        async with LoopbackLLM() as server, _client(server) as client:
            counted = await client.messages.count_tokens(
                model="claude-test", messages=[{"role": "user", "content": "x" * 400}]
            )
            assert 100 <= (counted.input_tokens or 0) <= 140
            models = [model.id async for model in client.models.list()]
            assert "loopback" in models

    asyncio.run(scenario())


def test_max_tokens_stops_the_reply() -> None:
    """A reply longer than ``max_tokens`` is cut and stops with ``max_tokens``."""
    with (
        LoopbackLLM(default_model=lambda conversation: "word " * 200).running_in_thread() as s,
        anthropic.Anthropic(base_url=s.url, api_key="sk-test", max_retries=0) as client,
    ):
        message = client.messages.create(
            model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "Talk"}]
        )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 10


def test_prompt_cache_reads_what_was_written() -> None:
    """A ``cache_control`` mark writes the prefix on the first call and reads it on the next;
    ``input_tokens`` then counts only the uncached rest, as Anthropic reports it."""

    async def scenario() -> None:
        async with LoopbackLLM() as server, _client(server) as client:
            system: Any = [
                {"type": "text", "text": "S" * 4000, "cache_control": {"type": "ephemeral"}}
            ]
            first = await client.messages.create(
                model="claude-test",
                max_tokens=100,
                system=system,
                messages=[{"role": "user", "content": "first question"}],
            )
            second = await client.messages.create(
                model="claude-test",
                max_tokens=100,
                system=system,
                messages=[{"role": "user", "content": "second question"}],
            )
            assert (first.usage.cache_creation_input_tokens or 0) >= 1000
            assert first.usage.cache_read_input_tokens == 0
            assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
            assert second.usage.cache_creation_input_tokens == 0
            assert second.usage.input_tokens < 100
            assert server.counters.cache_read_tokens == second.usage.cache_read_input_tokens

    asyncio.run(scenario())


def test_what_claude_code_sends_is_accepted() -> None:
    """``HEAD /`` answers 200; ``POST /v1/messages?beta=true`` routes like ``/v1/messages``;
    ``role: "system"`` entries, unknown fields and block types are tolerated; the stream has
    ``event:`` and ``data:`` lines."""

    async def scenario() -> None:
        async with LoopbackLLM() as server, aiohttp.ClientSession() as session:
            async with session.head(server.url + "/") as head:
                assert head.status == 200
            body = {
                "model": "claude-opus-4-8",
                "max_tokens": 64000,
                "stream": True,
                "metadata": {"user_id": "someone"},
                "thinking": {"type": "disabled"},
                "system": [{"type": "text", "text": "You are Claude Code."}],
                "messages": [
                    {"role": "system", "content": "Extra instructions."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                            {"type": "image", "source": {"type": "base64", "data": ""}},
                            {"type": "text", "text": "Hello"},
                        ],
                    },
                ],
                "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
            }
            headers = {"x-api-key": "sk-test", "anthropic-version": "2023-06-01"}
            async with session.post(
                server.url + "/v1/messages?beta=true", json=body, headers=headers
            ) as response:
                assert response.status == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                assert response.headers["request-id"].startswith("req_")
                text = await response.text()
            assert text.startswith("event: message_start\ndata: {")
            assert "event: message_stop\ndata: " in text
            recorded = server.requests[-1]
            assert recorded.path == "/v1/messages"
            assert recorded.model == "claude-opus-4-8"
            assert recorded.stream is True
            assert recorded.status == 200

    asyncio.run(scenario())


def test_bad_requests_get_anthropic_errors() -> None:
    """A request without ``max_tokens`` is a 400 ``invalid_request_error``; an unknown path is
    a 404 ``not_found_error``."""

    async def scenario() -> None:
        async with LoopbackLLM() as server, _client(server) as client:
            with pytest.raises(anthropic.BadRequestError) as caught:
                await client.messages.create(
                    model="claude-test",
                    max_tokens=0,
                    messages=[{"role": "user", "content": "hi"}],
                )
            assert caught.value.status_code == 400
            assert isinstance(caught.value.body, dict)
            assert caught.value.body["error"]["type"] == "invalid_request_error"
            async with (
                aiohttp.ClientSession() as session,
                session.post(server.url + "/v1/nothing", json={}) as response,
            ):
                assert response.status == 404
                error = await response.json()
            assert error["error"]["type"] == "not_found_error"

    asyncio.run(scenario())

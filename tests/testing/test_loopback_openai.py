"""The loopback server through the real ``openai`` SDK: completions, chunk streams with usage,
tool calls assembled from pieces, the automatic prompt cache, models."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from phalanx.testing import LoopbackLLM

PROMPT = "Write the report. Expected files: `a.json`, `b.md`."
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Write a file into the output folder.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                "required": ["path", "content"],
            },
        },
    }
]


def _client(server: LoopbackLLM) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)


async def _turn(
    client: openai.AsyncOpenAI, messages: list[ChatCompletionMessageParam], *, stream: bool
) -> tuple[str | None, list[dict[str, str]], str, int]:
    """One model call: (text, tool calls as {id, name, arguments}, finish reason, prompt
    tokens), assembling a stream's pieces the way a runner must."""
    if not stream:
        completion = await client.chat.completions.create(
            model="gpt-test", messages=messages, tools=TOOLS
        )
        choice = completion.choices[0]
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls or []
            if c.type == "function"
        ]
        assert completion.usage is not None
        return choice.message.content, calls, choice.finish_reason, completion.usage.prompt_tokens
    chunks = await client.chat.completions.create(
        model="gpt-test",
        messages=messages,
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
    )
    text: list[str] = []
    assembled: dict[int, dict[str, str]] = {}
    finish = ""
    prompt_tokens = 0
    async for chunk in chunks:
        if chunk.usage is not None:
            assert not chunk.choices
            prompt_tokens = chunk.usage.prompt_tokens
            assert chunk.usage.total_tokens == prompt_tokens + chunk.usage.completion_tokens
        for part in chunk.choices:
            if part.delta.content:
                text.append(part.delta.content)
            for piece in part.delta.tool_calls or []:
                entry = assembled.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                if piece.id:
                    entry["id"] = piece.id
                if piece.function and piece.function.name:
                    entry["name"] = piece.function.name
                if piece.function and piece.function.arguments:
                    entry["arguments"] += piece.function.arguments
            if part.finish_reason:
                finish = part.finish_reason
    assert prompt_tokens > 0, "include_usage sent no usage chunk"
    return "".join(text) or None, [assembled[i] for i in sorted(assembled)], finish, prompt_tokens


async def _agent(client: openai.AsyncOpenAI, *, stream: bool) -> dict[str, str]:
    """Play the runner until the model stops; returns the files it wrote."""
    files: dict[str, str] = {}
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are a careful analyst."},
        {"role": "user", "content": PROMPT},
    ]
    for _ in range(5):
        text, calls, finish, _ = await _turn(client, messages, stream=stream)
        if finish == "stop":
            assert text
            return files
        assert finish == "tool_calls"
        assistant: Any = {
            "role": "assistant",
            "content": text,
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in calls
            ],
        }
        messages.append(assistant)
        for call in calls:
            arguments = json.loads(call["arguments"])
            files[arguments["path"]] = arguments["content"]
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": "ok"})
    raise AssertionError("the default model never stopped")


def test_text_reply_sync_client() -> None:
    """A synchronous client against the threaded server gets a completion with usage."""
    with (
        LoopbackLLM().running_in_thread() as server,
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0) as client,
    ):
        completion = client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "Say hello"}]
        )
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-test"
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert "Say hello" in (choice.message.content or "")
    assert choice.message.tool_calls is None
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0


def test_streamed_text_with_and_without_usage() -> None:
    """A stream ends with a finish reason; the usage chunk comes only when asked for."""

    async def scenario() -> None:
        async with LoopbackLLM() as server, _client(server) as client:
            for include in (False, True):
                chunks = await client.chat.completions.create(
                    model="gpt-test",
                    messages=[{"role": "user", "content": "Say hello to the stream"}],
                    stream=True,
                    stream_options={"include_usage": include},
                )
                received = [chunk async for chunk in chunks]
                text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
                assert "Say hello to the stream" in text
                finishes = [c.choices[0].finish_reason for c in received if c.choices]
                assert finishes[-1] == "stop"
                usage = [c.usage for c in received if c.usage is not None]
                assert len(usage) == (1 if include else 0)

    asyncio.run(scenario())


def test_tool_round_trip_with_the_default_model() -> None:
    """The default model calls ``write_file`` per expected file (arguments assembled from
    stream pieces when streamed), then stops once the tool results are back."""

    async def scenario() -> None:
        async with LoopbackLLM() as server, _client(server) as client:
            for stream in (False, True):
                files = await _agent(client, stream=stream)
                assert sorted(files) == ["a.json", "b.md"]
                assert json.loads(files["a.json"])["source"] == "loopback"
            assert server.counters.requests == 4
            assert server.counters.output_tokens > 0

    asyncio.run(scenario())


def test_max_tokens_gives_length() -> None:
    """A reply longer than ``max_completion_tokens`` is cut with ``finish_reason: length``."""
    with (
        LoopbackLLM(default_model=lambda conversation: "word " * 200).running_in_thread() as s,
        openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test", max_retries=0) as client,
    ):
        completion = client.chat.completions.create(
            model="gpt-test",
            max_completion_tokens=10,
            messages=[{"role": "user", "content": "Talk"}],
        )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 10


def test_automatic_prompt_cache_counts_inside_prompt_tokens() -> None:
    """A long prompt that extends an earlier one reports its shared prefix as
    ``cached_tokens`` (in steps of 128), included in ``prompt_tokens``, as OpenAI does."""

    async def scenario() -> None:
        async with LoopbackLLM() as server, _client(server) as client:
            messages: list[ChatCompletionMessageParam] = [
                {"role": "system", "content": "S" * 8000},
                {"role": "user", "content": "first question"},
            ]
            first = await client.chat.completions.create(model="gpt-test", messages=messages)
            messages.append({"role": "assistant", "content": "an answer"})
            messages.append({"role": "user", "content": "second question"})
            second = await client.chat.completions.create(model="gpt-test", messages=messages)
            assert first.usage is not None
            assert second.usage is not None
            assert first.usage.prompt_tokens_details is not None
            assert second.usage.prompt_tokens_details is not None
            assert first.usage.prompt_tokens_details.cached_tokens == 0
            cached = second.usage.prompt_tokens_details.cached_tokens or 0
            assert cached >= 1024
            assert cached % 128 == 0
            assert cached < second.usage.prompt_tokens
            assert server.counters.cache_read_tokens == cached

    asyncio.run(scenario())


def test_models_list() -> None:
    """``GET /v1/models`` lists the registered models and ``loopback``."""

    async def scenario() -> None:
        async with (
            LoopbackLLM(models={"tiny": lambda c: "hi"}) as server,
            _client(server) as client,
        ):
            names = [model.id async for model in client.models.list()]
            assert names == ["loopback", "tiny"]

    asyncio.run(scenario())

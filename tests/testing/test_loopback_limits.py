"""Latency, the concurrency limit and the per-minute token buckets, seen through the SDKs:
429s carry ``retry-after`` and the providers' rate-limit headers, and waiting works."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import anthropic
import openai
import pytest

from phalanx.testing import LoopbackLLM

HELLO: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hello"}]


def _anthropic(server: LoopbackLLM) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.url, api_key="sk-test", max_retries=0)


def _openai(server: LoopbackLLM) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)


def test_max_concurrency_answers_429_then_recovers() -> None:
    """A request beyond ``max_concurrency`` gets 429 with ``retry-after`` at once; once the
    first finishes, requests succeed again."""

    async def scenario() -> None:
        async with LoopbackLLM(max_concurrency=1, latency=1.0) as server, _anthropic(server) as c:
            slow = asyncio.create_task(
                c.messages.create(model="claude-test", max_tokens=50, messages=HELLO)
            )
            while server.counters.requests < 1:  # noqa: ASYNC110 - polling another task's server
                await asyncio.sleep(0.005)
            with pytest.raises(anthropic.RateLimitError) as caught:
                await c.messages.create(model="claude-test", max_tokens=50, messages=HELLO)
            assert not slow.done(), "the 429 waited for the first request's latency"
            assert caught.value.response.headers["retry-after"] == "1"
            assert isinstance(caught.value.body, dict)
            assert caught.value.body["error"]["type"] == "rate_limit_error"
            await slow
            again = await c.messages.create(model="claude-test", max_tokens=50, messages=HELLO)
            assert again.stop_reason == "end_turn"
            assert server.counters.rate_limited == 1
            assert server.counters.peak_concurrency == 2
            assert [r.status for r in server.requests] == [429, 200, 200]

    asyncio.run(scenario())


def test_requests_per_minute_anthropic() -> None:
    """The bucket holds a minute's requests; the next one gets 429 with ``retry-after`` and
    ``anthropic-ratelimit-*`` headers (RFC 3339 reset); after waiting, a request succeeds."""

    async def scenario() -> None:
        async with LoopbackLLM(requests_per_minute=60) as server, _anthropic(server) as c:
            raw = await c.messages.with_raw_response.create(
                model="claude-test", max_tokens=50, messages=HELLO
            )
            assert raw.headers["anthropic-ratelimit-requests-limit"] == "60"
            assert int(raw.headers["anthropic-ratelimit-requests-remaining"]) in (58, 59)
            error: anthropic.RateLimitError | None = None
            for _ in range(100):
                try:
                    await c.messages.create(model="claude-test", max_tokens=50, messages=HELLO)
                except anthropic.RateLimitError as exc:
                    error = exc
                    break
            assert error is not None, "100 requests fitted in a 60-per-minute bucket"
            assert server.counters.requests >= 60
            headers = error.response.headers
            wait = int(headers["retry-after"])
            assert 1 <= wait <= 2
            assert headers["anthropic-ratelimit-requests-limit"] == "60"
            assert headers["anthropic-ratelimit-requests-remaining"] == "0"
            reset = datetime.strptime(
                headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ"
            ).replace(tzinfo=UTC)
            assert reset.timestamp() >= time.time() - 1
            assert server.counters.rate_limited == 1
            await asyncio.sleep(wait)
            ok = await c.messages.create(model="claude-test", max_tokens=50, messages=HELLO)
            assert ok.stop_reason == "end_turn"

    asyncio.run(scenario())


def test_requests_per_minute_openai() -> None:
    """OpenAI's 429 has type ``requests``, code ``rate_limit_exceeded`` and ``x-ratelimit-*``
    headers with durations like ``500ms`` or ``1s``."""
    with (
        LoopbackLLM(requests_per_minute=120).running_in_thread() as server,
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0) as client,
    ):
        error: openai.RateLimitError | None = None
        for _ in range(200):
            try:
                client.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hi"}]
                )
            except openai.RateLimitError as exc:
                error = exc
                break
        assert error is not None
        assert error.code == "rate_limit_exceeded"
        assert error.type == "requests"
        headers = error.response.headers
        assert headers["retry-after"] == "1"
        assert headers["x-ratelimit-limit-requests"] == "120"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"].endswith(("ms", "s"))
        time.sleep(1)
        ok = client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
        assert ok.choices[0].finish_reason == "stop"


def test_tokens_per_minute() -> None:
    """A prompt that does not fit what is left of the tokens bucket gets 429 (type
    ``tokens``), with a ``retry-after`` long enough for the bucket to refill."""

    async def scenario() -> None:
        async with LoopbackLLM(tokens_per_minute=1000) as server, _openai(server) as client:
            big: list[openai.types.chat.ChatCompletionMessageParam] = [
                {"role": "user", "content": "x" * 3000}
            ]
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-test", messages=big
            )
            assert raw.headers["x-ratelimit-limit-tokens"] == "1000"
            assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 300
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(model="gpt-test", messages=big)
            assert caught.value.type == "tokens"
            assert int(caught.value.response.headers["retry-after"]) >= 20

    asyncio.run(scenario())


def test_latency_is_applied_to_replies_and_streams() -> None:
    """Every request takes at least the configured latency, streamed or not."""

    async def scenario() -> None:
        async with LoopbackLLM(latency=0.3) as server, _anthropic(server) as client:
            started = time.monotonic()
            await client.messages.create(model="claude-test", max_tokens=50, messages=HELLO)
            assert 0.3 <= time.monotonic() - started < 5.0
            started = time.monotonic()
            async with client.messages.stream(
                model="claude-test", max_tokens=50, messages=HELLO
            ) as stream:
                await stream.get_final_message()
            assert 0.3 <= time.monotonic() - started < 5.0

    asyncio.run(scenario())


def test_log_normal_latency_varies() -> None:
    """With ``latency_sigma`` each request draws its own latency around the median."""

    async def scenario() -> None:
        async with (
            LoopbackLLM(latency=0.03, latency_sigma=0.8, seed=7) as server,
            _openai(server) as client,
        ):
            for _ in range(10):
                await client.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hi"}]
                )
            durations = [r.duration for r in server.requests]
            assert max(durations) > 1.5 * min(durations)

    asyncio.run(scenario())

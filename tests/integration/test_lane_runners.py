"""The anthropic and openai runners through a lane's gate, against the loopback LLM server with
the real SDKs: a refused call is sent again after the provider's ``retry-after`` instead of
failing the attempt, and the lane learns the limits the server's headers announce."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from phalanx import InstanceContext
from phalanx._config import AnthropicRunnerConfig, OpenAIRunnerConfig
from phalanx._lanes import Lane, LaneChange
from phalanx.runners._anthropic import AnthropicRunner
from phalanx.runners._llm import APIRunner
from phalanx.runners._openai import OpenAIRunner
from phalanx.testing import LoopbackLLM

SECRET = "sk-test-lane-0123456789"  # noqa: S105 - a fake key the test hunts for


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPBACK_KEY", SECRET)


def runner(api: str, url: str) -> APIRunner:
    if api == "anthropic":
        return AnthropicRunner(
            AnthropicRunnerConfig(base_url=url, api_key_env="LOOPBACK_KEY"),
            model="loopback-model",
            reference=False,
            prices={},
        )
    return OpenAIRunner(
        OpenAIRunnerConfig(base_url=url + "/v1", api_key_env="LOOPBACK_KEY"),
        model="loopback-model",
        reference=False,
        prices={},
    )


def context(root: Path, key: str, lane: Lane) -> InstanceContext:
    """One attempt's context whose model calls go through ``lane``."""
    staging = root / "staging" / key
    staging.mkdir(parents=True)
    return InstanceContext(
        run_id="run",
        stage="research",
        key=key,
        attempt=1,
        params={},
        prompt="Write the result of your research.",
        output_dir=staging,
        final_dir=root / "data" / key,
        inputs=(),
        missing=(),
        project_dir=root,
        log_dir=root / "logs" / key,
        blueprint=None,
        timeout=60.0,
        expected=("result.json",),
        gate=lane.gate(),
    )


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_a_refused_call_is_requeued_instead_of_failing_the_attempt(
    tmp_path: Path, api: str
) -> None:
    """The server takes one request at a time and refuses the others (429, ``retry-after:
    1``). Two conversations share a lane: each refusal halves the lane's limit, pauses it,
    and the refused call is sent again, so both attempts succeed on their first try with only
    their accepted calls in their usage."""

    changes: list[LaneChange] = []

    async def go() -> tuple[LoopbackLLM, Lane, list[InstanceContext]]:
        async with LoopbackLLM(max_concurrency=1, latency=0.05) as server:
            agent = runner(api, server.url)
            lane = Lane("loopback", auto=True, ceiling=2, start=2, on_change=changes.append)
            contexts = [context(tmp_path, key, lane) for key in ("a", "b")]

            async def attempt(ctx: InstanceContext) -> None:
                await lane.acquire()
                try:
                    await agent.run(ctx)
                finally:
                    lane.release()

            try:
                await asyncio.gather(*(attempt(ctx) for ctx in contexts))
            finally:
                await agent.aclose()
            return server, lane, contexts

    server, lane, contexts = asyncio.run(go())
    refused = server.counters.rate_limited
    assert refused > 0
    assert (lane.rejections, lane.requeued) == (refused, refused)
    assert ("decrease", 2, 1) in [(c.reason, c.old, c.new) for c in changes]
    assert ("pause", 1.0) in [(c.reason, c.paused_for) for c in changes]
    assert lane.in_use == 0
    for ctx in contexts:
        assert json.loads((ctx.output_dir / "result.json").read_text())
        assert ctx.usage.requests == 2  # one turn writing the file, one saying it is done
    assert server.counters.requests == 4 + refused
    assert lane.requests == server.counters.requests
    assert all(SECRET not in json.dumps(r.body) for r in server.requests)


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_the_lane_paces_calls_by_the_announced_limits(tmp_path: Path, api: str) -> None:
    """The server announces 3 requests a minute in its headers and refuses what does not fit.
    After the first conversation (two calls) the lane knows the limit: the second
    conversation's first call goes, its second is held back (about 20 s, reported to
    ``on_wait``) instead of being sent into a refusal. The runner's lane key names provider,
    endpoint, model and a digest of the key, never the key."""

    async def go() -> tuple[LoopbackLLM, Lane, APIRunner, list[float]]:
        async with LoopbackLLM(requests_per_minute=3) as server:
            agent = runner(api, server.url)
            lane = Lane("loopback", auto=False, ceiling=4)
            waited: list[float] = []
            try:
                await agent.run(context(tmp_path, "a", lane))
                second = replace(context(tmp_path, "b", lane), gate=lane.gate(waited.append))
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(agent.run(second), timeout=1.0)
            finally:
                await agent.aclose()
            return server, lane, agent, waited

    server, lane, agent, waited = asyncio.run(go())
    assert server.counters.rate_limited == 0
    assert server.counters.requests == 3
    assert lane.requests == 3
    assert waited[0] > 10.0  # the bucket's wait, announced before it starts
    assert sum(waited) < 2.0  # and taken back when the attempt was cancelled
    assert isinstance(agent.lane, tuple)
    provider, base_url, model, digest = agent.lane
    assert (provider, model) == (api, "loopback-model")
    assert str(base_url).startswith("http://127.0.0.1:")
    assert SECRET not in repr(agent.lane)
    assert len(str(digest)) == 12

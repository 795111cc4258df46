"""``concurrency: auto`` end to end: a pipeline of LLM agents against a loopback server that
refuses past a concurrency limit. The lane cuts its limit on the 429s, the refused calls are
sent again, and no attempt fails; the lane's moves are events in the run's log."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from phalanx import Event, LanePaused, LimitChanged, RunResult, run_pipeline
from phalanx._scheduler import _reschedule
from phalanx.testing import LoopbackLLM

BLUEPRINT = """\
---
name: research
description: Research one organisation.
model: loopback-model
params:
  ORGANIZATION_ID: The organisation's id.
outputs:
  facts.json: What was found, as JSON.
---
Research the organisation {ORGANIZATION_ID}.
"""


def _project(root: Path, api: str, url: str, n: int) -> Path:
    base_url = url if api == "anthropic" else url + "/v1"
    (root / "agents").mkdir(parents=True)
    (root / "agents/research.md").write_text(BLUEPRINT)
    items = ", ".join(f"{{id: org_{k:02d}}}" for k in range(n))
    (root / "pipeline.yaml").write_text(
        textwrap.dedent(
            f"""\
            name: adaptive
            concurrency: 64
            defaults:
              runner: {{type: {api}, base_url: "{base_url}", api_key_env: LOOPBACK_KEY}}
              retries: 0
              timeout: 60s
            stages:
              - name: research
                blueprint: agents/research.md
                partitions: {{items: [{items}]}}
                params: {{ORGANIZATION_ID: "{{id}}"}}
                output: data/{{ORGANIZATION_ID}}/
            """
        )
    )
    return root / "pipeline.yaml"


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_auto_backs_off_on_429_and_loses_nothing(
    tmp_path: Path, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 two-turn agents, a server that answers 429 (retry-after: 1) past 6 requests in
    flight (above the lane's start of 4, so slow start must grow to find it), and no retries
    allowed: every instance commits on its first attempt, because a refused call is re-sent by
    the lane, and the lane both grew (slow start) and was cut."""
    monkeypatch.setenv("LOOPBACK_KEY", "test-key")
    events: list[Event] = []
    server = LoopbackLLM(max_concurrency=6, latency=0.02)

    async def go() -> RunResult:
        async with server:
            pipeline = _project(tmp_path, api, server.url, 30)
            return await run_pipeline(pipeline, on_event=events.append)

    result = asyncio.run(go())
    stage = result.stage("research")
    assert (stage.committed, stage.failed) == (30, 0), result.to_json()
    assert all(len(inst.attempts) == 1 for inst in stage.instances)
    assert server.counters.rate_limited > 0
    assert not (tmp_path / "wip/notes.md").exists()
    moves = [e for e in events if isinstance(e, LimitChanged)]
    assert any(m.reason == "increase" for m in moves)
    assert any(m.reason == "decrease" for m in moves)
    assert all(m.new >= 1 for m in moves)
    assert any(isinstance(e, LanePaused) for e in events)


def test_a_fired_timeout_is_not_moved() -> None:
    """Moving a deadline that has already fired (its cancellation on its way) is refused
    quietly instead of raising inside whoever tried: a lane's wait report or a relative
    timeout tightening on another attempt's success."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0) as scope:
                await asyncio.sleep(1)
        assert _reschedule(scope, loop.time() + 5) is False
        async with asyncio.timeout(10) as live:
            assert _reschedule(live, loop.time() + 20) is True
            assert live.when() == pytest.approx(loop.time() + 20, abs=1)
            await asyncio.sleep(0)

    asyncio.run(main())

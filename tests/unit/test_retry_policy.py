"""What an attempt's error says about retrying: ``retry_after`` is a floor under the backoff,
and a permanent error ends the instance without another attempt."""

from __future__ import annotations

import asyncio
from pathlib import Path

from phalanx import (
    AttemptEnded,
    Backoff,
    Event,
    InstanceContext,
    PermanentError,
    RateLimited,
    fan_out,
)


def test_retry_after_is_a_floor_under_the_backoff(tmp_path: Path) -> None:
    """A rate-limited attempt asking for 0.3 s waits at least that long, though the backoff
    alone would draw at most 10 ms; the retry then commits."""
    delays: list[float | None] = []
    seen: list[int] = []

    async def agent(ctx: InstanceContext) -> None:
        seen.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RateLimited("429 from the provider", retry_after=0.3)
        (ctx.output_dir / "out.txt").write_text("ok")

    def on_event(event: Event) -> None:
        if isinstance(event, AttemptEnded) and event.cause is not None:
            delays.append(event.retry_in)

    stage = asyncio.run(
        fan_out(
            ["a"],
            agent,
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            backoff=Backoff(base=0.01, max=0.01),
            on_event=on_event,
        )
    )
    assert stage.committed == 1
    assert seen == [1, 2]
    assert delays == [0.3]
    notes = (tmp_path / "wip/notes.md").read_text()
    assert "cause: rate-limited" in notes
    assert "retrying in 0.3s" in notes


def test_permanent_error_is_not_retried(tmp_path: Path) -> None:
    """A permanent error fails the instance after one attempt even with retries left; the
    other instances are unaffected."""
    seen: list[str] = []

    async def agent(ctx: InstanceContext) -> None:
        seen.append(ctx.key)
        if ctx.key == "bad":
            raise PermanentError("400: the model does not exist")
        (ctx.output_dir / "out.txt").write_text("ok")

    stage = asyncio.run(
        fan_out(
            ["bad", "good"],
            agent,
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            retries=5,
            min_success=0.5,
        )
    )
    result = {inst.key: inst for inst in stage.instances}
    assert seen.count("bad") == 1
    assert result["bad"].status == "failed"
    assert result["bad"].cause == "permanent"
    assert len(result["bad"].attempts) == 1
    assert result["good"].status == "committed"
    assert "attempt 1/6" in (tmp_path / "wip/notes.md").read_text()

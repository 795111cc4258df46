"""Stragglers: a relative timeout (``timeout: 300%``) and speculative backups, where the first
valid commit wins and the loser's files never appear."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from phalanx import InstanceContext, Speculate, fan_out
from phalanx._databus import MANIFEST
from phalanx._ledger import open_ledger

KEYS = [f"k{n:02d}" for n in range(30)]
SAFETY_S = 30.0  # only ever reached if the feature under test is broken


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)


def _no_staging_left(root: Path) -> bool:
    staging = root / ".phalanx" / "staging"
    return not staging.exists() or not any(staging.rglob("*.txt"))


def test_a_backup_wins_and_the_stragglers_files_never_appear(tmp_path: Path) -> None:
    """``k00``'s first attempt writes a file and hangs; once ten instances have succeeded it
    is past the stage's median, so a backup starts, writes its own file and commits. The hung
    attempt is cancelled and its staging folder removed: only the backup's file is there."""

    async def agent(ctx: InstanceContext) -> None:
        if ctx.key == "k00" and ctx.attempt == 1:
            (ctx.output_dir / "straggler.txt").write_text("never to be seen")
            await asyncio.sleep(SAFETY_S)
        else:
            await asyncio.sleep(0.002)
        (ctx.output_dir / "result.txt").write_text(f"{ctx.key} attempt {ctx.attempt}")

    stage = asyncio.run(
        fan_out(
            KEYS,
            agent,
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            concurrency=8,
            speculate=Speculate(after="p50", max_extra="10%", min_samples=10),
        )
    )
    assert stage.committed == 30
    (slow,) = [inst for inst in stage.instances if inst.key == "k00"]
    assert [(a.attempt, a.backup, a.cause) for a in slow.attempts] == [
        (1, False, "superseded"),  # its slot time counts in the stage's serial time
        (2, True, None),
    ]
    assert _files(tmp_path / "out" / "k00") == ["result.txt"]
    assert (tmp_path / "out/k00/result.txt").read_text() == "k00 attempt 2"
    assert stage.speculation is not None
    assert (stage.speculation.backups, stage.speculation.won) == (1, 1)
    assert _no_staging_left(tmp_path)
    with open_ledger(tmp_path / ".phalanx") as ledger:
        run = ledger.get_run()
        assert run is not None
        rows = {row.attempt: row for row in ledger.attempt_rows(run.id, "fan-out", "k00")}
    assert rows[1].outcome == "discarded"
    assert "superseded" in (rows[1].message or "")
    assert rows[2].outcome == "committed"


def test_the_original_wins_and_the_backups_files_never_appear(tmp_path: Path) -> None:
    """The other way round: the backup hangs, the original commits once the backup has
    started; the backup is cancelled and leaves nothing behind."""
    backup_started = asyncio.Event()

    async def agent(ctx: InstanceContext) -> None:
        if ctx.key == "k00" and ctx.attempt == 1:
            async with asyncio.timeout(SAFETY_S):
                await backup_started.wait()
        elif ctx.key == "k00":
            (ctx.output_dir / "backup.txt").write_text("never to be seen")
            backup_started.set()
            await asyncio.sleep(SAFETY_S)
        else:
            await asyncio.sleep(0.002)
        (ctx.output_dir / "result.txt").write_text(f"{ctx.key} attempt {ctx.attempt}")

    stage = asyncio.run(
        fan_out(
            KEYS,
            agent,
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            concurrency=8,
            speculate=Speculate(after="p50", max_extra="10%", min_samples=10),
        )
    )
    assert stage.committed == 30
    assert _files(tmp_path / "out" / "k00") == ["result.txt"]
    assert (tmp_path / "out/k00/result.txt").read_text() == "k00 attempt 1"
    assert stage.speculation is not None
    assert (stage.speculation.backups, stage.speculation.won) == (1, 0)
    assert _no_staging_left(tmp_path)


def test_backups_are_capped_by_max_extra(tmp_path: Path) -> None:
    """Five instances hang on their first attempt until three backups have started; with
    ``max_extra: 10%`` of 30 instances no fourth backup ever starts."""
    backed_up: set[str] = set()
    three = asyncio.Event()

    async def agent(ctx: InstanceContext) -> None:
        if ctx.attempt > 1:
            backed_up.add(ctx.key)
            if len(backed_up) == 3:
                three.set()
        elif ctx.key in KEYS[:5]:
            async with asyncio.timeout(SAFETY_S):
                await three.wait()
            await asyncio.sleep(0.05)  # leave the monitor time to (wrongly) start a fourth
        await asyncio.sleep(0.002)
        (ctx.output_dir / "result.txt").write_text(ctx.key)

    stage = asyncio.run(
        fan_out(
            KEYS,
            agent,
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            concurrency=8,
            speculate=Speculate(after="p50", max_extra="10%", min_samples=10),
        )
    )
    assert stage.committed == 30
    assert stage.speculation is not None
    assert stage.speculation.backups == 3
    assert len(backed_up) == 3
    assert backed_up <= set(KEYS[:5])


def test_a_relative_timeout_stops_an_attempt_far_past_the_median(tmp_path: Path) -> None:
    """``timeout: 300%``: once five attempts have succeeded, a hung attempt is stopped at three
    times their median instead of waiting out the seconds of the default."""

    async def agent(ctx: InstanceContext) -> None:
        if ctx.key == "k00":
            await asyncio.sleep(SAFETY_S)
        await asyncio.sleep(0.002)
        (ctx.output_dir / "result.txt").write_text(ctx.key)

    stage = asyncio.run(
        fan_out(
            KEYS[:12],
            agent,
            output="out/{PARTITION_KEY}/",
            project_dir=tmp_path,
            concurrency=4,
            retries=0,
            timeout="300%",
        )
    )
    (hung,) = [inst for inst in stage.instances if inst.key == "k00"]
    assert hung.status == "failed"
    assert hung.cause == "timeout"
    assert "300% of the stage's median" in hung.message
    assert hung.duration_s < SAFETY_S / 2
    assert stage.committed == 11


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"after": "90"}, "percentile"),
        ({"after": "p100"}, "percentile"),
        ({"max_extra": "0%"}, "share"),
        ({"max_extra": 2}, "share"),
    ],
)
def test_bad_speculate_settings_are_refused(value: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Speculate.model_validate(value)

"""The event stream: every record of a real run (retries, a failure, a tune) and of every
other event type validates against the published schema, and the CLI writes it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import jsonschema
import pytest

from phalanx import (
    BudgetReached,
    EventLog,
    InstanceContext,
    LanePaused,
    RunHandle,
    event_schema,
    fan_out,
)
from phalanx._eventlog import event_record

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory

VALIDATOR = jsonschema.Draft202012Validator(event_schema())


def _records(path: Path) -> list[dict[str, object]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    for record in records:
        VALIDATOR.validate(record)
    return records


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(event_schema())


def test_every_record_of_a_run_validates_and_tells_what_happened(tmp_path: Path) -> None:
    handle = RunHandle()
    path = tmp_path / "events.jsonl"

    async def agent(ctx: InstanceContext) -> None:
        if ctx.key == "a" and ctx.attempt == 1:
            handle.tune(3)
        if ctx.key == "b" and ctx.attempt == 1:
            raise ConnectionError("flaky")
        if ctx.key == "c":
            raise RuntimeError("always")
        (ctx.output_dir / "out.txt").write_text(ctx.key)

    with EventLog(path) as log:
        stage = asyncio.run(
            fan_out(["a", "b", "c"], agent, output="out/{PARTITION_KEY}/",
                    project_dir=tmp_path / "p", retries=1, concurrency=1, handle=handle,
                    on_event=log, backoff=None)
        )  # fmt: skip
        log(LanePaused("anthropic m", 1.5))  # the types a python agent cannot cause
        log(BudgetReached("fan-out", "the run budget of $1 is spent ($1.0100)"))
    assert (stage.committed, stage.failed) == (2, 1)

    records = _records(path)
    types = [record["type"] for record in records]
    assert types[0] == "run_started"
    assert {
        "stage_started", "attempt_started", "attempt_ended", "instance_ended", "stage_ended",
        "run_ended", "limit_changed", "lane_paused", "budget_reached",
    } <= set(types)  # fmt: skip
    assert {record["run"] for record in records} == {records[0]["run"]}
    retried = [r for r in records if r["type"] == "attempt_ended" and r["key"] == "b"]
    assert [(r["attempt"], r["outcome"], r["retry_in"] is not None) for r in retried] == [
        (1, "failed", True),
        (2, "committed", False),
    ]
    (failed,) = [r for r in records if r["type"] == "instance_ended" and r["key"] == "c"]
    assert (failed["status"], failed["cause"], failed["attempts"]) == ("failed", "runner-error", 2)
    (tuned,) = [r for r in records if r["type"] == "limit_changed"]
    assert (tuned["old"], tuned["new"], tuned["reason"]) == (1, 3, "tune")


def test_an_unknown_event_is_a_bug_not_a_silent_line() -> None:
    with pytest.raises(TypeError, match="not a phalanx event"):
        event_record(object(), run="r", t=0.0)  # type: ignore[arg-type]


def test_the_cli_appends_the_stream_of_run_and_resume(make_project: ProjectFactory) -> None:
    """``--events`` on ``run`` and on ``resume``: one file, two runs' records appended, every
    line valid; a path that cannot be written is a usage error that runs nothing."""
    project = make_project(make_project.one_stage(make_project.runner("write"), ["a", "b"]))
    done = project.cli("run", "pipeline.yaml", "--quiet", "--events", "log/events.jsonl")
    assert done.returncode == 0, done.stderr
    records = _records(project.root / "log/events.jsonl")
    assert records[0]["type"] == "run_started"
    assert records[-1] == records[-1] | {"type": "run_ended", "ok": True, "cancelled": False}
    assert sum(r["type"] == "instance_ended" for r in records) == 2

    (project.root / "blocked").write_text("a file, not a folder")
    refused = project.cli("run", "pipeline.yaml", "--events", "blocked/events.jsonl")
    assert refused.returncode == 2
    assert "--events blocked/events.jsonl" in refused.stderr

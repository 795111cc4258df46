"""The report's model and page, without a browser: built from the same run by the ledger and by
the event file alike, attempts classified and packed into slots, hostile keys kept as text,
and clear errors for a bad event file or a project without runs."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import pytest

from phalanx import EventLog, InstanceContext, UsageError, event_schema, fan_out, write_report
from phalanx._ledger import open_ledger
from phalanx.report._html import render
from phalanx.report._model import COMPACT_ABOVE, build
from phalanx.report._records import ledger_records, read_events

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory

VALIDATOR = jsonschema.Draft202012Validator(event_schema())
Records = list[dict[str, Any]]


def _run_with_failures(tmp_path: Path) -> tuple[Path, Path]:
    """A real run: ``b`` fails once then commits, ``c`` always fails; with an event file."""
    project = tmp_path / "p"
    events = tmp_path / "events.jsonl"

    async def agent(ctx: InstanceContext) -> None:
        if ctx.key == "b" and ctx.attempt == 1:
            raise ConnectionError("flaky")
        if ctx.key == "c":
            raise RuntimeError("always")
        (ctx.output_dir / "out.txt").write_text(ctx.key)

    with EventLog(events) as log:
        asyncio.run(
            fan_out(["a", "b", "c", "d", "e"], agent, output="out/{PARTITION_KEY}/",
                    project_dir=project, retries=1, concurrency=2, on_event=log, backoff=None)
        )  # fmt: skip
    return project, events


def _essentials(model: dict[str, Any]) -> dict[str, Any]:
    """What must not depend on where the records came from (times differ by microseconds)."""
    totals = {k: v for k, v in model["totals"].items() if k not in ("serial_s", "speedup")}
    stages = [
        {
            "name": stage["name"],
            "counts": [stage[k] for k in ("total", "committed", "cached", "failed", "skipped")],
            "attempts": stage["attempts"],
            "retries": stage["retries"],
            "timeline": sorted(
                zip(
                    [stage["timeline"]["keys"][i] for i in stage["timeline"]["key"]],
                    stage["timeline"]["attempt"],
                    stage["timeline"]["category"],
                    strict=True,
                )
            ),
            "table": stage["table"]["status"],
        }
        for stage in model["stages"]
    ]
    failures = [
        (group["cause"], group["attempts"], group["instances_failed"])
        for group in model["failures"]
    ]
    return {"totals": totals, "stages": stages, "failures": failures}


def test_the_ledger_gives_back_the_records_the_event_file_holds(tmp_path: Path) -> None:
    """Records rebuilt from the ledger validate against the published schema, and the report
    built from them says what the report built from the live event file says."""
    project, events = _run_with_failures(tmp_path)
    with open_ledger(project / ".phalanx") as ledger:
        run = ledger.get_run()
        assert run is not None
        rebuilt = ledger_records(ledger, run)
    for record in rebuilt:
        VALIDATOR.validate(record)
    run_id, streamed = read_events(events)
    assert run_id == run.id

    from_ledger = build(rebuilt)
    from_file = build(streamed)
    assert _essentials(from_ledger) == _essentials(from_file)
    totals = from_ledger["totals"]
    assert (totals["instances"], totals["committed"], totals["failed"]) == (5, 4, 1)
    assert (totals["attempts"], totals["retries"], totals["backups"]) == (7, 2, 0)
    causes = {group["cause"]: group for group in from_ledger["failures"]}
    assert set(causes) == {"runner-error"}
    group = causes["runner-error"]
    assert (group["attempts"], group["instances_failed"]) == (3, 1)
    assert sorted((item["key"], item["attempt"], item["final"]) for item in group["items"]) == [
        ("b", 1, False),
        ("c", 1, False),
        ("c", 2, True),
    ]
    # The ledger keeps the traceback; the live stream does not carry it.
    (final,) = [item for item in group["items"] if item["final"]]
    assert "RuntimeError: always" in final["detail"]


def _attempt(
    records: Records, key: str, n: int, start: float, end: float, cause: str | None = None
) -> None:
    base = {"v": 1, "run": "r"}
    records.append(base | {"t": start, "type": "attempt_started", "stage": "s", "key": key,
                           "attempt": n})  # fmt: skip
    records.append(base | {"t": end, "type": "attempt_ended", "stage": "s", "key": key,
                           "attempt": n, "outcome": "failed" if cause else "committed",
                           "duration_s": end - start, "cause": cause, "message": cause or "",
                           "retry_in": None, "usage": None})  # fmt: skip


def _run(records: Records, instances: dict[str, str]) -> Records:
    base = {"v": 1, "run": "r"}
    head = [
        base | {"t": 0.0, "type": "run_started", "pipeline": "p", "stages": ["s"],
                "totals": [len(instances)]},
        base | {"t": 0.0, "type": "stage_started", "stage": "s", "total": len(instances),
                "concurrency": 2, "runner": "python", "model": ""},
    ]  # fmt: skip
    ends = [
        base | {"t": 20.0, "type": "instance_ended", "stage": "s", "key": key, "status": status,
                "cause": None, "reason": None, "message": "", "attempts": 1, "duration_s": 1.0,
                "usage": None}
        for key, status in instances.items()
    ]  # fmt: skip
    tail = [base | {"t": 20.0, "type": "run_ended", "ok": True, "cancelled": False}]
    everything = head + records + ends + tail
    for record in everything:
        VALIDATOR.validate(record)
    return sorted(everything, key=lambda record: record["t"])


def test_attempts_are_classified_and_backups_found() -> None:
    """A backup is an attempt that began while an earlier one of its instance still ran; a
    failed attempt followed by another is ``retried``, the last one ``failed``."""
    records: Records = []
    _attempt(records, "x", 1, 0.0, 10.0, cause="superseded")
    _attempt(records, "x", 2, 5.0, 7.0)
    _attempt(records, "y", 1, 0.0, 1.0, cause="runner-error")
    _attempt(records, "y", 2, 2.0, 3.0, cause="runner-error")
    _attempt(records, "z", 1, 3.0, 4.0, cause="interrupted")
    model = build(_run(records, {"x": "committed", "y": "failed", "z": "failed"}))
    (stage,) = model["stages"]
    timeline = stage["timeline"]
    names = model["categories"]
    seen = {
        (timeline["keys"][k], n): (names[c], bool(b))
        for k, n, c, b in zip(
            timeline["key"], timeline["attempt"], timeline["category"], timeline["backup"],
            strict=True,
        )
    }  # fmt: skip
    assert seen == {
        ("x", 1): ("superseded", False),
        ("x", 2): ("committed", True),
        ("y", 1): ("retried", False),
        ("y", 2): ("failed", False),
        ("z", 1): ("interrupted", False),
    }
    assert (stage["backups"], stage["retries"], stage["superseded"]) == (1, 1, 1)
    # Neither the superseded loser nor the interrupted attempt is a failure.
    assert [(g["cause"], g["attempts"]) for g in model["failures"]] == [("runner-error", 2)]


def test_lanes_never_overlap_and_are_as_many_as_the_most_in_flight() -> None:
    rng = random.Random(3)  # noqa: S311 - made-up intervals
    records: Records = []
    intervals = []
    for i in range(300):
        start = rng.uniform(0, 15)
        end = start + rng.uniform(0.01, 4)
        intervals.append((start, end))
        _attempt(records, f"k{i:03d}", 1, start, end)
    model = build(_run(records, {f"k{i:03d}": "committed" for i in range(300)}))
    timeline = model["stages"][0]["timeline"]
    lanes: dict[int, list[tuple[float, float]]] = {}
    for lane, start, duration in zip(
        timeline["lane"], timeline["start"], timeline["duration"], strict=True
    ):
        lanes.setdefault(lane, []).append((start, start + duration))
    for spans in lanes.values():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end - 1e-3
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = running = 0
    for _, step in points:
        running += step
        most = max(most, running)
    assert timeline["lanes"] == most


def test_a_large_stage_is_drawn_compact_and_stays_small(
    synthetic: Callable[..., Records],
) -> None:
    records = synthetic(10_000)
    for record in records[:200]:
        VALIDATOR.validate(record)
    model = build(records)
    items, summary = model["stages"]
    assert items["attempts"] > COMPACT_ABOVE
    assert items["timeline"]["mode"] == "compact"
    assert summary["timeline"]["mode"] == "bars"
    assert items["timeline"]["lanes"] <= 100 + items["backups"]
    assert model["totals"]["instances"] == 10_001
    assert items["committed"] + items["failed"] == 10_000
    # Failures are listed up to a cap and counted past it.
    for group in model["failures"]:
        assert len(group["items"]) + group["more"] == group["attempts"]
    page = render(model, version="test")
    assert len(page.encode()) < 12_000_000


def test_hostile_keys_stay_text(synthetic: Callable[..., Records]) -> None:
    """Keys that look like markup are escaped in the HTML and cannot close the data's script."""
    hostile = ['</script><script>alert("x")</script>', "<img src=x onerror=alert(1)>", "a&b"]
    page = render(build(synthetic(3, keys=hostile)), version="test")
    assert '<script>alert("x")' not in page
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    data = page.split('<script id="phalanx-data" type="application/json">', 1)[1]
    data = data.split("</script>", 1)[0]
    assert hostile[0] in json.loads(data)["stages"][0]["table"]["key"]


def test_the_page_fetches_nothing(synthetic: Callable[..., Records]) -> None:
    page = render(build(synthetic(20)), version="test")
    assert "<script src" not in page
    assert "<link" not in page
    assert "@import" not in page


def test_a_bad_event_file_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = {"v": 1, "t": 1.0, "run": "r1", "type": "run_ended", "ok": True, "cancelled": False}
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(UsageError, match=r"events.jsonl, line 2: not JSON"):
        read_events(path)
    path.write_text(json.dumps(good | {"v": 2}) + "\n")
    with pytest.raises(UsageError, match=r"line 1: event schema version 2"):
        read_events(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good | {"run": "r2"}) + "\n")
    assert read_events(path)[0] == "r2"
    assert read_events(path, "r1")[0] == "r1"
    with pytest.raises(UsageError, match="ambiguous"):
        read_events(path, "r")
    with pytest.raises(UsageError, match="no run 'x'"):
        read_events(path, "x")
    with pytest.raises(UsageError, match="cannot read the event file"):
        read_events(tmp_path / "missing.jsonl")


def test_write_report_defaults_to_the_runs_folder(tmp_path: Path) -> None:
    project, _ = _run_with_failures(tmp_path)
    written = write_report(project=project)
    with open_ledger(project / ".phalanx") as ledger:
        run = ledger.get_run()
    assert run is not None
    assert written == (project / ".phalanx" / "runs" / run.id / "report.html").resolve()
    page = written.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert f"run {run.id}" in page
    assert oct(written.stat().st_mode & 0o044) == oct(0o044)  # readable like any other file
    assert not [p.name for p in written.parent.iterdir() if p.name.endswith(".tmp")]


def test_the_cli_writes_the_report_and_explains_what_is_missing(
    make_project: ProjectFactory,
) -> None:
    project = make_project(make_project.one_stage(make_project.runner("write"), ["a"]))
    none_yet = project.cli("report")
    assert none_yet.returncode == 2
    assert "no phalanx ledger" in none_yet.stderr
    assert project.cli("run", "pipeline.yaml", "--quiet").returncode == 0
    done = project.cli("report", "-o", "out/r.html")
    assert done.returncode == 0, done.stderr
    assert "wrote out/r.html" in done.stdout
    assert (project.root / "out" / "r.html").stat().st_size > 1_000_000  # plotly.js is inside
    wrong = project.cli("report", "nosuchrun")
    assert wrong.returncode == 2
    assert "no run 'nosuchrun'" in wrong.stderr
    missing = project.cli("report", "--events", "nowhere.jsonl", "-o", "x.html")
    assert missing.returncode == 2
    assert "cannot read the event file nowhere.jsonl" in missing.stderr


def test_an_unwritable_report_path_is_a_usage_error(make_project: ProjectFactory) -> None:
    project = make_project(make_project.one_stage(make_project.runner("write"), ["a"]))
    assert project.cli("run", "pipeline.yaml", "--quiet").returncode == 0
    (project.root / "blocked").write_text("a file, not a folder")
    done = project.cli("report", "-o", "blocked/report.html")
    assert done.returncode == 2
    assert "cannot write the report to blocked/report.html" in done.stderr

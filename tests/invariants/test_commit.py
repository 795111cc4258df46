"""Invariant 2: an instance's outputs appear complete and validated, or not at all; a re-run
replaces an output wholesale, never merges into it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from phalanx import Backoff, InstanceContext, fan_out
from phalanx._databus import MANIFEST

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory


def test_invalid_json_is_retried_then_recorded(make_project: ProjectFactory) -> None:
    """An agent writing ``{not json`` to an expected ``.json`` file is retried (retries: 2),
    then fails with cause ``output-invalid``: three notes entries (1/3 and 2/3 retrying, 3/3
    gave up), a row in the stage summary, no output folder; the other partitions commit."""
    runner = make_project.runner("write", "b=badjson")
    backoff = {"base": "0.01s", "max": "0.02s"}
    project = make_project(make_project.one_stage(runner, "abc", retries=2, backoff=backoff))

    stage = project.run().stage("s")

    bad = next(inst for inst in stage.instances if inst.key == "b")
    assert (bad.status, bad.cause, len(bad.attempts)) == ("failed", "output-invalid", 3)
    assert "out.json: not valid JSON" in bad.message
    entries = project.entries("b")
    assert len(entries) == 3
    for n, entry in enumerate(entries, 1):
        assert f"attempt {n}/3" in entry.split("\n", 1)[0]
        assert "cause: output-invalid" in entry
    assert "action: retrying in" in entries[0]
    assert "action: retrying in" in entries[1]
    assert "action: gave up" in entries[2]
    assert project.entries("a") == project.entries("c") == []
    row = next(line for line in project.summary("s").splitlines() if "`b`" in line)
    assert "failed" in row
    assert "output-invalid" in row
    assert project.dirs("data") == ["a", "c"]
    assert (stage.committed, stage.failed, stage.skipped) == (2, 1, 0)


@pytest.mark.parametrize(
    ("mode", "cause"),
    [
        ("partial", "output-invalid"),
        ("partialfail", "runner-error"),
        ("raise", "runner-error"),
        ("symlink", "confinement"),
        ("fifo", "confinement"),
    ],
)
def test_incomplete_or_unsafe_output_leaves_no_folder(
    make_project: ProjectFactory, mode: str, cause: str
) -> None:
    """An agent that writes only one of two expected files, writes one and then fails, raises,
    or leaves a symlink or a named pipe among its outputs leaves no output folder at all (not
    even the files it did write); a symlink or special file is refused as ``confinement``."""
    project = make_project(make_project.one_stage(make_project.runner(mode), "x"))

    (inst,) = project.run().stage("s").instances

    assert (inst.status, inst.cause) == ("failed", cause), inst.message
    assert not (project.root / "data" / "x").exists()
    assert not (project.root / "data").exists() or project.dirs("data") == []
    assert project.staging_leftovers() == []


def _rewriting_agent(files: Mapping[str, str]) -> Callable[[InstanceContext], Awaitable[None]]:
    async def agent(ctx: InstanceContext) -> None:
        for name, text in files.items():
            (ctx.output_dir / name).write_text(text, encoding="utf-8")
        if not files:
            raise RuntimeError("this run fails")

    return agent


def test_rerun_replaces_an_output_wholesale(tmp_path: Path) -> None:
    """A committed output is replaced as a whole by a re-run: files the new attempt did not
    write (``extra.txt``) are gone, never merged; a later failing re-run leaves the last good
    output untouched."""

    def run(files: Mapping[str, str]) -> str:
        result = asyncio.run(
            fan_out(
                ["k"],
                _rewriting_agent(files),
                output="data/{PARTITION_KEY}/",
                project_dir=tmp_path,
                expect=["a.json"],
                retries=0,
                force=True,  # the agent differs by what its closure holds: phalanx cannot see it
            )
        )
        return result.instances[0].status

    out = tmp_path / "data" / "k"
    assert run({"a.json": '{"v": 1}', "extra.txt": "old"}) == "committed"
    assert sorted(p.name for p in out.iterdir() if p.name != MANIFEST) == ["a.json", "extra.txt"]

    assert run({"a.json": '{"v": 2}'}) == "committed"
    assert sorted(p.name for p in out.iterdir() if p.name != MANIFEST) == ["a.json"]
    assert json.loads((out / "a.json").read_text()) == {"v": 2}

    assert run({}) == "failed"
    assert sorted(p.name for p in out.iterdir() if p.name != MANIFEST) == ["a.json"]
    assert json.loads((out / "a.json").read_text()) == {"v": 2}
    assert not (tmp_path / ".phalanx" / "trash").exists() or not any(
        (tmp_path / ".phalanx" / "trash").rglob("*")
    )


def test_invalid_rerun_keeps_the_previous_output(tmp_path: Path) -> None:
    """A re-run whose output fails validation (missing expected file) does not touch the
    committed output of the previous run."""

    def run(files: Mapping[str, str]) -> str:
        result = asyncio.run(
            fan_out(
                ["k"],
                _rewriting_agent(files),
                output="data/{PARTITION_KEY}/",
                project_dir=tmp_path,
                expect=["a.json", "b.md"],
                retries=1,
                backoff=Backoff(base=0.01, max=0.01),
                force=True,  # the agent differs by what its closure holds: phalanx cannot see it
            )
        )
        return result.instances[0].status

    out = tmp_path / "data" / "k"
    assert run({"a.json": "[1]", "b.md": "one"}) == "committed"
    assert run({"a.json": "[2]"}) == "failed"
    assert (out / "a.json").read_text() == "[1]"
    assert (out / "b.md").read_text() == "one"

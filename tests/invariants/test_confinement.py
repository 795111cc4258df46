"""Confinement: a downstream instance may read its inputs, never change them; outputs must be
plain files inside the staging folder."""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

from phalanx import run_pipeline

AGENTS = """
import os
from pathlib import Path


def produce(ctx):
    (ctx.output_dir / "data.txt").write_text(ctx.key)


def tamper(ctx):
    for ref in ctx.inputs:
        text = (ref.path / "data.txt").read_text()
        if ctx.key == "bad":
            (ref.path / "data.txt").write_text(text + " changed")
    (ctx.output_dir / "out.txt").write_text("ok")


def link(ctx):
    os.symlink("/etc/passwd", ctx.output_dir / "passwd")
    (ctx.output_dir / "out.txt").write_text("ok")
"""

PIPELINE = """\
name: confinement
defaults: {retries: 0}
stages:
  - name: up
    partitions: [{id: a, team: good}, {id: b, team: bad}]
    runner: {type: python, function: "confinement_agents:produce"}
    output: data/up/{id}/
  - name: down
    needs: [up]
    group_by: team
    runner: {type: python, function: "confinement_agents:tamper"}
    output: data/down/{team}/
  - name: links
    partitions: [x]
    runner: {type: python, function: "confinement_agents:link"}
    output: data/links/{value}/
"""


def test_writing_into_inputs_fails_the_attempt_and_symlinks_are_refused(tmp_path: Path) -> None:
    """The instance that rewrote an upstream file fails with cause ``confinement`` naming the
    file; its sibling that only read commits; an output holding a symlink is refused."""
    (tmp_path / "confinement_agents.py").write_text(textwrap.dedent(AGENTS))
    (tmp_path / "pipeline.yaml").write_text(PIPELINE)
    result = asyncio.run(run_pipeline(tmp_path / "pipeline.yaml"))
    down = {inst.key: inst for inst in result.stage("down").instances}
    assert down["good"].status == "committed"
    assert down["bad"].status == "failed"
    assert down["bad"].cause == "confinement"
    assert "data/up/b/data.txt" in down["bad"].message
    assert not (tmp_path / "data/down/bad").exists()
    links = result.stage("links").instances[0]
    assert links.status == "failed"
    assert links.cause == "confinement"
    assert "symlink" in links.message
    assert not os.path.lexists(tmp_path / "data/links/x")

"""``phalanx init`` writes a starter that plans, validates and runs as written."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from phalanx.cli import cli


def test_init_then_validate_plan_and_run(tmp_path: Path, monkeypatch: object) -> None:
    """The starter runs to exit 0 with every output committed and the report listing all."""
    runner = CliRunner()
    result = runner.invoke(cli, ["init", str(tmp_path)])
    assert result.exit_code == 0, result.output
    pipeline = str(tmp_path / "pipeline.yaml")
    assert runner.invoke(cli, ["validate", pipeline]).output.startswith("ok: 2 stages, 5 ")
    planned = runner.invoke(cli, ["plan", pipeline, "--json"])
    assert json.loads(planned.output)["stages"][0]["instances"] == 4
    ran = runner.invoke(cli, ["run", pipeline, "--json"])
    assert ran.exit_code == 0, ran.output
    summary = json.loads(ran.stdout)
    assert [(s["name"], s["committed"]) for s in summary["stages"]] == [
        ("describe", 4),
        ("report", 1),
    ]
    report = (tmp_path / "data/fruit/report/report.md").read_text()
    assert "- Damson plum: 10 letters" in report
    assert report.index("Apple") < report.index("Banana") < report.index("Cherry")


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    """An existing file is never overwritten: exit 2, the file untouched."""
    (tmp_path / "pipeline.yaml").write_text("mine")
    result = CliRunner().invoke(cli, ["init", str(tmp_path)])
    assert result.exit_code == 2
    assert "would overwrite pipeline.yaml" in result.output
    assert (tmp_path / "pipeline.yaml").read_text() == "mine"
    assert not (tmp_path / "agent.py").exists()

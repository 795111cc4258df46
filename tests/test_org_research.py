"""examples/org-research runs offline against the loopback LLM, as its README says, with the
anthropic runner and, switched by --set, with the openai runner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from phalanx.cli import cli
from phalanx.testing import LoopbackLLM

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "org-research"


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_org_research_runs_offline(tmp_path: Path, provider: str) -> None:
    """Every organisation's files commit (activities.json passing its schema), the report
    reads them all, and the --json summary counts the tokens spent."""
    project = tmp_path / "org-research"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("data", "wip", ".phalanx"))
    with LoopbackLLM().running_in_thread() as server:
        settings = ["--set", f"base_url={server.url}"]
        if provider == "openai":
            settings = ["--set", "type=openai", "--set", f"base_url={server.url}/v1"]
        outcome = CliRunner().invoke(
            cli, ["run", str(project / "pipeline.yaml"), "--json", "--quiet", *settings]
        )
    assert outcome.exit_code == 0, outcome.output
    summary = json.loads(outcome.stdout)
    assert [(s["name"], s["committed"]) for s in summary["stages"]] == [
        ("research", 5),
        ("report", 1),
    ]
    assert summary["usage"]["requests"] == 12
    assert summary["usage"]["output_tokens"] > 0
    organizations = json.loads((project / "references/organizations.json").read_text())
    for org in organizations["organizations"]:
        raw = project / "data/2025-09/raw" / org["id"]
        assert json.loads((raw / "activities.json").read_text())["items"]
        assert (raw / "sources.md").read_text().strip()
    assert (project / "data/2025-09/report/report.md").read_text().startswith("# ")

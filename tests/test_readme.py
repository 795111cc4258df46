"""The README's examples run as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from phalanx._config import PipelineConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_pipeline_example_is_a_valid_pipeline() -> None:
    """The pipeline shown in the README passes the pipeline schema."""
    (example,) = blocks("yaml")
    config = PipelineConfig.model_validate(yaml.safe_load(example))
    assert [stage.kind for stage in config.stages] == ["map", "group", "single"]


def test_readme_python_example_runs(tmp_path: Path) -> None:
    """The Python API example runs against a copy of the quickstart and prints its results."""
    (code,) = blocks("python")
    shutil.copytree(
        ROOT / "examples/quickstart",
        tmp_path / "examples/quickstart",
        ignore=shutil.ignore_patterns("data", "wip", ".phalanx", "__pycache__"),
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "2 0 0"
    assert lines[1].startswith("True [{'name': 'modules'")
    assert (tmp_path / "out/a/summary.md").read_text() == "# Alpha\n"


def test_readme_setup_commands_match_ci() -> None:
    """The README's test command is the one `.ci/run` runs."""
    ci = (ROOT / ".ci/run").read_text(encoding="utf-8")
    assert "python3 -m pytest\n" in README
    assert ci.rstrip().endswith("python3 -m pytest")
    assert "python3 -m phalanx run examples/quickstart/pipeline.yaml" in README

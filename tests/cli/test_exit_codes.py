"""``phalanx`` exit codes: 0 success, 1 failed partitions, 2 bad input (with a message naming
the file and, where it applies, the field or row, and nothing written), 130 stopped (see
``tests/invariants/test_kill.py``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory


def test_success_exits_0(make_project: ProjectFactory) -> None:
    """The starter project from ``phalanx init`` runs to the end: exit code 0, every partition
    committed, and the summary names the stages."""
    project = make_project(None)
    init = project.cli("init", ".")
    assert init.returncode == 0, init.stderr

    done = project.cli("run", "pipeline.yaml")

    assert done.returncode == 0, done.stdout + done.stderr
    assert project.dirs("data/fruit/items") == ["apple", "banana", "cherry", "damson"]
    assert (project.root / "data" / "fruit" / "report" / "report.md").is_file()
    assert "describe" in done.stdout
    assert "report" in done.stdout


def test_failed_partitions_exit_1_with_json_summary(make_project: ProjectFactory) -> None:
    """A command agent exiting 3 on some keys: ``phalanx run --json`` exits 1; stdout is one
    JSON document whose stage counts add up and carry name, total, committed, failed,
    skipped, wall_s and sum_instance_s; each failure says ``exited with code 3`` with cause
    ``runner-error``; the notes keep the agent's stderr; the other partitions commit."""
    keys = ["a", "b", "c", "d", "e", "f"]
    project = make_project(
        {
            "name": "exit1",
            "stages": [
                {
                    "name": "s",
                    "partitions": {"items": keys},
                    "output": "data/{PARTITION_KEY}/",
                    "expect": ["out.json"],
                    "runner": make_project.runner("write", "b=exit3", "e=exit3"),
                    "retries": 0,
                }
            ],
        }
    )

    done = project.cli("run", "pipeline.yaml", "--json")

    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert summary["ok"] is False
    (stage,) = summary["stages"]
    for name in ("name", "total", "committed", "failed", "skipped", "wall_s", "sum_instance_s"):
        assert name in stage
    assert stage["name"] == "s"
    assert (stage["total"], stage["committed"], stage["failed"], stage["skipped"]) == (6, 4, 2, 0)
    assert stage["committed"] + stage["failed"] + stage["skipped"] == stage["total"]
    assert stage["wall_s"] > 0
    assert stage["sum_instance_s"] > 0
    failures = {f["key"]: f for f in stage["failures"]}
    assert sorted(failures) == ["b", "e"]
    for failure in failures.values():
        assert failure["cause"] == "runner-error"
        assert "exited with code 3" in failure["message"]
    for key in ("b", "e"):
        (entry,) = project.entries(key)
        assert f"agent {key}: giving up with code 3" in entry
    assert project.dirs("data") == ["a", "c", "d", "f"]


# ---------------------------------------------------------------------------------------------
# Exit code 2: bad input. Each case starts from a valid project and breaks one thing.

ITEMS = '[{"id": "a"}, {"id": "b"}]'


def _stage(**changes: object) -> dict[str, object]:
    stage: dict[str, object] = {
        "name": "s",
        "blueprint": "agent.md",
        "partitions": {"from": "items.json", "key": "id"},
        "params": {"ID": "{id}"},
        "output": "data/{ID}/",
        "expect": ["out.json"],
    }
    stage.update(changes)
    return {k: v for k, v in stage.items() if v is not None}


@dataclass
class Bad:
    """One way to break the base project: replaced files (``None`` deletes), stages for the
    pipeline (or raw pipeline text), and fragments stderr must contain."""

    files: Mapping[str, str | None] = field(default_factory=dict)
    stages: list[dict[str, object]] = field(default_factory=lambda: [_stage()])
    raw: str | None = None
    says: tuple[str, ...] = ()
    argv: tuple[str, ...] = ("run", "pipeline.yaml")
    bug: str | None = None


CASES = {
    "malformed-pipeline-yaml": Bad(
        raw="name: bad\nstages:\n  - name: s\n    output: [data/\n",
        says=("pipeline.yaml", "malformed YAML", "line "),
    ),
    "unknown-field": Bad(
        stages=[_stage(outptu="x/")],
        says=("pipeline.yaml", "outptu", "did you mean 'output'"),
    ),
    "malformed-json-partitions": Bad(
        files={"items.json": '[{"id": "a"},\n {"id": }]'},
        says=("items.json", "malformed JSON", "line 2"),
    ),
    "malformed-csv-partitions": Bad(
        files={"items.csv": 'id,name\na,"Acme\nb,Beta\n'},
        stages=[_stage(partitions={"from": "items.csv", "key": "id"})],
        says=("items.csv", "malformed CSV"),
    ),
    "csv-row-with-extra-column": Bad(
        files={"items.csv": "id,name\na,Acme\nb,Beta,extra\n"},
        stages=[_stage(partitions={"from": "items.csv", "key": "id"})],
        says=("items.csv", "line 3", "3 columns"),
    ),
    "duplicate-keys": Bad(
        files={"items.json": '[{"id": "a"}, {"id": "b"}, {"id": "a"}]'},
        says=("items.json", "duplicate partition key", "item 1", "item 3"),
    ),
    "key-with-slash": Bad(
        files={"items.json": '[{"id": "a"}, {"id": "a/b"}]'},
        says=("items.json", "item 2", "path separator"),
    ),
    "key-with-dotdot": Bad(
        files={"items.json": '[{"id": "a..b"}]'},
        says=("items.json", "item 1", "'..'"),
    ),
    "key-with-nul": Bad(
        files={"items.json": '[{"id": "a\\u0000b"}]'},
        says=("items.json", "item 1", "control character"),
    ),
    "key-with-leading-dot": Bad(
        files={"items.json": '[{"id": ".hidden"}]'},
        says=("items.json", "item 1", "starts with '.'"),
    ),
    "key-too-long": Bad(
        files={"items.json": json.dumps([{"id": "x" * 200}])},
        says=("items.json", "item 1", "200 characters long"),
    ),
    "missing-blueprint-parameter": Bad(
        files={"agent.md": "Do {ID} with {OTHER}.\n"},
        says=("agent.md", "OTHER", "partition 'a'"),
    ),
    "unknown-stage-in-needs": Bad(
        stages=[_stage(), _stage(name="t", needs=["nope"], output="data2/{ID}/")],
        says=("pipeline.yaml", "needs", "unknown stage 'nope'"),
    ),
    "cycle": Bad(
        stages=[
            _stage(),
            _stage(name="x", partitions=None, needs=["y"], output="x/{ID}/"),
            _stage(name="y", partitions=None, needs=["x"], output="y/{ID}/"),
        ],
        says=("pipeline.yaml", "cycle", "x -> y -> x"),
    ),
    "two-instances-one-output": Bad(
        stages=[_stage(output="data/same/")],
        says=("pipeline.yaml", "output", "s/a", "s/b", "data/same"),
    ),
    "output-inside-another": Bad(
        stages=[_stage(), _stage(name="t", output="data/a/{ID}/")],
        says=("pipeline.yaml", "inside the output of"),
    ),
    "output-outside-project": Bad(
        stages=[_stage(output="../elsewhere/{ID}/")],
        says=("pipeline.yaml", "output", "escapes the project"),
    ),
    "missing-blueprint": Bad(
        files={"agent.md": None},
        says=("agent.md", "not found"),
    ),
    "missing-partition-file": Bad(
        files={"items.json": None},
        says=("items.json", "not found"),
    ),
    "blueprint-without-body": Bad(
        files={"agent.md": "---\nname: empty\ndescription: nothing below\n---\n\n"},
        says=("agent.md", "no body"),
    ),
    "broken-json-schema": Bad(
        files={"schema.json": "{"},
        stages=[_stage(expect={"out.json": {"schema": "schema.json"}})],
        says=("schema.json", "not a valid JSON Schema"),
    ),
    "unimportable-python-agent": Bad(
        stages=[_stage(runner={"type": "python", "function": "no_such_module:run"})],
        says=("pipeline.yaml", "runner", "no_such_module"),
    ),
    "missing-pipeline-file": Bad(
        argv=("run", "nowhere.yaml"),
        says=("nowhere.yaml", "not found"),
    ),
    "expected-file-outside-output": Bad(
        stages=[_stage(expect=["../escape.json"])],
        says=("pipeline.yaml", "expect", "../escape.json"),
    ),
    "validate-unimportable-python-agent": Bad(
        stages=[_stage(runner={"type": "python", "function": "no_such_module:run"})],
        says=("no_such_module",),
        argv=("validate", "pipeline.yaml"),
    ),
}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            case,
            id=name,
            marks=[pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else [],
        )
        for name, case in CASES.items()
    ],
)
def test_bad_input_exits_2_and_writes_nothing(make_project: ProjectFactory, case: Bad) -> None:
    """Bad input exits with code 2 before anything runs: stderr starts with ``error:`` and
    names the file (and the field or row where it applies), and the project folder is left
    exactly as it was (no data/, wip/ or .phalanx/)."""
    files: dict[str, str | None] = {"agent.md": "Do {ID}.\n", "items.json": ITEMS}
    files.update(case.files)
    config = {"name": "bad", "defaults": {"runner": make_project.runner("write")}}
    text = case.raw or make_project.dump({**config, "stages": case.stages})
    project = make_project(text, {k: v for k, v in files.items() if v is not None})
    before = project.tree(project.root)

    done = project.cli(*case.argv)

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: "), done.stderr
    for fragment in case.says:
        assert fragment in done.stderr, f"{fragment!r} not in {done.stderr!r}"
    assert "Traceback" not in done.stderr
    assert project.tree(project.root) == before


def test_run_id_given_by_the_caller(make_project: ProjectFactory) -> None:
    """``--run-id`` names the run (a caller such as ``phalanx mcp`` knows it before the run
    starts); an id already used in the project, or one that is not a safe folder name, is a
    usage error (exit 2) and nothing runs."""
    project = make_project(None)
    assert project.cli("init", ".").returncode == 0

    done = project.cli("run", "pipeline.yaml", "--run-id", "nightly-1", "--json")

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["run_id"] == "nightly-1"
    again = project.cli("run", "pipeline.yaml", "--run-id", "nightly-1")
    assert again.returncode == 2
    assert "already has a run with that id" in again.stderr
    hostile = project.cli("run", "pipeline.yaml", "--run-id", "../escape")
    assert hostile.returncode == 2
    assert "--run-id '../escape'" in hostile.stderr
    runs = json.loads(project.cli("runs", "--json").stdout)
    assert [run["id"] for run in runs] == ["nightly-1"]

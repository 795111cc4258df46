"""``phalanx import`` on POMASA-shaped projects: the two example projects under
``examples/pomasa/`` (a monthly organisation tracker with Chinese headings; a 55 -> 12 -> 4 -> 1
industry assessment with English ones) are imported, planned and run offline against the
loopback LLM server, and projects missing what cannot be inferred get ``TODO:`` values that
``phalanx validate`` names."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from phalanx import load_pipeline, plan_pipeline
from phalanx.testing import BlueprintModel, Conversation, LoopbackLLM, Reply

if TYPE_CHECKING:
    from tests.conftest import Project, ProjectFactory

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "pomasa"
_INSTANCE = re.compile(r"You are instance `([^`]+)` of stage `([^`]+)`")

WORDS = " ".join(f"word{n}" for n in range(60))
GOOD = BlueprintModel(
    contents={
        "activities.json": json.dumps(
            {"activities": [{"date": "2025-09-02", "source": "https://example.org/a"}]}
        ),
        "sources.md": "# 来源\n\n- https://example.org/a\n",
        "report.md": f"# 月度报告\n\n{WORDS}\n\n## 缺失\n\n无\n",
        "score.json": json.dumps({"function_id": "x", "score": 3, "evidence": ["a", "b"]}),
        "analysis.md": f"# Analysis\n\n{WORDS}\n",
        "synthesis.md": f"# Synthesis\n\n{WORDS}\n\n## Conclusion\n\nSound.\n",
        "verdict.json": json.dumps({"pass": True}),
    }
)
NO_SOURCE = BlueprintModel(
    contents={
        **GOOD.contents,
        "activities.json": json.dumps({"activities": [{"date": "2025-09-02"}]}),
    }
)


def _model(bad_keys: frozenset[str] = frozenset()) -> Callable[[Conversation], Reply]:
    """The agents: every instance writes outputs that meet its blueprint's criteria, except
    the instances keyed in ``bad_keys``, whose activities cite no source."""

    def answer(conversation: Conversation) -> Reply:
        found = _INSTANCE.search(conversation.first_user_text)
        key = found.group(1) if found else ""
        return (NO_SOURCE if key in bad_keys else GOOD)(conversation)

    return answer


def _copy(example: str, make_project: ProjectFactory) -> Project:
    project = make_project(None, name=example)
    shutil.copytree(EXAMPLES / example, project.root, dirs_exist_ok=True)
    return project


def _counts(project: Project, run_id: str) -> dict[str, dict[str, int]]:
    with sqlite3.connect(project.root / ".phalanx" / "ledger.db") as db:
        rows = db.execute(
            "SELECT stage, status, count(*) FROM instances WHERE run_id = ? GROUP BY 1, 2",
            (run_id,),
        ).fetchall()
    counts: dict[str, dict[str, int]] = {}
    for stage, status, count in rows:
        counts.setdefault(stage, {})[status] = count
    return counts


def test_tracker_imports_plans_and_runs(make_project: ProjectFactory) -> None:
    """The monthly tracker: one map stage over the 8 organisations of
    ``references/organizations.json`` with ORGANIZATION_ID/NAME bound to ``id``/``name``, then
    a single summary stage; PERIOD is a TODO until given. Run offline, every organisation's
    folder appears where the blueprint's 输出位置 says, the agents were told to read their
    blueprint (reference mode), and the summary stage read all 8."""
    project = _copy("monthly-tracker", make_project)
    with LoopbackLLM(default_model=_model()).running_in_thread() as server:
        url = server.url + "/v1"
        first = project.cli("import", ".", "--runner", "openai", "--model", "m", "--base-url", url)
        assert first.returncode == 0, first.stderr
        assert "params.PERIOD: 统计周期" in first.stdout
        validate = project.cli("validate", "pipeline.yaml")
        assert validate.returncode == 2
        assert "params.PERIOD: TODO: 统计周期，格式为 `YYYY-MM`" in validate.stderr

        again = project.cli(
            "import", ".", "--force", "--runner", "openai", "--model", "m",
            "--base-url", url, "--param", "PERIOD=2025-09",
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert "TODO" not in again.stdout
        config = yaml.safe_load(project.pipeline.read_text(encoding="utf-8"))
        research, summary = config["stages"]
        assert research["partitions"] == {
            "from": "references/organizations.json",
            "list": "organizations",
            "key": "id",
        }
        assert research["params"] == {"ORGANIZATION_ID": "{id}", "ORGANIZATION_NAME": "{name}"}
        assert summary["single"] is True
        assert summary["needs"] == ["research_agent"]
        assert config["defaults"]["prompt"] == "reference"

        done = project.cli("run", "pipeline.yaml", "--json", timeout=240)
        requests = server.requests

    assert done.returncode == 0, done.stdout + done.stderr
    ids = [org["id"] for org in json.loads(
        (project.root / "references/organizations.json").read_text(encoding="utf-8")
    )["organizations"]]  # fmt: skip
    assert project.dirs("data/2025-09/raw") == sorted(ids)
    for org in ids:
        folder = project.root / "data/2025-09/raw" / org
        assert sorted(p.name for p in folder.iterdir()) == [
            ".phalanx-manifest.json", "activities.json", "sources.md",
        ]  # fmt: skip
    assert (project.root / "data/2025-09/summary/report.md").is_file()
    run_id = json.loads(done.stdout)["run_id"]
    assert _counts(project, run_id) == {
        "research_agent": {"committed": 8},
        "monthly_summary": {"committed": 1},
    }
    prompts = [
        message["content"]
        for request in requests
        if request.body
        for message in request.body.get("messages", [])
        if message.get("role") == "user" and isinstance(message.get("content"), str)
    ]
    assert any(
        "Read `agents/01.research_agent.md` and execute strictly according to that blueprint"
        in text
        and 'ORGANIZATION_NAME="O\'Brien & Sons"' in text
        for text in prompts
    )


def test_tracker_checks_fail_an_output_missing_a_criterion(make_project: ProjectFactory) -> None:
    """The tracker's checklist item "every activity has a `date` and a `source`" became a check:
    the organisation whose agent cites no source fails (cause output-invalid, the criterion
    quoted, in the notes too) and its folder never appears; the others commit."""
    project = _copy("monthly-tracker", make_project)
    with LoopbackLLM(default_model=_model(frozenset({"hooli"}))).running_in_thread() as server:
        imported = project.cli(
            "import", ".", "--runner", "openai", "--model", "m",
            "--base-url", server.url + "/v1", "--param", "PERIOD=2025-09",
        )  # fmt: skip
        assert imported.returncode == 0, imported.stderr
        done = project.cli("run", "pipeline.yaml", "--json", timeout=240)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "hooli" not in project.dirs("data/2025-09/raw")
    assert len(project.dirs("data/2025-09/raw")) == 7
    entries = project.entries("hooli")
    assert len(entries) == 3  # retries: 2
    assert "cause: output-invalid" in entries[-1]
    assert (
        "activities.json: field 'activities[].source' is missing "
        "(criterion: `activities` 中每条记录都包含 `date` 和 `source` 字段)" in entries[-1]
    )


def test_assessment_imports_as_55_12_4_1_and_runs(make_project: ProjectFactory) -> None:
    """The industry assessment: a map over the 55 function items, a group stage per feature
    (12), one per dimension (4, grouping the features by the DIMENSION_ID their members share),
    and a single overall synthesis; ``--review`` adds a reviewer for the criteria no program
    checks. Run offline, every layer commits with its reviews passed."""
    project = _copy("industry-assessment", make_project)
    with LoopbackLLM(default_model=_model()).running_in_thread() as server:
        imported = project.cli(
            "import", ".", "--runner", "openai", "--model", "m", "--base-url",
            server.url + "/v1", "--param", "INDUSTRY_ID=semiconductors", "--review",
        )  # fmt: skip
        assert imported.returncode == 0, imported.stderr
        plan = plan_pipeline(load_pipeline(project.pipeline))
        assert [(s.name, s.kind, len(s.instances)) for s in plan.stages] == [
            ("function_analyst", "map", 55),
            ("feature_synthesizer", "group", 12),
            ("dimension_synthesizer", "group", 4),
            ("overall_synthesizer", "single", 1),
        ]
        features = {inst.key: inst for inst in plan.stages[1].instances}
        assert [ref.key for ref in features["F01"].inputs] == ["1.1", "1.2", "1.3", "1.4", "1.5"]
        assert features["F12"].values["FEATURE_NAME"] == "National will"
        dimensions = {inst.key: [r.key for r in inst.inputs] for inst in plan.stages[2].instances}
        assert dimensions == {
            "D1": ["F01", "F02", "F03"],
            "D2": ["F04", "F05", "F06"],
            "D3": ["F07", "F08", "F09"],
            "D4": ["F10", "F11", "F12"],
        }
        assert plan.stages[0].review is not None
        assert plan.stages[0].review.criteria == ("Every claim in `analysis.md` cites a source",)
        assert plan.stages[2].review is None  # its only criterion is a check

        done = project.cli("run", "pipeline.yaml", "--json", timeout=400)
        verdicts = sum(
            1
            for request in server.requests
            if request.body and "verdict.json" in json.dumps(request.body.get("messages", []))
        )

    assert done.returncode == 0, done.stdout + done.stderr
    run_id = json.loads(done.stdout)["run_id"]
    assert _counts(project, run_id) == {
        "function_analyst": {"committed": 55},
        "feature_synthesizer": {"committed": 12},
        "dimension_synthesizer": {"committed": 4},
        "overall_synthesizer": {"committed": 1},
    }
    base = project.root / "data" / "semiconductors"
    assert len(project.dirs("data/semiconductors/01.functions")) == 55
    assert project.dirs("data/semiconductors/03.dimensions") == ["D1", "D2", "D3", "D4"]
    assert (base / "04.overall" / "report.md").is_file()
    assert verdicts >= 55 + 12 + 1  # a reviewer looked at every reviewed instance


def _project(make_project: ProjectFactory, files: dict[str, str], name: str) -> Project:
    return make_project(None, files, name=name)


BLUEPRINT = """\
# Item agent

## Input Parameters

- `{ITEM_ID}`: the item
- `{ITEM_COLOUR}`: its colour

## Output Location

`data/{ITEM_ID}/`

**Output Format**:

```
data/{ITEM_ID}/
└── out.json
```
"""


def test_what_cannot_be_inferred_is_a_todo_validate_names(make_project: ProjectFactory) -> None:
    """No orchestrator, a reference file with two lists of objects and nothing to choose
    between them, a second blueprint whose parameter is in no reference file, no output
    location, and the command runner: each gap is a TODO with its reason, and ``phalanx
    validate`` lists them all with their lines."""
    project = _project(
        make_project,
        {
            "agents/01.item_agent.md": BLUEPRINT + "\nRead `references/data.json`.\n",
            "agents/02.judge.md": "# Judge\n\n## Input Parameters\n\n- `{JURY_ID}`: the jury\n",
            "references/data.json": json.dumps({"apples": [{"id": "a"}], "pears": [{"id": "p"}]}),
        },
        "gaps",
    )

    imported = project.cli("import", ".", "--runner", "command")

    assert imported.returncode == 0, imported.stderr
    text = project.pipeline.read_text(encoding="utf-8")
    assert "cannot tell which list holds the partitions (lists of objects: apples, pears)" in text
    assert "parameters JURY_ID are not fields of any reference file" in text
    assert "agents/02.judge.md has no output location" in text
    assert "the program that runs one instance" in text
    validate = project.cli("validate", "pipeline.yaml")
    assert validate.returncode == 2
    listed = [line for line in validate.stderr.splitlines() if line.startswith("  pipeline.yaml:")]
    assert len(listed) == 4, validate.stderr
    fields = [line.split(": ")[1] for line in listed]
    assert fields == [
        "defaults.runner.argv[0]",
        "stages[0] (item_agent).partitions",
        "stages[1] (judge).group_by",
        "stages[1] (judge).output",
    ]


def test_unsafe_keys_and_unknown_params_are_reported(make_project: ProjectFactory) -> None:
    """Row ids that cannot name folders leave the key a TODO naming the bad value; a --param
    that is no parameter of the project is a usage error listing the real ones."""
    project = _project(
        make_project,
        {
            "agents/01.item_agent.md": BLUEPRINT,
            "references/items.json": json.dumps(
                {"items": [{"item_id": "../etc", "item_colour": "red"}, {"item_id": "b"}]}
            ),
        },
        "unsafe",
    )
    wrong = project.cli("import", ".", "--param", "COLOUR=red")
    assert wrong.returncode == 2
    assert "--param COLOUR: not a parameter of this project's pipeline" in wrong.stderr
    assert not project.pipeline.exists()

    imported = project.cli("import", ".")

    assert imported.returncode == 0, imported.stderr
    config = yaml.safe_load(project.pipeline.read_text(encoding="utf-8"))
    (stage,) = config["stages"]
    assert stage["params"] == {"ITEM_ID": "{item_id}", "ITEM_COLOUR": "{item_colour}"}
    assert stage["partitions"]["key"].startswith("TODO: field 'item_id' of references/items.json")
    assert "'../etc'" in stage["partitions"]["key"]


def test_import_refuses_to_overwrite_or_to_guess_a_project(make_project: ProjectFactory) -> None:
    """An existing pipeline file is kept unless --force; a folder with no agents/ is a usage
    error that says what a POMASA project looks like."""
    project = _copy("monthly-tracker", make_project)
    project.write("pipeline.yaml", "# mine\n")
    kept = project.cli("import", ".")
    assert kept.returncode == 2
    assert "does not overwrite it (--force" in kept.stderr
    assert project.pipeline.read_text(encoding="utf-8") == "# mine\n"
    empty = make_project(None, name="empty")
    nothing = empty.cli("import", ".")
    assert nothing.returncode == 2
    assert "no agents/ folder" in nothing.stderr


def _agent(title: str, *params: str, output: str) -> str:
    listed = "\n".join(f"- `{{{name}}}`: {name.lower()}" for name in params)
    return (
        f"# {title}\n\n## Input Parameters\n\n{listed}\n\n## Output Location\n\n`{output}`\n\n"
        "**Output Format**:\n\n```\nout/\n└── out.json\n```\n"
    )


ORCHESTRATOR = """\
# Orchestrator

## Stage 1: collect

Launch `agents/00.collect.md` for each item of `references/items.json`, all at once.

## Stage 2: shelve

Read `references/items.json`, then launch `agents/01.shelve.md` once per shelf.

## Stage 3: label

Launch `agents/02.label.md` for each shelf.

## Stage 4: total

Launch `agents/03.total.md`.
"""


@pytest.mark.parametrize("orchestrated", [False, True])
def test_later_stages_group_or_follow_by_their_parameters(
    make_project: ProjectFactory, orchestrated: bool
) -> None:
    """A stage whose blueprint takes the shelf id (a field that repeats across the item rows)
    groups the items by it, a stage taking only that id again follows the groups one to one,
    and a stage with no parameter of its own is single. Without an orchestrator,
    ``00.collect.md`` names no blueprint, so it is the first agent; with one, stage 2's section
    names the item list, and since its id repeats across the rows it still groups rather than
    mapping over them."""
    rows = [{"item_id": f"i{n}", "shelf_id": f"s{n % 2}"} for n in range(6)]
    project = _project(
        make_project,
        {
            "agents/00.collect.md": _agent("Collect", "ITEM_ID", output="data/items/{ITEM_ID}/"),
            "agents/01.shelve.md": _agent("Shelve", "SHELF_ID", output="data/shelves/{SHELF_ID}/")
            + "\nRead `references/items.json` for the items of {SHELF_ID}.\n",
            "agents/02.label.md": _agent("Label", "SHELF_ID", output="data/labels/{SHELF_ID}/"),
            "agents/03.total.md": _agent("Total", output="data/total/"),
            "references/items.json": json.dumps({"items": rows}),
            **({"agents/orchestrator.md": ORCHESTRATOR} if orchestrated else {}),
        },
        f"variants-{orchestrated}",
    )

    imported = project.cli("import", ".", "--runner", "openai", "--model", "m")

    assert imported.returncode == 0, imported.stderr
    plan = plan_pipeline(load_pipeline(project.pipeline))
    assert [(s.name, s.kind, len(s.instances)) for s in plan.stages] == [
        ("collect", "map", 6),
        ("shelve", "group", 2),
        ("label", "follow", 2),
        ("total", "single", 1),
    ]
    assert [ref.key for ref in plan.stages[1].instances[0].inputs] == ["i0", "i2", "i4"]

"""Completion criteria as validation: mechanical ``checks:`` and the ``review:`` gate.

Each test runs a real pipeline (``run_pipeline``) whose agents write outputs that meet or miss
the criteria on purpose, and asserts what committed, what failed with which cause, and what the
failure says."""

from __future__ import annotations

import json
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest

from phalanx import PipelineError, load_pipeline, plan_pipeline
from phalanx.testing import Conversation, LoopbackLLM, Reply, ToolCall

if TYPE_CHECKING:
    from tests.conftest import Project, ProjectFactory

# A python agent whose output depends on the partition's ``shape`` field.
AGENTS = """
import json


def research(ctx):
    shape = ctx.params["shape"]
    activities = [
        {"date": "2025-09-0%d" % n, "title": "t%d" % n, "source": "https://example.org/%d" % n}
        for n in range(1, 4)
    ]
    if shape == "no-field":
        document = {"items": activities}
    elif shape == "too-few":
        document = {"activities": activities[:1]}
    elif shape == "no-source":
        document = {"activities": activities[:2] + [{"date": "2025-09-03", "title": "x"}]}
    else:
        document = {"activities": activities}
    (ctx.output_dir / "activities.json").write_text(json.dumps(document))
    sources = "- (none found)" if shape == "no-link" else "- https://example.org/1"
    text = "# 来源\\n\\n" + sources + "\\n"
    (ctx.output_dir / "sources.md").write_text("http\\n" if shape == "short" else text)


def report(ctx):
    good = ctx.params["shape"] == "good" or (
        ctx.params["shape"] == "second-time" and "missing" in ctx.feedback
    )
    text = "# Report\\n\\nAll sources checked. APPROVED\\n" if good else "# Report\\n\\ndraft\\n"
    (ctx.output_dir / "report.md").write_text(text)
"""

CHECKS = [
    {"file": "activities.json", "field": "activities", "criterion": "含 activities 数组"},
    {
        "file": "activities.json",
        "field": "activities",
        "min_items": 2,
        "criterion": "至少2条活动",
    },
    {
        "file": "activities.json",
        "field": "activities[].source",
        "criterion": "每条活动注明来源",
    },
    {"file": "sources.md", "contains": "http", "criterion": "sources.md 列出来源链接"},
    {"file": "sources.md", "min_words": 3, "criterion": "sources.md 不少于3字"},
]


def _project(make_project: ProjectFactory, shapes: list[str], **stage: object) -> Project:
    return make_project(
        make_project.one_stage(
            {"type": "python", "function": "agents:research"},
            [{"id": shape, "shape": shape} for shape in shapes],
            expect=("activities.json", "sources.md"),
            **stage,
        ),
        {"agents.py": AGENTS},
    )


def test_checks_fail_outputs_that_miss_their_criterion(make_project: ProjectFactory) -> None:
    """Only the output meeting every check commits; each other one fails as ``output-invalid``
    with a message naming the file, what is wrong, and the criterion it came from."""
    shapes = ["good", "no-field", "too-few", "no-source", "no-link", "short"]
    project = _project(make_project, shapes, checks=CHECKS)

    result = project.run()

    stage = result.stages[0]
    assert [inst.key for inst in stage.instances if inst.status == "committed"] == ["good"]
    assert project.dirs("data") == ["good"]
    failed = {inst.key: inst.attempts[-1] for inst in stage.instances if inst.status == "failed"}
    assert set(failed) == set(shapes) - {"good"}
    assert {record.cause for record in failed.values()} == {"output-invalid"}
    expected = {
        "no-field": "activities.json: field 'activities' is missing "
        "(criterion: 含 activities 数组)",
        "too-few": "activities.json: field 'activities' has 1 entries, fewer than 2 "
        "(criterion: 至少2条活动)",
        "no-source": "activities.json: field 'activities[].source' is missing in 1 of 3 places "
        "(criterion: 每条活动注明来源)",
        "no-link": "sources.md: does not contain 'http' (criterion: sources.md 列出来源链接)",
        "short": "sources.md: has 1 words, fewer than 3 (criterion: sources.md 不少于3字)",
    }
    for key, message in expected.items():
        assert message in (failed[key].message or ""), (key, failed[key].message)
    # "too-few" also misses nothing else, so its message holds that one problem only
    assert (failed["too-few"].message or "").count("criterion") == 1
    # with no "activities" at all, the three checks under it say so once
    assert (failed["no-field"].message or "").count("is missing") == 1


def test_checks_are_checked_when_the_pipeline_loads(make_project: ProjectFactory) -> None:
    """A check that asks nothing, or names a path out of the output folder, is a pipeline error
    naming the stage's field."""
    empty = _project(make_project, ["good"], checks=[{"file": "sources.md"}])
    with pytest.raises(PipelineError, match=r"checks\[0\]: a check asks something of its file"):
        load_pipeline(empty.pipeline)
    outside = make_project(
        make_project.one_stage(
            {"type": "python", "function": "agents:research"},
            ["x"],
            checks=[{"file": "../x.json", "field": "a"}],
        ),
        name="outside",
    )
    with pytest.raises(PipelineError, match=r"inside the output folder"):
        load_pipeline(outside.pipeline)


REVIEWER = """
import json, os, pathlib, sys

prompt = sys.stdin.read()
pathlib.Path("prompt.txt").write_text(prompt)  # in the reviewer's own folder: discarded
(reviewed,) = json.loads(os.environ["PHALANX_INPUTS"])
report = pathlib.Path(reviewed["path"], "report.md").read_text()
mode = os.environ.get("REVIEWER_MODE", "judge")
if mode == "tamper":
    pathlib.Path(reviewed["path"], "report.md").write_text("rewritten by the reviewer")
if mode == "silent":
    sys.exit(0)
if mode == "slow":
    import time
    time.sleep(60)
if mode == "crash":
    print("reviewer blew up", file=sys.stderr)
    sys.exit(4)
assert "Every source is cited" in prompt, prompt
verdict = {"pass": True} if "APPROVED" in report else {
    "pass": False, "reasons": ["Every source is cited: the report is a draft, sources missing"]
}
pathlib.Path("verdict.json").write_text(json.dumps(verdict))
"""


def _reviewed(
    make_project: ProjectFactory, shapes: list[str], mode: str = "judge", retries: int = 0
) -> Project:
    return make_project(
        make_project.one_stage(
            {"type": "python", "function": "agents:report"},
            [{"id": shape, "shape": shape} for shape in shapes],
            expect=("report.md",),
            retries=retries,
            backoff={"base": "10ms", "max": "10ms"},
            review={
                "criteria": ["Every source is cited", "The report is not a draft"],
                "runner": {
                    "type": "command",
                    "argv": [sys.executable, "{PROJECT_DIR}/reviewer.py"],
                    "env": {"REVIEWER_MODE": mode},
                    "kill_grace": "100ms",
                },
                **({"timeout": "1s"} if mode == "slow" else {}),
            },
        ),
        {"agents.py": AGENTS, "reviewer.py": REVIEWER},
        name=f"reviewed-{mode}",
    )


def test_a_rejecting_verdict_stops_the_commit(make_project: ProjectFactory) -> None:
    """The reviewer's verdict gates the commit: a passed output commits, a rejected one fails
    with cause ``review-rejected`` and the reviewer's reasons, and its retry receives those
    reasons as feedback (the ``second-time`` agent fixes its report when told). The verdict is
    kept in the attempt's log folder."""
    project = _reviewed(make_project, ["good", "bad", "second-time"], retries=1)

    result = project.run()

    by_key = {inst.key: inst for inst in result.stages[0].instances}
    assert by_key["good"].status == "committed"
    assert len(by_key["good"].attempts) == 1
    assert by_key["second-time"].status == "committed"
    assert [a.cause for a in by_key["second-time"].attempts] == ["review-rejected", None]
    assert by_key["bad"].status == "failed"
    assert [a.cause for a in by_key["bad"].attempts] == ["review-rejected"] * 2
    assert "sources missing" in (by_key["bad"].attempts[-1].message or "")
    assert project.dirs("data") == ["good", "second-time"]
    assert "APPROVED" in (project.root / "data/second-time/report.md").read_text()
    logs = project.root / ".phalanx" / "runs" / result.run_id / "logs" / "s"
    verdict = json.loads((logs / "bad" / "attempt-1" / "review" / "verdict.json").read_text())
    assert verdict["pass"] is False
    assert project.staging_leftovers() == []


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("tamper", "the reviewer changed the files it was reviewing"),
        ("silent", "the reviewer wrote no verdict.json"),
        ("crash", "the reviewer failed: "),
        ("slow", "the reviewer ran past its timeout of 1s and was stopped"),
    ],
)
def test_a_reviewer_without_a_verdict_fails_the_attempt(
    make_project: ProjectFactory, mode: str, message: str
) -> None:
    """A reviewer that changes what it reviews, writes no verdict, fails or outlives its own
    timeout (the 60 s sleeper is stopped after 1 s; the test's bound is pytest's): the attempt fails
    with cause ``review-failed`` and nothing is committed, even for an output it would pass."""
    project = _reviewed(make_project, ["good"], mode=mode)

    result = project.run()

    (inst,) = result.stages[0].instances
    assert inst.status == "failed"
    assert inst.attempts[-1].cause == "review-failed"
    assert message in (inst.attempts[-1].message or "")
    assert project.dirs("data") == []


def test_a_program_stage_needs_a_reviewer_runner(make_project: ProjectFactory) -> None:
    """``review:`` on a python (or command) stage without a runner of its own is refused when
    planning: the stage's program writes, it cannot judge."""
    project = make_project(
        make_project.one_stage(
            {"type": "python", "function": "agents:report"},
            ["x"],
            review={"criteria": ["is good"]},
        ),
        {"agents.py": AGENTS},
    )
    with pytest.raises(PipelineError, match=r"review: a python stage's program writes"):
        plan_pipeline(load_pipeline(project.pipeline))


def _llm_reviewer(conversation: Conversation) -> Reply:
    """A reviewer model: reads the report through its file tools, then writes a verdict."""
    if not conversation.tool_results:
        task = conversation.first_user_text
        (folder,) = [w.strip("`.,") for w in task.split() if w.startswith("`inputs/")]
        return Reply("Reading.", (ToolCall("read_file", {"path": folder + "/report.md"}),))
    if len(conversation.tool_results) == 1:
        report = conversation.tool_results[0].content
        verdict = {"pass": "APPROVED" in report, "reasons": ["The report is not a draft: it is"]}
        return Reply(
            "Judged.",
            (ToolCall("write_file", {"path": "verdict.json", "content": json.dumps(verdict)}),),
        )
    return Reply("Done.")


def test_an_llm_reviewer_reads_the_outputs_through_its_tools(
    make_project: ProjectFactory,
) -> None:
    """The default reviewer prompt works for an API runner: the model finds the reviewed files
    under ``inputs/STAGE/KEY``, reads them with ``read_file`` and writes ``verdict.json``; its
    tokens count in the attempt's usage, whether the verdict passes or not."""
    with LoopbackLLM(models={"reviewer": _llm_reviewer}).running_in_thread() as server:
        project = make_project(
            make_project.one_stage(
                {"type": "python", "function": "agents:report"},
                [{"id": "good", "shape": "good"}, {"id": "bad", "shape": "bad"}],
                expect=("report.md",),
                review={
                    "criteria": ["The report is not a draft"],
                    "runner": {
                        "type": "openai",
                        "model": "reviewer",
                        "base_url": server.url + "/v1",
                    },
                },
            ),
            {"agents.py": AGENTS},
        )
        result = project.run()

    by_key = {inst.key: inst for inst in result.stages[0].instances}
    assert by_key["good"].status == "committed"
    assert by_key["bad"].status == "failed"
    assert by_key["bad"].attempts[-1].cause == "review-rejected"
    for key in ("good", "bad"):  # a rejecting review's tokens count too
        usage = by_key[key].attempts[-1].usage
        assert usage is not None
        assert usage.input_tokens > 0


def test_todo_values_are_named_by_validate(make_project: ProjectFactory) -> None:
    """Every value still marked ``TODO:`` is listed by ``phalanx validate`` with its line, its
    field and its reason, and the command exits 2; ``run`` refuses the same way."""
    project = make_project(
        textwrap.dedent(
            """\
            name: t
            params:
              PERIOD: "TODO: give PERIOD a value (统计周期, YYYY-MM)"
            stages:
              - name: s
                partitions: {items: [a]}
                output: "data/{PARTITION_KEY}/"
                runner:
                  type: command
                  argv: ["TODO: the program that runs agents/01.x.md"]
            """
        )
    )

    done = project.cli("validate", "pipeline.yaml")

    assert done.returncode == 2
    assert "2 values still marked 'TODO:'" in done.stderr
    assert "pipeline.yaml:3: params.PERIOD: TODO: give PERIOD a value (统计周期, YYYY-MM)" in (
        done.stderr
    )
    assert "pipeline.yaml:10: stages[0] (s).runner.argv[0]: TODO: the program" in done.stderr
    ran = project.cli("run", "pipeline.yaml")
    assert ran.returncode == 2
    assert "still marked 'TODO:'" in ran.stderr
    assert not (project.root / "data").exists()

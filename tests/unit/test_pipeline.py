"""Loading and planning pipeline files: expansion of every stage kind, and every refusal."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from phalanx import (
    CycleError,
    OutputConflictError,
    PipelineError,
    Plan,
    UsageError,
    load_pipeline,
    plan_pipeline,
)

RUNNER = "runner: {type: command, argv: [agent]}"


def project(root: Path, pipeline: str, files: dict[str, str] | None = None) -> Path:
    """Write a project; returns the pipeline file's path."""
    for name, text in (files or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    path = root / "pipeline.yaml"
    path.write_text(textwrap.dedent(pipeline), encoding="utf-8")
    return path


def plan_of(root: Path, pipeline: str, files: dict[str, str] | None = None) -> Plan:
    return plan_pipeline(load_pipeline(project(root, pipeline, files)))


FUNCTIONS = json.dumps(
    [
        {"id": "f1.1", "feature": "F1", "priority": 1},
        {"id": "f2.1", "feature": "F2"},
        {"id": "f1.2", "feature": "F1"},
        {"id": "f2.2", "feature": "F2", "priority": 5},
        {"id": "f3.1", "feature": "F3"},
    ]
)

LAYERED = f"""\
name: layered
params: {{INDUSTRY: semis}}
defaults: {{{RUNNER}}}
stages:
  - name: functions
    partitions: {{from: functions.json, key: id}}
    params: {{FUNCTION_ID: "{{id}}", FEATURE_ID: "{{feature}}"}}
    output: data/{{INDUSTRY}}/functions/{{FUNCTION_ID}}/
  - name: analysis
    needs: [functions]
    output: data/{{INDUSTRY}}/analysis/{{FUNCTION_ID}}/
  - name: features
    needs: [analysis]
    group_by: FEATURE_ID
    output: data/{{INDUSTRY}}/features/{{FEATURE_ID}}/
  - name: overall
    needs: [features]
    single: true
    output: data/{{INDUSTRY}}/overall/
"""


def test_layered_plan_expands_map_follow_group_single(tmp_path: Path) -> None:
    """55 -> 12 -> 4 -> 1 in miniature: a map, a stage following it key by key, a group per
    feature reading exactly its members, and a single reading every group."""
    plan = plan_of(tmp_path, LAYERED, {"functions.json": FUNCTIONS})
    assert [s.name for s in plan.stages] == ["functions", "analysis", "features", "overall"]
    assert [s.kind for s in plan.stages] == ["map", "follow", "group", "single"]
    functions, analysis, features, overall = plan.stages
    assert [i.key for i in functions.instances] == ["f1.1", "f2.1", "f1.2", "f2.2", "f3.1"]
    assert functions.instances[3].priority == 5
    assert functions.instances[0].output_rel == "data/semis/functions/f1.1"
    assert [r.key for r in analysis.instances[1].inputs] == ["f2.1"]
    assert analysis.instances[1].values["FEATURE_ID"] == "F2"
    groups = {i.key: [r.key for r in i.inputs] for i in features.instances}
    assert groups == {"F1": ["f1.1", "f1.2"], "F2": ["f2.1", "f2.2"], "F3": ["f3.1"]}
    assert features.instances[0].values["GROUP_SIZE"] == 2
    assert features.instances[1].priority == 5
    assert [r.key for r in overall.instances[0].inputs] == ["F1", "F2", "F3"]
    assert overall.instances[0].key == "overall"
    assert plan.selected == {"functions", "analysis", "features", "overall"}


def test_plan_json_lists_instances_outputs_and_group_inputs(tmp_path: Path) -> None:
    """``plan --json`` carries counts, outputs and the inputs of each group."""
    data = plan_of(tmp_path, LAYERED, {"functions.json": FUNCTIONS}).to_json()
    stages = {s["name"]: s for s in data["stages"]}  # type: ignore[attr-defined]
    assert stages["features"]["instances"] == 3
    first = stages["features"]["outputs"][0]
    assert first == {
        "key": "F1",
        "output": "data/semis/features/F1",
        "priority": 1.0,
        "inputs": ["analysis/f1.1", "analysis/f1.2"],
    }


def test_stage_and_only_selection(tmp_path: Path) -> None:
    """``stages`` selects what runs; ``only`` keeps the named keys in the selected stages."""
    path = project(tmp_path, LAYERED, {"functions.json": FUNCTIONS})
    plan = plan_pipeline(load_pipeline(path), stages=["analysis"], only=["f2.2"])
    assert plan.selected == {"analysis"}
    assert [i.key for i in plan.stage("analysis").instances] == ["f2.2"]
    assert len(plan.stage("functions").instances) == 5
    with pytest.raises(PipelineError, match="no stage named 'analyss'"):
        plan_pipeline(load_pipeline(path), stages=["analyss"])
    with pytest.raises(PipelineError, match="--only 'nope' matches no instance"):
        plan_pipeline(load_pipeline(path), only=["nope"])


def test_params_render_from_partition_fields_and_pipeline_params(tmp_path: Path) -> None:
    """Stage params are templates over partition fields and pipeline params; partition fields
    and ``PARTITION_KEY`` reach the prompt too, and ``{{``/``}}`` stay literal."""
    plan = plan_of(
        tmp_path,
        f"""\
        name: p
        params: {{PERIOD: "2025-09"}}
        defaults: {{{RUNNER}}}
        stages:
          - name: research
            blueprint: agent.md
            partitions: {{items: [{{id: a1, name: "Acme; Inc"}}]}}
            params: {{ORG: "{{id}}", LABEL: "{{name}} ({{PERIOD}}) {{{{x}}}}"}}
            output: data/{{PERIOD}}/{{ORG}}/
        """,
        {"agent.md": 'Org {ORG}, label {LABEL}, key {PARTITION_KEY}, json {"a": 1}\n'},
    )
    inst = plan.stages[0].instances[0]
    assert inst.values["LABEL"] == "Acme; Inc (2025-09) {x}"
    assert inst.prompt == 'Org a1, label Acme; Inc (2025-09) {x}, key a1, json {"a": 1}\n'
    assert inst.output == tmp_path / "data/2025-09/a1"


def test_reference_mode_uses_the_faithful_instantiation_wording(tmp_path: Path) -> None:
    """``prompt: reference`` tells the agent which blueprint to read, with its parameters."""
    plan = plan_of(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}, prompt: reference}}
        stages:
          - name: research
            blueprint: agents/01.research_agent.md
            partitions: [org_1]
            params: {{ORGANIZATION_ID: "{{value}}"}}
            output: data/{{ORGANIZATION_ID}}/
        """,
        {"agents/01.research_agent.md": "Research {ORGANIZATION_ID}.\n"},
    )
    prompt = plan.stages[0].instances[0].prompt
    assert prompt.startswith(
        "Read `agents/01.research_agent.md` and execute strictly according to that blueprint"
    )
    assert 'ORGANIZATION_ID="org_1"' in prompt


def test_pomasa_blueprint_supplies_output_and_expected_files(tmp_path: Path) -> None:
    """A POMASA blueprint's output location and output-format tree fill in a stage that does
    not set ``output`` or ``expect``."""
    blueprint = """\
        # Research Agent

        ## 输入参数

        - `{ORGANIZATION_ID}`：当前处理的组织ID

        ## 输出位置

        `data/raw/{ORGANIZATION_ID}/`

        **输出格式**：
        ```
        data/raw/{ORGANIZATION_ID}/
        ├── activities.json
        └── sources.md
        ```
        """
    plan = plan_of(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}}}
        stages:
          - name: research
            blueprint: agents/01.research_agent.md
            partitions: [org_1, org_2]
            params: {{ORGANIZATION_ID: "{{value}}"}}
        """,
        {"agents/01.research_agent.md": blueprint},
    )
    stage = plan.stages[0]
    assert [i.output_rel for i in stage.instances] == ["data/raw/org_1", "data/raw/org_2"]
    assert sorted(stage.expect) == ["activities.json", "sources.md"]


def test_runner_settings_merge_defaults_and_stage(tmp_path: Path) -> None:
    """A stage's runner mapping overrides the defaults' field by field when the type agrees,
    and replaces them when it names another type."""
    plan = plan_of(
        tmp_path,
        """\
        name: p
        defaults:
          runner: {type: command, argv: [a], prompt: file}
          retries: 4
          timeout: 2m
        stages:
          - name: one
            partitions: [x]
            runner: {argv: [b]}
            output: one/{value}/
          - name: two
            partitions: [x]
            runner: {type: python, function: "mod:fn"}
            retries: 0
            output: two/{value}/
        """,
    )
    one, two = plan.stages
    assert one.runner.type == "command"
    assert one.runner.argv == ["b"]
    assert one.runner.prompt == "file"
    assert (one.retries, one.timeout) == (4, 120.0)
    assert two.runner.type == "python"
    assert two.retries == 0


def test_min_success_thresholds(tmp_path: Path) -> None:
    """A fraction rounds up to a count of instances; a count above 1 is taken as it is."""
    plan = plan_of(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}}}
        stages:
          - {{name: a, partitions: [1, 2, 3], output: "a/{{value}}/", min_success: 0.5}}
          - {{name: b, partitions: [1, 2, 3], output: "b/{{value}}/", min_success: 2}}
          - {{name: c, partitions: [1, 2, 3], output: "c/{{value}}/"}}
        """,
    )
    assert [s.required for s in plan.stages] == [2, 2, 3]


# --- refusals --------------------------------------------------------------------------------


def refuse(tmp_path: Path, pipeline: str, files: dict[str, str] | None = None) -> str:
    with pytest.raises(UsageError) as info:
        plan_of(tmp_path, pipeline, files)
    return str(info.value)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    """A YAML syntax error names the file, the line and the column."""
    message = refuse(tmp_path, "name: p\nstages:\n  - name: [unclosed\n")
    assert "pipeline.yaml: malformed YAML: line" in message


def test_unknown_field_names_line_and_suggests_the_fix(tmp_path: Path) -> None:
    """A misspelt field is refused with its line, its place and the likely intended name."""
    message = refuse(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}}}
        stages:
          - name: a
            partitions: [1]
            concurency: 3
            output: a/{{value}}/
        """,
    )
    assert "pipeline.yaml:6: stages[0] (a).concurency: unknown field 'concurency'" in message
    assert "did you mean 'concurrency'?" in message


def test_bad_values_are_refused_with_their_place(tmp_path: Path) -> None:
    """Wrong types and ranges name the field and line; a stage of two kinds is refused."""
    message = refuse(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}, timeout: soon}}
        stages:
          - {{name: a, partitions: [1], single: true, output: "a/"}}
        """,
    )
    assert "pipeline.yaml:2: defaults.timeout" in message
    assert "duration such as 30s" in message
    assert "stages[0] (a)" in message
    assert "partitions and single cannot both be set" in message


def test_missing_required_field(tmp_path: Path) -> None:
    """A pipeline without stages names the missing field."""
    assert "the required field 'stages' is missing" in refuse(tmp_path, "name: p\n")


def test_unknown_need_and_cycles(tmp_path: Path) -> None:
    """``needs`` must name stages (with a suggestion), and may not form a cycle."""
    base = f"""\
    name: p
    defaults: {{{RUNNER}}}
    stages:
      - {{name: a, partitions: [1], output: "a/{{value}}/", needs: [%s]}}
      - {{name: b, partitions: [1], output: "b/{{value}}/", needs: [%s]}}
      - {{name: c, partitions: [1], output: "c/{{value}}/", needs: [%s]}}
    """
    message = refuse(tmp_path, base % ("", "a", "bb"))
    assert "pipeline.yaml:6: stages[2] (c).needs[0]: unknown stage 'bb'" in message
    assert "did you mean 'b'?" in message
    with pytest.raises(CycleError, match=r"cycle: a -> c -> b -> a|cycle: .* -> .*"):
        plan_of(tmp_path, base % ("c", "a", "b"))
    with pytest.raises(CycleError, match="needs itself"):
        plan_of(tmp_path, base % ("a", "", ""))


def test_two_instances_one_output_is_refused(tmp_path: Path) -> None:
    """Two partitions rendering to one directory are refused, naming both."""
    message = refuse(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}}}
        stages:
          - name: a
            partitions: [{{id: x, group: g}}, {{id: y, group: g}}]
            output: data/{{group}}/
        """,
    )
    assert "instances a/x and a/y both write data/g/" in message


def test_nested_outputs_across_stages_are_refused(tmp_path: Path) -> None:
    """One stage's output inside another instance's output is refused."""
    message = refuse(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}}}
        stages:
          - {{name: a, partitions: [x], output: "data/{{value}}/"}}
          - {{name: b, partitions: [y], output: "data/x/inner/{{value}}/"}}
        """,
    )
    assert "(data/x/inner/y/) is inside the output of a/x (data/x/)" in message


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("/tmp/out/{value}/", "is absolute"),
        ("../out/{value}/", "escapes the project directory"),
        ("data/../../{value}/", "escapes the project directory"),
        (".phalanx/{value}/", "phalanx's own state"),
        ("data/{missing}/", "refers to {missing}, which partition 'x' does not have"),
        ("data/{value/", "unmatched '{'"),
    ],
)
def test_outputs_must_stay_inside_the_project(tmp_path: Path, output: str, expected: str) -> None:
    """Outputs are relative folders inside the project, outside phalanx's state."""
    message = refuse(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}}}
        stages:
          - {{name: a, partitions: [x], output: "{output}"}}
        """,
    )
    assert expected in message


def test_output_through_a_symlink_out_of_the_project_is_refused(tmp_path: Path) -> None:
    """A symlink inside the project that leads outside it cannot carry outputs out."""
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "proj"
    root.mkdir()
    os.symlink(outside, root / "data")
    with pytest.raises(OutputConflictError, match="leads outside the project directory"):
        plan_of(
            root,
            f"""\
            name: p
            defaults: {{{RUNNER}}}
            stages:
              - {{name: a, partitions: [x], output: "data/{{value}}/"}}
            """,
        )


def test_notes_inside_an_output_and_reading_own_outputs_are_refused(tmp_path: Path) -> None:
    """The notes file cannot live in the data bus; a stage cannot read what it writes."""
    message = refuse(
        tmp_path,
        f"""\
        name: p
        notes: data/x/notes.md
        defaults: {{{RUNNER}}}
        stages:
          - {{name: a, partitions: [x], output: "data/{{value}}/"}}
        """,
    )
    assert "'data/x/notes.md' is inside the output of a/x" in message
    message = refuse(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}}}
        stages:
          - {{name: a, partitions: {{from: data/x/list.json}}, output: "data/{{id}}/"}}
        """,
        {"data/x/list.json": '[{"id": "x"}]'},
    )
    assert "stage 'a' reads 'data/x/list.json', which is inside its own outputs" in message


def test_missing_runner_blueprint_and_group_field(tmp_path: Path) -> None:
    """A stage without a runner, a missing blueprint file and an unknown group field are
    each refused with the fix."""
    assert "no runner: set `runner:`" in refuse(
        tmp_path, "name: p\nstages:\n  - {name: a, partitions: [x], output: 'a/{value}/'}\n"
    )
    message = refuse(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}}}
        stages:
          - {{name: a, blueprint: agents/none.md, partitions: [x], output: "a/{{value}}/"}}
        """,
    )
    assert "agents/none.md" in message
    assert "not found" in message
    message = refuse(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}}}
        stages:
          - {{name: a, partitions: [x], output: "a/{{value}}/"}}
          - {{name: b, needs: [a], group_by: TEAM, output: "b/{{TEAM}}/"}}
        """,
    )
    assert "instance 'x' of stage 'a' has no field 'TEAM' to group by" in message


def test_missing_blueprint_parameter_names_blueprint_parameter_and_partition(
    tmp_path: Path,
) -> None:
    """Strict rendering: a placeholder without a value names all three."""
    message = refuse(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}}}
        stages:
          - {{name: a, blueprint: agent.md, partitions: [x], output: "a/{{value}}/"}}
        """,
        {"agent.md": "Research {ORGANIZATION_ID}.\n"},
    )
    assert "agent.md" in message
    assert "ORGANIZATION_ID" in message
    assert "'x'" in message


def test_unsafe_group_value_is_refused(tmp_path: Path) -> None:
    """A group value becomes a folder name, so it must be a safe key too."""
    message = refuse(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}}}
        stages:
          - {{name: a, partitions: [{{id: x, team: "../up"}}], output: "a/{{id}}/"}}
          - {{name: b, needs: [a], group_by: team, output: "b/{{team}}/"}}
        """,
    )
    assert "group value '../up'" in message


def test_runner_type_typos_and_bad_settings(tmp_path: Path) -> None:
    """An unknown runner type suggests the near one; bad settings name the field."""
    stage = "  - {name: a, partitions: [x], output: 'a/{value}/'}\n"
    message = refuse(tmp_path, "name: p\ndefaults: {runner: {type: pyhton}}\nstages:\n" + stage)
    assert "pipeline.yaml:2: defaults.runner: unknown runner type 'pyhton'" in message
    assert "did you mean 'python'?" in message
    message = refuse(
        tmp_path, "name: p\ndefaults: {runner: {type: command, argv: []}}\nstages:\n" + stage
    )
    assert "invalid command runner settings: argv:" in message


def test_unknown_fields_in_every_section_get_their_suggestion(tmp_path: Path) -> None:
    """A typo is matched against the fields of the section it is in, every problem listed."""
    message = refuse(
        tmp_path,
        f"""\
        name: p
        defaults: {{{RUNNER}, backoff: {{bse: 1s}}}}
        stages:
          - name: a
            partitions: {{items: [x], keyy: value}}
            output: a/{{value}}/
            expect: {{a.json: {{shema: s.json}}}}
        """,
    )
    assert "3 problems" in message
    assert "defaults.backoff.bse: unknown field 'bse'; did you mean 'base'?" in message
    assert "partitions.keyy: unknown field 'keyy'; did you mean 'key'?" in message
    assert "expect.a.json.shema: unknown field 'shema'; did you mean 'schema'?" in message


def test_runner_settings_override_every_runner(tmp_path: Path) -> None:
    """``runner_settings`` (the CLI's --set) reach the defaults' runner and every stage's own,
    so one flag can point a whole pipeline at another server or provider."""
    path = project(
        tmp_path,
        """\
        name: p
        defaults: {runner: {type: anthropic, model: m1}}
        stages:
          - {name: a, partitions: [x], output: "a/{value}/"}
          - {name: b, partitions: [x], output: "b/{value}/", runner: {model: m2}}
        """,
    )
    settings = {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}
    plan = plan_pipeline(load_pipeline(path, runner_settings=settings))
    a, b = plan.stages
    assert (a.runner.type, a.runner.model, a.runner.base_url) == (  # type: ignore[union-attr]
        "openai",
        "m1",
        "http://127.0.0.1:9/v1",
    )
    assert (b.runner.type, b.runner.model) == ("openai", "m2")  # type: ignore[union-attr]


def test_a_group_carries_the_fields_its_members_share(tmp_path: Path) -> None:
    """A feature passes on the DIMENSION all its functions agree on, so the next layer can
    group features by it (55 -> 12 -> 4 -> 1); a field the members disagree on is not
    carried, and a template naming it is refused at planning."""
    functions = json.dumps(
        [
            {"id": "a1", "feature": "A", "dimension": "D1"},
            {"id": "a2", "feature": "A", "dimension": "D1"},
            {"id": "b1", "feature": "B", "dimension": "D1"},
            {"id": "c1", "feature": "C", "dimension": "D2"},
        ]
    )
    pipeline = f"""\
        name: layers
        defaults: {{{RUNNER}}}
        stages:
          - name: functions
            partitions: {{from: functions.json, key: id}}
            params: {{FEATURE: "{{feature}}", DIMENSION: "{{dimension}}"}}
            output: data/functions/{{PARTITION_KEY}}/
          - name: features
            needs: [functions]
            group_by: FEATURE
            params: {{DIMENSION: "{{DIMENSION}}"}}
            output: data/features/{{FEATURE}}/
          - name: dimensions
            needs: [features]
            group_by: DIMENSION
            output: data/dimensions/{{DIMENSION}}/
        """
    plan = plan_of(tmp_path, pipeline, {"functions.json": functions})
    features = plan.stage("features")
    assert {i.key: i.values["DIMENSION"] for i in features.instances} == {
        "A": "D1",
        "B": "D1",
        "C": "D2",
    }
    dimensions = plan.stage("dimensions")
    assert {i.key: [r.key for r in i.inputs] for i in dimensions.instances} == {
        "D1": ["A", "B"],
        "D2": ["C"],
    }

    mixed = functions.replace('"c1", "feature": "C"', '"c1", "feature": "A"')
    with pytest.raises(PipelineError, match="DIMENSION"):  # A's members disagree now
        plan_of(tmp_path / "mixed", pipeline, {"functions.json": mixed})

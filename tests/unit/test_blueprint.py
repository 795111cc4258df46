"""Tests for phalanx._blueprint: the four shapes, POMASA sections, rendering and errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

import phalanx._blueprint as blueprint_module
from phalanx._blueprint import (
    Blueprint,
    ExpectedOutput,
    ParamSpec,
    load_blueprint,
    parse_blueprint,
)
from phalanx._errors import BlueprintError, UsageError

FIXTURES = Path(__file__).parent / "fixtures" / "blueprints"
SHOWN = "agents/x.md"


def load(relative: str) -> Blueprint:
    return load_blueprint(FIXTURES / relative, display_path=relative)


def parse(text: str, path: str = SHOWN) -> Blueprint:
    return parse_blueprint(text, path=Path(path))


def error_of(text: str, path: str = SHOWN) -> str:
    with pytest.raises(BlueprintError) as caught:
        parse(text, path)
    return str(caught.value)


# --- the public surface -------------------------------------------------------------------------


def test_all_is_sorted_and_exactly_the_public_names() -> None:
    """``__all__`` lists the module's public names, sorted."""
    assert blueprint_module.__all__ == sorted(blueprint_module.__all__)
    assert set(blueprint_module.__all__) == {
        "Blueprint",
        "BlueprintShape",
        "ExpectedOutput",
        "ParamSpec",
        "load_blueprint",
        "parse_blueprint",
    }


def test_param_is_required_exactly_when_it_has_no_default() -> None:
    """A parameter without a default is required; an empty-string default is still a default."""
    assert ParamSpec("PERIOD").required
    assert not ParamSpec("PERIOD", default="").required


def test_blueprint_is_immutable_and_hashable() -> None:
    """A loaded blueprint cannot be changed in place (fields, params, metadata) and hashes."""
    blueprint = load("front_matter/research_agent.md")
    with pytest.raises(AttributeError):
        blueprint.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        blueprint.params["EXTRA"] = ParamSpec("EXTRA")  # type: ignore[index]
    with pytest.raises(TypeError):
        blueprint.metadata["owner"] = "someone"  # type: ignore[index]
    assert hash(blueprint) == hash(load("front_matter/research_agent.md"))


# --- front matter -------------------------------------------------------------------------------


def test_front_matter_fields_load() -> None:
    """Every front matter field lands in its attribute, in declaration order."""
    blueprint = load("front_matter/research_agent.md")
    assert blueprint.shape == "front-matter"
    assert blueprint.name == "research-agent"
    assert blueprint.description == "Collects one organization's public activities for a period."
    assert blueprint.model == "claude-sonnet-4-5"
    assert blueprint.runner == "anthropic"
    assert blueprint.tools == ("web_search", "web_fetch", "write_file")
    assert list(blueprint.params.values()) == [
        ParamSpec("ORGANIZATION_ID", "The organization's stable identifier"),
        ParamSpec("ORGANIZATION_NAME", "The organization's display name"),
        ParamSpec("PERIOD", "Reporting month", "2025-09"),
        ParamSpec("MAX_SOURCES", "", "20"),
    ]
    assert blueprint.outputs == (
        ExpectedOutput(
            "activities.json", "One record per activity", "schemas/activities.schema.json"
        ),
        ExpectedOutput("sources.md", "Every source consulted, with its URL"),
    )
    assert blueprint.body.startswith("# Research Agent\n")
    assert blueprint.display_path == "front_matter/research_agent.md"


def test_front_matter_is_kept_whole_in_metadata() -> None:
    """Unknown keys are not errors: the raw front matter, extra keys included, is metadata."""
    metadata = load("front_matter/research_agent.md").metadata
    assert metadata["owner"] == "research-team"
    assert metadata["tags"] == ["industry", "weekly"]
    assert metadata["name"] == "research-agent"


def test_front_matter_short_forms() -> None:
    """params and outputs may be lists of names; tools may be one comma-separated string."""
    blueprint = load("front_matter/short_forms.md")
    assert blueprint.shape == "front-matter"  # it declares params, so it is not a Claude Code file
    assert blueprint.tools == ("Read", "Write")
    assert blueprint.params == {"DOC_ID": ParamSpec("DOC_ID"), "LANGUAGE": ParamSpec("LANGUAGE")}
    assert [output.name for output in blueprint.outputs] == ["summary.md", "figures/overview.png"]


def test_param_and_output_specs_accept_a_bare_description_or_nothing() -> None:
    """``NAME: "text"`` and ``file: "text"`` are descriptions; an empty spec is allowed too."""
    blueprint = parse(
        "---\nparams:\n  PERIOD: the month\n  REGION:\n"
        "outputs:\n  report.md: the report\n  data.csv:\n---\n{PERIOD} {REGION}\n"
    )
    assert blueprint.params == {
        "PERIOD": ParamSpec("PERIOD", "the month"),
        "REGION": ParamSpec("REGION"),
    }
    assert blueprint.outputs == (
        ExpectedOutput("report.md", "the report"),
        ExpectedOutput("data.csv"),
    )


def test_defaults_are_stored_as_text() -> None:
    """Defaults read by YAML as numbers or booleans are kept as the text a prompt would show."""
    blueprint = parse("---\nparams:\n  N: {default: 3}\n  DRY: {default: false}\n---\n{N} {DRY}\n")
    assert blueprint.params["N"].default == "3"
    assert blueprint.params["DRY"].default == "false"


def test_front_matter_without_params_takes_the_body_placeholders() -> None:
    """With no declaration, params are the body's placeholders in order, all required."""
    blueprint = parse("---\nname: x\n---\nHello {B} and {A}, {B} again; {lower} is no param.\n")
    assert blueprint.shape == "front-matter"
    assert list(blueprint.params) == ["B", "A"]
    assert all(spec.required for spec in blueprint.params.values())


def test_empty_front_matter_is_allowed() -> None:
    """``---`` directly followed by ``---`` is an empty front matter, not an error."""
    blueprint = parse("---\n---\n# Title\n\nDo it.\n")
    assert blueprint.shape == "front-matter"
    assert blueprint.metadata == {}
    assert blueprint.name == "Title"


def test_name_and_description_fall_back_to_the_body() -> None:
    """Without name/description fields, the first # heading and its paragraph stand in."""
    blueprint = parse("---\nmodel: m\n---\n# Extractor\n\nPulls tables\nout of PDFs.\n\nMore.\n")
    assert blueprint.name == "Extractor"
    assert blueprint.description == "Pulls tables out of PDFs."


def test_crlf_and_byte_order_mark_are_tolerated(tmp_path: Path) -> None:
    """A file saved on Windows (BOM, CRLF line ends) loads like its Unix twin."""
    file = tmp_path / "agent.md"
    file.write_bytes("\ufeff---\r\nname: win\r\n---\r\nDo {TASK}.\r\n".encode())
    blueprint = load_blueprint(file)
    assert blueprint.name == "win"
    assert blueprint.body == "Do {TASK}.\n"


def test_display_path_defaults_to_the_path_as_given(tmp_path: Path) -> None:
    """Without display_path, messages name the blueprint by its path in POSIX form."""
    file = tmp_path / "agent.md"
    file.write_text("Do {TASK}.\n", encoding="utf-8")
    assert load_blueprint(file).display_path == file.as_posix()


# --- Claude Code agent files --------------------------------------------------------------------


def test_claude_code_agent_file_loads_unchanged() -> None:
    """An agent file under .claude/agents loads as shape claude-code with its tools and model."""
    blueprint = load("project/.claude/agents/code-reviewer.md")
    assert blueprint.shape == "claude-code"
    assert blueprint.name == "code-reviewer"
    assert blueprint.description.startswith("Expert code review specialist.")
    assert blueprint.tools == ("Read", "Grep", "Glob", "Bash")
    assert blueprint.model == "inherit"
    assert blueprint.runner is None
    assert blueprint.metadata["color"] == "purple"
    assert blueprint.params == {}
    assert blueprint.body.startswith("You are a senior code reviewer")


def test_claude_code_description_with_unquoted_colons_loads() -> None:
    """A one-line description holding ': ' (as Claude Code's own plugins write) is plain text."""
    blueprint = load("project/.claude/agents/pr-test-analyzer.md")
    assert blueprint.shape == "claude-code"
    assert blueprint.description.startswith("Use this agent to review test coverage")
    assert 'user: "Are my tests thorough?"' in blueprint.description
    assert blueprint.model == "sonnet"


def test_tools_as_a_string_marks_a_claude_code_file_anywhere() -> None:
    """Outside .claude/agents, a comma-separated tools string still means claude-code."""
    assert parse("---\nname: a\ntools: Read, Grep\n---\nReview.\n").shape == "claude-code"


def test_claude_code_rule_needs_no_phalanx_fields() -> None:
    """A file in .claude/agents that declares runner/params/outputs is a front-matter blueprint;
    one with a tools list elsewhere is one too."""
    in_agents = "project/.claude/agents/a.md"
    assert parse("---\nname: a\n---\nReview.\n", in_agents).shape == "claude-code"
    assert parse("---\nrunner: command\n---\nReview.\n", in_agents).shape == "front-matter"
    assert parse("---\ntools: [Read]\n---\nReview.\n").shape == "front-matter"


# --- POMASA blueprints --------------------------------------------------------------------------


def test_chinese_pomasa_blueprint() -> None:
    """A Chinese POMASA blueprint yields its name, summary, params, location, files, checklist."""
    blueprint = load("pomasa/01.research_agent.md")
    assert blueprint.shape == "pomasa"
    assert blueprint.name == "组织研究Agent"
    assert blueprint.description == "负责采集单个组织在指定周期内的公开活动，并整理为结构化数据。"
    assert blueprint.params == {
        "ORGANIZATION_ID": ParamSpec("ORGANIZATION_ID", "当前处理的组织ID"),
        "ORGANIZATION_NAME": ParamSpec("ORGANIZATION_NAME", "当前处理的组织名称"),
    }
    assert blueprint.output_location == "data/{PERIOD}/raw/{ORGANIZATION_ID}/"
    assert blueprint.outputs == (
        ExpectedOutput("activities.json", "活动记录（JSON数组）"),
        ExpectedOutput("sources.md", "信息来源列表"),
    )
    assert blueprint.completion_criteria == (
        "`activities.json` 是合法的JSON数组",
        "每条活动都注明来源",
        "`sources.md` 列出全部来源链接",
    )
    assert blueprint.placeholders() == ["ORGANIZATION_ID", "ORGANIZATION_NAME", "PERIOD"]
    assert (blueprint.model, blueprint.runner, blueprint.tools) == (None, None, ())
    assert blueprint.metadata == {}


def test_english_pomasa_blueprint() -> None:
    """An English POMASA blueprint with ### headings, a path on the line after its label, a nested
    tree and a numbered checklist."""
    blueprint = load("pomasa/02.analysis_agent.md")
    assert blueprint.shape == "pomasa"
    assert blueprint.name == "Function Item Analyst"
    assert list(blueprint.params.values()) == [
        ParamSpec("INDUSTRY_ID", "the industry under assessment"),
        ParamSpec("FUNCTION_ID", "the function item, e.g. 1.1"),
        ParamSpec("FUNCTION_NAME", "the function item's name"),
    ]
    assert blueprint.output_location == "data/{INDUSTRY_ID}/02.analysis/{FUNCTION_ID}/"
    assert blueprint.outputs == (
        ExpectedOutput("analysis.md", "the written analysis"),
        ExpectedOutput("scores.json", "one score per criterion"),
        ExpectedOutput("figures/radar.png", "radar chart of the scores"),
        ExpectedOutput("figures/evidence/table.csv"),
    )
    assert blueprint.completion_criteria == (
        "`analysis.md` covers every criterion",
        "`scores.json` validates against the scoring schema",
        "Every figure is referenced from `analysis.md`",
    )


@pytest.mark.parametrize(
    "line",
    [
        "- `{ORGANIZATION_ID}`：当前处理的组织ID",
        "- `{ORGANIZATION_ID}`: 当前处理的组织ID",
        "- {ORGANIZATION_ID}：当前处理的组织ID",
        "* `ORGANIZATION_ID` : 当前处理的组织ID",
        "1. **`{ORGANIZATION_ID}`** — 当前处理的组织ID",
    ],
)
def test_pomasa_parameter_line_forms(line: str) -> None:
    """Parameter lines work with either colon, with or without backticks, braces or bullets."""
    blueprint = parse(f"# A\n\n##  输入参数 ：\n\n{line}\n\nWork on {{ORGANIZATION_ID}}.\n")
    assert blueprint.params == {
        "ORGANIZATION_ID": ParamSpec("ORGANIZATION_ID", "当前处理的组织ID"),
    }


@pytest.mark.parametrize(
    "section",
    [
        "**输出位置**：`data/{P}/raw/{K}/`",
        "**输出位置：** `data/{P}/raw/{K}/`",
        "- **Output Location**: data/{P}/raw/{K}/",
        "**Output Location**:\n\n`data/{P}/raw/{K}/`",
        "## 输出位置\n\n`data/{P}/raw/{K}/`\n\n[注：每个实例写入不同目录]",
        "### Output Location:\n\n```\ndata/{P}/raw/{K}/\n```",
    ],
)
def test_output_location_forms(section: str) -> None:
    """The output location is read from a bold label (same or next line) or from a heading."""
    blueprint = parse(f"# A\n\nCollect {{K}}.\n\n{section}\n")
    assert blueprint.output_location == "data/{P}/raw/{K}/"
    assert blueprint.shape == "pomasa"


def test_output_location_ignores_prose() -> None:
    """A label followed by a sentence instead of a path gives no output location."""
    assert parse("# A\n\n**输出位置**：\n\n写入对应的目录即可\n").output_location is None


def test_output_tree_details() -> None:
    """In the tree, comments become descriptions, directories and ellipses are no files, and the
    root line becomes the output location when none is given."""
    blueprint = parse(
        "# A\n\n## Output Format\n\nThe layout:\n\n"
        "```json\n"
        '{"not": "a tree"}\n'
        "```\n\n"
        "```\n"
        "out/{K}/\n"
        "├── report.md        # the report\n"
        "├── charts/\n"
        "│   ├── a.png\n"
        "│   └── ...\n"
        "├── raw\n"
        "│   └── rows.csv     // one row per item\n"
        "└── log.txt\n"
        "```\n"
    )
    assert blueprint.outputs == (
        ExpectedOutput("report.md", "the report"),
        ExpectedOutput("charts/a.png"),
        ExpectedOutput("raw/rows.csv", "one row per item"),
        ExpectedOutput("log.txt"),
    )
    assert blueprint.output_location == "out/{K}/"


def test_headings_inside_code_blocks_are_not_sections() -> None:
    """A '## 完成标准' line inside a fenced block is example text, not a section."""
    blueprint = parse("# A\n\n```markdown\n## 完成标准\n- [ ] copied\n```\n")
    assert blueprint.completion_criteria == ()
    assert blueprint.shape == "plain"


def test_front_matter_declarations_win_over_body_sections() -> None:
    """Declared params/outputs replace the POMASA sections; undeclared ones come from the body."""
    blueprint = parse(
        "---\nparams: [ORG_ID]\n---\n# A\n\n## Input Parameters\n\n- `{OTHER}`: other\n\n"
        "**Output Format**\n\n```\nout/\n└── a.md\n```\n"
    )
    assert list(blueprint.params) == ["ORG_ID"]
    assert blueprint.outputs == (ExpectedOutput("a.md"),)


# --- plain blueprints ---------------------------------------------------------------------------


def test_plain_blueprint() -> None:
    """A file with no front matter and no POMASA section is plain; its name is the file stem."""
    blueprint = load("plain/summarize.md")
    assert blueprint.shape == "plain"
    assert blueprint.name == "summarize"
    assert blueprint.description == ""
    assert list(blueprint.params) == ["TICKET_ID", "MAX_WORDS"]
    assert blueprint.outputs == ()
    assert blueprint.output_location is None


# --- rendering ----------------------------------------------------------------------------------


def test_render_fills_placeholders_and_keeps_other_braces() -> None:
    """JSON examples and {lower} survive; {{ and }} become literal braces; defaults fill gaps."""
    text = load("front_matter/research_agent.md").render(
        {"ORGANIZATION_ID": "acme", "ORGANIZATION_NAME": "Acme Corp"}, partition="acme"
    )
    assert "You research Acme Corp (id `acme`) for the period 2025-09." in text
    assert "Consult at most 20 sources." in text
    assert '{"id": "x", "items": [{"a": 1}]}' in text
    assert "as {name} only in quotes; write {PERIOD} literally" in text


def test_render_values_override_defaults_and_extras_are_ignored() -> None:
    """A partition's value beats the declared default; values the body does not use are unused."""
    text = load("front_matter/research_agent.md").render(
        {
            "ORGANIZATION_ID": 7,
            "ORGANIZATION_NAME": "Acme",
            "PERIOD": "2025-10",
            "UNUSED": "x",
        },
        partition="acme",
    )
    assert "(id `7`) for the period 2025-10." in text
    assert "UNUSED" not in text


def test_render_missing_parameter_names_blueprint_parameter_partition_and_fix() -> None:
    """A placeholder without a value or default is an error that says where and how to fix it."""
    blueprint = load("pomasa/01.research_agent.md")
    with pytest.raises(BlueprintError) as caught:
        blueprint.render({"ORGANIZATION_ID": "org_1", "ORGANIZATION_NAME": "A"}, partition="org_1")
    assert str(caught.value) == (
        "pomasa/01.research_agent.md: no value for parameter PERIOD in partition 'org_1'; "
        "add it to the stage's params: or give it a default in the blueprint"
    )
    assert isinstance(caught.value, UsageError)


def test_render_lists_every_missing_parameter() -> None:
    """All missing parameters are named at once, in placeholder order."""
    with pytest.raises(
        BlueprintError,
        match=r"parameters ORGANIZATION_ID, ORGANIZATION_NAME in partition 'p'; add them ",
    ):
        load("pomasa/01.research_agent.md").render({"PERIOD": "2025-09"}, partition="p")


def test_render_requires_declared_parameters_the_body_does_not_use() -> None:
    """A declared required parameter needs a value even if only the output path uses it."""
    blueprint = parse("---\nparams: [PERIOD, ORG_ID]\n---\nWork on {ORG_ID}.\n")
    with pytest.raises(BlueprintError, match="parameter PERIOD in partition 'a'"):
        blueprint.render({"ORG_ID": "a"}, partition="a")


def test_render_is_strict_about_upper_snake_only() -> None:
    """Only {UPPER_SNAKE} is a placeholder: {Mixed}, {lower} and {1} need no value."""
    blueprint = parse("Use {Mixed}, {lower}, {1}, {{X}} and {X}.\n")
    assert blueprint.placeholders() == ["X"]
    assert blueprint.render({"X": "v"}, partition="p") == "Use {Mixed}, {lower}, {1}, {X} and v.\n"


# --- reference mode -----------------------------------------------------------------------------


def test_reference_prompt_wording() -> None:
    """Reference mode names the blueprint, lists every parameter in placeholder order (declared-only
    ones after), JSON-quoted, and says where to write."""
    prompt = load("front_matter/research_agent.md").reference_prompt(
        {"ORGANIZATION_ID": "acme", "ORGANIZATION_NAME": "Acme 公司"}, partition="acme"
    )
    first, second = prompt.split("\n")
    assert first == (
        "Read `front_matter/research_agent.md` and execute strictly according to that blueprint; "
        'parameters: ORGANIZATION_NAME="Acme 公司", ORGANIZATION_ID="acme", PERIOD="2025-09", '
        'MAX_SOURCES="20".'
    )
    assert second.startswith("Write every output file into the current working directory")
    assert second.endswith("phalanx moves them into place after validation.")


def test_reference_prompt_quotes_awkward_values_unambiguously() -> None:
    """Values with newlines, quotes or backticks are JSON strings that decode to the value."""
    value = 'two\nlines with "quotes", `ticks` and a comma, X=1'
    prompt = parse("Do {X}.\n").reference_prompt({"X": value}, partition="p")
    first = prompt.split("\n")[0]
    quoted = first.removeprefix(f"Read `{SHOWN}` and execute strictly according to that blueprint;")
    quoted = quoted.removeprefix(" parameters: X=").removesuffix(".")
    assert json.loads(quoted) == value


def test_reference_prompt_without_parameters() -> None:
    """A blueprint with no parameters says so."""
    prompt = load("project/.claude/agents/code-reviewer.md").reference_prompt({}, partition="p")
    assert "; parameters: none.\n" in prompt


def test_reference_prompt_missing_parameter_is_the_render_error() -> None:
    """Reference mode refuses a missing parameter with the same message as inline mode."""
    blueprint = load("pomasa/02.analysis_agent.md")
    values = {"INDUSTRY_ID": "semis"}
    with pytest.raises(BlueprintError) as inline:
        blueprint.render(values, partition="1.1")
    with pytest.raises(BlueprintError) as reference:
        blueprint.reference_prompt(values, partition="1.1")
    assert str(reference.value) == str(inline.value)
    assert "FUNCTION_ID, FUNCTION_NAME in partition '1.1'" in str(inline.value)


# --- errors -------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    """A missing file names the path as the stage wrote it and the field to check."""
    with pytest.raises(BlueprintError) as caught:
        load_blueprint(tmp_path / "nope.md", display_path="agents/x.md")
    assert (
        str(caught.value) == "agents/x.md: blueprint not found; check the stage's blueprint: path"
    )


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A directory is refused with a message, not an OSError."""
    with pytest.raises(BlueprintError, match=r"^agents: is a directory"):
        load_blueprint(tmp_path, display_path="agents")


def test_not_utf8(tmp_path: Path) -> None:
    """A file in another encoding is refused, naming the line of the first bad byte."""
    file = tmp_path / "gbk.md"
    file.write_bytes("# 研究\n\n参数 {X}\n".encode("gbk"))
    with pytest.raises(BlueprintError, match=r"^agents/gbk.md: line 1: not UTF-8 .*save the"):
        load_blueprint(file, display_path="agents/gbk.md")


def test_malformed_yaml_names_the_file_line() -> None:
    """The YAML error's line is counted in the file (the opening --- is line 1)."""
    message = error_of("---\nname: x\ndescription: ok\n  bad: indentation\n---\nbody\n")
    assert message.startswith(f"{SHOWN}: line 4: malformed YAML front matter (")
    assert "fix the YAML between the --- lines" in message


def test_malformed_flow_list_is_not_rescued() -> None:
    """The lenient reading of one-line fields never turns broken YAML syntax into text."""
    message = error_of("---\nname: x\ntools: [Read, Grep\nmodel: y\n---\nbody\n")
    assert message.startswith(f"{SHOWN}: line 4: malformed YAML front matter")


@pytest.mark.parametrize(("yaml_text", "kind"), [("- a\n- b", "a list"), ("just text", "a string")])
def test_front_matter_must_be_a_mapping(yaml_text: str, kind: str) -> None:
    """Front matter that parses to something other than a mapping is refused."""
    message = error_of(f"---\n{yaml_text}\n---\nbody\n")
    assert message.startswith(f"{SHOWN}: front matter must be a mapping of fields")
    assert f"got {kind}" in message


def test_front_matter_keys_must_be_text() -> None:
    """A numeric field name is refused."""
    assert error_of("---\n1: x\n---\nbody\n").startswith(f"{SHOWN}: front matter field name 1 ")


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "tools: 3",
            "field 'tools' must be a list of tool names or one comma-separated string, "
            "got a number (3)",
        ),
        ("tools: [Read, 3]", "field 'tools' must be a list of tool names"),
        ("name: [a]", "field 'name' must be a string, got a list"),
        ("model: 4", "field 'model' must be a string, got a number (4)"),
        ("runner: true", "field 'runner' must be a string, got a boolean (true)"),
        ("params: 3", "field 'params' must be a mapping or a list of names"),
        ("params: {P: [1]}", "field 'params.P' must be a description or a mapping"),
        ("params: {P: {default: [1]}}", "field 'params.P.default' must be a string, number"),
        ("params: {P: {description: 2}}", "field 'params.P.description' must be a string"),
        ("params: {P: {defualt: x}}", "field 'params.P' has unknown key(s) defualt; it takes"),
        ("outputs: yes", "field 'outputs' must be a mapping or a list of names, got a boolean"),
        ("outputs: {a.json: {schema: 3}}", "field 'outputs.a.json.schema' must be a string"),
        ("outputs: {a.json: {format: x}}", "field 'outputs.a.json' has unknown key(s) format"),
    ],
)
def test_wrong_field_types(yaml_text: str, expected: str) -> None:
    """A field of the wrong type is named, with what it must be and what it was."""
    message = error_of(f"---\n{yaml_text}\n---\nbody {{P}}\n")
    assert message.startswith(f"{SHOWN}: front matter {expected}")


@pytest.mark.parametrize("name", ["/etc/passwd", "../escape.md", "a/../../b", ""])
def test_outputs_must_stay_inside_the_output_directory(name: str) -> None:
    """An expected output that is absolute or climbs out with '..' is refused."""
    message = error_of(f"---\noutputs: [{json.dumps(name)}]\n---\nbody\n")
    assert message.startswith(f"{SHOWN}: expected output {name!r}")
    assert "relative, no '..'" in message


def test_unterminated_front_matter() -> None:
    """A front matter block that never closes is refused, saying how to close it."""
    message = error_of("---\nname: x\n\nDo things.\n")
    assert message == (
        f"{SHOWN}: line 1: front matter is never closed; end it with a line holding only ---"
    )


@pytest.mark.parametrize(
    "text", ["---\nname: x\n---\n", "---\nname: x\n---\n \n\t\n", "", "\n  \n"]
)
def test_blueprint_without_body(text: str) -> None:
    """A blueprint with nothing but whitespace after its front matter (or at all) is refused."""
    assert error_of(text).startswith(f"{SHOWN}: blueprint has no body; write the agent's prompt")


@pytest.mark.parametrize(
    "yaml_text", ["params: {period: x}", "params: [ORG-ID]", "params: [1X]", "params: [[A]]"]
)
def test_invalid_parameter_name(yaml_text: str) -> None:
    """Declared parameter names must be UPPER_SNAKE; the message says how to rename."""
    message = error_of(f"---\n{yaml_text}\n---\nbody\n")
    assert message.startswith(f"{SHOWN}: parameter name ")
    assert "is not UPPER_SNAKE; rename it (e.g. ORGANIZATION_ID)" in message


def test_blueprint_error_pickles() -> None:
    """The error crosses process boundaries intact."""
    with pytest.raises(BlueprintError) as caught:
        parse("---\ntools: 3\n---\nbody\n")
    clone = pickle.loads(pickle.dumps(caught.value))  # noqa: S301 -- our own object, round trip
    assert str(clone) == str(caught.value)

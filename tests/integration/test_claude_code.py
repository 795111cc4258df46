"""The claude-code runner against the real Claude Code CLI (the npm package), pointed at
phalanx's loopback LLM server with ANTHROPIC_BASE_URL: commits, private config folders, usage
and cost from its result JSON, confinement by its permission rules, a rejected key, a turn
limit and a timeout that kills the CLI.

The CLI comes from PHALANX_CLAUDE_BIN (set by .ci/run, which installs it), else ``claude`` on
the PATH, else the copy .ci/run leaves in ``.ci/node``. Without one the tests are skipped, except
in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from phalanx import RunResult, UsageError, run_pipeline
from phalanx._config import ClaudeCodeRunnerConfig
from phalanx._databus import MANIFEST
from phalanx.runners import InputRef, InstanceContext
from phalanx.runners._claude_code import ClaudeCodeRunner
from phalanx.testing import (
    BlueprintModel,
    Conversation,
    Fault,
    LoopbackLLM,
    Reply,
    ToolCall,
    ToolResult,
)
from phalanx.testing._models import _working_directory

SECRET = "sk-ant-test-do-not-leak-0123456789"  # noqa: S105 - a fake key the tests hunt for
REPO = Path(__file__).resolve().parents[2]

RESEARCH = """\
---
name: research
description: Research one organisation.
model: loopback-model
params:
  ORGANIZATION_ID: The organisation's id.
outputs:
  activities.json: The organisation's activities as JSON.
  sources.md: Where each fact came from.
---
Research the organisation {ORGANIZATION_ID} and write what you find.
"""

REPORT = """\
---
name: report
description: One report over every organisation.
outputs:
  report.md: The report.
---
Read every research folder and the organisations list, then write one report.
"""


def _claude_binary() -> str | None:
    given = os.environ.get("PHALANX_CLAUDE_BIN")
    if given:
        return given if Path(given).is_file() else None
    local = REPO / ".ci/node/node_modules/.bin/claude"
    return shutil.which("claude") or (str(local) if local.is_file() else None)


@pytest.fixture(scope="module")
def claude() -> str:
    """The Claude Code CLI to test with; a missing one fails in CI and skips elsewhere."""
    found = _claude_binary()
    if found is None:
        given = os.environ.get("PHALANX_CLAUDE_BIN")
        reason = (
            f"PHALANX_CLAUDE_BIN={given} is not a file"
            if given
            else "the Claude Code CLI is not installed"
        ) + (
            ": npm install --prefix .ci/node @anthropic-ai/claude-code and set "
            "PHALANX_CLAUDE_BIN to .ci/node/node_modules/.bin/claude"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The key in LOOPBACK_KEY, and a HOME of the test's own, which no process may touch."""
    monkeypatch.setenv("LOOPBACK_KEY", SECRET)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CLAUDE_CONFIG_DIR", raising=False)


def write_project(
    root: Path, claude: str, url: str, stages: str, *, defaults: str = "", runner: str = ""
) -> Path:
    """A project whose stages run Claude Code against the loopback server at ``url``."""
    (root / "agents").mkdir(parents=True)
    (root / "agents/research.md").write_text(RESEARCH)
    (root / "agents/report.md").write_text(REPORT)
    (root / "references").mkdir()
    (root / "references/orgs.json").write_text('{"organisations": ["org_a", "org_b"]}\n')
    settings = (
        f'type: claude-code, command: ["{claude}"], base_url: "{url}", '
        f"api_key_env: LOOPBACK_KEY{runner}"
    )
    text = (
        "name: cc\n"
        "defaults:\n"
        f"  runner: {{{settings}}}\n"
        "  backoff: {base: 10ms, max: 50ms}\n"
        f"{textwrap.indent(textwrap.dedent(defaults), '  ')}"
        "stages:\n"
        f"{textwrap.indent(textwrap.dedent(stages), '  ')}"
    )
    (root / "pipeline.yaml").write_text(text)
    return root / "pipeline.yaml"


def research_stage(keys: str) -> str:
    items = ", ".join(f"{{id: org_{key}}}" for key in keys)
    return textwrap.dedent(
        f"""\
        - name: research
          blueprint: agents/research.md
          partitions: {{items: [{items}]}}
          params: {{ORGANIZATION_ID: "{{id}}"}}
          output: data/{{ORGANIZATION_ID}}/
        """
    )


def run(pipeline: Path) -> RunResult:
    return asyncio.run(run_pipeline(pipeline))


def attempts(project: Path, stage: str) -> dict[str, Path]:
    """Each instance's first attempt's log folder, by key."""
    return {
        folder.parent.name: folder
        for folder in project.glob(f".phalanx/runs/*/logs/{stage}/*/attempt-1")
    }


def stray_files(project: Path, before: set[Path]) -> list[Path]:
    """Files that appeared in the project outside phalanx's own places."""
    return sorted(
        path
        for path in project.rglob("*")
        if path.is_file()
        and path.relative_to(project).parts[0] not in ("data", "wip", ".phalanx")
        and path not in before
    )


def model_calls(server: LoopbackLLM) -> list[int | None]:
    """The status of every model request the server saw."""
    return [r.status for r in server.requests if r.path == "/v1/messages"]


def test_every_partition_commits_through_the_real_cli(tmp_path: Path, claude: str) -> None:
    """Three partitions, two CLI processes at a time: each writes its expected files with
    Claude Code's Write tool, they validate and commit; each process had its own config
    folder and HOME; the result JSON, usage and cost are recorded; the key is nowhere on disk."""
    project = tmp_path / "project"
    with LoopbackLLM().running_in_thread() as server:
        pipeline = write_project(
            project,
            claude,
            server.url,
            research_stage("abc"),
            defaults="concurrency: 2\nretries: 0\ntimeout: 60s\n",
        )
        before = set(project.rglob("*"))
        result = run(pipeline)

    stage = result.stage("research")
    assert (stage.committed, stage.failed) == (3, 0), result.to_json()
    for key in "abc":
        folder = project / f"data/org_{key}"
        activities = json.loads((folder / "activities.json").read_text())
        assert activities["params"]["ORGANIZATION_ID"] == f"org_{key}"
        assert (folder / "sources.md").read_text().strip()
    assert stray_files(project, before) == []
    assert list((tmp_path / "home").iterdir()) == []  # the orchestrator's HOME was not used

    logs = attempts(project, "research")
    assert sorted(logs) == ["org_a", "org_b", "org_c"]
    results = {
        key: json.loads((folder / "result.json").read_text()) for key, folder in logs.items()
    }
    assert all(r["type"] == "result" and r["is_error"] is False for r in results.values())
    sessions = {r["session_id"] for r in results.values()}
    assert len(sessions) == 3
    for key, folder in logs.items():
        config = folder / "claude-home/.claude"
        assert (config / ".claude.json").is_file()
        # The session was kept in this attempt's own config folder, and only there.
        own = [p.stem for p in config.glob("projects/*/*.jsonl")]
        assert own == [results[key]["session_id"]]
        assert (folder / "transcript.jsonl").read_text().count('"Write"') >= 2

    assert set(model_calls(server)) == {200}
    assert {r.model for r in server.requests if r.path == "/v1/messages"} == {"loopback-model"}
    assert all(r.had_api_key for r in server.requests if r.path == "/v1/messages")
    usage = result.usage
    assert usage.requests == len(model_calls(server))  # one response writing, one saying done
    assert usage.input_tokens == sum(r["usage"]["input_tokens"] for r in results.values())
    assert usage.output_tokens == sum(r["usage"]["output_tokens"] for r in results.values())
    assert usage.cache_read_tokens > 0
    assert usage.cache_write_tokens > 0
    assert usage.cost_usd == pytest.approx(sum(r["total_cost_usd"] for r in results.values()))
    assert usage.cost_usd > 0
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(SECRET.encode() not in p.read_bytes() for p in everything)


def test_claude_code_writes_only_its_staging_folder(tmp_path: Path, claude: str) -> None:
    """A report agent (reference mode, reading the research outputs and a declared reference
    file) first tries to write into the project, into an upstream output it may only read,
    outside the project, and to read an undeclared file: every one is refused by Claude Code's
    permission rules, while the blueprint, the declared file and the upstream outputs can be
    read. Then it writes its report, which commits."""
    project = tmp_path / "project"
    outside = tmp_path / "outside"
    outside.mkdir()
    seen: dict[str, ToolResult] = {}
    upstream_before: dict[Path, bytes] = {}
    blueprint = BlueprintModel()

    def escaper(conversation: Conversation) -> Reply | str:
        if conversation.assistant_turns == 0:
            upstream = project / "data/org_a"
            for path in (project / "data").rglob("*"):
                if path.is_file():
                    upstream_before[path] = path.read_bytes()
            return Reply(
                "Looking around.",
                (
                    ToolCall("Read", {"file_path": str(project / "agents/report.md")}),
                    ToolCall("Read", {"file_path": str(project / "references/orgs.json")}),
                    ToolCall("Read", {"file_path": str(upstream / "sources.md")}),
                    ToolCall("Read", {"file_path": str(project / "pipeline.yaml")}),
                    ToolCall("Write", {"file_path": str(project / "escape.md"), "content": "x"}),
                    ToolCall("Write", {"file_path": str(upstream / "extra.md"), "content": "x"}),
                    ToolCall("Write", {"file_path": str(outside / "escape.md"), "content": "x"}),
                    ToolCall("Write", {"file_path": "../../escape.md", "content": "x"}),
                ),
            )
        if conversation.assistant_turns == 1:
            calls = conversation.turns[1].tool_calls
            by_id = {r.call_id: r for r in conversation.tool_results}
            for call in calls:
                target = str(call.arguments["file_path"])
                seen[f"{call.name} {target}"] = by_id[call.id]
        return blueprint(conversation)

    with LoopbackLLM(models={"escaper": escaper}).running_in_thread() as server:
        pipeline = write_project(
            project,
            claude,
            server.url,
            research_stage("ab")
            + textwrap.dedent(
                """\
            - name: report
              blueprint: agents/report.md
              prompt: reference
              single: true
              needs: [research]
              reads: [references/orgs.json]
              runner: {model: escaper}
              output: data/report/
            """
            ),
            defaults="concurrency: 2\nretries: 0\ntimeout: 60s\n",
        )
        before = set(project.rglob("*"))
        result = run(pipeline)

    assert result.ok, result.to_json()
    assert (project / "data/report/report.md").read_text().strip()
    assert stray_files(project, before) == []
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escape.md").exists()
    assert sorted(p.name for p in (project / "data/org_a").iterdir() if p.name != MANIFEST) == [
        "activities.json",
        "sources.md",
    ]
    assert len(upstream_before) == 6  # 2 organisations: 2 files and a manifest each
    assert all(p.read_bytes() == data for p, data in upstream_before.items())

    def result_of(name: str, path: Path | str) -> ToolResult:
        return seen[f"{name} {path}"]

    for allowed in (
        ("Read", project / "agents/report.md"),
        ("Read", project / "references/orgs.json"),
        ("Read", project / "data/org_a/sources.md"),
    ):
        assert not result_of(*allowed).is_error, allowed
    assert "One report over every organisation" in (
        result_of("Read", project / "agents/report.md").content
    )
    assert "org_b" in result_of("Read", project / "references/orgs.json").content
    assert "Sources" in result_of("Read", project / "data/org_a/sources.md").content
    for refused in (
        ("Read", project / "pipeline.yaml"),
        ("Write", project / "escape.md"),
        ("Write", project / "data/org_a/extra.md"),
        ("Write", outside / "escape.md"),
        ("Write", "../../escape.md"),
    ):
        assert result_of(*refused).is_error, refused
    assert "name: cc" not in result_of("Read", project / "pipeline.yaml").content
    assert "denied" in result_of("Write", project / "data/org_a/extra.md").content

    report = json.loads((attempts(project, "report")["report"] / "result.json").read_text())
    denied = {
        (d["tool_name"], d["tool_input"].get("file_path")) for d in report["permission_denials"]
    }
    assert {
        ("Read", str(project / "pipeline.yaml")),
        ("Write", str(project / "escape.md")),
        ("Write", str(outside / "escape.md")),
    } <= denied


def test_rejected_key_fails_fatally_and_halts_the_run(tmp_path: Path, claude: str) -> None:
    """A 401 (sent with x-should-retry: false, so the CLI gives up at once) is fatal: the
    instance fails without retrying, the run halts and the next partition is skipped."""
    project = tmp_path / "project"
    with LoopbackLLM(faults=[Fault.error(401)]).running_in_thread() as server:
        pipeline = write_project(
            project,
            claude,
            server.url,
            research_stage("ab"),
            defaults="concurrency: 1\nretries: 3\ntimeout: 60s\n",
        )
        result = run(pipeline)

    stage = result.stage("research")
    failed = [inst for inst in stage.instances if inst.status == "failed"]
    assert [(inst.key, inst.cause, len(inst.attempts)) for inst in failed] == [
        ("org_a", "fatal", 1)
    ]
    assert "401" in failed[0].message
    assert stage.skipped == 1
    assert result.halted is not None
    assert "401" in result.halted
    assert model_calls(server) == [401]
    recorded = json.loads((attempts(project, "research")["org_a"] / "result.json").read_text())
    assert (recorded["is_error"], recorded["api_error_status"]) == (True, 401)


def test_turn_limit_is_a_runner_error_naming_the_subtype(tmp_path: Path, claude: str) -> None:
    """``max_turns: 1`` reaches Claude Code as --max-turns: it stops with error_max_turns,
    which fails the attempt as a runner error even though it wrote some files."""
    project = tmp_path / "project"
    with LoopbackLLM().running_in_thread() as server:
        pipeline = write_project(
            project,
            claude,
            server.url,
            research_stage("a"),
            defaults="retries: 0\ntimeout: 60s\n",
            runner=", max_turns: 1",
        )
        result = run(pipeline)

    (inst,) = result.stage("research").instances
    assert (inst.status, inst.cause) == ("failed", "runner-error")
    assert "error_max_turns" in inst.message
    assert not (project / "data/org_a").exists()
    assert len(model_calls(server)) == 1


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _processes_in(folder: Path) -> set[int]:
    """Processes whose working directory is inside ``folder``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(folder)):
                found.add(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs Linux /proc")
def test_timeout_kills_the_cli_and_its_process_group(tmp_path: Path, claude: str) -> None:
    """A model that takes 30 s against a 2 s stage timeout: the attempt fails with cause
    ``timeout`` within seconds, and no process of Claude Code's is left running."""
    project = tmp_path / "project"
    seen: set[int] = set()
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            seen.update(_processes_in(project))
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    with LoopbackLLM(latency=30).running_in_thread() as server:
        pipeline = write_project(
            project,
            claude,
            server.url,
            research_stage("a"),
            defaults="retries: 0\ntimeout: 2s\n",
            runner=", kill_grace: 1s",
        )
        watcher.start()
        started = time.monotonic()
        try:
            result = run(pipeline)
        finally:
            stop.set()
            watcher.join()
        elapsed = time.monotonic() - started

    (inst,) = result.stage("research").instances
    assert (inst.status, inst.cause) == ("failed", "timeout")
    assert elapsed < 10
    assert seen  # the CLI was running, in the staging folder
    assert [pid for pid in seen if _alive(pid)] == []
    assert not (attempts(project, "research")["org_a"] / "result.json").exists()


def test_missing_cli_is_a_usage_error_naming_the_fix(tmp_path: Path) -> None:
    """A ``command`` that does not resolve stops the run before anything starts, with a
    message naming the npm package and the ``command:`` setting."""
    project = tmp_path / "project"
    pipeline = write_project(
        project, str(tmp_path / "no/such/claude"), "http://127.0.0.1:9", research_stage("a")
    )
    with pytest.raises(UsageError, match="npm install -g @anthropic-ai/claude-code") as info:
        run(pipeline)
    assert "command:" in str(info.value)
    assert not (project / "data").exists()


def _context(tmp_path: Path) -> InstanceContext:
    project = tmp_path / "project"
    upstream = project / "data/org_a"
    upstream.mkdir(parents=True)
    (project / "refs.json").write_text("{}")
    staging = project / ".phalanx/staging/run/report/report.1"
    staging.mkdir(parents=True)
    return InstanceContext(
        run_id="run",
        stage="report",
        key="report",
        attempt=1,
        params={"PERIOD": "2025-09"},
        prompt="Write the report.",
        output_dir=staging,
        final_dir=project / "data/report",
        inputs=(InputRef("research", "org_a", upstream),),
        missing=("research/org_b",),
        project_dir=project,
        log_dir=project / ".phalanx/runs/run/logs/report/report/attempt-1",
        blueprint=None,
        timeout=60.0,
        expected=("report.md",),
        reads=("refs.json",),
    )


@pytest.mark.parametrize("mode", ["acceptEdits", "bypassPermissions"])
def test_command_line_and_environment_of_one_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Without starting the CLI: bare file tools are scoped to the staging folder, inputs are
    added read-only (edits denied), the key comes from ``api_key_env``, HOME and the config
    folder are the attempt's own, and IS_SANDBOX is set only for bypassPermissions."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-the-wrong-one")
    monkeypatch.delenv("IS_SANDBOX", raising=False)
    config = ClaudeCodeRunnerConfig(
        command=[sys.executable, "--flag"],
        base_url="http://127.0.0.1:9",
        api_key_env="LOOPBACK_KEY",
        permission_mode=mode,
        max_turns=7,
        allowed_tools=["Read", "Write", "Glob", "Bash(git log:*)"],
        env={"EXTRA": "1"},
    )
    runner = ClaudeCodeRunner(config, model="m", reference=False, where="stages[0].runner")
    ctx = _context(tmp_path)
    staging = "/" + str(ctx.output_dir.resolve())
    upstream = "/" + str(ctx.inputs[0].path.resolve())
    refs = "/" + str((ctx.project_dir / "refs.json").resolve())

    argv = runner.argv(ctx)
    assert argv[:9] == [
        sys.executable,
        "--flag",
        "-p",
        "--output-format",
        "json",
        "--permission-mode",
        mode,
        "--model",
        "m",
    ]
    assert argv[argv.index("--max-turns") + 1] == "7"
    assert argv[argv.index("--add-dir") + 1] == str(ctx.inputs[0].path.resolve())
    allowed = argv[argv.index("--allowedTools") + 1 : argv.index("--disallowedTools")]
    assert allowed == [
        f"Read({staging}/**)",
        f"Edit({staging}/**)",
        "Bash(git log:*)",
        f"Read({refs})",
    ]
    assert argv[argv.index("--disallowedTools") + 1 :] == [
        f"Edit({upstream}/**)",
        f"Edit({refs})",
    ]

    home = tmp_path / "claude-home"
    env = runner.environment(ctx, home)
    assert (env["HOME"], env["CLAUDE_CONFIG_DIR"]) == (str(home), str(home / ".claude"))
    assert env["ANTHROPIC_API_KEY"] == SECRET
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9"
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert env["EXTRA"] == "1"
    assert "XDG_CONFIG_HOME" not in env
    assert ("IS_SANDBOX" in env) == (mode == "bypassPermissions")

    prompt = runner.prompt(ctx)
    assert prompt.startswith("Write the report.\n\n")
    assert "\nExpected files: `report.md`.\n" in prompt
    assert f"- {ctx.inputs[0].path} (output of research org_a)" in prompt
    assert "- PERIOD: 2025-09" in prompt
    assert "research/org_b" in prompt


def test_a_stream_cut_in_the_middle_loses_nothing(tmp_path: Path, claude: str) -> None:
    """Claude Code streams its model calls; a stream the server cuts mid-response is survived
    (by the CLI's own retry or by phalanx's next attempt) and every partition commits."""
    project = tmp_path / "project"
    with LoopbackLLM(
        faults=[Fault.cut_stream(first=1, after_events=3)]
    ).running_in_thread() as server:
        pipeline = write_project(
            project,
            claude,
            server.url,
            research_stage("ab"),
            defaults="concurrency: 1\nretries: 2\ntimeout: 60s\n",
        )
        result = run(pipeline)

    stage = result.stage("research")
    assert (stage.committed, stage.failed) == (2, 0), result.to_json()
    assert server.counters.faults == 1


def test_a_claude_code_reviewer_reads_the_outputs_and_gates_the_commit(
    tmp_path: Path, claude: str
) -> None:
    """``review:`` on a claude-code stage (what ``phalanx import --review`` writes for a POMASA
    project) reviews with the real CLI too: the reviewer reads the attempt's outputs from the
    folder its prompt names (granted read-only), writes ``verdict.json`` with its Write tool in
    a folder of its own, and only the output it passes commits."""
    project = tmp_path / "project"
    writer = BlueprintModel()
    read: dict[str, str] = {}

    def model(conversation: Conversation) -> Reply | str:
        task = conversation.first_user_text
        if "You review the output of instance" not in task:
            return writer(conversation)
        key = task.split("You review the output of instance `", 1)[1].split("`", 1)[0]
        folder = task.split("(on disk: ", 1)[1].split(")", 1)[0]
        if conversation.assistant_turns == 0:
            return Reply("Reading.", (ToolCall("Read", {"file_path": f"{folder}/sources.md"}),))
        if conversation.assistant_turns == 1:
            read[key] = conversation.tool_results[-1].content
            workdir = _working_directory(conversation)
            assert workdir is not None, "Claude Code names its working directory"
            verdict = {"pass": key == "org_a", "reasons": [f"{key}: sources not cited"]}
            target = f"{workdir}/verdict.json"
            return Reply(
                "Judged.",
                (ToolCall("Write", {"file_path": target, "content": json.dumps(verdict)}),),
            )
        return "Done."

    with LoopbackLLM(default_model=model).running_in_thread() as server:
        stages = research_stage("ab") + "  review: {criteria: [Every source is cited]}\n"
        pipeline = write_project(
            project, claude, server.url, stages, defaults="retries: 0\ntimeout: 60s\n"
        )
        result = run(pipeline)

    stage = result.stage("research")
    by_key = {inst.key: inst for inst in stage.instances}
    assert by_key["org_a"].status == "committed", result.to_json()
    assert by_key["org_b"].status == "failed"
    assert by_key["org_b"].attempts[-1].cause == "review-rejected"
    assert "org_b: sources not cited" in (by_key["org_b"].attempts[-1].message or "")
    assert sorted(read) == ["org_a", "org_b"]
    assert all(text.strip() and "permission" not in text.lower() for text in read.values())
    assert sorted(p.name for p in (project / "data").iterdir()) == ["org_a"]
    verdict = project.glob(".phalanx/runs/*/logs/research/org_b/attempt-1/review/verdict.json")
    assert json.loads(next(verdict).read_text())["pass"] is False

"""The anthropic and openai runners end to end: a real pipeline, the real SDKs, and phalanx's
loopback LLM server on 127.0.0.1 — tool loops, usage, transcripts, faults and confinement."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

import pytest

from phalanx import RunResult, run_pipeline
from phalanx.testing import Conversation, Fault, LoopbackLLM, Reply, ScriptedModel, ToolCall

SECRET = "sk-test-do-not-leak-1234567890"  # noqa: S105 - a fake key the test hunts for

BLUEPRINT = """\
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


def project(
    root: Path,
    api: str,
    url: str,
    *,
    retries: int = 2,
    keys: str = "abcd",
    extra: str = "",
    concurrency: int = 16,
) -> Path:
    """A one-stage project whose runner talks to the loopback server at ``url``."""
    base_url = url if api == "anthropic" else url + "/v1"
    (root / "agents").mkdir(parents=True)
    (root / "agents/research.md").write_text(BLUEPRINT)
    items = ", ".join(f"{{id: org_{k}}}" for k in keys)
    (root / "pipeline.yaml").write_text(
        textwrap.dedent(
            f"""\
            name: llm
            defaults:
              runner: {{type: {api}, base_url: "{base_url}", api_key_env: LOOPBACK_KEY{extra}}}
              retries: {retries}
              concurrency: {concurrency}
              backoff: {{base: 10ms, max: 50ms}}
              timeout: 60s
            stages:
              - name: research
                blueprint: agents/research.md
                partitions: {{items: [{items}]}}
                params: {{ORGANIZATION_ID: "{{id}}"}}
                output: data/{{ORGANIZATION_ID}}/
            """
        )
    )
    return root / "pipeline.yaml"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPBACK_KEY", SECRET)


def run_with(
    tmp_path: Path,
    api: str,
    server: LoopbackLLM,
    *,
    retries: int = 2,
    keys: str = "abcd",
    extra: str = "",
    concurrency: int = 16,
) -> RunResult:
    """Start ``server``, write the project pointing at it, run the pipeline, stop the server."""

    async def go() -> RunResult:
        async with server:
            pipeline = project(
                tmp_path,
                api,
                server.url,
                retries=retries,
                keys=keys,
                extra=extra,
                concurrency=concurrency,
            )
            return await run_pipeline(pipeline)

    return asyncio.run(go())


def everything_written(root: Path) -> str:
    return "\n".join(path.read_text(errors="replace") for path in root.rglob("*") if path.is_file())


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_runner_fulfils_the_blueprint_through_the_real_sdk(tmp_path: Path, api: str) -> None:
    """Every instance's conversation writes the expected files with write_file, they validate
    and commit; usage and a transcript are recorded; the API key appears nowhere on disk."""
    server = LoopbackLLM()
    result = run_with(tmp_path, api, server)

    stage = result.stage("research")
    assert (stage.committed, stage.failed) == (4, 0), result.to_json()
    for key in "abcd":
        folder = tmp_path / f"data/org_{key}"
        assert json.loads((folder / "activities.json").read_text())
        assert (folder / "sources.md").read_text().strip()
    usage = result.to_json()["usage"]
    assert isinstance(usage, dict)
    assert usage["requests"] == 8  # one turn writing both files, one turn saying it is done
    assert usage["input_tokens"] > 0
    assert usage["output_tokens"] > 0
    transcript = next((tmp_path / ".phalanx/runs").glob("*/logs/research/org_a/attempt-1"))
    lines = [
        json.loads(line) for line in (transcript / "transcript.jsonl").read_text().splitlines()
    ]
    tools = [line["name"] for line in lines if line["kind"] == "tool"]
    assert tools == ["write_file", "write_file"]
    assert "Expected files: `activities.json`, `sources.md`." in json.dumps(lines[0])
    assert SECRET not in everything_written(tmp_path)
    assert all(SECRET not in json.dumps(r.body) for r in server.requests)


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_rate_limits_and_server_errors_are_retried_and_nothing_is_lost(
    tmp_path: Path, api: str
) -> None:
    """A storm of 429s, 529s/503s and 500s on the first requests: every instance still
    commits. The refusals (429, 529, 503) are sent again by the lane and are not failed
    attempts; the 500s fail their attempts, which are retried and recorded in the notes."""
    overloaded = 529 if api == "anthropic" else 503
    server = LoopbackLLM(
        faults=[
            Fault.error(429, first=2),
            Fault.error(overloaded, first=2),
            Fault.error(500, first=2),
        ]
    )
    result = run_with(tmp_path, api, server, retries=8)

    stage = result.stage("research")
    assert (stage.committed, stage.failed, stage.skipped) == (4, 0, 0), result.to_json()
    assert server.counters.fault_hits == (2, 2, 2)
    notes = (tmp_path / "wip/notes.md").read_text()
    assert notes.count("cause: rate-limited") == 0
    assert notes.count("cause: runner-error") == 2
    assert "action: retrying" in notes


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_rejected_key_stops_the_run_once(tmp_path: Path, api: str) -> None:
    """A 401 is fatal: the first instance to meet it fails without retrying, nothing more is
    started, the others are skipped, and the run says why, once."""
    server = LoopbackLLM(faults=[Fault.error(401)])
    result = run_with(tmp_path, api, server, retries=3, keys="abcdefgh", concurrency=2)

    stage = result.stage("research")
    failed = [inst for inst in stage.instances if inst.status == "failed"]
    assert 1 <= len(failed) <= 2  # the two in flight when the first 401 came back
    assert {inst.cause for inst in failed} == {"fatal"}
    assert all(len(inst.attempts) == 1 for inst in failed)
    assert stage.skipped == 8 - len(failed)
    assert result.halted is not None
    assert "401" in result.halted
    assert not result.cancelled
    assert not result.ok
    assert len(server.requests) <= 2


def test_bad_request_fails_the_instance_without_retry(tmp_path: Path) -> None:
    """A 400 is permanent for its instance only: no retry, the run goes on."""
    server = LoopbackLLM(faults=[Fault.error(400, first=1)])
    result = run_with(tmp_path, "openai", server, retries=3, keys="ab")

    stage = result.stage("research")
    assert sorted(inst.cause or "" for inst in stage.instances) == ["", "permanent"]
    assert stage.committed == 1
    assert result.halted is None


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_escapes_through_the_file_tools_are_refused(tmp_path: Path, api: str) -> None:
    """A model that tries to write outside its folder gets tool errors and nothing lands
    outside; when it then writes the expected files the instance commits."""

    def model(conversation: Conversation) -> Reply:
        if conversation.assistant_turns == 0:
            return Reply(
                tool_calls=(
                    ToolCall("write_file", {"path": "../../escape.txt", "content": "x"}),
                    ToolCall("write_file", {"path": "/tmp/phalanx-abs.txt", "content": "x"}),
                    ToolCall("read_file", {"path": "../../../../etc/hostname"}),
                )
            )
        if conversation.assistant_turns == 1:
            return Reply(
                tool_calls=(
                    ToolCall("write_file", {"path": "activities.json", "content": "[]"}),
                    ToolCall("write_file", {"path": "sources.md", "content": "# Sources\n"}),
                )
            )
        return Reply(text="Done.")

    server = LoopbackLLM(default_model=model)
    result = run_with(tmp_path, api, server, keys="a")

    assert result.stage("research").committed == 1, result.to_json()
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path.parent / "escape.txt").exists()
    assert not Path("/tmp/phalanx-abs.txt").exists()
    transcript = next((tmp_path / ".phalanx/runs").glob("*/logs/research/org_a/attempt-1"))
    errors = [
        json.loads(line)
        for line in (transcript / "transcript.jsonl").read_text().splitlines()
        if '"kind": "tool"' in line
    ]
    assert [e["error"] for e in errors] == [True, True, True, False, False]


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_a_model_that_never_stops_runs_out_of_turns(tmp_path: Path, api: str) -> None:
    """A model calling tools forever fails the attempt after max_turns, with that cause."""
    forever = ScriptedModel(Reply(tool_calls=(ToolCall("list_files", {}),)))
    server = LoopbackLLM(default_model=forever)

    result = run_with(tmp_path, api, server, retries=0, keys="a", extra=", max_turns: 3")
    (inst,) = result.stage("research").instances
    assert inst.status == "failed"
    assert "max_turns=3" in inst.message
    assert len(server.requests) == 3


def test_openai_insufficient_quota_is_a_billing_failure(tmp_path: Path) -> None:
    """OpenAI's 429 with code insufficient_quota is not a rate limit: no retry, and the
    message says it is about billing."""
    server = LoopbackLLM(faults=[Fault.error(429, code="insufficient_quota")])
    result = run_with(tmp_path, "openai", server, retries=3, keys="a")

    (inst,) = result.stage("research").instances
    assert inst.status == "failed"
    assert inst.cause == "fatal"
    assert "billing" in inst.message
    assert result.halted is not None
    assert len(inst.attempts) == 1


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_connection_resets_and_malformed_tool_calls_are_survived(tmp_path: Path, api: str) -> None:
    """A connection reset fails an attempt that is then retried; a tool call whose arguments
    are not a JSON object gets a tool error, and the model's next call writes the file."""
    server = LoopbackLLM(faults=[Fault.reset(first=1), Fault.malformed_tool_call(first=1)])
    result = run_with(tmp_path, api, server, keys="ab")

    stage = result.stage("research")
    assert (stage.committed, stage.failed) == (2, 0), result.to_json()
    assert server.counters.faults == 2
    notes = (tmp_path / "wip/notes.md").read_text()
    assert notes.count("cause: runner-error") == 1
    transcripts = "".join(
        path.read_text() for path in (tmp_path / ".phalanx/runs").rglob("transcript.jsonl")
    )
    assert '"error": true' in transcripts


def test_cli_reports_a_fatal_error_once_and_exits_1(tmp_path: Path) -> None:
    """Through the CLI, a rejected key ends the run with exit code 1 and one clear message."""
    from click.testing import CliRunner

    from phalanx.cli import cli

    with LoopbackLLM(faults=[Fault.error(401)]).running_in_thread() as server:
        pipeline = project(tmp_path, "openai", server.url, keys="abcd", concurrency=1)
        outcome = CliRunner().invoke(cli, ["run", str(pipeline), "--quiet"])
    assert outcome.exit_code == 1, outcome.output
    assert outcome.stderr.count("run stopped: research/org_a: 401") == 1
    assert "check the API key" in outcome.stderr


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_validation_error_is_fed_back_to_the_next_attempt(tmp_path: Path, api: str) -> None:
    """An attempt whose JSON does not parse is retried, and the retry's task message says what
    was wrong; a model that reads it fixes the file and the instance commits."""

    def model(conversation: Conversation) -> Reply:
        if conversation.assistant_turns > 0:
            return Reply(text="Done.")
        fixed = "previous attempt was rejected" in conversation.first_user_text
        assert not fixed or "activities.json: not valid JSON" in conversation.first_user_text
        return Reply(
            tool_calls=(
                ToolCall(
                    "write_file", {"path": "activities.json", "content": "[]" if fixed else "{"}
                ),
                ToolCall("write_file", {"path": "sources.md", "content": "# Sources\n"}),
            )
        )

    server = LoopbackLLM(default_model=model)
    result = run_with(tmp_path, api, server, keys="a")

    (inst,) = result.stage("research").instances
    assert inst.status == "committed", result.to_json()
    assert [a.cause for a in inst.attempts] == ["output-invalid", None]
    assert (tmp_path / "data/org_a/activities.json").read_text() == "[]"


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_cost_from_the_pipeline_price_table(tmp_path: Path, api: str) -> None:
    """With a price for the model in the pipeline, the summary's cost is exactly the tokens
    times the prices; the stage summary shows the usage."""
    server = LoopbackLLM()

    async def go() -> RunResult:
        async with server:
            pipeline = project(tmp_path, api, server.url, keys="ab")
            text = pipeline.read_text() + (
                "prices:\n  loopback-model: {input: 2.0, output: 10.0, cache_read: 0.5}\n"
            )
            pipeline.write_text(text)
            return await run_pipeline(pipeline)

    usage = asyncio.run(go()).usage
    expected = (
        usage.input_tokens * 2.0 + usage.output_tokens * 10.0 + usage.cache_read_tokens * 0.5
    ) / 1_000_000
    assert usage.requests == 4
    assert usage.unpriced == 0
    assert usage.cost_usd == pytest.approx(expected)
    assert usage.cost_usd > 0
    summary = (tmp_path / "wip/stages/research.md").read_text()
    assert "## Model usage" in summary
    assert "- requests: 4" in summary


def test_retry_after_from_the_provider_is_honoured(tmp_path: Path) -> None:
    """The server admits one request at a time and answers the others 429 with retry-after:
    1. The lane pauses for that second: after the first refusal no request goes out until
    the second has passed (the backoff alone would resend within milliseconds). The refused
    calls are sent again, so no attempt fails and every instance commits."""
    server = LoopbackLLM(max_concurrency=1, latency=0.05)
    result = run_with(tmp_path, "openai", server, retries=10, keys="abc", concurrency=3)

    assert result.stage("research").committed == 3, result.to_json()
    assert server.counters.rate_limited > 0
    assert not (tmp_path / "wip/notes.md").exists()  # not one attempt failed
    calls = sorted(server.requests, key=lambda r: r.started)
    refused = next(r for r in calls if r.status == 429)
    refused_at = refused.started + refused.duration
    # Requests sent in the instant the 429 travelled back may go out; none in the pause.
    paused = [r for r in calls if refused_at + 0.1 < r.started < refused_at + 0.95]
    assert paused == []
    assert max(r.started for r in calls) > refused_at + 0.95


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_usage_and_cost_are_summed_across_retries(tmp_path: Path, api: str) -> None:
    """The tokens and cost of a rejected attempt count too: an instance's usage is the sum of
    its attempts', the stage's the sum of its instances', and the cost follows the prices."""

    def model(conversation: Conversation) -> Reply:
        if conversation.assistant_turns > 0:
            return Reply(text="Done.")
        fixed = "previous attempt was rejected" in conversation.first_user_text
        content = "[]" if fixed else "{"
        return Reply(
            tool_calls=(
                ToolCall("write_file", {"path": "activities.json", "content": content}),
                ToolCall("write_file", {"path": "sources.md", "content": "# Sources\n"}),
            )
        )

    server = LoopbackLLM(default_model=model)

    async def go() -> RunResult:
        async with server:
            pipeline = project(tmp_path, api, server.url, keys="a")
            pipeline.write_text(
                pipeline.read_text() + "prices:\n  loopback-model: {input: 3.0, output: 15.0}\n"
            )
            return await run_pipeline(pipeline)

    result = asyncio.run(go())
    (inst,) = result.stage("research").instances
    first, second = (attempt.usage for attempt in inst.attempts)
    assert first is not None
    assert second is not None
    assert (first.requests, second.requests) == (2, 2)
    total = inst.usage
    assert total.requests == 4 == len(server.requests)
    assert total.output_tokens == first.output_tokens + second.output_tokens
    assert total.cost_usd == pytest.approx(first.cost_usd + second.cost_usd)
    assert total.cost_usd == pytest.approx(
        (total.input_tokens * 3.0 + total.cache_read_tokens * 3.0 + total.output_tokens * 15.0)
        / 1_000_000
    )
    assert result.usage.cost_usd == pytest.approx(total.cost_usd)


def test_stages_with_the_same_endpoint_and_key_share_one_client(tmp_path: Path) -> None:
    """Two stages talking to one endpoint with one key get the same SDK client (one connection
    pool); a stage with another endpoint gets its own; the run closes them."""
    from phalanx import load_pipeline, plan_pipeline
    from phalanx._scheduler import _stage_tools
    from phalanx.runners._llm import Clients

    pipeline = project(tmp_path, "openai", "http://127.0.0.1:9", keys="a", extra=", model: m")
    pipeline.write_text(
        pipeline.read_text()
        + textwrap.indent(
            textwrap.dedent(
                """\
                - {name: again, needs: [research], output: "again/{ORGANIZATION_ID}/"}
                - name: elsewhere
                  needs: [research]
                  output: "elsewhere/{ORGANIZATION_ID}/"
                  runner: {base_url: "http://127.0.0.1:10/v1"}
                """
            ),
            "  ",
        )
    )
    plan = plan_pipeline(load_pipeline(pipeline))
    clients = Clients()
    runners = [_stage_tools(plan, stage, None, clients)[0] for stage in plan.stages]
    first, again, elsewhere = (getattr(runner, "client") for runner in runners)  # noqa: B009
    assert first is again
    assert elsewhere is not first
    asyncio.run(clients.aclose())
    assert first.is_closed()


def test_provider_side_tools_are_passed_through(tmp_path: Path) -> None:
    """A blueprint naming ``web_search`` and a runner's ``server_tools`` reach Anthropic as
    server tool definitions, beside phalanx's file tools."""
    server = LoopbackLLM()

    async def go() -> RunResult:
        async with server:
            pipeline = project(
                tmp_path,
                "anthropic",
                server.url,
                keys="a",
                extra=", server_tools: [{type: code_execution_20250522, name: code_execution}]",
            )
            blueprint = tmp_path / "agents/research.md"
            blueprint.write_text(
                blueprint.read_text().replace("model:", "tools: [web_search]\nmodel:")
            )
            return await run_pipeline(pipeline)

    assert asyncio.run(go()).stage("research").committed == 1
    body = server.requests[0].body
    assert body is not None
    tools = body["tools"]
    names = [tool["name"] for tool in tools]
    assert names == ["write_file", "read_file", "list_files", "code_execution", "web_search"]
    assert tools[-1]["type"] == "web_search_20250305"

"""The loopback server's lifecycle (async and threaded, nothing leaked), its request log, the
model registry, user-supplied models, the default model's rules, and the public API."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request

import anthropic
import openai
import pytest

import phalanx.testing
from phalanx.testing import (
    BlueprintModel,
    Conversation,
    Fault,
    LoopbackLLM,
    Model,
    Reply,
    ScriptedModel,
    ToolCall,
    Turn,
)

SECRET = "sk-ant-very-secret-0123456789"  # noqa: S105 - a fake key, to look for in the log


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


def _conversation(system: str, user: str, *, tools: tuple[str, ...] = ()) -> Conversation:
    return Conversation(
        api="anthropic",
        model="m",
        system=system,
        turns=(Turn("user", user),),
        tools=tools,
        max_tokens=1000,
    )


def test_public_api_is_exactly_the_listed_names() -> None:
    """``phalanx.testing.__all__`` is sorted, complete and holds nothing private."""
    expected = {
        "BlueprintModel", "Conversation", "Counters", "Fault", "FaultKind", "LoopbackLLM",
        "Model", "RecordedRequest", "Reply", "ScriptedModel", "ToolCall", "ToolResult", "Turn",
    }  # fmt: skip
    assert phalanx.testing.__all__ == sorted(phalanx.testing.__all__)
    assert set(phalanx.testing.__all__) == expected
    public = {name for name in vars(phalanx.testing) if not name.startswith("_")}
    assert public - {"importlib"} == expected


def test_async_lifecycle_binds_loopback_and_closes() -> None:
    """``async with`` listens on 127.0.0.1 and stops listening on exit; ``url`` is only
    available while running."""

    async def scenario() -> int:
        server = LoopbackLLM()
        with pytest.raises(RuntimeError, match="not running"):
            _ = server.url
        async with server:
            assert server.url == f"http://127.0.0.1:{server.port}"
            with pytest.raises(RuntimeError, match="already running"):
                await server.start()
            return server.port

    port = asyncio.run(scenario())
    assert _refused(port)


def test_thread_lifecycle_leaves_nothing_behind() -> None:
    """The threaded server answers from another thread; on exit its thread is joined, its
    loop closed and its socket gone (an unclosed one would fail the test with
    ``ResourceWarning``)."""
    before = set(threading.enumerate())
    with LoopbackLLM().running_in_thread() as server:
        request = urllib.request.Request(server.url + "/", method="HEAD")  # noqa: S310 - http://127.0.0.1
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - same URL
            assert response.status == 200
        port = server.port
        assert len(set(threading.enumerate()) - before) == 1
    assert set(threading.enumerate()) == before
    assert _refused(port)
    assert server.requests[0].method == "HEAD"


def test_thread_start_failure_is_raised_and_joined() -> None:
    """A port already taken raises ``OSError`` in the caller, with no thread left running."""
    before = set(threading.enumerate())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = LoopbackLLM(port=taken.getsockname()[1])
        with pytest.raises(OSError, match="address"), server.running_in_thread():
            pass
    assert set(threading.enumerate()) == before


def test_stop_cancels_requests_in_flight() -> None:
    """Leaving the server's block while a request waits out its latency does not wait for
    it: the client sees a connection error and the request is recorded unanswered."""
    outcome: list[str] = []

    def call(url: str) -> None:
        with anthropic.Anthropic(base_url=url, api_key="x", max_retries=0) as client:
            try:
                client.messages.create(
                    model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
                )
                outcome.append("answered")
            except anthropic.APIConnectionError:
                outcome.append("connection error")

    started = time.monotonic()
    with LoopbackLLM(latency=30).running_in_thread() as server:
        caller = threading.Thread(target=call, args=(server.url,))
        caller.start()
        while not server.counters.requests:
            time.sleep(0.005)
    assert time.monotonic() - started < 10
    caller.join()
    assert outcome == ["connection error"]
    assert [(r.status, r.fault) for r in server.requests] == [(None, None)]


def test_recording_never_holds_the_api_key() -> None:
    """Requests are recorded with their body and outcome, but the key's value appears nowhere:
    only that one was sent."""

    async def scenario() -> LoopbackLLM:
        faults = [Fault.error(500, first=1)]
        async with LoopbackLLM(faults=faults) as server:
            async with anthropic.AsyncAnthropic(
                base_url=server.url, api_key=SECRET, max_retries=0
            ) as client:
                with pytest.raises(anthropic.InternalServerError):
                    await client.messages.create(
                        model="m", max_tokens=9, messages=[{"role": "user", "content": "one"}]
                    )
                await client.messages.create(
                    model="m", max_tokens=9, messages=[{"role": "user", "content": "two"}]
                )
            async with openai.AsyncOpenAI(
                base_url=server.url + "/v1", api_key=SECRET, max_retries=0
            ) as other:
                await other.chat.completions.create(
                    model="g", messages=[{"role": "user", "content": "three"}]
                )
            return server

    server = asyncio.run(scenario())
    records = server.requests
    assert [(r.api, r.model, r.status, r.fault) for r in records] == [
        ("anthropic", "m", 500, "error"),
        ("anthropic", "m", 200, None),
        ("openai", "g", 200, None),
    ]
    assert all(r.had_api_key for r in records)
    assert records[1].body is not None
    assert records[1].body["messages"][0]["content"] == "two"
    assert "anthropic-version" in records[1].headers
    assert "x-api-key" not in records[1].headers
    assert "authorization" not in records[2].headers
    assert SECRET not in repr(records)
    assert SECRET[-10:] not in json.dumps([r.headers for r in records])
    assert server.counters.requests == 3
    assert server.counters.faults == 1


def test_models_by_name_plain_async_and_scripted() -> None:
    """Models are picked by the request's model name; unknown names use the default; plain
    functions, async functions and scripts all work; a failing model is a 500 naming it."""

    async def shout(conversation: Conversation) -> Reply:
        await asyncio.sleep(0)
        return Reply(conversation.last_user_text.upper())

    def broken(conversation: Conversation) -> str:
        raise KeyError("no such thing")

    script = ScriptedModel(
        Reply("Calling.", (ToolCall("lookup", {"q": "x"}),)),
        "Finished.",
    )
    models: dict[str, Model] = {
        "echo": lambda c: c.last_user_text,
        "shout": shout,
        "script": script,
        "broken": broken,
    }

    async def scenario() -> None:
        async with (
            LoopbackLLM(models=models, default_model=lambda c: "default") as server,
            openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client,
        ):

            async def ask(model: str, *extra: openai.types.chat.ChatCompletionMessageParam) -> str:
                completion = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi there"}, *extra]
                )
                message = completion.choices[0].message
                calls = message.tool_calls or []
                names = [c.function.name for c in calls if c.type == "function"]
                return f"{message.content}|{','.join(names)}"

            assert await ask("echo") == "hi there|"
            assert await ask("shout") == "HI THERE|"
            assert await ask("unknown") == "default|"
            assert await ask("script") == "Calling.|lookup"
            later: openai.types.chat.ChatCompletionMessageParam = {
                "role": "assistant",
                "content": "Calling.",
            }
            assert await ask("script", later) == "Finished.|"
            with pytest.raises(openai.InternalServerError, match="KeyError"):
                await ask("broken")

    asyncio.run(scenario())


def test_default_model_finds_the_expected_files() -> None:
    """Backticked relative paths with an extension, in order, without repeats; never ``..``,
    absolute paths or names without an extension; an "expected files" line takes
    precedence over names mentioned elsewhere."""
    model = BlueprintModel()
    found = model.expected_files(
        _conversation(
            "Write `activities.json`, then `out/report.md` and `activities.json` again. "
            "Not `../escape.txt`, `/etc/passwd.txt`, `README`, `a b.md` or `{ID}/x.md`.",
            "Also `sources.md`.",
        )
    )
    assert found == ["activities.json", "out/report.md", "sources.md"]
    marked = model.expected_files(
        _conversation(
            "Read `references/orgs.json` first.",
            "You are instance `acme.com`.\nExpected files: `activities.json`, `sources.md`.",
        )
    )
    assert marked == ["activities.json", "sources.md"]


def test_default_model_turns() -> None:
    """It writes what is missing, then answers; without tools it answers text; Claude Code's
    ``Write`` tool gets absolute paths; ``contents`` overrides a file's text."""
    model = BlueprintModel(contents={"b.md": "# fixed\n"})
    first = _conversation(
        "", "Expected files: `a.json`, `b.md`.\n- ORG: acme", tools=("write_file",)
    )
    reply = model(first)
    assert [c.arguments["path"] for c in reply.tool_calls] == ["a.json", "b.md"]
    document = json.loads(str(reply.tool_calls[0].arguments["content"]))
    assert document["params"] == {"ORG": "acme"}
    assert reply.tool_calls[1].arguments["content"] == "# fixed\n"

    half = Conversation(
        api="openai",
        model="m",
        system="",
        turns=(
            *first.turns,
            Turn("assistant", "", (reply.tool_calls[0],)),
        ),
        tools=("write_file",),
    )
    assert [c.arguments["path"] for c in model(half).tool_calls] == ["b.md"]
    done = Conversation(
        api="openai",
        model="m",
        system="",
        turns=(*first.turns, Turn("assistant", "", reply.tool_calls)),
        tools=("write_file",),
    )
    assert model(done).tool_calls == ()
    assert "a.json" in model(done).text

    assert model(_conversation("", "Expected files: `a.json`.")).tool_calls == ()
    claude = _conversation(
        "Keep notes in `MEMORY.md`.\n# Environment\n - Primary working directory: /tmp/work",
        "<system-reminder>See `CLAUDE.md`.</system-reminder>\nPlease write `a.json`.",
        tools=("Read", "Write"),
    )
    (call,) = model(claude).tool_calls
    assert call.name == "Write"
    assert call.arguments["file_path"] == "/tmp/work/a.json"
    rewritten = Conversation(
        api="anthropic",
        model="m",
        system=claude.system,
        turns=(*claude.turns, Turn("assistant", "", (call,))),
        tools=claude.tools,
    )
    assert model(rewritten).tool_calls == ()


def test_fault_rules_are_validated() -> None:
    """Impossible rules are refused when built."""
    with pytest.raises(ValueError, match="probability"):
        Fault.error(500, probability=1.5)
    with pytest.raises(ValueError, match="status"):
        Fault.error(200)
    with pytest.raises(ValueError, match="after_events"):
        Fault.cut_stream(after_events=0)
    with pytest.raises(ValueError, match="max_concurrency"):
        LoopbackLLM(max_concurrency=0)

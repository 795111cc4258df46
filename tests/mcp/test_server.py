"""``phalanx mcp``, driven over stdio by the official MCP client, as Claude Code drives it.

Each test starts the real server (``python -m phalanx mcp --project DIR``) and talks to it with
``mcp.ClientSession``. The runs it starts use ``gate_agent.py``: every agent waits until the
test creates a gate file, so whether a run is still going when the test looks is decided by the
test, not by a clock. Every orchestrator the server started is stopped when the test ends, and
every agent is killed by the ``make_project`` fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.types import TextContent

from phalanx._ledger import open_ledger
from phalanx._pipeline import load_pipeline, plan_pipeline
from phalanx.testing import BlueprintModel, LoopbackLLM

if TYPE_CHECKING:
    from tests.conftest import Project, ProjectFactory

GATE_AGENT = Path(__file__).parent / "gate_agent.py"
CHILD_MARK = "phalanx-test-child"
KEYS = ["a", "b", "c", "d", "e", "f"]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "pomasa"
TOOLS = {
    "plan", "start_run", "status", "stage_summary", "failures", "stop_run", "import_project",
}  # fmt: skip
POLL_S = 0.1
DONE_WITHIN_S = 120.0


# ---------------------------------------------------------------------------------------------
# Helpers


@dataclass
class Orchestrators:
    """The pids of the ``phalanx run`` processes the server started during a test."""

    pids: list[int] = field(default_factory=list)

    def stop_all(self) -> None:
        """SIGTERM each still-running one (phalanx then cancels its agents), SIGKILL its
        process group if it has not ended after ten seconds."""
        running = [pid for pid in self.pids if _is_phalanx_run(pid)]
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(_is_phalanx_run(pid) for pid in running) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in running:
            if _is_phalanx_run(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


def _is_phalanx_run(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) ``phalanx run`` process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    live = stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}
    return live and b"phalanx" in cmdline and b"run" in cmdline


@pytest.fixture
def orchestrators(make_project: ProjectFactory) -> Iterator[Orchestrators]:
    """Collects the runs the server starts; stops those still running at the end (before
    ``make_project`` kills the agents left behind)."""
    started = Orchestrators()
    try:
        yield started
    finally:
        started.stop_all()


@dataclass
class Client:
    """One MCP session with the server, with shortcuts for the tests."""

    session: ClientSession
    orchestrators: Orchestrators

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        """Call ``tool``; it must succeed with a structured (JSON object) result."""
        result = await self.session.call_tool(tool, arguments)
        assert not result.is_error, _text(result.content)
        content = result.structured_content
        assert isinstance(content, dict), content
        if tool == "start_run":
            self.orchestrators.pids.append(content["pid"])
        return content

    async def error(self, tool: str, **arguments: Any) -> str:
        """Call ``tool``; it must fail with a tool error, whose text is returned."""
        result = await self.session.call_tool(tool, arguments)
        assert result.is_error, result.structured_content
        return _text(result.content)

    async def status_until(
        self, run_id: str, *, states: set[str] | None = None, exited: bool = False
    ) -> dict[str, Any]:
        """Poll ``status`` until the run is done (or in one of ``states``), and with
        ``exited`` until its process has exited too; fail the test after
        :data:`DONE_WITHIN_S` seconds."""
        deadline = time.monotonic() + DONE_WITHIN_S
        while True:
            status = await self.call("status", run_id=run_id)
            reached = status["state"] in states if states is not None else status["done"]
            if reached and not (exited and status["process"]["alive"]):
                return status
            assert time.monotonic() < deadline, f"run {run_id} still {status['state']}"
            await anyio.sleep(POLL_S)


def _text(content: list[Any]) -> str:
    return "\n".join(block.text for block in content if isinstance(block, TextContent))


@contextlib.asynccontextmanager
async def connect(
    root: Path, orchestrators: Orchestrators, env: dict[str, str] | None = None
) -> AsyncIterator[Client]:
    """Start ``phalanx mcp --project ROOT`` and open an initialised session with it; the
    server's stderr goes to ``ROOT/../server.err``."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "phalanx", "mcp", "--project", str(root)],
        env=env,
    )
    with (root.parent / "server.err").open("a", encoding="utf-8") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield Client(session, orchestrators)


def gated(make_project: ProjectFactory, *failing: str, keys: list[str] = KEYS) -> Project:
    """A project whose one map stage ``s`` runs ``gate_agent.py`` over ``keys``; the agents
    of ``failing`` keys exit 3 once the gate opens."""
    project = make_project(None)
    runner = {
        "type": "command",
        "argv": [
            sys.executable,
            str(GATE_AGENT),
            str(project.root.parent / "gate"),
            str(project.pids),
            CHILD_MARK,
            *(f"{key}=fail" for key in failing),
        ],
    }
    project.write("pipeline.yaml", make_project.dump(make_project.one_stage(runner, keys)))
    return project


def open_gate(project: Project) -> None:
    (project.root.parent / "gate").write_text("open", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Tests


def test_lists_seven_tools_with_input_schemas(
    make_project: ProjectFactory, orchestrators: Orchestrators
) -> None:
    """After initialize, the server names itself ``phalanx`` and lists exactly the seven tools,
    each with a description and an object input schema whose every argument is described;
    the required arguments are the pipeline (plan, start_run), the stage (stage_summary) and
    the run id (stop_run); the read-only tools say so."""
    project = gated(make_project)

    async def scenario() -> None:
        params = StdioServerParameters(
            command=sys.executable, args=["-m", "phalanx", "mcp", "--project", str(project.root)]
        )
        with (project.root.parent / "server.err").open("w", encoding="utf-8") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as session,
            ):
                init = await session.initialize()
                listed = (await session.list_tools()).tools
        assert init.server_info.name == "phalanx"
        tools = {tool.name: tool for tool in listed}
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert tool.description, tool.name
            schema = tool.input_schema
            assert schema["type"] == "object"
            for name, prop in schema["properties"].items():
                assert prop.get("description"), f"{tool.name}.{name}"
        required = {
            name: set(tool.input_schema.get("required", [])) for name, tool in tools.items()
        }
        assert required == {
            "plan": {"pipeline"},
            "start_run": {"pipeline"},
            "status": set(),
            "stage_summary": {"stage"},
            "failures": set(),
            "stop_run": {"run_id"},
            "import_project": {"project"},
        }
        assert set(tools["start_run"].input_schema["properties"]) >= {
            "pipeline", "stages", "only", "settings", "concurrency", "backend", "force",
            "rerun_failed",
        }  # fmt: skip
        for name in ("plan", "status", "stage_summary", "failures"):
            annotations = tools[name].annotations
            assert annotations is not None
            assert annotations.read_only_hint is True

    anyio.run(scenario)


def test_plan_matches_the_pipeline(
    make_project: ProjectFactory, orchestrators: Orchestrators
) -> None:
    """``plan`` reports what ``plan_pipeline`` makes of the file: one map stage of six
    instances on the command runner, its concurrency, output template and first keys with
    their folders; it runs nothing and writes nothing."""
    project = gated(make_project)
    expected = plan_pipeline(load_pipeline(project.pipeline)).stage("s")

    async def scenario() -> None:
        async with connect(project.root, orchestrators) as client:
            plan = await client.call("plan", pipeline="pipeline.yaml")
        assert plan["pipeline"] == "t"
        assert plan["instances"] == 6
        (stage,) = plan["stages"]
        assert stage["name"] == "s"
        assert stage["kind"] == "map"
        assert stage["instances"] == len(expected.instances) == 6
        assert stage["runner"] == "command"
        assert stage["concurrency"] == expected.concurrency
        assert stage["retries"] == 0
        assert stage["output"] == "data/{PARTITION_KEY}/"
        assert stage["needs"] == []
        assert stage["expect"] == ["notes.md", "out.json"]
        assert stage["first_instances"] == [
            {"key": inst.key, "output": inst.output_rel} for inst in expected.instances
        ]
        assert [item["key"] for item in stage["first_instances"]] == KEYS

    anyio.run(scenario)
    assert not (project.root / ".phalanx").exists()
    assert not (project.root / "data").exists()


def test_run_status_failures_and_stage_summary(
    make_project: ProjectFactory, orchestrators: Orchestrators
) -> None:
    """``start_run`` returns a run id while every agent still waits at the gate (the run is
    not done); once the gate opens, ``status`` is polled until done: state ``failed``, 4 of 6
    committed and 2 failed, as the ledger counts them; ``failures`` returns exactly the two
    failing keys, cause ``runner-error``, with the agent's stderr in the detail and an
    existing log folder; ``stage_summary`` gives the same counts, the failed keys, the times
    the ledger holds and the summary file phalanx wrote for this run; an unknown stage is a
    tool error naming the stages there are."""
    project = gated(make_project, "b", "e")

    async def scenario() -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with connect(project.root, orchestrators) as client:
            started = await client.call("start_run", pipeline="pipeline.yaml")
            run_id = started["run_id"]
            assert started["instances"] == 6
            assert started["stages"] == [{"name": "s", "instances": 6}]
            early = await client.call("status", run_id=run_id)
            assert early["done"] is False
            assert early["state"] in {"starting", "running"}

            open_gate(project)
            status = await client.status_until(run_id, exited=True)
            failures = await client.call("failures", run_id=run_id, stage="s")
            summary = await client.call("stage_summary", run_id=run_id, stage="s")
            latest = await client.call("status")
            assert latest["run_id"] == run_id  # no run id: the one this server started last
            unknown = await client.error("stage_summary", run_id=run_id, stage="zz")
            assert "no stage 'zz'" in unknown
            assert "its stages: s" in unknown
        return run_id, status, failures, summary

    run_id, status, failures, summary = anyio.run(scenario)
    check_status(project, run_id, status)
    check_failures(failures)
    check_summary(project, run_id, summary)
    assert project.dirs("data") == ["a", "c", "d", "f"]


def check_status(project: Project, run_id: str, status: dict[str, Any]) -> None:
    """The final status of the run of six with two failures agrees with the ledger."""
    with open_ledger(project.root / ".phalanx") as ledger:
        counts = ledger.counts(run_id)
    assert counts == {"s": {"committed": 4, "failed": 2}}
    assert status["state"] == "failed"
    assert status["done"] is True
    assert status["process"]["exit_code"] == 1
    totals = status["totals"]
    assert (totals["total"], totals["committed"], totals["failed"], totals["skipped"]) == (
        6, 4, 2, 0,
    )  # fmt: skip
    (stage,) = status["stages"]
    assert (stage["name"], stage["total"], stage["committed"], stage["failed"]) == (
        "s", 6, 4, 2,
    )  # fmt: skip
    assert stage["causes"] == {"runner-error": 2}
    (group,) = status["failures"]
    assert (group["stage"], group["cause"], group["count"]) == ("s", "runner-error", 2)


def check_failures(failures: dict[str, Any]) -> None:
    """Exactly keys b and e, each with its cause, message, stderr and log folder."""
    assert failures["total_failed"] == 2
    assert failures["truncated"] is False
    assert failures["by_cause"] == [{"stage": "s", "cause": "runner-error", "count": 2}]
    assert [(f["stage"], f["key"]) for f in failures["failures"]] == [("s", "b"), ("s", "e")]
    for failure in failures["failures"]:
        key = failure["key"]
        assert failure["cause"] == "runner-error"
        assert "exited with code 3" in failure["message"]
        assert failure["attempts"] == 1
        assert f"agent {key}: the data is not there" in failure["detail"]
        assert f"agent {key}: giving up with code 3" in failure["detail"]
        assert Path(failure["log_dir"]).is_dir()
        assert [entry["outcome"] for entry in failure["history"]] == ["failed"]


def check_summary(project: Project, run_id: str, summary: dict[str, Any]) -> None:
    """The stage's figures are the ledger's; its summary file is this run's."""
    with open_ledger(project.root / ".phalanx") as ledger:
        durations = [row.duration_s or 0.0 for row in ledger.run_instances(run_id)]
    assert (summary["total"], summary["committed"], summary["failed"]) == (6, 4, 2)
    assert summary["failed_keys"] == ["b", "e"]
    assert summary["skipped_keys"] == []
    assert summary["status"] == "done"
    assert summary["sum_instance_s"] == pytest.approx(sum(durations), abs=1e-3)
    assert summary["wall_s"] > 0
    slowest = [item["seconds"] for item in summary["slowest"]]
    assert slowest == pytest.approx(sorted(durations, reverse=True)[:5], abs=1e-3)
    assert summary["output"] == "data/{PARTITION_KEY}/"
    assert summary["output_folder"] == str(project.root / "data")
    assert summary["summary_file"] == str(project.root / "wip" / "stages" / "s.md")
    assert summary["summary_of_this_run"] is True
    assert f"Run `{run_id}`" in summary["summary"]


def test_bad_pipeline_is_a_tool_error_naming_the_file(
    make_project: ProjectFactory, orchestrators: Orchestrators
) -> None:
    """A missing pipeline file and one with an unknown field are tool errors naming the file
    (and the field), from ``plan`` and from ``start_run`` alike; ``start_run`` starts
    nothing. ``status`` in a project where nothing has run is a tool error that says to start
    a run first."""
    project = gated(make_project)
    project.write(
        "broken.yaml", "name: t\nstages:\n  - name: s\n    partitions: [a]\n    outptu: x/\n"
    )

    async def scenario() -> None:
        async with connect(project.root, orchestrators) as client:
            missing = await client.error("plan", pipeline="missing.yaml")
            assert "missing.yaml" in missing
            assert "not found" in missing
            for tool in ("plan", "start_run"):
                broken = await client.error(tool, pipeline="broken.yaml")
                assert "broken.yaml" in broken
                assert "outptu" in broken
            nowhere = await client.error("status", run_id="nope")
            assert "no phalanx ledger" in nowhere
            assert "start_run" in nowhere

    anyio.run(scenario)
    assert not (project.root / ".phalanx").exists()


def test_start_in_a_busy_project_is_reported_failed_to_start(
    make_project: ProjectFactory, orchestrators: Orchestrators
) -> None:
    """While one run holds the project, a second ``start_run`` returns a run id (the pipeline
    is fine), but its process exits 2 without recording a run: ``status`` says
    ``failed-to-start``, done, with the exit code and the reason from its log; ``failures``
    on it says it failed to start; ``stop_run`` on it is refused, as it has ended."""
    project = gated(make_project)

    async def scenario() -> None:
        async with connect(project.root, orchestrators) as client:
            first = await client.call("start_run", pipeline="pipeline.yaml")
            await client.status_until(first["run_id"], states={"running"})
            second = await client.call("start_run", pipeline="pipeline.yaml")
            status = await client.status_until(second["run_id"])
            assert status["state"] == "failed-to-start"
            assert status["done"] is True
            assert status["exit_code"] == 2
            assert "another phalanx run is working in this project" in status["message"]
            assert first["run_id"] in status["log_tail"]
            why = await client.error("failures", run_id=second["run_id"])
            assert "failed to start (exit code 2)" in why
            refused = await client.error("stop_run", run_id=second["run_id"])
            assert "already ended" in refused
            still = await client.call("status", run_id=first["run_id"])
            assert still["state"] == "running"

    anyio.run(scenario)


def test_stop_run_stops_a_slow_run(
    make_project: ProjectFactory, orchestrators: Orchestrators
) -> None:
    """``stop_run`` on a run whose agents wait for ever: the run ends, recorded as
    ``interrupted`` (stopped) by SIGTERM, every instance skipped (cancelled) and none lost; a
    second ``stop_run`` is refused because the run has ended. The run was started with the
    options given to ``start_run`` (concurrency, a runner setting), as its ledger record
    shows."""
    project = gated(make_project)

    async def scenario() -> str:
        async with connect(project.root, orchestrators) as client:
            started = await client.call(
                "start_run", pipeline="pipeline.yaml", concurrency=6, settings={"kill_grace": "1s"}
            )
            run_id = str(started["run_id"])
            running = await client.status_until(run_id, states={"running"})
            assert running["done"] is False
            project.wait_until(lambda: len(project.recorded()) == 6, what="six agents")
            stopped = await client.call("stop_run", run_id=run_id)
            assert stopped["ended"] is True
            assert stopped["state"] == "interrupted"
            assert stopped["done"] is True
            status = await client.status_until(run_id)
            assert status["state"] == "interrupted"
            assert "SIGTERM" in (status["stop_reason"] or "")
            totals = status["totals"]
            assert (totals["total"], totals["committed"], totals["skipped"]) == (6, 0, 6)
            again = await client.error("stop_run", run_id=run_id)
            assert "already ended" in again
        return run_id

    run_id = anyio.run(scenario)
    with open_ledger(project.root / ".phalanx") as ledger:
        run = ledger.get_run(run_id)
    assert run is not None
    assert run.options["concurrency"] == 6
    assert run.options["settings"] == {"kill_grace": "1s"}
    assert project.survivors(pid for pids in project.recorded().values() for pid in pids) == []


def test_killed_run_is_reported_crashed(
    make_project: ProjectFactory, orchestrators: Orchestrators
) -> None:
    """When the orchestrator is killed (SIGKILL) the ledger still says running; ``status``
    does not: it says ``crashed``, done, and that the process is gone."""
    project = gated(make_project)

    async def scenario() -> None:
        async with connect(project.root, orchestrators) as client:
            started = await client.call("start_run", pipeline="pipeline.yaml")
            await client.status_until(started["run_id"], states={"running"})
            os.kill(started["pid"], signal.SIGKILL)
            status = await client.status_until(started["run_id"])
        assert status["state"] == "crashed"
        assert status["done"] is True
        assert "gone" in status["message"]
        assert status["process"]["exit_code"] == -signal.SIGKILL

    anyio.run(scenario)


def test_run_outlives_the_server_and_other_runs_are_read_not_stopped(
    make_project: ProjectFactory, orchestrators: Orchestrators
) -> None:
    """A run goes on after the session that started it ends and its server exits; a new
    server reads it from the ledger (state ``ok``, every instance committed) but refuses to
    stop it, naming why: it did not start it."""
    project = gated(make_project)

    async def first_chat() -> str:
        async with connect(project.root, orchestrators) as client:
            started = await client.call("start_run", pipeline="pipeline.yaml")
            await client.status_until(started["run_id"], states={"running"})
            return str(started["run_id"])

    run_id = anyio.run(first_chat)
    assert _is_phalanx_run(orchestrators.pids[0])
    open_gate(project)

    async def second_chat() -> None:
        async with connect(project.root, orchestrators) as client:
            status = await client.status_until(run_id)
            assert status["state"] == "ok"
            assert status["totals"]["committed"] == 6
            assert status["process"] is None
            refused = await client.error("stop_run", run_id=run_id)
            assert "was not started by this server" in refused

    anyio.run(second_chat)


def test_missing_sdk_exits_2_naming_the_extra() -> None:
    """Without the ``mcp`` package, ``phalanx mcp`` exits 2 and says what to install."""
    code = (
        "import sys; sys.modules['mcp'] = None; "
        "from phalanx.cli import main; sys.argv = ['phalanx', 'mcp']; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'phalanx[mcp]'" in done.stderr


def test_import_a_pomasa_project_then_run_it(
    make_project: ProjectFactory, orchestrators: Orchestrators
) -> None:
    """The delegation a chat orchestrator of a POMASA project makes: ``import_project`` on the
    monthly tracker reports PERIOD as a TODO (and ``plan`` refuses the file, naming it); with
    the value it writes a pipeline that ``start_run`` runs to the end against the loopback
    LLM, one instance per organisation, and ``status`` agrees with the ledger."""
    project = make_project(None, name="tracker")
    shutil.copytree(EXAMPLES / "monthly-tracker", project.root, dirs_exist_ok=True)
    model = BlueprintModel(
        contents={
            "activities.json": json.dumps(
                {"activities": [{"date": "2025-09-02", "source": "https://example.org/a"}]}
            ),
            "sources.md": "- https://example.org/a\n",
            "report.md": "# 报告\n\n" + "字" * 40 + "\n\n## 缺失\n\n无\n",
        }
    )

    async def scenario(url: str) -> None:
        async with connect(project.root, orchestrators) as client:
            first = await client.call("import_project", project=".", runner="openai", model="m")
            assert [todo["where"] for todo in first["todos"]] == ["params.PERIOD"]
            refused = await client.error("plan", pipeline="pipeline.yaml")
            assert "params.PERIOD: TODO:" in refused
            again = await client.call(
                "import_project", project=".", runner="openai", model="m",
                params={"PERIOD": "2025-09"}, force=True,
            )  # fmt: skip
            assert again["todos"] == []
            assert [(s["name"], s["kind"]) for s in again["stages"]] == [
                ("research_agent", "map"), ("monthly_summary", "single"),
            ]  # fmt: skip
            started = await client.call(
                "start_run", pipeline="pipeline.yaml", settings={"base_url": url}
            )
            status = await client.status_until(started["run_id"])
            assert status["state"] == "ok", status
            counts = {stage["name"]: stage["committed"] for stage in status["stages"]}
            assert counts == {"research_agent": 8, "monthly_summary": 1}

    with LoopbackLLM(default_model=model).running_in_thread() as server:
        anyio.run(scenario, server.url + "/v1")
    assert len(project.dirs("data/2025-09/raw")) == 8

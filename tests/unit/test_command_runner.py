"""The ``command`` runner: argv without a shell, the prompt on stdin, exit codes, timeouts and
the agent's whole process group killed when its attempt ends."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from phalanx import RunnerError, load_pipeline, plan_pipeline
from phalanx._config import CommandRunnerConfig
from phalanx.runners import InstanceContext
from phalanx.runners.command import CommandRunner

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory


@pytest.mark.parametrize("mode", ["hang", "stubborn"])
def test_hanging_agent_and_its_child_die_on_timeout(
    make_project: ProjectFactory, pids: Path, mode: str
) -> None:
    """An agent that starts a child and hangs past the stage's 1 s timeout fails with cause
    ``timeout``; the agent and its child are both dead soon after (SIGTERM to the group, then
    SIGKILL after ``kill_grace`` for an agent that ignores SIGTERM); its staging folder is gone
    and no output folder exists."""
    runner = make_project.runner("--pids", str(pids), mode, kill_grace="0.5s")
    project = make_project(make_project.one_stage(runner, [{"id": "h"}], timeout="1s"))

    result = project.run()

    (inst,) = result.stage("s").instances
    assert (inst.status, inst.cause) == ("failed", "timeout")
    agent, child = project.recorded()["h"]
    assert project.survivors([agent, child]) == []
    assert project.staging_leftovers() == []
    assert not (project.root / "data" / "h").exists()
    (entry,) = project.entries("h")
    assert "cause: timeout" in entry


def test_nonzero_exit_fails_with_code_and_stderr_tail(make_project: ProjectFactory) -> None:
    """An agent exiting 3 for some keys fails those with cause ``runner-error``, a message
    saying ``exited with code 3``, the tail of its stderr and its log folder in the notes; the
    others commit."""
    runner = make_project.runner("write", "b=exit3", "d=exit3")
    items: list[dict[str, object]] = [{"id": k} for k in "abcde"]
    project = make_project(make_project.one_stage(runner, items))

    stage = project.run().stage("s")

    status = {inst.key: (inst.status, inst.cause) for inst in stage.instances}
    assert status == {
        "a": ("committed", None),
        "b": ("failed", "runner-error"),
        "c": ("committed", None),
        "d": ("failed", "runner-error"),
        "e": ("committed", None),
    }
    failed = {inst.key: inst.message for inst in stage.instances if inst.status == "failed"}
    assert all("exited with code 3" in message for message in failed.values())
    (entry,) = project.entries("b")
    assert "agent b: problem line 3" in entry
    assert "agent b: giving up with code 3" in entry
    logs = entry.split("- logs: `", 1)[1].split("`", 1)[0]
    assert logs.endswith("/logs/s/b/attempt-1")
    assert "agent b: problem line 3" in (project.root / logs / "stderr.log").read_text()
    assert project.dirs("data") == ["a", "c", "e"]


def test_agent_killed_by_a_signal_fails_as_runner_error(make_project: ProjectFactory) -> None:
    """An agent that SIGKILLs itself fails with cause ``runner-error`` and a message naming the
    signal; no output folder appears for it."""
    project = make_project(make_project.one_stage(make_project.runner("crash"), [{"id": "x"}]))

    (inst,) = project.run().stage("s").instances

    assert (inst.status, inst.cause) == ("failed", "runner-error")
    assert "killed by signal 9" in inst.message
    assert not (project.root / "data" / "x").exists()


def test_child_left_behind_by_a_successful_agent_is_killed(
    make_project: ProjectFactory, pids: Path
) -> None:
    """An agent that exits 0 but leaves a child in its process group commits, and the child does
    not outlive the attempt."""
    project = make_project(
        make_project.one_stage(make_project.runner("--pids", str(pids), "orphan"), [{"id": "o"}])
    )

    (inst,) = project.run().stage("s").instances

    assert inst.status == "committed"
    _, child = project.recorded()["o"]
    assert project.survivors([child]) == []


def test_missing_program_fails_as_runner_error(make_project: ProjectFactory) -> None:
    """A program that cannot start fails the attempt (cause ``runner-error``, message ``cannot
    start``); it is not a crash of the run."""
    runner = {"type": "command", "argv": [str(Path("/nonexistent/phalanx-agent"))]}
    project = make_project(make_project.one_stage(runner, [{"id": "m"}]))

    (inst,) = project.run().stage("s").instances

    assert (inst.status, inst.cause) == ("failed", "runner-error")
    assert "cannot start" in inst.message


HOSTILE = [
    "a; touch pwned",
    "$(touch pwned)",
    "`touch pwned`",
    "it's 'quoted'",
    'say "hi"',
    "line one\nline two",
    "cr\r\nlf",
    " two  spaces ",
    "a && touch pwned",
    "a || touch pwned",
    "a | tee pwned",
    "* ? [a-z]",
    "> pwned",
    "{not_a_placeholder} {{PARTITION_KEY}}",
    "$HOME ${HOME} %s %(x)s",
    "-rf --help",
    "~/x \\ back\\slash",
    "中文 🚀 é",
    "",
]


def test_hostile_partition_values_reach_argv_and_stdin_literally(
    make_project: ProjectFactory, tmp_path: Path
) -> None:
    """Partition values full of shell syntax arrive in argv exactly as written, each inside the
    one argv element that names it (alone or with text around it), in the agent's argv and in
    the stage's ``check`` command alike; the rendered prompt arrives on stdin byte for byte;
    nothing is ever run by a shell (no ``pwned`` file appears)."""
    runner = {
        "type": "command",
        "argv": [make_project.python, str(make_project.agent), "argv", "{v}", "x={v}=y"],
    }
    items: list[dict[str, object]] = [{"id": f"p{n}", "v": v} for n, v in enumerate(HOSTILE)]
    check = [
        make_project.python,
        "-c",
        "import json, sys; sys.exit(json.load(open('argv.json'))[0] != sys.argv[1])",
        "{v}",
    ]
    config = make_project.one_stage(
        runner,
        items,
        expect=("argv.json", "stdin.bin"),
        params={"V": "{v}"},
        blueprint="agent.md",
        check=check,
    )
    project = make_project(config, {"agent.md": "Value <<{V}>> for {PARTITION_KEY}.\n"})
    before = set(Path.cwd().iterdir())

    stage = project.run().stage("s")

    assert stage.committed == len(HOSTILE), [i.message for i in stage.instances if i.message]
    for n, value in enumerate(HOSTILE):
        out = project.root / "data" / f"p{n}"
        assert json.loads((out / "argv.json").read_text(encoding="utf-8")) == [
            value,
            f"x={value}=y",
        ]
        prompt = f"Value <<{value}>> for p{n}.\n".encode()
        assert (out / "stdin.bin").read_bytes() == prompt
    assert not [p for p in tmp_path.rglob("*") if "pwned" in p.name]
    assert set(Path.cwd().iterdir()) == before


def test_prompt_file_mode_writes_the_prompt_byte_for_byte(make_project: ProjectFactory) -> None:
    """With ``prompt: file`` the rendered prompt is in the file ``{PROMPT_FILE}`` names, stdin is
    empty, and the planner's prompt and the file agree byte for byte."""
    runner = {
        "type": "command",
        "argv": [make_project.python, str(make_project.agent), "argv", "{PROMPT_FILE}"],
        "prompt": "file",
    }
    items: list[dict[str, object]] = [{"id": "f", "v": "tab\there; $(x)\n中文"}]
    config = make_project.one_stage(
        runner, items, expect=("argv.json",), params={"V": "{v}"}, blueprint="agent.md"
    )
    project = make_project(config, {"agent.md": 'Prompt: {V}\n\n{"json": true}\n'})

    (inst,) = project.run().stage("s").instances

    assert inst.status == "committed", inst.message
    out = project.root / "data" / "f"
    (prompt_file,) = json.loads((out / "argv.json").read_text(encoding="utf-8"))
    planned = plan_pipeline(load_pipeline(project.pipeline)).stages[0].instances[0].prompt
    assert planned == 'Prompt: tab\there; $(x)\n中文\n\n{"json": true}\n'
    assert Path(prompt_file).read_bytes() == planned.encode()
    assert (out / "stdin.bin").read_bytes() == b""


def test_agent_that_never_reads_a_large_prompt_still_commits(
    make_project: ProjectFactory,
) -> None:
    """A 2 MiB prompt sent to an agent that ignores stdin and exits does not fail the attempt
    (the broken pipe is expected, not an error)."""
    config = make_project.one_stage(
        make_project.runner("write"), [{"id": "big"}], blueprint="agent.md"
    )
    project = make_project(config, {"agent.md": "x" * (2 << 20) + "\n"})

    (inst,) = project.run().stage("s").instances

    assert inst.status == "committed", inst.message


def _context(tmp_path: Path, params: dict[str, object]) -> InstanceContext:
    return InstanceContext(
        run_id="r",
        stage="s",
        key="k",
        attempt=2,
        params=params,
        prompt="",
        output_dir=tmp_path / "staging",
        final_dir=tmp_path / "final",
        inputs=(),
        missing=(),
        project_dir=tmp_path,
        log_dir=tmp_path / "logs",
        blueprint=None,
        timeout=10.0,
    )


def test_argv_renders_each_element_on_its_own(tmp_path: Path) -> None:
    """Each argv element is rendered alone (a value never splits or joins elements); built-ins
    such as ``{ATTEMPT}`` and ``{OUTPUT_DIR}`` are available; an unknown name is a
    :class:`RunnerError` naming it."""
    runner = CommandRunner(
        CommandRunnerConfig(argv=["prog", "{v}", "--out={OUTPUT_DIR}", "{ATTEMPT}-{STAGE}"])
    )
    argv = runner.argv(_context(tmp_path, {"v": "a b; c\nd"}), None)
    assert argv == ["prog", "a b; c\nd", f"--out={tmp_path / 'staging'}", "2-s"]
    missing = CommandRunner(CommandRunnerConfig(argv=["prog", "{nope}"]))
    with pytest.raises(RunnerError, match=r"\{nope\}"):
        missing.argv(_context(tmp_path, {}), None)


def test_environment_carries_params_and_never_nul(tmp_path: Path) -> None:
    """The agent's environment names the instance (``PHALANX_KEY``, ``PHALANX_PARAM_*``,
    ``PHALANX_PARAMS`` as JSON), and a NUL in a value cannot break ``exec``."""
    runner = CommandRunner(CommandRunnerConfig(argv=["prog"], env={"EXTRA": "1"}))
    env = runner.environment(_context(tmp_path, {"NAME": "a\x00b", "lower": "x"}), None)
    assert env["PHALANX_KEY"] == "k"
    assert env["PHALANX_ATTEMPT"] == "2"
    assert env["EXTRA"] == "1"
    assert "\x00" not in env["PHALANX_PARAM_NAME"]
    assert "PHALANX_PARAM_lower" not in env
    assert json.loads(env["PHALANX_PARAMS"])["lower"] == "x"
    assert all("\x00" not in k + v for k, v in env.items())
    assert os.environ.get("PATH") == env.get("PATH")

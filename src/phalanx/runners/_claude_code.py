"""The ``claude-code`` runner: headless Claude Code (``claude -p``), one process per attempt.

The prompt goes to stdin: in inline mode the rendered blueprint, in reference mode the
instruction to read the blueprint file, then a task text naming the instance, its parameters,
the files the stage expects and the absolute paths it may read. The working directory is the
attempt's staging folder. Each process gets a private ``HOME`` and ``CLAUDE_CONFIG_DIR`` under
the attempt's log folder (concurrent processes sharing one config folder corrupt it), and its
result (``--output-format json``) is kept as ``result.json`` beside its logs.

Confinement rests on Claude Code's own permission rules. A bare ``Write`` among the allowed
tools would let it write anywhere on the machine, and ``--add-dir`` under ``acceptEdits`` makes
a folder writable, so phalanx scopes bare file tools to the staging folder
(``Edit(//STAGING/**)``, ``Read(//STAGING/**)``), grants reads of the declared inputs by
``--add-dir`` (folders) and ``Read(...)`` rules (files), and denies edits there with
``--disallowedTools Edit(...)``, which wins over every allow rule and every permission mode.

The process runs in its own session (process group), handled like the ``command`` runner's: on
timeout, abort or Ctrl-C the group gets SIGTERM, then SIGKILL after ``kill_grace``; whatever the
CLI left in its group is killed when it exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .._config import ClaudeCodeRunnerConfig
from .._errors import RunnerError, UsageError
from ._base import InstanceContext, Runner
from ._llm import api_key, classify_status, task_message
from .command import run_process, tail

__all__ = ["ClaudeCodeRunner"]

_EDIT_TOOLS = frozenset({"Write", "Edit", "MultiEdit", "NotebookEdit"})
"""Claude Code's file-editing tools; an ``Edit(path)`` rule covers all of them."""
_READ_TOOLS = frozenset({"Read", "Glob", "Grep", "LS"})
"""Its file-reading tools; a ``Read(path)`` rule covers all of them."""
_OTHER_CREDENTIALS = (
    "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
)
"""Ways Claude Code authenticates without an API key; with one of them set none is needed."""
_XDG = ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME")


class ClaudeCodeRunner(Runner):
    """Runs each attempt as one ``claude -p`` process; see the module docstring."""

    type = "claude-code"

    def __init__(
        self, config: ClaudeCodeRunnerConfig, *, model: str | None, reference: bool, where: str
    ) -> None:
        self.config = config
        self.model = model
        self.reference = reference
        self.where = where
        found = shutil.which(config.command[0])
        if found is None:
            raise UsageError(
                f"{where}: Claude Code's command {config.command[0]!r} was not found: install "
                "it with `npm install -g @anthropic-ai/claude-code`, or set `command:` in the "
                "runner settings to the path of `claude`"
            )
        self.executable = found
        self.key = self._api_key(where)

    def _api_key(self, where: str) -> str | None:
        """The key Claude Code is given as ``ANTHROPIC_API_KEY``, or ``None`` when it
        authenticates another way (an OAuth token, Bedrock, Vertex)."""
        config = self.config
        if config.env.get("ANTHROPIC_API_KEY"):
            return None  # given in the runner's `env:`, which is set last anyway
        if not os.environ.get(config.api_key_env) and any(
            os.environ.get(name) or config.env.get(name) for name in _OTHER_CREDENTIALS
        ):
            return None
        try:
            return api_key(config.api_key_env, base_url=config.base_url, runner="claude-code")
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None

    def argv(self, ctx: InstanceContext) -> list[str]:
        """The command line of one attempt (the prompt goes to stdin)."""
        config = self.config
        staging = _rule_path(ctx.output_dir)
        argv = [
            self.executable,
            *config.command[1:],
            "-p",
            "--output-format",
            "json",
            "--permission-mode",
            config.permission_mode,
        ]
        if self.model:
            argv += ["--model", self.model]
        if config.max_turns is not None:
            argv += ["--max-turns", str(config.max_turns)]
        folders, files = _readable(ctx)
        for folder in folders:
            argv += ["--add-dir", str(folder)]
        allowed: list[str] = []
        for tool in config.allowed_tools:
            # A bare file tool would reach the whole machine: scope it to the staging folder.
            if tool in _EDIT_TOOLS:
                rule = f"Edit({staging}/**)"
            elif tool in _READ_TOOLS:
                rule = f"Read({staging}/**)"
            else:
                rule = tool
            if rule not in allowed:
                allowed.append(rule)
        denied: list[str] = []
        for path in [*folders, *files]:
            rule = _rule_path(path)
            if path in files:
                allowed.append(f"Read({rule})")
                denied.append(f"Edit({rule})")
            else:
                denied.append(f"Edit({rule}/**)")
        # Variadic options, one rule an argument: nothing positional follows (stdin has the prompt).
        if allowed:
            argv += ["--allowedTools", *allowed]
        if denied:
            argv += ["--disallowedTools", *denied]
        return argv

    def environment(self, ctx: InstanceContext, home: Path) -> dict[str, str]:
        """The orchestrator's environment with a private home and config folder, the endpoint
        and key, Claude Code's non-essential traffic off, and the runner's ``env``."""
        config = self.config
        env = {name: value for name, value in os.environ.items() if name not in _XDG}
        env.update(
            {
                "HOME": str(home),
                "CLAUDE_CONFIG_DIR": str(home / ".claude"),
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                "DISABLE_AUTOUPDATER": "1",
                "DISABLE_TELEMETRY": "1",
                "PHALANX_RUN_ID": ctx.run_id,
                "PHALANX_STAGE": ctx.stage,
                "PHALANX_KEY": ctx.key,
                "PHALANX_ATTEMPT": str(ctx.attempt),
            }
        )
        if config.base_url:
            env["ANTHROPIC_BASE_URL"] = config.base_url
        if self.key is not None:
            env["ANTHROPIC_API_KEY"] = self.key
        if config.permission_mode == "bypassPermissions":
            env["IS_SANDBOX"] = "1"  # else refused when phalanx runs as root
        env.update(config.env)
        return env

    def prompt(self, ctx: InstanceContext) -> str:
        """What the CLI reads on stdin: the blueprint (or, in reference mode, where to find it)
        followed by the task text."""
        return ctx.prompt.rstrip() + "\n\n" + _task_text(ctx, reference=self.reference)

    async def run(self, ctx: InstanceContext) -> None:
        ctx.log_dir.mkdir(parents=True, exist_ok=True)
        home = ctx.log_dir / "claude-home"
        home.mkdir(exist_ok=True)
        argv = self.argv(ctx)
        prompt = self.prompt(ctx)
        (ctx.log_dir / "prompt.md").write_text(prompt, encoding="utf-8")
        (ctx.log_dir / "argv.json").write_text(json.dumps(argv, indent=1), encoding="utf-8")
        env = self.environment(ctx, home)
        stdout_path = ctx.log_dir / "stdout.log"
        stderr_path = ctx.log_dir / "stderr.log"
        code = await run_process(
            argv,
            stdin=prompt,
            cwd=ctx.output_dir,
            env=env,
            stdout=stdout_path,
            stderr=stderr_path,
            kill_grace=self.config.kill_grace,
        )
        # Reading the result and copying the transcript is file work: off the event loop.
        await asyncio.to_thread(self._outcome, ctx, code, home, stdout_path, stderr_path)

    def _outcome(
        self, ctx: InstanceContext, code: int, home: Path, stdout_path: Path, stderr_path: Path
    ) -> None:
        """Record what the process reported and raise if the attempt failed. The result decides
        before the exit code: Claude Code exits 1 with a result that says why."""
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        result = _result(stdout_path)
        if result is None:
            raise RunnerError(
                f"Claude Code {how} without a JSON result",
                detail=tail(stderr_path) or tail(stdout_path),
            )
        (ctx.log_dir / "result.json").write_text(
            json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        session = _session_file(home, result.get("session_id"))
        if session is not None:
            shutil.copyfile(session, ctx.log_dir / "transcript.jsonl")
        _record_usage(ctx, result, session)
        denials = _denials(result)
        if result.get("is_error"):
            message = str(result.get("result") or result.get("subtype") or "error")
            status = result.get("api_error_status")
            if isinstance(status, int):
                raise classify_status(status, message)
            raise RunnerError(
                f"Claude Code stopped: {result.get('subtype') or 'error'}"
                + (f" ({message})" if message != result.get("subtype") else ""),
                detail=denials,
            )
        if code != 0:
            raise RunnerError(
                f"Claude Code {how} although its result reports no error",
                detail=tail(stderr_path) or denials,
            )


def _rule_path(path: Path) -> str:
    """An absolute path as Claude Code's permission rules write it: ``//abs/path``."""
    return "/" + path.resolve().as_posix()


def _readable(ctx: InstanceContext) -> tuple[list[Path], list[Path]]:
    """What the attempt may read besides its staging folder, as (folders, files): upstream
    outputs, the stage's declared reads and the blueprint."""
    paths = [ref.path for ref in ctx.inputs]
    paths += [ctx.project_dir / rel for rel in ctx.reads]
    if ctx.blueprint is not None:
        paths.append(ctx.blueprint)
    folders: list[Path] = []
    files: list[Path] = []
    for path in dict.fromkeys(p.resolve() for p in paths):
        (folders if path.is_dir() else files).append(path)
    return folders, files


def _task_text(ctx: InstanceContext, *, reference: bool) -> str:
    """The task part of the prompt, naming absolute paths: Claude Code's tools take them."""
    readable = [f"- {ref.path} (output of {ref.stage} {ref.key})" for ref in ctx.inputs]
    readable += [f"- {ctx.project_dir / rel}" for rel in ctx.reads]
    if reference and ctx.blueprint is not None:
        readable.append(f"- {ctx.blueprint} (the blueprint)")
    return task_message(
        ctx,
        writing="Your working directory is your output folder: write every output file there, "
        "with paths relative to it, and write nothing anywhere else.",
        reading="You may read these, and must not change them:",
        readable=readable,
        notes=[
            f"The project folder is {ctx.project_dir}; paths the instructions above name are "
            "relative to it."
        ],
    )


def _result(path: Path) -> dict[str, Any] | None:
    """The ``type: result`` object Claude Code printed (its last JSON line), or ``None``."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for raw in reversed(text.splitlines()):
        line = raw.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("type") == "result":
            return data
    return None


def _session_file(home: Path, session_id: object) -> Path | None:
    """Claude Code's own transcript of the session, in the private config folder."""
    if not isinstance(session_id, str) or not session_id:
        return None
    return next((home / ".claude" / "projects").glob(f"*/{session_id}.jsonl"), None)


def _record_usage(ctx: InstanceContext, result: dict[str, Any], session: Path | None) -> None:
    """Add the result's tokens and cost to the attempt's usage. Requests are the model
    responses in the session's transcript; ``num_turns`` (which counts one more than the
    responses on a normal run, and one on a run whose only request was refused) when the
    transcript is missing."""
    usage = ctx.usage
    used = result.get("usage")
    if isinstance(used, dict):
        usage.input_tokens += _int(used.get("input_tokens"))
        usage.output_tokens += _int(used.get("output_tokens"))
        usage.cache_read_tokens += _int(used.get("cache_read_input_tokens"))
        usage.cache_write_tokens += _int(used.get("cache_creation_input_tokens"))
    cost = result.get("total_cost_usd")
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        usage.cost_usd += float(cost)
    responses = _responses(session) if session is not None else None
    usage.requests += responses if responses is not None else _int(result.get("num_turns"))


def _responses(session: Path) -> int | None:
    """How many model responses the session transcript holds (its assistant entries, one per
    content block, share their message id)."""
    ids: set[str] = set()
    try:
        with session.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(entry, dict) or entry.get("type") != "assistant":
                    continue
                message = entry.get("message")
                if isinstance(message, dict):
                    ids.add(str(message.get("id") or entry.get("uuid")))
    except OSError:
        return None
    return len(ids)


def _denials(result: dict[str, Any]) -> str:
    """The tool calls Claude Code refused, one a line, for the notes."""
    denials = result.get("permission_denials")
    if not isinstance(denials, list) or not denials:
        return ""
    lines = []
    for denial in denials[:10]:
        if isinstance(denial, dict):
            tool_input = denial.get("tool_input")
            target = ""
            if isinstance(tool_input, dict):
                target = str(tool_input.get("file_path") or tool_input.get("path") or "")
            lines.append(f"permission denied: {denial.get('tool_name')} {target}".rstrip())
    return "\n".join(lines)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0

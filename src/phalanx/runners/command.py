"""The ``command`` runner: any program, started without a shell.

Each argv element is a config template rendered on its own, so a partition value lands inside
exactly one argument whatever it contains (``;``, ``$(...)``, quotes, newlines): nothing is ever
parsed by a shell. The rendered prompt goes to the program's stdin (or a file named by
``{PROMPT_FILE}`` / ``$PHALANX_PROMPT_FILE``), its working directory is the staging folder, and
its stdout and stderr are captured per attempt in the run's log folder.

The program runs in its own session (process group). On timeout, abort or Ctrl-C the whole group
gets SIGTERM, then SIGKILL after ``kill_grace`` seconds, so helpers it spawned die with it; the
same group is killed when the program exits, so no stray child outlives its attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from .._config import CommandRunnerConfig
from .._errors import RunnerError
from .._templates import TemplateKeyError, render_config, stringify
from ._base import InstanceContext, Runner

__all__ = ["CommandRunner", "kill_group", "run_process", "tail", "terminate"]

_TAIL_LINES = 20
_TAIL_BYTES = 4096


def tail(path: Path, *, lines: int = _TAIL_LINES) -> str:
    """The last ``lines`` lines (at most a few KiB) of a log file, or ``""``."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - _TAIL_BYTES))
            data = handle.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class CommandRunner(Runner):
    """Runs ``argv`` per attempt; see the module docstring."""

    type = "command"

    def __init__(self, config: CommandRunnerConfig) -> None:
        self.config = config

    def argv(self, ctx: InstanceContext, prompt_file: Path | None) -> list[str]:
        """The argv of one attempt: every element rendered on its own, never joined."""
        values = {**ctx.params, **self._builtins(ctx, prompt_file)}
        try:
            return [render_config(arg, values) for arg in self.config.argv]
        except TemplateKeyError as exc:
            raise RunnerError(
                f"runner argv refers to {{{exc.name}}}, which instance {ctx.key!r} has no value for"
            ) from None

    @staticmethod
    def _builtins(ctx: InstanceContext, prompt_file: Path | None) -> dict[str, object]:
        return {
            "OUTPUT_DIR": ctx.output_dir,
            "PROJECT_DIR": ctx.project_dir,
            "PARTITION_KEY": ctx.key,
            "STAGE": ctx.stage,
            "ATTEMPT": ctx.attempt,
            "PROMPT_FILE": prompt_file or "",
        }

    def environment(self, ctx: InstanceContext, prompt_file: Path | None) -> dict[str, str]:
        """The program's environment: the orchestrator's, the runner's ``env`` and
        ``PHALANX_*`` variables describing the instance."""
        env = dict(os.environ)
        env.update(self.config.env)
        env.update(
            {
                "PHALANX_RUN_ID": ctx.run_id,
                "PHALANX_STAGE": ctx.stage,
                "PHALANX_KEY": ctx.key,
                "PHALANX_ATTEMPT": str(ctx.attempt),
                "PHALANX_OUTPUT_DIR": str(ctx.output_dir),
                "PHALANX_FINAL_DIR": str(ctx.final_dir),
                "PHALANX_PROJECT_DIR": str(ctx.project_dir),
                "PHALANX_PARAMS": json.dumps(
                    {name: stringify(v) for name, v in ctx.params.items()}, ensure_ascii=False
                ),
                "PHALANX_INPUTS": json.dumps(
                    [
                        {"stage": ref.stage, "key": ref.key, "path": str(ref.path)}
                        for ref in ctx.inputs
                    ],
                    ensure_ascii=False,
                ),
                "PHALANX_MISSING": json.dumps(list(ctx.missing), ensure_ascii=False),
            }
        )
        if prompt_file is not None:
            env["PHALANX_PROMPT_FILE"] = str(prompt_file)
        for name, value in ctx.params.items():
            if name.isupper() and name.isidentifier():
                env[f"PHALANX_PARAM_{name}"] = stringify(value)
        return _without_nul(env)

    async def run(self, ctx: InstanceContext) -> None:
        ctx.log_dir.mkdir(parents=True, exist_ok=True)
        prompt_file = None
        if self.config.prompt == "file":
            prompt_file = ctx.log_dir / "prompt.md"
            prompt_file.write_text(ctx.prompt, encoding="utf-8")
        argv = self.argv(ctx, prompt_file)
        for position, arg in enumerate(argv):
            if "\x00" in arg:
                raise RunnerError(
                    f"argv[{position}] would contain a NUL byte (from a partition value), which "
                    "no program argument can hold; pass such values in a file or PHALANX_PARAMS"
                )
        env = self.environment(ctx, prompt_file)
        stdout_path = ctx.log_dir / "stdout.log"
        stderr_path = ctx.log_dir / "stderr.log"
        code = await run_process(
            argv,
            stdin=ctx.prompt if self.config.prompt == "stdin" else None,
            cwd=ctx.output_dir,
            env=env,
            stdout=stdout_path,
            stderr=stderr_path,
            kill_grace=self.config.kill_grace,
        )
        if code != 0:
            how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise RunnerError(
                f"{Path(argv[0]).name} {how}", detail=tail(stderr_path) or tail(stdout_path)
            )


async def run_process(
    argv: list[str],
    *,
    stdin: str | None,
    cwd: Path,
    env: Mapping[str, str],
    stdout: Path,
    stderr: Path,
    kill_grace: float,
) -> int:
    """Run ``argv`` in its own process group, ``stdin`` written to it (``None``: no input),
    output captured into the two files; returns the exit status (negative: killed by a
    signal). If the awaiting task is cancelled (timeout, abort, Ctrl-C) the whole group gets
    SIGTERM, then SIGKILL after ``kill_grace``; whatever is left in the group when the program
    exits is killed too."""
    with stdout.open("wb") as out, stderr.open("wb") as err:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
            )
        except OSError as exc:
            raise RunnerError(f"cannot start {argv[0]!r}: {exc}") from exc
        try:
            if process.stdin is not None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    process.stdin.write((stdin or "").encode("utf-8"))
                    await process.stdin.drain()
                process.stdin.close()
            return await process.wait()
        except BaseException:
            await terminate(process, kill_grace)
            raise
        finally:
            kill_group(process.pid, signal.SIGKILL)


def kill_group(pgid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def terminate(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL it; reap the leader."""
    if kill_group(process.pid, signal.SIGTERM):
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(process.wait())
        except TimeoutError:
            pass
    kill_group(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await asyncio.shield(process.wait())


def _without_nul(env: Mapping[str, str]) -> dict[str, str]:
    # An environment string cannot hold NUL; a partition value with one would make exec fail.
    return {k: v.replace("\x00", "\\0") for k, v in env.items()}

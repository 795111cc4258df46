"""Runners: what executes one attempt of one instance. Loaded by the stage's ``runner.type``."""

from __future__ import annotations

from pathlib import Path

from .._config import CommandRunnerConfig, PythonRunnerConfig, RunnerConfig
from .._errors import UnknownPluginError
from ._base import InputRef, InstanceContext, Runner
from .command import CommandRunner
from .python import PythonRunner, import_callable

__all__ = ["InputRef", "InstanceContext", "Runner", "create_runner"]


def create_runner(config: RunnerConfig, *, project_dir: Path, where: str) -> Runner:
    """A runner for one stage. ``where`` names the stage's runner setting in messages."""
    if isinstance(config, PythonRunnerConfig):
        function = import_callable(config.function, project_dir=project_dir, what=where)
        return PythonRunner(function)
    if isinstance(config, CommandRunnerConfig):
        return CommandRunner(config)
    raise UnknownPluginError(f"{where}: unknown runner type {config.type!r}")  # pragma: no cover

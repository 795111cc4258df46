"""Runners: what executes one attempt of one instance. Loaded by the stage's ``runner.type``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .._config import (
    AnthropicRunnerConfig,
    ClaudeCodeRunnerConfig,
    CommandRunnerConfig,
    PythonRunnerConfig,
    RunnerConfig,
)
from .._errors import UsageError
from .._prices import Price, default_prices
from ._base import InputRef, InstanceContext, Runner, Usage
from ._llm import Clients
from .command import CommandRunner
from .python import PythonRunner, import_callable

__all__ = ["InputRef", "InstanceContext", "Runner", "Usage", "create_runner"]


def create_runner(
    config: RunnerConfig,
    *,
    project_dir: Path,
    where: str,
    blueprint_model: str | None = None,
    reference: bool = False,
    prices: Mapping[str, Price] | None = None,
    clients: Clients | None = None,
    blueprint_tools: Sequence[str] = (),
) -> Runner:
    """A runner for one stage. ``where`` names the stage's runner setting in messages; an LLM
    runner without a ``model`` takes the blueprint's; ``reference`` says the prompt is the
    reference-mode wording rather than the rendered blueprint; ``prices`` add to or replace
    entries of the shipped price table; ``clients`` shares SDK clients between the stages of
    a run; ``blueprint_tools`` are the blueprint's ``tools`` (provider-side ones such as
    ``web_search`` are passed to the provider)."""
    if isinstance(config, PythonRunnerConfig):
        function = import_callable(config.function, project_dir=project_dir, what=where)
        return PythonRunner(function)
    if isinstance(config, CommandRunnerConfig):
        return CommandRunner(config)
    if isinstance(config, ClaudeCodeRunnerConfig):
        from ._claude_code import ClaudeCodeRunner  # noqa: PLC0415 - only when used

        return ClaudeCodeRunner(
            config, model=config.model or blueprint_model, reference=reference, where=where
        )
    model = config.model or blueprint_model
    if not model:
        raise UsageError(
            f"{where}: no model: set `model:` in the runner settings or in the blueprint"
        )
    table = {**default_prices(), **(prices or {})}
    try:
        if isinstance(config, AnthropicRunnerConfig):
            from ._anthropic import AnthropicRunner  # noqa: PLC0415 - loads an optional SDK

            return AnthropicRunner(
                config,
                model=model,
                reference=reference,
                prices=table,
                clients=clients,
                blueprint_tools=blueprint_tools,
            )
        from ._openai import OpenAIRunner  # noqa: PLC0415 - loads an optional SDK

        return OpenAIRunner(config, model=model, reference=reference, prices=table, clients=clients)
    except UsageError as exc:
        raise type(exc)(f"{where}: {exc}") from None

"""Public fakes for testing phalanx and the agents it runs.

:class:`LoopbackLLM` is an offline HTTP server on 127.0.0.1 that speaks the Anthropic Messages
API and the OpenAI Chat Completions API well enough for the real SDKs and the Claude Code CLI,
answering from scripted models, with latency, rate limits and injected faults. It needs
``aiohttp`` (``pip install 'phalanx[testing]'``). See ``docs/loopback-llm.md``.
"""

import importlib.util

if importlib.util.find_spec("aiohttp") is None:  # pragma: no cover - depends on the install
    raise ImportError("phalanx.testing needs aiohttp: pip install 'phalanx[testing]'")

from ._faults import Fault, FaultKind
from ._models import (
    BlueprintModel,
    Conversation,
    Model,
    Reply,
    ScriptedModel,
    ToolCall,
    ToolResult,
    Turn,
)
from ._server import Counters, LoopbackLLM, RecordedRequest

__all__ = [
    "BlueprintModel",
    "Conversation",
    "Counters",
    "Fault",
    "FaultKind",
    "LoopbackLLM",
    "Model",
    "RecordedRequest",
    "Reply",
    "ScriptedModel",
    "ToolCall",
    "ToolResult",
    "Turn",
]
